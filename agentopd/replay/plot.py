"""``agentopd plot RUN [RUN ...]``: one PNG of training curves comparing runs.

Panels: held-out success against step and against teacher tokens (evaluation rows of
``metrics.jsonl``; rollout success dotted), teacher KL (the sampled estimate), KL per turn index
(one line per index), top-k overlap ratio, entropy gap, tool errors per episode and throughput.
A run on a mixture of envs adds one line per env to the held-out success and teacher KL panels
(``eval/<env>/success``, ``diag/<env>/sampled_kl``).
Reads ``metrics.jsonl`` only (a torn last line is skipped) and never writes into a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentopd.replay.store import RunDirError


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of ``run/metrics.jsonl`` (complete lines only).

    Raises:
        RunDirError: The run or its metrics file is missing.
    """
    if not run.is_dir():
        raise RunDirError(f"no run directory at {run}")
    p = run / "metrics.jsonl"
    if not p.is_file():
        raise RunDirError(f"{run} has no metrics.jsonl yet (it is written after the first step)")
    rows = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line while the run is being written
    return rows


def _series(
    rows: list[dict[str, Any]], key: str, x: str = "step"
) -> tuple[list[float], list[float]]:
    pts = [
        (float(r[x]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), int | float) and isinstance(r.get(x), int | float)
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def mixture_envs(evals: list[dict[str, Any]]) -> list[str]:
    """The envs of a mixture run, from its evaluation rows' ``eval/<env>/success`` keys
    (none for a run on one env)."""
    return sorted(
        {
            k.split("/")[1]
            for r in evals
            for k in r
            if k.startswith("eval/") and k.endswith("/success") and k.count("/") == 2
        }
    )


PANELS = (
    "held-out success vs step",
    "held-out success vs teacher tokens",
    "teacher KL (sampled, log p - log q)",
    "teacher KL per turn index",
    "top-k overlap ratio",
    "entropy gap |H(q) - H(p)|",
    "tool errors per episode",
    "throughput (tokens/s)",
)


def plot_runs(runs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Draw every panel for ``runs`` into ``out`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_metrics(r) for r in runs]
    names = list(labels or [])
    names += [r.name for r in runs[len(names) :]]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9), constrained_layout=True)
    ax = dict(zip(PANELS, axes.flat))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for n, (rows, name) in enumerate(zip(data, names)):
        c = colors[n % len(colors)]
        train = [r for r in rows if r.get("phase") == "train"]
        evals = [r for r in rows if r.get("phase") == "eval"]
        xs, ys = _series(evals, "eval/success")
        ax[PANELS[0]].plot(xs, ys, "o-", color=c, label=f"{name} (held-out)")
        xs, ys = _series(train, "rollout/success")
        ax[PANELS[0]].plot(xs, ys, ":", color=c, alpha=0.6, label=f"{name} (rollouts)")
        xs, ys = _series(evals, "eval/success", x="teacher_tokens")
        ax[PANELS[1]].plot(xs, ys, "o-", color=c, label=name)
        ax[PANELS[2]].plot(*_series(train, "diag/sampled_kl"), color=c, label=name)
        for j, env in enumerate(mixture_envs(evals)):
            style = styles[(j + 1) % len(styles)]
            xs, ys = _series(evals, f"eval/{env}/success")
            ax[PANELS[0]].plot(
                xs, ys, ".", linestyle=style, color=c, alpha=0.8, label=f"{name} {env}"
            )
            xs, ys = _series(train, f"diag/{env}/sampled_kl")
            ax[PANELS[2]].plot(xs, ys, linestyle=style, color=c, alpha=0.8, label=f"{name} {env}")
        turn_keys = sorted(
            {k for r in train for k in r if k.startswith("diag/kl_turn/")},
            key=lambda k: int(k.rsplit("/", 1)[1]),
        )
        for j, k in enumerate(turn_keys):
            ax[PANELS[3]].plot(
                *_series(train, k),
                color=colors[j % len(colors)],
                linestyle=styles[n % len(styles)],
                label=f"{name} turn {k.rsplit('/', 1)[1]}",
            )
        ax[PANELS[4]].plot(*_series(train, "diag/overlap_ratio"), color=c, label=name)
        ax[PANELS[5]].plot(*_series(train, "diag/entropy_gap"), color=c, label=name)
        err_pts = [
            (r["step"], sum(v for k, v in r.items() if k.startswith("tool_error/")))
            for r in train
            if "step" in r
        ]
        ax[PANELS[6]].plot([p[0] for p in err_pts], [p[1] for p in err_pts], color=c, label=name)
        for key, style in (
            ("throughput/rollout_tok_s", "-"),
            ("throughput/teacher_tok_s", "--"),
            ("throughput/learner_tok_s", ":"),
        ):
            ax[PANELS[7]].plot(
                *_series(train, key),
                color=c,
                linestyle=style,
                label=f"{name} {key.split('/')[1].removesuffix('_tok_s')}",
            )
    for title, a in ax.items():
        a.set_title(title)
        a.set_xlabel("teacher tokens" if "teacher tokens" in title else "step")
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
        else:
            a.text(
                0.5, 0.5, "no data in these runs", ha="center", va="center", transform=a.transAxes
            )
    for title in PANELS[:2]:
        ax[title].set_ylim(-0.02, 1.02)
    fig.suptitle("agentopd: " + " vs ".join(names))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
