"""Which run ``agentopd train`` writes, and with which config: a new run, or ``resume=true``.

:func:`start` names the run to continue (``run_name``, or the newest ``<env>-<loss>-s<seed>[-N]``
in ``runs_dir``) and returns its saved config with this command's overrides applied. An override
that changes what the run trains is refused unless ``resume_override=true``; then the change is
returned, for the run to record in ``config_changes.jsonl``. The checkpoint itself is found and
loaded by the trainer (:meth:`agentopd.runs.RunDir.latest_checkpoint`).

Example::

    cfg = compose("train", overrides)
    begin = start(cfg, overrides, console)
    begin.name  # None: a new run (see new_run_name)
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from agentopd.config import ConfigError, TrainConfig

NOT_COMPARED = ("resume", "resume_override", "run_name", "runs_dir", "distributed")
"""Keys that say where and how the run is continued, not what it trains: a run directory that
was moved (runs_dir) or resumed on another number of ranks (distributed) is the same run."""


@dataclass
class RunStart:
    """What :func:`start` decided."""

    cfg: DictConfig
    """The config to train with (with ``resume=true``: the saved one plus the overrides)."""
    name: str | None = None
    """The existing run to continue; None: a new run."""
    changes: list[str] = field(default_factory=list)
    """``key: old -> new`` for each option ``resume_override=true`` let change."""


def start(cfg: DictConfig, overrides: list[str] | None, console: Console) -> RunStart:
    """The run and config of ``agentopd train`` with the composed ``cfg``.

    Args:
        cfg: The composed config.
        overrides: The command line's ``key=value`` items; with ``resume=true`` only these may
            change the saved config (None: compare the whole of ``cfg``).
        console: Where notes on the choice go.

    Raises:
        ConfigError: See :func:`resume_target` and :func:`resumed_config`.
    """
    name = resume_target(cfg, console) if cfg.resume else None
    if name is None:
        return RunStart(cfg)
    effective, changes = resumed_config(cfg, Path(cfg.runs_dir) / name, overrides, console)
    return RunStart(effective, name, changes)


def new_run_name(cfg: TrainConfig) -> str:
    """``run_name``, or ``<env>-<loss>-s<seed>``, suffixed ``-2``, ``-3``, ... past the names
    of non-empty directories in ``runs_dir``."""
    base = cfg.run_name or f"{cfg.env}-{cfg.loss}-s{cfg.seed}"
    root = Path(cfg.runs_dir)
    name, i = base, 2
    while (root / name).exists() and any((root / name).iterdir()):
        name, i = f"{base}-{i}", i + 1
    return name


def resume_target(cfg: DictConfig, console: Console) -> str | None:
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
            return str(cfg.run_name)
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


def config_diff(
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
        if not prefix and key in NOT_COMPARED:
            continue
        a, b = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if a == "<absent>" and key in defaults and b == defaults[key]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out.extend(config_diff(a, b, f"{prefix}{key}.", sub if isinstance(sub, dict) else None))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def resumed_config(
    cfg: DictConfig, path: Path, overrides: list[str] | None, console: Console
) -> tuple[DictConfig, list[str]]:
    """The saved config of the run at ``path`` with this command's overrides applied, and the
    changes they make (``key: old -> new``).

    Raises:
        ConfigError: The overrides change the saved config and ``resume_override`` is off.
    """
    from agentopd import mixture
    from agentopd.config import compose, validate

    saved = OmegaConf.load(path / "config.yaml")
    pinned = [f"env={saved.env}", f"loss={saved.loss}"]
    if mixture.is_mixture(str(saved.env)):  # a mixture composes only with its members
        envs = OmegaConf.to_container(saved.env_kwargs.envs)
        pinned.append(f"env_kwargs.envs={json.dumps(envs)}")
    base = compose("train", pinned)
    if overrides is None:
        effective = cfg
    else:
        merged = OmegaConf.merge(base, saved)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        assert isinstance(merged, DictConfig)  # merged into the DictConfig ``base``
        effective = merged
        effective.run_name = path.name
        # resume_override says how this command resumes; the saved run's value (true if it
        # was once resumed with it) must not let later resumes change options silently.
        effective.resume_override = bool(cfg.resume_override)
        validate(effective)
    diff = config_diff(
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
        console.print("[yellow]resume_override[/]: " + "; ".join(diff))
    return effective, diff
