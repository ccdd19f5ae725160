"""One step's token sequences as a packed batch, and the one forward pass over it.

:class:`TokenBatch` holds sequences (segments, teacher requests) packed into rows as wide as
the longest, several to a row, each attending to itself only (a block-diagonal causal mask)
with positions that restart at its start; a prompt prefix common to all of them runs once
(batch size 1) and its key/value cache is repeated for every row. The *projected* positions
are those whose next token is a target (mask 1): the OPD learner's and the teacher's sampled
tokens, SFT's trained tokens. :func:`forward_logprobs` runs the decoder once over the rows and
the vocabulary projection (:func:`agentopd.logprobs.chunked_token_logprobs`) at the projected
positions only; the OPD learner's student pass, the ``hf`` teacher and SFT all go through it.

Packing changes nothing beyond float rounding: each token sees exactly the tokens it would see
in a right-padded row of its own (``tests/test_packed_batch.py`` checks values and gradients
against a dense forward, with sdpa and eager attention).

Example::

    batch = pack([seg.tokens for seg in segments], [seg.mask for seg in segments], pad_id=0)
    out, hidden_M_H = forward_logprobs(model, batch, topk=4, entropy=True)
    out.logprobs_B_T[0]   # [M]: log p(target) at the M mask-1 positions, in batch order
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agentopd import logprobs
from agentopd.types import TeacherScores

MIN_SHARED_PREFIX = 8
"""A common prefix shorter than this is not worth its own forward pass (see
:func:`shared_prefix`)."""


@dataclass
class TokenBatch:
    """Sequences packed into rows, with index maps between the rows and ``(sequence, position)``.

    Sequence ``b``'s tokens after the shared prefix (``P`` tokens) lie in row ``row_B[b]``,
    columns ``start_B[b]`` to ``start_B[b] + length_B[b]``. Position ``t`` of sequence ``b``
    predicts its token ``t + 1``; it is projected when ``mask_B_S[b, t]``. The ``M`` projected
    positions are ordered as ``mask_B_S.nonzero()`` (sequence by sequence, position ascending),
    which is the order of every ``_M`` tensor here and of :func:`forward_logprobs`'s outputs.
    """

    tokens_R_W: Tensor
    """Token ids of the rows (``pad_id`` in unused slots)."""
    positions_R_W: Tensor
    """Position id of each slot: its index in its own sequence, the prefix counted."""
    sequence_R_W: Tensor
    """Index ``b`` of the sequence in each slot; -1 in unused slots."""
    row_B: Tensor
    """Row of each sequence."""
    start_B: Tensor
    """Column of each sequence's first token after the prefix."""
    length_B: Tensor
    """Tokens of each sequence in its row (its length minus the prefix)."""
    prefix_P: Tensor
    """Tokens shared by every sequence, run once (empty: none)."""
    mask_B_S: Tensor
    """Bool: position ``t`` of sequence ``b`` is projected (its next token is a target)."""
    target_M: Tensor
    """The token each projected position predicts."""
    row_M: Tensor
    """Row of each projected position's hidden state."""
    col_M: Tensor
    """Column of each projected position's hidden state."""
    packed: bool = True
    """Several sequences share a row (a 4D block-diagonal mask); False: one a row, a 2D
    padding mask."""
    pad_id: int = 0
    """Fills unused slots."""
    turn_M: Tensor | None = None
    """Index of the assistant turn each target belongs to, when the sequences are episode
    segments (the learner's batches)."""
    teacher_logprobs_M: Tensor | None = None
    """Once scored (:meth:`with_teacher`): the teacher's log-prob of each target."""
    teacher_topk_ids_M_K: Tensor | None = None
    """Once scored: the teacher's top-k ids at each projected position."""
    teacher_topk_logprobs_M_K: Tensor | None = None
    """Once scored: the teacher's log-probs at ``teacher_topk_ids_M_K``."""
    teacher_entropy_M: Tensor | None = None
    """Once scored: the entropy of the teacher's distribution at each projected position."""
    teacher_hidden_M_H: Tensor | None = None
    """Once scored by a teacher that kept them: its final hidden states at each projected
    position (on the teacher's device)."""

    @property
    def sequence_M(self) -> Tensor:
        """Sequence of each projected position (with ``position_M``: the map back)."""
        return self.mask_B_S.nonzero()[:, 0]

    @property
    def position_M(self) -> Tensor:
        """Position (in its sequence) of each projected position."""
        return self.mask_B_S.nonzero()[:, 1]

    @property
    def projected(self) -> int:
        """``M``: how many positions are projected."""
        return int(self.target_M.shape[0])

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def with_teacher(self, scores: Sequence[TeacherScores], topk: int) -> TokenBatch:
        """The batch with the teacher's fields filled in from ``scores`` (one per sequence,
        covering exactly its mask-1 tokens), gathered into the ``M`` order in one step.

        Top-k rows are cut or padded to ``topk`` (ids 0, log-probs
        :data:`~agentopd.losses.LOG_FLOOR`). ``teacher_hidden_M_H`` is set only when every
        scored sequence's scores carry hidden states.

        Raises:
            ValueError: ``scores`` do not cover this batch's projected positions (stale
                scores, or scores of other sequences).
        """
        from agentopd.losses import LOG_FLOOR

        # A scored token at position 0 is in no mask_B_S: nothing predicts it.
        keep = [sc.positions_M >= 1 for sc in scores]
        position_M = np.concatenate([sc.positions_M[k] for sc, k in zip(scores, keep, strict=True)])
        count_B = torch.tensor([int(k.sum()) for k in keep])
        sequence_M, at_M = self.mask_B_S.cpu().nonzero().T
        if len(scores) != self.mask_B_S.shape[0] or not (
            torch.equal(torch.repeat_interleave(count_B), sequence_M)
            and torch.equal(torch.from_numpy(position_M), at_M + 1)
        ):
            raise ValueError(
                "the teacher's scores do not cover the batch's sampled tokens (stale scores?)"
            )

        def gather(name: str, pad: float = 0.0) -> Tensor:
            rows = [getattr(sc, name)[k] for sc, k in zip(scores, keep, strict=True)]
            if name.endswith("_K"):
                rows = [
                    np.pad(
                        r[:, :topk], ((0, 0), (0, max(0, topk - r.shape[1]))), constant_values=pad
                    )
                    for r in rows
                ]
            return torch.from_numpy(np.concatenate(rows))

        hidden = [
            sc.hidden_M_H[torch.from_numpy(k).to(sc.hidden_M_H.device)]
            for sc, k in zip(scores, keep, strict=True)
            if k.any() and sc.hidden_M_H is not None
        ]
        has_hidden = len(hidden) == sum(bool(k.any()) for k in keep) > 0
        return replace(
            self,
            teacher_logprobs_M=gather("logprobs_M"),
            teacher_topk_ids_M_K=gather("topk_ids_M_K"),
            teacher_topk_logprobs_M_K=gather("topk_logprobs_M_K", LOG_FLOOR),
            teacher_entropy_M=gather("entropy_M"),
            teacher_hidden_M_H=torch.cat(hidden) if has_hidden else None,
        )

    def scatter(self, value_1_M: Tensor) -> Tensor:
        """``[1, M(, K)]`` values at the projected positions as ``[B, S(, K)]``, zeros
        elsewhere."""
        full = value_1_M.new_zeros((*self.mask_B_S.shape, *value_1_M.shape[2:]))
        return full.index_put(tuple(self.mask_B_S.to(value_1_M.device).nonzero().T), value_1_M[0])

    def dense(self) -> tuple[Tensor, Tensor]:
        """``(input_ids_B_T, attention_B_T)``: the sequences right-padded, one a row (the plain
        layout, for references)."""
        sequences = []
        for b in range(self.row_B.shape[0]):
            start = int(self.start_B[b])
            rest = self.tokens_R_W[self.row_B[b], start : start + int(self.length_B[b])]
            sequences.append(torch.cat([self.prefix_P.to(rest.device), rest]).tolist())
        ids, _, attention = pad_right(sequences, None, self.pad_id)
        return ids, attention


def pad_right(
    sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]] | None, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(tokens_B_T, mask_B_T, attention_B_T)``: ``sequences`` (and their ``masks``; zeros
    without) right-padded to the longest, mask and attention 0 on padding."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, s in enumerate(sequences):
        tokens[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[b, : len(s)] = 1
        if masks is not None:
            mask[b, : len(s)] = torch.tensor(masks[b], dtype=torch.long)
    return tokens, mask, attention


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


def shared_prefix(sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]]) -> int:
    """Length of the prefix a batch of ``sequences`` runs once.

    The longest common token prefix that ends before any sequence's first projected position
    (the one before its first mask-1 token) and leaves every sequence a token, or 0 when that
    is shorter than :data:`MIN_SHARED_PREFIX` tokens.
    """
    first = sequences[0]
    n = min(len(s) for s in sequences) - 1
    for s, m in zip(sequences, masks, strict=True):
        if 1 in m:
            n = min(n, list(m).index(1) - 1)
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n if n >= MIN_SHARED_PREFIX else 0


def packs(model: Any) -> bool:
    """Whether ``model``'s attention honours a custom 4D mask (sdpa, eager, flex); flash
    attention does not, so its batches keep one sequence a row."""
    config = getattr(model, "config", None)
    return "flash" not in str(getattr(config, "_attn_implementation", "") or "")


def pack(
    sequences: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]],
    *,
    pad_id: int,
    packed: bool = True,
    share_prefix: bool = True,
) -> TokenBatch:
    """Build the :class:`TokenBatch` of ``sequences``.

    Args:
        sequences: Token ids, one list per sequence.
        masks: Per sequence, 1 on each token that is a target (the position before it is
            projected); a mask's first entry is ignored (nothing predicts token 0).
        pad_id: Fills unused slots.
        packed: Several sequences per row (:func:`pack_rows`); False: one a row, in order.
        share_prefix: Run the common prompt prefix once (:func:`shared_prefix`). Leave it off
            under gradient checkpointing or FSDP (the prefix's cache needs the layers' weights
            and activations after they are dropped).
    """
    P = shared_prefix(sequences, masks) if share_prefix else 0
    lengths = [len(s) - P for s in sequences]
    rows = pack_rows(lengths) if packed else [[b] for b in range(len(sequences))]
    R, W, B, S = len(rows), max(lengths), len(sequences), max(len(s) for s in sequences) - 1
    tokens_R_W = torch.full((R, W), pad_id, dtype=torch.long)
    positions_R_W = torch.zeros((R, W), dtype=torch.long)
    sequence_R_W = torch.full((R, W), -1, dtype=torch.long)
    row_B = torch.zeros(B, dtype=torch.long)
    start_B = torch.zeros(B, dtype=torch.long)
    mask_B_S = torch.zeros((B, S), dtype=torch.bool)
    for r, members in enumerate(rows):
        at = 0
        for b in members:
            n = lengths[b]
            tokens_R_W[r, at : at + n] = torch.tensor(sequences[b][P:], dtype=torch.long)
            positions_R_W[r, at : at + n] = torch.arange(P, P + n)
            sequence_R_W[r, at : at + n] = b
            row_B[b], start_B[b] = r, at
            at += n
    for b, m in enumerate(masks):
        if len(m) > 1:
            mask_B_S[b, : len(m) - 1] = torch.tensor(m[1:]) > 0
    seq_M, pos_M = mask_B_S.nonzero().T
    if bool((pos_M < P).any()):
        raise ValueError(f"a projected position lies in the shared prefix ({P} tokens)")
    target_M = torch.tensor([sequences[b][t + 1] for b, t in zip(seq_M.tolist(), pos_M.tolist())])
    return TokenBatch(
        tokens_R_W=tokens_R_W,
        positions_R_W=positions_R_W,
        sequence_R_W=sequence_R_W,
        row_B=row_B,
        start_B=start_B,
        length_B=torch.tensor(lengths, dtype=torch.long),
        prefix_P=torch.tensor(sequences[0][:P], dtype=torch.long),
        mask_B_S=mask_B_S,
        target_M=target_M.long(),
        row_M=row_B[seq_M],
        col_M=start_B[seq_M] + pos_M - P,
        packed=packed,
        pad_id=pad_id,
    )


def _attention_mask(model: Any, batch: TokenBatch) -> Tensor:
    """The rows' attention mask as the model's attention implementation takes it: 2D padding
    for unpacked rows; for packed rows a 4D ``[R, 1, W, P + W]`` block-diagonal causal one,
    boolean (sdpa, flex) or additive (eager adds it to the scores)."""
    valid_R_W = batch.sequence_R_W >= 0
    P = batch.prefix_P.shape[0]
    if not batch.packed:
        return torch.cat([valid_R_W.new_ones((valid_R_W.shape[0], P)), valid_R_W], 1).long()
    seq = batch.sequence_R_W
    W = seq.shape[1]
    causal_W_W = torch.ones((W, W), dtype=torch.bool, device=seq.device).tril()
    same_R_W_W = (seq[:, :, None] == seq[:, None, :]) & valid_R_W[:, :, None]
    # Unused row ends see themselves, so no attention row is empty (an empty one gives NaN).
    allowed = (causal_W_W & same_R_W_W) | torch.eye(W, dtype=torch.bool, device=seq.device)
    if P:
        allowed = torch.cat([allowed.new_ones((seq.shape[0], W, P)), allowed], dim=2)
    allowed = allowed[:, None]
    if getattr(model.config, "_attn_implementation", None) == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=seq.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def final_hidden(model: Any, batch: TokenBatch, autocast: torch.dtype | None = None) -> Tensor:
    """``[M, H]``: the decoder's final hidden states at the projected positions (the prefix
    once, then every row), under ``autocast`` when one is given."""
    device = batch.tokens_R_W.device
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    kwargs: dict[str, Any] = {}
    with context:
        if batch.prefix_P.numel():
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            model.base_model(input_ids=batch.prefix_P[None], past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(batch.tokens_R_W.shape[0])
            kwargs = {"past_key_values": cache, "use_cache": True}
        hidden_R_W_H = model.base_model(
            input_ids=batch.tokens_R_W,
            attention_mask=_attention_mask(model, batch),
            position_ids=batch.positions_R_W,
            **kwargs,
        ).last_hidden_state
    return hidden_R_W_H[batch.row_M, batch.col_M]


def forward_logprobs(
    model: Any,
    batch: TokenBatch,
    *,
    support_M_K: Tensor | None = None,
    topk: int = 0,
    entropy: bool = False,
    chunk_size: int = 1024,
    autocast: torch.dtype | None = None,
) -> tuple[logprobs.TokenLogprobs, Tensor]:
    """The one forward pass: decoder over the packed rows, then the chunked vocabulary
    projection at the ``M`` projected positions only.

    Args:
        model: A transformers causal LM (``base_model``, ``get_output_embeddings``), on the
            batch's device.
        batch: The sequences (:func:`pack`), on the model's device.
        support_M_K: Ids at which to also evaluate the model (e.g. the teacher's top-k).
        topk: Also return the model's own top-``topk`` ids and log-probs (0: not).
        entropy: Also return the entropy of the full distribution.
        chunk_size: Positions per chunk of the projection.
        autocast: Run the decoder (not the projection) under autocast to this dtype; an
            autocast around the call covers both.

    Returns:
        ``(token_logprobs, hidden_M_H)``: a :class:`~agentopd.logprobs.TokenLogprobs` of
        ``[1, M]`` / ``[1, M, K]`` tensors, and the final hidden states it projected.
    """
    hidden_M_H = final_hidden(model, batch, autocast)
    head = model.get_output_embeddings()
    out = logprobs.chunked_token_logprobs(
        hidden_M_H[None],
        head.weight,
        batch.target_M[None],
        lm_head_bias_V=getattr(head, "bias", None),
        chunk_size=chunk_size,
        topk_ids_B_T_K=None if support_M_K is None else support_M_K[None],
        student_topk=topk,
        return_entropy=entropy,
    )
    return out, hidden_M_H
