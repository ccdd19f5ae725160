"""Recovery demonstrations: injected errors get mask 0, the expert's recovery mask 1 and success."""

from __future__ import annotations

import random

import pytest

from agentopd import zoo
from agentopd.parsing import parse_assistant
from agentopd.renderer import Renderer
from agentopd.zoo.recovery import ERROR_KINDS, mutate, recovery_episodes


@pytest.fixture(scope="module")
def renderer():
    return Renderer(zoo.load_tokenizer())


@pytest.mark.parametrize(
    ("env", "kw"),
    [
        ("lookup-chain", {"min_hops": 6, "max_hops": 10, "distractors": 2}),
        ("sql", {"min_difficulty": 2, "max_difficulty": 5, "max_turns": 8}),
    ],
)
def test_injected_turns_are_masked_and_the_expert_recovers(renderer, env, kw):
    episodes = recovery_episodes(env, kw, range(12), renderer, error_rate=0.5, seed=1)
    kinds = set()
    for ep in episodes:
        assert ep.success, ep.info.get("error")  # the expert recovered from every error
        injected = set(ep.info["injected_turns"])
        kinds.update(ep.info["injected_kinds"])
        for t in ep.turns:
            mask = set(ep.segments[t.segment].mask[t.start : t.end])
            assert mask == ({0} if t.index in injected else {1}), (t.index, t.text)
        assert sum(sum(s.mask) for s in ep.segments) == sum(
            t.end - t.start for t in ep.turns if t.index not in injected
        )
    assert sum(len(ep.info["injected_turns"]) for ep in episodes) >= 6
    assert kinds == set(ERROR_KINDS)
    parse_errors = [t for ep in episodes for t in ep.turns if t.parse_error]
    assert parse_errors and all(
        t.index in ep.info["injected_turns"] for ep in episodes for t in ep.turns if t.parse_error
    )


def test_no_errors_at_rate_zero_and_mutations_are_what_they_say(renderer):
    [ep] = recovery_episodes("lookup-chain", {"hops": 4}, [3], renderer, error_rate=0.0)
    assert ep.info["injected_turns"] == [] and ep.success
    assert all(set(s.mask[s.prompt_len :]) <= {0, 1} for s in ep.segments)
    action = '<tool_call>{"name": "lookup", "arguments": {"key": "k17"}}</tool_call>'
    rng = random.Random(0)
    assert parse_assistant(mutate(action, "malformed", rng)).error
    wrong = parse_assistant(mutate(action, "wrong-value", rng))
    assert not wrong.error and wrong.tool_calls[0].arguments["key"] != "k17"
    assert parse_assistant(mutate(action, "wrong-tool", rng)).tool_calls[0].name == "lookupp"
    with pytest.raises(ValueError, match="error kind"):
        mutate(action, "typo", rng)
