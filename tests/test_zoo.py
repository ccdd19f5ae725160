"""Tests for the model zoo: tokenizer, chat template, presets, loading and teacher bootstrap."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentopd import zoo
from agentopd.zoo.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, load_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Return the value stored under a key.",
            "parameters": {
                "type": "object",
                "properties": {"key": {"type": "string", "description": "The key."}},
                "required": ["key"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "submit",
            "description": "Submit the final answer.\nThis ends the episode.",
            "parameters": {
                "type": "object",
                "properties": {
                    "answer": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    "note": {"type": "string"},
                },
                "required": ["answer"],
            },
        },
    },
]
CALL = '<tool_call>{"name": "lookup", "arguments": {"key": "k17"}}</tool_call>'


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def render(tok, messages, tools=None, gen=False) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


# ---------------------------------------------------------------------------- tokenizer
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text())
def test_tokenizer_round_trips_any_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def test_tokenizer_specials_and_sizes(tok):
    assert 1000 <= len(tok) <= 2000
    assert tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    for special in ["<|endoftext|>", IM_START, IM_END]:
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)


def test_digits_are_single_tokens_and_tool_tags_are_one_token(tok):
    ids = tok.encode("x=90210", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[-5:] == ["9", "0", "2", "1", "0"]
    for tag in ["<tool_call>", "</tool_call>"]:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    assert len(tok.encode(CALL, add_special_tokens=False)) < len(CALL) // 2


# ---------------------------------------------------------------------------- chat template
def test_template_renders_system_tools_and_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Find k17."},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "name": "lookup", "content": "q4"},
    ]
    text = render(tok, messages, TOOLS, gen=True)
    assert text == (
        "<|im_start|>system\nBe brief.\n\nTools:\n"
        "lookup(key: string) - Return the value stored under a key.\n"
        "submit(answer: string|integer, note?: string) - Submit the final answer. "
        "This ends the episode.<|im_end|>\n"
        "<|im_start|>user\nFind k17.<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        "<|im_start|>tool\nq4<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_makes_a_system_message_for_tools_and_none_without(tok):
    user = [{"role": "user", "content": "hi"}]
    assert render(tok, user, TOOLS).startswith("<|im_start|>system\nTools:\nlookup(key: string)")
    assert render(tok, user) == "<|im_start|>user\nhi<|im_end|>\n"
    assert render(tok, user, gen=True).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_template_keeps_assistant_content_raw(tok):
    raw = 'Let me check. <tool_call>{"name":"lookup","arguments":{"key":"a1"}}</tool_call>  '
    msg = {
        "role": "assistant",
        "content": raw,
        "tool_calls": [{"type": "function", "function": {"name": "other", "arguments": {"x": 1}}}],
    }
    text = render(tok, [{"role": "user", "content": "u"}, msg])
    assert f"<|im_start|>assistant\n{raw}<|im_end|>\n" in text
    assert "other" not in text


def _conversations():
    content = st.text(max_size=40)
    assistant = st.builds(
        lambda c: {"role": "assistant", "content": c}, st.one_of(content, st.just(CALL))
    )
    tool = st.builds(lambda c: {"role": "tool", "name": "lookup", "content": c}, content)
    head = st.lists(st.sampled_from(["system", "user"]), min_size=1, max_size=2, unique=True).map(
        lambda roles: [{"role": r, "content": r + " text"} for r in sorted(roles, reverse=True)]
    )
    return st.tuples(head, st.lists(st.one_of(assistant, tool), min_size=1, max_size=8))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_conversations(), st.booleans())
def test_template_preserves_prefixes(tok, conv, with_tools):
    head, rest = conv
    messages = head + rest
    tools = TOOLS if with_tools else None
    for n in range(len(head), len(messages)):
        shorter = render(tok, messages[:n], tools)
        longer = render(tok, messages[: n + 1], tools)
        assert longer.startswith(shorter)
        if messages[n]["role"] == "assistant":
            assert longer.startswith(render(tok, messages[:n], tools, gen=True))


# ---------------------------------------------------------------------------- presets and loading
@pytest.mark.parametrize("name", list(zoo.PRESETS))
def test_presets_are_standard_llama_with_head_dim_64(tok, name):
    cfg = zoo.model_config(name)
    assert cfg.model_type == "llama"
    assert cfg.head_dim == 64 and cfg.hidden_size == 64 * cfg.num_attention_heads
    assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings
    assert cfg.eos_token_id == tok.eos_token_id and cfg.max_position_embeddings == 2048


def test_build_model_is_deterministic():
    a, b, c = zoo.build_model("tiny", 0), zoo.build_model("tiny", 0), zoo.build_model("tiny", 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert zoo.num_params(a) == zoo.num_params("tiny")


def test_load_from_path_round_trips_and_auto_tokenizer_agrees(tmp_path, tok):
    from transformers import AutoTokenizer

    model, tokenizer = zoo.load("tiny")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model2, tok2 = zoo.load(tmp_path)
    assert torch.equal(model.model.embed_tokens.weight, model2.model.embed_tokens.weight)
    text = "x = 12345 + 0.5\n\n ünïcödé 🤖 " + CALL
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for t in (tok2, auto):
        assert t.encode(text) == tok.encode(text)
        assert t.chat_template == CHAT_TEMPLATE and t.padding_side == "left"


def test_unknown_names_suggest_the_nearest(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTOPD_CACHE", str(tmp_path))
    with pytest.raises(KeyError, match="Did you mean 'tiny-teacher'"):
        zoo.load("tiny-teachr")


def test_list_models_rows(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTOPD_CACHE", str(tmp_path))
    rows = {r.name: r for r in zoo.list_models()}
    assert rows["tiny"].kind == "preset" and rows["tiny"].params == zoo.num_params("tiny")
    shipped = rows["tiny-teacher-lookup-chain"]
    assert shipped.kind == "artifact" and shipped.built
    assert shipped.path == str(zoo.SHIPPED / "tiny-teacher-lookup-chain")
    assert rows["tiny-base"].kind == "base" and rows["tiny-base"].built
    # A plugin env's teacher is neither shipped nor built yet: it would land in the cache.
    zoo_env = "echo-zoo-test"
    from agentopd.registry import envs

    envs.register(zoo_env, "agentopd.envs.lookup_chain:LookupChain")
    try:
        art = {r.name: r for r in zoo.list_models()}[f"tiny-teacher-{zoo_env}"]
        assert art.kind == "artifact" and not art.built
        assert art.path == str(tmp_path / "zoo" / f"tiny-teacher-{zoo_env}")
    finally:
        envs.unregister(zoo_env)
    assert zoo.parse_artifact("tiny-teacher-lookup-chain") == ("tiny-teacher", "lookup-chain")
    assert zoo.parse_artifact("tiny-teacher") is None
    variant = rows["tiny-teacher-sql-recovery"]
    assert variant.kind == "artifact" and "error-injected" in variant.description


def test_variant_names_parse_and_pick_the_variant_recipe():
    from agentopd.zoo import bootstrap

    assert zoo.parse_variant("tiny-teacher-lookup-chain-recovery") == (
        "tiny-teacher", "lookup-chain", "recovery",
    )  # fmt: skip
    assert zoo.parse_variant("tiny-teacher-sql") == ("tiny-teacher", "sql", "")
    assert zoo.parse_artifact("tiny-teacher-sql-recovery") == ("tiny-teacher", "sql")
    assert zoo.parse_variant("tiny-teacher-sql-recoveryy") is None
    assert set(zoo.VARIANTS) == set(bootstrap.VARIANTS)
    for env in ("lookup-chain", "sql", "code-sandbox"):
        plain, rec = bootstrap.recipe_for(env), bootstrap.recipe_for(env, "recovery")
        assert plain.recovery_episodes == 0 and rec.recovery_episodes > 0
        assert rec.train_episodes == plain.train_episodes and rec.copy_batch == plain.copy_batch
        if env == "lookup-chain":  # only the data differs: the same steps and optimizer
            assert bootstrap.replace(rec, recovery_episodes=0) == plain
        else:  # continues from the plain teacher
            assert rec.init == f"tiny-teacher-{env}" and rec.steps == 150
            assert rec.optim.lr == 5e-4 and rec.optim.sft_bf16 == plain.optim.sft_bf16
    assert bootstrap.recipe_for("echo", "recovery").recovery_episodes == 500
    with pytest.raises(ValueError, match="unknown artifact variant"):
        bootstrap.recipe_for("sql", "noisy")
    import agentopd

    assert "tiny-teacher-lookup-chain-recovery" in agentopd.list_registered("models")


def test_presets_are_registered():
    import agentopd

    names = agentopd.list_registered("models")
    assert {"tiny", "tiny-teacher", "tiny-teacher-lookup-chain"} <= set(names)


@pytest.mark.slow
def test_shipped_tokenizer_matches_rebuild(tmp_path):
    from agentopd.zoo.tokenizer import TOKENIZER_FILE, train_tokenizer

    fresh = json.loads(train_tokenizer().to_str())
    shipped = json.loads(TOKENIZER_FILE.read_text())
    assert fresh["model"]["vocab"] == shipped["model"]["vocab"]
    assert fresh["model"]["merges"] == shipped["model"]["merges"]


# ---------------------------------------------------------------------------- teacher bootstrap
@pytest.fixture(scope="module")
def lookup_episodes():
    from agentopd.zoo import bootstrap

    return bootstrap.play_experts("lookup-chain", {"min_hops": 1, "max_hops": 3}, list(range(6)))


def test_expert_episodes_mask_only_the_expert_turns(tok, lookup_episodes):
    for ep in lookup_episodes:
        (seg,) = ep.segments
        assert ep.success and len(seg.tokens) == len(seg.mask)
        trained = tok.decode([t for t, m in zip(seg.tokens, seg.mask) if m])
        assert trained.count("<tool_call>") == trained.count(IM_END) >= 2
        assert "<|im_start|>" not in trained and "Tools:" not in trained
        assert seg.mask[-1] == 1 and seg.tokens[-1] == tok.eos_token_id


def test_expert_episodes_do_not_depend_on_the_worker_count():
    from agentopd.zoo import bootstrap

    kwargs = {"min_hops": 1, "max_hops": 3}
    one = bootstrap.play_experts("lookup-chain", kwargs, list(range(7)), workers=1)
    calls = []
    three = bootstrap.play_experts(
        "lookup-chain", kwargs, list(range(7)), workers=3, on_episode=lambda: calls.append(1),
        chunk=2,
    )  # fmt: skip
    assert len(calls) == 7
    assert [ep.to_dict() for ep in one] == [ep.to_dict() for ep in three]
    assert [ep.seed for ep in one] == list(range(7))
    assert len({tuple(ep.segments[0].tokens) for ep in one}) == 7  # not one task repeated


def test_recipe_overrides_reach_the_optimizer_and_typos_are_named():
    from agentopd.zoo import bootstrap

    recipe = bootstrap.with_overrides(bootstrap.RECIPES["sql"], {"steps": 7, "lr": 0.5})
    assert recipe.steps == 7 and recipe.optim.lr == 0.5 and recipe.copy_batch == 8
    assert recipe.optim.schedule == "cosine" and recipe.optim.min_lr_frac == 0.5
    assert bootstrap.RECIPES["sql"].optim.lr == 1e-3  # the shared default is left alone
    with pytest.raises(TypeError, match="did you mean 'min_lr_frac'"):
        bootstrap.with_overrides(bootstrap.Recipe(), {"min_lr_fraction": 0.1})


def test_bootstrap_cli_lists_recipe_and_optimizer_flags(capsys):
    from agentopd.zoo import bootstrap

    with pytest.raises(SystemExit):
        bootstrap.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--steps", "--copy-batch", "--group-by-length", "--lr", "--min-lr-frac",
                 "--sft-bf16", "--init"):  # fmt: skip
        assert flag in text, flag


def test_length_grouped_batches_cover_each_example_once_per_epoch():
    from agentopd.zoo import bootstrap

    lengths = [(i * 37) % 101 for i in range(100)]
    gen = torch.Generator().manual_seed(0)
    batches = bootstrap.length_grouped_batches(lengths, 8, gen, pool=4)
    epoch = [next(batches) for _ in range(13)]  # 100 examples: 12 full batches + 1 topped up
    assert all(len(b) == 8 for b in epoch)
    seen = [i for b in epoch for i in b]
    assert set(seen) == set(range(100)) and len(seen) == 104
    # Within a pool the batches are contiguous runs of the length order, so a batch's length
    # spread is far below that of uniform draws.
    spread = sorted(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch)
    assert spread[len(spread) // 2] < 40
    assert next(batches) != epoch[0] or next(batches) != epoch[1]  # the next epoch reshuffles


def test_teacher_build_saves_atomically_and_loads(monkeypatch, tmp_path):
    from agentopd.engines import SamplingParams
    from agentopd.engines.hf import HFEngine

    monkeypatch.setenv("AGENTOPD_CACHE", str(tmp_path))
    name = "tiny-teacher-lookup-chain"
    small = dict(steps=2, batch_size=2, train_episodes=4, eval_episodes=2, max_new_tokens=8)
    # The name is shipped, so build() finds it; force=True rebuilds into the cache instead.
    assert zoo.build(name, progress=False) == zoo.SHIPPED / name
    path = zoo.build(name, progress=False, force=True, **small)
    assert path == tmp_path / "zoo" / name
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temp dirs left
    report = json.loads((path / "zoo.json").read_text())
    assert report["train_examples"] == 4 and report["eval"]["episodes"] == 2
    assert report["recipe"]["init"] == "base"  # started from the shipped tiny-teacher-base

    model, tokenizer = zoo.load(str(path))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Start at k1."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    engine = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    (sample,) = engine.generate([ids], SamplingParams(max_new_tokens=5, temperature=0.0))
    assert 1 <= len(sample.tokens) <= 5


@pytest.mark.parametrize(
    "env, env_kwargs",
    [("lookup-chain", {"min_hops": 1, "max_hops": 3}), ("sql", {}), ("code-sandbox", {})],
)
def test_shipped_teacher_solves_held_out_tasks(env, env_kwargs):
    """The shipped float16 teachers, loaded as float32, reach the issue's 90% bar (64 held-out
    tasks)."""
    from agentopd.zoo.bootstrap import held_out_success

    model, tok = zoo.load(f"tiny-teacher-{env}", build_missing=False)
    assert next(model.parameters()).dtype == torch.float32
    result = held_out_success(model, tok, env, 64, env_kwargs)
    assert result["success"] >= 0.9, result


def test_shipped_bases_copy_from_context_and_random_inits_do_not():
    from agentopd.zoo.pretrain import copy_accuracy

    for base, preset in zoo.BASES.items():
        model, tok = zoo.load(base, build_missing=False)
        assert copy_accuracy(model, tok, 48, seed=0) > 0.7, base
        assert copy_accuracy(zoo.build_model(preset), tok, 48, seed=0) < 0.1, preset


def test_copy_drills_repeat_their_items_including_whole_word_tokens(tok):
    """The teacher recipes' copy drills (``copy_batch``) train copying of one-token words such as
    sql's city names, which the letter-level pretraining drills never covered."""
    import random
    import re

    from agentopd.zoo.bootstrap import _vocab_words, copy_sequence

    words = set(_vocab_words(tok))
    assert {"rome", "lima", "oslo"} <= words
    rng = random.Random(0)
    trained: set[str] = set()
    for _ in range(300):
        (ex,) = copy_sequence(tok, rng).segments
        start = ex.mask.index(1)
        assert set(ex.mask[start:]) == {1} and set(ex.mask[:start]) == {0}
        text = tok.decode(ex.tokens)
        source = text.split("<|im_start|>tool\n", 1)[1].split("<|im_end|>", 1)[0]
        target = tok.decode(ex.tokens[start:-1])
        # The same items in the same order; only the separators may differ.
        assert re.sub(r"[\s,]", "", source) == re.sub(r"[\s,]", "", target)
        trained |= {tok.decode([t]) for t in ex.tokens[start:]}
    assert len(trained & words) > 50
    assert any(t.isdigit() for t in trained)


SHIPPED_RECOVERY = ["lookup-chain"]
"""Envs whose ``tiny-teacher-<env>-recovery`` ships with the package (sql and code-sandbox
stopped shipping to make room for the SmolLM2 expert adapters; they build on first use)."""


@pytest.mark.parametrize("env", SHIPPED_RECOVERY)
def test_shipped_recovery_teachers_report_clean_success_and_recovery(env):
    """The shipped recovery teachers: built by the recovery recipe, >= 90% held-out success on
    clean tasks after the float16 cast, and a recovery rate from injected errors (the plain
    teachers': 0%, docs/long_horizon.md)."""
    from agentopd.zoo import bootstrap

    name = f"tiny-teacher-{env}-recovery"
    path = zoo.shipped_dir(name)
    assert path is not None, f"{name} is not shipped"
    report = json.loads((path / "zoo.json").read_text())
    recipe = bootstrap.recipe_for(env, "recovery")
    assert report["name"] == name and report["recipe"]["steps"] == recipe.steps
    assert report["recipe"]["recovery_episodes"] == recipe.recovery_episodes
    assert report["recovery_examples"] > 0 and report["injected_errors"] > 0
    for key in ("eval", "shipped_eval"):
        assert report[key]["episodes"] == 64 and report[key]["success"] >= 0.9, key
        assert report[key]["recovery"]["recovery_rate"] >= 0.5, key
    model, _ = zoo.load(name, build_missing=False)
    assert next(model.parameters()).dtype == torch.float32
