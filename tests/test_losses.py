"""Tests for agentopd.losses: hand-computed values, chunked == naive, and the mask invariant."""

from __future__ import annotations

import math

import pytest
import torch

from agentopd import logprobs as LP
from agentopd import losses as L

# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------


def _t(rows: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def test_rkl_sampled_on_policy_value_hand_computed() -> None:
    old = _t([[math.log(0.5), math.log(0.5), math.log(0.1)]])
    teacher = _t([[math.log(0.25), math.log(0.5), 123.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = L.rkl_sampled(old.clone().requires_grad_(), old, teacher, mask)
    # A = [ln .5, 0]; ratio = 1 -> loss = -(ln .5 + 0) / 2
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-12)
    assert m["kl_sampled"] == pytest.approx(math.log(2) / 2, abs=1e-12)
    assert m["tokens"] == 2.0
    assert m["clip_frac"] == 0.0


def test_rkl_sampled_clipping_hand_computed() -> None:
    old = _t([[math.log(0.2), math.log(0.2)]])
    new = old + math.log(1.5)  # ratio 1.5 on both tokens
    teacher = _t([[math.log(0.4), math.log(0.1)]])  # A = [+ln2, -ln2]
    loss, m = L.rkl_sampled(new, old, teacher, torch.ones(1, 2), clip_eps=0.2)
    a = math.log(2)
    # A > 0: min(1.5A, 1.2A) = 1.2A; A < 0: min(-1.5a, -1.2a) = -1.5a
    expected = (-(1.2 * a) + 1.5 * a) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["clip_frac"] == 1.0
    assert m["ratio_mean"] == pytest.approx(1.5)


def test_rkl_sampled_on_policy_gradient_is_policy_gradient() -> None:
    torch.manual_seed(0)
    old = torch.randn(2, 5, dtype=torch.float64) - 2
    teacher = torch.randn(2, 5, dtype=torch.float64) - 2
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    new = old.clone().requires_grad_()
    loss, _ = L.rkl_sampled(new, old, teacher, mask)
    loss.backward()
    n = mask.sum().item()
    expected = -(mask * (teacher - old)) / n  # d/dlogp of -sum(m * A * logp) / n
    torch.testing.assert_close(new.grad, expected, rtol=0, atol=1e-12)
    # And numerically, by central differences.
    eps = 1e-6
    for b, t in [(0, 0), (0, 3), (1, 4), (0, 2)]:
        bump = torch.zeros_like(old)
        bump[b, t] = eps
        lp = L.rkl_sampled(old + bump, old, teacher, mask)[0].item()
        lm = L.rkl_sampled(old - bump, old, teacher, mask)[0].item()
        assert (lp - lm) / (2 * eps) == pytest.approx(new.grad[b, t].item(), abs=1e-6)


# student support probs [.5, .3] (+ tail .2); teacher [.2, .6] (+ tail .2)
_S = [[[math.log(0.5), math.log(0.3)]]]
_Q = [[[math.log(0.2), math.log(0.6)]]]


def test_rkl_fkl_topk_hand_computed_with_tail() -> None:
    s, q, mask = _t(_S), _t(_Q), torch.ones(1, 1)
    rkl = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.6) + 0.2 * math.log(1.0)
    fkl = 0.2 * math.log(0.2 / 0.5) + 0.6 * math.log(0.6 / 0.3) + 0.2 * math.log(1.0)
    assert L.rkl_topk(s, q, mask, tail=True)[0].item() == pytest.approx(rkl, abs=1e-12)
    assert L.fkl_topk(s, q, mask, tail=True)[0].item() == pytest.approx(fkl, abs=1e-12)


def test_rkl_fkl_topk_hand_computed_renormalised() -> None:
    s, q, mask = _t(_S), _t(_Q), torch.ones(1, 1)
    p1, p2 = 0.5 / 0.8, 0.3 / 0.8
    q1, q2 = 0.2 / 0.8, 0.6 / 0.8
    rkl = p1 * math.log(p1 / q1) + p2 * math.log(p2 / q2)
    fkl = q1 * math.log(q1 / p1) + q2 * math.log(q2 / p2)
    assert L.rkl_topk(s, q, mask, tail=False)[0].item() == pytest.approx(rkl, abs=1e-12)
    assert L.fkl_topk(s, q, mask, tail=False)[0].item() == pytest.approx(fkl, abs=1e-12)


def test_jsd_half_hand_computed() -> None:
    s, q, mask = _t(_S), _t(_Q), torch.ones(1, 1)
    p, qq = [0.5, 0.3, 0.2], [0.2, 0.6, 0.2]
    m = [(a + b) / 2 for a, b in zip(p, qq)]
    expected = 0.5 * sum(b * math.log(b / c) for b, c in zip(qq, m)) + 0.5 * sum(
        a * math.log(a / c) for a, c in zip(p, m)
    )
    assert L.jsd(s, q, mask, beta=0.5)[0].item() == pytest.approx(expected, abs=1e-12)


def test_topk_kl_with_zero_teacher_probability_is_finite() -> None:
    s = _t([[[math.log(0.5), math.log(0.3)]]], requires_grad=True)
    q = _t([[[-math.inf, math.log(0.6)]]])
    for fn in (L.rkl_topk, L.fkl_topk, L.jsd):
        loss, _ = fn(s, q, torch.ones(1, 1))
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # FKL with q = 0 on a token: that token contributes exactly 0.
    fkl = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.2)
    assert L.fkl_topk(s, q, torch.ones(1, 1))[0].item() == pytest.approx(fkl, abs=1e-12)


# --------------------------------------------------------------------------------------------
# JSD limits, tail bucket, aggregation
# --------------------------------------------------------------------------------------------


def _random_support(seed: int, B: int = 2, T: int = 4, V: int = 12, K: int = 4):
    g = torch.Generator().manual_seed(seed)
    p = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(2 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    ids = q.topk(K, -1).indices
    return p.gather(-1, ids), q.gather(-1, ids)


@pytest.mark.parametrize("tail", [True, False])
def test_jsd_limits_equal_fkl_and_rkl(tail: bool) -> None:
    s, q = _random_support(1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    fkl = L.fkl_topk(s, q, mask, tail=tail)[0]
    rkl = L.rkl_topk(s, q, mask, tail=tail)[0]
    assert torch.equal(L.jsd(s, q, mask, beta=0.0, tail=tail)[0], fkl)
    assert torch.equal(L.jsd(s, q, mask, beta=1.0, tail=tail)[0], rkl)
    assert fkl.item() != pytest.approx(rkl.item(), rel=1e-3)
    eps = 1e-4  # the interior formula approaches the ends continuously
    assert (L.jsd(s, q, mask, beta=eps, tail=tail)[0] / eps).item() == pytest.approx(
        fkl.item(), rel=1e-2
    )
    assert (L.jsd(s, q, mask, beta=1 - eps, tail=tail)[0] / eps).item() == pytest.approx(
        rkl.item(), rel=1e-2
    )


def test_jsd_rejects_beta_out_of_range() -> None:
    s, q = _random_support(0)
    with pytest.raises(ValueError, match="beta"):
        L.jsd(s, q, torch.ones(2, 4), beta=1.5)


def test_tail_bucket_sums_to_one() -> None:
    s, q = _random_support(2, K=5)
    for lp in (s, q, s.float()):
        full = L.with_tail(lp)
        assert full.shape[-1] == 6
        torch.testing.assert_close(
            full.exp().sum(-1), torch.ones_like(full[..., 0]), rtol=0, atol=1e-6
        )
    # Support holding all the mass: tail stays finite, total still 1.
    whole = torch.log_softmax(torch.randn(3, 1, 4), -1)
    full = L.with_tail(whole)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(3, 1), rtol=0, atol=1e-6)


def test_aggregation_modes_on_unequal_lengths() -> None:
    values = torch.tensor([[4.0, 9.0, 9.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]])  # lengths 1, 3 and 0
    assert L.aggregate(values, mask, "token-mean").item() == pytest.approx(7 / 4)
    # the empty third sequence is excluded from the sequence mean
    assert L.aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(5 / 2)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        L.aggregate(values, mask, "mean")


def test_losses_accept_agg_and_empty_mask_gives_zero_with_grad() -> None:
    s, q = _random_support(3)
    s = s.requires_grad_()
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    a = L.rkl_topk(s, q, mask, agg="token-mean")[0]
    b = L.rkl_topk(s, q, mask, agg="seq-mean-token-mean")[0]
    assert a.item() != pytest.approx(b.item())
    empty, _ = L.rkl_topk(s, q, torch.zeros(2, 4))
    assert empty.item() == 0.0
    (g,) = torch.autograd.grad(empty, s)
    assert torch.count_nonzero(g) == 0


# --------------------------------------------------------------------------------------------
# THE MASK TEST: teacher values at mask-0 positions change neither loss nor gradient
# --------------------------------------------------------------------------------------------

_POISON = [math.nan, math.inf, -math.inf, 1e30, -1e30]


def _sampled_inputs():
    torch.manual_seed(4)
    new = torch.randn(2, 6, dtype=torch.float64) - 3
    old = new.detach() + 0.3 * torch.randn(2, 6, dtype=torch.float64)
    teacher = torch.randn(2, 6, dtype=torch.float64) - 3
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    return new, old, teacher, mask


def _loss_and_grad(name: str, student, teacher, mask, old=None, **kw):
    student = student.detach().clone().requires_grad_()
    if name == "rkl-sampled":
        loss, _ = L.rkl_sampled(student, old, teacher, mask, **kw)
    elif name == "jsd-0.3":
        loss, _ = L.jsd(student, teacher, mask, beta=0.3, **kw)
    else:
        loss, _ = {"rkl-topk": L.rkl_topk, "fkl-topk": L.fkl_topk, "jsd": L.jsd}[name](
            student, teacher, mask, **kw
        )
    (g,) = torch.autograd.grad(loss, student)
    return loss.detach(), g


@pytest.mark.parametrize("poison", _POISON)
@pytest.mark.parametrize("agg", L.AGGREGATIONS)
def test_mask_rkl_sampled_ignores_masked_teacher_old_and_student(poison: float, agg: str) -> None:
    new, old, teacher, mask = _sampled_inputs()
    ref = _loss_and_grad("rkl-sampled", new, teacher, mask, old=old, agg=agg)
    off = mask == 0
    bad_t, bad_o, bad_n = teacher.clone(), old.clone(), new.detach().clone()
    bad_t[off], bad_o[off], bad_n[off] = poison, -poison, poison
    got = _loss_and_grad("rkl-sampled", bad_n, bad_t, mask, old=bad_o, agg=agg)
    assert torch.isfinite(ref[0])
    assert torch.equal(ref[0], got[0])
    assert torch.equal(ref[1], got[1])


@pytest.mark.parametrize("poison", _POISON)
@pytest.mark.parametrize("name", ["rkl-topk", "fkl-topk", "jsd", "jsd-0.3"])
@pytest.mark.parametrize("tail", [True, False])
def test_mask_topk_losses_ignore_masked_teacher(poison: float, name: str, tail: bool) -> None:
    s, q = _random_support(5, T=6)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    ref = _loss_and_grad(name, s, q, mask, tail=tail)
    bad_q, bad_s = q.clone(), s.clone()
    bad_q[mask == 0] = poison
    bad_s[mask == 0] = -poison
    bad_q[0, 2, 1] = math.nan  # one mixed position too
    got = _loss_and_grad(name, bad_s, bad_q, mask, tail=tail)
    assert torch.isfinite(ref[0]) and ref[0].item() > 0
    assert torch.equal(ref[0], got[0])
    assert torch.equal(ref[1], got[1])


def test_every_registered_loss_is_covered_by_the_mask_tests() -> None:
    from agentopd import registry

    assert {"rkl-sampled", "rkl-topk", "fkl-topk", "jsd"} <= set(registry.losses.names())


def test_mask_end_to_end_through_chunked_logprobs() -> None:
    torch.manual_seed(6)
    B, T, H, V = 2, 5, 8, 11
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    teacher = torch.randn(B, T, dtype=torch.float64) - 2

    def run(teacher_B_T: torch.Tensor):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp = LP.chunked_token_logprobs(h, w, targets, chunk_size=3).logprobs_B_T
        loss, _ = L.rkl_sampled(lp, lp.detach(), teacher_B_T, mask)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    ref = run(teacher)
    for poison in _POISON:
        bad = teacher.clone()
        bad[mask == 0] = poison
        got = run(bad)
        for a, b in zip(ref, got):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Chunked log-probs == naive full logits
# --------------------------------------------------------------------------------------------


def _naive(hidden, weight, bias, targets, ids, k, temperature=1.0):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    lp = torch.log_softmax(logits / temperature, -1)
    top = lp.topk(k, -1)
    return (
        lp.gather(-1, targets[..., None]).squeeze(-1),
        lp.gather(-1, ids),
        top.indices,
        top.values,
        -(lp.exp() * lp).sum(-1),
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_matches_naive_values_and_gradients(chunk_size: int, with_bias: bool) -> None:
    torch.manual_seed(7)
    B, T, H, V, K = 3, 5, 6, 17, 4  # 15 tokens: chunk 4 and 7 do not divide it
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    bias = torch.randn(V, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, V, (B, T))
    ids = torch.randint(0, V, (B, T, K))
    probe = [torch.randn(B, T, dtype=torch.float64) for _ in range(2)] + [
        torch.randn(B, T, K, dtype=torch.float64) for _ in range(2)
    ]

    def run(chunked: bool):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        b = bias.clone().requires_grad_() if bias is not None else None
        if b is not None:
            leaves.append(b)
        if chunked:
            out = LP.chunked_token_logprobs(
                leaves[0],
                leaves[1],
                targets,
                lm_head_bias_V=b,
                chunk_size=chunk_size,
                topk_ids_B_T_K=ids,
                student_topk=K,
                return_entropy=True,
                temperature=0.7,
            )
            vals = (
                out.logprobs_B_T,
                out.support_logprobs_B_T_K,
                out.topk_ids_B_T_K,
                out.topk_logprobs_B_T_K,
                out.entropy_B_T,
            )
        else:
            vals = _naive(leaves[0], leaves[1], b, targets, ids, K, temperature=0.7)
        lp, sup, _, top, ent = vals
        scalar = (
            (probe[0] * lp).sum()
            + (probe[1] * ent).sum()
            + (probe[2] * sup).sum()
            + (probe[3] * top).sum()
        )
        grads = torch.autograd.grad(scalar, leaves)
        return [v.detach() for v in vals], grads

    (c_vals, c_grads), (n_vals, n_grads) = run(True), run(False)
    assert c_vals[0].shape == (B, T) and c_vals[1].shape == (B, T, K)
    assert torch.equal(c_vals[2], n_vals[2])
    for a, b in zip(c_vals, n_vals):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(c_grads, n_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunked_float32_matches_naive_to_1e5() -> None:
    torch.manual_seed(8)
    hidden, weight = torch.randn(2, 9, 16), torch.randn(300, 16) * 0.3
    targets = torch.randint(0, 300, (2, 9))
    got = LP.chunked_token_logprobs(hidden, weight, targets, chunk_size=4).logprobs_B_T
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_chunked_without_grad_builds_no_graph() -> None:
    hidden, weight = torch.randn(1, 4, 3, requires_grad=True), torch.randn(5, 3)
    with torch.no_grad():
        out = LP.chunked_token_logprobs(hidden, weight, torch.zeros(1, 4, dtype=torch.long))
    assert out.logprobs_B_T.grad_fn is None
    assert out.support_logprobs_B_T_K is None and out.entropy_B_T is None


def test_chunked_under_bf16_autocast_returns_float32() -> None:
    torch.manual_seed(9)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = LP.chunked_token_logprobs(hidden, weight, targets, chunk_size=5).logprobs_B_T
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, ref, rtol=0, atol=0.2)  # bf16 matmul, fp32 softmax


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_under_bf16_autocast_on_cuda() -> None:
    hidden = torch.randn(2, 64, 32, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 32, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp = LP.chunked_token_logprobs(hidden, weight, targets, chunk_size=48).logprobs_B_T
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_chunked_rejects_bad_arguments() -> None:
    h, w = torch.randn(1, 2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        LP.chunked_token_logprobs(h, w, torch.zeros(1, 2, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="target_ids_B_T"):
        LP.chunked_token_logprobs(h, w, torch.zeros(2, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------


def test_select_entropy_top_frac_keeps_right_fraction() -> None:
    entropy = torch.tensor(
        [[0.1, 0.9, 5.0, 0.3, 0.7], [0.2, 0.8, 0.4, 9.0, math.nan]], dtype=torch.float32
    )
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]])  # 7 masked; 5.0, 9.0, nan are off
    kept = L.select_entropy_top_frac(entropy, mask, 0.3)  # ceil(2.1) = 3
    expected = torch.tensor([[0, 1, 0, 0, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(kept, expected)
    assert int(L.select_entropy_top_frac(entropy, mask, 0.0).sum()) == 0
    assert torch.equal(L.select_entropy_top_frac(entropy, mask, 1.0), mask.bool())
    four = torch.ones(1, 10)
    assert int(L.select_entropy_top_frac(torch.rand(1, 10), four, 0.3).sum()) == 3
    with pytest.raises(ValueError, match="frac"):
        L.select_entropy_top_frac(entropy, mask, 1.5)


def test_select_overlap_only() -> None:
    student = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9]]])
    teacher = torch.tensor([[[3, 2, 0], [0, 10, 11], [9, 12, 13]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(
        L.select_overlap_only(student, teacher, mask), torch.tensor([[True, False, False]])
    )
    assert torch.equal(
        L.select_overlap_only(student, teacher, torch.ones(1, 3), min_overlap=2),
        torch.tensor([[True, False, False]]),
    )
    assert torch.equal(L.topk_overlap_count(student, teacher), torch.tensor([[2, 0, 1]]))


# --------------------------------------------------------------------------------------------
# gamma-discounted KL advantage (loss_cfg.kl_discount)
# --------------------------------------------------------------------------------------------


def _rkl_sampled_reference(new, old, teacher, mask, clip_eps=0.2):
    """The per-token-advantage objective written out independently (token-mean)."""
    m = mask.bool()
    adv = torch.where(m, teacher.detach(), 0.0) - torch.where(m, old.detach(), 0.0)
    ratio = torch.exp(torch.where(m, new, 0.0) - torch.where(m, old.detach(), 0.0))
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    return torch.where(m, per_token, 0.0).sum() / m.sum()


@pytest.mark.parametrize("discount_mask", [False, True])
def test_kl_discount_zero_is_the_per_token_advantage_bit_for_bit(discount_mask: bool) -> None:
    torch.manual_seed(3)
    old = torch.randn(3, 9) - 2
    teacher = torch.randn(3, 9) - 2
    mask = torch.rand(3, 9) > 0.4
    student = mask | (torch.rand(3, 9) > 0.5) if discount_mask else None
    base = old + 0.3 * torch.randn(3, 9)  # off-policy, so the clip and ratio take part
    grads = []
    for kwargs in ({}, {"kl_discount": 0.0, "discount_mask_B_T": student}):
        new = base.clone().requires_grad_()
        loss, metrics = L.rkl_sampled(new, old, teacher, mask, **kwargs)
        loss.backward()
        grads.append((loss.detach(), new.grad, metrics))
    (l0, g0, m0), (l1, g1, m1) = grads
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and m0 == m1
    new = base.clone().requires_grad_()
    ref = _rkl_sampled_reference(new, old, teacher, mask)
    assert torch.equal(ref.detach(), l0)


def test_discounted_future_sum_hand_computed() -> None:
    values = _t([[1.0, 2.0, 99.0, 4.0, 8.0], [5.0, -1.0, 3.0, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 1]])
    out = L.discounted_future_sum(values, mask, 0.5)
    # Row 0, student tokens 1, 2, 4 (the 99 at a masked-out position is never read):
    #   4 ; 2 + .5 * 4 = 4 ; 1 + .5 * 4 = 3. The tool-result gap at index 2 adds no discount.
    # Row 1: 7 ; 3 + .5 * 7 = 6.5 ; -1 + .5 * 6.5 = 2.25.
    expected = _t([[3.0, 4.0, 0.0, 4.0, 0.0], [0.0, 2.25, 6.5, 0.0, 7.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(L.discounted_future_sum(values, mask, 0.0), values * mask)
    torch.testing.assert_close(
        L.discounted_future_sum(values, mask, 1.0)[0, 0], torch.tensor(7.0, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="gamma must be in"):
        L.discounted_future_sum(values, mask, 1.5)


def test_rkl_sampled_with_kl_discount_hand_computed() -> None:
    # Teacher-minus-student advantages a = [ln .5, ln 2, ln .25] on tokens 0, 1, 3.
    old = _t([[math.log(0.4), math.log(0.2), 0.0, math.log(0.8)]])
    teacher = _t([[math.log(0.2), math.log(0.4), 55.0, math.log(0.2)]])
    mask = torch.tensor([[1, 1, 0, 1]])
    a0, a1, a3 = math.log(0.5), math.log(2.0), math.log(0.25)
    g = 0.9
    discounted = [a0 + g * a1 + g * g * a3, a1 + g * a3, a3]
    new = old.clone().requires_grad_()
    loss, m = L.rkl_sampled(new, old, teacher, mask, kl_discount=g)
    assert loss.item() == pytest.approx(-sum(discounted) / 3, abs=1e-12)
    assert m["advantage_mean"] == pytest.approx(sum(discounted) / 3, abs=1e-12)
    assert m["kl_sampled"] == pytest.approx(-(a0 + a1 + a3) / 3, abs=1e-12)  # undiscounted
    loss.backward()
    expected = _t([[-discounted[0] / 3, -discounted[1] / 3, 0.0, -discounted[2] / 3]])
    torch.testing.assert_close(new.grad, expected, rtol=0, atol=1e-12)
    # Token selection dropped token 1 from the loss: its KL still counts in token 0's advantage.
    sel = torch.tensor([[1, 0, 0, 1]])
    new = old.clone().requires_grad_()
    loss, _ = L.rkl_sampled(new, old, teacher, sel, kl_discount=g, discount_mask_B_T=mask)
    assert loss.item() == pytest.approx(-(discounted[0] + discounted[2]) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="kl_discount"):
        L.rkl_sampled(new, old, teacher, mask, kl_discount=-0.1)


def test_kl_discount_is_a_validated_config_key_that_reaches_the_loss() -> None:
    from agentopd.config import ConfigError, compose

    cfg = compose("train", ["loss=rkl-sampled", "loss_cfg.kl_discount=0.95"])
    assert cfg.loss_cfg.kl_discount == 0.95
    with pytest.raises(ConfigError, match="kl_discount"):
        compose("train", ["loss=rkl-sampled", "loss_cfg.kl_discount=1.5"])
    old = _t([[math.log(0.4), math.log(0.2)]])
    teacher = _t([[math.log(0.2), math.log(0.4)]])
    inputs = L.LossInputs(torch.ones(1, 2, dtype=torch.bool), old, teacher, teacher[..., None])
    student = LP.TokenLogprobs(logprobs_B_T=old.clone().requires_grad_())
    plain, _ = L.RKL_SAMPLED(inputs, student, L.RklSampledConfig())
    discounted, _ = L.RKL_SAMPLED(inputs, student, L.RklSampledConfig(kl_discount=0.5))
    a0, a1 = math.log(0.5), math.log(2.0)
    assert plain.item() == pytest.approx(-(a0 + a1) / 2)
    assert discounted.item() == pytest.approx(-(a0 + 0.5 * a1 + a1) / 2)


def test_mask_parse_errors_keeps_a_malformed_turn_out_of_the_loss_batch() -> None:
    """rollout.mask_parse_errors: the learner's batch trains on the well-formed turn only."""
    from agentopd import zoo
    from agentopd.engines import Sample
    from agentopd.learner import make_batch
    from agentopd.renderer import Renderer
    from agentopd.rollout import EpisodeJob, RolloutConfig, run_episodes

    renderer = Renderer(zoo.load_tokenizer())
    bad = '<tool_call>{"name": "lookup", "arguments": {"key": </tool_call>'
    good = '<tool_call>{"name": "lookup", "arguments": {"key": "a00"}}</tool_call>'

    class TwoTurns:
        def __init__(self) -> None:
            self.texts = [bad, good]

        def generate(self, prompts, params):
            toks = renderer.encode(self.texts.pop(0)) + [renderer.eot_id]
            return [Sample(tokens=toks, logprobs=[-0.5] * len(toks), finished=True)] * len(prompts)

        def load_weights(self, state_dict) -> None:
            pass

    for flag in (False, True):
        [ep] = run_episodes(
            [EpisodeJob("lookup-chain", 1, options={"max_turns": 2})],
            TwoTurns(),
            renderer,
            RolloutConfig(mask_parse_errors=flag),
        )
        first, second = ep.turns
        assert first.parse_error and not second.parse_error
        batch = make_batch([(ep, 0)], renderer.pad_id, 4, with_teacher=False)
        trained = {int(t) + 1 for t in batch.mask_B_S[0].nonzero().flatten()}
        good_pos = set(range(second.start, second.end))
        bad_pos = set(range(first.start, first.end))
        assert trained == (good_pos if flag else good_pos | bad_pos)


def test_chunks_are_capped_in_logits_and_give_the_same_values(monkeypatch) -> None:
    """With a large vocabulary a chunk holds at most CHUNK_LOGITS logits (fewer positions than
    chunk_size); values and gradients match the uncapped computation up to float rounding."""
    g = torch.Generator().manual_seed(0)
    V, H = 5_000, 8
    h = torch.randn(2, 30, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    t = torch.randint(0, V, (2, 30), generator=g)
    seen: list[int] = []
    real = LP._chunk_logits

    def spy(hidden, *args, **kw):
        seen.append(hidden.shape[0])
        return real(hidden, *args, **kw)

    def run() -> list[torch.Tensor]:
        o = LP.chunked_token_logprobs(h, w, t, chunk_size=1024, student_topk=3, return_entropy=True)
        grads = torch.autograd.grad(o.logprobs_B_T.sum() + o.entropy_B_T.sum(), (h, w))
        return [o.logprobs_B_T.detach(), o.entropy_B_T.detach(), *grads]

    monkeypatch.setattr(LP, "_chunk_logits", spy)
    uncapped = run()
    assert max(seen) == 60  # every position in one chunk
    seen.clear()
    monkeypatch.setattr(LP, "CHUNK_LOGITS", 7 * V)
    capped = run()
    assert max(seen) == 7 and sum(seen) == 2 * 60  # forward and backward, 7 positions a chunk
    for a, b in zip(uncapped, capped, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
