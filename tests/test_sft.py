"""The packed SFT pass (agentopd.sft) and Learner.step_sft: same loss and gradients as padding."""

from __future__ import annotations

import copy

import pytest
import torch

from agentopd import sft, zoo
from agentopd.learner import Learner, LearnerConfig
from agentopd.losses import LossConfig
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.types import Episode, Segment


@pytest.fixture(scope="module")
def renderer():
    return Renderer(zoo.load_tokenizer())


@pytest.fixture(scope="module")
def lookup_episodes(renderer):
    jobs = [
        EpisodeJob("lookup-chain", s, {"split": "train"}, {"min_hops": 1, "max_hops": 3})
        for s in range(6)
    ]
    eps = expert_episodes(jobs, renderer)
    assert all(ep.success for ep in eps)
    return eps


def _episode(tokens: list[int], mask: list[int]) -> Episode:
    return Episode("test", "t", segments=[Segment(tokens, [0.0] * len(tokens), mask)])


def _short_and_long(episodes: list[Episode], keep_prefix: bool) -> list[Episode]:
    """Full episodes plus early cuts of them, so that several cuts share a packed row."""
    seqs = [(ep.segments[0].tokens, ep.segments[0].mask) for ep in episodes]
    for t, m in seqs[:4]:
        first = m.index(1)
        start = 0 if keep_prefix else first - 10
        seqs.append((t[start : first + 12], m[start : first + 12]))
    if not keep_prefix:  # different first tokens: nothing shared, no prefix cache
        seqs = [([5 + i] + t[1:], m) for i, (t, m) in enumerate(seqs)]
    return [_episode(list(t), list(m)) for t, m in seqs]


def _reference_loss(model, episodes: list[Episode], agg: str) -> torch.Tensor:
    """The plain definition: right-padded full forward, full logits, masked mean."""
    segs = [ep.segments[0] for ep in episodes]
    tokens, mask, attn = sft.pad_segments(segs, 0)
    logits = model(input_ids=tokens, attention_mask=attn).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    ).reshape(tokens.shape[0], -1)
    m = mask[:, 1:].float()
    if agg == "token-mean":
        return (nll * m).sum() / m.sum()
    return ((nll * m).sum(-1) / m.sum(-1)).mean()


def _loss_and_grads(model, fn) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = fn()
    if isinstance(loss, torch.Tensor):
        loss.backward()
        loss = loss.item()
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("keep_prefix", [True, False])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("micro_batch", [3, 64])
def test_packed_and_padded_passes_give_the_plain_loss_and_gradients(
    lookup_episodes, keep_prefix, agg, micro_batch
):
    """Prefix cache, packed rows and logits at trained positions only change nothing beyond
    float rounding, at any micro-batch size and with either aggregation."""
    batch = _short_and_long(lookup_episodes, keep_prefix)
    segs = [ep.segments[0] for ep in batch]
    shared = sft.prefix_to_share(segs)
    assert (shared > sft.MIN_SHARED_PREFIX) == keep_prefix
    # Several sequences share a row, so a missing block-diagonal mask would show.
    assert max(map(len, sft.pack_rows([len(s.tokens) - shared for s in segs]))) >= 3
    model = zoo.build_model("tiny", seed=3)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: _reference_loss(model, batch, agg))
    for packed in (True, False):

        def run(packed=packed):
            metrics = sft.backward(
                model, [sft.SftGroup(batch)], pad_id=0, agg=agg, micro_batch=micro_batch,
                packed=packed,
            )  # fmt: skip
            return metrics["loss"]

        loss, grads = _loss_and_grads(model, run)
        assert loss == pytest.approx(ref_loss, rel=1e-5), packed
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads, strict=True))


def test_groups_add_their_weighted_means(lookup_episodes):
    """Two groups give ``mean_a + w * mean_b``, each mean over its own tokens."""
    a, b = lookup_episodes[:3], lookup_episodes[3:]
    model = zoo.build_model("tiny", seed=3)
    ref, ref_grads = _loss_and_grads(
        model, lambda: _reference_loss(model, a, "token-mean") + 0.3 * _reference_loss(model, b, "token-mean")
    )  # fmt: skip
    out = {}

    def run():
        out.update(
            sft.backward(
                model, [sft.SftGroup(a), sft.SftGroup(b, 0.3, "drill")], pad_id=0, micro_batch=2
            )
        )
        return out["loss"] + 0.3 * out["drill_loss"]

    loss, grads = _loss_and_grads(model, run)
    assert loss == pytest.approx(ref, rel=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(grads, ref_grads, strict=True))
    assert out["tokens"] == sum(sum(ep.segments[0].mask[1:]) for ep in a)
    assert out["drill_tokens"] == sum(sum(ep.segments[0].mask[1:]) for ep in b)


def test_step_sft_ignores_tokens_no_trained_position_sees(lookup_episodes):
    """Masked tokens after the last trained one change neither the loss nor the update, although
    they change how the batch is packed."""
    model_a = zoo.build_model("tiny", seed=4)
    model_b = copy.deepcopy(model_a)
    start = [p.detach().clone() for p in model_a.parameters()]
    eps = copy.deepcopy(lookup_episodes)
    other = copy.deepcopy(lookup_episodes)
    for ep in other:  # a masked tail the loss never sees
        ep.segments[0].append([7, 8, 9], None, sampled=False)
    # SGD: the update is lr times the gradient, so packing's float-order noise stays ~1e-9.
    # AdamW's first step divides by |g| and turns that noise on a near-zero gradient into a
    # machine-dependent 1e-6..1e-5 change of single weights (seen on an avx512_bf16 CPU).
    cfg = LearnerConfig(name="sgd", lr=1e-2, micro_batch=4)
    ma = Learner(model_a, cfg, pad_id=0).step_sft(eps)
    mb = Learner(model_b, cfg, pad_id=0).step_sft(other)
    assert ma["learner/loss"] == pytest.approx(mb["learner/loss"], rel=1e-6)
    assert ma["learner/tokens"] == mb["learner/tokens"] > 0
    moved = max(
        (p - q0).abs().max().item() for p, q0 in zip(model_a.parameters(), start, strict=True)
    )
    assert moved > 1e-4  # the step did change the weights
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_step_sft_uses_the_loss_configs_aggregation(lookup_episodes):
    model = zoo.build_model("tiny", seed=4)
    ref = _reference_loss(model, lookup_episodes, "seq-mean-token-mean").item()
    learner = Learner(
        copy.deepcopy(model), LearnerConfig(), pad_id=0,
        loss_cfg=LossConfig(agg="seq-mean-token-mean"),
    )  # fmt: skip
    assert learner.step_sft(lookup_episodes)["learner/loss"] == pytest.approx(ref, rel=1e-5)
    assert learner.step_sft([_episode([1, 2, 3], [0, 0, 0])]) == {"learner/tokens": 0.0}


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    model = zoo.build_model("tiny", seed=0)
    cfg = LearnerConfig(lr=2.0, warmup_steps=4, schedule="cosine", min_lr_frac=0.25)
    learner = Learner(model, cfg, pad_id=0, total_steps=20)
    lrs = [2.0 * learner._lr_factor(step) for step in range(21)]
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[12] == pytest.approx(0.25 * 2 + 0.75 * 2 * 0.5)  # halfway down the cosine
    assert lrs[20] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    # The default floor (0.1) is what the cosine schedule always decayed to.
    default = Learner(model, LearnerConfig(schedule="cosine"), pad_id=0, total_steps=10)
    assert default._lr_factor(10) == pytest.approx(0.1)


def test_bf16_modes():
    cpu = torch.device("cpu")
    assert sft.bf16_enabled("off", cpu) is False and sft.bf16_enabled("on", cpu) is True
    assert sft.bf16_enabled("cuda", cpu) is False
    with pytest.raises(ValueError, match="cuda, auto, on, off"):
        sft.bf16_enabled("yes", cpu)


def test_pack_rows_fills_rows_no_wider_than_the_longest():
    lengths = [10, 3, 7, 4, 6, 1, 9]
    rows = sft.pack_rows(lengths)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[0], [6, 5], [2, 1], [4, 3]]
