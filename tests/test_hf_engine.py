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
    model = zoo.build_model("tiny", seed=0)
    lora.apply(model, lora.LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
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
                p.add_(torch.randn_like(p))
        want = model(ids).logits.float()
        stale = copy.gen_model(ids).logits.float()
    assert (stale - want).abs().max() > 0.1 * want.abs().max()
    copy.load_weights(lora.engine_weights(model))
    with torch.no_grad():
        fresh = copy.gen_model(ids).logits.float()
    assert (fresh - want).abs().max() < 0.1 * want.abs().max()
    assert len(_greedy(copy)) > 0 and len(_greedy(shared)) > 0
    # auto / float32 keep sharing the learner's own parameters.
    assert not build(model, renderer=renderer, config=EngineConfig()).copy
