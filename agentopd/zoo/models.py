"""Model presets and the zoo's on-disk cache.

A *preset* is a named size of a standard ``transformers`` causal LM (``LlamaForCausalLM``) with
attention head size 64, so vLLM and other engines load it like any Llama checkpoint. A preset
name gives a fresh, deterministic random init. An *artifact* ``<preset>-<env>`` (for example
``tiny-teacher-lookup-chain``) is a preset trained by SFT on an environment's scripted expert
(:mod:`agentopd.zoo.bootstrap`) and cached in ``save_pretrained`` format under
:func:`cache_dir` (built on first use).

Cache location: ``$AGENTOPD_CACHE/zoo/<name>/``; ``AGENTOPD_CACHE`` defaults to
``$XDG_CACHE_HOME/agentopd`` or ``~/.cache/agentopd``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentopd.zoo.tokenizer import load_tokenizer

HEAD_DIM = 64


@dataclass(frozen=True)
class Preset:
    """The shape of one model preset."""

    name: str
    """Preset name (kebab-case)."""
    hidden_size: int
    """Residual width; ``num_heads * 64``."""
    num_layers: int
    """Transformer blocks."""
    intermediate_size: int
    """MLP width."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA); default: as many as query heads."""
    description: str = ""
    """One line describing the preset (its ``description`` in :func:`agentopd.zoo.list_models`)."""

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", 128, 2, 384, description="student: 2 heads, 2 layers"),
        Preset("tiny-teacher", 256, 4, 768, description="teacher: 4 heads, 4 layers"),
        Preset("small", 512, 8, 1536, num_kv_heads=4, description="8 heads (4 kv), 8 layers"),
    ]
}


def model_config(preset: str | Preset) -> LlamaConfig:
    """The ``LlamaConfig`` of a preset, with the zoo tokenizer's vocabulary and special ids."""
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    tok = load_tokenizer()
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads or p.num_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        # transformers 5 reads the legacy key into rope_parameters; 4.x has only this key
        rope_theta=10_000.0,  # type: ignore[call-arg]
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
    )


def get_preset(name: str) -> Preset:
    """The preset called ``name``; unknown names list the valid ones."""
    if name not in PRESETS:
        import difflib

        near = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise KeyError(f"unknown model preset {name!r}.{hint} Valid presets: {', '.join(PRESETS)}.")
    return PRESETS[name]


def build_model(preset: str, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model of ``preset``; the same seed gives the same weights."""
    config = model_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


def num_params(model_or_preset: Any) -> int:
    """Unique parameters (tied embeddings counted once) of a model or a preset name."""
    if isinstance(model_or_preset, str):
        with torch.device("meta"):
            model_or_preset = LlamaForCausalLM(model_config(model_or_preset))
    seen: set[int] = set()
    total = 0
    for p in model_or_preset.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def cache_root() -> Path:
    """``$AGENTOPD_CACHE`` (default ``$XDG_CACHE_HOME/agentopd`` or ``~/.cache/agentopd``)."""
    env = os.environ.get("AGENTOPD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "agentopd"


def cache_dir(name: str) -> Path:
    """Where the built artifact ``name`` lives (``<cache_root>/zoo/<name>``)."""
    return cache_root() / "zoo" / name


def is_built(path: Path) -> bool:
    """Whether ``path`` holds a complete ``save_pretrained`` checkpoint."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
