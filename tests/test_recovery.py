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


# ---------------------------------------------------------------------------- recovery rate
def test_recovery_jobs_start_right_after_one_injected_error(renderer):
    from agentopd.rollout import RolloutConfig, expert_episodes
    from agentopd.zoo.recovery import recovery_jobs, recovery_rate

    kw = {"min_hops": 2, "max_hops": 4}
    jobs = recovery_jobs("lookup-chain", kw, range(24), split="eval", seed=2)
    assert len(jobs) == 24 and jobs == recovery_jobs(
        "lookup-chain", kw, range(24), split="eval", seed=2
    )
    assert {j.options["injected"]["kind"] for j in jobs} == set(ERROR_KINDS)
    assert {j.options["injected"]["turn"] for j in jobs} >= {0, 1}
    for job in jobs:
        replay = job.options["replay"]
        assert job.options["split"] == "eval" and len(replay) == job.options["injected"]["turn"] + 1
    # The expert recovers from every one of these states, so a rate below 1 is the model's.
    episodes = expert_episodes(jobs, renderer, RolloutConfig(max_new_tokens=200))
    assert all(ep.success for ep in episodes)
    for ep, job in zip(episodes, jobs, strict=True):
        assert ep.replayed_turns == len(job.options["replay"])
        # The replayed prefix, the error included, is context (mask 0), never the policy's turn.
        assert all(t.index >= ep.replayed_turns for t in ep.turns)
    rates = recovery_rate(episodes)
    assert rates["recovery_rate"] == 1.0 and rates["recovery_episodes"] == 24.0
    assert {k for k in rates if k.startswith("recovery_rate/")} == {
        f"recovery_rate/{k}" for k in ERROR_KINDS
    }
    for ep in episodes[:3]:
        ep.success = False
    assert recovery_rate(episodes)["recovery_rate"] == pytest.approx(21 / 24)
    ep = episodes[0]
    ep.info["options"].pop("injected")
    with pytest.raises(ValueError, match="recovery_jobs"):
        recovery_rate([ep])


def test_recovery_episodes_do_not_depend_on_how_the_seeds_are_split(renderer):
    kw = {"min_hops": 2, "max_hops": 4}
    whole = recovery_episodes("lookup-chain", kw, range(6), renderer, error_rate=0.5, seed=4)
    parts = [
        *recovery_episodes("lookup-chain", kw, range(3), renderer, error_rate=0.5, seed=4),
        *recovery_episodes("lookup-chain", kw, range(3, 6), renderer, error_rate=0.5, seed=4),
    ]
    assert [e.to_dict() for e in whole] == [e.to_dict() for e in parts]


# ---------------------------------------------------------------------------- bootstrap data
def test_recovery_build_data_never_trains_on_an_injected_token(renderer, monkeypatch):
    """Through the real SFT step (Learner.step_sft: the packed pass, shared prefix and all),
    no position of an injected error is ever a trained target."""
    import copy

    from agentopd import logprobs
    from agentopd.learner import Learner
    from agentopd.zoo import bootstrap

    recipe = bootstrap.with_overrides(
        bootstrap.recipe_for("lookup-chain", "recovery"),
        {"train_episodes": 4, "recovery_episodes": 10, "recovery_error_rate": 0.6,
         "data_workers": 2},
    )  # fmt: skip
    clean, recovery = bootstrap.training_episodes("lookup-chain", recipe, renderer)
    assert len(clean) == 4 and len(recovery) == 10
    injected = [
        (ep, t) for ep in recovery for t in ep.turns if t.index in ep.info["injected_turns"]
    ]
    assert len(injected) >= 5
    # Mark the injected positions with a canary id that no trained position holds.
    trained_ids = {
        tok for ep in clean + recovery for seg in ep.segments
        for tok, m in zip(seg.tokens, seg.mask, strict=True) if m
    }  # fmt: skip
    canary = next(i for i in range(len(renderer.tokenizer)) if i not in trained_ids)
    marked = copy.deepcopy(recovery)
    for ep in marked:
        for t in ep.turns:
            if t.index in ep.info["injected_turns"]:
                seg = ep.segments[t.segment]
                assert set(seg.mask[t.start : t.end]) == {0}
                seg.tokens[t.start : t.end] = [canary] * (t.end - t.start)

    targets: list[int] = []
    real = logprobs.chunked_token_logprobs

    def spy(hidden, weight, target_ids, **kw):
        targets.extend(target_ids.flatten().tolist())
        return real(hidden, weight, target_ids, **kw)

    monkeypatch.setattr(logprobs, "chunked_token_logprobs", spy)

    def trained_targets(episodes) -> list[int]:
        targets.clear()
        model = bootstrap.build_model("tiny", seed=0)
        learner = Learner(model, bootstrap.sft_optim(micro_batch=6), renderer.pad_id)
        learner.step_sft(episodes)
        return list(targets)

    got = trained_targets(clean + marked)
    assert canary not in got
    assert len(got) == sum(sum(s.mask[1:]) for ep in clean + marked for s in ep.segments)
    # The check can fail: train one injected turn and its canary tokens reach the loss.
    ep, turn = next((e, t) for e in marked for t in e.turns if t.index in e.info["injected_turns"])
    ep.segments[turn.segment].mask[turn.start : turn.end] = [1] * (turn.end - turn.start)
    assert canary in trained_targets(clean + marked)
