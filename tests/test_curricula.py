"""Temporal curricula: schedules, replayed prefixes, ordering and checkpointable state."""

from __future__ import annotations

import pytest

from agentopd import registry, zoo
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes


def make(name: str, **kw):
    return registry.curricula.make(
        name, env="lookup-chain", env_kwargs={"min_hops": 1, "max_hops": 3}, **kw
    )


def test_f2b_horizon_grows_by_one_every_eta_steps():
    c = make("tcod-f2b", k_start=1, eta=3)
    assert [c.horizon(n) for n in range(0, 16, 3)] == [1, 2, 3, 4, 5, 5]  # capped at max_turns = 5
    assert all(j.options["max_turns"] == 2 for j in c.jobs(step=4, n=3))


def test_b2f_replays_all_but_the_last_k_expert_actions():
    c = make("tcod-b2f", k_start=1, eta=2)
    renderer = Renderer(zoo.load_tokenizer())
    for step, k in ((0, 1), (2, 2), (40, 21)):
        for job in c.jobs(step=step, n=2):
            full = len(c.expert_actions(job.seed))
            assert len(job.options["replay"]) == max(0, full - k)
            [ep] = expert_episodes(
                [EpisodeJob("lookup-chain", job.seed, job.options, c.env_kwargs)], renderer
            )
            assert ep.success
            assert ep.replayed_turns == len(job.options["replay"])
            assert ep.num_turns == full - len(job.options["replay"])  # the policy plays the rest
            assert sum(ep.segments[0].mask[: ep.segments[0].prompt_len]) == 0


def test_horizon_sorted_goes_short_to_long():
    c = make("horizon-sorted", pool_size=30)
    difficulties = []
    for step in range(3):
        for job in c.jobs(step=step, n=10):
            env = registry.envs.make("lookup-chain", min_hops=1, max_hops=3)
            _, info = env.reset(seed=job.seed, options=job.options)
            difficulties.append(info["difficulty"])
    assert difficulties == sorted(difficulties) and difficulties[0] < difficulties[-1]


@pytest.mark.parametrize("name", ["uniform", "tcod-f2b", "tcod-b2f"])
def test_state_roundtrip_and_determinism(name):
    a, b = make(name), make(name)
    ja = a.jobs(step=7, n=4)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"step": 7}
    assert [(j.seed, j.options) for j in b.jobs(step=7, n=4)] == [(j.seed, j.options) for j in ja]


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="eta"):
        make("tcod-f2b", eta=0)


def test_curricula_return_rollout_jobs_and_b2f_caches_one_expert_episode_per_seed(monkeypatch):
    from agentopd import registry
    from agentopd.curricula import schedules

    for name in registry.curricula.names():
        c = registry.curricula.make(name, env="lookup-chain", env_kwargs={"hops": 2}, seed=0)
        jobs = c.jobs(step=0, n=2)
        assert all(isinstance(j, EpisodeJob) and j.env == "lookup-chain" for j in jobs), name
        assert all(j.env_kwargs == {"hops": 2} for j in jobs)
    b2f = registry.curricula.make("tcod-b2f", env="lookup-chain", env_kwargs={"hops": 2}, seed=0)
    made = []
    real_make = schedules.make
    monkeypatch.setattr(schedules, "make", lambda *a, **k: made.append(1) or real_make(*a, **k))
    first = b2f.expert_actions(5)
    assert b2f.expert_actions(5) == first and len(made) == 1


def test_every_registered_curriculum_implements_the_protocol_and_a_stranger_is_refused(
    monkeypatch,
):
    from agentopd.build import make_curriculum
    from agentopd.config import ConfigError, compose, to_object
    from agentopd.curriculum import Curriculum

    for name in registry.curricula.names():
        c = registry.curricula.make(name, env="lookup-chain", env_kwargs={"hops": 2}, seed=0)
        assert isinstance(c, Curriculum), name

    class NoState:
        def __init__(self, env, env_kwargs=None, seed=0):
            pass

        def jobs(self, step, n):
            return []

    monkeypatch.setattr(registry.curricula, "make", lambda name, **kw: NoState(**kw))
    cfg = to_object(compose("train", ["env=lookup-chain"]))
    with pytest.raises(ConfigError, match="describe, state_dict, load_state_dict"):
        make_curriculum(cfg)
