"""Teacher-student compatibility diagnostics on student-visited states.

This module owns the numbers that say, before or during training, whether a teacher is likely to
help a student: pure functions on per-token top-k data (the student's and the teacher's top-k ids
and log-probs at each position the student generated, default k = 16), plus :func:`verdict`,
which turns them into one plain-language sentence. They are cheap enough to log every step.

Metrics (``E_t`` is the mean over positions with ``mask_B_T`` = 1):

* ``overlap_ratio`` = ``E_t |TopK(p_t) ∩ TopK(q_t)| / k``.
* ``overlap_advantage`` = ``E_t mean_{v in overlap} p̄_t(v) (log q̄_t(v) - log p̄_t(v))`` with
  ``p̄, q̄`` renormalised on the overlap; positions with an empty overlap are left out. It is
  ``-KL(p̄ || q̄) / |overlap|``, so always <= 0: near 0 the two agree on how to weigh the
  candidates they share, strongly negative means they share candidates but not their weights.
* ``entropy_gap`` = ``E_t |H(q_t) - H(p_t)|``.
* ``sampled_kl`` = ``E_t (log p(y_t) - log q(y_t))`` on the sampled token: a one-sample estimate
  of the reverse KL the ``rkl-sampled`` objective minimises.
* ``true_rkl`` = ``E_t KL(p_t || q_t)`` over the whole vocabulary, exact (only with an
  in-process teacher, whose full distribution the learner projects; see
  :func:`agentopd.logprobs.chunked_divergence`). ``sampled_kl`` is its one-sample estimate.
* ``kl_per_turn``: the same estimate per turn index (it grows with the index when errors
  compound).
* ``recovery_rate`` (measured by playing, not from top-k data; see
  :func:`agentopd.zoo.recovery.recovery_rate`): the fraction of held-out tasks the teacher still
  solves when it takes over right after an injected error. :func:`verdict` reads it.

All functions ignore masked-out positions completely (inputs there may be NaN/inf). Means over
no position are NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

OVERLAP_GOOD = 0.6
"""Top-16 overlap at or above which teacher and student consider mostly the same candidates."""
OVERLAP_POOR = 0.3
"""Top-16 overlap below which the teacher mostly scores tokens the student would not sample."""
ENTROPY_GAP_OK = 0.3
"""Mean |H(q) - H(p)| (nats) below which the two are similarly confident."""
ENTROPY_GAP_POOR = 1.0
"""Mean |H(q) - H(p)| (nats) above which the two have clearly different confidence profiles."""
OVERLAP_ADVANTAGE_POOR = -0.25
"""Overlap-token advantage (nats per shared token) below which the two weigh shared candidates
very differently."""
SAMPLED_KL_TINY = 0.01
"""Sampled-token KL (nats/token) below which the student is already close to the teacher."""
KL_GROWTH_FACTOR = 2.0
"""Last-turn over first-turn KL ratio above which errors are said to compound over turns."""
RECOVERY_POOR = 0.5
"""Teacher recovery rate below which it is said not to know how to go on after a mistake."""


def _mask(mask_B_T: Tensor) -> Tensor:
    return mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0


def _masked_mean(values_B_T: Tensor, mask_B_T: Tensor) -> float:
    mask = _mask(mask_B_T)
    n = int(mask.sum())
    if n == 0:
        return math.nan
    values = torch.where(mask, values_B_T.detach().double(), 0.0)
    return float(values.sum()) / n


def _check_topk(student_ids_B_T_K: Tensor, teacher_ids_B_T_K: Tensor) -> None:
    if student_ids_B_T_K.shape != teacher_ids_B_T_K.shape:
        raise ValueError(
            f"student and teacher top-k ids differ in shape: {tuple(student_ids_B_T_K.shape)} "
            f"vs {tuple(teacher_ids_B_T_K.shape)}; score both with the same k"
        )


def _overlap_B_T_K_K(student_ids_B_T_K: Tensor, teacher_ids_B_T_K: Tensor) -> Tensor:
    """``[b, t, i, j]`` is True where the student's i-th id is the teacher's j-th id."""
    return student_ids_B_T_K[..., :, None] == teacher_ids_B_T_K[..., None, :]


def overlap_ratio(
    student_topk_ids_B_T_K: Tensor, teacher_topk_ids_B_T_K: Tensor, mask_B_T: Tensor
) -> float:
    """Mean fraction of the student's top-k that is also in the teacher's top-k.

    Args:
        student_topk_ids_B_T_K: Student top-k ids (distinct within a position).
        teacher_topk_ids_B_T_K: Teacher top-k ids, same k.
        mask_B_T: 1 on positions the student generated.

    Returns:
        ``E_t |TopK(p_t) ∩ TopK(q_t)| / k`` in [0, 1].
    """
    _check_topk(student_topk_ids_B_T_K, teacher_topk_ids_B_T_K)
    k = student_topk_ids_B_T_K.shape[-1]
    shared = _overlap_B_T_K_K(student_topk_ids_B_T_K, teacher_topk_ids_B_T_K).any(-1).sum(-1)
    return _masked_mean(shared.double() / k, mask_B_T)


def overlap_advantage(
    student_topk_ids_B_T_K: Tensor,
    student_topk_logprobs_B_T_K: Tensor,
    teacher_topk_ids_B_T_K: Tensor,
    teacher_topk_logprobs_B_T_K: Tensor,
    mask_B_T: Tensor,
) -> float:
    """Overlap-token advantage: ``E_t mean_{v in O_t} p̄(v) (log q̄(v) - log p̄(v))``.

    ``O_t`` is the intersection of the two top-k sets; ``p̄`` and ``q̄`` are the two
    distributions renormalised on ``O_t``. Positions with an empty overlap are left out.

    Args:
        student_topk_ids_B_T_K: Student top-k ids.
        student_topk_logprobs_B_T_K: Student log-probs at those ids.
        teacher_topk_ids_B_T_K: Teacher top-k ids, same k.
        teacher_topk_logprobs_B_T_K: Teacher log-probs at its ids.
        mask_B_T: 1 on positions the student generated.

    Returns:
        The mean (<= 0), or NaN if no masked position has any overlap.
    """
    _check_topk(student_topk_ids_B_T_K, teacher_topk_ids_B_T_K)
    mask = _mask(mask_B_T)
    match = _overlap_B_T_K_K(student_topk_ids_B_T_K, teacher_topk_ids_B_T_K)
    shared_B_T_K = match.any(-1) & mask[..., None]
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64, device=mask.device)
    teacher_lp = teacher_topk_logprobs_B_T_K.detach().double()
    # teacher log-prob at each of the student's ids (where shared)
    q_B_T_K = torch.where(match, teacher_lp[..., None, :], neg_inf).amax(-1)
    q_B_T_K = torch.where(shared_B_T_K, q_B_T_K, neg_inf)
    p_B_T_K = torch.where(shared_B_T_K, student_topk_logprobs_B_T_K.detach().double(), neg_inf)
    count_B_T = shared_B_T_K.sum(-1)
    has_B_T = count_B_T > 0
    safe_p = torch.where(shared_B_T_K, p_B_T_K, 0.0)
    safe_q = torch.where(shared_B_T_K, q_B_T_K, 0.0)
    p_bar = safe_p - torch.where(has_B_T, torch.logsumexp(p_B_T_K, -1), 0.0)[..., None]
    q_bar = safe_q - torch.where(has_B_T, torch.logsumexp(q_B_T_K, -1), 0.0)[..., None]
    terms = torch.where(shared_B_T_K, p_bar.exp() * (q_bar - p_bar), 0.0)
    per_pos_B_T = terms.sum(-1) / count_B_T.clamp(min=1)
    return _masked_mean(per_pos_B_T, has_B_T)


def topk_entropy(topk_logprobs_B_T_K: Tensor, *, tail: bool = True) -> Tensor:
    """Approximate entropy from top-k log-probs.

    With ``tail=True`` the mass outside the top-k counts as one extra outcome, giving a lower
    bound on the true entropy (exact when the top-k holds all the mass). Prefer the exact
    entropy from full distributions (``TokenLogprobs.entropy_B_T``, a teacher's full scores)
    when it is available.

    Args:
        topk_logprobs_B_T_K: Log-probs of a model's top-k tokens.
        tail: Add the tail bucket (else renormalise the top-k, a cruder approximation).

    Returns:
        ``[B, T]`` entropies in nats.
    """
    lp = topk_logprobs_B_T_K.detach().double().clamp(min=-1e4)
    if tail:
        mass = torch.logsumexp(lp, -1, keepdim=True).clamp(max=-1e-12)
        tail_lp = torch.log(-torch.expm1(mass))
        lp = torch.cat([lp, tail_lp], -1)
    else:
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    return -(lp.exp() * lp).sum(-1)


def entropy_gap(
    student_entropy_B_T: Tensor, teacher_entropy_B_T: Tensor, mask_B_T: Tensor
) -> float:
    """``E_t |H(q_t) - H(p_t)|`` from per-token entropies the caller computed.

    Args:
        student_entropy_B_T: Student entropies (exact, or :func:`topk_entropy`).
        teacher_entropy_B_T: Teacher entropies, computed the same way.
        mask_B_T: 1 on positions the student generated.

    Returns:
        Mean absolute entropy difference in nats.
    """
    mask = _mask(mask_B_T)
    gap = torch.where(mask, teacher_entropy_B_T.double() - student_entropy_B_T.double(), 0.0)
    return _masked_mean(gap.abs(), mask)


def sampled_token_kl(
    student_logprobs_B_T: Tensor, teacher_logprobs_B_T: Tensor, mask_B_T: Tensor
) -> float:
    """``E_t (log p(y_t) - log q(y_t))``: the one-sample reverse-KL estimate on sampled tokens."""
    mask = _mask(mask_B_T)
    diff = torch.where(mask, student_logprobs_B_T.double() - teacher_logprobs_B_T.double(), 0.0)
    return _masked_mean(diff, mask)


def kl_per_turn(
    student_logprobs_B_T: Tensor,
    teacher_logprobs_B_T: Tensor,
    turn_index_B_T: Tensor,
    mask_B_T: Tensor,
) -> dict[int, float]:
    """Sampled-token KL estimate grouped by the turn each token belongs to.

    Args:
        student_logprobs_B_T: Student log-probs of the sampled tokens.
        teacher_logprobs_B_T: Teacher log-probs of the same tokens.
        turn_index_B_T: Turn index (0-based) of each token in its episode.
        mask_B_T: 1 on positions the student generated.

    Returns:
        ``{turn: mean KL}`` for every turn index with at least one masked token, sorted.
    """
    mask = _mask(mask_B_T)
    out: dict[int, float] = {}
    for turn in sorted(int(t) for t in torch.unique(turn_index_B_T[mask])):
        out[turn] = sampled_token_kl(
            student_logprobs_B_T, teacher_logprobs_B_T, mask & (turn_index_B_T == turn)
        )
    return out


def compatibility(
    student_topk_ids_B_T_K: Tensor,
    student_topk_logprobs_B_T_K: Tensor,
    teacher_topk_ids_B_T_K: Tensor,
    teacher_topk_logprobs_B_T_K: Tensor,
    mask_B_T: Tensor,
    *,
    student_logprobs_B_T: Tensor | None = None,
    teacher_logprobs_B_T: Tensor | None = None,
    turn_index_B_T: Tensor | None = None,
    student_entropy_B_T: Tensor | None = None,
    teacher_entropy_B_T: Tensor | None = None,
    reverse_kl_B_T: Tensor | None = None,
) -> dict[str, float]:
    """All diagnostics in one flat dict (ready for ``metrics.jsonl`` and :func:`verdict`).

    Entropies default to :func:`topk_entropy` (top-k + tail) when not given. The sampled-token
    metrics are included only when both sampled log-probs are given; ``kl_turn/<i>`` keys only
    when ``turn_index_B_T`` is given too; ``true_rkl`` only with ``reverse_kl_B_T`` (the exact
    per-token reverse KL over the whole vocabulary).

    Returns:
        Keys ``overlap_ratio``, ``overlap_advantage``, ``entropy_gap``, optionally
        ``sampled_kl``, ``kl_turn/<i>`` and ``true_rkl``.
    """
    if student_entropy_B_T is None:
        student_entropy_B_T = topk_entropy(student_topk_logprobs_B_T_K)
    if teacher_entropy_B_T is None:
        teacher_entropy_B_T = topk_entropy(teacher_topk_logprobs_B_T_K)
    metrics = {
        "overlap_ratio": overlap_ratio(student_topk_ids_B_T_K, teacher_topk_ids_B_T_K, mask_B_T),
        "overlap_advantage": overlap_advantage(
            student_topk_ids_B_T_K,
            student_topk_logprobs_B_T_K,
            teacher_topk_ids_B_T_K,
            teacher_topk_logprobs_B_T_K,
            mask_B_T,
        ),
        "entropy_gap": entropy_gap(student_entropy_B_T, teacher_entropy_B_T, mask_B_T),
    }
    if student_logprobs_B_T is not None and teacher_logprobs_B_T is not None:
        metrics["sampled_kl"] = sampled_token_kl(
            student_logprobs_B_T, teacher_logprobs_B_T, mask_B_T
        )
        if turn_index_B_T is not None:
            per_turn = kl_per_turn(
                student_logprobs_B_T, teacher_logprobs_B_T, turn_index_B_T, mask_B_T
            )
            metrics.update({f"kl_turn/{t}": v for t, v in per_turn.items()})
    if reverse_kl_B_T is not None:
        metrics["true_rkl"] = _masked_mean(reverse_kl_B_T, mask_B_T)
    return metrics


def verdict(metrics: dict[str, float]) -> str:
    """A plain-language judgement of whether this teacher is likely to help this student.

    The rules encode qualitative findings reported for on-policy distillation: it works when the
    teacher and student, on the student's own states, put their probability on largely the same
    candidate tokens and are similarly confident; a teacher that rarely ranks the student's
    likely tokens highly, or whose confidence profile is very different (e.g. a long-reasoning
    teacher for a terse student), gives weak or noisy signal; and a per-turn KL that grows with
    the turn index points to compounding errors that a temporal curriculum can address. The
    thresholds are the module constants (``OVERLAP_GOOD``, ``OVERLAP_POOR``,
    ``ENTROPY_GAP_OK``, ``ENTROPY_GAP_POOR``, ``OVERLAP_ADVANTAGE_POOR``, ``SAMPLED_KL_TINY``,
    ``KL_GROWTH_FACTOR``, ``RECOVERY_POOR``); they are starting points calibrated for k = 16,
    not laws. A teacher that cannot recover from an injected error gives its signal on the
    student's mistaken states from states it never learned, whatever the overlap says.

    Args:
        metrics: Output of :func:`compatibility` (missing keys are skipped).

    Returns:
        One line: ``"<good|fair|risky|poor> match: ..."`` followed by any notes.
    """
    overlap = metrics.get("overlap_ratio", math.nan)
    gap = metrics.get("entropy_gap", math.nan)
    if math.isnan(overlap) or math.isnan(gap):
        return "unknown match: overlap_ratio and entropy_gap are needed (no scored tokens?)"
    facts = f"(overlap {overlap:.2f}, entropy gap {gap:.2f} nats)"
    if overlap < OVERLAP_POOR and gap > ENTROPY_GAP_POOR:
        head = (
            f"poor match {facts}: the teacher seldom ranks the student's likely tokens highly "
            "and is differently confident; expect little useful signal"
        )
    elif overlap < OVERLAP_POOR:
        head = (
            f"poor match {facts}: the teacher seldom ranks the student's likely tokens highly; "
            "consider a closer teacher or an SFT cold start first"
        )
    elif gap > ENTROPY_GAP_POOR:
        head = (
            f"risky match {facts}: they share candidates but differ in confidence; expect "
            "slow or unstable distillation"
        )
    elif overlap >= OVERLAP_GOOD and gap <= ENTROPY_GAP_OK:
        head = f"good match {facts}: the teacher should give a clear, usable signal"
    else:
        head = f"fair match {facts}: the teacher should help, possibly slowly"
    notes = []
    advantage = metrics.get("overlap_advantage", math.nan)
    if not math.isnan(advantage) and advantage < OVERLAP_ADVANTAGE_POOR:
        notes.append(
            f"even on shared tokens they disagree on the weights (overlap advantage "
            f"{advantage:.2f})"
        )
    kl = metrics.get("sampled_kl", math.nan)
    if not math.isnan(kl) and abs(kl) < SAMPLED_KL_TINY:
        notes.append(f"the student is already close to the teacher (sampled KL {kl:.3f})")
    turns = sorted(
        (int(k.split("/", 1)[1]), v)
        for k, v in metrics.items()
        if k.startswith("kl_turn/") and not math.isnan(v)
    )
    if len(turns) >= 2:
        first, last = turns[0][1], turns[-1][1]
        if last > SAMPLED_KL_TINY and last > KL_GROWTH_FACTOR * max(first, SAMPLED_KL_TINY):
            notes.append(
                f"KL grows from {first:.2f} (turn {turns[0][0]}) to {last:.2f} "
                f"(turn {turns[-1][0]}): errors compound, a temporal curriculum "
                "(tcod-f2b) may help"
            )
    recovery = metrics.get("recovery_rate", math.nan)
    if not math.isnan(recovery) and recovery < RECOVERY_POOR:
        notes.append(
            f"the teacher rarely recovers from an injected error (recovery rate {recovery:.0%}): "
            "after the student's mistakes its signal is unreliable; a teacher trained on "
            "recovery demonstrations (tiny-teacher-<env>-recovery) may help"
        )
    return head + ("; " + "; ".join(notes) if notes else "")
