"""Depth pruning by name (``<model>@layers=i,j,...``): the kept blocks are the original ones,
the KV cache follows the new layer order, and bad layer lists are refused with the fix."""

from __future__ import annotations

import pytest
import torch

from agentopd import zoo
from agentopd.config import ConfigError, resolve_model

NAME = "tiny-teacher-code-sandbox"


def test_pruned_model_keeps_the_listed_blocks_and_nothing_else():
    full, _ = zoo.load(NAME)
    pruned, tok = zoo.load(f"{NAME}@layers=0,1,3")
    assert pruned.config.num_hidden_layers == 3 == len(pruned.model.layers)
    for j, i in enumerate([0, 1, 3]):
        a, b = pruned.model.layers[j].state_dict(), full.model.layers[i].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(pruned.lm_head.weight, full.lm_head.weight)
    n_layer = sum(p.numel() for p in full.model.layers[2].parameters())
    assert zoo.num_params(pruned) == zoo.num_params(full) - n_layer
    # Same computation as the full model with block 2 skipped, written out by hand.
    ids = torch.tensor([tok.encode("lookup the key 7 and submit")])
    with torch.no_grad():
        h = full.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        rope = full.model.rotary_emb(h, pos)
        for i in (0, 1, 3):
            h = full.model.layers[i](h, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        want = full.lm_head(full.model.norm(h))
        got = pruned(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_pruned_model_decodes_with_its_kv_cache():
    pruned, tok = zoo.load(f"{NAME}@layers=1,3")
    ids = torch.tensor([tok.encode("add 2 and 3")])
    with torch.no_grad():
        out = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        # Greedy decoding with the cache equals argmax of full re-forwards.
        seq = ids
        for _ in range(6):
            nxt = pruned(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out[:, : seq.shape[1]], seq[:, : out.shape[1]])


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (f"{NAME}@layers=3,1", "ascending"),
        (f"{NAME}@layers=1,1", "ascending"),
        (f"{NAME}@layers=one", "comma-separated"),
        ("@layers=1", "model name is empty"),
        ("no-such-model@layers=0", "unknown model"),
    ],
)
def test_bad_layer_lists_are_refused_by_name(name, fragment):
    with pytest.raises((ConfigError, ValueError), match=fragment):
        resolve_model(name, "student")


def test_a_layer_out_of_range_names_the_valid_range():
    resolve_model(f"{NAME}@layers=0,9", "student")  # the name is well formed
    with pytest.raises(ValueError, match=r"layer 9 does not exist; the model has 4 layers \(0..3\)"):
        zoo.load(f"{NAME}@layers=0,9")


def test_checks_before_loading_read_a_pruned_name():
    """The builder's cheap checks (tokenizer, architecture) accept a pruned name."""
    name = f"{NAME}@layers=0,3"
    assert zoo.tokenizer_of(name).get_vocab() == zoo.tokenizer_of(NAME).get_vocab()
    meta = zoo.meta_model(name)
    assert meta.config.num_hidden_layers == 2 and len(meta.model.layers) == 2
