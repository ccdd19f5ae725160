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

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agentopd import registry, zoo
from agentopd.engines.hf import HFEngine
from agentopd.learner import Learner, LearnerConfig
from agentopd.metrics import episode_summary, evaluate
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, RolloutConfig, expert_episodes, run_episodes
from agentopd.runs import RunDir
from agentopd.teacher import Teacher, TeacherConfig, check_tokenizers
from agentopd.types import Episode


def resolve_device(name: str, cpu_threads: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU. ``cpu_threads > 0`` sets torch's CPU threads
    (tiny models run fastest on one thread: more threads mostly add synchronisation)."""
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def student_name(cfg: DictConfig) -> str:
    return "tiny-base" if cfg.student == "auto" else cfg.student


def teacher_name(cfg: DictConfig) -> str:
    return f"tiny-teacher-{cfg.env}" if cfg.teacher == "auto" else cfg.teacher


def rollout_config(cfg: DictConfig, temperature: float | None = None) -> RolloutConfig:
    r = cfg.rollout
    return RolloutConfig(
        max_new_tokens=r.max_new_tokens,
        max_episode_tokens=r.max_episode_tokens,
        temperature=r.temperature if temperature is None else temperature,
        top_p=r.top_p,
        tool_workers=r.tool_workers,
        mask_parse_errors=r.mask_parse_errors,
    )


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
    if cfg.resume:
        return base
    root = Path(cfg.runs_dir)
    name, i = base, 2
    while (root / name).exists() and any((root / name).iterdir()):
        name, i = f"{base}-{i}", i + 1
    return name


@dataclass
class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    cfg: DictConfig
    console: Console = field(default_factory=Console)

    def setup(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars; no per-save shard bars
        cfg = self.cfg
        _seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device, cfg.cpu_threads)
        self.run_dir = RunDir(cfg.runs_dir, _new_run_name(cfg))
        self.run_dir.write_config(OmegaConf.to_yaml(cfg))
        self.console.print(
            f"[bold]run[/] {self.run_dir.path}  env={cfg.env} loss={cfg.loss} device={self.device}"
        )

        # ------------------------------------------------------------------ models
        name = student_name(cfg)
        if name in zoo.PRESETS:
            self.student, self.tokenizer = (
                zoo.build_model(name, seed=cfg.seed),
                zoo.load_tokenizer(),
            )
        else:
            self.student, self.tokenizer = zoo.load(name, progress=True)
        self.teacher_model, teacher_tok = zoo.load(teacher_name(cfg), progress=True)
        check_tokenizers(self.tokenizer, teacher_tok)
        self.student.to(self.device)
        self.teacher_model.to(self.device).eval()
        for p in self.teacher_model.parameters():
            p.requires_grad_(False)
        self.renderer = Renderer(self.tokenizer, on_prefix_mismatch=cfg.rollout.on_prefix_mismatch)
        self.engine = HFEngine(self.student, self.renderer.eot_id, self.renderer.pad_id)
        t = cfg.teacher_cfg
        self.teacher = Teacher(
            self.teacher_model,
            Renderer(teacher_tok, on_prefix_mismatch=cfg.rollout.on_prefix_mismatch),
            TeacherConfig(
                topk=t.topk,
                system_prompt=t.system_prompt,
                privileged=t.privileged,
                batch_size=t.batch_size,
            ),
        )
        o, lc = cfg.optim, cfg.loss_cfg
        self.learner = Learner(
            self.student,
            LearnerConfig(
                optimizer=o.name,
                lr=o.lr,
                weight_decay=o.weight_decay,
                beta1=o.beta1,
                beta2=o.beta2,
                grad_clip=o.grad_clip,
                warmup_steps=o.warmup_steps,
                schedule=o.schedule,
                total_steps=cfg.steps,
                micro_batch=o.micro_batch,
                loss=cfg.loss,
                clip_eps=lc.clip_eps,
                tail=lc.tail,
                beta=lc.beta,
                agg=lc.agg,
                entropy_top_frac=lc.entropy_top_frac,
                overlap_only=lc.overlap_only,
                chunk_size=lc.chunk_size,
                topk=t.topk,
            ),
            pad_id=self.renderer.pad_id,
        )
        self.curriculum = registry.curricula.make(
            cfg.curriculum,
            env=cfg.env,
            env_kwargs=dict(cfg.env_kwargs),
            seed=cfg.seed,
            **dict(cfg.curriculum_kwargs),
        )
        self.start_step = 0
        self.cold_start_done = False
        self.teacher_tokens = 0
        resumed = self.run_dir.latest_checkpoint() if cfg.resume else None
        if resumed is not None:
            self._load(*resumed)

    # ---------------------------------------------------------------------- checkpoints
    def _save(self, step: int) -> None:
        def payload(d: Path) -> None:
            self.student.save_pretrained(d / "model")
            self.tokenizer.save_pretrained(d / "model")
            torch.save(
                {"learner": self.learner.state_dict(), "rng": _rng_state()}, d / "trainer.pt"
            )

        state = {
            "curriculum": self.curriculum.state_dict(),
            "cold_start_done": self.cold_start_done,
            "teacher_tokens": self.teacher_tokens,
        }
        self.run_dir.save_checkpoint(step, payload, state)

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(path / "model")
        self.student.load_state_dict(loaded.state_dict())
        blob = torch.load(path / "trainer.pt", weights_only=False)
        self.learner.load_state_dict(blob["learner"])
        _set_rng_state(blob["rng"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.cold_start_done = bool(state.get("cold_start_done", True))
        self.teacher_tokens = int(state.get("teacher_tokens", 0))
        self.start_step = int(state["step"]) + 1
        self.run_dir.truncate_logs(state["log_sizes"])
        self.console.print(
            f"[yellow]resumed[/] from {path.name}: continuing at step {self.start_step}"
        )

    # ---------------------------------------------------------------------- phases
    def log(self, row: dict[str, Any]) -> None:
        self.run_dir.append_jsonl("metrics.jsonl", [json.dumps(row)])

    def evaluate(self, tag: str, step: int) -> float:
        e = self.cfg.eval
        report, _ = evaluate(
            self.cfg.env,
            dict(self.cfg.env_kwargs),
            self.engine,
            self.renderer,
            episodes=e.episodes,
            samples=e.pass_k,
            temperature=e.temperature,
            rollout_config=rollout_config(self.cfg),
            seed=10_000 + self.cfg.seed,
        )
        self.log(
            {
                "phase": "eval",
                "tag": tag,
                "step": step,
                "teacher_tokens": self.teacher_tokens,
                **{f"eval/{k}": v for k, v in report.items()},
            }
        )
        self.console.print(
            f"[bold]{tag}[/]: held-out success {report['success']:.1%} ({report['tasks']} tasks, mean turns {report['mean_turns']:.2f})"
        )
        return float(report["success"])

    def demonstrations(self, n: int, seed: int) -> list[Episode]:
        return self._demonstrations(n, seed)[0]

    def _demonstrations(self, n: int, seed: int) -> tuple[list[Episode], int]:
        """Successful teacher demonstrations for SFT (``demo_source``: scripted expert or the
        teacher model sampling at temperature 1)."""
        jobs = [
            EpisodeJob(
                self.cfg.env,
                seed=seed + i,
                options={"split": "train"},
                env_kwargs=dict(self.cfg.env_kwargs),
            )
            for i in range(n)
        ]
        if self.cfg.demo_source == "teacher":
            engine = HFEngine(self.teacher_model, self.renderer.eot_id, self.renderer.pad_id)
            episodes = run_episodes(
                jobs, engine, self.renderer, rollout_config(self.cfg, 1.0), seed=seed
            )
        else:
            episodes = expert_episodes(jobs, self.renderer)
        generated = sum(ep.num_sampled_tokens for ep in episodes)
        return [ep for ep in episodes if ep.success], generated

    def cold_start(self) -> None:
        cs = self.cfg.cold_start
        if cs.steps <= 0 or self.cold_start_done:
            return
        if cs.data:
            # Teacher episodes collected with `agentopd collect` (successful ones only).
            lines = Path(cs.data).read_text(encoding="utf-8").splitlines()
            demos = [ep for ep in (Episode.from_json(x) for x in lines if x.strip()) if ep.success]
            if not demos:
                raise ValueError(f"cold_start.data={cs.data} holds no successful episodes")
        else:
            demos = self.demonstrations(cs.episodes, seed=7_000_000 + self.cfg.seed)
        # Its own optimizer at cold_start.lr, constant: the OPD learner's schedule and AdamW
        # moments start fresh afterwards. (Setting the shared optimizer's lr did not hold: the
        # OPD scheduler reset it to optim.lr after the first step.)
        sft = Learner(
            self.student,
            replace(
                self.learner.config,
                optimizer="adamw",
                lr=cs.lr,
                schedule="constant",
                warmup_steps=0,
                total_steps=cs.steps,
            ),
            self.learner.pad_id,
        )
        rng = random.Random(self.cfg.seed)
        with self._progress() as progress:
            task = progress.add_task("cold start (SFT)", total=cs.steps, info="")
            for i in range(cs.steps):
                batch = rng.sample(demos, min(cs.batch_size, len(demos)))
                m = sft.step_sft(batch)
                self.log({"phase": "cold_start", "step": i, **m})
                progress.update(task, advance=1, info=f"nll {m.get('learner/loss', 0):.3f}")
        del sft
        self.cold_start_done = True

    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        temp = cfg.rollout.temperature
        if cfg.temperature_end is not None and cfg.steps > 1:
            temp = temp + (cfg.temperature_end - temp) * step / (cfg.steps - 1)
        row: dict[str, Any] = {
            "phase": "train",
            "step": step,
            "temperature": temp,
            **self.curriculum.describe(step),
        }
        step_rng = random.Random(cfg.seed * 7919 + step)
        jobs = self.curriculum.jobs(step, cfg.episodes_per_step)
        if step_rng.random() >= cfg.gkd_lambda:
            demos, generated = self._demonstrations(
                cfg.episodes_per_step, seed=8_000_000 + step * cfg.episodes_per_step
            )
            row.update(self.learner.step_sft(demos))
            row["batch"] = "demonstration"
            # Every token the teacher generated counts, including its failed episodes.
            self.teacher_tokens += generated
            row["teacher_tokens"] = self.teacher_tokens
            row.update(episode_summary(demos, prefix="demo/"))
            return row
        row["batch"] = "on-policy"
        t0 = time.perf_counter()
        episodes = run_episodes(
            [EpisodeJob(cfg.env, j.seed, j.options, dict(cfg.env_kwargs)) for j in jobs],
            self.engine,
            self.renderer,
            rollout_config(cfg, temp),
            seed=cfg.seed * 100_003 + step,
        )
        t1 = time.perf_counter()
        self.teacher.score(episodes)
        t2 = time.perf_counter()
        row.update(self.learner.step(episodes))
        self.engine.load_weights(self.student.state_dict())
        t3 = time.perf_counter()
        sampled = sum(e.num_sampled_tokens for e in episodes)
        scored = sum(len(s.tokens) for e in episodes for s in e.segments)
        self.teacher_tokens += sampled
        row.update(episode_summary(episodes))
        row.update(
            {
                "throughput/rollout_tok_s": sampled / max(t1 - t0, 1e-9),
                "throughput/teacher_tok_s": scored / max(t2 - t1, 1e-9),
                "throughput/learner_tok_s": scored / max(t3 - t2, 1e-9),
                "time/rollout_s": t1 - t0,
                "time/teacher_s": t2 - t1,
                "time/learner_s": t3 - t2,
                "teacher_tokens": self.teacher_tokens,
            }
        )
        self.run_dir.append_jsonl(
            "episodes.jsonl",
            [json.dumps({"step": step, **json.loads(e.to_json())}) for e in episodes],
        )
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
        self.setup()
        cfg = self.cfg
        result: dict[str, Any] = {"run_dir": str(self.run_dir.path)}
        fresh = self.start_step == 0 and not self.cold_start_done
        if fresh and cfg.eval.before and cfg.eval.episodes > 0:
            result["success_before"] = self.evaluate("before training", step=-1)
        if not self.cold_start_done and cfg.cold_start.steps > 0:
            self.cold_start()
            # Keep the cold-started student: baselines (SFT-only, other losses) start from it.
            self.student.save_pretrained(self.run_dir.path / "cold_start_model")
            self.tokenizer.save_pretrained(self.run_dir.path / "cold_start_model")
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
                info = f"success {row.get('rollout/success', float('nan')):.2f}  kl {row.get('diag/sampled_kl', float('nan')):.3f}"
                progress.update(task, advance=1, info=info)
                if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                    self.evaluate(f"step {step + 1}", step)
                if (step + 1) % max(1, cfg.checkpoint_every) == 0 or step + 1 == cfg.steps:
                    self._save(step)
        if cfg.eval.after and cfg.eval.episodes > 0:
            result["success_after"] = self.evaluate("after training", step=cfg.steps)
        if "success_before" in result and "success_after" in result:
            self.console.print(
                f"[bold green]held-out success: before {result['success_before']:.1%} → after {result['success_after']:.1%}[/]"
            )
        return result


def train(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """Run ``agentopd train`` with a composed config."""
    return Trainer(cfg, console or Console()).run()
