"""Cold-start SFT step time: the padded pass the learner used to run vs the packed one it runs.

Builds the main job's cold start for ``--env`` from its config (``agentopd train env=ENV``):
the student, ``cold_start.episodes`` expert demonstrations (as the trainer plays them), the
cold start's optimizer (AdamW at ``cold_start.lr``, constant) and ``optim.micro_batch``. It
draws ``--steps`` seeded batches of ``cold_start.batch_size`` and, for each variant, trains a
fresh copy of the student on them, timing every step:

* ``padded``: :func:`agentopd.sft.backward` with ``packed=False`` (every sequence right-padded,
  log-probs at every position), then the same clip, AdamW and schedule step;
* ``packed``: :meth:`agentopd.learner.Learner.step_sft` itself (shared prefix once, the rest
  packed into rows with a block-diagonal mask, log-probs at trained positions only);
* ``packed+bf16`` (with ``--bf16``): the same with ``optim.sft_bf16=on``.

The variants alternate for ``--repeats`` rounds. The table shows each variant's median step
time, its speed-up over ``padded``, the mean loss over the steps and the largest difference
from ``padded``'s loss at the same step (float rounding only, except under bfloat16): both
variants train the same model on the same batches.

Run::

    python benchmarks/cold_start_step.py                      # code-sandbox, a few minutes
    python benchmarks/cold_start_step.py --env sql --bf16
    python benchmarks/cold_start_step.py --student tiny-teacher-base --micro-batch 16  # a zoo build
    python benchmarks/cold_start_step.py --quick              # lookup-chain, a few steps

Limits: CPU timings on a shared machine are noisy; the ratios matter, not the seconds. The
first step of each round warms up and is not timed.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from dataclasses import replace
from typing import Any

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="code-sandbox")
    p.add_argument("--student", default=None, help="default: the config's student")
    p.add_argument("--episodes", type=int, default=None, help="default: cold_start.episodes")
    p.add_argument("--batch-size", type=int, default=None, help="default: cold_start.batch_size")
    p.add_argument("--micro-batch", type=int, default=None, help="default: optim.micro_batch")
    p.add_argument("--steps", type=int, default=8, help="batches timed per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the table shows medians")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--bf16", action="store_true", help="also time packed under bf16 autocast")
    p.add_argument("--quick", action="store_true", help="lookup-chain, 40 episodes, 3 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.env, a.episodes, a.steps, a.repeats = "lookup-chain", a.episodes or 40, 3, 1
    if a.threads:
        torch.set_num_threads(a.threads)

    from omegaconf import OmegaConf

    from agentopd import seeds, sft
    from agentopd.build import load_model, student_name
    from agentopd.config import compose
    from agentopd.learner import Learner
    from agentopd.renderer import Renderer
    from agentopd.rollout import EpisodeJob, expert_episodes

    cfg = compose("train", [f"env={a.env}"])
    cs = cfg.cold_start
    student, tokenizer = load_model(a.student or student_name(cfg), "student", cfg.seed)
    renderer = Renderer(tokenizer)
    episodes = a.episodes or cs.episodes
    jobs = [
        EpisodeJob(a.env, seeds.task_base(cfg.seed, "cold_start") + i, {"split": "train"}, dict(cfg.env_kwargs))
        for i in range(episodes)
    ]
    demos = [ep for ep in expert_episodes(jobs, renderer) if ep.success]
    batch_size = min(a.batch_size or cs.batch_size, len(demos))
    rng = random.Random(cfg.seed)
    batches = [rng.sample(demos, batch_size) for _ in range(a.steps + 1)]
    optim = replace(
        OmegaConf.to_object(cfg.optim), name="adamw", lr=cs.lr, schedule="constant",
        warmup_steps=0, micro_batch=a.micro_batch or cfg.optim.micro_batch,
    )  # fmt: skip
    loss_cfg = OmegaConf.to_object(cfg.loss_cfg)

    def padded_step(learner: Learner, batch: list[Any]) -> float:
        """Learner.step_sft as it was: the same update through the padded pass."""
        learner.model.train()
        learner.optimizer.zero_grad(set_to_none=True)
        out = sft.backward(
            learner.model, [sft.SftGroup(batch)], pad_id=learner.pad_id, agg=loss_cfg.agg,
            micro_batch=optim.micro_batch, chunk_size=loss_cfg.chunk_size, packed=False,
        )  # fmt: skip
        clip = optim.grad_clip if optim.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_(learner.model.parameters(), clip)
        learner.optimizer.step()
        learner.scheduler.step()
        return out["loss"]

    variants: dict[str, tuple[Any, str]] = {
        "padded": (padded_step, "off"),
        "packed": (lambda lr, b: lr.step_sft(b)["learner/loss"], "off"),
    }
    if a.bf16:
        variants["packed+bf16"] = (variants["packed"][0], "on")
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for name, (step, bf16) in variants.items():
            learner = Learner(
                copy.deepcopy(student), replace(optim, sft_bf16=bf16), renderer.pad_id,
                loss_cfg=loss_cfg, total_steps=len(batches),
            )  # fmt: skip
            per_step, seen = [], []
            for k, batch in enumerate(batches):
                t = time.perf_counter()
                seen.append(step(learner, batch))
                if k > 0:  # the first batch warms up
                    per_step.append(time.perf_counter() - t)
            times[name].append(statistics.median(per_step))
            losses.setdefault(name, seen)

    segs = [sft.trained_segments(b)[: optim.micro_batch] for b in batches[1:]]
    rows = [
        len(sft.pack_rows([len(s.tokens) - sft.prefix_to_share(part) for s in part]))
        for part in segs
    ]
    print(
        f"{a.env}: {len(demos)} demonstrations, batch {batch_size}, micro-batch "
        f"{optim.micro_batch}, {a.steps} steps x {a.repeats} rounds, "
        f"{torch.get_num_threads()} thread(s); packed rows per micro-batch "
        f"{sum(rows) / len(rows):.1f}"
    )
    base = statistics.median(times["padded"])
    print(
        f"{'variant':<12} {'median s/step':>14} {'speed-up':>9} {'mean loss':>10} {'max diff':>9}"
    )
    for name in variants:
        med = statistics.median(times[name])
        mean = statistics.mean(losses[name])
        diff = max(abs(x - y) for x, y in zip(losses[name], losses["padded"], strict=True))
        print(f"{name:<12} {med:>14.3f} {base / med:>8.2f}x {mean:>10.5f} {diff:>9.2e}")


if __name__ == "__main__":
    main()
