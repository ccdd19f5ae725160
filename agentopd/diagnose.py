"""``agentopd diagnose``: is this teacher likely to help this student?

Rolls out the student on training tasks, scores its tokens with the teacher and reports, on the
student's own states: top-k overlap ratio, overlap-token advantage, entropy gap, sampled-token KL
and teacher KL per turn index, with a plain-language verdict.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from agentopd import zoo
from agentopd.engines.hf import HFEngine
from agentopd.learner import Learner, LearnerConfig
from agentopd.metrics import episode_summary
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, run_episodes
from agentopd.teacher import Teacher, TeacherConfig, check_tokenizers
from agentopd.trainer import resolve_device, rollout_config, student_name, teacher_name


def _load(name: str, seed: int) -> tuple[Any, Any]:
    if name in zoo.PRESETS:
        return zoo.build_model(name, seed=seed), zoo.load_tokenizer()
    return zoo.load(name, progress=True)


def diagnose(cfg: DictConfig, console: Console | None = None) -> dict[str, float]:
    """Run the diagnosis and print it; returns the metrics."""
    console = console or Console()
    device = resolve_device(cfg.device, cfg.cpu_threads)
    student, tok = _load(student_name(cfg), cfg.seed)
    teacher_model, teacher_tok = _load(teacher_name(cfg), cfg.seed)
    check_tokenizers(tok, teacher_tok)
    student.to(device)
    teacher_model.to(device)
    renderer = Renderer(tok, on_prefix_mismatch=cfg.rollout.on_prefix_mismatch)
    engine = HFEngine(student, renderer.eot_id, renderer.pad_id)
    jobs = [
        EpisodeJob(
            cfg.env, seed=cfg.seed + i, options={"split": "train"}, env_kwargs=dict(cfg.env_kwargs)
        )
        for i in range(cfg.episodes)
    ]
    with console.status(f"rolling out {cfg.episodes} student episodes on {cfg.env}"):
        episodes = run_episodes(jobs, engine, renderer, rollout_config(cfg), seed=cfg.seed)
    t = cfg.teacher_cfg
    teacher = Teacher(
        teacher_model,
        Renderer(teacher_tok),
        TeacherConfig(
            topk=t.topk,
            system_prompt=t.system_prompt,
            privileged=t.privileged,
            batch_size=t.batch_size,
        ),
    )
    with console.status("scoring with the teacher"):
        teacher.score(episodes)
    learner = Learner(student, LearnerConfig(topk=t.topk), pad_id=renderer.pad_id)
    metrics = {**episode_summary(episodes), **learner.measure(episodes)}

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
