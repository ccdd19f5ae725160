"""Rollout and teacher-scoring throughput, hf against vllm, and one OPD step by phase.

On the same jobs (``--episodes`` tasks of ``--env``, seeds 0..N-1, the env's config settings):

1. **rollout tokens/s**: the student (``--student``, default ``tiny-base``) plays the jobs with
   each engine of ``--engines`` (``NAME[:DTYPE]``, the ``engine_cfg.dtype``; after one warm-up
   batch each, at temperature 1, same rollout seed); sampled tokens over wall time. With
   ``--rounds N`` the engines take turns N times (a load change on a shared machine falls on
   each alike) and the row is the median round;
2. **teacher-scoring tokens/s**: the teacher (``--teacher``, default ``tiny-teacher-<env>``)
   scores the *same* episodes (those the last engine played) with ``teacher_backend=hf`` and
   ``vllm``; segment tokens over wall time;
3. **one OPD step by phase**: ``agentopd train`` runs ``--steps`` steps per engine (with the
   ``--set`` overrides); the median seconds and tokens/s of its rollout, teacher scoring and
   learner (the learner's includes the weight push to the engine), and the **share outside**
   them: each step's wall time (from its start until it is logged, or its checkpoint written
   when ``checkpoint_every`` asks for one, so logging, episode storage, checkpoints and the
   progress bar count) minus the three phases, over the wall time. The first step is dropped
   (warm-up).

Run it in the vLLM venv (without vllm it measures hf only)::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        .venv-vllm/bin/python benchmarks/engines.py --env lookup-chain --episodes 16 --steps 4

    # SmolLM2-135M and its LoRA expert teacher (docs/real_models.md, "Speed on 2 CPU cores"):
    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python \\
        benchmarks/engines.py --student smollm2-135m --teacher smollm2-135m-lookup-chain \\
        --episodes 8 --steps 2 --rounds 3 --engines hf:bfloat16 vllm vllm:bfloat16 --threads 2 \\
        --set lora.r=16 lora.alpha=32 optim.name=adamw checkpoint_every=100000

Limits: CPU timings on a shared machine are noisy (one run, medians of few steps); with the
tiny models vLLM's per-step scheduling cost is large next to the model's compute. The tables say
how the backends compare here, not on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("rollout", "teacher", "learner")


def _time(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _split(spec: str) -> tuple[str, str]:
    """``hf:bfloat16`` -> (``hf``, ``bfloat16``); no dtype -> ``auto``."""
    name, _, dtype = spec.partition(":")
    return name, dtype or "auto"


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``agentopd train`` overrides every part of the benchmark shares."""
    out = [f"env={args.env}", "device=cpu", f"cpu_threads={args.threads}"]
    out += [f"student={args.student}"] + ([f"teacher={args.teacher}"] if args.teacher else [])
    out += [f"rollout.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens else []
    return out


def throughput(args: argparse.Namespace, engines: list[str]) -> list[dict[str, Any]]:
    """Rows of rollout and teacher-scoring tokens/s per backend, on the same jobs/episodes."""
    from agentopd.build import (
        load_model,
        make_engine,
        resolve_device,
        rollout_config,
        student_name,
        teacher_name,
    )
    from agentopd.config import compose
    from agentopd.engines import EngineConfig
    from agentopd.renderer import Renderer
    from agentopd.rollout import EpisodeJob, run_episodes
    from agentopd.teachers import TeacherConfig
    from agentopd.teachers import hf as hf_teacher

    cfg = compose("train", _overrides(args))
    resolve_device("cpu", cfg.cpu_threads)
    model, tok = load_model(student_name(cfg), "student", cfg.seed)
    model.eval()
    renderer = Renderer(tok)
    rcfg = rollout_config(cfg, temperature=1.0)
    kwargs = dict(cfg.env_kwargs)
    jobs = [EpisodeJob(args.env, s, {"split": "train"}, kwargs) for s in range(args.episodes)]
    built = {}
    for spec in engines:
        name, dtype = _split(spec)
        engine = make_engine(name, model, renderer, Path(tempfile.mkdtemp()), EngineConfig(dtype))
        run_episodes(jobs[:2], engine, renderer, rcfg, seed=1)  # warm-up
        built[spec] = engine
    # Turns, round after round; the same seed replays the same jobs.
    timed: dict[str, list[tuple[float, int]]] = {spec: [] for spec in engines}
    episodes = None
    for _ in range(args.rounds):
        for spec, engine in built.items():
            eps, secs = _time(lambda e=engine: run_episodes(jobs, e, renderer, rcfg, seed=0))
            timed[spec].append((secs, sum(e.num_sampled_tokens for e in eps)))
            episodes = eps
    rows = []
    for spec, runs in timed.items():
        rates = [tokens / secs for secs, tokens in runs]
        secs, tokens = runs[rates.index(statistics.median_low(rates))]
        rows.append({"what": "rollout", "backend": spec, "tokens": tokens, "seconds": secs,
                     "rounds": [round(r, 2) for r in rates]})  # fmt: skip
    del built
    gc.collect()
    teacher = teacher_name(cfg)
    tcfg = TeacherConfig(topk=16)
    backends = {"hf": hf_teacher.build}
    if any(_split(e)[0] == "vllm" for e in engines):
        from agentopd.teachers import vllm as vllm_teacher

        backends["vllm"] = vllm_teacher.build
    scored = sum(len(s.tokens) for e in episodes for s in e.segments)
    for name, build in backends.items():
        t = build(teacher, tokenizer=tok, config=tcfg, device="cpu")
        t.score(episodes[:2])  # warm-up
        _, secs = _time(lambda t=t: t.score(episodes))
        rows.append({"what": "teacher", "backend": name, "tokens": scored, "seconds": secs})
        del t
        gc.collect()
    return rows


def phases(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """Median seconds and tokens/s per phase of an OPD step with engine ``spec``, and the
    median share of a step's wall time outside rollout, teacher and learner."""
    from agentopd import trainer as trainer_mod
    from agentopd.config import compose
    from agentopd.hooks import TrainerHooks

    name, dtype = _split(spec)
    starts: list[float] = []
    rows: list[dict[str, Any]] = []
    ends: dict[str, float] = {}
    original = trainer_mod.Trainer.train_step

    def timed(self: Any, step: int) -> dict[str, Any]:
        starts.append(time.perf_counter())
        row = original(self, step)
        rows.append(row)
        return row

    class Ends(TrainerHooks):
        def point(self, where: str) -> None:
            ends[where] = time.perf_counter()

    trainer_mod.Trainer.train_step = timed  # type: ignore[method-assign]
    runs = tempfile.mkdtemp(prefix="agentopd-bench-")
    cfg = compose(
        "train",
        [
            *_overrides(args),
            f"engine={name}",
            f"engine_cfg.dtype={dtype}",
            f"steps={args.steps + 1}",
            f"episodes_per_step={args.episodes}",
            "cold_start.steps=0",
            "eval.episodes=0",
            f"runs_dir={runs}",
            "checkpoint_every=1",
            *args.set,
        ],  # fmt: skip
    )
    try:
        trainer_mod.train(cfg, hooks=Ends())
    finally:
        trainer_mod.Trainer.train_step = original  # type: ignore[method-assign]
    # A step ends once it is logged, or once its checkpoint is written when checkpoint_every
    # asks for one (the end-of-run checkpoint does not count).
    every = max(1, cfg.checkpoint_every)
    walls = [
        ends[f"checkpoint:{i}" if (i + 1) % every == 0 else f"train:{i}"] - start
        for i, start in enumerate(starts)
    ][1:]  # the first step warms up
    rows = rows[1:]
    inner = [sum(r[f"time/{k}_s"] for k in PHASES) for r in rows]
    out: dict[str, Any] = {"engine": spec, "steps": len(rows), "step_s": statistics.median(walls)}
    for k in PHASES:
        out[f"{k}_s"] = statistics.median(r[f"time/{k}_s"] for r in rows)
        out[f"{k}_tok_s"] = statistics.median(r[f"throughput/{k}_tok_s"] for r in rows)
    out["outside_share"] = statistics.median((w - i) / w for w, i in zip(walls, inner))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="lookup-chain")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--student", default="tiny-base")
    p.add_argument("--teacher", default=None, help="default: the config's (tiny-teacher-<env>)")
    p.add_argument("--engines", nargs="+", default=None,
                   help="NAME[:DTYPE] rollout engines (default: hf, and vllm when importable)")  # fmt: skip
    p.add_argument("--steps", type=int, default=4, help="timed training steps per engine")
    p.add_argument("--rounds", type=int, default=1, help="timed rollouts per engine, in turns")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the env config's")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--set", nargs="*", default=[], help="more `agentopd train` overrides")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    engines = args.engines or ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    t0 = time.perf_counter()
    rows = throughput(args, engines)
    print(f"env={args.env} student={args.student} teacher={args.teacher or 'config'} "
          f"episodes={args.episodes} threads={args.threads} set={' '.join(args.set)}")  # fmt: skip
    print(f"{'what':<10}{'backend':<15}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}")
    for r in rows:
        rate = r["tokens"] / max(r["seconds"], 1e-9)
        rounds = f"  rounds: {r['rounds']}" if len(r.get("rounds", [])) > 1 else ""
        print(
            f"{r['what']:<10}{r['backend']:<15}{r['tokens']:>8}{r['seconds']:>10.2f}{rate:>11.1f}"
            + rounds
        )
    steps = [phases(args, e) for e in engines] if args.steps > 0 else []
    print(f"{'engine':<15}{'steps':>6}" + "".join(f"{k + ' s (tok/s)':>22}" for k in PHASES)
          + f"{'step s':>9}{'outside':>9}")  # fmt: skip
    for o in steps:
        cells = "".join(f"{o[f'{k}_s']:>12.2f} ({o[f'{k}_tok_s']:>6.1f})" for k in PHASES)
        print(
            f"{o['engine']:<15}{o['steps']:>6}{cells}{o['step_s']:>9.2f}{o['outside_share']:>9.1%}"
        )
    print(f"wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": rows, "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
