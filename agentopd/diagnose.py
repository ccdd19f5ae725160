"""``agentopd diagnose``: is this teacher likely to help this student?

Rolls out the student on training tasks, scores its tokens with the teacher and reports, on the
student's own states: top-k overlap ratio, overlap-token advantage, entropy gap, sampled-token KL,
the exact reverse KL over the whole vocabulary (``diag/true_rkl``; an in-process ``hf`` teacher
only, else it says it is unavailable) and teacher KL per turn index, with a plain-language
verdict. Then it measures whether the
teacher can act on states after a mistake: its greedy **recovery rate**, the fraction of
``recovery_episodes`` held-out tasks it still solves when it takes over right after an injected
error (:func:`agentopd.zoo.recovery.recovery_jobs`: the expert plays up to a random turn, that
turn is a malformed call, a miscopied value or a misspelled tool).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from agentopd.build import (
    build_policy,
    full_vocab_head,
    make_teacher,
    make_teacher_engine,
    rollout_config,
    student_name,
    teacher_name,
)
from agentopd.learner import Learner
from agentopd.metrics import episode_summary
from agentopd.rollout import EpisodeJob, run_episodes
from agentopd.types import drop_teacher_hidden


def diagnose(cfg: DictConfig, console: Console | None = None) -> dict[str, float]:
    """Run the diagnosis and print it; returns the metrics."""
    console = console or Console()
    parts = build_policy(cfg, student_name(cfg))
    teacher = make_teacher(cfg, parts.tokenizer, parts.device)
    teacher_head = full_vocab_head(cfg, parts.student, teacher)  # hf: keeps its hidden states
    student, renderer, engine = parts.student, parts.renderer, parts.engine
    jobs = [
        EpisodeJob(
            cfg.env, seed=cfg.seed + i, options={"split": "train"}, env_kwargs=dict(cfg.env_kwargs)
        )
        for i in range(cfg.episodes)
    ]
    with console.status(f"rolling out {cfg.episodes} student episodes on {cfg.env}"):
        episodes = run_episodes(jobs, engine, renderer, rollout_config(cfg), seed=cfg.seed)
    with console.status("scoring with the teacher"):
        teacher.score(episodes)
    learner = Learner(
        student, pad_id=renderer.pad_id, topk=cfg.teacher_cfg.topk, teacher_head=teacher_head
    )
    metrics = {**episode_summary(episodes), **learner.measure(episodes)}
    drop_teacher_hidden(episodes)
    if cfg.recovery_episodes > 0:
        with console.status(f"teacher recovery rate on {cfg.recovery_episodes} injected errors"):
            metrics.update(teacher_recovery(cfg, parts, teacher))

    from agentopd.diagnostics import verdict

    table = Table(
        title=f"diagnose: student {student_name(cfg)} vs teacher {teacher_name(cfg)} on {cfg.env}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        if key.startswith("diag/kl_turn/"):
            continue
        table.add_row(key, f"{metrics[key]:.4f}")
    if "diag/true_rkl" not in metrics:
        table.add_row(
            "diag/true_rkl", f"unavailable (teacher_backend={cfg.teacher_backend}; needs hf)"
        )
    console.print(table)
    per_turn = sorted(
        (int(k.rsplit("/", 1)[1]), v) for k, v in metrics.items() if k.startswith("diag/kl_turn/")
    )
    if per_turn:
        tt = Table(title="teacher KL (sampled-token estimate) per turn index")
        tt.add_column("turn", justify="right")
        tt.add_column("KL", justify="right")
        tt.add_column("")
        top = max(abs(v) for _, v in per_turn) or 1.0
        for turn, v in per_turn:
            tt.add_row(str(turn), f"{v:.4f}", "█" * max(1, int(30 * abs(v) / top)))
        console.print(tt)
    console.print(
        f"[bold]verdict:[/] {verdict({k.removeprefix('diag/'): v for k, v in metrics.items()})}"
    )
    return metrics


def teacher_recovery(cfg: DictConfig, parts: Any, teacher: Any) -> dict[str, float]:
    """The teacher model's greedy recovery rate (``diag/recovery_rate``, per error kind
    ``diag/recovery_rate/<kind>``) on ``cfg.recovery_episodes`` held-out tasks that start right
    after an injected error, played with the run's engine and rollout limits."""
    from agentopd.zoo.recovery import recovery_jobs, recovery_rate

    workdir = parts.workdir or Path(tempfile.mkdtemp(prefix="agentopd-engine-"))
    engine = make_teacher_engine(cfg, teacher, parts.renderer, workdir / "teacher", parts.device)
    jobs = recovery_jobs(
        cfg.env, dict(cfg.env_kwargs), range(cfg.seed, cfg.seed + cfg.recovery_episodes)
    )
    episodes = run_episodes(
        jobs, engine, parts.renderer, rollout_config(cfg, temperature=0.0), seed=cfg.seed
    )
    return {f"diag/{k}": v for k, v in recovery_rate(episodes).items()}
