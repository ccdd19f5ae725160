"""The training loop: cold start, then on-policy distillation, in one readable file.

Run it with ``agentopd train env=lookup-chain`` (see ``agentopd.config.TrainConfig``). One step:

1. the curriculum picks tasks and horizons;
2. the student plays them (``rollout``), token-exact;
3. the teacher scores every sampled token (``teacher``);
4. the learner minimises the masked divergence (``learner``) and the engine samples from the
   new weights;
5. metrics and episodes are appended to the run directory; a checkpoint every few steps.

With ``gkd_lambda < 1`` a step is, with probability ``1 - gkd_lambda``, an SFT step on expert
demonstrations instead (GKD-style mixing). ``resume=true`` continues from the last checkpoint.

What the loop runs with is built by :func:`agentopd.build.build_train` (torchrun's DDP/FSDP2
set-up included); which run it writes, and with which config, is decided by
:func:`agentopd.resume.start`; callers observe its named points through
:class:`agentopd.hooks.TrainerHooks`.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agentopd import distributed, mixture, resume, seeds
from agentopd.build import build_train, make_teacher_engine, rollout_config
from agentopd.config import TrainConfig, to_object
from agentopd.engines import Engine
from agentopd.hooks import TrainerHooks
from agentopd.metrics import by_env, episode_summary, evaluate
from agentopd.rollout import EpisodeJob, expert_episodes, run_episodes
from agentopd.runs import RunDir, atomic_write_text
from agentopd.types import Episode, StopReason, drop_teacher_hidden


@dataclass
class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    cfg: TrainConfig
    console: Console = field(default_factory=Console)
    world: distributed.World = field(default_factory=distributed.World)
    """This process's torchrun rank (one process: rank 0 of 1)."""
    hooks: TrainerHooks = field(default_factory=TrainerHooks)
    """Called at the loop's named points (:mod:`agentopd.hooks`)."""
    run_name: str | None = None
    """The existing run to continue (``resume=true``); None: a new run."""
    config_changes: list[str] = field(default_factory=list)
    """Options ``resume_override=true`` changed, recorded in ``config_changes.jsonl``."""
    _teacher_engines: dict[str, Engine] = field(default_factory=dict)

    def setup(self) -> None:
        """Build the parts, open the run directory (rank 0 writes it) and, with
        ``resume=true``, load the last checkpoint."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars; no per-save shard bars
        cfg = self.cfg
        seeds.seed_everything(cfg.seed)
        # Build (and so validate) everything before the run directory exists.
        self.parts = parts = build_train(cfg, self.world)
        self.renderer, self.engine = parts.renderer, parts.engine
        # build_train makes every part a training run needs.
        assert parts.teacher is not None and parts.learner is not None
        assert parts.curriculum is not None
        self.teacher, self.learner, self.curriculum = parts.teacher, parts.learner, parts.curriculum
        main = self.world.is_main
        # Rank 0 names the run and alone writes it; the other ranks only read it (resume).
        name = self.run_name
        if name is None:
            name = distributed.broadcast_object(resume.new_run_name(cfg) if main else None)
            assert name is not None  # rank 0's name
        self.run_dir = RunDir(cfg.runs_dir, name, create=main)
        if self.config_changes and main:
            self.run_dir.append_jsonl(
                "config_changes.jsonl",
                [json.dumps({"time": time.time(), "changes": self.config_changes})],
            )
        if main:
            self.run_dir.remove_partial_checkpoints()
            self.run_dir.write_config(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            choices = {**parts.choices, "world_size": self.world.size}
            atomic_write_text(
                self.run_dir.path / "choices.json", json.dumps(choices, indent=2) + "\n"
            )
        self.console.print(
            f"[bold]run[/] {self.run_dir.path}  env={cfg.env} loss={cfg.loss} device={parts.device}"
        )
        self.console.print(
            "choices: " + "  ".join(f"{k}={v}" for k, v in parts.choices.items() if v is not None)
        )
        if self.learner.teacher_head is None:
            self.console.print(
                f"diag/true_rkl: unavailable with teacher_backend={cfg.teacher_backend} (the "
                "exact reverse KL needs the teacher's full distribution: teacher_backend=hf)"
            )
        self.members = mixture.members(cfg.env, cfg.env_kwargs)
        """The run's envs: a mixture's members, or the one env."""
        self.start_step = 0
        self.cold_start_done = False
        self.teacher_tokens = 0
        self.teacher_positions = 0
        self.teacher_seconds = 0.0
        """Wall seconds the teacher spent for training: scoring (OPD steps) or playing the tasks of
        demonstration steps (guided-opd guide turns are inside the rollout, not counted)."""
        resumed = self.run_dir.latest_checkpoint() if cfg.resume else None
        resumed = distributed.broadcast_object(resumed)  # every rank loads rank 0's choice
        if resumed is not None:
            self._load(*resumed)
        elif cfg.resume:
            # Killed before the first checkpoint (cold start included): start over, cleanly.
            if main:
                self.run_dir.truncate_logs({})
            self.console.print("[yellow]resume[/]: no checkpoint yet; starting the run over")

    # ---------------------------------------------------------------------- checkpoints
    def _save(self, step: int) -> None:
        # Every rank takes part (under fsdp2 the optimizer state is gathered); rank 0 saves.
        learner_state = self.learner.state_dict()
        if not self.world.is_main:  # every rank holds the same state
            return

        def payload(d: Path) -> None:
            self.parts.save_model(d / "model")
            torch.save({"learner": learner_state, "rng": seeds.rng_state()}, d / "trainer.pt")

        state = {
            "curriculum": self.curriculum.state_dict(),
            "cold_start_done": self.cold_start_done,
            "teacher_tokens": self.teacher_tokens,
            "teacher_positions": self.teacher_positions,
            "teacher_seconds": self.teacher_seconds,
        }
        self.run_dir.save_checkpoint(step, payload, state)

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        self.parts.load_model(path)
        blob = torch.load(path / "trainer.pt", weights_only=False)
        self.learner.load_state_dict(blob["learner"])
        self.parts.sync_engine()
        seeds.set_rng_state(blob["rng"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.cold_start_done = bool(state.get("cold_start_done", True))
        self.teacher_tokens = int(state.get("teacher_tokens", 0))
        self.teacher_positions = int(state.get("teacher_positions", 0))
        self.teacher_seconds = float(state.get("teacher_seconds", 0.0))
        self.start_step = int(state["step"]) + 1
        if self.world.is_main:
            self.run_dir.truncate_logs(state["log_sizes"])
        self.console.print(
            f"[yellow]resumed[/] from {path.name}: continuing at step {self.start_step}"
        )

    # ---------------------------------------------------------------------- phases
    def log(self, row: dict[str, Any]) -> None:
        if self.world.is_main:
            self.run_dir.append_jsonl("metrics.jsonl", [json.dumps(row)])

    def evaluate(self, tag: str, step: int, teacher: bool = False) -> dict[str, float]:
        """Held-out success of the student (or, with ``teacher``, of each env's teacher) on
        the run's held-out tasks: ``{"success": ...}``, and on a mixture each env's on its own
        held-out tasks (``eval.episodes`` each) as ``{"<env>": ...}``, with ``success`` their
        weighted mean. Under torchrun rank 0 evaluates, the others wait and get its numbers."""
        if not self.world.is_main:
            return dict(distributed.broadcast_object({}))  # replaced by rank 0's numbers
        e = self.cfg.eval
        mixed = len(self.members) > 1
        row: dict[str, Any] = {}
        out: dict[str, float] = {}
        for m in self.members:
            report, _ = evaluate(
                m.env,
                dict(m.env_kwargs),
                self.teacher_engine(m.env) if teacher else self.engine,
                self.renderer,
                episodes=e.episodes,
                samples=e.pass_k,
                temperature=e.temperature,
                rollout_config=rollout_config(self.cfg),
                seed=seeds.task_base(self.cfg.seed, "eval"),
            )
            out[m.env] = report["success"]
            where = f"eval/{m.env}/" if mixed else "eval/"
            row.update({f"{where}{k}": v for k, v in report.items()})
            self.console.print(
                f"[bold]{tag}[/]: held-out success{f' on {m.env}' if mixed else ''} "
                f"{report['success']:.1%} ({report['tasks']} tasks, mean turns "
                f"{report['mean_turns']:.2f})"
            )
        total = sum(m.weight for m in self.members)
        out["success"] = sum(m.weight * out[m.env] for m in self.members) / total
        if mixed:
            row["eval/success"] = out["success"]
        self.log(
            {
                # The teacher's row has a phase of its own: student curves read phase "eval".
                "phase": "teacher_eval" if teacher else "eval",
                "tag": tag,
                "step": step,
                "teacher_tokens": self.teacher_tokens,
                "teacher_positions": self.teacher_positions,
                "teacher_seconds": self.teacher_seconds,
                **row,
            }
        )
        self.hooks.point(f"eval:{tag}")
        return dict(distributed.broadcast_object(out))

    def demonstrations(self, n: int, seed: int) -> list[Episode]:
        return self._demonstrations(n, seed)[0]

    def _demonstrations(self, n: int, seed: int) -> tuple[list[Episode], int, int]:
        """Successful teacher demonstrations for SFT (``demo_source``: scripted expert or the
        teacher model sampling at temperature 1); also the tokens the teacher generated and
        the positions it processed (prefill and decode, failed episodes included; 0 for the
        scripted expert)."""
        # A mixture's demonstrations are split between its envs by weight, like its tasks.
        counts = mixture.apportion(n, [m.weight for m in self.members])
        episodes = []
        for m, count in zip(self.members, counts, strict=True):
            jobs = [
                EpisodeJob(
                    m.env, seed=seed + i, options={"split": "train"}, env_kwargs=dict(m.env_kwargs)
                )
                for i in range(count)
            ]
            mine = distributed.shard(jobs)  # under torchrun each rank plays its share
            if self.cfg.demo_source == "teacher":
                episodes += run_episodes(
                    mine,
                    self.teacher_engine(m.env),
                    self.renderer,
                    rollout_config(self.cfg, 1.0),
                    seed=distributed.rank_seed(seed),
                )
            else:
                episodes += expert_episodes(mine, self.renderer)
        generated = int(distributed.all_sum(sum(ep.num_sampled_tokens for ep in episodes)))
        positions = 0
        if self.cfg.demo_source == "teacher":
            mine_positions = sum(len(s.tokens) for ep in episodes for s in ep.segments)
            positions = int(distributed.all_sum(mine_positions))
        episodes = distributed.all_gather_list(episodes)  # the same pool on every rank
        return [ep for ep in episodes if ep.success], generated, positions

    def _scratch(self, name: str) -> Path:
        """A working directory for ``name``: in the run directory on rank 0, a temporary one on
        other torchrun ranks (they write nothing into the run)."""
        if self.world.is_main:
            return self.run_dir.path / name
        return Path(tempfile.mkdtemp(prefix=f"agentopd-{name}-"))

    def teacher_engine(self, env: str | None = None) -> Engine:
        """A rollout engine around the teacher model of ``env`` (default: the run's env; built
        once per teacher): it generates demonstrations (``demo_source=teacher``), the guide
        turns of ``guided-opd`` and the teacher's evaluation."""
        env = env or self.cfg.env
        if env not in self._teacher_engines:
            scratch = "teacher_engine" if len(self.members) == 1 else f"teacher_engine/{env}"
            self._teacher_engines[env] = make_teacher_engine(
                self.cfg,
                self.teacher,
                self.renderer,
                self._scratch(scratch),
                self.parts.device,
                env,
            )
        return self._teacher_engines[env]

    def cold_start(self) -> None:
        cs = self.cfg.cold_start
        if cs.steps <= 0 or self.cold_start_done:
            return
        if self.parts.demos is not None:
            demos = self.parts.demos  # cold_start.data, checked by the builder
        else:
            demos = self.demonstrations(
                cs.episodes, seed=seeds.task_base(self.cfg.seed, "cold_start")
            )
        # Its own optimizer at cold_start.lr, constant: OPD's schedule and moments start fresh.
        sft = self.learner.cold_start(cs.lr, cs.steps)
        rng = random.Random(seeds.seed_of(self.cfg.seed, "cold_start"))
        with self._progress() as progress:
            task = progress.add_task("cold start (SFT)", total=cs.steps, info="")
            for i in range(cs.steps):
                batch = rng.sample(demos, min(cs.batch_size, len(demos)))
                m = sft.step_sft(distributed.shard(batch))  # the ranks' shards add up to batch
                self.log({"phase": "cold_start", "step": i, **m})
                self.hooks.point(f"cold_start:{i}")
                progress.update(task, advance=1, info=f"nll {m.get('learner/loss', 0):.3f}")
        del sft
        self.parts.sync_engine()
        self.cold_start_done = True

    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        temp = cfg.rollout.temperature
        if cfg.temperature_end is not None and cfg.steps > 1:
            temp = temp + (cfg.temperature_end - temp) * step / (cfg.steps - 1)
        row: dict[str, Any] = {
            "phase": "train",
            "step": step,
            "temperature": temp,
            **self.curriculum.describe(step),
        }
        step_rng = random.Random(seeds.seed_of(cfg.seed, "gkd", step))
        jobs = self.curriculum.jobs(step, cfg.episodes_per_step)
        if step_rng.random() >= cfg.gkd_lambda:
            demos, generated, positions = self._demonstrations(
                cfg.episodes_per_step,
                seed=seeds.task_base(cfg.seed, "demos") + step * cfg.episodes_per_step,
            )
            t_demo = time.perf_counter()
            row.update(self.learner.step_sft(distributed.shard(demos)))
            self.parts.sync_engine()
            row["batch"] = "demonstration"
            # Every token the teacher generated counts, including its failed episodes.
            self.teacher_tokens += generated
            self.teacher_positions += positions
            if cfg.demo_source == "teacher":  # the teacher played the tasks (not the expert)
                self.teacher_seconds += t_demo - t_start
            row["teacher_tokens"] = self.teacher_tokens
            row["teacher_positions"] = self.teacher_positions
            row["teacher_seconds"] = self.teacher_seconds
            row.update(episode_summary(demos, prefix="demo/"))
            row["time/demos_s"] = t_demo - t_start
            row["time/learner_s"] = time.perf_counter() - t_demo
            row["time/step_s"] = time.perf_counter() - t_start
            return row
        row["batch"] = "on-policy"
        t0 = time.perf_counter()
        # Under torchrun each rank plays its share of the step's tasks; the learner's update is
        # over all ranks' episodes.
        episodes = run_episodes(
            distributed.shard(jobs),
            self.engine,
            self.renderer,
            rollout_config(cfg, temp),
            seed=seeds.seed_of(cfg.seed, "sampling", step, self.world.rank),
            # guided-opd: the teacher model plays the guide turns (mask 0).
            guide=self.teacher_engine()
            if any(j.guide and j.guide.needs_teacher for j in jobs)
            else None,
        )
        t1 = time.perf_counter()
        # An episode an env/tool/serialization error ended is kept for inspection, never trained.
        trainable = [e for e in episodes if e.stop_reason != StopReason.ENV_ERROR]
        self.teacher.score(trainable)
        t2 = time.perf_counter()
        self.teacher_seconds += t2 - t1
        row.update(self.learner.step(trainable))
        drop_teacher_hidden(trainable)  # training-time only: not kept, gathered or stored
        self.parts.sync_engine()
        t3 = time.perf_counter()
        # Counts over all ranks, so every rank takes the same teacher-token budget decision.
        sampled = int(distributed.all_sum(sum(e.num_sampled_tokens for e in episodes)))
        scored = int(distributed.all_sum(sum(len(s.tokens) for e in episodes for s in e.segments)))
        # Guide turns are generated by the teacher.
        guided = int(distributed.all_sum(sum(e.guide_tokens for e in episodes)))
        self.teacher_tokens += sampled + guided
        # The teacher prefilled every position of every segment it scored (prompts and tool
        # results too), and decoded the guide turns.
        self.teacher_positions += scored + guided
        episodes = distributed.gather_list(episodes)  # rank 0: the whole step, in job order
        row.update(episode_summary(episodes))
        row.update(by_env(episodes))  # a mixture: each env's share, and its teacher KL
        if guided:
            row["rollout/guide_tokens"] = guided
        row.update(
            {
                "throughput/rollout_tok_s": sampled / max(t1 - t0, 1e-9),
                "throughput/teacher_tok_s": scored / max(t2 - t1, 1e-9),
                "throughput/learner_tok_s": scored / max(t3 - t2, 1e-9),
                "time/rollout_s": t1 - t0,
                "time/teacher_s": t2 - t1,
                "time/learner_s": t3 - t2,
                "teacher_tokens": self.teacher_tokens,
                "teacher_positions": self.teacher_positions,
                "teacher_seconds": self.teacher_seconds,
            }
        )
        if self.world.is_main:
            self.run_dir.append_episodes(step, episodes)
        row["time/step_s"] = time.perf_counter() - t_start  # writing the episodes included
        return row

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )

    # ---------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """The whole run: set up (or resume), evaluate, cold start, train, evaluate."""
        self.setup()
        cfg = self.cfg
        result: dict[str, Any] = {"run_dir": str(self.run_dir.path)}
        fresh = self.start_step == 0 and not self.cold_start_done
        per_env: dict[str, dict[str, float]] = {m.env: {} for m in self.members}

        def record(key: str, numbers: dict[str, float]) -> None:
            # The result's headline number, and on a mixture each env's under "by_env".
            result[key] = numbers.get("success", float("nan"))
            for env in per_env:
                if env in numbers:
                    per_env[env][key] = numbers[env]

        if fresh and cfg.eval.before and cfg.eval.episodes > 0:
            record("success_before", self.evaluate("before training", step=-1))
            if result["success_before"] == 0 and cfg.cold_start.steps == 0:
                self.console.print(
                    "[yellow]the student solves none of the held-out tasks and "
                    "cold_start.steps=0[/]: OPD needs a student that sometimes acts right; "
                    "a student trained from scratch (e.g. student=tiny-base) wants "
                    "cold_start.steps=150"
                )
        if not self.cold_start_done and cfg.cold_start.steps > 0:
            self.cold_start()
            # Keep the cold-started student: baselines (SFT-only, other losses) start from it.
            if self.world.is_main:
                self.parts.save_model(self.run_dir.path / "cold_start_model")
            if cfg.eval.episodes > 0:
                record("success_after_cold_start", self.evaluate("after cold start", step=-1))
        with self._progress() as progress:
            task = progress.add_task(
                "on-policy distillation" if cfg.gkd_lambda > 0 else "off-policy SFT (gkd_lambda=0)",
                total=cfg.steps,
                completed=self.start_step,
                info="",
            )
            for step in range(self.start_step, cfg.steps):
                if cfg.teacher_token_budget and self.teacher_tokens >= cfg.teacher_token_budget:
                    self.console.print(
                        f"teacher-token budget {cfg.teacher_token_budget} reached at step {step}"
                    )
                    self._save(step - 1)
                    break
                row = self.train_step(step)
                self.log(row)
                self.hooks.point(f"train:{step}")
                info = f"success {row.get('rollout/success', float('nan')):.2f}  kl {row.get('diag/sampled_kl', float('nan')):.3f}"
                progress.update(task, advance=1, info=info)
                if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                    self.evaluate(f"step {step + 1}", step)
                if (step + 1) % max(1, cfg.checkpoint_every) == 0 or step + 1 == cfg.steps:
                    self._save(step)
                    self.hooks.point(f"checkpoint:{step}")
        if cfg.eval.after and cfg.eval.episodes > 0:
            record("success_after", self.evaluate("after training", step=cfg.steps))
        if cfg.eval.teacher and cfg.eval.episodes > 0:
            if cfg.teacher_backend != "hf" or cfg.engine != "hf":
                # The teacher's model is on a server or in another engine: not loaded here.
                self.console.print(
                    f"teacher not evaluated (engine={cfg.engine}, "
                    f"teacher_backend={cfg.teacher_backend}; only hf/hf loads it here)"
                )
            else:
                record("teacher_success", self.evaluate("teacher", step=cfg.steps, teacher=True))
        if len(self.members) > 1 and any(per_env.values()):
            result["by_env"] = per_env
        if "success_after" in result:
            stages = [
                f"{label} {result[key]:.1%}"
                for key, label in (
                    ("success_before", "before"),
                    ("success_after_cold_start", "after cold start"),
                    ("success_after", "after training"),
                )
                if key in result
            ]
            teacher = result.get("teacher_success")
            start = result.get("success_after_cold_start", result.get("success_before"))
            closed = ""
            if teacher is not None and start is not None and teacher > start:
                # The share of the student's distance to the teacher that training removed.
                result["gap_closed"] = (result["success_after"] - start) / (teacher - start)
                closed = f"; training closed {result['gap_closed']:.0%} of the gap"
            self.console.print(
                f"[bold green]held-out success: {' → '.join(stages)}[/]"
                + (f" [bold](teacher: {teacher:.1%}{closed})[/]" if teacher is not None else "")
            )
        return result


def train(
    cfg: DictConfig,
    console: Console | None = None,
    overrides: list[str] | None = None,
    hooks: TrainerHooks | None = None,
) -> dict[str, Any]:
    """Run ``agentopd train`` with a composed config.

    Under ``torchrun`` it joins the process group first (and leaves it at the end); only rank 0
    prints and writes (see :mod:`agentopd.distributed`).

    Args:
        cfg: The composed config (``compose("train", overrides)``).
        console: Where progress goes (rank 0 only).
        overrides: The command line's items; with ``resume=true`` the only changes allowed to
            the saved config (:func:`agentopd.resume.start`).
        hooks: Called at the loop's named points (:mod:`agentopd.hooks`).
    """
    console = console or Console()
    # Leave only a process group this run created: a caller's, or the one-process group an
    # in-process vLLM engine sets up for itself, stays as it was.
    created = distributed.launched_size() > 1 and distributed.world().size == 1
    world = distributed.setup(cfg.distributed.backend, cfg.distributed.timeout_s)
    if not world.is_main:
        console = Console(quiet=True)
    try:
        begin = resume.start(cfg, overrides, console)
        typed = to_object(begin.cfg)
        assert isinstance(typed, TrainConfig)  # compose("train") and the saved run's config
        trainer = Trainer(typed, console, world, hooks or TrainerHooks(), begin.name, begin.changes)
        return trainer.run()
    finally:
        if created:
            distributed.teardown()
