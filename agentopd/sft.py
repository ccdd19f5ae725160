"""Supervised fine-tuning on token-exact segments: the NLL of mask-1 tokens, packed.

This module owns the forward and backward pass of every SFT update: the cold start and the
GKD demonstration batches (:meth:`agentopd.learner.Learner.step_sft`), and the zoo's teacher
and base builds, which go through the same method. Position ``t`` predicts token ``t + 1``; a
token carries loss exactly when its mask is 1, so prompts, tool results and template tokens
never do. Each :class:`SftGroup` contributes ``weight * mean NLL`` over its mask-1 tokens
(``agg="token-mean"``) or over its sequences' token means (``agg="seq-mean-token-mean"``).

The packed pass (the default) saves three kinds of work, none of which changes the loss or the
gradient beyond float rounding (``tests/test_sft.py`` checks both against a padded forward):

- **Shared prefix.** Episodes of one environment start with the same long prompt (system
  message, tools block). :func:`prefix_to_share` finds it; it runs once with batch size 1 and
  its key/value cache is repeated for every row, with gradients flowing through it. It ends
  before the first position whose *next* token is trained, so no trained prediction is lost.
- **Packing.** The rest of each sequence is packed with others into rows as wide as the longest
  (:func:`pack_rows`), with a block-diagonal causal mask (a token sees its own sequence only)
  and positions that restart after the prefix.
- **Trained positions only.** The vocabulary projection runs only where a target is trained
  (through :func:`agentopd.logprobs.chunked_token_logprobs`, chunked over tokens).

``packed=False`` is the plain padded pass the learner ran before (every sequence right-padded,
log-probs at every position); it is kept as the reference for tests and
``benchmarks/cold_start_step.py``.

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

from agentopd import distributed, fsdp, logprobs, losses
from agentopd.types import Episode, Segment

MIN_SHARED_PREFIX = 8
"""A common prefix shorter than this is not worth its own forward pass (see
:func:`prefix_to_share`)."""

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


def pack_rows(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of ``lengths`` packed into rows as wide as the longest: first fit, longest first.

    Example::

        pack_rows([10, 3, 7, 4, 6, 1, 9]) == [[0], [6, 5], [2, 1], [4, 3]]
    """
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def prefix_to_share(segments: Sequence[Segment]) -> int:
    """Length of the prefix the packed pass runs once for all of ``segments``.

    The longest common token prefix that ends before any segment's first trained prediction
    (the position before its first mask-1 token), or 0 when that is shorter than
    :data:`MIN_SHARED_PREFIX` tokens.
    """
    first = segments[0].tokens
    n = min(len(s.tokens) for s in segments)
    for s in segments:
        if 1 in s.mask:
            n = min(n, s.mask.index(1) - 1)
        i = 0
        while i < n and s.tokens[i] == first[i]:
            i += 1
        n = i
    return n if n >= MIN_SHARED_PREFIX else 0


def pad_segments(
    segments: Sequence[Segment], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens_B_T, mask_B_T, attention_B_T)``: ``segments`` right-padded to the longest
    (mask and attention 0 on padding)."""
    width = max(len(s.tokens) for s in segments)
    tokens = torch.full((len(segments), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(segments), width), dtype=torch.long)
    attn = torch.zeros((len(segments), width), dtype=torch.long)
    for b, s in enumerate(segments):
        n = len(s.tokens)
        tokens[b, :n] = torch.tensor(s.tokens)
        mask[b, :n] = torch.tensor(s.mask)
        attn[b, :n] = 1
    return tokens, mask, attn


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
    pass_ = _packed_nll if packed else _padded_nll
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
                loss = passes(pass_, segs_, w, pad_id, chunk_size, device)
            (loss * (group.weight * scale)).backward()
            total += float(loss.detach()) * scale
        prefix = f"{group.name}_" if group.name else ""
        out[f"{prefix}loss"] = total
        out[f"{prefix}tokens"] = float(sum(counts))
    return out


def _padded_nll(
    model: Any,
    segs: list[Segment],
    weights: list[float],
    pad_id: int,
    chunk_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Right-padded rows, log-probs at every position (the reference pass)."""
    tokens_B_T, mask_B_T, attn_B_T = pad_segments(segs, pad_id)
    tokens_B_T, attn_B_T = tokens_B_T.to(device), attn_B_T.to(device)
    hidden_B_T_H = model.base_model(input_ids=tokens_B_T, attention_mask=attn_B_T).last_hidden_state
    weight_B_S = mask_B_T[:, 1:].float() * torch.tensor(weights)[:, None]
    B, S = weight_B_S.shape
    return _nll_at(
        model,
        hidden_B_T_H[:, :-1].reshape(B * S, -1),
        tokens_B_T[:, 1:].reshape(-1),
        weight_B_S.reshape(-1).to(device),
        chunk_size,
    )


def _packed_nll(
    model: Any,
    segs: list[Segment],
    weights: list[float],
    pad_id: int,
    chunk_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Shared prefix once, the rests packed into rows, log-probs at trained positions only.

    Under gradient checkpointing transformers drops the prefix's KV cache, and with a model
    sharded by :func:`agentopd.fsdp.shard` the prefix's keys and values would need a layer's
    weights after FSDP freed them (their gradient does not pass the layer's output, where FSDP
    gathers the weights again), so nothing is shared then: whole segments are packed (the same
    loss, more compute)."""
    keep_whole = getattr(model, "is_gradient_checkpointing", False) or fsdp.is_sharded(model)
    shared = 0 if keep_whole else prefix_to_share(segs)
    rests = [(s.tokens[shared:], s.mask[shared:]) for s in segs]
    width = max(len(t) for t, _ in rests)
    rows = pack_rows([len(t) for t, _ in rests])
    tokens_R_W = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets_R_W = torch.full((len(rows), width), -1, dtype=torch.long)
    weight_R_W = torch.zeros((len(rows), width))
    pos_R_W = torch.zeros((len(rows), width), dtype=torch.long)
    seg_R_W = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members):
            toks, mask = rests[i]
            n = len(toks)
            tokens_R_W[r, at : at + n] = torch.tensor(toks)
            # Position j predicts token j+1 of the same sequence. The first token of a rest is
            # predicted from the prefix, which prefix_to_share keeps free of trained targets.
            trained = torch.tensor(mask[1:]) > 0
            targets_R_W[r, at : at + n - 1] = torch.where(trained, torch.tensor(toks[1:]), -1)
            weight_R_W[r, at : at + n - 1] = trained.float() * weights[i]
            pos_R_W[r, at : at + n] = torch.arange(shared, shared + n)
            seg_R_W[r, at : at + n] = k
            at += n
    causal_W_W = torch.ones((width, width), dtype=torch.bool).tril()
    same_R_W_W = (seg_R_W[:, :, None] == seg_R_W[:, None, :]) & (seg_R_W[:, :, None] >= 0)
    # Unused row ends see themselves, so no attention row is empty (an empty one gives NaN).
    allowed_R_W_W = (causal_W_W & same_R_W_W) | torch.eye(width, dtype=torch.bool)
    kwargs: dict[str, Any] = {}
    if shared:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        prefix_1_P = torch.tensor([segs[0].tokens[:shared]], device=device)
        model.base_model(input_ids=prefix_1_P, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(rows))
        kwargs = {"past_key_values": cache, "use_cache": True}
        prefix_R_W_P = torch.ones((len(rows), width, shared), dtype=torch.bool)
        allowed_R_W_W = torch.cat([prefix_R_W_P, allowed_R_W_W], dim=2)
    hidden_R_W_H = model.base_model(
        input_ids=tokens_R_W.to(device),
        attention_mask=allowed_R_W_W[:, None].to(device),
        position_ids=pos_R_W.to(device),
        **kwargs,
    ).last_hidden_state
    trained_R_W = targets_R_W >= 0
    return _nll_at(
        model,
        hidden_R_W_H[trained_R_W.to(device)],
        targets_R_W[trained_R_W].to(device),
        weight_R_W[trained_R_W].to(device),
        chunk_size,
    )


def _nll_at(
    model: Any,
    hidden_N_H: torch.Tensor,
    target_N: torch.Tensor,
    weight_N: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """``sum_n weight_n * -log p(target_n)`` from final hidden states (weight 0: no loss)."""
    if hidden_N_H.shape[0] == 0:
        return hidden_N_H.sum() * 0.0
    head = model.get_output_embeddings()
    lp_N = logprobs.chunked_token_logprobs(
        hidden_N_H[None],
        head.weight,
        target_N[None],
        lm_head_bias_V=getattr(head, "bias", None),
        chunk_size=chunk_size,
    ).logprobs_B_T[0]
    return -torch.where(weight_N > 0, lp_N * weight_N, 0.0).sum()
