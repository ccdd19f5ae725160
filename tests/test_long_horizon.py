"""Long-horizon settings (docs/long_horizon.md): the expert still solves them, defaults unchanged."""

from __future__ import annotations

import pytest

from agentopd import registry, zoo
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.sandbox.testing import require_backend

LONG_LOOKUP = {"min_hops": 8, "max_hops": 16, "distractors": 2}


@pytest.fixture(scope="module")
def renderer():
    return Renderer(zoo.load_tokenizer())


def _solve(env: str, env_kwargs: dict, seeds, renderer, split: str = "train"):
    jobs = [EpisodeJob(env, s, {"split": split}, env_kwargs) for s in seeds]
    return expert_episodes(jobs, renderer)


def test_lookup_chain_long_with_distractors_is_solved_by_the_expert(renderer):
    episodes = _solve("lookup-chain", LONG_LOOKUP, range(12), renderer)
    assert all(ep.success for ep in episodes)
    assert {ep.num_turns for ep in episodes} <= set(range(9, 18))  # hops + 1 turns
    assert max(ep.num_turns for ep in episodes) >= 14  # the range really is long
    [ev] = _solve("lookup-chain", LONG_LOOKUP, [3], renderer, split="eval")
    assert ev.success


def test_distractors_are_near_miss_keys_that_exist():
    env = registry.envs.make("lookup-chain", hops=10, distractors=2)
    plain = registry.envs.make("lookup-chain", hops=10)
    env.reset(seed=4)
    plain.reset(seed=4)
    store, chain = env.task.data["store"], env.task.data["chain"]
    extra = set(store) - set(plain.task.data["store"])
    assert len(store) > len(plain.task.data["store"]) and extra.isdisjoint(chain)
    for key in chain[1:]:
        near = [
            k
            for k in extra
            if k[0] == key[0]
            and (k[1:] == key[:0:-1] or sum(a != b for a, b in zip(k[1:], key[1:])) == 1)
        ]
        assert near, f"no near-miss distractor for {key}"
    env.step(env.call("lookup", key=sorted(extra)[0]))
    assert not env.messages[-1].content.startswith("no key")  # a miscopy now gets an answer


def test_default_tasks_are_unchanged():
    env = registry.envs.make("lookup-chain")
    env.reset(seed=0)
    assert env.task.id == "z15-h2-943e4dda"  # pinned before distractors existed
    assert (
        registry.envs.make("lookup-chain", distractors=0).reset(seed=0)[1]["task_id"] == env.task.id
    )
    sql = registry.envs.make("sql")
    assert {sql.reset(seed=s)[1]["difficulty"] for s in range(30)} == {1, 2, 3}
    with pytest.raises(ValueError, match="distractors"):
        registry.envs.make("lookup-chain", distractors=-1)


@pytest.mark.parametrize("difficulty", [4, 5])
def test_sql_long_chains_need_dependent_queries_and_the_expert_solves_them(renderer, difficulty):
    kw = {"min_difficulty": difficulty, "max_difficulty": difficulty, "max_turns": 8}
    episodes = _solve("sql", kw, range(10), renderer)
    assert all(ep.success for ep in episodes)
    turns = [ep.num_turns for ep in episodes]
    # difficulty queries and a submit; rarely the chain comes back to a customer and reuses one
    assert max(turns) == difficulty + 1 and sum(t == difficulty + 1 for t in turns) >= 9
    with pytest.raises(ValueError, match="max_difficulty <= 5"):
        registry.envs.make("sql", max_difficulty=6)


def test_code_sandbox_five_dependent_steps_are_solved_by_the_expert(renderer):
    require_backend("local")
    kw = {"min_steps": 5, "max_steps": 6, "backend": "local"}
    episodes = _solve("code-sandbox", kw, range(3), renderer)
    assert all(ep.success for ep in episodes), [ep.info.get("error") for ep in episodes]
    assert {ep.num_turns for ep in episodes} <= {6, 7}
