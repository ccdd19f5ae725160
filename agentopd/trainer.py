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
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import random
import re
import signal
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agentopd import distributed, fsdp, lora, seeds
from agentopd.build import build_train, make_engine, make_teacher_engine, rollout_config
from agentopd.config import ConfigError
from agentopd.learner import Learner
from agentopd.metrics import episode_summary, evaluate
from agentopd.rollout import EpisodeJob, expert_episodes, run_episodes
from agentopd.runs import RunDir, atomic_write_text
from agentopd.teachers import Teacher
from agentopd.types import Episode, StopReason, drop_teacher_hidden


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _new_run_name(cfg: DictConfig) -> str:
    base = cfg.run_name or f"{cfg.env}-{cfg.loss}-s{cfg.seed}"
    root = Path(cfg.runs_dir)
    name, i = base, 2
    while (root / name).exists() and any((root / name).iterdir()):
        name, i = f"{base}-{i}", i + 1
    return name


def _resume_target(cfg: DictConfig, console: Console) -> str | None:
    """The run ``resume=true`` continues: ``run_name``, or the newest ``<env>-<loss>-s<seed>[-N]``.

    ``resume=true run_name=X`` is safe to put in a command that a preemptible machine reruns:
    when no run ``X`` exists yet (and no existing run's name is close enough to be a typo of
    it), it starts ``X`` (returns ``None``).

    Raises:
        ConfigError: ``run_name`` looks like a typo of an existing run, or without ``run_name``
            no matching run exists (the message names the runs that exist).
    """
    root = Path(cfg.runs_dir)
    existing = sorted(p.name for p in root.glob("*") if (p / "config.yaml").is_file())
    if cfg.run_name:
        if cfg.run_name in existing:
            return cfg.run_name
        near = difflib.get_close_matches(cfg.run_name, existing, n=1)
        if not near:
            console.print(f"[yellow]resume[/]: no run {cfg.run_name!r} in {root} yet; starting it")
            return None
        raise ConfigError(
            f"resume=true: no run {cfg.run_name!r} in {root}. Did you mean {near[0]!r}? "
            f"Runs there: {', '.join(existing)}. (A name close to none of them starts a new run.)"
        )
    base = f"{cfg.env}-{cfg.loss}-s{cfg.seed}"
    pattern = re.compile(re.escape(base) + r"(-\d+)?")
    matching = [n for n in existing if pattern.fullmatch(n)]
    if not matching:
        raise ConfigError(
            f"resume=true without run_name: no run named {base}[-N] in {root}. "
            f"Runs there: {', '.join(existing) or '(none)'}. Pass run_name=..."
        )
    newest = max(matching, key=lambda n: (root / n / "config.yaml").stat().st_mtime)
    console.print(f"[yellow]resume[/]: continuing the most recent matching run {newest!r}")
    return newest


_NOT_COMPARED = ("resume", "resume_override", "run_name", "runs_dir", "distributed")
"""Keys that say where and how the run is continued, not what it trains: a run directory that
was moved (runs_dir) or resumed on another number of ranks (distributed) is the same run."""


def _config_diff(
    saved: dict[str, Any],
    new: dict[str, Any],
    prefix: str = "",
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """``key: old -> new`` for every difference. A key the saved config lacks (the run predates
    it) that holds its default in ``defaults`` is no difference."""
    out = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(new)):
        if not prefix and key in _NOT_COMPARED:
            continue
        a, b = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if a == "<absent>" and key in defaults and b == defaults[key]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out.extend(
                _config_diff(a, b, f"{prefix}{key}.", sub if isinstance(sub, dict) else None)
            )
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _check_fsdp2(cfg: DictConfig) -> None:
    """Refuse what ``distributed.strategy=fsdp2`` does not do (before anything is built).

    Raises:
        ConfigError: LoRA adapters, or a rollout engine other than ``hf``.
    """
    if cfg.lora.r > 0:
        raise ConfigError(
            f"distributed.strategy=fsdp2 does not support LoRA (lora.r={cfg.lora.r}): the "
            "adapters are small, so replicate them with distributed.strategy=ddp"
        )
    if cfg.engine != "hf":
        raise ConfigError(
            f"distributed.strategy=fsdp2 runs with engine=hf only, got engine={cfg.engine}; "
            "use distributed.strategy=ddp"
        )


def _kill_point(where: str) -> None:
    """Crash-test hook: ``AGENTOPD_KILL_AT=<where>`` SIGKILLs the process at that point
    (``cold_start:3``, ``train:2``, ``eval:after cold start``, ``checkpoint:1``); under torchrun
    rank 0 is killed there, and torchrun stops the others."""
    if os.environ.get("AGENTOPD_KILL_AT") == where and distributed.launched_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    cfg: DictConfig
    console: Console = field(default_factory=Console)
    overrides: list[str] | None = None
    """The command line's ``key=value`` items; with ``resume=true`` only these may change the
    saved config (None: compare the whole config)."""
    _teacher_engine: Any = None
    _config_changes: list[str] = field(default_factory=list)
    _demos: list[Episode] | None = None
    world: distributed.World = field(default_factory=distributed.World)
    """This process's torchrun rank (one process: rank 0 of 1); set by :meth:`run`."""
    _replica: Any = None
    """Under ``distributed.strategy=fsdp2``: the full, plain copy of the student the rollout
    engine samples from and checkpoints are written from (see :meth:`_sync_engine`)."""

    def setup(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars; no per-save shard bars
        name = _resume_target(self.cfg, self.console) if self.cfg.resume else None
        if name is not None:
            self.cfg = self._resumed_config(Path(self.cfg.runs_dir) / name)
        cfg = self.cfg
        _seed_everything(cfg.seed)
        sharded = self.world.size > 1 and cfg.distributed.strategy == "fsdp2"
        if sharded:
            _check_fsdp2(cfg)
        # Build (and so validate) everything before the run directory exists.
        parts = build_train(cfg)
        self.device = parts.device
        self.student, self.tokenizer = parts.student, parts.tokenizer
        self.renderer, self.engine = parts.renderer, parts.engine
        # build_train makes every part a training run needs.
        assert parts.teacher is not None and parts.learner is not None
        self.teacher: Teacher = parts.teacher
        self.learner: Learner = parts.learner
        self.curriculum = parts.curriculum
        self._demos = parts.demos
        main = self.world.is_main
        if self.world.size > 1:  # every rank starts from rank 0's weights
            distributed.broadcast_parameters(self.student)
            self.engine.load_weights(lora.engine_weights(self.student))
        if sharded:
            assert parts.workdir is not None  # build_train sets it
            self._shard(parts.workdir)
        # Rank 0 names the run and alone writes it; the other ranks only read it (resume).
        if name is None:
            name = distributed.broadcast_object(_new_run_name(cfg) if main else None)
            assert name is not None  # rank 0's name
        self.run_dir = RunDir(cfg.runs_dir, name, create=main)
        if self._config_changes and main:
            self.run_dir.append_jsonl(
                "config_changes.jsonl",
                [json.dumps({"time": time.time(), "changes": self._config_changes})],
            )
        if main:
            self.run_dir.remove_partial_checkpoints()
            self.run_dir.write_config(OmegaConf.to_yaml(cfg))
            choices = {**parts.choices, "world_size": self.world.size}
            atomic_write_text(
                self.run_dir.path / "choices.json", json.dumps(choices, indent=2) + "\n"
            )
        self.console.print(
            f"[bold]run[/] {self.run_dir.path}  env={cfg.env} loss={cfg.loss} device={self.device}"
        )
        self.console.print(
            "choices: " + "  ".join(f"{k}={v}" for k, v in parts.choices.items() if v is not None)
        )
        if self.learner.teacher_head is None:
            self.console.print(
                f"diag/true_rkl: unavailable with teacher_backend={cfg.teacher_backend} (the "
                "exact reverse KL needs the teacher's full distribution: teacher_backend=hf)"
            )
        self.start_step = 0
        self.cold_start_done = False
        self.teacher_tokens = 0
        self.teacher_positions = 0
        resumed = self.run_dir.latest_checkpoint() if cfg.resume else None
        resumed = distributed.broadcast_object(resumed)  # every rank loads rank 0's choice
        if resumed is not None:
            self._load(*resumed)
        elif cfg.resume:
            # Killed before the first checkpoint (cold start included): start over, cleanly.
            if main:
                self.run_dir.truncate_logs({})
            self.console.print("[yellow]resume[/]: no checkpoint yet; starting the run over")

    def _shard(self, workdir: Path) -> None:
        """``distributed.strategy=fsdp2``: the rollout engine gets a full copy of the student
        of its own; the student is sharded (:func:`agentopd.fsdp.shard`) and the learner rebuilt
        on the shards (its optimizer holds this rank's shard of the state)."""
        self._replica = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.engine = make_engine(
            self.cfg.engine, self._replica, self.renderer, workdir, self.cfg.engine_cfg
        )
        old = self.learner
        self.learner = Learner(
            fsdp.shard(self.student),
            old.config,
            old.pad_id,
            loss=old.loss,
            loss_cfg=old.loss_cfg,
            topk=old.topk,
            total_steps=old.total_steps,
            teacher_head=old.teacher_head,
        )

    def _sync_engine(self) -> None:
        """Give the rollout engine the learner's current weights (after every update and a
        resume): pushed to an engine with weights of its own (vLLM), a no-op for an ``hf``
        engine that shares the student's parameters. Under ``fsdp2`` the full weights are
        gathered (a collective every rank calls here) into the engine's replica."""
        if self._replica is not None:
            self.engine.load_weights(fsdp.full_state_dict(self.student))
        else:
            self.engine.load_weights(lora.engine_weights(self.student))

    def _resumed_config(self, path: Path) -> DictConfig:
        """The saved config of the run at ``path`` with this command's overrides applied.

        Raises:
            ConfigError: The overrides change the saved config and ``resume_override`` is off.
        """
        from agentopd.config import compose, validate

        saved = OmegaConf.load(path / "config.yaml")
        base = compose("train", [f"env={saved.env}", f"loss={saved.loss}"])
        if self.overrides is None:
            effective = self.cfg
        else:
            merged = OmegaConf.merge(base, saved)
            if self.overrides:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(self.overrides))
            assert isinstance(merged, DictConfig)  # merged into the DictConfig ``base``
            effective = merged
            effective.run_name = path.name
            # resume_override says how this command resumes; the saved run's value (true if it
            # was once resumed with it) must not let later resumes change options silently.
            effective.resume_override = bool(self.cfg.resume_override)
            validate(effective)
        diff = _config_diff(
            OmegaConf.to_container(saved),  # type: ignore[arg-type]
            OmegaConf.to_container(effective),  # type: ignore[arg-type]
            defaults=OmegaConf.to_container(base),  # type: ignore[arg-type]
        )
        if diff and not effective.resume_override:
            raise ConfigError(
                f"resume=true with options that differ from {path / 'config.yaml'}:\n  "
                + "\n  ".join(diff)
                + "\nDrop them, or pass resume_override=true to continue with the new ones "
                "(the change is recorded in config_changes.jsonl)."
            )
        if diff:
            self.console.print("[yellow]resume_override[/]: " + "; ".join(diff))
        self._config_changes = diff
        return effective

    # ---------------------------------------------------------------------- checkpoints
    def _full_model(self) -> Any:
        """The student with every weight in one place: the engine's replica under ``fsdp2``
        (synced after every update), else the student itself."""
        return self._replica if self._replica is not None else self.student

    def _save(self, step: int) -> None:
        # Every rank takes part (under fsdp2 the optimizer state is gathered); rank 0 saves.
        learner_state = self.learner.state_dict()
        if not self.world.is_main:  # every rank holds the same state
            return

        def payload(d: Path) -> None:
            lora.save_pretrained(self._full_model(), self.tokenizer, d / "model")
            torch.save({"learner": learner_state, "rng": _rng_state()}, d / "trainer.pt")

        state = {
            "curriculum": self.curriculum.state_dict(),
            "cold_start_done": self.cold_start_done,
            "teacher_tokens": self.teacher_tokens,
            "teacher_positions": self.teacher_positions,
        }
        self.run_dir.save_checkpoint(step, payload, state)

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        if lora.is_lora(self.student):
            lora.load_adapter(self.student, path / "adapter")
        else:
            loaded = AutoModelForCausalLM.from_pretrained(path / "model")
            fsdp.load_full_state_dict(self.student, loaded.state_dict())
        blob = torch.load(path / "trainer.pt", weights_only=False)
        self.learner.load_state_dict(blob["learner"])
        self._sync_engine()
        _set_rng_state(blob["rng"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.cold_start_done = bool(state.get("cold_start_done", True))
        self.teacher_tokens = int(state.get("teacher_tokens", 0))
        self.teacher_positions = int(state.get("teacher_positions", 0))
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

    def evaluate(self, tag: str, step: int, engine: Any = None) -> float:
        """Held-out success of the student (or of ``engine``'s model, e.g. the teacher's) on
        the run's held-out tasks (under torchrun rank 0 evaluates, the others wait and get its
        number)."""
        if not self.world.is_main:
            return float(distributed.broadcast_object(0.0))  # replaced by rank 0's number
        e = self.cfg.eval
        report, _ = evaluate(
            self.cfg.env,
            dict(self.cfg.env_kwargs),
            engine if engine is not None else self.engine,
            self.renderer,
            episodes=e.episodes,
            samples=e.pass_k,
            temperature=e.temperature,
            rollout_config=rollout_config(self.cfg),
            seed=seeds.task_base(self.cfg.seed, "eval"),
        )
        self.log(
            {
                # The teacher's row has a phase of its own: student curves read phase "eval".
                "phase": "eval" if engine is None else "teacher_eval",
                "tag": tag,
                "step": step,
                "teacher_tokens": self.teacher_tokens,
                "teacher_positions": self.teacher_positions,
                **{f"eval/{k}": v for k, v in report.items()},
            }
        )
        _kill_point(f"eval:{tag}")
        self.console.print(
            f"[bold]{tag}[/]: held-out success {report['success']:.1%} ({report['tasks']} tasks, mean turns {report['mean_turns']:.2f})"
        )
        return float(distributed.broadcast_object(report["success"]))

    def demonstrations(self, n: int, seed: int) -> list[Episode]:
        return self._demonstrations(n, seed)[0]

    def _demonstrations(self, n: int, seed: int) -> tuple[list[Episode], int, int]:
        """Successful teacher demonstrations for SFT (``demo_source``: scripted expert or the
        teacher model sampling at temperature 1); also the tokens the teacher generated and
        the positions it processed (prefill and decode, failed episodes included; 0 for the
        scripted expert)."""
        jobs = [
            EpisodeJob(
                self.cfg.env,
                seed=seed + i,
                options={"split": "train"},
                env_kwargs=dict(self.cfg.env_kwargs),
            )
            for i in range(n)
        ]
        mine = distributed.shard(jobs)  # under torchrun each rank plays its share
        if self.cfg.demo_source == "teacher":
            engine = self.teacher_engine()
            episodes = run_episodes(
                mine,
                engine,
                self.renderer,
                rollout_config(self.cfg, 1.0),
                seed=distributed.rank_seed(seed),
            )
        else:
            episodes = expert_episodes(mine, self.renderer)
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

    def teacher_engine(self) -> Any:
        """A rollout engine around the teacher model (built once): it generates demonstrations
        (``demo_source=teacher``) and the guide turns of ``guided-opd``."""
        if self._teacher_engine is None:
            self._teacher_engine = make_teacher_engine(
                self.cfg, self.teacher, self.renderer, self._scratch("teacher_engine"), self.device
            )
        return self._teacher_engine

    def cold_start(self) -> None:
        cs = self.cfg.cold_start
        if cs.steps <= 0 or self.cold_start_done:
            return
        if self._demos is not None:
            demos = self._demos  # cold_start.data, checked by the builder
        else:
            demos = self.demonstrations(
                cs.episodes, seed=seeds.task_base(self.cfg.seed, "cold_start")
            )
        # Its own optimizer at cold_start.lr, constant: the OPD learner's schedule and AdamW
        # moments start fresh afterwards. (Setting the shared optimizer's lr did not hold: the
        # OPD scheduler reset it to optim.lr after the first step.)
        sft = Learner(
            self.learner.passes,  # under fsdp2: the sharded student
            replace(
                self.learner.config, name="adamw", lr=cs.lr, schedule="constant", warmup_steps=0
            ),
            self.learner.pad_id,
            loss=self.learner.loss,
            loss_cfg=self.learner.loss_cfg,
            topk=self.learner.topk,
            total_steps=cs.steps,
            teacher_head=self.learner.teacher_head,
        )
        rng = random.Random(seeds.seed_of(self.cfg.seed, "cold_start"))
        with self._progress() as progress:
            task = progress.add_task("cold start (SFT)", total=cs.steps, info="")
            for i in range(cs.steps):
                batch = rng.sample(demos, min(cs.batch_size, len(demos)))
                m = sft.step_sft(distributed.shard(batch))  # the ranks' shards add up to batch
                self.log({"phase": "cold_start", "step": i, **m})
                _kill_point(f"cold_start:{i}")
                progress.update(task, advance=1, info=f"nll {m.get('learner/loss', 0):.3f}")
        del sft
        self._sync_engine()
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
            row.update(self.learner.step_sft(distributed.shard(demos)))
            self._sync_engine()
            row["batch"] = "demonstration"
            # Every token the teacher generated counts, including its failed episodes.
            self.teacher_tokens += generated
            self.teacher_positions += positions
            row["teacher_tokens"] = self.teacher_tokens
            row["teacher_positions"] = self.teacher_positions
            row.update(episode_summary(demos, prefix="demo/"))
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
            if any(j.guide and j.guide.source == "teacher" and j.guide.p > 0 for j in jobs)
            else None,
        )
        t1 = time.perf_counter()
        # An episode an env/tool/serialization error ended is kept for inspection, never trained.
        trainable = [e for e in episodes if e.stop_reason != StopReason.ENV_ERROR]
        self.teacher.score(trainable)
        t2 = time.perf_counter()
        row.update(self.learner.step(trainable))
        drop_teacher_hidden(trainable)  # training-time only: not kept, gathered or stored
        self._sync_engine()
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
        """The whole run. Under ``torchrun`` it joins the process group first (and leaves it
        at the end); only rank 0 prints and writes (see :mod:`agentopd.distributed`)."""
        # Leave only a process group this run created: a caller's, or the one-process group an
        # in-process vLLM engine sets up for itself, stays as it was.
        created = distributed.launched_size() > 1 and distributed.world().size == 1
        d = self.cfg.distributed
        self.world = distributed.setup(d.backend, d.timeout_s)
        if not self.world.is_main:
            self.console = Console(quiet=True)
        try:
            return self._run()
        finally:
            if created:
                distributed.teardown()

    def _run(self) -> dict[str, Any]:
        self.setup()
        cfg = self.cfg
        result: dict[str, Any] = {"run_dir": str(self.run_dir.path)}
        fresh = self.start_step == 0 and not self.cold_start_done
        if fresh and cfg.eval.before and cfg.eval.episodes > 0:
            result["success_before"] = self.evaluate("before training", step=-1)
        if not self.cold_start_done and cfg.cold_start.steps > 0:
            self.cold_start()
            # Keep the cold-started student: baselines (SFT-only, other losses) start from it.
            if self.world.is_main:
                lora.save_pretrained(
                    self._full_model(), self.tokenizer, self.run_dir.path / "cold_start_model"
                )
            if cfg.eval.episodes > 0:
                result["success_after_cold_start"] = self.evaluate("after cold start", step=-1)
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
                _kill_point(f"train:{step}")
                info = f"success {row.get('rollout/success', float('nan')):.2f}  kl {row.get('diag/sampled_kl', float('nan')):.3f}"
                progress.update(task, advance=1, info=info)
                if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                    self.evaluate(f"step {step + 1}", step)
                if (step + 1) % max(1, cfg.checkpoint_every) == 0 or step + 1 == cfg.steps:
                    self._save(step)
                    _kill_point(f"checkpoint:{step}")
        if cfg.eval.after and cfg.eval.episodes > 0:
            result["success_after"] = self.evaluate("after training", step=cfg.steps)
        if cfg.eval.teacher and cfg.eval.episodes > 0:
            if cfg.teacher_backend != "hf" or cfg.engine != "hf":
                # The teacher's model is on a server or in another engine: not loaded here.
                self.console.print(
                    f"teacher not evaluated (engine={cfg.engine}, "
                    f"teacher_backend={cfg.teacher_backend}; only hf/hf loads it here)"
                )
            else:
                result["teacher_success"] = self.evaluate(
                    "teacher", step=cfg.steps, engine=self.teacher_engine()
                )
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
            self.console.print(
                f"[bold green]held-out success: {' → '.join(stages)}[/]"
                + (f" [bold](teacher: {teacher:.1%})[/]" if teacher is not None else "")
            )
        return result


def train(
    cfg: DictConfig, console: Console | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run ``agentopd train`` with a composed config (``overrides``: the command line's items,
    which with ``resume=true`` are the only changes allowed to the saved config)."""
    return Trainer(cfg, console or Console(), overrides).run()
