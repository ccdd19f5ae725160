"""Per-arm reports of a ``benchmarks/tcod.py`` runs directory, read from the runs' own metrics.

For every arm (runs named ``<arm>-s<seed>``; the cold starts ``cold-s<seed>`` are left out):

* **teacher KL per turn index**: the mean over on-policy steps of the learner's
  ``diag/kl_turn/<i>`` (sampled-token reverse KL on turn ``i``), then over seeds;
* **success by episode length**: the held-out ``eval/success_by_difficulty`` after training
  (for lookup-chain the difficulty is the hop count, so the episode needs hops + 1 turns);
* **pass@k at temperature 1**, when the runs evaluated with ``eval.pass_k`` > 1;
* **the budget three ways**: teacher tokens (what ``teacher_token_budget`` counts), teacher
  compute split into prefill positions and decode steps, and wall time. Accounting: scoring an
  on-policy episode is one teacher prefill over every token of each of its segments (prompt and
  tool results included, not only the scored ones); a guide turn or a demonstration token is one
  decode step, as if the teacher generated it (the built-in demonstrations come from the scripted
  expert, so this is what they would cost with ``demo_source=teacher``).

Run on its own (``python benchmarks/tcod_report.py RUNS_DIR``) it prints the tables and writes
``kl_per_turn.png`` and ``success_by_length.png`` into RUNS_DIR (or ``--figures DIR``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

RUN_NAME = re.compile(r"^(?P<arm>.+)-s(?P<seed>\d+)$")


def arm_runs(runs: Path) -> dict[str, list[Path]]:
    """``{arm: [run dir per seed]}`` of the arms in ``runs`` (cold starts excluded)."""
    out: dict[str, list[Path]] = {}
    for d in sorted(runs.iterdir()):
        m = RUN_NAME.match(d.name)
        if m and m["arm"] != "cold" and (d / "metrics.jsonl").is_file():
            out.setdefault(m["arm"], []).append(d)
    return out


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _episodes_per_step(run: Path) -> int:
    for line in (run / "config.yaml").read_text().splitlines():
        if line.startswith("episodes_per_step:"):
            return int(line.split(":", 1)[1])
    raise ValueError(f"{run}/config.yaml has no episodes_per_step")


def kl_per_turn(run: Path) -> dict[int, float]:
    """Mean ``diag/kl_turn/<i>`` over the run's on-policy steps, by turn index."""
    by_turn: dict[int, list[float]] = {}
    for r in _rows(run):
        if r.get("phase") != "train":
            continue
        for k, v in r.items():
            if k.startswith("diag/kl_turn/") and isinstance(v, (int, float)):
                by_turn.setdefault(int(k.rsplit("/", 1)[1]), []).append(float(v))
    return {t: statistics.fmean(vs) for t, vs in sorted(by_turn.items())}


def final_eval(run: Path, tag: str = "after training") -> dict[str, Any]:
    """The run's last held-out evaluation row with ``tag`` (empty when there is none)."""
    rows = [r for r in _rows(run) if r.get("phase") == "eval" and r.get("tag") == tag]
    return rows[-1] if rows else {}


def teacher_compute(run: Path) -> dict[str, float]:
    """Teacher tokens, prefill positions and decode steps the run used (see the module doc)."""
    n = _episodes_per_step(run)
    prefill = decode = 0.0
    tokens = 0.0
    for r in _rows(run):
        if r.get("phase") != "train":
            continue
        tokens = max(tokens, float(r.get("teacher_tokens", 0)))
        if r.get("batch") == "demonstration":
            decode += float(r.get("demo/sampled_tokens", 0)) * n
        else:
            prefill += float(r.get("rollout/tokens", 0)) * n
            decode += float(r.get("rollout/guide_tokens", 0))
    return {"teacher_tokens": tokens, "prefill_positions": prefill, "decode_steps": decode}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summarise(runs: Path) -> dict[str, dict[str, Any]]:
    """Per arm: KL per turn, success by length, pass@k and the budget, averaged over seeds."""
    out: dict[str, dict[str, Any]] = {}
    for arm, dirs in arm_runs(runs).items():
        kls = [kl_per_turn(d) for d in dirs]
        turns = sorted({t for k in kls for t in k})
        evals = [final_eval(d) for d in dirs]
        lengths = sorted(
            {k for e in evals for k in e.get("eval/success_by_difficulty", {})}, key=float
        )
        passk = sorted({k for e in evals for k in e if k.startswith("eval/pass@")})
        compute = [teacher_compute(d) for d in dirs]
        out[arm] = {
            "seeds": len(dirs),
            "kl_per_turn": {t: _mean([k[t] for k in kls if t in k]) for t in turns},
            "success_by_length": {
                n: _mean([e["eval/success_by_difficulty"][n] for e in evals
                          if n in e.get("eval/success_by_difficulty", {})])
                for n in lengths
            },  # fmt: skip
            "pass@k": {k: _mean([e[k] for e in evals if k in e]) for k in passk},
            **{key: _mean([c[key] for c in compute]) for key in compute[0]},
        }
    return out


def tables(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: the budget three ways, KL per turn index, success by episode length, pass@k."""
    arms = list(summary)
    lines = ["| arm | teacher tokens | teacher prefill positions | teacher decode steps |"]
    lines.append("|---|---|---|---|")
    for a in arms:
        s = summary[a]
        lines.append(
            f"| {a} | {s['teacher_tokens']:,.0f} | {s['prefill_positions']:,.0f} | "
            f"{s['decode_steps']:,.0f} |"
        )
    turns = sorted({t for a in arms for t in summary[a]["kl_per_turn"]})
    if turns:
        shown = turns[:12]
        lines += ["", "Teacher KL (sampled tokens, nats) per turn index, mean over steps and seeds:", ""]
        lines.append("| arm | " + " | ".join(f"turn {t}" for t in shown) + " |")
        lines.append("|---|" + "---|" * len(shown))
        for a in arms:
            k = summary[a]["kl_per_turn"]
            lines.append(f"| {a} | " + " | ".join(
                f"{k[t]:.2f}" if t in k else "-" for t in shown) + " |")  # fmt: skip
    lengths = sorted({n for a in arms for n in summary[a]["success_by_length"]}, key=float)
    if lengths:
        lines += ["", "Held-out success by episode length (difficulty), after training:", ""]
        lines.append("| arm | " + " | ".join(lengths) + " |")
        lines.append("|---|" + "---|" * len(lengths))
        for a in arms:
            s = summary[a]["success_by_length"]
            lines.append(f"| {a} | " + " | ".join(
                f"{100 * s[n]:.0f}%" if n in s else "-" for n in lengths) + " |")  # fmt: skip
    ks = sorted({k for a in arms for k in summary[a]["pass@k"]})
    if ks:
        lines += ["", "pass@k at the evaluation temperature:", ""]
        lines.append("| arm | " + " | ".join(k.split("/")[1] for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for a in arms:
            p = summary[a]["pass@k"]
            lines.append(f"| {a} | " + " | ".join(
                f"{100 * p[k]:.0f}%" if k in p else "-" for k in ks) + " |")  # fmt: skip
    return "\n".join(lines)


def plots(summary: dict[str, dict[str, Any]], where: Path, prefix: str = "") -> list[Path]:
    """``kl_per_turn.png`` and ``success_by_length.png`` (one line per arm) in ``where``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    written = []
    for key, ylabel, name in (
        ("kl_per_turn", "teacher KL on sampled tokens (nats)", "kl_per_turn.png"),
        ("success_by_length", "held-out success", "success_by_length.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for arm, s in summary.items():
            xs = sorted(s[key], key=float)
            if xs:
                ax.plot([float(x) for x in xs], [s[key][x] for x in xs], marker="o", label=arm)
        ax.set_xlabel("turn index" if key == "kl_per_turn" else "episode length (difficulty)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = where / f"{prefix}{name}"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--figures", type=Path, help="where the PNGs go (default: RUNS_DIR)")
    a = p.parse_args(argv)
    summary = summarise(a.runs_dir)
    if not summary:
        raise SystemExit(f"no <arm>-s<seed> runs with metrics in {a.runs_dir}")
    print(tables(summary))
    for path in plots(summary, a.figures or a.runs_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
