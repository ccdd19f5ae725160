"""The ``hf`` engine's bfloat16 generation copy (``engine_cfg.dtype=bfloat16``)."""

from __future__ import annotations

import torch

from agentopd import lora, zoo
from agentopd.engines import EngineConfig, SamplingParams
from agentopd.engines.hf import HFEngine, build
from agentopd.renderer import Renderer

PROMPT = [[5, 6, 7, 8, 9, 10]]


def _greedy(engine: HFEngine) -> list[int]:
    return engine.generate(PROMPT, SamplingParams(8, 0.0))[0].tokens


def test_bfloat16_copy_follows_the_learner_weights_and_merges_lora():
    # Seeded, with adapter updates small enough that attention does not saturate: with large
    # random deltas a near-tie in one attention row flips between the merged and the unmerged
    # float32 computation, whatever the engine does (found when test order changed the draws).
    g = torch.Generator().manual_seed(0)
    model = zoo.build_model("tiny", seed=0)
    lora.apply(model, lora.LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "lora_A" in name:  # not lora.apply's initialisation, which uses the global RNG
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    renderer = Renderer(zoo.load_tokenizer())
    shared = HFEngine(model, renderer.eot_id, renderer.pad_id)
    copy = build(model, renderer=renderer, config=EngineConfig(dtype="bfloat16"))
    assert copy.copy and copy.gen_model is not model
    assert next(copy.gen_model.parameters()).dtype == torch.bfloat16
    assert not lora.is_lora(copy.gen_model)  # plain weights, adapters merged in
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        want = model(ids).logits.float()
        got = copy.gen_model(ids).logits.float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    # A learner update reaches the copy only through load_weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        want = model(ids).logits.float()
        stale = copy.gen_model(ids).logits.float()
    stale_err = (stale - want).abs().max()
    assert stale_err > 0.2 * want.abs().max()  # the update is visible to the learner only
    copy.load_weights(lora.engine_weights(model))
    with torch.no_grad():
        fresh = copy.gen_model(ids).logits.float()
    fresh_err = (fresh - want).abs().max()  # bfloat16 rounding only
    assert fresh_err < 0.2 * want.abs().max() and fresh_err < 0.5 * stale_err
    assert len(_greedy(copy)) > 0 and len(_greedy(shared)) > 0
    # auto / float32 keep sharing the learner's own parameters.
    assert not build(model, renderer=renderer, config=EngineConfig()).copy


def _reference_logprobs(
    model, prompt: list[int], tokens: list[int], temperature: float, top_p: float
):
    """The sampled tokens' log-probs recomputed from scratch: full forward pass, logits divided by
    the temperature, nucleus (top-p) filtering, log-softmax."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    order = logits.sort(dim=-1, descending=True)
    cum = order.values.softmax(-1).cumsum(-1)
    drop_sorted = cum - order.values.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order.indices, drop_sorted)
    logp = logits.masked_fill(drop, float("-inf")).log_softmax(-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_sampled_logprobs_are_those_of_the_distribution_sampled_from():
    """The engine keeps one log-prob per decoding step (no [B, N, V] stack): each equals the
    token's log-prob under the temperature- and top-p-processed distribution, for prompts of
    different lengths in one left-padded batch."""
    model = zoo.build_model("tiny", seed=0).eval()
    renderer = Renderer(zoo.load_tokenizer())
    engine = HFEngine(model, renderer.eot_id, renderer.pad_id)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        samples = engine.generate(prompts, SamplingParams(12, temperature, top_p=top_p, seed=3))
        for prompt, sample in zip(prompts, samples, strict=True):
            assert sample.tokens
            want = _reference_logprobs(model, prompt, sample.tokens, temperature, top_p)
            got = torch.tensor(sample.logprobs)
            assert torch.isfinite(got).all()
            assert (got - want).abs().max() < 1e-4, (temperature, top_p, got, want)
