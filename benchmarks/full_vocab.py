"""How much one update lowers the exact reverse KL: rkl-full against rkl-sampled and rkl-topk.

The student is ``agentopd train``'s for ``env=lookup-chain`` (tiny-base, teacher
tiny-teacher-lookup-chain, SGD at ``optim.lr``, 16 episodes a step), first cold-started as the
trainer does (``--cold-start-steps`` SFT steps, AdamW at ``cold_start.lr``, on successful
scripted-expert episodes; 0 skips it). For each trial it plays one batch,
the in-process teacher scores it once, and from the same weights each loss takes ``--updates``
updates on that same batch. Before and after, ``Learner.measure`` reads ``diag/true_rkl``: the
exact per-token reverse KL(p || q) over the whole vocabulary on the batch's student tokens.
The table gives the mean over trials of the KL before, after, and the reduction.

Run::

    python benchmarks/full_vocab.py                  # 5 trials, 1 update (a few minutes on 2 cores)
    python benchmarks/full_vocab.py --trials 3 --updates 4 --lr 0.05

Limits: the tiny models are not language models; the number says how directly each loss
descends the quantity it is meant to reduce, not which one trains a better agent.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from agentopd.build import build_train, rollout_config
from agentopd.config import compose, to_dataclass
from agentopd.learner import Learner, LearnerConfig
from agentopd.rollout import EpisodeJob, expert_episodes, run_episodes

LOSSES = ("rkl-sampled", "rkl-topk", "rkl-full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--updates", type=int, default=1, help="updates per loss on the same batch")
    ap.add_argument("--lr", type=float, default=None, help="default: the config's optim.lr")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--cold-start-steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = ["env=lookup-chain", "cold_start.steps=0", "eval.episodes=0", "device=cpu"]
    overrides.append(f"episodes_per_step={args.episodes}")
    if args.lr is not None:
        overrides.append(f"optim.lr={args.lr}")
    cfg = compose("train", overrides)
    parts = build_train(cfg)
    assert parts.learner is not None and parts.teacher is not None
    head = parts.learner.teacher_head
    optim = to_dataclass(cfg.optim, LearnerConfig)
    if args.cold_start_steps > 0:
        cs = cfg.cold_start
        jobs = [
            EpisodeJob("lookup-chain", seed=50_000 + i, options={"split": "train"})
            for i in range(cs.episodes)
        ]
        demos = [ep for ep in expert_episodes(jobs, parts.renderer) if ep.success]
        sft = Learner(
            parts.student,
            LearnerConfig(name="adamw", lr=cs.lr),
            parts.renderer.pad_id,
            total_steps=args.cold_start_steps,
        )
        g = torch.Generator().manual_seed(0)
        for _ in range(args.cold_start_steps):
            pick = torch.randperm(len(demos), generator=g)[: cs.batch_size].tolist()
            nll = sft.step_sft([demos[i] for i in pick])["learner/loss"]
        print(f"cold start: {args.cold_start_steps} SFT steps, last nll {nll:.3f}")
    start = copy.deepcopy(parts.student.state_dict())
    rows: dict[str, list[tuple[float, float]]] = {loss: [] for loss in LOSSES}
    for trial in range(args.trials):
        parts.student.load_state_dict(start)
        jobs = parts.curriculum.jobs(trial, args.episodes)
        episodes = run_episodes(
            jobs, parts.engine, parts.renderer, rollout_config(cfg), seed=1000 + trial
        )
        parts.teacher.score(episodes)  # keeps its hidden states: the builder asked it to
        for loss in LOSSES:
            parts.student.load_state_dict(start)
            learner = Learner(
                parts.student,
                optim,
                parts.renderer.pad_id,
                loss=loss,
                topk=cfg.teacher_cfg.topk,
                total_steps=args.updates,
                teacher_head=head,
            )
            before = learner.measure(episodes)["diag/true_rkl"]
            for _ in range(args.updates):
                learner.step(episodes)
            after = learner.measure(episodes)["diag/true_rkl"]
            rows[loss].append((before, after))
        print(
            f"trial {trial}: "
            + "  ".join(f"{k} {b:.5f}->{a:.5f}" for k, v in rows.items() for b, a in v[-1:])
        )
    print(
        f"\n{args.trials} trials, {args.updates} update(s) of {optim.name} lr {optim.lr} on "
        f"the same batch of {args.episodes} episodes\n"
    )
    print("| loss | true RKL before | after | reduction (mean ± sd) | relative |")
    print("|---|---|---|---|---|")
    for loss, pairs in rows.items():
        drops = [b - a for b, a in pairs]
        rel = [(b - a) / b for b, a in pairs]
        sd = statistics.stdev(drops) if len(drops) > 1 else 0.0
        print(
            f"| {loss} | {statistics.mean(b for b, _ in pairs):.4f} | "
            f"{statistics.mean(a for _, a in pairs):.4f} | {statistics.mean(drops):.5f} ± "
            f"{sd:.5f} | {statistics.mean(rel):.2%} |"
        )


if __name__ == "__main__":
    main()
