"""Teacher scoring (invariant 4) and the learner's masked updates (invariant 2)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from agentopd import losses, zoo
from agentopd.engines.hf import HFEngine
from agentopd.learner import Learner, LearnerConfig, make_batch, segments_of
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, RolloutConfig, expert_episodes, run_episodes
from agentopd.teachers import TeacherConfig, TokenizerMismatchError, check_tokenizers
from agentopd.teachers.hf import HFTeacher as Teacher


@pytest.fixture(scope="module")
def tok():
    return zoo.load_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok):
    return Renderer(tok)


@pytest.fixture(scope="module")
def episodes(renderer):
    torch.manual_seed(0)
    student = zoo.build_model("tiny", seed=0)
    engine = HFEngine(student, renderer.eot_id, renderer.pad_id)
    eps = run_episodes(
        [EpisodeJob("lookup-chain", i) for i in range(3)],
        engine,
        renderer,
        RolloutConfig(max_new_tokens=24),
        seed=0,
    )
    eps += expert_episodes(
        [EpisodeJob("lookup-chain", 10 + i, env_kwargs={"hops": 2}) for i in range(2)], renderer
    )
    return eps


@pytest.fixture(scope="module")
def teacher_model():
    return zoo.build_model("tiny-teacher", seed=1).eval()


def test_tokenizer_mismatch_is_refused(tok):
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ"):
        check_tokenizers(tok, other)
    check_tokenizers(tok, zoo.load_tokenizer())
    assert isinstance(tok, PreTrainedTokenizerFast)


def test_teacher_scores_the_students_exact_ids(episodes, renderer, teacher_model):
    teacher = Teacher(teacher_model, renderer, TeacherConfig(topk=5))
    teacher.score(episodes)
    for ep in episodes:
        for seg, sc in zip(ep.segments, ep.teacher, strict=True):
            assert sc.positions_M.tolist() == [t for t, m in enumerate(seg.mask) if m]
            with torch.no_grad():
                logp = torch.log_softmax(
                    teacher_model(input_ids=torch.tensor([seg.tokens])).logits[0].float(), -1
                )
            for i, p in enumerate(sc.positions_M.tolist()):
                assert sc.logprobs_M[i] == pytest.approx(
                    float(logp[p - 1, seg.tokens[p]]), abs=1e-4
                )
                assert sc.topk_ids_M_K[i].tolist() == logp[p - 1].topk(5).indices.tolist()


def test_teacher_privileged_context_realigns_positions(episodes, renderer, teacher_model):
    ep = copy.deepcopy(episodes[-1])
    teacher = Teacher(
        teacher_model,
        renderer,
        TeacherConfig(topk=3, system_prompt="You are the teacher.", privileged=True),
    )
    prompt = teacher.teacher_prompt(ep)
    seg = ep.segments[0]
    assert len(prompt) != seg.prompt_len
    assert "You are the teacher." in renderer.decode(prompt)
    assert ep.privileged_context and ep.privileged_context in renderer.decode(prompt)
    teacher.score([ep])
    full = prompt + seg.tokens[seg.prompt_len :]
    shift = len(prompt) - seg.prompt_len
    with torch.no_grad():
        logp = torch.log_softmax(
            teacher_model(input_ids=torch.tensor([full])).logits[0].float(), -1
        )
    sc = ep.teacher[0]
    for i, p in enumerate(sc.positions_M.tolist()):
        assert full[p + shift] == seg.tokens[p]
        assert sc.logprobs_M[i] == pytest.approx(
            float(logp[p + shift - 1, seg.tokens[p]]), abs=1e-4
        )


def _loss_and_grads(
    learner: Learner, batch, lp=None, topk_lp=None, ids=None
) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradient of ``batch``, with the teacher's ``[B, S]`` values (default: the
    batch's own) given as the loss and the support see them."""
    lp = batch.teacher_lp_B_S if lp is None else lp
    topk_lp = batch.teacher_topk_lp_B_S_K if topk_lp is None else topk_lp
    ids = batch.teacher_ids_B_S_K if ids is None else ids
    learner.model.zero_grad(set_to_none=True)
    st = learner._student(batch, ids[batch.mask_B_S], want_topk=True)
    inputs = losses.LossInputs(
        mask_B_T=batch.mask_B_S,
        old_logprobs_B_T=st.logprobs_B_T.detach(),
        teacher_logprobs_B_T=lp,
        teacher_topk_logprobs_B_T_K=topk_lp,
    )
    loss, _ = learner.loss(inputs, st, learner.loss_cfg)
    loss.backward()
    return float(loss.detach()), [
        p.grad.clone() for p in learner.model.parameters() if p.grad is not None
    ]


@pytest.mark.parametrize("loss", ["rkl-sampled", "rkl-topk", "fkl-topk", "jsd"])
def test_masked_positions_contribute_nothing(loss, episodes, renderer, teacher_model):
    Teacher(teacher_model, renderer, TeacherConfig(topk=4)).score(episodes)
    model = zoo.build_model("tiny", seed=3)
    learner = Learner(model, pad_id=renderer.pad_id, loss=loss, topk=4)
    learner.loss_cfg.chunk_size = 37
    batch = make_batch(segments_of(episodes), renderer.pad_id, 4, with_teacher=True)
    assert 0 < batch.tokens < batch.mask_B_S.numel()
    base_loss, base_grads = _loss_and_grads(learner, batch)
    assert base_loss != 0.0 and any(g.abs().sum() > 0 for g in base_grads)
    off = ~batch.mask_B_S
    for garbage in (float("nan"), float("inf"), -1e30, 123.0):
        loss_value, grads = _loss_and_grads(
            learner,
            batch,
            torch.where(off, torch.tensor(garbage), batch.teacher_lp_B_S),
            torch.where(off[..., None], torch.tensor(garbage), batch.teacher_topk_lp_B_S_K),
            torch.where(off[..., None], torch.tensor(1), batch.teacher_ids_B_S_K),
        )
        assert loss_value == base_loss
        for g, h in zip(grads, base_grads, strict=True):
            assert torch.equal(g, h)


def test_teacher_at_masked_positions_does_not_matter_end_to_end(episodes, renderer):
    """Two different teachers whose scores agree on sampled tokens give identical updates."""
    eps = copy.deepcopy(episodes)
    Teacher(zoo.build_model("tiny-teacher", seed=1), renderer, TeacherConfig(topk=4)).score(eps)
    model_a = zoo.build_model("tiny", seed=4)
    model_b = copy.deepcopy(model_a)
    la = Learner(model_a, pad_id=renderer.pad_id, loss="rkl-topk", topk=4)
    lb = Learner(model_b, pad_id=renderer.pad_id, loss="rkl-topk", topk=4)
    ma = la.step(eps)
    mb = lb.step(copy.deepcopy(eps))
    assert ma["learner/loss"] == mb["learner/loss"]
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sft_step_reduces_nll(renderer):
    demos = expert_episodes(
        [EpisodeJob("lookup-chain", i, env_kwargs={"hops": 1}) for i in range(8)], renderer
    )
    model = zoo.build_model("tiny", seed=0)
    learner = Learner(model, LearnerConfig(lr=3e-3), pad_id=renderer.pad_id)
    first = learner.step_sft(demos)["learner/loss"]
    for _ in range(15):
        last = learner.step_sft(demos)["learner/loss"]
    assert last < first - 0.5


def test_opd_step_reduces_teacher_kl(episodes, renderer, teacher_model):
    """A few rkl-topk steps on fixed episodes move the student towards the teacher."""
    eps = copy.deepcopy(episodes)
    Teacher(teacher_model, renderer, TeacherConfig(topk=8)).score(eps)
    model = zoo.build_model("tiny", seed=5)
    learner = Learner(
        model, LearnerConfig(lr=3e-3), pad_id=renderer.pad_id, loss="rkl-topk", topk=8
    )
    first = learner.step(eps)["learner/loss"]
    for _ in range(10):
        last = learner.step(eps)["learner/loss"]
    assert last < 0.7 * first


def test_sgd_opd_steps_reduce_teacher_kl(episodes, renderer, teacher_model):
    """optim.name=sgd builds plain SGD, and its updates move the student towards the teacher."""
    eps = copy.deepcopy(episodes)
    Teacher(teacher_model, renderer, TeacherConfig(topk=8)).score(eps)
    model = zoo.build_model("tiny", seed=5)
    learner = Learner(
        model,
        LearnerConfig(name="sgd", lr=0.5),
        pad_id=renderer.pad_id,
        loss="rkl-topk",
        topk=8,
    )
    assert type(learner.optimizer) is torch.optim.SGD
    first = learner.step(eps)["learner/loss"]
    for _ in range(10):
        last = learner.step(eps)["learner/loss"]
    assert last < 0.9 * first


def _grads_after_step(episodes, renderer, micro_batch: int, **loss_cfg) -> list[torch.Tensor]:
    model = zoo.build_model("tiny", seed=6)
    learner = Learner(
        model,
        LearnerConfig(name="sgd", lr=1e-12, micro_batch=micro_batch, grad_clip=0.0),
        pad_id=renderer.pad_id,
        loss="rkl-topk",
        topk=4,
    )
    for k, v in loss_cfg.items():
        setattr(learner.loss_cfg, k, v)
    metrics = learner.step(copy.deepcopy(episodes))
    assert metrics["learner/tokens"] > 0
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "selection",
    [
        {"entropy_top_frac": 0.4},
        {"overlap_only": True},
        {"entropy_top_frac": 0.5, "overlap_only": True},
    ],
)
def test_token_selection_is_global_so_micro_batch_does_not_change_the_gradient(
    selection, episodes, renderer, teacher_model
):
    eps = copy.deepcopy(episodes)
    Teacher(teacher_model, renderer, TeacherConfig(topk=4)).score(eps)
    assert len(segments_of(eps)) >= 4
    ref = _grads_after_step(eps, renderer, 64, **selection)
    for mb in (1, 3):
        got = _grads_after_step(eps, renderer, mb, **selection)
        num = sum(float((g - r).norm() ** 2) for g, r in zip(got, ref, strict=True)) ** 0.5
        den = sum(float(r.norm() ** 2) for r in ref) ** 0.5
        assert den > 0 and num / den < 1e-4, (mb, num / den)


def test_epochs_per_batch_makes_the_ppo_clip_act(episodes, renderer, teacher_model):
    eps = copy.deepcopy(episodes)
    Teacher(teacher_model, renderer, TeacherConfig(topk=4)).score(eps)

    def run(epochs: int) -> dict[str, float]:
        learner = Learner(
            zoo.build_model("tiny", seed=7),
            LearnerConfig(name="sgd", lr=2.0, epochs_per_batch=epochs, grad_clip=0.0),
            pad_id=renderer.pad_id,
            loss="rkl-sampled",
            topk=4,
        )
        return learner.step(copy.deepcopy(eps))

    one = run(1)
    assert one["learner/ratio_mean"] == pytest.approx(1.0) and one["learner/clip_frac"] == 0.0
    three = run(3)
    assert three["learner/epochs"] == 3.0
    assert three["learner/ratio_mean"] != pytest.approx(1.0, abs=1e-4)
    assert three["learner/clip_frac"] > 0.0


def test_an_hf_teacher_lends_its_model_to_the_teacher_engine(renderer, teacher_model, tmp_path):
    """Scoring and generating (demonstrations, guided-opd, the teacher's evaluation and
    recovery rate) share one copy of an in-process teacher."""
    from omegaconf import OmegaConf

    from agentopd.build import make_teacher_engine
    from agentopd.config import compose

    cfg = compose("train", ["env=lookup-chain"])
    teacher = Teacher(teacher_model, renderer)
    engine = make_teacher_engine(cfg, teacher, renderer, tmp_path, torch.device("cpu"))
    assert engine.model is teacher_model
    assert OmegaConf.select(cfg, "engine") == "hf"


def test_teacher_topk_above_the_vocabulary_is_refused_before_the_teacher_loads(tok, monkeypatch):
    from agentopd import build
    from agentopd.config import ConfigError, compose

    def never(*args, **kwargs):
        raise AssertionError("the teacher was loaded before teacher_cfg.topk was checked")

    monkeypatch.setattr(zoo, "load", never)
    cfg = compose("train", ["env=lookup-chain", "teacher_cfg.topk=100000"])
    with pytest.raises(ConfigError, match="vocabulary size"):
        build.make_teacher(cfg, tok, torch.device("cpu"))


def test_the_student_pass_projects_only_sampled_tokens_with_the_same_values_and_gradients(
    episodes, renderer
):
    """Projecting the output layer at mask-1 positions only gives, there, the values (log-prob,
    support log-probs, top-k, entropy) and the parameter gradients of projecting everywhere."""
    from agentopd.learner import student_pass

    model = zoo.build_model("tiny", seed=0)
    batch = make_batch(segments_of(episodes), renderer.pad_id, topk=4, with_teacher=False)
    support = torch.randint(0, 50, (*batch.target_B_S.shape, 4))
    args = (model, batch.input_ids_B_T, batch.attention_B_T, batch.target_B_S, support, 3, 64)
    m = batch.mask_B_S
    assert 0 < int(m.sum()) < m.numel()

    def grads(out):
        model.zero_grad()
        loss = (
            out["logprobs_B_T"][m].sum()
            + out["support_logprobs_B_T_K"][m].sum()
            + out["entropy_B_T"][m].sum()
        )
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full = student_pass(*args)
    g_full = grads(full)
    picked = student_pass(*args, m)
    g_picked = grads(picked)
    for name, value in full.items():
        if value is not None:
            assert torch.allclose(picked[name][m].float(), value[m].float(), atol=1e-5), name
            assert (picked[name][~m] == 0).all(), name  # nothing computed off the mask
    assert g_full.keys() == g_picked.keys()
    for n in g_full:
        assert torch.allclose(g_full[n], g_picked[n], atol=1e-5), n
