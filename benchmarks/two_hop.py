"""OPD vs SFT-only where OPD demonstrably works: a 1-hop cold start learning 2-hop lookup chains.

The student (``tiny-base``) is cold-started on 1-hop ``lookup-chain`` expert episodes only, so it
solves 0% of 2-hop tasks. From there, per seed, two runs on 2-hop tasks:

* ``opd``: on-policy distillation from the shipped teacher with the recipe of
  ``tests/test_opd_lifts_student.py`` (``fkl-topk``, SGD lr 0.1, rollouts at temperature 0.5);
* ``sft``: SFT on episodes the teacher plays (``gkd_lambda=0 demo_source=teacher``, AdamW lr 1e-3
  as in the reference experiment's SFT-only arm), stopped once it has used as many teacher
  tokens as the ``opd`` run did (``teacher_token_budget``).

Both are evaluated every ``--eval-every`` steps on the same held-out 2-hop tasks (greedy), so the
curves compare success at equal teacher tokens. Outputs a markdown table and a PNG of success vs
teacher tokens. Run::

    python benchmarks/two_hop.py --seeds 0,1 --out docs
    python benchmarks/two_hop.py --report-only --runs-dir runs/two-hop --out docs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from reference import _curve, _teacher_tokens  # benchmarks/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
AGENTOPD = [sys.executable, "-m", "agentopd.cli"]


def _train(args: list[str]) -> None:
    r = subprocess.run([*AGENTOPD, "train", *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"agentopd train {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def run(seeds: list[int], a: argparse.Namespace) -> None:
    runs = Path(a.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    demos = runs / "one_hop.jsonl"
    if not demos.exists():
        r = subprocess.run(
            [*AGENTOPD, "collect", "env=lookup-chain", "env_kwargs.min_hops=1",
             "env_kwargs.max_hops=1", "model=expert", f"episodes={a.demos}", f"output={demos}"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
    common = [
        "env=lookup-chain", "env_kwargs.min_hops=2", "env_kwargs.max_hops=2",
        "student=tiny-base", "teacher=tiny-teacher-lookup-chain", f"cold_start.data={demos}",
        f"cold_start.steps={a.cold_steps}", "episodes_per_step=16", "checkpoint_every=1000",
        "eval.before=false", f"eval.episodes={a.eval_episodes}", f"eval.every={a.eval_every}",
        f"runs_dir={runs}",
    ]  # fmt: skip
    for seed in seeds:
        t0 = time.time()
        _train([*common, f"seed={seed}", "loss=fkl-topk", "optim.name=sgd", "optim.lr=0.1",
                "rollout.temperature=0.5", f"steps={a.steps}", f"run_name=opd-s{seed}"])  # fmt: skip
        budget = _teacher_tokens(runs / f"opd-s{seed}")
        _train([*common, f"seed={seed}", "gkd_lambda=0", "demo_source=teacher",
                "optim.name=adamw", "optim.lr=1e-3", "rollout.temperature=0.5",
                f"teacher_token_budget={budget}", f"steps={a.steps * 20}",
                f"run_name=sft-s{seed}"])  # fmt: skip
        print(f"seed {seed}: {time.time() - t0:.0f} s, budget {budget} teacher tokens", flush=True)


def report(seeds: list[int], a: argparse.Namespace) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, out = Path(a.runs_dir), Path(a.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    lines = [
        "| run | teacher tokens at first eval >= 90% | lowest success after that | final |",
        "|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, color in (("opd", "tab:blue"), ("sft", "tab:orange")):
        for seed in seeds:
            pts = _curve(runs / f"{arm}-s{seed}")
            first = next((i for i, (_, s) in enumerate(pts) if s >= 0.9), None)
            reached = f"{pts[first][0]:,}" if first is not None else "never"
            low = min(s for _, s in pts[first:]) if first is not None else float("nan")
            lines.append(f"| {arm} seed {seed} | {reached} | {100 * low:.0f}% | "
                         f"{100 * pts[-1][1]:.0f}% at {pts[-1][0]:,} |")  # fmt: skip
            ax.plot([t / 1000 for t, _ in pts], [100 * s for _, s in pts], marker="o", ms=3,
                    color=color, alpha=0.8, label=f"{arm} seed {seed}")  # fmt: skip
    ax.set_xlabel("teacher tokens (thousands)")
    ax.set_ylabel("held-out 2-hop success (%)")
    ax.set_title("1-hop cold start -> 2 hops: OPD vs SFT-only")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "figures" / "two-hop-opd-vs-sft.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=100, help="OPD steps")
    p.add_argument("--cold-steps", type=int, default=60)
    p.add_argument("--demos", type=int, default=300, help="1-hop expert episodes")
    p.add_argument("--eval-episodes", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--runs-dir", default="runs/two-hop")
    p.add_argument("--out", default="runs/two-hop/report", help="where the PNG goes")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.report_only:
        run(seeds, a)
    print(report(seeds, a))


if __name__ == "__main__":
    main()
