"""Distillation objectives as pure functions, and token selection.

This module owns everything between "per-token numbers" and "a scalar to call ``backward`` on"
(the per-token numbers themselves come from :func:`agentopd.logprobs.chunked_token_logprobs`):

* Objectives as pure functions (``rkl_sampled``, ``rkl_topk``, ``fkl_topk``, ``jsd``), each
  returning ``(loss, metrics)`` where
  ``metrics`` is a dict of Python floats, and wrapped as :class:`Loss` objects with their own
  config dataclasses (registered in ``agentopd.registry.losses``).
* The full-vocabulary objectives (``rkl-full``, ``fkl-full``, ``jsd-full``): the exact
  divergence over the whole vocabulary at every student token, against an in-process teacher.
  Their per-token values come from the student pass
  (:func:`agentopd.logprobs.chunked_divergence`, ``TokenLogprobs.divergence_B_T``); the loss
  aggregates them.
* Token selection: :func:`select_entropy_top_frac`, :func:`select_overlap_only`.

Notation: student p, teacher q, both on the student's own prefix; ``mask_B_T`` is 1 exactly on
tokens the student sampled. Masked-out positions contribute *nothing* to a loss or its gradient,
whatever the inputs hold there (NaN, inf, garbage): every input is passed through
:func:`torch.where` before any arithmetic, because ``0 * nan`` is ``nan`` and because a NaN in a
discarded ``torch.where`` branch still poisons the gradient.

Aggregation (``agg``):

* ``"token-mean"``: sum over all masked tokens of the batch / number of masked tokens.
* ``"seq-mean-token-mean"``: mean over sequences of each sequence's token mean; sequences
  without any masked token are left out.

With no masked token at all, every loss is an exact 0 that still has a (zero) gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from agentopd.logprobs import TokenLogprobs, at_least_f32
from agentopd.schema import knob

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")

LOG_FLOOR = -1.0e4
"""Log-probabilities are clamped from below to this value on top-k supports, so that a
probability of exactly 0 (``-inf``) yields ``0 * finite = 0`` instead of ``0 * -inf = nan``.
``exp(LOG_FLOOR)`` is 0 in float32, so no probability mass changes."""

_TAIL_MAX_LOGMASS = -1.0e-7
"""The log of the summed top-k mass is clamped to at most this value before the tail bucket is
formed, so the tail log-probability stays finite (about -16.1) when top-k holds all the mass."""


# --------------------------------------------------------------------------------------------
# Masking and aggregation
# --------------------------------------------------------------------------------------------


def _bool_mask(mask_B_T: Tensor) -> Tensor:
    return mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0


def _masked(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """``values`` where ``mask`` else ``fill``; the mask broadcasts over trailing dims."""
    while mask.dim() < values.dim():
        mask = mask[..., None]
    return torch.where(mask, values, torch.full_like(values, fill))


def aggregate(values_B_T: Tensor, mask_B_T: Tensor, agg: str = "token-mean") -> Tensor:
    """Reduce per-token values to a scalar over masked tokens.

    Args:
        values_B_T: Per-token values (masked positions may hold anything, NaN included).
        mask_B_T: 1/True on tokens that count.
        agg: ``"token-mean"`` or ``"seq-mean-token-mean"`` (see the module docstring).

    Returns:
        A scalar tensor; 0 when no token is masked in.

    Raises:
        ValueError: On an unknown ``agg``.
    """
    mask = _bool_mask(mask_B_T)
    values = _masked(values_B_T, mask)
    if agg == "token-mean":
        return values.sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        count_B = mask.sum(-1)
        per_seq_B = values.sum(-1) / count_B.clamp(min=1)
        has_tokens_B = count_B > 0
        return _masked(per_seq_B, has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1)
    raise ValueError(f"unknown agg {agg!r}; expected one of {AGGREGATIONS}")


def _token_mean(values_B_T: Tensor, mask: Tensor) -> float:
    with torch.no_grad():
        return float(aggregate(values_B_T.detach(), mask, "token-mean"))


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def discounted_future_sum(values_B_T: Tensor, mask_B_T: Tensor, gamma: float) -> Tensor:
    """Per row, the ``gamma``-discounted sum of the masked values from each masked position on.

    With ``v_1 .. v_n`` the values at a row's masked positions in order, position ``j`` gets
    ``sum_{i >= j} gamma^(i - j) v_i``: the discount counts masked positions (a tool result
    between two turns adds no discount). Masked-out positions get 0 and their values are never
    read. No gradient flows (the result is an advantage, a constant).

    Args:
        values_B_T: Per-token values (anything at masked-out positions).
        mask_B_T: 1 on the positions that take part.
        gamma: Discount in ``[0, 1]``; 0 returns the masked values themselves.

    Returns:
        ``[B, T]`` discounted sums, in the dtype of ``values_B_T``.

    Raises:
        ValueError: ``gamma`` is outside ``[0, 1]``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    mask = _bool_mask(mask_B_T)
    values = _masked(values_B_T.detach().double(), mask)
    out = torch.zeros_like(values)
    carry = values.new_zeros(values.shape[:-1])
    for t in range(values.shape[-1] - 1, -1, -1):
        m = mask[..., t]
        carry = torch.where(m, values[..., t] + gamma * carry, carry)
        out[..., t] = torch.where(m, carry, 0.0)
    return out.to(values_B_T.dtype)


def rkl_sampled(
    logprobs_new_B_T: Tensor,
    logprobs_old_B_T: Tensor,
    teacher_logprobs_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    clip_eps: float = 0.2,
    agg: str = "token-mean",
    kl_discount: float = 0.0,
    discount_mask_B_T: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Sampled-token reverse KL as a clipped policy-gradient surrogate.

    Per token: ``A = stopgrad(log q(y) - log p_old(y))``, ``ratio = exp(log p_new - log p_old)``
    and ``loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``. With ``new == old`` the
    gradient is that of ``-sum(m * A * log p_new) / n``, an unbiased estimate of the reverse KL
    gradient from one teacher log-prob per token.

    With ``kl_discount = gamma > 0`` (tinker-cookbook's ``kl_discount_factor``) each token's
    advantage is instead the discounted sum of the per-token advantages of itself and of the
    later student tokens of its row (:func:`discounted_future_sum` over ``discount_mask_B_T``):
    a token is also charged for the KL of what it leads to. ``gamma = 0`` is the per-token
    advantage, computed exactly as without the option.

    Args:
        logprobs_new_B_T: Current student log-probs of the sampled tokens (with grad).
        logprobs_old_B_T: Student log-probs at sampling time (treated as constants).
        teacher_logprobs_B_T: Teacher log-probs of the same tokens (treated as constants).
        mask_B_T: 1 on the tokens to train on.
        clip_eps: PPO clip range.
        agg: Aggregation mode.
        kl_discount: ``gamma`` in ``[0, 1]``.
        discount_mask_B_T: The tokens whose advantages the discounted sum runs over: every
            token the student sampled, including those token selection dropped from
            ``mask_B_T`` (default: ``mask_B_T``; ``mask_B_T`` is always included).

    Returns:
        ``(loss, metrics)``; metrics: ``loss``, ``advantage_mean``, ``kl_sampled`` (mean of
        ``log p_old - log q``, undiscounted), ``ratio_mean``, ``clip_frac``, ``tokens``.

    Raises:
        ValueError: ``kl_discount`` is outside ``[0, 1]``.
    """
    if not 0.0 <= kl_discount <= 1.0:
        raise ValueError(f"kl_discount must be in [0, 1], got {kl_discount}")
    mask = _bool_mask(mask_B_T)
    new = _masked(logprobs_new_B_T, mask)
    old = _masked(logprobs_old_B_T.detach(), mask)
    teacher = _masked(teacher_logprobs_B_T.detach(), mask)
    advantage = teacher - old
    kl_per_token = -advantage
    if kl_discount > 0.0:
        span = mask if discount_mask_B_T is None else _bool_mask(discount_mask_B_T) | mask
        raw = _masked(teacher_logprobs_B_T.detach(), span) - _masked(
            logprobs_old_B_T.detach(), span
        )
        advantage = _masked(discounted_future_sum(raw, span, kl_discount), mask)
    ratio = torch.exp(new - old)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    loss = aggregate(per_token, mask, agg)
    with torch.no_grad():
        clip_hit = ((ratio - clipped).abs() > 0).float()
        metrics = {
            "loss": float(loss.detach()),
            "advantage_mean": _token_mean(advantage, mask),
            "kl_sampled": _token_mean(kl_per_token, mask),
            "ratio_mean": _token_mean(ratio, mask),
            "clip_frac": _token_mean(clip_hit, mask),
            "tokens": float(mask.sum()),
        }
    return loss, metrics


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x``.

    Both branches stay finite for finite ``x < 0``, so gradients through ``torch.where`` are
    NaN-free.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def with_tail(logprobs_B_T_K: Tensor) -> Tensor:
    """Append a tail bucket holding the mass outside the support.

    Args:
        logprobs_B_T_K: Log-probs of K distinct tokens under a full distribution.

    Returns:
        ``[B, T, K + 1]`` log-probs whose probabilities sum to 1; the last entry is
        ``log(1 - sum(exp(logprobs_B_T_K)))``, computed stably, kept finite when the support
        holds (numerically) all the mass.
    """
    support_mass = torch.logsumexp(logprobs_B_T_K, dim=-1, keepdim=True)
    tail = log1mexp(support_mass.clamp(max=_TAIL_MAX_LOGMASS))
    return torch.cat([logprobs_B_T_K, tail], dim=-1)


def _support_pair(
    student_B_T_K: Tensor, teacher_B_T_K: Tensor, mask: Tensor, tail: bool
) -> tuple[Tensor, Tensor]:
    """Sanitise masked positions, floor -inf, then add a tail bucket or renormalise."""
    if student_B_T_K.shape != teacher_B_T_K.shape:
        raise ValueError(
            f"student and teacher support log-probs differ in shape: "
            f"{tuple(student_B_T_K.shape)} vs {tuple(teacher_B_T_K.shape)}; both must be "
            "evaluated on the same [B, T, K] ids"
        )
    K = student_B_T_K.shape[-1]
    fill = -math.log(K + 1)  # a valid sub-distribution at masked positions
    student = _masked(at_least_f32(student_B_T_K), mask, fill).clamp(min=LOG_FLOOR)
    teacher = _masked(at_least_f32(teacher_B_T_K.detach()), mask, fill).clamp(min=LOG_FLOOR)
    if tail:
        return with_tail(student), with_tail(teacher)
    return (
        student - torch.logsumexp(student, -1, keepdim=True),
        teacher - torch.logsumexp(teacher, -1, keepdim=True),
    )


def _kl(logp_B_T_K: Tensor, logq_B_T_K: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim; inputs are finite (floored) log-probs."""
    return (logp_B_T_K.exp() * (logp_B_T_K - logq_B_T_K)).sum(-1)


def _support_metrics(
    loss: Tensor, student_B_T_K: Tensor, teacher_B_T_K: Tensor, mask: Tensor
) -> dict[str, float]:
    with torch.no_grad():
        s = _masked(at_least_f32(student_B_T_K.detach()), mask).clamp(min=LOG_FLOOR)
        t = _masked(at_least_f32(teacher_B_T_K.detach()), mask).clamp(min=LOG_FLOOR)
        return {
            "loss": float(loss.detach()),
            "student_support_mass": _token_mean(s.exp().sum(-1), mask),
            "teacher_support_mass": _token_mean(t.exp().sum(-1), mask),
            "tokens": float(mask.sum()),
        }


def _support_kl(
    student_B_T_K: Tensor,
    teacher_B_T_K: Tensor,
    mask_B_T: Tensor,
    *,
    tail: bool,
    agg: str,
    reverse: bool,
) -> tuple[Tensor, dict[str, float]]:
    """KL between the two models on a top-k support: reverse KL(p || q) when ``reverse``, else
    forward KL(q || p); see :func:`rkl_topk`."""
    mask = _bool_mask(mask_B_T)
    s, t = _support_pair(student_B_T_K, teacher_B_T_K, mask, tail)
    loss = aggregate(_kl(s, t) if reverse else _kl(t, s), mask, agg)
    return loss, _support_metrics(loss, student_B_T_K, teacher_B_T_K, mask)


def rkl_topk(
    student_logprobs_on_support_B_T_K: Tensor,
    teacher_logprobs_on_support_B_T_K: Tensor,
    mask_B_T: Tensor,
    *,
    tail: bool = True,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Exact reverse KL(p || q) on a top-k support.

    The support (K distinct ids per position, the student's or the teacher's top-k) is chosen
    by the caller; both models must be evaluated at the same ids. With ``tail=True`` the
    remaining mass of each model forms one extra bucket, so the loss is the exact KL between the
    two (K+1)-bucket coarsenings (a lower bound on the full KL). With ``tail=False`` both are
    renormalised on the support.

    Args:
        student_logprobs_on_support_B_T_K: Student log-probs at the support ids (with grad).
        teacher_logprobs_on_support_B_T_K: Teacher log-probs at the same ids (constants).
        mask_B_T: 1 on tokens the student sampled.
        tail: Add the tail bucket (else renormalise on the support).
        agg: Aggregation mode.

    Returns:
        ``(loss, metrics)``; metrics: ``loss``, ``student_support_mass``,
        ``teacher_support_mass``, ``tokens``.
    """
    return _support_kl(
        student_logprobs_on_support_B_T_K,
        teacher_logprobs_on_support_B_T_K,
        mask_B_T,
        tail=tail,
        agg=agg,
        reverse=True,
    )


def fkl_topk(
    student_logprobs_on_support_B_T_K: Tensor,
    teacher_logprobs_on_support_B_T_K: Tensor,
    mask_B_T: Tensor,
    *,
    tail: bool = True,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Exact forward KL(q || p) on a top-k support; arguments as in :func:`rkl_topk`."""
    return _support_kl(
        student_logprobs_on_support_B_T_K,
        teacher_logprobs_on_support_B_T_K,
        mask_B_T,
        tail=tail,
        agg=agg,
        reverse=False,
    )


def jsd(
    student_logprobs_on_support_B_T_K: Tensor,
    teacher_logprobs_on_support_B_T_K: Tensor,
    mask_B_T: Tensor,
    *,
    beta: float = 0.5,
    tail: bool = True,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Generalised Jensen-Shannon divergence (GKD) on a top-k support.

    For ``0 < beta < 1``, with ``M = beta * q + (1 - beta) * p``:
    ``JSD_beta = beta * KL(q || M) + (1 - beta) * KL(p || M)``. Near the ends this vanishes like
    ``beta * KL(q || p)`` and ``(1 - beta) * KL(p || q)``, so the ends are defined by those
    directions: ``beta = 0`` is the forward KL(q || p) and ``beta = 1`` the reverse KL(p || q),
    exactly :func:`fkl_topk` and :func:`rkl_topk`. Other arguments as in :func:`rkl_topk`.

    Raises:
        ValueError: If ``beta`` is outside ``[0, 1]``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    mask = _bool_mask(mask_B_T)
    s, t = _support_pair(
        student_logprobs_on_support_B_T_K, teacher_logprobs_on_support_B_T_K, mask, tail
    )
    if beta == 0.0:
        per_token = _kl(t, s)
    elif beta == 1.0:
        per_token = _kl(s, t)
    else:
        log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        per_token = beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)
    loss = aggregate(per_token, mask, agg)
    return loss, _support_metrics(
        loss, student_logprobs_on_support_B_T_K, teacher_logprobs_on_support_B_T_K, mask
    )


# --------------------------------------------------------------------------------------------
# The Loss protocol: one signature for every objective, each with its own config dataclass
# --------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """Settings every objective shares (``loss_cfg.*``); a loss's own config extends it."""

    agg: str = knob("token-mean", "how per-token losses are averaged", choices=AGGREGATIONS)
    entropy_top_frac: float = knob(
        1.0, "train only on this highest-student-entropy fraction of the batch's tokens", gt=0, le=1
    )
    overlap_only: bool = knob(
        False, "train only on tokens whose student and teacher top-k intersect"
    )
    chunk_size: int = knob(
        1024,
        "positions per chunk of the student's vocabulary projection, at most (also capped at "
        "32 Mi logits a chunk)",
        ge=1,
    )


@dataclass
class RklSampledConfig(LossConfig):
    """``rkl-sampled``: PPO-style clipped surrogate of the sampled-token reverse KL."""

    clip_eps: float = knob(0.2, "PPO clip range of the probability ratio", ge=0)
    kl_discount: float = knob(
        0.0,
        "gamma of the KL advantage: each token's advantage is the gamma-discounted sum of the "
        "per-token advantages of it and the later student tokens of its segment (0: per token)",
        ge=0,
        le=1,
    )


@dataclass
class TopkConfig(LossConfig):
    """``rkl-topk`` / ``fkl-topk``: exact KL on the teacher's top-k support."""

    tail: bool = knob(True, "add a tail bucket holding the mass outside the top-k")


@dataclass
class JsdConfig(TopkConfig):
    """``jsd``: generalised Jensen-Shannon divergence."""

    beta: float = knob(0.5, "JSD mixing weight: 0 = forward KL, 1 = reverse KL", ge=0, le=1)


@dataclass
class FullConfig(LossConfig):
    """``rkl-full`` / ``fkl-full``: exact KL over the whole vocabulary (in-process teacher)."""


@dataclass
class JsdFullConfig(FullConfig):
    """``jsd-full``: generalised Jensen-Shannon divergence over the whole vocabulary."""

    beta: float = knob(0.5, "JSD mixing weight: 0 = forward KL, 1 = reverse KL", ge=0, le=1)


@dataclass
class LossInputs:
    """Everything an objective may read, on the shifted ``[B, T]`` grid of one micro-batch.

    Teacher tensors are constants; ``mask_B_T`` is the final loss mask (token selection done).
    """

    mask_B_T: Tensor
    """1 on the tokens to train on (sampled by the student, selected)."""
    old_logprobs_B_T: Tensor
    """Student log-probs of the sampled tokens before this batch's first update (constants)."""
    teacher_logprobs_B_T: Tensor
    """Teacher log-probs of the sampled tokens."""
    teacher_topk_logprobs_B_T_K: Tensor
    """Teacher log-probs at its top-k ids (the support)."""
    student_mask_B_T: Tensor | None = None
    """1 on every token the student sampled, before token selection (what a discounted
    advantage sums over); None: ``mask_B_T``."""


class Loss(Protocol):
    """An objective: ``loss(inputs, student, cfg) -> (scalar loss, metrics)``.

    ``student`` holds the current student's log-probs (with grad): ``logprobs_B_T`` of the
    sampled tokens and, when ``needs_support`` is true, ``support_logprobs_B_T_K`` at the
    teacher's top-k ids. ``Config`` is the loss's config dataclass (``loss_cfg.*`` keys).

    A full-vocabulary objective also sets ``full_vocab = True`` and defines
    ``beta(cfg) -> float``: the student pass then fills ``student.divergence_B_T`` with the
    exact divergence ``JSD_beta`` (1: reverse KL, 0: forward KL) between the student's and the
    teacher's whole distributions (:func:`full_vocab_beta`). ``full_vocab`` is optional
    (absent: false).
    Register an instance in the ``agentopd.losses`` entry-point group (or with
    ``agentopd.register(name, obj, kind="losses")``).

    Example::

        @dataclass
        class MyConfig(LossConfig):
            scale: float = knob(1.0, "multiplier", gt=0)

        class MyLoss:
            Config = MyConfig
            needs_support = False

            def __call__(self, inputs, student, cfg):
                m = inputs.mask_B_T
                per_token = (inputs.old_logprobs_B_T - inputs.teacher_logprobs_B_T) * student.logprobs_B_T
                loss = cfg.scale * aggregate(per_token, m, cfg.agg)
                return loss, {"loss": float(loss)}

        MY_LOSS = MyLoss()   # entry point "my_pkg.losses:MY_LOSS"
    """

    Config: type[LossConfig]
    needs_support: bool

    def __call__(
        self, inputs: LossInputs, student: TokenLogprobs, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]: ...


class _RklSampled:
    Config: type[LossConfig] = RklSampledConfig
    needs_support = False

    def __call__(
        self, inputs: LossInputs, student: TokenLogprobs, cfg: RklSampledConfig
    ) -> tuple[Tensor, dict[str, float]]:
        return rkl_sampled(
            student.logprobs_B_T,
            inputs.old_logprobs_B_T,
            inputs.teacher_logprobs_B_T,
            inputs.mask_B_T,
            clip_eps=cfg.clip_eps,
            agg=cfg.agg,
            kl_discount=cfg.kl_discount,
            discount_mask_B_T=inputs.student_mask_B_T,
        )


class _Topk:
    Config: type[LossConfig] = TopkConfig
    needs_support = True

    def __init__(self, fn: Callable[..., tuple[Tensor, dict[str, float]]]):
        self.fn = fn

    def __call__(
        self, inputs: LossInputs, student: TokenLogprobs, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        kwargs = {"beta": cfg.beta} if isinstance(cfg, JsdConfig) else {}
        return self.fn(
            student.support_logprobs_B_T_K,
            inputs.teacher_topk_logprobs_B_T_K,
            inputs.mask_B_T,
            tail=cfg.tail,
            agg=cfg.agg,
            **kwargs,
        )


class _Jsd(_Topk):
    Config: type[LossConfig] = JsdConfig


def _full_metrics(loss: Tensor, student: TokenLogprobs, mask: Tensor) -> dict[str, float]:
    out = {"loss": float(loss.detach()), "tokens": float(mask.sum())}
    if student.reverse_kl_B_T is not None:
        out["true_rkl"] = _token_mean(student.reverse_kl_B_T, mask)
    return out


class _Full:
    """An exact full-vocabulary divergence: the loss aggregates the student pass's
    ``divergence_B_T`` (computed with :meth:`beta`) over the loss mask. Like the top-k
    objectives it is exact at every visited state, so it needs no importance ratio and accepts
    any rollout temperature; ``p_old`` is not read."""

    Config: type[LossConfig] = FullConfig
    needs_support = False
    full_vocab = True

    def __init__(self, beta: float | None):
        self._beta = beta

    def beta(self, cfg: Any) -> float:
        """1 for the reverse KL, 0 for the forward KL, ``loss_cfg.beta`` for ``jsd-full``."""
        return float(cfg.beta) if self._beta is None else self._beta

    def __call__(
        self, inputs: LossInputs, student: TokenLogprobs, cfg: Any
    ) -> tuple[Tensor, dict[str, float]]:
        if student.divergence_B_T is None:
            raise ValueError(
                "a full-vocabulary loss needs the student pass's divergence_B_T: the learner "
                "computes it when it holds the teacher's output head and the batch carries the "
                "teacher's hidden states (an in-process hf teacher with keep_hidden)"
            )
        mask = _bool_mask(inputs.mask_B_T)
        loss = aggregate(student.divergence_B_T, mask, cfg.agg)
        return loss, _full_metrics(loss, student, mask)


class _JsdFull(_Full):
    Config: type[LossConfig] = JsdFullConfig


def full_vocab_beta(loss: Any, cfg: Any) -> float | None:
    """The ``beta`` of the full-vocabulary divergence ``loss`` trains on (see :class:`Loss`),
    or None when ``loss`` is not a full-vocabulary objective."""
    if not getattr(loss, "full_vocab", False):
        return None
    return float(loss.beta(cfg))


RKL_SAMPLED: Loss = _RklSampled()
RKL_TOPK: Loss = _Topk(rkl_topk)
FKL_TOPK: Loss = _Topk(fkl_topk)
JSD: Loss = _Jsd(jsd)
RKL_FULL: Loss = _Full(1.0)
FKL_FULL: Loss = _Full(0.0)
JSD_FULL: Loss = _JsdFull(None)


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------


def select_entropy_top_frac(entropy_B_T: Tensor, mask_B_T: Tensor, frac: float) -> Tensor:
    """Keep only the highest-entropy fraction of masked tokens, across the whole batch.

    Exactly ``ceil(frac * n)`` tokens are kept, ``n`` being the number of masked tokens (ties
    broken arbitrarily). Entropy values at masked-out positions are ignored.

    Args:
        entropy_B_T: Per-token student entropy (e.g. ``TokenLogprobs.entropy_B_T``).
        mask_B_T: Current loss mask.
        frac: Fraction in ``[0, 1]`` to keep.

    Returns:
        A new boolean mask, a subset of ``mask_B_T``.

    Raises:
        ValueError: If ``frac`` is outside ``[0, 1]``.
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac}")
    mask = _bool_mask(mask_B_T)
    n = int(mask.sum())
    keep = min(n, math.ceil(frac * n - 1e-9))
    if keep <= 0:
        return torch.zeros_like(mask)
    scores = _masked(entropy_B_T.detach().float().nan_to_num(nan=-math.inf), mask, -math.inf)
    chosen = scores.flatten().topk(keep).indices
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[chosen] = True
    return out.reshape(mask.shape) & mask


def topk_overlap_count(student_topk_ids_B_T_K: Tensor, teacher_topk_ids_B_T_K: Tensor) -> Tensor:
    """``|TopK(p) ∩ TopK(q)|`` per position (ids within one top-k list are assumed distinct)."""
    hits = student_topk_ids_B_T_K[..., :, None] == teacher_topk_ids_B_T_K[..., None, :]
    return hits.any(-1).sum(-1)


def select_overlap_only(
    student_topk_ids_B_T_K: Tensor,
    teacher_topk_ids_B_T_K: Tensor,
    mask_B_T: Tensor,
    *,
    min_overlap: int = 1,
) -> Tensor:
    """Keep only positions where the student's and teacher's top-k share enough tokens.

    A masked-in position is kept iff ``|TopK(p) ∩ TopK(q)| >= min_overlap``.

    Args:
        student_topk_ids_B_T_K: Student top-k ids.
        teacher_topk_ids_B_T_K: Teacher top-k ids (K may differ from the student's).
        mask_B_T: Current loss mask.
        min_overlap: Minimum number of shared ids (default 1: the sets intersect).

    Returns:
        A new boolean mask, a subset of ``mask_B_T``.
    """
    overlap = topk_overlap_count(student_topk_ids_B_T_K, teacher_topk_ids_B_T_K)
    return _bool_mask(mask_B_T) & (overlap >= min_overlap)
