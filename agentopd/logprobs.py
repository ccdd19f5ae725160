"""Per-token log-probs from final hidden states, chunked over tokens: the output-layer kernel.

:func:`chunked_token_logprobs` turns final hidden states into per-token log-probs (the target
token's, those at an arbitrary support such as the teacher's top-k, the model's own top-k, the
entropy) without ever materialising the whole ``[tokens x vocab]`` float32 logits, in the
forward *or* the backward pass (a custom autograd function recomputes one chunk at a time).
The OPD learner, SFT and the in-process teacher all project through it.

:func:`chunked_divergence` is its two-model counterpart: the exact reverse KL, forward KL or
generalised JSD between the student's and an in-process teacher's *full* next-token
distributions at given positions, both heads projected one chunk of positions at a time (the
full-vocabulary objectives and the ``diag/true_rkl`` metric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def at_least_f32(x: Tensor) -> Tensor:
    """``x`` in float32, or kept in its own dtype when that is wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


CHUNK_LOGITS = 1 << 25
"""At most this many logits (32 Mi: 128 MiB in float32) in one chunk: ``chunk_size`` positions,
fewer when the vocabulary is large (220 positions at Qwen3's 151,936), so a chunk's buffers stay
bounded whatever the vocabulary. Chunking changes values by float rounding only (each position
is computed on its own; only the matmul's blocking differs)."""


@dataclass
class TokenLogprobs:
    """Per-token student quantities returned by :func:`chunked_token_logprobs`.

    All float tensors are float32 (float64 for float64 inputs) and differentiable w.r.t. the hidden states and lm_head.
    """

    logprobs_B_T: Tensor
    """log p(target) at each position."""
    support_logprobs_B_T_K: Tensor | None = None
    """log p at the caller's ids (e.g. the teacher's top-k), if ``topk_ids_B_T_K`` was given."""
    topk_ids_B_T_K: Tensor | None = None
    """The student's own top-``student_topk`` ids (int64), if ``student_topk > 0``."""
    topk_logprobs_B_T_K: Tensor | None = None
    """The student's log-probs at its own top-``student_topk`` ids."""
    entropy_B_T: Tensor | None = None
    """Entropy of the full student distribution (nats), if ``return_entropy``."""
    divergence_B_T: Tensor | None = None
    """The full-vocabulary objective's per-token divergence to the teacher (with grad), when
    the learner's pass computed one (:func:`chunked_divergence`)."""
    reverse_kl_B_T: Tensor | None = None
    """The exact per-token reverse KL(p || q) to the teacher (no grad), when the pass had the
    teacher's hidden states."""


def _chunk_logits(
    hidden_C_H: Tensor,
    weight_V_H: Tensor,
    bias_V: Tensor | None,
    temperature: float,
    buffer_C_V: Tensor,
) -> Tensor:
    """One chunk's logits in at least float32, written into (a prefix of) ``buffer_C_V``."""
    logits = torch.mm(hidden_C_H, weight_V_H.T, out=buffer_C_V[: hidden_C_H.shape[0]])
    if bias_V is not None:
        logits.add_(bias_V)
    logits = at_least_f32(logits)
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


class _HeadGrads:
    """The gradients of an output head's inputs (final hidden states, weight, bias), the ones
    autograd asks for, accumulated chunk by chunk in ``acc`` (at least float32) and returned in
    the inputs' own dtypes: the shared tail of both hand-written backward passes."""

    def __init__(
        self,
        ctx: Any,
        hidden_N_H: Tensor,
        weight_V_H: Tensor,
        bias_V: Tensor | None,
        acc: torch.dtype,
    ):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (N, H), V = hidden_N_H.shape, weight_V_H.shape[0]
        self.inputs = (hidden_N_H, weight_V_H, bias_V)
        self.hidden_N_H = hidden_N_H.new_zeros(N, H, dtype=acc) if need_h else None
        self.weight_V_H = weight_V_H.new_zeros(V, H, dtype=acc) if need_w else None
        self.bias_V = weight_V_H.new_zeros(V, dtype=acc) if need_b else None

    def add(self, s: int, e: int, grad_C_V: Tensor, hidden_C_H: Tensor, weight_V_H: Tensor) -> None:
        """Positions ``s`` to ``e``: their gradient w.r.t. the logits (``grad_C_V``, in
        ``acc``) through the chunk's hidden states and the weight (in the compute dtype)."""
        grad_c = grad_C_V.to(hidden_C_H.dtype)
        if self.hidden_N_H is not None:
            self.hidden_N_H[s:e] = grad_c @ weight_V_H
        if self.weight_V_H is not None and grad_c.dtype == self.weight_V_H.dtype:
            self.weight_V_H.addmm_(grad_c.T, hidden_C_H)
        elif self.weight_V_H is not None:
            self.weight_V_H += (grad_c.T @ hidden_C_H).to(self.weight_V_H.dtype)
        if self.bias_V is not None:
            self.bias_V += grad_C_V.sum(0)

    def result(self, others: int) -> tuple[Tensor | None, ...]:
        """``backward``'s return value: the three gradients, then ``others`` Nones."""
        hidden, weight, bias = self.inputs
        return (
            None if self.hidden_N_H is None else self.hidden_N_H.to(hidden.dtype),
            None if self.weight_V_H is None else self.weight_V_H.to(weight.dtype),
            None if self.bias_V is None or bias is None else self.bias_V.to(bias.dtype),
            *((None,) * others),
        )


class _ChunkedLogprobs(torch.autograd.Function):
    """Chunked log-softmax statistics with a hand-written, chunk-recomputing backward.

    Forward keeps only the per-token log-normaliser (and entropy); backward recomputes one
    chunk's logits at a time and forms ``d/dlogits`` analytically:
    ``sum_j g_j (e_{id_j} - p) - g_H p (log p + H)`` for the gathered log-probs and entropy.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden_N_H: Tensor,
        weight_V_H: Tensor,
        bias_V: Tensor | None,
        target_N: Tensor,
        support_N_K: Tensor,
        chunk_size: int,
        temperature: float,
        student_topk: int,
        return_entropy: bool,
        compute_dtype: torch.dtype,
    ) -> tuple[Tensor, ...]:
        N, V = hidden_N_H.shape[0], weight_V_H.shape[0]
        out_dtype = torch.promote_types(compute_dtype, torch.float32)
        h, w = hidden_N_H.to(compute_dtype), weight_V_H.to(compute_dtype)
        b = None if bias_V is None else bias_V.to(compute_dtype)
        new = hidden_N_H.new_empty
        target_lp = new(N, dtype=out_dtype)
        lse = new(N, dtype=out_dtype)
        support_lp = new(N, support_N_K.shape[1], dtype=out_dtype)
        topk_lp = new(N, student_topk, dtype=out_dtype)
        topk_ids = new(N, student_topk, dtype=torch.long)
        entropy = new(N if return_entropy else 0, dtype=out_dtype)
        buffer = new(min(chunk_size, N), V, dtype=compute_dtype)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            logits = _chunk_logits(h[s:e], w, b, temperature, buffer)
            lse_c = torch.logsumexp(logits, -1)
            lse[s:e] = lse_c
            target_lp[s:e] = logits.gather(-1, target_N[s:e, None]).squeeze(-1) - lse_c
            if support_N_K.shape[1]:
                support_lp[s:e] = logits.gather(-1, support_N_K[s:e]) - lse_c[:, None]
            if student_topk:
                values, ids = logits.topk(student_topk, -1)
                topk_lp[s:e], topk_ids[s:e] = values - lse_c[:, None], ids
            if return_entropy:
                logprobs = logits.sub_(lse_c[:, None])
                entropy[s:e] = -(logprobs.exp() * logprobs).sum(-1)
        ctx.save_for_backward(
            hidden_N_H, weight_V_H, bias_V, target_N, support_N_K, topk_ids, lse, entropy
        )
        ctx.config = (chunk_size, temperature, compute_dtype)
        ctx.mark_non_differentiable(topk_ids)
        ctx.set_materialize_grads(False)
        return target_lp, support_lp, topk_ids, topk_lp, entropy

    @staticmethod
    def backward(
        ctx: Any,
        g_target: Tensor | None,
        g_support: Tensor | None,
        _g_topk_ids: Tensor | None,
        g_topk: Tensor | None,
        g_entropy: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        hidden_N_H, weight_V_H, bias_V, target_N, support_N_K, topk_ids, lse, entropy = (
            ctx.saved_tensors
        )
        chunk_size, temperature, compute_dtype = ctx.config
        N, V = hidden_N_H.shape[0], weight_V_H.shape[0]
        acc = lse.dtype
        h, w = hidden_N_H.to(compute_dtype), weight_V_H.to(compute_dtype)
        b = None if bias_V is None else bias_V.to(compute_dtype)
        grads = _HeadGrads(ctx, hidden_N_H, weight_V_H, bias_V, acc)
        if g_support is not None and not support_N_K.shape[1]:
            g_support = None
        if g_topk is not None and not topk_ids.shape[1]:
            g_topk = None
        if g_entropy is not None and not entropy.numel():
            g_entropy = None
        buffer = hidden_N_H.new_empty(min(chunk_size, N), V, dtype=compute_dtype)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            logprobs = _chunk_logits(h[s:e], w, b, temperature, buffer).sub_(lse[s:e, None])
            # coefficient of -p in d/dlogits: the sum of upstream grads of gathered log-probs
            coef = torch.zeros(e - s, dtype=acc, device=lse.device)
            for g in (g_target, g_support, g_topk):
                if g is not None:
                    coef += g[s:e] if g.dim() == 1 else g[s:e].sum(-1)
            if g_entropy is not None:
                p = logprobs.exp()
                logprobs.add_(entropy[s:e, None]).mul_(g_entropy[s:e, None]).add_(coef[:, None])
                grad = p.mul_(logprobs).neg_()
            else:
                grad = logprobs.exp_().mul_(-coef[:, None])
            if g_target is not None:
                grad.scatter_add_(1, target_N[s:e, None], g_target[s:e, None].to(acc))
            if g_support is not None:
                grad.scatter_add_(1, support_N_K[s:e], g_support[s:e].to(acc))
            if g_topk is not None:
                grad.scatter_add_(1, topk_ids[s:e], g_topk[s:e].to(acc))
            if temperature != 1.0:
                grad.div_(temperature)
            grads.add(s, e, grad, h[s:e], w)
        return grads.result(7)


def chunked_token_logprobs(
    hidden_B_T_H: Tensor,
    lm_head_weight_V_H: Tensor,
    target_ids_B_T: Tensor,
    *,
    lm_head_bias_V: Tensor | None = None,
    chunk_size: int = 1024,
    topk_ids_B_T_K: Tensor | None = None,
    student_topk: int = 0,
    return_entropy: bool = False,
    temperature: float = 1.0,
) -> TokenLogprobs:
    """Student log-probs from final hidden states, one chunk of tokens at a time.

    The ``B*T`` tokens are flattened and processed ``chunk_size`` at a time through one reused
    ``chunk_size x V`` buffer, so the full ``[tokens x vocab]`` logits never exist. A custom
    autograd function keeps only each token's log-normaliser (and entropy) for backward, which
    recomputes one chunk's logits at a time and writes ``d/dlogits`` analytically into the same
    kind of buffer (the cost is one extra lm_head matmul, like activation checkpointing).
    Log-softmax runs in at least float32; under autocast the matmuls use the autocast dtype
    (e.g. bf16) and gradients accumulate in float32. Double backward is not supported.

    Args:
        hidden_B_T_H: Final hidden states (after the last norm), any float dtype.
        lm_head_weight_V_H: Output projection weight.
        target_ids_B_T: Token whose log-prob is wanted at each position (usually the next token).
        lm_head_bias_V: Optional output projection bias.
        chunk_size: Tokens per chunk, at most; capped so that one chunk holds at most
            :data:`CHUNK_LOGITS` logits. Smaller saves memory; very small chunks cost time.
        topk_ids_B_T_K: Optional ids at which to also evaluate the student, e.g. the teacher's
            top-k (this is how the student's log-probs on the teacher's support are gathered).
        student_topk: If > 0, also return the student's own top-``student_topk`` ids and
            log-probs.
        return_entropy: Also return the entropy of the full student distribution.
        temperature: Logits are divided by this before the softmax.

    Returns:
        A :class:`TokenLogprobs`; tensors have shapes ``[B, T]`` or ``[B, T, K]``.

    Raises:
        ValueError: On a non-positive ``chunk_size`` or ``temperature``, or mismatched shapes.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, H = hidden_B_T_H.shape
    if target_ids_B_T.shape != (B, T):
        raise ValueError(
            f"target_ids_B_T has shape {tuple(target_ids_B_T.shape)}, expected {(B, T)} "
            "to match hidden_B_T_H"
        )
    if topk_ids_B_T_K is not None and topk_ids_B_T_K.shape[:2] != (B, T):
        raise ValueError(
            f"topk_ids_B_T_K has shape {tuple(topk_ids_B_T_K.shape)}, expected ({B}, {T}, K)"
        )
    device = hidden_B_T_H.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden_B_T_H.dtype, lm_head_weight_V_H.dtype)
    N = B * T
    if topk_ids_B_T_K is None:
        support_N_K = target_ids_B_T.new_zeros(N, 0, dtype=torch.long)
    else:
        support_N_K = topk_ids_B_T_K.reshape(N, -1).long()
    with torch.autocast(device, enabled=False):
        target_lp, support_lp, topk_ids, topk_lp, entropy = _ChunkedLogprobs.apply(
            hidden_B_T_H.reshape(N, H),
            lm_head_weight_V_H,
            lm_head_bias_V,
            target_ids_B_T.reshape(N).long(),
            support_N_K,
            max(1, min(chunk_size, CHUNK_LOGITS // lm_head_weight_V_H.shape[0])),
            temperature,
            student_topk,
            return_entropy,
            compute_dtype,
        )
    out = TokenLogprobs(logprobs_B_T=target_lp.reshape(B, T))
    if topk_ids_B_T_K is not None:
        out.support_logprobs_B_T_K = support_lp.reshape(B, T, -1)
    if student_topk > 0:
        out.topk_ids_B_T_K = topk_ids.reshape(B, T, student_topk)
        out.topk_logprobs_B_T_K = topk_lp.reshape(B, T, student_topk)
    if return_entropy:
        out.entropy_B_T = entropy.reshape(B, T)
    return out


# --------------------------------------------------------------------------------------------
# Exact full-vocabulary divergence between two models' next-token distributions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer as the divergence kernel applies it:
    ``logits = softcap(scale * (h @ weight.T + bias))``, with
    ``softcap(x) = c * tanh(x / c)`` when ``softcap = c`` is set."""

    weight_V_H: Tensor
    """Output projection weight (``[vocab, hidden]``)."""
    bias_V: Tensor | None = None
    """Output projection bias, if the model has one."""
    scale: float = 1.0
    """Logits are multiplied by this (Cohere's ``logit_scale``; ``1 / logits_scaling`` for
    Granite)."""
    softcap: float | None = None
    """Final-logit soft-capping (Gemma 2's ``final_logit_softcapping``)."""

    @property
    def vocab(self) -> int:
        """Rows of the projection: the size of the distribution."""
        return int(self.weight_V_H.shape[0])


def output_head(model: Any) -> OutputHead:
    """The :class:`OutputHead` of a transformers causal LM (its ``get_output_embeddings()``
    plus the logit scaling and soft-capping its config declares)."""
    head = model.get_output_embeddings()
    config = model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    divide = getattr(config, "logits_scaling", None)
    if divide:
        scale /= float(divide)
    cap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(head.weight, getattr(head, "bias", None), scale, float(cap) if cap else None)


def _head_logits(
    hidden_C_H: Tensor,
    weight_V_H: Tensor,
    bias_V: Tensor | None,
    scale: float,
    softcap: float | None,
    buffer_C_V: Tensor,
) -> Tensor:
    """One chunk's final logits (scaled, soft-capped) in at least float32."""
    logits = _chunk_logits(hidden_C_H, weight_V_H, bias_V, 1.0, buffer_C_V)
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _divergences(
    student_lp_C_V: Tensor, teacher_lp_C_V: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per row: the objective ``JSD_beta`` (beta 1: KL(p||q), 0: KL(q||p)), KL(p||q), and the
    mixture's log-probs (only for ``0 < beta < 1``)."""
    lp, lq = student_lp_C_V, teacher_lp_C_V
    rkl = (lp.exp() * (lp - lq)).sum(-1)
    if beta == 1.0:
        return rkl, rkl, None
    if beta == 0.0:
        return (lq.exp() * (lq - lp)).sum(-1), rkl, None
    lm = torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))
    div = beta * (lq.exp() * (lq - lm)).sum(-1) + (1.0 - beta) * (lp.exp() * (lp - lm)).sum(-1)
    return div, rkl, lm


class _ChunkedDivergence(torch.autograd.Function):
    """Per-position divergence of the student's full distribution from the teacher's, one chunk
    of positions at a time, with a chunk-recomputing analytic backward (student side only).

    With ``z`` the student's final logits, ``p = softmax(z)``, ``q`` the teacher's and ``D`` the
    row's value: ``dKL(p||q)/dz = p (log p - log q - D)``, ``dKL(q||p)/dz = p - q`` and
    ``dJSD_beta/dz = (1 - beta) p (log p - log m - KL(p||m))`` with
    ``m = beta q + (1 - beta) p``; soft-capping and scaling are chained on top.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden_N_H: Tensor,
        weight_V_H: Tensor,
        bias_V: Tensor | None,
        teacher_hidden_N_H: Tensor,
        teacher_weight_V_H: Tensor,
        teacher_bias_V: Tensor | None,
        heads: tuple[float, float | None, float, float | None],
        beta: float,
        chunk_size: int,
        dtypes: tuple[torch.dtype, torch.dtype],
    ) -> tuple[Tensor, Tensor]:
        N, V = hidden_N_H.shape[0], weight_V_H.shape[0]
        s_scale, s_cap, t_scale, t_cap = heads
        s_dtype, t_dtype = dtypes
        out_dtype = torch.promote_types(s_dtype, torch.float32)
        h, w = hidden_N_H.to(s_dtype), weight_V_H.to(s_dtype)
        b = None if bias_V is None else bias_V.to(s_dtype)
        ht, wt = teacher_hidden_N_H.to(t_dtype), teacher_weight_V_H.to(t_dtype)
        bt = None if teacher_bias_V is None else teacher_bias_V.to(t_dtype)
        div = hidden_N_H.new_empty(N, dtype=out_dtype)
        rkl = hidden_N_H.new_empty(N, dtype=out_dtype)
        buf_s = hidden_N_H.new_empty(min(chunk_size, N), V, dtype=s_dtype)
        buf_t = hidden_N_H.new_empty(min(chunk_size, N), V, dtype=t_dtype)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            lp = _head_logits(h[s:e], w, b, s_scale, s_cap, buf_s).log_softmax(-1)
            lq = _head_logits(ht[s:e], wt, bt, t_scale, t_cap, buf_t).log_softmax(-1)
            d, r, _ = _divergences(lp.to(out_dtype), lq.to(out_dtype), beta)
            div[s:e], rkl[s:e] = d, r
        ctx.save_for_backward(
            hidden_N_H, weight_V_H, bias_V, teacher_hidden_N_H, teacher_weight_V_H, teacher_bias_V
        )
        ctx.config = (heads, beta, chunk_size, dtypes)
        ctx.mark_non_differentiable(rkl)
        ctx.set_materialize_grads(False)
        return div, rkl

    @staticmethod
    def backward(
        ctx: Any, g_div: Tensor | None, _g_rkl: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        none = (None,) * 10
        if g_div is None:
            return none
        hidden_N_H, weight_V_H, bias_V, t_hidden, t_weight, t_bias = ctx.saved_tensors
        (s_scale, s_cap, t_scale, t_cap), beta, chunk_size, (s_dtype, t_dtype) = ctx.config
        N, V = hidden_N_H.shape[0], weight_V_H.shape[0]
        acc = torch.promote_types(s_dtype, torch.float32)
        h, w = hidden_N_H.to(s_dtype), weight_V_H.to(s_dtype)
        b = None if bias_V is None else bias_V.to(s_dtype)
        ht, wt = t_hidden.to(t_dtype), t_weight.to(t_dtype)
        bt = None if t_bias is None else t_bias.to(t_dtype)
        grads = _HeadGrads(ctx, hidden_N_H, weight_V_H, bias_V, acc)
        buf_s = hidden_N_H.new_empty(min(chunk_size, N), V, dtype=s_dtype)
        buf_t = hidden_N_H.new_empty(min(chunk_size, N), V, dtype=t_dtype)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z = _head_logits(h[s:e], w, b, s_scale, s_cap, buf_s).to(acc)
            lp = z.log_softmax(-1)
            lq = _head_logits(ht[s:e], wt, bt, t_scale, t_cap, buf_t).to(acc).log_softmax(-1)
            d, _, lm = _divergences(lp, lq, beta)
            p = lp.exp()
            if beta == 1.0:
                grad = p * (lp - lq - d[:, None])
            elif beta == 0.0:
                grad = p - lq.exp()
            else:
                assert lm is not None  # 0 < beta < 1
                kl_pm = (p * (lp - lm)).sum(-1, keepdim=True)
                grad = (1.0 - beta) * p * (lp - lm - kl_pm)
            grad.mul_(g_div[s:e, None].to(acc))
            if s_cap is not None:
                grad.mul_(1.0 - (z / s_cap).square())
            if s_scale != 1.0:
                grad.mul_(s_scale)
            grads.add(s, e, grad, h[s:e], w)
        return grads.result(7)


def chunked_divergence(
    hidden_N_H: Tensor,
    head: OutputHead,
    teacher_hidden_N_H: Tensor,
    teacher_head: OutputHead,
    *,
    beta: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Exact divergence between the student's and the teacher's full next-token distributions
    at ``N`` positions, never holding more than one chunk of either's logits.

    Both heads are projected ``chunk_size`` positions at a time (capped so that one chunk of
    one head holds at most :data:`CHUNK_LOGITS` logits); the backward pass recomputes one
    chunk at a time and writes the student's gradient analytically, so no ``[N x V]`` tensor
    exists in the forward or the backward pass. Gradients flow to the student's hidden states
    and head only: the teacher's inputs are constants. Log-softmax runs in at least float32;
    the student's matmuls use the autocast dtype under autocast, the teacher's its own dtype.

    Args:
        hidden_N_H: Student final hidden states at the positions (after the last norm).
        head: The student's output head (:func:`output_head`).
        teacher_hidden_N_H: The teacher's final hidden states at the same positions (its
            hidden size may differ from the student's).
        teacher_head: The teacher's output head; same vocabulary size as the student's.
        beta: Which divergence is returned first: 1 the reverse KL(p || q), 0 the forward
            KL(q || p), in between the generalised JSD
            ``beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = beta q + (1 - beta) p``.
        chunk_size: Positions per chunk, at most.

    Returns:
        ``(divergence_N, reverse_kl_N)``: the ``beta`` divergence (differentiable w.r.t. the
        student) and the exact reverse KL(p || q) (no gradient), both float32 (float64 for
        float64 inputs).

    Raises:
        ValueError: On mismatched vocabularies or position counts, a non-positive
            ``chunk_size`` or a ``beta`` outside ``[0, 1]``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if head.vocab != teacher_head.vocab:
        raise ValueError(
            f"student and teacher output heads differ in vocabulary size: {head.vocab} vs "
            f"{teacher_head.vocab}; a full-vocabulary divergence needs the same token ids"
        )
    if hidden_N_H.shape[0] != teacher_hidden_N_H.shape[0]:
        raise ValueError(
            f"{hidden_N_H.shape[0]} student positions but {teacher_hidden_N_H.shape[0]} teacher "
            "positions; both must be the same (mask-1) positions in the same order"
        )
    device = hidden_N_H.device.type
    if torch.is_autocast_enabled(device):
        s_dtype = torch.get_autocast_dtype(device)
    else:
        s_dtype = torch.promote_types(hidden_N_H.dtype, head.weight_V_H.dtype)
    t_dtype = torch.promote_types(teacher_hidden_N_H.dtype, teacher_head.weight_V_H.dtype)
    t_bias = teacher_head.bias_V
    with torch.autocast(device, enabled=False):
        div, rkl = _ChunkedDivergence.apply(
            hidden_N_H,
            head.weight_V_H,
            head.bias_V,
            teacher_hidden_N_H.detach().to(hidden_N_H.device),
            teacher_head.weight_V_H.detach().to(hidden_N_H.device),
            None if t_bias is None else t_bias.detach().to(hidden_N_H.device),
            (head.scale, head.softcap, teacher_head.scale, teacher_head.softcap),
            beta,
            max(1, min(chunk_size, CHUNK_LOGITS // max(1, head.vocab))),
            (s_dtype, t_dtype),
        )
    return div, rkl
