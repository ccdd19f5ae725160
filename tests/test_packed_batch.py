"""The one forward pass (agentopd.batch): packed rows with a shared prefix give the teacher's
scores and the learner's values and gradients of a dense, one-sequence-a-row forward (FSDP
off, no autocast), with sdpa and eager attention, on sequences of very different lengths."""

from __future__ import annotations

import copy

import pytest
import torch

from agentopd import zoo
from agentopd.batch import pack, pack_rows
from agentopd.learner import Learner, make_batch, segments_of
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.teachers import TeacherConfig
from agentopd.teachers.hf import HFTeacher
from agentopd.types import Episode, Segment

ATTENTION = ["sdpa", "eager"]


@pytest.fixture(scope="module")
def renderer():
    return Renderer(zoo.load_tokenizer())


@pytest.fixture(scope="module")
def episodes(renderer) -> list[Episode]:
    """Long expert episodes (1 to 4 hops) and short cuts of them: lengths differ ~10x, one
    environment's prompt is shared, and several cuts fit in one packed row."""
    jobs = [
        EpisodeJob("lookup-chain", s, {"split": "train"}, {"min_hops": h, "max_hops": h})
        for s, h in enumerate([1, 4, 2, 4])
    ]
    full = expert_episodes(jobs, renderer)
    cuts = []
    for ep in full:
        t, m = ep.segments[0].tokens, ep.segments[0].mask
        end = m.index(1) + 3
        cuts.append(Episode("cut", "c", segments=[Segment(t[:end], [0.0] * end, m[:end])]))
    return full + cuts


def _model(name: str, attention: str, seed: int):
    model = zoo.build_model(name, seed=seed)
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    return model


def _dense(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the logits and final hidden states of one sequence alone, ``[T, V]``
    and ``[T, H]``."""
    out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    return out.logits[0].float().log_softmax(-1), out.hidden_states[-1][0]


def test_the_batch_packs_and_shares_the_prefix(episodes):
    segs = [ep.segments[0] for ep in episodes]
    tb = pack([s.tokens for s in segs], [s.mask for s in segs], pad_id=0)
    P = tb.prefix_P.shape[0]
    assert P >= 8 and tb.tokens_R_W.shape[0] < len(segs)
    assert max(len(r) for r in pack_rows([len(s.tokens) - P for s in segs])) >= 3
    for b, s in enumerate(segs):  # the index maps lead back to each sequence's tokens
        start, n = int(tb.start_B[b]), int(tb.length_B[b])
        assert tb.tokens_R_W[tb.row_B[b], start : start + n].tolist() == s.tokens[P:]
        assert tb.positions_R_W[tb.row_B[b], start : start + n].tolist() == list(range(P, P + n))
    expected = [s.tokens[t + 1] for s in segs for t in range(len(s.tokens) - 1) if s.mask[t + 1]]
    assert tb.target_M.tolist() == expected
    ids, attention = tb.dense()
    assert [ids[b, : int(attention[b].sum())].tolist() for b in range(len(segs))] == [
        s.tokens for s in segs
    ]


@pytest.mark.parametrize("attention", ATTENTION)
def test_teacher_scores_match_a_dense_forward(attention, episodes, renderer):
    teacher = _model("tiny-teacher", attention, seed=1).eval()
    eps = copy.deepcopy(episodes)
    HFTeacher(teacher, renderer, TeacherConfig(topk=4, chunk_size=5), keep_hidden=True).score(eps)
    with torch.no_grad():
        for ep in eps:
            seg, [sc] = ep.segments[0], ep.teacher
            lp_T_V, hidden_T_H = _dense(teacher, seg.tokens)
            at = torch.from_numpy(sc.positions_M) - 1
            want = lp_T_V[at]
            assert sc.positions_M.tolist() == [t for t, m in enumerate(seg.mask) if m]
            torch.testing.assert_close(
                torch.from_numpy(sc.logprobs_M),
                want.gather(-1, torch.tensor(seg.tokens)[at + 1, None])[:, 0],
            )
            top_lp, top_ids = want.topk(4, -1)
            torch.testing.assert_close(torch.from_numpy(sc.topk_logprobs_M_K), top_lp)
            assert sc.topk_ids_M_K.tolist() == top_ids.tolist()
            entropy = -(want.exp() * want).sum(-1)
            torch.testing.assert_close(torch.from_numpy(sc.entropy_M), entropy)
            torch.testing.assert_close(sc.hidden_M_H, hidden_T_H[at], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION)
def test_learner_values_and_gradients_match_a_dense_forward(attention, episodes, renderer):
    student = _model("tiny", attention, seed=3)
    learner = Learner(student, pad_id=renderer.pad_id, topk=4)
    learner.loss_cfg.chunk_size = 7
    batch = make_batch(segments_of(episodes), renderer.pad_id, 4, with_teacher=False)
    assert batch.packed.prefix_P.shape[0] >= 8
    assert batch.packed.tokens_R_W.shape[0] < len(episodes)
    m = batch.mask_B_S
    support = torch.randint(0, 50, (*m.shape, 4), generator=torch.Generator().manual_seed(0))

    student.zero_grad(set_to_none=True)
    st = learner._student(batch, support[m], want_topk=True)
    (
        st.logprobs_B_T[m].sum() + st.support_logprobs_B_T_K[m].sum() + st.entropy_B_T[m].sum()
    ).backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    student.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for b, (ep, s) in enumerate(segments_of(episodes)):
        tokens = ep.segments[s].tokens
        lp_T_V, _ = _dense(student, tokens)
        at = m[b, : len(tokens) - 1].nonzero()[:, 0]
        want = lp_T_V[at]
        target = want.gather(-1, torch.tensor(tokens)[at + 1, None])[:, 0]
        on_support = want.gather(-1, support[b, at])
        entropy = -(want.exp() * want).sum(-1)
        total = total + target.sum() + on_support.sum() + entropy.sum()
        torch.testing.assert_close(st.logprobs_B_T[b, at], target.detach())
        torch.testing.assert_close(st.support_logprobs_B_T_K[b, at], on_support.detach())
        torch.testing.assert_close(st.entropy_B_T[b, at], entropy.detach())
        assert st.topk_ids_B_T_K[b, at].tolist() == want.topk(4, -1).indices.tolist()
        assert (st.logprobs_B_T[b][~m[b]] == 0).all()  # nothing projected off the mask
    total.backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_packed_and_one_a_row_batches_train_alike(share_prefix, episodes, renderer):
    """A whole OPD step from packed rows equals one from one-sequence-a-row batches."""
    teacher = zoo.build_model("tiny-teacher", seed=1).eval()
    eps = copy.deepcopy(episodes)
    HFTeacher(teacher, renderer, TeacherConfig(topk=4)).score(eps)
    runs = []
    for packed in (True, False):
        student = zoo.build_model("tiny", seed=3)
        learner = Learner(student, pad_id=renderer.pad_id, loss="rkl-topk", topk=4)
        batch = make_batch(
            segments_of(eps), renderer.pad_id, 4, True, share_prefix=share_prefix, packed=packed
        )
        st = learner._student(batch, batch.packed.teacher_topk_ids_M_K, want_topk=True)
        runs.append((st, batch))
    (a, ba), (b, bb) = runs
    assert ba.packed.tokens_R_W.shape[0] < bb.packed.tokens_R_W.shape[0]
    m = ba.mask_B_S
    for name in ("logprobs_B_T", "support_logprobs_B_T_K", "entropy_B_T", "topk_logprobs_B_T_K"):
        torch.testing.assert_close(getattr(a, name)[m], getattr(b, name)[m], msg=name)
