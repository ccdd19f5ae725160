"""Long-horizon curricula benchmark: SFT-only against OPD with five curricula at equal teacher tokens.

For each seed the student is cold-started once (SFT on expert demonstrations, ``agentopd train
steps=0``); from those weights every arm trains until it has used ``--budget`` teacher tokens
(the trainer's ``teacher_token_budget``: tokens the teacher scored for OPD, plus tokens it
generated for guide turns or demonstrations), then is evaluated on held-out tasks (greedy):

* ``sft-only``: ``gkd_lambda=0`` (every step SFT on expert demonstrations), with
  ``optim.warmup_steps`` so that a fresh AdamW does not knock the cold-started student down;
* ``uniform``, ``tcod-f2b``, ``tcod-b2f``, ``horizon-sorted``, ``guided-opd``: OPD (the
  configured ``loss``) with that curriculum.

The teacher itself is evaluated on the same tasks: a curriculum cannot lift the student above
a teacher that does not solve the tasks. Every piece is an ``agentopd train``/``agentopd eval``
subprocess (``--jobs`` at a time; logs in ``RUNS_DIR/logs``). Run::

    python benchmarks/tcod.py --jobs 2                      # 5 seeds, long lookup-chain
    python benchmarks/tcod.py --jobs 2 --env code-sandbox   # 5-6 dependent steps
    python benchmarks/tcod.py --quick                       # smoke run (a minute or two)

Prints a table (mean and 95% t-interval over seeds) and, unless ``--quick``, writes it between
the result markers of ``docs/long_horizon.md``, followed by ``benchmarks/tcod_report.py``'s
per-arm tables (teacher KL per turn index, success by episode length, pass@k when the runs
evaluated with ``eval.pass_k`` > 1, and the budget as teacher prefill positions and decode
steps) and its two PNGs (``docs/figures/tcod-<env>-*.png``; ``--quick``: into RUNS_DIR).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tcod_report  # noqa: E402  (benchmarks/ is not a package)

ARMS = ("sft-only", "uniform", "tcod-f2b", "tcod-b2f", "horizon-sorted", "guided-opd")
SETTINGS: dict[str, list[str]] = {
    "lookup-chain": [
        "env_kwargs.min_hops=8",
        "env_kwargs.max_hops=16",
        "env_kwargs.distractors=2",
        "rollout.max_new_tokens=48",
        "rollout.max_episode_tokens=2048",
    ],
    "code-sandbox": [
        "env_kwargs.min_steps=5",
        "env_kwargs.max_steps=6",
        "rollout.max_new_tokens=96",
        "rollout.max_episode_tokens=2048",
    ],
}
"""The long-horizon settings of docs/long_horizon.md, as ``agentopd train`` overrides."""
MARK_START, MARK_END = "<!-- tcod-results:start -->", "<!-- tcod-results:end -->"
# Two-sided 95% Student-t quantiles by degrees of freedom (1..30); larger samples use 1.96.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (half-width 0 for a single value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, 0.0
    t = T95[len(xs) - 2] if len(xs) - 1 <= len(T95) else 1.96
    return m, t * statistics.stdev(xs) / math.sqrt(len(xs))


def arm_overrides(arm: str, a: argparse.Namespace) -> list[str]:
    """The ``agentopd train`` overrides that make ``arm`` (on top of the common ones)."""
    if arm == "sft-only":
        return ["gkd_lambda=0", f"optim.warmup_steps={a.sft_warmup}"]
    out = [f"curriculum={arm}"]
    if arm in ("tcod-f2b", "tcod-b2f"):
        out.append(f"curriculum_kwargs.eta={a.eta}")
    if arm == "guided-opd":
        out += [
            f"curriculum_kwargs.p_start={a.guide_p}",
            f"curriculum_kwargs.decay_steps={max(1, a.steps // 2)}",
        ]
    return out


def _agentopd(args: list[str], log: Path) -> float:
    """Run ``agentopd ARGS`` with its output in ``log``; returns the wall time."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ agentopd " + shlex.join(args) + "\n")
        f.flush()
        done = subprocess.run(
            [sys.executable, "-m", "agentopd.cli", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "160"},
        )
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"agentopd {' '.join(args[:3])} ... failed (log {log}):\n{tail}")
    return time.perf_counter() - t0


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _eval_success(run: Path, tag: str) -> float:
    rows = [r for r in _rows(run) if r.get("phase") == "eval" and r.get("tag") == tag]
    if not rows:
        raise RuntimeError(f"{run}: no '{tag}' evaluation in metrics.jsonl")
    return float(rows[-1]["eval/success"])


def run_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    """Cold starts, then every (seed, arm), ``a.jobs`` processes at a time; returns the results."""
    runs = Path(a.runs_dir).resolve()
    (runs / "logs").mkdir(parents=True, exist_ok=True)
    common = [
        f"env={a.env}",
        *SETTINGS[a.env],
        f"runs_dir={runs}",
        f"teacher={a.teacher}",
        f"episodes_per_step={a.episodes_per_step}",
        f"eval.episodes={a.eval_episodes}",
        "eval.before=false",
        *a.extra,
    ]
    if a.quick:
        common = [c for c in common if not c.startswith("rollout.")]
        common += ["rollout.max_new_tokens=16", "rollout.max_episode_tokens=512"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs)

    for s in a.seeds:
        for n in a.arms:
            if (runs / f"{n}-s{s}").exists():
                raise SystemExit(f"{runs / f'{n}-s{s}'} exists: pick a new --runs-dir")
        if (runs / f"cold-s{s}").exists() and not a.reuse_cold_starts:
            raise SystemExit(
                f"{runs / f'cold-s{s}'} exists: pick a new --runs-dir, or pass "
                "--reuse-cold-starts to start the arms from it"
            )

    def cold(seed: int) -> float:
        if a.reuse_cold_starts and (runs / f"cold-s{seed}" / "cold_start_model").is_dir():
            return 0.0
        args = ["train", *common, f"seed={seed}", f"run_name=cold-s{seed}", "steps=0"]
        args += [f"cold_start.episodes={a.cold_episodes}", f"cold_start.steps={a.cold_steps}"]
        return _agentopd(args, runs / "logs" / f"cold-s{seed}.log")

    def arm(seed: int, name: str) -> dict[str, Any]:
        student = runs / f"cold-s{seed}" / "cold_start_model"
        args = ["train", *common, f"seed={seed}", f"run_name={name}-s{seed}", f"student={student}"]
        args += ["cold_start.steps=0", f"steps={a.steps}", f"teacher_token_budget={a.budget}"]
        args += arm_overrides(name, a)
        wall = _agentopd(args, runs / "logs" / f"{name}-s{seed}.log")
        run = runs / f"{name}-s{seed}"
        train = [r for r in _rows(run) if r.get("phase") == "train"]
        return {
            "success": _eval_success(run, "after training"),
            "teacher_tokens": train[-1]["teacher_tokens"] if train else 0,
            "steps": len(train),
            "wall_s": wall,
        }

    def teacher() -> float:
        args = ["eval", f"env={a.env}", f"model={a.teacher_model}", f"episodes={a.eval_episodes}"]
        args += [c for c in common if c.startswith(("env_kwargs.", "rollout."))]
        out = runs / "teacher-eval.jsonl"
        _agentopd([*args, f"output={out}"], runs / "logs" / "teacher-eval.log")
        eps = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        return sum(bool(e.get("success")) for e in eps) / max(1, len(eps))

    t0 = time.perf_counter()
    teacher_f = None if a.only_cold_starts else pool.submit(teacher)
    cold_f = {s: pool.submit(cold, s) for s in a.seeds}
    cold_success = {}
    for s, f in cold_f.items():
        f.result()
        cold_success[s] = _eval_success(runs / f"cold-s{s}", "after cold start")
    if a.only_cold_starts:
        pool.shutdown()
        raise SystemExit(f"cold starts done in {runs}: {cold_success}")
    arm_f = {(s, n): pool.submit(arm, s, n) for s in a.seeds for n in a.arms}
    results = {f"{n}/{s}": f.result() for (s, n), f in arm_f.items()}
    teacher_success = teacher_f.result() if teacher_f is not None else float("nan")
    pool.shutdown()
    return {
        "env": a.env,
        "settings": SETTINGS[a.env] + list(a.extra),  # later overrides win
        "seeds": a.seeds,
        "budget": a.budget,
        "teacher": a.teacher_model,
        "teacher_success": teacher_success,
        "cold_start_success": cold_success,
        "arms": results,
        "wall_s": time.perf_counter() - t0,
    }


def table(res: dict[str, Any], arms: list[str]) -> str:
    """The results as a Markdown table: mean ± 95% CI over seeds, and the paired per-seed
    differences against the cold start and against sft-only (every arm of a seed starts from
    that seed's cold start, so the paired interval removes the spread between cold starts)."""

    def fmt(xs: list[float], pct: bool = True) -> str:
        m, h = ci95(xs)
        return f"{m:.1%} ± {h:.1%}" if pct else f"{m:,.0f} ± {h:,.0f}"

    def paired(xs: list[float], base: list[float]) -> str:
        m, h = ci95([x - b for x, b in zip(xs, base, strict=True)])
        return f"{m:+.1%} ± {h:.1%}"

    seeds = res["seeds"]
    cold = [res["cold_start_success"][s] for s in seeds]
    sft = (
        [res["arms"][f"sft-only/{s}"]["success"] for s in seeds] if "sft-only" in arms else None
    )
    lines = [
        "| arm | held-out success | vs cold start (paired) | vs sft-only (paired) | "
        "teacher tokens | OPD/SFT steps | wall s per run |",
        "|---|---|---|---|---|---|---|",
        f"| teacher ({res['teacher']}) | {res['teacher_success']:.1%} | | | | | |",
        f"| cold start (every arm starts here) | {fmt(cold)} | | | | | |",
    ]
    for n in arms:
        rs = [res["arms"][f"{n}/{s}"] for s in seeds]
        xs = [r["success"] for r in rs]
        lines.append(
            f"| {n} | {fmt(xs)} | {paired(xs, cold)} | "
            f"{paired(xs, sft) if sft is not None and n != 'sft-only' else ''} | "
            f"{fmt([r['teacher_tokens'] for r in rs], pct=False)} | "
            f"{statistics.fmean(r['steps'] for r in rs):.1f} | "
            f"{statistics.fmean(r['wall_s'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def write_report(path: Path, res: dict[str, Any], text: str, command: str) -> None:
    """Put ``text`` between the result markers of ``path`` (appended when they are missing)."""
    effective: dict[str, str] = {}
    for item in res["settings"]:  # a later override of the same key wins, as in agentopd train
        key, _, value = item.partition("=")
        effective[key] = value
    settings = ", ".join(f"{k}={v}" for k, v in effective.items())
    block = (
        f"{MARK_START}\n"
        f"`{command}` — env `{res['env']}` ({settings}), seeds "
        f"{res['seeds']}, budget {res['budget']:,} teacher tokens per arm, total wall time "
        f"{res['wall_s'] / 60:.1f} min.\n\n{text}\n{MARK_END}"
    )
    old = path.read_text() if path.exists() else ""
    if MARK_START in old and MARK_END in old:
        head, rest = old.split(MARK_START, 1)
        new = head + block + rest.split(MARK_END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", choices=sorted(SETTINGS), default="lookup-chain")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=1, help="processes at a time")
    p.add_argument("--steps", type=int, default=40, help="step cap per arm (the budget binds)")
    p.add_argument("--budget", type=int, default=60_000, help="teacher tokens per arm")
    p.add_argument("--episodes-per-step", type=int, default=8)
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--cold-episodes", type=int, default=200)
    p.add_argument("--cold-steps", type=int, default=60)
    p.add_argument("--sft-warmup", type=int, default=5, help="optim.warmup_steps of sft-only")
    p.add_argument("--eta", type=int, default=3, help="TCOD: one more turn every eta steps")
    p.add_argument("--guide-p", type=float, default=0.5, help="guided-opd: p at step 0")
    p.add_argument("--teacher", default="auto", help="the train config's teacher")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "tcod"))
    p.add_argument("--report", default=str(ROOT / "docs" / "long_horizon.md"))
    p.add_argument(
        "--reuse-cold-starts",
        action="store_true",
        help="start the arms from RUNS_DIR/cold-s<seed> where it exists (same settings!)",
    )
    p.add_argument("--only-cold-starts", action="store_true", help="stop after the cold starts")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 step, tiny budgets")
    p.add_argument("extra", nargs="*", help="more agentopd train overrides (key=value)")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.budget, a.episodes_per_step = a.seeds[:1], 1, 10_000, 2
        a.eval_episodes, a.cold_episodes, a.cold_steps = 2, 8, 2
    a.teacher_model = f"tiny-teacher-{a.env}" if a.teacher == "auto" else a.teacher
    command = "python benchmarks/tcod.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = run_benchmark(a)
    # Per-arm curves from the runs' own metrics: KL per turn, success by length, pass@k, and the
    # budget as teacher prefill positions and decode steps (benchmarks/tcod_report.py).
    curves = tcod_report.summarise(Path(a.runs_dir))
    res["curves"] = curves
    text = table(res, a.arms) + "\n\n" + tcod_report.tables(curves)
    figures = Path(a.runs_dir) if a.quick else Path(a.report).parent / "figures"
    pngs = tcod_report.plots(curves, figures, prefix=f"tcod-{a.env}-")
    text += "\n\n" + "\n".join(f"![{p.stem}](figures/{p.name})" for p in pngs)
    print(text)
    out = Path(a.runs_dir) / "results.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"results: {out} ({res['wall_s'] / 60:.1f} min)")
    if not a.quick:
        write_report(Path(a.report), res, text, command)
        print(f"report: {a.report}")


if __name__ == "__main__":
    main()
