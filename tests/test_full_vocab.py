"""Exact full-vocabulary objectives (rkl-full, fkl-full, jsd-full) and the diag/true_rkl metric.

Against dense references: random heads in float64 (the kernel alone) and the tiny models (the
learner's pass, teacher hidden states from the hf teacher). Tolerances: 1e-12 in float64; in
float32 5e-6 on per-token values and rtol 1e-4 / atol 1e-7 on gradients (chunking and the
analytic backward change the order of float32 sums only).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import agentopd

from agentopd import logprobs, losses, zoo
from agentopd.cli import main
from agentopd.engines.hf import HFEngine
from agentopd.learner import Learner, make_batch, segments_of
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, RolloutConfig, expert_episodes, run_episodes
from agentopd.teachers import TeacherConfig
from agentopd.teachers.hf import HFTeacher
from agentopd.types import Episode, drop_teacher_hidden

BETAS = {"rkl-full": 1.0, "fkl-full": 0.0, "jsd-full": 0.3}


def dense_divergence(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """The reference: per-row JSD_beta from whole [N, V] log-prob matrices."""
    p, q = lp.exp(), lq.exp()
    if beta == 1.0:
        return (p * (lp - lq)).sum(-1)
    if beta == 0.0:
        return (q * (lq - lp)).sum(-1)
    lm = (beta * q + (1 - beta) * p).log()
    return beta * (q * (lq - lm)).sum(-1) + (1 - beta) * (p * (lp - lm)).sum(-1)


def _dense_head(h: torch.Tensor, head: logprobs.OutputHead) -> torch.Tensor:
    z = h @ head.weight_V_H.T
    if head.bias_V is not None:
        z = z + head.bias_V
    z = z * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z.log_softmax(-1)


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_kernel_values_and_student_gradients_match_dense(beta, softcap, monkeypatch):
    g = torch.Generator().manual_seed(0)
    N, H, Ht, V = 9, 5, 7, 13
    f64 = {"dtype": torch.float64, "generator": g}
    hs = torch.randn(N, H, **f64).requires_grad_()
    w = torch.randn(V, H, **f64).requires_grad_()
    b = torch.randn(V, **f64).requires_grad_()
    ht = torch.randn(N, Ht, **f64).requires_grad_()
    wt = torch.randn(V, Ht, **f64).requires_grad_()
    head = logprobs.OutputHead(w, b, scale=0.7, softcap=softcap)
    teacher = logprobs.OutputHead(wt, None, scale=1.3, softcap=2.0)
    upstream = torch.randn(N, **f64)
    shapes: list[tuple[int, ...]] = []
    real = logprobs._head_logits

    def spy(h, *args):
        shapes.append(tuple(h.shape))
        return real(h, *args)

    monkeypatch.setattr(logprobs, "_head_logits", spy)
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 4 * V)  # 4 positions a chunk, N = 9
    div, rkl = logprobs.chunked_divergence(hs, head, ht, teacher, beta=beta, chunk_size=100)
    (div * upstream).sum().backward()
    got = [x.grad.clone() for x in (hs, w, b)]
    assert ht.grad is None and wt.grad is None  # the teacher gets no gradient
    assert shapes and max(s[0] for s in shapes) == 4  # never N x V at once

    for x in (hs, w, b):
        x.grad = None
    lp, lq = _dense_head(hs, head), _dense_head(ht.detach(), teacher)
    ref = dense_divergence(lp, lq, beta)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(div, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(rkl, dense_divergence(lp, lq, 1.0).detach(), rtol=0, atol=1e-12)
    for mine, x in zip(got, (hs, w, b), strict=True):
        torch.testing.assert_close(mine, x.grad, rtol=0, atol=1e-12)


def test_kernel_refuses_mismatched_vocabularies():
    a = logprobs.OutputHead(torch.randn(10, 4))
    b = logprobs.OutputHead(torch.randn(11, 4))
    with pytest.raises(ValueError, match="vocabulary size: 10 vs 11"):
        logprobs.chunked_divergence(torch.randn(3, 4), a, torch.randn(3, 4), b)


# --------------------------------------------------------------------------------------------
# The learner on the tiny models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renderer():
    return Renderer(zoo.load_tokenizer())


@pytest.fixture(scope="module")
def episodes(renderer) -> list[Episode]:
    student = zoo.build_model("tiny", seed=0)
    engine = HFEngine(student, renderer.eot_id, renderer.pad_id)
    eps = run_episodes(
        [EpisodeJob("lookup-chain", i) for i in range(2)],
        engine,
        renderer,
        RolloutConfig(max_new_tokens=16),
        seed=0,
    )
    eps += expert_episodes([EpisodeJob("lookup-chain", 10, env_kwargs={"hops": 2})], renderer)
    return eps


@pytest.fixture(scope="module")
def teacher_model():
    # Trainable on purpose: the test checks that no gradient reaches it.
    return zoo.build_model("tiny-teacher", seed=1)


def _scored(episodes, renderer, teacher_model) -> tuple[list[Episode], HFTeacher]:
    eps = copy.deepcopy(episodes)
    teacher = HFTeacher(teacher_model, renderer, TeacherConfig(topk=4), keep_hidden=True)
    teacher.score(eps)
    return eps, teacher


def _dense_logprobs(model, batch) -> torch.Tensor:
    """Whole-vocabulary log-probs at the batch's mask-1 positions, [M, V], one plain forward."""
    logits = model(input_ids=batch.input_ids_B_T, attention_mask=batch.attention_B_T).logits
    return logits[:, :-1][batch.mask_B_S].float().log_softmax(-1)


@pytest.mark.parametrize("loss", list(BETAS))
def test_learner_loss_and_gradients_match_dense(
    loss, episodes, renderer, teacher_model, monkeypatch
):
    eps, teacher = _scored(episodes, renderer, teacher_model)
    V = teacher.output_head().vocab
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 7 * V)  # 7 positions a chunk
    student = zoo.build_model("tiny", seed=3)
    cfg = losses.JsdFullConfig(beta=BETAS[loss]) if loss == "jsd-full" else None
    learner = Learner(
        student,
        pad_id=renderer.pad_id,
        loss=loss,
        loss_cfg=cfg,
        topk=4,
        teacher_head=teacher.output_head(),
    )
    batch = make_batch(segments_of(eps), renderer.pad_id, 4, with_teacher=True)
    assert batch.teacher_hidden_M_H is not None
    M = batch.tokens
    assert M > 7 and batch.teacher_hidden_M_H.shape[0] == M

    st = learner._student(batch, None, want_topk=False, full_vocab=True)
    inputs = losses.LossInputs(
        mask_B_T=batch.mask_B_S,
        old_logprobs_B_T=st.logprobs_B_T.detach(),
        teacher_logprobs_B_T=batch.teacher_lp_B_S,
        teacher_topk_logprobs_B_T_K=batch.teacher_topk_lp_B_S_K,
    )
    value, metrics = learner.loss(inputs, st, learner.loss_cfg)
    value.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert all(p.grad is None for p in teacher_model.parameters())

    student.zero_grad(set_to_none=True)
    lp = _dense_logprobs(student, batch)
    with torch.no_grad():
        lq = _dense_logprobs(teacher_model, batch)
    per_token = dense_divergence(lp, lq, BETAS[loss])
    ref = per_token.mean()
    ref.backward()
    assert float(value.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=5e-6)
    torch.testing.assert_close(
        st.divergence_B_T[batch.mask_B_S], per_token.detach(), rtol=1e-5, atol=5e-6
    )
    true_rkl = dense_divergence(lp, lq, 1.0).detach()
    torch.testing.assert_close(st.reverse_kl_B_T[batch.mask_B_S], true_rkl, rtol=1e-5, atol=5e-6)
    assert metrics["true_rkl"] == pytest.approx(float(true_rkl.mean()), rel=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    assert all(p.grad is None for p in teacher_model.parameters())


@pytest.mark.parametrize("loss", ["rkl-sampled", "rkl-topk", "rkl-full"])
def test_every_step_reports_the_true_reverse_kl(loss, episodes, renderer, teacher_model):
    eps, teacher = _scored(episodes, renderer, teacher_model)
    student = zoo.build_model("tiny", seed=4)
    batch = make_batch(segments_of(eps), renderer.pad_id, 4, with_teacher=True)
    with torch.no_grad():
        expected = float(
            dense_divergence(
                _dense_logprobs(student, batch), _dense_logprobs(teacher_model, batch), 1.0
            ).mean()
        )
    learner = Learner(
        student, pad_id=renderer.pad_id, loss=loss, topk=4, teacher_head=teacher.output_head()
    )
    assert learner.measure(eps)["diag/true_rkl"] == pytest.approx(expected, rel=1e-5)
    row = learner.step(eps)
    assert row["diag/true_rkl"] == pytest.approx(expected, rel=1e-5)  # before the update
    assert learner.measure(eps)["diag/true_rkl"] < expected  # the update moved towards q


def test_without_an_in_process_teacher_there_is_no_true_kl(episodes, renderer, teacher_model):
    eps = copy.deepcopy(episodes)
    HFTeacher(teacher_model, renderer, TeacherConfig(topk=4)).score(eps)  # no hidden kept
    learner = Learner(zoo.build_model("tiny", seed=4), pad_id=renderer.pad_id, topk=4)
    assert "diag/true_rkl" not in learner.step(eps)
    with pytest.raises(ValueError, match="teacher's output head"):
        Learner(zoo.build_model("tiny", seed=4), pad_id=renderer.pad_id, loss="rkl-full")
    full = Learner(
        zoo.build_model("tiny", seed=4),
        pad_id=renderer.pad_id,
        loss="rkl-full",
        topk=4,
        teacher_head=logprobs.output_head(teacher_model),
    )
    with pytest.raises(ValueError, match="keep_hidden=True"):
        full.step(eps)


def test_hidden_states_are_never_serialized_and_are_dropped(episodes, renderer, teacher_model):
    eps, _ = _scored(episodes, renderer, teacher_model)
    sc = next(s for ep in eps for s in ep.teacher if s is not None and len(s))
    assert sc.hidden_M_H.shape == (len(sc), teacher_model.config.hidden_size)
    for ep in eps:
        d = json.loads(ep.to_json())
        assert all("hidden_M_H" not in t for t in d["teacher"] if t is not None)
        back = Episode.from_json(ep.to_json())
        assert all(t is None or t.hidden_M_H is None for t in back.teacher)
    drop_teacher_hidden(eps)
    assert all(s is None or s.hidden_M_H is None for ep in eps for s in ep.teacher)


# --------------------------------------------------------------------------------------------
# Refusals and the real command
# --------------------------------------------------------------------------------------------

BASE = ["env=lookup-chain", "steps=1", "episodes_per_step=2", "cold_start.steps=0"]


@pytest.mark.parametrize("backend", ["vllm", "server"])
def test_full_vocab_loss_refuses_a_teacher_that_is_not_in_process(backend, tmp_path, capsys):
    rc = main(
        ["train", *BASE, "loss=rkl-full", f"teacher_backend={backend}", f"runs_dir={tmp_path}"]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert f"bad value '{backend}' for 'teacher_backend'" in err
    assert "expected teacher_backend=hf" in err and "rkl-topk" in err
    assert not any(tmp_path.iterdir())


def test_full_vocab_loss_refuses_different_vocabularies(renderer, teacher_model):
    from omegaconf import OmegaConf

    from agentopd.build import full_vocab_head
    from agentopd.config import ConfigError

    cfg = OmegaConf.create({"loss": "fkl-full", "loss_cfg": {}, "teacher_backend": "hf"})
    student = zoo.build_model("tiny", seed=0)
    V = logprobs.output_head(student).vocab
    wider = copy.deepcopy(teacher_model)
    wider.resize_token_embeddings(V + 8)
    with pytest.raises(ConfigError, match=rf"'loss'.*has {V} rows and the teacher's {V + 8}"):
        full_vocab_head(cfg, student, HFTeacher(wider, renderer), cfg.loss)
    teacher = HFTeacher(teacher_model, renderer)
    assert full_vocab_head(cfg, student, teacher, cfg.loss) is not None and teacher.keep_hidden


def test_full_vocab_losses_accept_any_rollout_temperature(tmp_path, capsys):
    from agentopd.config import compose

    cfg = compose("train", [*BASE, "loss=jsd-full", "rollout.temperature=0.7"])
    assert cfg.loss_cfg.beta == 0.5


@pytest.mark.slow
def test_train_two_steps_with_rkl_full(tmp_path):
    from agentopd.replay.store import EpisodeStore

    r = agentopd(
        "train",
        "env=lookup-chain",
        "env_kwargs.hops=1",
        "student=tiny",
        "teacher=tiny-teacher",
        "episodes_per_step=2",
        "cold_start.steps=0",
        "eval.episodes=0",
        "rollout.max_new_tokens=12",
        "loss=rkl-full",
        "steps=2",
        f"runs_dir={tmp_path}",
        "run_name=full",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = Path(tmp_path) / "full"
    rows = [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if '"phase": "train"' in x
    ]
    assert [row["step"] for row in rows] == [0, 1]
    for row in rows:
        assert math.isfinite(row["learner/loss"]) and row["learner/loss"] >= 0
        assert row["learner/true_rkl"] == pytest.approx(row["learner/loss"], rel=1e-5)
        assert row["diag/true_rkl"] == pytest.approx(row["learner/true_rkl"], rel=1e-5)
    stored = list(EpisodeStore(run).iter_episodes())
    assert stored and all(
        t is None or t.hidden_M_H is None for _, e in stored for t in e.teacher or []
    )
    assert "hidden" not in (run / "episodes").joinpath("index.jsonl").read_text()


class _ScoresOnly:
    """A teacher backend that is not in process: it hands over top-k scores only."""

    def __init__(self, teacher: HFTeacher):
        self.inner, self.config = teacher, teacher.config

    def score(self, episodes):
        return self.inner.score(episodes)


def _scores_only(name, *, tokenizer, config, device):
    from agentopd.teachers import hf

    return _ScoresOnly(hf.build(name, tokenizer=tokenizer, config=config, device=device))


DIAGNOSE = [
    "diagnose",
    "env=lookup-chain",
    "student=tiny",
    "teacher=tiny-teacher",
    "episodes=2",
    "recovery_episodes=0",
    "rollout.max_new_tokens=12",
]


def test_diagnose_reports_the_true_reverse_kl_or_says_it_is_unavailable(capsys):
    import agentopd
    from agentopd import registry

    assert main(DIAGNOSE) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    value = float(out.split("diag/true_rkl ")[1].split()[0])
    assert value > 0
    agentopd.register("scores-only", _scores_only, kind="teachers")
    try:
        assert main([*DIAGNOSE, "teacher_backend=scores-only"]) == 0
    finally:
        registry.teachers.unregister("scores-only")
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "diag/true_rkl unavailable (teacher_backend=scores-only; needs hf)" in out
    assert "diag/sampled_kl" in out
