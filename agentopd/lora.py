"""LoRA through peft (optional extra ``agentopd[lora]``): the ``lora.*`` keys of ``agentopd train``.

With ``lora.r > 0`` the builder injects LoRA adapters into the student's ``target_modules``
(peft's ``inject_adapter_in_model``, so the student stays a plain transformers causal LM that the
learner, the SFT step and the ``hf`` engine use unchanged) and freezes every other parameter:
only the adapters train. What leaves the learner is always plain Hugging Face weights:

- :func:`engine_weights` is what the rollout engine receives after every update: the merged
  weights ``W + (alpha / r) B A`` under the base model's own parameter names (vLLM's
  ``load_weights`` maps them as for any checkpoint);
- :func:`save_pretrained` writes a checkpoint's ``model/`` as the merged model, which plain
  ``transformers`` loads (``agentopd eval model=<run dir>`` uses it), and ``adapter/`` with the
  adapters alone (peft's ``adapter_model.safetensors`` + ``adapter_config.json``);
- :func:`load_adapter` puts a saved adapter back (``resume=true``).

Without ``lora.r`` nothing here touches the model: :func:`engine_weights` is ``state_dict()``
and :func:`save_pretrained` is the model's own.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentopd.schema import ConfigError, knob

INSTALL_HINT = "lora.r > 0 needs peft: pip install 'agentopd[lora]' (or pip install peft)"
ADAPTER = "default"


@dataclass
class LoraConfig:
    """LoRA adapters on the student (``lora.*``); ``r = 0`` trains the full model."""

    r: int = knob(0, "adapter rank (0: no LoRA, full fine-tuning)", ge=0)
    alpha: float = knob(16.0, "scale numerator: the update is (alpha / r) B A", gt=0)
    dropout: float = knob(0.0, "dropout on the adapter input", ge=0, lt=1)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module names that get adapters (e.g. q_proj, v_proj, up_proj)"},
    )


def is_lora(model: Any) -> bool:
    """Whether ``model`` carries LoRA adapters injected by :func:`apply`."""
    return bool(getattr(model, "_agentopd_lora", False))


def apply(model: Any, config: LoraConfig) -> Any:
    """Inject adapters into ``model`` in place and freeze the rest; returns ``model``.

    Raises:
        ImportError: peft is not installed (with the install line).
        ConfigError: No module of ``model`` matches ``target_modules``.
    """
    if config.r <= 0:
        return model
    try:
        import peft
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in config.target_modules if t not in names]
    if missing or not config.target_modules:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise ConfigError(
            f"bad value {list(config.target_modules)} for 'lora.target_modules': the model has no "
            f"module named {missing}; its linear layers are {linear}"
        )
    peft_cfg = _peft_config(config)
    peft.inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model._agentopd_lora = True
    model._agentopd_lora_config = peft_cfg
    return model


def _lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def engine_weights(model: Any) -> dict[str, torch.Tensor]:
    """Plain Hugging Face weights of ``model``: merged ``W + (alpha / r) B A`` when it has
    adapters (names without peft's ``base_layer`` / ``lora_*`` parts), else ``state_dict()``."""
    if not is_lora(model):
        return model.state_dict()
    layers = _lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        name = key.replace(".base_layer.", ".")
        module = name.rsplit(".", 1)[0]
        if module in layers and name.endswith(".weight") and ".base_layer." in key:
            value = value + layers[module].get_delta_weight(ADAPTER).to(value.dtype)
        out[name] = value
    return out


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights alone (peft's naming)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def save_pretrained(model: Any, tokenizer: Any, path: Path) -> None:
    """Save ``model`` to ``path`` for plain transformers (merged when it has adapters), with
    the tokenizer; the adapters alone go to ``path.parent / "adapter"``."""
    path = Path(path)
    if not is_lora(model):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return
    from safetensors.torch import save_file

    model.save_pretrained(path, state_dict=engine_weights(model))
    tokenizer.save_pretrained(path)
    adapter = path.parent / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    model._agentopd_lora_config.save_pretrained(str(adapter))


def load_adapter(model: Any, path: Path) -> None:
    """Load adapters saved by :func:`save_pretrained` (``path`` = the ``adapter`` directory)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        result = set_peft_model_state_dict(
            model, load_file(str(Path(path) / "adapter_model.safetensors")), adapter_name=ADAPTER
        )
    except RuntimeError as e:  # shapes of another base model
        first = str(e).strip().splitlines()
        raise ValueError(
            f"adapter in {path} does not fit the model: {first[1] if len(first) > 1 else e}"
        ) from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter in {path} does not fit the model: unexpected {unexpected[:5]}")


def read_config(path: Path) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter directory written by :func:`save_pretrained`."""
    raw = json.loads((Path(path) / "adapter_config.json").read_text())
    return LoraConfig(
        r=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=sorted(raw["target_modules"]),
    )


@torch.no_grad()
def merge(model: Any) -> Any:
    """Fold the adapters of ``model`` into its weights (``W + (alpha / r) B A``) and put the
    plain linear layers back: the result is an ordinary transformers model, as fast as the base."""
    if not is_lora(model):
        return model
    for name, layer in _lora_layers(model).items():
        base = layer.get_base_layer()
        base.weight += layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    for p in model.parameters():
        p.requires_grad_(True)
    model._agentopd_lora = False
    return model


def load_merged(model: Any, path: Path) -> Any:
    """Load the adapter saved in ``path`` into ``model`` and merge it (see :func:`merge`).

    Raises:
        ValueError: The adapter does not fit the model (the message says which keys).
    """
    apply(model, read_config(path))
    load_adapter(model, path)
    return merge(model)


def adapter_base(path: Path) -> str | None:
    """The base model an adapter directory names (``base_model_name_or_path`` of its
    ``adapter_config.json``; None when it names none)."""
    raw = json.loads((Path(path) / "adapter_config.json").read_text())
    base = raw.get("base_model_name_or_path")
    return str(base) if base else None


def check_fits(model: Any, path: Path) -> None:
    """Check that the adapter in ``path`` fits ``model`` without loading either's weights:
    every adapted module exists in ``model`` as a linear layer and every ``lora_A`` /
    ``lora_B`` matrix has that layer's input / output size. ``model`` may live on the meta
    device (built from its config alone).

    Raises:
        ValueError: The first module that is missing or has another shape, with both shapes.
    """
    from safetensors import safe_open

    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise ValueError(f"{path} holds no adapter_model.safetensors")
    modules = dict(model.named_modules())
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
            head, _, tail = key.partition(".lora_")
            name = head.removeprefix("base_model.model.")
            layer = modules.get(name)
            layer = getattr(layer, "base_layer", layer)  # already adapted by another expert
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(
                    f"adapter in {path} does not fit the base model: it adapts {name!r}, which "
                    "the base model has no linear layer named"
                )
            shape = tuple(f.get_slice(key).get_shape())
            if tail.startswith("A") and shape[1] != layer.in_features:
                want = f"{layer.in_features} inputs"
            elif tail.startswith("B") and shape[0] != layer.out_features:
                want = f"{layer.out_features} outputs"
            else:
                continue
            raise ValueError(
                f"adapter in {path} does not fit the base model: {key} has shape {list(shape)} "
                f"but the base's {name} has {want} (an adapter trained on another base model?)"
            )


def load_experts(model: Any, adapters: dict[str, Path]) -> Any:
    """Load several saved adapters into ``model`` side by side, unmerged, each under its own
    name (peft), every weight frozen; :func:`use_expert` picks the one the forward pass applies.
    The base weights stay in memory once whatever the number of adapters.

    Raises:
        ImportError: peft is not installed.
        ValueError: An adapter does not fit the model.
    """
    try:
        import peft
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name, path in adapters.items():
        check_fits(model, path)
        c = read_config(path)
        peft_cfg = _peft_config(c)
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point
            warnings.simplefilter("ignore", UserWarning)
            peft.inject_adapter_in_model(peft_cfg, model, adapter_name=name)
        state = load_file(str(Path(path) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, state, adapter_name=name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def use_expert(model: Any, name: str) -> None:
    """Make adapter ``name`` (loaded by :func:`load_experts`) the one every adapted layer
    applies; layers that adapter does not touch run the base weights alone."""
    for layer in _lora_layers(model).values():
        if name in layer.lora_A:
            layer.set_adapter(name)
            for p in layer.parameters():
                p.requires_grad_(False)  # peft's set_adapter marks the active one trainable
        else:
            layer._active_adapter = []  # the base weights alone (peft skips unknown names too)


def _peft_config(config: Any) -> Any:
    """peft's ``LoraConfig`` for our adapter settings (anything with ``r``, ``alpha``,
    ``dropout`` and ``target_modules``)."""
    import peft

    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,  # a float alpha scales too
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
    )
