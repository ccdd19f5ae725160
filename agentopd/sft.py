"""Supervised fine-tuning on token-exact segments: the NLL of mask-1 tokens, packed.

This module owns the forward and backward pass of every SFT update: the cold start and the
GKD demonstration batches (:meth:`agentopd.learner.Learner.step_sft`), and the zoo's teacher
and base builds, which go through the same method. Position ``t`` predicts token ``t + 1``; a
token carries loss exactly when its mask is 1, so prompts, tool results and template tokens
never do. Each :class:`SftGroup` contributes ``weight * mean NLL`` over its mask-1 tokens
(``agg="token-mean"``) or over its sequences' token means (``agg="seq-mean-token-mean"``).

The pass is the one every consumer shares, :func:`agentopd.batch.forward_logprobs` on a
:class:`agentopd.batch.TokenBatch`; packed (the default), it saves three kinds of work, none of
which changes the loss or the gradient beyond float rounding (``tests/test_sft.py`` checks both
against a padded forward):

- **Shared prefix.** Episodes of one environment start with the same long prompt (system
  message, tools block). :func:`prefix_to_share` finds it; it runs once with batch size 1 and
  its key/value cache is repeated for every row, with gradients flowing through it. It ends
  before the first position whose *next* token is trained, so no trained prediction is lost.
- **Packing.** The rest of each sequence is packed with others into rows as wide as the longest
  (:func:`pack_rows`), with a block-diagonal causal mask (a token sees its own sequence only)
  and positions that restart after the prefix.
- **Trained positions only.** The vocabulary projection runs only where a target is trained
  (through :func:`agentopd.logprobs.chunked_token_logprobs`, chunked over tokens).

``packed=False`` keeps one sequence a row, right-padded, and shares no prefix (the plain layout;
a reference for tests and ``benchmarks/cold_start_step.py``).

Example::

    from agentopd.sft import SftGroup, backward

    model.zero_grad()
    metrics = backward(model, [SftGroup(episodes)], pad_id=tokenizer.pad_token_id)
    optimizer.step()   # metrics: {"loss": ..., "tokens": ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agentopd import batch, distributed, fsdp, losses
from agentopd.batch import MIN_SHARED_PREFIX as MIN_SHARED_PREFIX
from agentopd.batch import pack_rows as pack_rows
from agentopd.types import Episode, Segment

BF16_MODES = ("cuda", "auto", "on", "off")
"""``cuda``: bfloat16 autocast on CUDA only; ``auto``: wherever the device runs bfloat16
natively (CUDA, or a CPU with AVX512-BF16/AMX); ``on``: always; ``off``: never."""


@dataclass
class SftGroup:
    """Episodes trained under one mean: the group adds ``weight`` times its mean NLL.

    Example::

        drills = SftGroup(copy_episodes, weight=0.5, name="copy")
        learner.step_sft(expert_episodes, extra=[drills])   # logs learner/copy_loss
    """

    episodes: Sequence[Episode]
    """Every segment of these episodes with a mask-1 token after its first is trained."""
    weight: float = 1.0
    """Multiplier of this group's mean NLL in the total loss."""
    name: str = ""
    """Prefix of the group's metrics (``<name>_loss``, ``<name>_tokens``); ``""`` for the main
    group (``loss``, ``tokens``)."""


def trained_segments(episodes: Sequence[Episode]) -> list[Segment]:
    """The segments of ``episodes`` that hold a trained target (a mask-1 token after the first),
    in order."""
    return [seg for ep in episodes for seg in ep.segments if any(seg.mask[1:])]


def bf16_enabled(mode: str, device: torch.device) -> bool:
    """Whether SFT forwards on ``device`` run under bfloat16 autocast (see :data:`BF16_MODES`).

    Raises:
        ValueError: ``mode`` is not one of :data:`BF16_MODES`.
    """
    if mode not in BF16_MODES:
        raise ValueError(f"bf16 mode must be one of {', '.join(BF16_MODES)}; got {mode!r}")
    if mode in ("on", "off"):
        return mode == "on"
    if device.type == "cuda":
        return mode == "cuda" or torch.cuda.is_bf16_supported()
    if device.type == "cpu" and mode == "auto":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def prefix_to_share(segments: Sequence[Segment]) -> int:
    """Length of the prefix the packed pass runs once for all of ``segments``
    (:func:`agentopd.batch.shared_prefix`)."""
    return batch.shared_prefix([s.tokens for s in segments], [s.mask for s in segments])


def pad_segments(
    segments: Sequence[Segment], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens_B_T, mask_B_T, attention_B_T)``: ``segments`` right-padded to the longest
    (mask and attention 0 on padding)."""
    return batch.pad_right([s.tokens for s in segments], [s.mask for s in segments], pad_id)


def backward(
    model: Any,
    groups: Sequence[SftGroup],
    *,
    pad_id: int,
    agg: str = "token-mean",
    micro_batch: int = 64,
    chunk_size: int = 1024,
    bf16: bool = False,
    packed: bool = True,
) -> dict[str, float]:
    """Accumulate into ``.grad`` the gradient of ``sum_g weight_g * NLL_g`` over ``groups``.

    Each group's segments go through the model ``micro_batch`` at a time, in order; per-token
    weights make the sum over micro-batches exactly the group's ``agg`` mean, so the gradient
    does not depend on ``micro_batch``. Nothing is zeroed or stepped here. Under ``torchrun``
    each rank passes its shard of every group and the means are over all ranks' shards
    (:func:`agentopd.distributed.all_sum`), so summing the ranks' gradients gives the gradient
    of the whole batch; every rank must call this with the same number of groups. With a model
    sharded by :func:`agentopd.fsdp.shard` every pass is a collective: a rank with fewer
    micro-batches in a group runs dummy passes (loss times 0) until it ran as many as the most.

    Args:
        model: A transformers causal LM (``base_model`` and ``get_output_embeddings``), or an
            :class:`agentopd.fsdp.Passes` around one (each pass runs as its forward).
        groups: The episodes to train on, with their weights.
        pad_id: Fills padding; never trained on.
        agg: ``"token-mean"`` or ``"seq-mean-token-mean"`` (see :mod:`agentopd.losses`).
        micro_batch: Segments per forward/backward pass.
        chunk_size: Tokens per chunk of the vocabulary projection.
        bf16: Run the forward under bfloat16 autocast (see :func:`bf16_enabled`).
        packed: The packed pass (module docstring); False: the padded reference pass.

    Returns:
        Per group ``<name>_loss`` (its mean NLL, before ``weight``) and ``<name>_tokens`` (its
        trained tokens); the main group (``name=""``) as ``loss`` and ``tokens``.

    Raises:
        ValueError: On an unknown ``agg`` or a ``micro_batch`` below 1.
    """
    if agg not in losses.AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {losses.AGGREGATIONS}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    passes = fsdp.passes_of(model)
    sharded = fsdp.is_sharded(passes)
    device = next(passes.parameters()).device
    out: dict[str, float] = {}
    for group in groups:
        segs = trained_segments(group.episodes)
        counts = [sum(s.mask[1:]) for s in segs]
        # Under torchrun ``group`` is this rank's shard: normalise by counts over all shards.
        if agg == "token-mean":
            weights = [1.0 / max(1, distributed.all_sum(sum(counts)))] * len(segs)
        else:
            n_segs = distributed.all_sum(len(segs))
            weights = [1.0 / (n_segs * n) for n in counts]
        total = 0.0
        starts = list(range(0, len(segs), micro_batch))
        # Sharded, every pass is a collective: as many on every rank (the extra ones train on
        # nothing; their loss is multiplied by 0).
        passes_run = int(distributed.all_max(len(starts))) if sharded else len(starts)
        for j in range(passes_run):
            if j < len(starts):
                part = slice(starts[j], starts[j] + micro_batch)
                segs_, w, scale = segs[part], weights[part], 1.0
            else:
                segs_, w, scale = [Segment(tokens=[pad_id, pad_id], mask=[0, 1])], [0.0], 0.0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = passes(_nll, segs_, w, pad_id, chunk_size, device, packed)
            (loss * (group.weight * scale)).backward()
            total += float(loss.detach()) * scale
        prefix = f"{group.name}_" if group.name else ""
        out[f"{prefix}loss"] = total
        out[f"{prefix}tokens"] = float(sum(counts))
    return out


def _nll(
    model: Any,
    segs: list[Segment],
    weights: list[float],
    pad_id: int,
    chunk_size: int,
    device: torch.device,
    packed: bool,
) -> torch.Tensor:
    """``sum_n weight_n * -log p(target_n)`` over the trained tokens: the segments as one
    :class:`~agentopd.batch.TokenBatch` through :func:`agentopd.batch.forward_logprobs`.

    Under gradient checkpointing transformers drops the prefix's KV cache, and with a model
    sharded by :func:`agentopd.fsdp.shard` the prefix's keys and values would need a layer's
    weights after FSDP freed them (their gradient does not pass the layer's output, where FSDP
    gathers the weights again), so nothing is shared then: whole segments are packed (the same
    loss, more compute)."""
    keep_whole = getattr(model, "is_gradient_checkpointing", False) or fsdp.is_sharded(model)
    tb = batch.pack(
        [s.tokens for s in segs],
        [s.mask for s in segs],
        pad_id=pad_id,
        packed=packed and batch.packs(model),
        share_prefix=packed and not keep_whole,
    ).to(device)
    out, hidden_M_H = batch.forward_logprobs(model, tb, chunk_size=chunk_size)
    if tb.projected == 0:
        return hidden_M_H.sum() * 0.0
    weight_M = torch.tensor(weights, device=device)[tb.sequence_M]
    return -torch.where(weight_M > 0, out.logprobs_B_T[0] * weight_M, 0.0).sum()
