"""Depth pruning: a model that keeps only some of its decoder layers (``<model>@layers=0,1,3``).

Compression by distillation often starts the student from its teacher with layers removed
(Minitron, Sheared-LLaMA): the pruned model keeps most of what the teacher knows, and
distillation recovers what the removed layers did. Any model name accepted by
:func:`agentopd.zoo.load` takes the suffix ``@layers=<i,j,...>``: the model is loaded, then every
decoder layer not listed is dropped (0-based, ascending, no repeats). The embeddings, the final
norm and the output head are kept. Works for decoder models that keep their blocks in
``model.model.layers`` (Llama, Qwen2/3, Mistral and the zoo's models).

Example::

    from agentopd import zoo
    student, tok = zoo.load("tiny-teacher-code-sandbox@layers=0,1,3")   # 3 of its 4 layers
"""

from __future__ import annotations

from typing import Any

import torch

SUFFIX = "@layers="


def split_name(name: str) -> tuple[str, list[int] | None]:
    """``"m@layers=0,2"`` → ``("m", [0, 2])``; a name without the suffix → ``(name, None)``.

    Raises:
        ValueError: The layer list is not ascending, non-negative, distinct integers.
    """
    base, sep, spec = name.rpartition(SUFFIX)
    if not sep:
        return name, None
    if not base:
        raise ValueError(f"{name!r}: expected <model>{SUFFIX}<i,j,...>; the model name is empty")
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"{name!r}: expected {SUFFIX} followed by comma-separated layer indices, "
            f"e.g. {base}{SUFFIX}0,1,3; got {spec!r}"
        ) from None
    if any(i < 0 for i in layers) or any(a >= b for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(
            f"{name!r}: layer indices must be ascending, distinct and >= 0, "
            f"e.g. {base}{SUFFIX}{','.join(str(i) for i in sorted({abs(i) for i in layers}))}"
        )
    return base, layers


def keep_layers(model: Any, layers: list[int], name: str = "model") -> Any:
    """Keep only ``layers`` of ``model``'s decoder blocks, in place; returns ``model``.

    Raises:
        ValueError: The model has no ``model.layers`` list, or an index is out of range.
    """
    decoder: Any = getattr(model, "model", None)
    blocks = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(
            f"{name}: cannot prune {type(model).__name__}: its decoder blocks are not in "
            "model.model.layers (Llama/Qwen-style models only)"
        )
    n = len(blocks)
    if layers[-1] >= n:
        raise ValueError(
            f"{name}: layer {layers[-1]} does not exist; the model has {n} layers (0..{n - 1})"
        )
    decoder.layers = torch.nn.ModuleList(blocks[i] for i in layers)
    for j, block in enumerate(decoder.layers):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j  # the KV cache is indexed by position in the new stack
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return model
