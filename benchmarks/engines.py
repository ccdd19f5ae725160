"""Rollout and teacher-scoring throughput, hf against vllm, and the framework's own overhead.

On the same jobs (``--episodes`` tasks of ``--env``, seeds 0..N-1):

1. **rollout tokens/s**: the student (``tiny-base``) plays the jobs with the ``hf`` engine and
   with the ``vllm`` engine (after one warm-up batch each); sampled tokens over wall time;
2. **teacher-scoring tokens/s**: the teacher (``tiny-teacher-<env>``) scores the *same*
   episodes (those the vllm engine played) with ``teacher_backend=hf`` and ``vllm``; segment
   tokens over wall time;
3. **overhead share**: ``agentopd train`` runs ``--steps`` steps per engine; each step's wall
   time (from one step's start to the next, so logging, episode storage, checkpoints and the
   progress bar count) minus its rollout, teacher and learner time (the learner's includes the
   weight push), over the wall time. The first step is dropped (warm-up).

Run it in the vLLM venv (without vllm it measures hf only)::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        .venv-vllm/bin/python benchmarks/engines.py --env lookup-chain --episodes 16 --steps 4

Limits: tiny models on CPU, where vLLM's per-step scheduling cost is large next to the model's
compute; the table says how the two compare here, not on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _time(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def throughput(args: argparse.Namespace, engines: list[str]) -> list[dict[str, Any]]:
    """Rows of rollout and teacher-scoring tokens/s per backend, on the same jobs/episodes."""
    from agentopd import zoo
    from agentopd.build import make_engine
    from agentopd.renderer import Renderer
    from agentopd.rollout import EpisodeJob, RolloutConfig, run_episodes
    from agentopd.teachers import TeacherConfig
    from agentopd.teachers import hf as hf_teacher

    model, tok = zoo.load("tiny-base")
    renderer = Renderer(tok)
    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    jobs = [EpisodeJob(args.env, s, {"split": "train"}) for s in range(args.episodes)]
    rows, episodes = [], None
    for name in engines:
        engine = make_engine(name, model, renderer, Path(tempfile.mkdtemp()))
        run_episodes(jobs[:2], engine, renderer, cfg, seed=1)  # warm-up
        eps, secs = _time(lambda engine=engine: run_episodes(jobs, engine, renderer, cfg, seed=0))
        sampled = sum(e.num_sampled_tokens for e in eps)
        rows.append({"what": "rollout", "backend": name, "tokens": sampled, "seconds": secs})
        episodes = eps
    teacher = f"tiny-teacher-{args.env}"
    tcfg = TeacherConfig(topk=16)
    backends = {"hf": hf_teacher.build}
    if "vllm" in engines:
        from agentopd.teachers import vllm as vllm_teacher

        backends["vllm"] = vllm_teacher.build
    scored = sum(len(s.tokens) for e in episodes for s in e.segments)
    for name, build in backends.items():
        t = build(teacher, tokenizer=tok, config=tcfg, device="cpu")
        t.score(episodes[:2])  # warm-up
        _, secs = _time(lambda t=t: t.score(episodes))
        rows.append({"what": "teacher", "backend": name, "tokens": scored, "seconds": secs})
    return rows


def overhead(args: argparse.Namespace, engine: str) -> dict[str, float]:
    """Median share of a training step's wall time outside rollout, teacher and learner."""
    from agentopd import trainer as trainer_mod
    from agentopd.config import compose

    starts: list[float] = []
    inner: list[float] = []
    original = trainer_mod.Trainer.train_step

    def timed(self: Any, step: int) -> dict[str, Any]:
        starts.append(time.perf_counter())
        row = original(self, step)
        inner.append(row["time/rollout_s"] + row["time/teacher_s"] + row["time/learner_s"])
        return row

    trainer_mod.Trainer.train_step = timed  # type: ignore[method-assign]
    runs = tempfile.mkdtemp(prefix="agentopd-bench-")
    cfg = compose(
        "train",
        [
            f"env={args.env}",
            f"engine={engine}",
            f"steps={args.steps + 1}",
            f"episodes_per_step={args.episodes}",
            "cold_start.steps=0",
            "eval.episodes=0",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "device=cpu",
            f"runs_dir={runs}",
            "checkpoint_every=1",
        ],  # fmt: skip
    )
    try:
        trainer_mod.train(cfg)
    finally:
        trainer_mod.Trainer.train_step = original  # type: ignore[method-assign]
    starts.append(time.perf_counter())  # the end of the last step (after its log/checkpoint)
    walls = [b - a for a, b in zip(starts, starts[1:])]
    shares = [(w - i) / w for w, i in zip(walls[1:], inner[1:])]
    return {"engine": engine, "steps": len(shares), "step_s": statistics.median(walls[1:]),
            "overhead_share": statistics.median(shares)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="lookup-chain")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per engine")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    engines = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    rows = throughput(args, engines)
    print(f"env={args.env} episodes={args.episodes} max_new_tokens={args.max_new_tokens}")
    print(f"{'what':<10}{'backend':<9}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}")
    for r in rows:
        rate = r["tokens"] / max(r["seconds"], 1e-9)
        print(f"{r['what']:<10}{r['backend']:<9}{r['tokens']:>8}{r['seconds']:>10.2f}{rate:>11.0f}")
    over = [overhead(args, e) for e in engines]
    print(f"{'engine':<9}{'steps':>6}{'step s':>9}{'overhead':>10}")
    for o in over:
        print(f"{o['engine']:<9}{o['steps']:>6}{o['step_s']:>9.2f}{o['overhead_share']:>10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": rows, "overhead": over}, indent=2))


if __name__ == "__main__":
    main()
