"""``agentopd collect``: successful teacher episodes for off-policy cold start (SFT).

``model=expert`` plays each env's scripted expert; any other name is a zoo name or a
``save_pretrained`` path, sampled with the HF engine. Only successful episodes are kept unless
``only_successful=false``. Output: one episode per line, token-exact, mask 1 on the teacher's
sampled tokens, ready for SFT.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from agentopd import zoo
from agentopd.build import build_policy, rollout_config
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes, run_episodes
from agentopd.runs import atomic_write_text
from agentopd.types import Episode


def collect(cfg: DictConfig, console: Console | None = None) -> list[Episode]:
    console = console or Console()
    jobs = [
        EpisodeJob(
            cfg.env, seed=cfg.seed + i, options={"split": "train"}, env_kwargs=dict(cfg.env_kwargs)
        )
        for i in range(cfg.episodes)
    ]
    tok = zoo.load_tokenizer() if cfg.model == "expert" else None
    with console.status(f"collecting {cfg.episodes} episodes of {cfg.model} on {cfg.env}"):
        if cfg.model == "expert":
            episodes = expert_episodes(jobs, Renderer(tok))
        else:
            parts = build_policy(cfg, cfg.model)
            episodes = run_episodes(
                jobs,
                parts.engine,
                parts.renderer,
                rollout_config(cfg, cfg.temperature),
                seed=cfg.seed,
            )
    kept = [e for e in episodes if e.success or not cfg.only_successful]
    atomic_write_text(Path(cfg.output), "".join(e.to_json() + "\n" for e in kept))
    console.print(
        f"kept {len(kept)}/{len(episodes)} episodes ({sum(e.success for e in episodes)} successful) → {cfg.output}"
    )
    return kept
