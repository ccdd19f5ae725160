"""Token-exact rendering and the rollout loop: invariants 1-3 of DESIGN.md."""

from __future__ import annotations

import pytest
import torch

from agentopd import make, zoo
from agentopd.engines import Sample, SamplingParams
from agentopd.engines.hf import HFEngine
from agentopd.renderer import PrefixMismatchError, Renderer
from agentopd.rollout import (
    EpisodeJob,
    RolloutConfig,
    expert_episode,
    expert_episodes,
    run_episodes,
)
from agentopd.types import Episode, StopReason

# A ChatML template that, like some reasoning-model templates, strips <think>...</think> from every
# assistant turn except the last one: it rewrites history.
REWRITING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and not loop.last -%}"
    "{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tok():
    return zoo.load_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok):
    return Renderer(tok)


class ScriptedEngine:
    """An engine that 'samples' fixed texts, so tests know exactly which tokens were sampled."""

    def __init__(self, renderer: Renderer, texts: list[str]):
        self.renderer = renderer
        self.texts = list(texts)
        self.calls: list[list[list[int]]] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        self.calls.append([list(p) for p in prompts])
        out = []
        for _ in prompts:
            toks = self.renderer.encode(self.texts.pop(0)) + [self.renderer.eot_id]
            out.append(Sample(tokens=toks, logprobs=[-0.5] * len(toks), finished=True))
        return out

    def load_weights(self, state_dict) -> None:
        pass


def _sampled_spans(ep: Episode) -> list[tuple[int, int]]:
    return [(t.start, t.end) for t in ep.turns]


def test_mask_is_one_exactly_on_sampled_tokens(renderer):
    env = make("lookup-chain", hops=2)
    _, info = env.reset(seed=3)
    actions = []
    probe = make("lookup-chain", hops=2)
    probe.reset(seed=3)
    for _ in range(3):
        a = probe.expert_action(list(probe.messages))
        actions.append(a)
        probe.step(a)
    engine = ScriptedEngine(renderer, actions)
    [ep] = run_episodes([EpisodeJob("lookup-chain", 3, env_kwargs={"hops": 2})], engine, renderer)
    assert ep.success and ep.stop_reason == StopReason.ANSWER
    seg = ep.segments[0]
    expected = [0] * len(seg.tokens)
    for (s, e), text in zip(_sampled_spans(ep), actions, strict=True):
        sampled = renderer.encode(text) + [renderer.eot_id]
        assert seg.tokens[s:e] == sampled  # stored exactly as sampled, end-of-turn included
        assert seg.logprobs[s:e] == [-0.5] * len(sampled)
        expected[s:e] = [1] * (e - s)
    assert seg.mask == expected
    # Each prompt the engine saw is the previous prompt + sampled tokens + bridge (never re-encoded).
    for prev, nxt, (_s, e) in zip(engine.calls, engine.calls[1:], _sampled_spans(ep), strict=False):
        assert nxt[0][:e] == seg.tokens[:e]
        assert nxt[0][: len(prev[0])] == prev[0]
    # Tool results are in the token stream with mask 0.
    text_unmasked = renderer.decode([t for t, m in zip(seg.tokens, seg.mask, strict=True) if not m])
    for turn in ep.turns[:-1]:
        for msg in turn.tool_results:
            assert msg.content in text_unmasked


def test_sampled_tokens_are_never_reencoded(renderer):
    """A sampled token sequence that differs from the canonical encoding of its text survives."""
    text = '<tool_call>{"name": "lookup", "arguments": {"key": "a1"}}</tool_call>'
    canonical = renderer.encode(text)
    # Spell the same text with single-character tokens (a different but valid tokenization).
    odd = []
    for ch in text:
        odd.extend(renderer.encode(ch))
    assert odd != canonical and renderer.decode(odd) == text

    class OddEngine(ScriptedEngine):
        def generate(self, prompts, params):
            return [
                Sample(
                    tokens=odd + [renderer.eot_id], logprobs=[0.0] * (len(odd) + 1), finished=True
                )
                for _ in prompts
            ]

    [ep] = run_episodes(
        [EpisodeJob("lookup-chain", 0, options={"max_turns": 1})], OddEngine(renderer, []), renderer
    )
    t = ep.turns[0]
    assert ep.segments[0].tokens[t.start : t.end] == odd + [renderer.eot_id]


def test_history_rewriting_template_is_detected(tok):
    r = Renderer(tok, chat_template=REWRITING_TEMPLATE)
    texts = ["<think>hmm</think>" + make("lookup-chain").call("lookup", key="zz")] * 3
    with pytest.raises(PrefixMismatchError, match="prefix"):
        run_episodes([EpisodeJob("lookup-chain", 0)], ScriptedEngine(r, texts), r)


def test_history_rewriting_template_new_segment(tok):
    r = Renderer(tok, chat_template=REWRITING_TEMPLATE, on_prefix_mismatch="new-segment")
    texts = ["<think>hmm</think>" + make("lookup-chain").call("lookup", key="zz")] * 3
    [ep] = run_episodes(
        [EpisodeJob("lookup-chain", 0, options={"max_turns": 3})], ScriptedEngine(r, texts), r
    )
    assert len(ep.segments) == 3 and ep.info["segments_restarted"] == 2
    for seg in ep.segments[1:]:
        # A fresh rendering: its prompt (mask 0) holds the rewritten history, then one sampled turn.
        assert seg.mask[: seg.prompt_len] == [0] * seg.prompt_len
        assert "<think>" not in r.decode(seg.tokens[: seg.prompt_len])
    for t in ep.turns:
        seg = ep.segments[t.segment]
        assert seg.mask[t.start : t.end] == [1] * (t.end - t.start)


def test_parse_errors_become_observations_and_can_be_masked(renderer):
    bad = '<tool_call>{"name": "lookup", "arguments": {"key": </tool_call>'
    [ep] = run_episodes(
        [EpisodeJob("lookup-chain", 1, options={"max_turns": 2})],
        ScriptedEngine(renderer, [bad, bad]),
        renderer,
    )
    assert ep.stop_reason == StopReason.MAX_TURNS and ep.info["tool_errors"] == {"parse": 2}
    assert all(t.parse_error for t in ep.turns)
    assert "Error (parse)" in ep.turns[0].tool_results[0].content
    [masked] = run_episodes(
        [EpisodeJob("lookup-chain", 1, options={"max_turns": 2})],
        ScriptedEngine(renderer, [bad, bad]),
        renderer,
        RolloutConfig(mask_parse_errors=True),
    )
    assert sum(masked.segments[0].mask) == 0


def test_token_budget_and_unfinished_turn(renderer):
    class Rambler(ScriptedEngine):
        def generate(self, prompts, params):
            return [
                Sample(
                    tokens=[7] * params.max_new_tokens,
                    logprobs=[0.0] * params.max_new_tokens,
                    finished=False,
                )
                for _ in prompts
            ]

    [ep] = run_episodes(
        [EpisodeJob("lookup-chain", 0)],
        Rambler(renderer, []),
        renderer,
        RolloutConfig(max_new_tokens=10),
    )
    assert ep.stop_reason == StopReason.TOKEN_BUDGET and ep.num_turns == 1
    assert sum(ep.segments[0].mask) == 10


def test_replayed_prefix_has_mask_zero(renderer):
    probe = make("lookup-chain", hops=3)
    probe.reset(seed=5)
    actions = []
    for _ in range(4):
        a = probe.expert_action(list(probe.messages))
        actions.append(a)
        probe.step(a)
    [ep] = expert_episodes(
        [EpisodeJob("lookup-chain", 5, options={"replay": actions[:2]}, env_kwargs={"hops": 3})],
        renderer,
    )
    assert ep.success and ep.replayed_turns == 2
    assert [t.index for t in ep.turns] == [2, 3]
    seg = ep.segments[0]
    prompt_text = renderer.decode(seg.tokens[: seg.prompt_len])
    assert actions[0] in prompt_text and actions[1] in prompt_text
    assert sum(seg.mask[: seg.prompt_len]) == 0


def test_expert_episode_roundtrip_and_hf_engine(renderer, tok):
    env = make("lookup-chain", hops=1)
    ep = expert_episode(env, renderer, seed=2)
    assert Episode.from_json(ep.to_json()) == ep
    torch.manual_seed(0)
    model = zoo.build_model("tiny", seed=0)
    engine = HFEngine(model, renderer.eot_id, renderer.pad_id)
    eps = run_episodes(
        [EpisodeJob("lookup-chain", i) for i in range(3)],
        engine,
        renderer,
        RolloutConfig(max_new_tokens=12),
        seed=0,
    )
    for e in eps:
        for t in e.turns:
            seg = e.segments[t.segment]
            assert all(m == 1 for m in seg.mask[t.start : t.end])
            assert all(lp <= 0 for lp in seg.logprobs[t.start : t.end])
        assert len(e.segments[0].tokens) == len(e.segments[0].mask) == len(e.segments[0].logprobs)
    # Same seed, same samples.
    again = run_episodes(
        [EpisodeJob("lookup-chain", i) for i in range(3)],
        engine,
        renderer,
        RolloutConfig(max_new_tokens=12),
        seed=0,
    )
    assert [e.segments[0].tokens for e in eps] == [e.segments[0].tokens for e in again]


class _ProbeEngine:
    """Plays a fixed lookup call every turn, and at each call also samples the same probe
    prompt with the real HF engine under the call's SamplingParams: what it draws shows which
    random numbers that call got."""

    def __init__(self, inner: HFEngine, renderer: Renderer):
        self.inner, self.renderer = inner, renderer
        self.draws: list[list[int]] = []
        self.seeds: list[int | None] = []

    def generate(self, prompts, params):
        self.seeds.append(params.seed)
        self.draws.append(self.inner.generate([[5, 6, 7, 8]], params)[0].tokens)
        text = '<tool_call>{"name": "lookup", "arguments": {"key": "a00"}}</tool_call>'
        toks = self.renderer.encode(text) + [self.renderer.eot_id]
        return [Sample(tokens=toks, logprobs=[0.0] * len(toks), finished=True) for _ in prompts]

    def load_weights(self, state_dict):
        pass


def test_each_engine_call_of_a_rollout_draws_fresh_random_numbers(renderer):
    """Turns of one rollout are sampled independently (each engine call gets its own seed from
    the rollout's seed stream), and the same rollout seed replays the same draws."""
    model = zoo.build_model("tiny", seed=0)
    inner = HFEngine(model, renderer.eot_id, renderer.pad_id)
    # Re-seeding with one value per call (the old behaviour) replays the same draws.
    same = [inner.generate([[5, 6, 7, 8]], SamplingParams(12, 1.0, 1.0, 3))[0].tokens for _ in "ab"]
    assert same[0] == same[1]

    def play(seed):
        probe = _ProbeEngine(inner, renderer)
        jobs = [EpisodeJob("lookup-chain", 1, {"max_turns": 4}, {"hops": 3})]
        run_episodes(jobs, probe, renderer, RolloutConfig(max_new_tokens=12), seed=seed)
        return probe

    first = play(0)
    assert len(first.draws) == 4
    assert len(set(first.seeds)) == 4
    # Independent draws: no two turns sampled the same 12 tokens from the same prompt.
    assert len({tuple(d) for d in first.draws}) == 4
    again = play(0)
    assert again.seeds == first.seeds and again.draws == first.draws
    other = play(1)
    assert other.draws != first.draws


def test_a_non_finite_reward_ends_the_episode_as_env_error(renderer):
    """A built-in or user env that returns NaN / inf as reward: that episode ends as
    env_error naming the reward; nothing non-finite reaches the episode's reward."""
    from agentopd.envs.lookup_chain import LookupChainEnv
    from agentopd.registry import envs as env_registry

    class NanReward(LookupChainEnv):
        def step(self, action):
            obs, _, terminated, truncated, info = super().step(action)
            return obs, float("nan"), terminated, truncated, info

    env_registry.register("nan-reward-test", NanReward)
    try:
        eps = run_episodes(
            [EpisodeJob("nan-reward-test", 1)],
            _ProbeEngine(
                HFEngine(zoo.build_model("tiny"), renderer.eot_id, renderer.pad_id), renderer
            ),
            renderer,
            RolloutConfig(max_new_tokens=4),
            seed=0,
        )
    finally:
        env_registry.unregister("nan-reward-test")
    assert eps[0].stop_reason == StopReason.ENV_ERROR
    assert "non-finite reward" in eps[0].info["error"]
    assert eps[0].reward == 0.0
