"""Tests for agentopd.diagnostics: hand-computed metrics, masking, and the verdict rules."""

from __future__ import annotations

import math

import pytest
import torch

from agentopd import diagnostics as D

LN = math.log


def _ids(rows):
    return torch.tensor(rows, dtype=torch.long)


def _lp(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_overlap_ratio_hand_computed() -> None:
    student = _ids([[[1, 2], [4, 5], [7, 8]]])
    teacher = _ids([[[2, 3], [5, 4], [0, 9]]])
    mask = torch.tensor([[1, 1, 0]])
    assert D.overlap_ratio(student, teacher, mask) == pytest.approx((0.5 + 1.0) / 2)
    assert D.overlap_ratio(student, teacher, torch.ones(1, 3)) == pytest.approx(1.5 / 3)
    with pytest.raises(ValueError, match="same k"):
        D.overlap_ratio(student, teacher[..., :1], mask)


def test_overlap_advantage_hand_computed() -> None:
    student_ids = _ids([[[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 3]]])
    student_lp = _lp([[[0.5, 0.3, 0.1], [0.4, 0.3, 0.2], [0.6, 0.2, 0.1], [0.5, 0.3, 0.1]]])
    teacher_ids = _ids([[[2, 1, 9], [10, 11, 12], [9, 8, 7], [3, 2, 1]]])
    teacher_lp = _lp([[[0.4, 0.2, 0.3], [0.5, 0.3, 0.1], [0.1, 0.2, 0.6], [0.1, 0.3, 0.5]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # position 0: overlap {1, 2}; p̄ = (.5, .3)/.8, q̄ = (.2, .4)/.6
    p1, p2, q1, q2 = 0.5 / 0.8, 0.3 / 0.8, 0.2 / 0.6, 0.4 / 0.6
    v0 = (p1 * LN(q1 / p1) + p2 * LN(q2 / p2)) / 2
    # position 1: no overlap (left out); position 2: identical distributions -> 0
    expected = (v0 + 0.0) / 2
    got = D.overlap_advantage(student_ids, student_lp, teacher_ids, teacher_lp, mask)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got < 0
    nothing = D.overlap_advantage(
        student_ids, student_lp, teacher_ids, teacher_lp, torch.tensor([[0, 1, 0, 0]])
    )
    assert math.isnan(nothing)


def test_topk_entropy_with_tail_hand_computed() -> None:
    lp = _lp([[[0.5, 0.3]]])
    expected = -(0.5 * LN(0.5) + 0.3 * LN(0.3) + 0.2 * LN(0.2))
    assert D.topk_entropy(lp).item() == pytest.approx(expected, abs=1e-12)
    renorm = -(0.625 * LN(0.625) + 0.375 * LN(0.375))
    assert D.topk_entropy(lp, tail=False).item() == pytest.approx(renorm, abs=1e-12)
    full = _lp([[[0.5, 0.5]]])
    assert D.topk_entropy(full).item() == pytest.approx(LN(2), abs=1e-9)


def test_entropy_gap_and_sampled_kl_hand_computed() -> None:
    mask = torch.tensor([[1, 1, 0]])
    h_p = torch.tensor([[1.0, 2.0, math.nan]])
    h_q = torch.tensor([[1.5, 0.5, math.inf]])
    assert D.entropy_gap(h_p, h_q, mask) == pytest.approx((0.5 + 1.5) / 2)
    lp_p = torch.tensor([[LN(0.5), LN(0.2), 3.0]])
    lp_q = torch.tensor([[LN(0.25), LN(0.4), math.nan]])
    assert D.sampled_token_kl(lp_p, lp_q, mask) == pytest.approx((LN(2) + LN(0.5)) / 2, abs=1e-7)
    assert math.isnan(D.sampled_token_kl(lp_p, lp_q, torch.zeros(1, 3)))


def test_kl_per_turn_hand_computed() -> None:
    lp_p = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    lp_q = torch.tensor([[-1.5, -1.0, -3.0, -2.0, math.nan, -9.0]])
    turn = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])  # turn 2 fully masked: absent
    assert D.kl_per_turn(lp_p, lp_q, turn, mask) == {
        0: pytest.approx(0.25),
        1: pytest.approx(1.5),
    }


def _random_topk(seed: int, B: int = 2, T: int = 5, V: int = 40, K: int = 16):
    g = torch.Generator().manual_seed(seed)
    p = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    ps, qs = p.topk(K, -1), q.topk(K, -1)
    return ps.indices, ps.values, qs.indices, qs.values


def test_metrics_ignore_masked_positions() -> None:
    s_ids, s_lp, t_ids, t_lp = _random_topk(0)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]])
    sampled_p, sampled_q = s_lp[..., 0], t_lp[..., 3]
    turn = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 1, 1, 2]])
    ref = D.compatibility(
        s_ids, s_lp, t_ids, t_lp, mask,
        student_logprobs_B_T=sampled_p, teacher_logprobs_B_T=sampled_q, turn_index_B_T=turn,
    )  # fmt: skip
    off = mask == 0
    bad_t_lp, bad_t_ids, bad_q = t_lp.clone(), t_ids.clone(), sampled_q.clone()
    bad_t_lp[off] = math.nan
    bad_t_ids[off] = s_ids[off]  # full overlap where masked
    bad_q[off] = -math.inf
    got = D.compatibility(
        s_ids, s_lp, bad_t_ids, bad_t_lp, mask,
        student_logprobs_B_T=sampled_p, teacher_logprobs_B_T=bad_q, turn_index_B_T=turn,
    )  # fmt: skip
    assert set(ref) == {
        "overlap_ratio", "overlap_advantage", "entropy_gap", "sampled_kl",
        "kl_turn/0", "kl_turn/1", "kl_turn/2",
    }  # fmt: skip
    assert got == ref
    assert all(math.isfinite(v) for v in ref.values())


def test_identical_models_are_a_good_match() -> None:
    s_ids, s_lp, _, _ = _random_topk(1)
    mask = torch.ones(2, 5)
    m = D.compatibility(s_ids, s_lp, s_ids.flip(-1), s_lp.flip(-1), mask)
    assert m["overlap_ratio"] == 1.0
    assert m["overlap_advantage"] == pytest.approx(0.0, abs=1e-12)
    assert m["entropy_gap"] == pytest.approx(0.0, abs=1e-12)
    assert D.verdict(m).startswith("good match")


@pytest.mark.parametrize(
    ("metrics", "start"),
    [
        ({"overlap_ratio": 0.1, "entropy_gap": 2.0}, "poor match"),
        ({"overlap_ratio": 0.2, "entropy_gap": 0.1}, "poor match"),
        ({"overlap_ratio": 0.7, "entropy_gap": 1.5}, "risky match"),
        ({"overlap_ratio": 0.8, "entropy_gap": 0.1}, "good match"),
        ({"overlap_ratio": 0.45, "entropy_gap": 0.5}, "fair match"),
        ({"overlap_ratio": math.nan, "entropy_gap": 0.5}, "unknown match"),
        ({}, "unknown match"),
    ],
)
def test_verdict_categories(metrics: dict[str, float], start: str) -> None:
    assert D.verdict(metrics).startswith(start)


def test_verdict_notes() -> None:
    base = {"overlap_ratio": 0.8, "entropy_gap": 0.1}
    assert ";" not in D.verdict(base)
    growing = {**base, "kl_turn/0": 0.05, "kl_turn/1": 0.1, "kl_turn/3": 0.4}
    assert "errors compound" in D.verdict(growing)
    flat = {**base, "kl_turn/0": 0.2, "kl_turn/1": 0.21}
    assert "errors compound" not in D.verdict(flat)
    assert "already close" in D.verdict({**base, "sampled_kl": 0.001})
    assert "disagree on the weights" in D.verdict({**base, "overlap_advantage": -0.6})


def test_verdict_notes_a_teacher_that_cannot_recover() -> None:
    base = {"overlap_ratio": 0.8, "entropy_gap": 0.1}
    assert "rarely recovers" in D.verdict({**base, "recovery_rate": 0.1})
    assert "rarely recovers" not in D.verdict({**base, "recovery_rate": 0.9})
    assert "rarely recovers" not in D.verdict({**base, "recovery_rate": math.nan})
