"""tcod-b2f replaying stored episodes (``curriculum_kwargs.episodes``): the same prefix as the
scripted expert when the file holds the expert's episodes, envs without a scripted expert, and
the files it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentopd import cli, registry, zoo
from agentopd.config import ConfigError
from agentopd.env import Env
from agentopd.envs.lookup_chain import LookupChainEnv
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes

ENV_KWARGS = {"min_hops": 1, "max_hops": 3}


def make(**kw):
    return registry.curricula.make("tcod-b2f", env="lookup-chain", env_kwargs=ENV_KWARGS, **kw)


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory) -> Path:
    """Six successful expert episodes of lookup-chain (task seeds 0-5), as `agentopd collect`
    writes them."""
    path = tmp_path_factory.mktemp("b2f") / "expert.jsonl"
    rc = cli.main(
        [
            "collect",
            "env=lookup-chain",
            "env_kwargs.min_hops=1",
            "env_kwargs.max_hops=3",
            "episodes=6",
            f"output={path}",
        ]  # fmt: skip
    )
    assert rc == 0 and len(path.read_text().splitlines()) == 6
    return path


def _rewrite(src: Path, dst: Path, **fields) -> str:
    lines = [json.loads(x) for x in src.read_text().splitlines()]
    dst.write_text("".join(json.dumps({**d, **fields}) + "\n" for d in lines))
    return str(dst)


def test_stored_expert_episodes_replay_the_scripted_experts_prefix(expert_file):
    stored, scripted = make(k_start=1, eta=2, episodes=str(expert_file)), make(k_start=1, eta=2)
    assert sorted(j.seed for j in stored.jobs(step=0, n=6)) == list(range(6))  # the file's tasks
    renderer = Renderer(zoo.load_tokenizer())
    for step in (0, 2, 40):
        for job in stored.jobs(step=step, n=4):
            assert job.options == scripted.options_for(step, job.seed)
            assert stored.expert_actions(job.seed) == scripted.expert_actions(job.seed)
            [ep] = expert_episodes(
                [EpisodeJob("lookup-chain", job.seed, job.options, ENV_KWARGS)], renderer
            )
            assert ep.success and ep.replayed_turns == len(job.options["replay"])
    assert stored.describe(2) == scripted.describe(2) == {"curriculum/k": 2}


def test_stored_tasks_are_deterministic_and_follow_the_run_seed(expert_file):
    a, b = make(episodes=str(expert_file)), make(episodes=str(expert_file))
    assert [(j.seed, j.options) for j in a.jobs(7, 4)] == [
        (j.seed, j.options) for j in b.jobs(7, 4)
    ]
    orders = {tuple(make(episodes=str(expert_file), seed=s).pool) for s in range(4)}
    assert len(orders) > 1


@pytest.mark.parametrize("how", ["unimplemented", "expert_unavailable"])
def test_env_without_scripted_expert_needs_episodes(expert_file, monkeypatch, how):
    if how == "unimplemented":
        monkeypatch.setattr(LookupChainEnv, "expert_action", Env.expert_action)
    else:  # how the foreign-env adapters say it
        monkeypatch.setattr(LookupChainEnv, "expert_unavailable", "no expert", raising=False)
    with pytest.raises(ConfigError, match="no scripted expert") as e:
        make()
    assert "curriculum_kwargs.episodes" in str(e.value) and "agentopd collect" in str(e.value)
    c = make(k_start=1, eta=100, episodes=str(expert_file))
    env = registry.envs.make("lookup-chain", **ENV_KWARGS)
    for job in c.jobs(step=0, n=6):
        _, info = env.reset(seed=job.seed, options=job.options)
        assert (
            info["replayed_turns"]
            == len(job.options["replay"])
            == len(c.expert_actions(job.seed)) - 1
        )


def test_refuses_episodes_of_another_env(expert_file, tmp_path):
    path = _rewrite(expert_file, tmp_path / "sql.jsonl", env="sql")
    with pytest.raises(
        ConfigError, match="holds episodes of sql.*env=lookup-chain.*agentopd collect"
    ):
        make(episodes=path)


def test_refuses_a_file_without_successful_episodes(expert_file, tmp_path):
    path = _rewrite(expert_file, tmp_path / "failed.jsonl", success=False)
    with pytest.raises(ConfigError, match="curriculum_kwargs.episodes=.*no successful episodes"):
        make(episodes=path)
    path = _rewrite(expert_file, tmp_path / "partial.jsonl", replayed_turns=1)
    with pytest.raises(ConfigError, match="no whole successful episode"):
        make(episodes=path)
    with pytest.raises(ConfigError, match="no such file.*agentopd collect"):
        make(episodes=str(tmp_path / "missing.jsonl"))


def test_refuses_episodes_of_other_tasks(expert_file, tmp_path):
    c = make(episodes=_rewrite(expert_file, tmp_path / "other.jsonl", task_id="elsewhere"))
    with pytest.raises(ConfigError, match="same env_kwargs"):
        c.jobs(step=0, n=2)


@pytest.mark.slow
def test_train_with_stored_episodes_on_an_env_without_expert(expert_file, tmp_path, monkeypatch):
    from agentopd.replay.store import EpisodeStore

    monkeypatch.setattr(LookupChainEnv, "expert_action", Env.expert_action)
    args = ["train", "env=lookup-chain", "env_kwargs.min_hops=1", "env_kwargs.max_hops=3",
            "student=tiny-teacher-lookup-chain", "steps=2", "episodes_per_step=2",
            "cold_start.steps=0", "eval.episodes=2", "eval.before=false",
            "rollout.max_new_tokens=40", "curriculum=tcod-b2f", "curriculum_kwargs.k_start=1",
            f"curriculum_kwargs.episodes={expert_file}", f"runs_dir={tmp_path}", "run_name=r"]  # fmt: skip
    rc = cli.main(args)
    assert rc == 0
    episodes = [ep for _, ep in EpisodeStore(tmp_path / "r").iter_episodes()]
    train = [e for e in episodes if e.seed is not None and e.seed < 6 and e.replayed_turns > 0]
    assert train, "k=1 on 1-3 hops must replay a prefix in some training episode"
    for ep in train:
        assert sum(ep.segments[0].mask[: ep.segments[0].prompt_len]) == 0 and ep.num_turns == 1
