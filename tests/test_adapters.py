"""Env adapters (gym:, gem:, skyrl-gym:, openenv:) on real foreign envs, through the real command.

verifiers: has its own file (tests/test_adapter_verifiers.py); its listing, missing-package and
"did you mean" rows are here.

Every foreign package is a hard requirement here: CI installs ``.[dev,adapters]``, and a missing
package fails these tests (with the pip line) instead of skipping them.
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import agentopd as _agentopd

from agentopd import registry
from agentopd.engines import Sample
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, run_episodes
from agentopd.types import StopReason

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
GSM8K = "skyrl-gym:gsm8k_multi_turn"
OPENENV_TEXT = "openenv:adapter_fixtures:ReverseWordEnvironment"
OPENENV_TOOL = "openenv:adapter_fixtures:GuessNumberEnvironment"


def agentopd(*args: str, timeout: float = 300):
    """The CLI with ``tests/`` importable (the OpenEnv fixtures live there)."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path
    try:
        return _agentopd(*args, timeout=timeout)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory) -> Path:
    from adapter_fixtures import GSM8K_ROWS

    path = tmp_path_factory.mktemp("skyrl") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return path


def wrapped(tasks_file: Path) -> dict[str, list[str]]:
    """Each wrapped foreign env: name -> constructor overrides (key=value)."""
    return {
        "gym:FrozenLake-v1": ["max_turns=4"],
        "gem:game:GuessTheNumber-v0-easy": [],
        GSM8K: [f"tasks={tasks_file}", "max_turns=3"],
        OPENENV_TEXT: ["max_turns=3"],
        OPENENV_TOOL: ["max_turns=4"],
    }


NAMES = ["gym:FrozenLake-v1", "gem:game:GuessTheNumber-v0-easy", GSM8K, OPENENV_TEXT, OPENENV_TOOL]


# ------------------------------------------------------------------------------ listing
def test_envs_lists_every_adapter_installed():
    r = agentopd("envs")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for prefix, syntax in [
        ("gym", "gym:<id>"),
        ("gem", "gem:<env_id>"),
        ("skyrl-gym", "skyrl-gym:<env_id>"),
        ("openenv", "openenv:<module>"),
        ("verifiers", "verifiers:<module>"),
    ]:
        assert prefix in out and syntax in out
    assert "no: pip install" not in out, out
    assert set(registry.envs.prefixes()) >= {"gem", "gym", "openenv", "skyrl-gym", "verifiers"}


# ------------------------------------------------------------------------------ check-env
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_check_env_passes_and_says_what_it_skipped(name, tasks_file):
    r = agentopd("check-env", name, *wrapped(tasks_file)[name])
    out = " ".join(r.stdout.split())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "passed" in out
    assert "skipped: the env has no scripted expert" in out


# ------------------------------------------------------------------------------ train
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_two_steps_with_a_named_teacher(name, tasks_file, tmp_path):
    env_kwargs = [f"env_kwargs.{kv}" for kv in wrapped(tasks_file)[name]]
    r = agentopd(
        "train",
        f"env={name}",
        *env_kwargs,
        "student=tiny",
        "teacher=tiny-teacher-lookup-chain",
        "steps=2",
        "episodes_per_step=2",
        "cold_start.steps=0",
        "eval.episodes=2",
        "rollout.max_new_tokens=12",
        f"runs_dir={tmp_path}",
        "run_name=a",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if row.get("phase") == "train"]
    assert steps == [0, 1]


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("name", "module", "extra"),
    [
        ("gem:game:GuessTheNumber-v0-easy", "gem", "gem"),
        ("skyrl-gym:gsm8k", "skyrl_gym", "skyrl"),
        (OPENENV_TEXT, "openenv.core.env_server.interfaces", "openenv"),
        ("verifiers:verifiers_fixtures:WordTaskset", "verifiers.v1", "verifiers"),
    ],
)
def test_missing_package_gives_the_pip_line(name, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install 'agentopd\[{extra}\]'"):
        registry.make(name, tasks=[{"prompt": [{"role": "user", "content": "x"}]}])


@pytest.mark.parametrize(
    ("name", "near"),
    [
        ("gym:FrozenLak-v1", "FrozenLake-v1"),
        ("gem:game:GuessTheNumbr-v0-easy", "game:GuessTheNumber-v0-easy"),
        ("skyrl-gym:gsm8k_multiturn", "gsm8k_multi_turn"),
        ("openenv:adapter_fixtures:ReverseWordEnv", "ReverseWordEnvironment"),
        ("verifiers:textarna", "textarena"),
        ("verifiers:verifiers_fixtures:WordTaskst", "WordTaskset"),
    ],
)
def test_unknown_foreign_id_lists_ids_with_did_you_mean(name, near):
    with pytest.raises(registry.UnknownNameError) as e:
        registry.make(name, tasks=[{"prompt": [{"role": "user", "content": "x"}]}])
    assert f"Did you mean {near!r}?" in str(e.value)
    assert "Available:" in str(e.value) or "Environments there:" in str(e.value)


def test_unknown_id_is_a_config_error_in_train():
    r = agentopd(
        "train", "env=gem:game:Wordle-v9", "student=tiny", "teacher=tiny-teacher-lookup-chain"
    )
    assert r.returncode == 2
    assert "Did you mean" in r.stdout + r.stderr


class _Scripted:
    """An engine that always answers the same text (the foreign env decides what it means)."""

    def __init__(self, renderer: Renderer, text: str):
        self.tokens = renderer.encode(text) + [renderer.eot_id]

    def generate(self, prompts, params):
        return [Sample(list(self.tokens), [-0.5] * len(self.tokens), True) for _ in prompts]

    def load_weights(self, state_dict):
        pass


def _renderer() -> Renderer:
    from agentopd import zoo

    return Renderer(zoo.load_tokenizer())


def test_foreign_env_raising_mid_episode_ends_only_that_episode():
    renderer = _renderer()
    jobs = [
        EpisodeJob(OPENENV_TEXT, 0, {}, {"init": {"explode_at": 2}, "max_turns": 3}),
        EpisodeJob(OPENENV_TEXT, 0, {}, {"max_turns": 3}),
    ]
    broken, fine = run_episodes(jobs, _Scripted(renderer, "nope"), renderer)
    assert broken.stop_reason == StopReason.ENV_ERROR
    assert "the foreign env crashed" in broken.info["error"]
    assert broken.num_turns == 2
    assert fine.stop_reason == StopReason.MAX_TURNS and fine.num_turns == 3


def test_episode_is_token_exact_and_masks_env_text():
    renderer = _renderer()
    job = EpisodeJob("gem:game:GuessTheNumber-v0-easy", 3, {"split": "train"}, {})
    (ep,) = run_episodes([job], _Scripted(renderer, "\\boxed{2}"), renderer)
    seg = ep.segments[0]
    sampled = [t for t, m in zip(seg.tokens, seg.mask) if m]
    scripted = renderer.encode("\\boxed{2}") + [renderer.eot_id]
    assert sampled == scripted * ep.num_turns
    assert ep.num_turns >= 1 and sum(seg.mask) == len(scripted) * ep.num_turns


# ------------------------------------------------------------------------------ knobs
def test_max_turns_reaches_gem_and_is_enforced():
    env = registry.make("gem:game:GuessTheNumber-v0-easy")
    messages, info = env.reset(seed=0, options={"max_turns": 2})
    assert info["max_turns"] == 2 and "within 2 turns" in messages[-1].content
    env.step("\\boxed{1}")
    _, _, terminated, truncated, _ = env.step("\\boxed{2}")
    assert terminated or truncated
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("\\boxed{3}")


def test_gem_keeps_the_global_rng_untouched():
    env = registry.make("gem:game:GuessTheNumber-v0-easy")
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    env.reset(seed=7)
    env.step("\\boxed{4}")
    assert (random.random(), np.random.random()) == expected


def test_split_and_task_index_choose_tasks(tasks_file):
    env = registry.make(GSM8K, tasks=str(tasks_file), eval_tasks=str(tasks_file))
    _, a = env.reset(options={"task_index": 4})
    _, b = env.reset(options={"task_index": 4, "split": "eval"})
    assert a["task_id"] == "train/4" and b["task_id"] == "eval/4"
    gem = registry.make("gem:game:GuessTheNumber-v0-hard")
    train = {gem.reset(seed=s)[1]["task_id"] for s in range(5)}
    held_out = {gem.reset(seed=s, options={"split": "eval"})[1]["task_id"] for s in range(5)}
    assert len(train) > 1 and not train & held_out


def test_openenv_knobs_pass_when_reset_names_them_and_warn_otherwise():
    guess = registry.make(OPENENV_TOOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # task_index is a parameter of this env's reset
        guess.reset(seed=0, options={"task_index": 2})
    assert guess._env.secret == 3
    text = registry.make(OPENENV_TEXT)
    with pytest.warns(UserWarning, match="no 'task_index' parameter"):
        text.reset(seed=0, options={"task_index": 5})


def test_unknown_reset_option_is_dropped_with_a_warning():
    env = registry.make("gym:FrozenLake-v1", max_turns=2)
    with pytest.warns(UserWarning, match="'hops' has no counterpart in Gymnasium"):
        env.reset(seed=0, options={"hops": 3})


def test_gym_discrete_action_is_parsed_and_bad_ones_do_not_step():
    env = registry.make(
        "gym:FrozenLake-v1",
        max_turns=5,
        env_kwargs={"is_slippery": False},
        action_names=["left", "down", "right", "up"],
    )
    messages, _ = env.reset(seed=0)
    assert "[S]" in messages[-1].content and "0 = left" in messages[-1].content
    out, _, _, _, _ = env.step("jump")
    assert "Invalid action" in out[0].content
    out, _, _, _, _ = env.step("right")
    assert "S[F]FF" in out[0].content
    for action in ("right", "down", "down"):
        _, reward, terminated, truncated, info = env.step(action)
    assert not terminated and truncated  # 5 turns used, the goal is 2 moves further


def test_openenv_tool_action_and_replay():
    env = registry.make(OPENENV_TOOL, max_turns=4)
    call = '<tool_call>{"name": "act", "arguments": {"guess": %d}}</tool_call>'
    messages, info = env.reset(options={"task_index": 4, "replay": [call % 1]})
    assert info["replayed_turns"] == 1 and "higher than 1" in messages[-1].content
    out, reward, terminated, _, info = env.step(call % 5)
    assert out[0].role == "tool" and reward == 1.0 and terminated and info["success"]


OPENENV_MCP = "openenv:adapter_fixtures:VaultEnvironment"


def _call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_openenv_mcp_tools_become_agentopd_tools_and_calls_round_trip():
    env = registry.make(OPENENV_MCP, max_turns=6)
    _, info = env.reset(seed=3)
    tools = {t["function"]["name"]: t["function"] for t in info["tools"]}
    assert set(tools) == {"read_shelf", "submit"}
    assert tools["read_shelf"]["parameters"]["properties"] == {"shelf": {"type": "integer"}}
    assert tools["read_shelf"]["description"] == "Read the note on a shelf (0 to 3)."
    word, shelf = env._env.word, env._env.shelf
    obs, reward, terminated, _, step_info = env.step(_call("read_shelf", shelf=shelf))
    assert [(m.role, m.name, m.content) for m in obs] == [
        ("tool", "read_shelf", f"The secret word is {word!r}.")
    ]
    assert (reward, terminated, step_info["tool_errors"]) == (0.0, False, [])
    # a schema violation is caught before the MCP server; a raising tool comes back as a message
    obs, *_, step_info = env.step(_call("read_shelf", shelf="two"))
    assert step_info["tool_errors"] == ["schema"] and "not of type 'integer'" in obs[0].content
    obs, _, terminated, _, step_info = env.step(_call("read_shelf", shelf=9))
    assert step_info["tool_errors"] == ["exception"] and "there is no shelf 9" in obs[0].content
    assert not terminated
    obs, reward, terminated, _, step_info = env.step(_call("submit", word=word))
    assert obs[0].content == "Correct." and reward == 1.0 and terminated and step_info["success"]
    env.close()


def test_openenv_mcp_env_through_the_rollout_loop():
    renderer = _renderer()
    (ep,) = run_episodes(
        [EpisodeJob(OPENENV_MCP, 0, {}, {"max_turns": 2})],
        _Scripted(renderer, _call("read_shelf", shelf=0)),
        renderer,
    )
    assert ep.stop_reason == StopReason.MAX_TURNS and ep.num_turns == 2
    assert [m.role for m in ep.messages].count("tool") == 2
    assert ep.tools and {t["function"]["name"] for t in ep.tools} == {"read_shelf", "submit"}
