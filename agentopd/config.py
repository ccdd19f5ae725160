"""Configuration: typed schemas, config groups from ``configs/`` and ``key=value`` overrides.

Composition order: the schema defaults, then ``configs/<command>.yaml``, then the group files
named by the overrides (``env=sql`` loads ``configs/env/sql.yaml`` when it exists, ``loss=jsd``
loads ``configs/loss/jsd.yaml``), then the overrides themselves. Every key is type-checked; a bad
key names the nearest valid key, a bad value says what was expected, and registry names
(``env=``, ``curriculum=``, ``loss=``) are checked against what is registered.
"""

from __future__ import annotations

import difflib
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("env", "loss", "curriculum")


class ConfigError(ValueError):
    """A bad key or value in a configuration or override."""


@dataclass
class RolloutCfg:
    max_new_tokens: int = 96
    max_episode_tokens: int = 1536
    temperature: float = 1.0
    top_p: float = 1.0
    tool_workers: int = 8
    mask_parse_errors: bool = False
    on_prefix_mismatch: str = "error"


@dataclass
class TeacherCfg:
    topk: int = 16
    system_prompt: str | None = None
    privileged: bool = False
    batch_size: int = 16


@dataclass
class LossCfg:
    clip_eps: float = 0.2
    tail: bool = True
    beta: float = 0.5
    agg: str = "token-mean"
    support: str = "teacher"
    entropy_top_frac: float = 1.0
    overlap_only: bool = False
    chunk_size: int = 1024


@dataclass
class OptimCfg:
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    micro_batch: int = 8
    epochs_per_batch: int = 1


@dataclass
class ColdStartCfg:
    episodes: int = 0
    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    data: str | None = None


@dataclass
class EvalCfg:
    episodes: int = 50
    every: int = 0
    temperature: float = 0.0
    pass_k: int = 1
    before: bool = True
    after: bool = True


@dataclass
class TrainConfig:
    """Everything ``agentopd train`` needs."""

    env: str = "code-sandbox"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    student: str = "auto"
    teacher: str = "auto"
    loss: str = "rkl-sampled"
    curriculum: str = "uniform"
    curriculum_kwargs: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    seed: int = 0
    steps: int = 30
    episodes_per_step: int = 16
    gkd_lambda: float = 1.0
    demo_source: str = "expert"
    teacher_token_budget: int = 0
    temperature_end: float | None = None
    checkpoint_every: int = 5
    device: str = "auto"
    cpu_threads: int = 1
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    teacher_cfg: TeacherCfg = field(default_factory=TeacherCfg)
    loss_cfg: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    cold_start: ColdStartCfg = field(default_factory=ColdStartCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


@dataclass
class EvalConfig:
    env: str = "lookup-chain"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = "tiny"
    episodes: int = 50
    samples: int = 1
    temperature: float = 0.0
    seed: int = 0
    device: str = "auto"
    cpu_threads: int = 1
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    output: str | None = None


@dataclass
class DiagnoseConfig:
    env: str = "lookup-chain"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    student: str = "auto"
    teacher: str = "auto"
    episodes: int = 16
    seed: int = 0
    device: str = "auto"
    cpu_threads: int = 1
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    teacher_cfg: TeacherCfg = field(default_factory=TeacherCfg)


@dataclass
class CollectConfig:
    env: str = "lookup-chain"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = "expert"
    episodes: int = 100
    only_successful: bool = True
    seed: int = 0
    output: str = "teacher_episodes.jsonl"
    temperature: float = 1.0
    device: str = "auto"
    cpu_threads: int = 1
    rollout: RolloutCfg = field(default_factory=RolloutCfg)


SCHEMAS: dict[str, type] = {
    "train": TrainConfig,
    "eval": EvalConfig,
    "diagnose": DiagnoseConfig,
    "collect": CollectConfig,
}


def configs_dir() -> Path:
    """Where the packaged config groups live."""
    return Path(str(importlib.resources.files("agentopd.configs")))


def _all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, DictConfig) and not path.endswith("_kwargs"):
            keys.extend(_all_keys(v, path + "."))
    return keys


def _is_free_form(key: str) -> bool:
    return key.split(".", 1)[0].endswith("_kwargs")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` → ``[("a.b", "1"), ...]`` with a clear error for malformed items."""
    out = []
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r} (e.g. env=lookup-chain steps=10)")
        k, _, v = a.partition("=")
        if not k:
            raise ConfigError(f"empty key in {a!r}")
        out.append((k.strip(), v))
    return out


def compose(command: str, overrides: list[str] | None = None) -> DictConfig:
    """Build the config of ``command`` from defaults, group files and ``key=value`` overrides."""
    if command not in SCHEMAS:
        raise ConfigError(f"no config for command {command!r}; expected one of {sorted(SCHEMAS)}")
    cfg = OmegaConf.structured(SCHEMAS[command])
    base = configs_dir() / f"{command}.yaml"
    if base.exists():
        cfg = _merge(cfg, OmegaConf.load(base), str(base))
    pairs = parse_overrides(overrides or [])
    for key, value in pairs:
        if key in GROUPS and key in cfg:
            group_file = configs_dir() / key / f"{value}.yaml"
            if group_file.exists():
                cfg = _merge(cfg, OmegaConf.load(group_file), str(group_file))
    valid = _all_keys(cfg)
    for key, value in pairs:
        if key not in valid and not _is_free_form(key):
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            top = ", ".join(k for k in valid if "." not in k)
            raise ConfigError(
                f"unknown config key {key!r} for `agentopd {command}`.{hint} Valid top-level keys: {top}."
            )
        try:
            parsed = OmegaConf.from_dotlist([f"{key}={value}"])
            cfg = OmegaConf.merge(cfg, parsed)
        except OmegaConfBaseException as e:
            expected = _expected_type(command, key)
            raise ConfigError(
                f"bad value {value!r} for {key!r}: expected {expected}. ({e.msg if hasattr(e, 'msg') else e})"
            ) from None
    validate_names(cfg)
    return cfg


def _merge(cfg: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config file {source}: {e}") from None


def _expected_type(command: str, key: str) -> str:
    node: Any = SCHEMAS[command]
    for part in key.split("."):
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            return "a value"
        node = fields[part].type
    return str(node)


def validate_names(cfg: DictConfig) -> None:
    """Check registry names (env, curriculum, loss) and enumerated choices."""
    from agentopd import registry

    if "env" in cfg:
        registry.envs.spec(cfg.env)
    if "curriculum" in cfg:
        registry.curricula.spec(cfg.curriculum)
    if "loss" in cfg:
        from agentopd.losses import LOSSES

        if cfg.loss not in LOSSES:
            near = difflib.get_close_matches(cfg.loss, list(LOSSES), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"unknown loss {cfg.loss!r}.{hint} Valid losses: {', '.join(LOSSES)}."
            )
    choices = {
        "rollout.on_prefix_mismatch": ("error", "new-segment"),
        "loss_cfg.agg": ("token-mean", "seq-mean-token-mean"),
        "loss_cfg.support": ("teacher", "student"),
        "optim.schedule": ("constant", "cosine", "linear"),
        "optim.name": ("adamw", "sgd"),
        "demo_source": ("expert", "teacher"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            near = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"bad value {value!r} for {key!r}.{hint} Expected one of: {', '.join(allowed)}."
            )
