"""The reference experiment: does on-policy distillation beat SFT at equal teacher-token budget?

For each environment and seed:

1. the teacher (``tiny-teacher-<env>``) and the untrained student are evaluated;
2. the student is cold-started by SFT on expert demonstrations (evaluated again);
3. from the same cold-started weights, three arms run:
   * ``opd-rkl-sampled`` and ``opd-rkl-topk``: on-policy distillation for ``--steps`` steps;
   * ``sft-only``: continued SFT on successful *teacher-model* episodes until it has consumed the
     same number of teacher tokens as ``opd-rkl-sampled`` (teacher tokens: tokens the teacher
     scored for OPD, tokens the teacher generated for SFT);
4. every arm is evaluated on ``--eval-episodes`` held-out tasks (greedy) along the way (learning
   curves vs teacher tokens), at the end by episode length, and with ``--samples`` samples at
   temperature 1 for pass@k.

Outputs: ``docs/results.md`` (tables, command, wall time), ``docs/figures/*.png`` and
``docs/results.json``. Run::

    python benchmarks/reference.py                      # full: 2 envs x 3 seeds, 200 eval tasks
    python benchmarks/reference.py --jobs 2             # the same, two processes at a time
    python benchmarks/reference.py --quick              # smoke run (minutes)

With ``--jobs N`` each env's teacher evaluation and each (env, seed) run in their own process
(logs in ``RUNS_DIR/logs``); the numbers are those of the serial run, only the wall time differs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from agentopd import seeds, zoo
from agentopd.build import rollout_config
from agentopd.config import compose
from agentopd.engines.hf import HFEngine
from agentopd.metrics import evaluate
from agentopd.renderer import Renderer
from agentopd.trainer import train

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("sft-only", "opd-rkl-sampled", "opd-rkl-topk")


def _eval_model(
    path_or_name: str, env: str, env_kwargs: dict, n: int, samples: int, seed: int
) -> dict[str, Any]:
    """Greedy success (and pass@k) with the env's training config: the same tasks (env_kwargs
    from ``configs/env/<env>.yaml``), token limits and eval seeds as the trainer's evaluations."""
    model, tok = zoo.load(path_or_name, progress=True)
    renderer = Renderer(tok)
    engine = HFEngine(model, renderer.eot_id, renderer.pad_id)
    limits = rollout_config(compose("train", [f"env={env}"]))
    greedy, _ = evaluate(
        env, env_kwargs, engine, renderer, episodes=n, temperature=0.0, seed=seeds.task_base(seed, "eval"),
        rollout_config=limits,
    )  # fmt: skip
    out = {
        "success": greedy["success"],
        "by_difficulty": greedy["success_by_difficulty"],
        "mean_turns": greedy["mean_turns"],
    }
    if samples > 1:
        sampled, _ = evaluate(
            env,
            env_kwargs,
            engine,
            renderer,
            episodes=max(1, n // 2),
            samples=samples,
            temperature=1.0,
            seed=seeds.task_base(seed, "eval"),
            rollout_config=limits,
        )
        out["pass@k"] = {k: sampled[f"pass@{k}"] for k in range(1, samples + 1)}
    return out


def _run(overrides: list[str]) -> tuple[dict[str, Any], Path]:
    cfg = compose("train", overrides)
    result = train(cfg)
    return result, Path(result["run_dir"])


def _curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["teacher_tokens"], r["eval/success"])
        for r in rows
        if r.get("phase") == "eval" and r.get("tag") != "before training"
    ]


def _teacher_tokens(run: Path) -> int:
    """Teacher tokens consumed by the end of a run (its last training row)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["teacher_tokens"] for r in rows if r.get("phase") == "train")


def _last_checkpoint_model(run: Path) -> str:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    return str(run / "checkpoints" / latest["path"] / "model")


def _env_kwargs(env: str) -> dict[str, Any]:
    """The env's training defaults (configs/env/<env>.yaml), e.g. lookup-chain's 1-3 hops: every
    evaluation here uses them, like the trainer's own evaluations."""
    return dict(compose("train", [f"env={env}"]).env_kwargs)


def cold_steps_for(spec: str, env: str) -> int:
    """``--cold-steps``: one number for every env, or ``env=N`` pairs (``lookup-chain=80,...``)."""
    if "=" not in spec:
        return int(spec)
    table = dict(pair.split("=", 1) for pair in spec.split(","))
    if env not in table:
        raise SystemExit(f"--cold-steps {spec!r} names no step count for env {env!r}")
    return int(table[env])


def run_teacher(env: str, a: argparse.Namespace) -> dict[str, Any]:
    return _eval_model(f"tiny-teacher-{env}", env, _env_kwargs(env), a.eval_episodes, a.samples, 0)


def run_env(env: str, seeds: list[int], a: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "teacher": run_teacher(env, a),
        "seeds": {},
        "cold_steps": cold_steps_for(a.cold_steps, env),
    }
    t_env = time.time()
    for seed in seeds:
        out["seeds"][seed] = run_seed(env, seed, a, runs_dir)
        # Seeds finished so far, so a run cut short still leaves its results behind.
        (runs_dir / f"partial-{env}.json").write_text(
            json.dumps({"results": out, "wall_s": time.time() - t_env, "command": "(partial)"})
        )
    return out


def run_seed(env: str, seed: int, a: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    """Cold start and the three arms for one env and seed."""
    env_kwargs = _env_kwargs(env)
    common = [
        f"env={env}",
        f"runs_dir={runs_dir}",
        "student=tiny-base",
        "teacher=auto",
        f"episodes_per_step={a.episodes_per_step}",
    ]
    s: dict[str, Any] = {}
    res, cold_run = _run(
        [
            *common,
            f"seed={seed}",
            "steps=0",
            f"cold_start.steps={cold_steps_for(a.cold_steps, env)}",
            f"cold_start.lr={a.sft_lr}",
            f"cold_start.episodes={a.cold_episodes}",
            f"eval.episodes={a.eval_episodes}",
            "eval.after=false",
            f"run_name={env}-s{seed}-cold",
        ]
    )
    s["before"] = res["success_before"]
    s["cold_start"] = res["success_after_cold_start"]
    cold_model = str(cold_run / "cold_start_model")
    arm_common = [
        *common,
        f"seed={seed}",
        f"student={cold_model}",
        "cold_start.steps=0",
        "eval.before=false",
        "eval.after=false",  # the final point is _eval_model's greedy pass (same tasks)
        f"eval.episodes={a.eval_episodes}",
        f"eval.every={a.eval_every}",
        "checkpoint_every=1000",
    ]
    arms: dict[str, Any] = {}
    for arm in ("opd-rkl-sampled", "opd-rkl-topk"):
        loss = arm.removeprefix("opd-")
        res, run = _run(
            [
                *arm_common,
                f"loss={loss}",
                f"optim.name={a.opd_optim}",
                f"optim.lr={a.opd_lr}",
                f"steps={a.steps}",
                f"run_name={env}-s{seed}-{arm}",
            ]
        )
        arms[arm] = {"run": str(run), "curve": _curve(run)}
    budget = _teacher_tokens(Path(arms["opd-rkl-sampled"]["run"]))
    res, run = _run(
        [
            *arm_common,
            "gkd_lambda=0",
            "demo_source=teacher",
            "optim.name=adamw",
            f"optim.lr={a.sft_lr}",
            f"teacher_token_budget={budget}",
            f"steps={a.steps * 20}",
            f"eval.every={a.eval_every}",
            f"run_name={env}-s{seed}-sft-only",
        ]
    )
    arms["sft-only"] = {"run": str(run), "curve": _curve(run)}
    for info in arms.values():
        info["eval"] = _eval_model(
            _last_checkpoint_model(Path(info["run"])),
            env,
            env_kwargs,
            a.eval_episodes,
            a.samples,
            seed,
        )
        info["final"] = info["eval"]["success"]
        info["curve"].append((_teacher_tokens(Path(info["run"])), info["final"]))
    s["arms"] = arms
    print(
        json.dumps(
            {
                env: {
                    seed: {k: v for k, v in s.items() if k != "arms"}
                    | {arm: arms[arm]["eval"]["success"] for arm in arms}
                }
            }
        ),
        flush=True,
    )
    return s


def _pass_at(table: dict, k: int) -> float:
    """``table[k]``; keys are strings once the results went through JSON (--report-only)."""
    return table[k] if k in table else table[str(k)]


def _ms(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


NOTES_MARKER = (
    "<!-- generated above by benchmarks/reference.py; notes below are kept on rewrite -->"
)


def write_report(results: dict[str, Any], command: str, wall: float, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(a.out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Reference experiment",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall / 60:.1f} min, {a.jobs} process(es) at a time with {torch.get_num_threads()} torch thread each (2-core shared machine).  ",
        f"Held-out tasks per evaluation: {a.eval_episodes} (greedy); pass@k from {a.samples} samples at temperature 1 on half as many tasks.  ",
        f"Seeds: {a.seeds}. OPD steps: {a.steps} x {a.episodes_per_step} episodes ({a.opd_optim}, lr {a.opd_lr}). Cold start: SFT on {a.cold_episodes} expert episodes (AdamW, lr {a.sft_lr}) for the steps in the table; SFT-only continues with AdamW at lr {a.sft_lr}.",
        "",
        "Success rate (%), mean ± std over seeds:",
        "",
        "| env | seeds | teacher | student before | cold start (steps) | SFT-only | OPD rkl-sampled | OPD rkl-topk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env, r in results.items():
        seeds = list(r["seeds"].values())
        row = [
            env,
            ",".join(str(k) for k in r["seeds"]),
            f"{100 * r['teacher']['success']:.1f}",
            _ms([s["before"] for s in seeds]),
            # results saved before the step count was recorded: the command line's value
            f"{_ms([s['cold_start'] for s in seeds])} "
            f"({r.get('cold_steps') or cold_steps_for(a.cold_steps, env)})",
        ]
        row += [_ms([s["arms"][arm]["eval"]["success"] for s in seeds]) for arm in ARMS]
        lines.append("| " + " | ".join(row) + " |")
    for env, r in results.items():
        seeds = list(r["seeds"].values())
        # Learning curves
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm in ARMS:
            for i, s in enumerate(seeds):
                pts = s["arms"][arm]["curve"]
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [100 * p[1] for p in pts],
                        marker="o",
                        ms=3,
                        alpha=0.8,
                        color={
                            "sft-only": "tab:gray",
                            "opd-rkl-sampled": "tab:blue",
                            "opd-rkl-topk": "tab:orange",
                        }[arm],
                        label=arm if i == 0 else None,
                    )
        ax.axhline(100 * r["teacher"]["success"], color="k", ls="--", lw=1, label="teacher")
        ax.axhline(
            100 * statistics.mean(s["cold_start"] for s in seeds),
            color="tab:green",
            ls=":",
            lw=1,
            label="cold start",
        )
        ax.set_xlabel("teacher tokens consumed")
        ax.set_ylabel("held-out success (%)")
        ax.set_title(f"{env}: success vs teacher tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figs / f"{env}-curves.png", dpi=110)
        plt.close(fig)
        # Success by episode length
        diffs = sorted(
            {int(d) for s in seeds for arm in ARMS for d in s["arms"][arm]["eval"]["by_difficulty"]}
        )
        lines += [
            "",
            f"### {env}: success by episode length (difficulty), mean over seeds",
            "",
            "| arm | " + " | ".join(f"d={d}" for d in diffs) + " |",
            "|---" * (len(diffs) + 1) + "|",
        ]
        teacher_bd = r["teacher"]["by_difficulty"]
        lines.append(
            "| teacher | "
            + " | ".join(
                f"{100 * teacher_bd.get(d, teacher_bd.get(str(d), float('nan'))):.0f}"
                for d in diffs
            )
            + " |"
        )
        for arm in ARMS:
            vals = []
            for d in diffs:
                xs = [
                    s["arms"][arm]["eval"]["by_difficulty"].get(
                        d, s["arms"][arm]["eval"]["by_difficulty"].get(str(d))
                    )
                    for s in seeds
                ]
                xs = [x for x in xs if x is not None]
                vals.append(f"{100 * statistics.mean(xs):.0f}" if xs else "n/a")
            lines.append(f"| {arm} | " + " | ".join(vals) + " |")
        # pass@k
        if a.samples > 1:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            lines += [
                "",
                f"### {env}: pass@k (temperature 1), mean over seeds",
                "",
                "| arm | " + " | ".join(f"pass@{k}" for k in range(1, a.samples + 1)) + " |",
                "|---" * (a.samples + 1) + "|",
            ]
            for arm in ARMS:
                ks = list(range(1, a.samples + 1))
                vals = [
                    statistics.mean(_pass_at(s["arms"][arm]["eval"]["pass@k"], k) for s in seeds)
                    for k in ks
                ]
                ax.plot(ks, [100 * v for v in vals], marker="o", label=arm)
                lines.append(f"| {arm} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |")
            ax.set_xlabel("k")
            ax.set_ylabel("pass@k (%)")
            ax.set_title(f"{env}: pass@k")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(figs / f"{env}-passk.png", dpi=110)
            plt.close(fig)
        lines += ["", f"![{env} curves](figures/{env}-curves.png)"] + (
            [f"![{env} pass@k](figures/{env}-passk.png)"] if a.samples > 1 else []
        )
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    # Hand-written notes below the marker (how the run was made, the analysis) survive a rewrite.
    md = out / "results.md"
    old = md.read_text() if md.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    md.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="lookup-chain,code-sandbox")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--episodes-per-step", type=int, default=16)
    p.add_argument(
        "--cold-steps",
        default="lookup-chain=80,code-sandbox=150",
        help="cold-start SFT steps: one number, or env=N pairs",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="processes at a time (one torch thread each)"
    )
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sft-lr", type=float, default=1e-3, help="AdamW lr of cold start and SFT-only")
    p.add_argument("--opd-optim", default="sgd", help="optimizer of the OPD arms")
    p.add_argument("--opd-lr", type=float, default=0.05, help="lr of the OPD arms")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from runs-dir/results-<env>.json saved by earlier runs (e.g. one "
        "process per env in parallel)",
    )
    p.add_argument("--cold-episodes", type=int, default=200)
    p.add_argument("--runs-dir", default="runs/reference")
    p.add_argument(
        "--out",
        default=None,
        help="report folder (default: docs/, or runs-dir/report with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    a = p.parse_args(argv)
    a.out = a.out or str(Path(a.runs_dir) / "report" if a.quick else ROOT / "docs")
    if a.quick:
        (
            a.seeds,
            a.eval_episodes,
            a.eval_every,
            a.samples,
            a.steps,
            a.cold_steps,
            a.cold_episodes,
            a.episodes_per_step,
        ) = "0", 16, 2, 2, 2, "4", 16, 4
    a.env_kwargs = {}
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    command = "python " + " ".join(
        shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    runs = Path(a.runs_dir)
    results: dict[str, Any] = {}
    if a.report_only:
        walls, commands = [], []
        for env in a.envs.split(","):
            path = runs / f"results-{env}.json"
            if not path.exists():  # fall back to the seeds an interrupted run finished
                path = runs / f"partial-{env}.json"
            saved = json.loads(path.read_text())
            results[env] = saved["results"]
            walls.append(saved["wall_s"])
            commands.append(saved["command"])
            a.jobs = saved.get("jobs", 1)
        if len(set(commands)) == 1:  # every env from one run: its command and wall time
            command = commands[0]
        else:
            command = " & ".join(commands) + "; then " + command
            a.jobs = len(commands)
        write_report(results, command, max(walls), a)
        return
    runs.mkdir(parents=True, exist_ok=True)
    if a.unit:  # one piece of a --jobs run, started by run_parallel
        env, what = a.unit.split(":")
        res = run_teacher(env, a) if what == "teacher" else run_seed(env, int(what), a, runs)
        (runs / "units" / f"{env}-{what}.json").write_text(json.dumps(res, default=str))
        return
    start = time.time()
    envs = a.envs.split(",")
    if a.jobs > 1:
        results = run_parallel(envs, seeds, a, argv if argv is not None else sys.argv[1:], runs)
    for env in envs:
        if a.jobs <= 1:
            results[env] = run_env(env, seeds, a, runs)
        # wall_s is the run's time so far, so --report-only over one run's files (the same
        # command) reports the whole run's wall time.
        saved = {"results": results[env], "wall_s": time.time() - start, "command": command}
        (runs / f"results-{env}.json").write_text(json.dumps(saved | {"jobs": a.jobs}))
    write_report(results, command, time.time() - start, a)


def run_parallel(
    envs: list[str], seeds: list[int], a: argparse.Namespace, argv: list[str], runs: Path
) -> dict[str, Any]:
    """Run each env's teacher evaluation and each (env, seed) as its own process, ``a.jobs`` at
    a time, and assemble their results. Every process uses one torch thread; the results are
    those of the serial run (each unit seeds itself), only the wall time differs."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    (runs / "units").mkdir(parents=True, exist_ok=True)
    (runs / "logs").mkdir(parents=True, exist_ok=True)
    units = [f"{env}:teacher" for env in envs] + [f"{env}:{s}" for env in envs for s in seeds]
    t0 = time.time()

    def work(unit: str) -> None:
        log = runs / "logs" / f"{unit.replace(':', '-')}.log"
        cmd = [sys.executable, __file__, *argv, "--jobs", "1", "--unit", unit]
        with log.open("w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = "\n".join(log.read_text().splitlines()[-20:])
            raise RuntimeError(f"unit {unit} failed (exit {rc}); log {log}:\n{tail}")
        print(f"[{(time.time() - t0) / 60:5.1f} min] {unit} done", flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        for fut in [pool.submit(work, u) for u in units]:
            fut.result()

    def load(env: str, what: Any) -> Any:
        return json.loads((runs / "units" / f"{env}-{what}.json").read_text())

    return {
        env: {
            "teacher": load(env, "teacher"),
            "seeds": {s: load(env, s) for s in seeds},
            "cold_steps": cold_steps_for(a.cold_steps, env),
        }
        for env in envs
    }


if __name__ == "__main__":
    main()
