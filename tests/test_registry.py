"""The registry: register/make/spec/list, "did you mean", and a third-party plugin package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agentopd
from agentopd.registry import KINDS, Registry, Spec, UnknownNameError, registry


class Widget:
    """A stand-in for anything the registry builds."""

    def __init__(self, size: int = 1, colour: str = "red", name: str = "w"):
        self.size, self.colour, self.name = size, colour, name


@pytest.fixture
def fresh_name() -> Iterator[str]:
    """A unique env name, unregistered again after the test."""
    name = f"test-widget-{uuid.uuid4().hex[:8]}"
    yield name
    if name in registry("envs").names():
        registry("envs").unregister(name)


def test_builtin_entry_points_are_listed_without_importing() -> None:
    names = agentopd.list_registered()
    assert {"lookup-chain", "sql", "code-sandbox"} <= set(names)
    assert names == sorted(names)
    s = agentopd.spec("lookup-chain")
    assert s.entry_point == "agentopd.envs.lookup_chain:LookupChainEnv"
    assert s.package == "agentopd" and s.kind == "envs"
    assert set(agentopd.list_registered("curricula")) >= {"uniform", "tcod-f2b", "tcod-b2f"}


def test_unknown_name_suggests_the_nearest() -> None:
    with pytest.raises(UnknownNameError) as e:
        agentopd.spec("lookup-chian")
    msg = str(e.value)
    assert "Did you mean 'lookup-chain'?" in msg
    assert "unknown env 'lookup-chian'" in msg and "Valid names:" in msg
    assert isinstance(e.value, KeyError)


def test_unknown_name_without_a_near_match() -> None:
    with pytest.raises(UnknownNameError) as e:
        agentopd.make("qqqqqqqqqqqq")
    assert "Did you mean" not in str(e.value) and "code-sandbox" in str(e.value)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown registry kind"):
        registry("widgets")
    with pytest.raises(ValueError, match="unknown registry kind"):
        Registry("widgets")


def test_register_string_entry_point_with_defaults(fresh_name: str) -> None:
    s = agentopd.register(fresh_name, entry_point=f"{__name__}:Widget", size=3)
    assert isinstance(s, Spec) and s.package == "(runtime)" and s.defaults == {"size": 3}
    assert fresh_name in agentopd.list_registered()
    assert agentopd.spec(fresh_name) is s
    w = agentopd.make(fresh_name)
    assert isinstance(w, Widget) and w.size == 3 and w.colour == "red"
    w = agentopd.make(fresh_name, size=5, colour="blue")
    assert (w.size, w.colour) == (5, "blue")
    assert s.defaults == {"size": 3}  # overrides do not leak into the defaults
    assert w.spec_name == fresh_name  # make() records the registry name


def test_make_accepts_a_name_keyword_for_the_entry_point(fresh_name: str) -> None:
    agentopd.register(fresh_name, entry_point=Widget)
    assert agentopd.make(fresh_name, name="custom").name == "custom"
    assert registry("envs").make(fresh_name, name="other").name == "other"


def test_register_callable_and_replace(fresh_name: str) -> None:
    agentopd.register(fresh_name, lambda **kw: ("first", kw))
    agentopd.register(fresh_name, lambda **kw: ("second", kw), x=1)
    assert registry("envs").make(fresh_name) == ("second", {"x": 1})


def test_register_runtime_names_survive_refresh(fresh_name: str) -> None:
    agentopd.register(fresh_name, entry_point=Widget)
    registry("envs").refresh()
    assert fresh_name in agentopd.list_registered()
    assert "lookup-chain" in agentopd.list_registered()


def test_register_other_kinds() -> None:
    name = f"test-curriculum-{uuid.uuid4().hex[:8]}"
    agentopd.register(name, entry_point=Widget, kind="curricula", colour="green")
    try:
        assert name in agentopd.list_registered("curricula")
        assert name not in agentopd.list_registered("envs")
        assert agentopd.spec(name, kind="curricula").make().colour == "green"
        with pytest.raises(UnknownNameError, match=f"unknown curriculum '{name}x'"):
            agentopd.spec(name + "x", kind="curricula")
        with pytest.raises(UnknownNameError, match="unknown model"):
            agentopd.spec(name, kind="models")
    finally:
        registry("curricula").unregister(name)
    assert name not in agentopd.list_registered("curricula")


@pytest.mark.parametrize(
    "entry_point",
    [
        "{mod}:Widget",
        " {mod} : Widget ",
        "{mod}:Widget [extra1, extra2]",
        "{mod}:Widget.__init__",
    ],
)
def test_entry_point_syntax(entry_point: str) -> None:
    loaded = Spec("w", "envs", entry_point.format(mod=__name__)).load()
    assert loaded is (Widget.__init__ if "__init__" in entry_point else Widget)


@pytest.mark.parametrize("entry_point", ["{mod}", "{mod}:", ":Widget", "{mod}:Wid get"])
def test_malformed_entry_point(entry_point: str) -> None:
    with pytest.raises(ValueError, match="pkg.module:Attr"):
        Spec("w", "envs", entry_point.format(mod=__name__)).load()


def test_missing_module_raises_on_make_not_on_register(fresh_name: str) -> None:
    agentopd.register(fresh_name, entry_point="no_such_module_xyz:Env")
    with pytest.raises(ModuleNotFoundError):
        agentopd.make(fresh_name)


def test_unregister_unknown_name() -> None:
    with pytest.raises(UnknownNameError):
        registry("envs").unregister("never-registered-name")


def test_kinds_are_fixed() -> None:
    assert KINDS == ("envs", "curricula", "losses", "engines", "teachers", "sandboxes", "models")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_answers_did_you_mean(kind: str) -> None:
    reg = registry(kind)
    names = reg.names()
    if not names:  # models register on zoo import
        import agentopd.zoo  # noqa: F401

        names = reg.names()
    assert names, f"no built-in {kind}"
    typo = names[0] + "q"
    with pytest.raises(UnknownNameError, match="Did you mean"):
        reg.spec(typo)


def test_prefix_names_resolve_to_the_factory() -> None:
    envs = registry("envs")
    envs.register_prefix("testpfx", lambda rest, **kw: ("built", rest, kw))
    assert envs.spec("testpfx:abc:def").make(x=1) == ("built", "abc:def", {"x": 1})
    with pytest.raises(UnknownNameError, match="testpfx:<name>"):
        envs.spec("nope-prefix:abc")


# ---------------------------------------------------------------- a third-party plugin package


PLUGIN_MODULE = '''
"""A throwaway agentopd plugin used by tests/test_registry.py."""

from agentopd import Env, Task, tool


class PluginEnv(Env):
    description = "Plugin env for the registry test."

    def __init__(self, greeting: str = "hello", **kwargs):
        super().__init__(**kwargs)
        self.greeting = greeting

    def new_task(self, rng, options):
        return Task(id="only", prompt="Say the greeting.", answer=self.greeting)

    def build_tools(self, task):
        @tool
        def greeting() -> str:
            """Return the greeting."""
            return task.answer

        return [greeting]

    def check_answer(self, task, answer):
        return answer == task.answer

    def expert_action(self, messages):
        return self.submit_call(self.greeting)


# A loss and an engine, used by name from `agentopd train`.
import os
from dataclasses import dataclass

from agentopd.engines.hf import HFEngine
from agentopd.losses import LossConfig, aggregate
from agentopd.schema import knob


@dataclass
class ScaledConfig(LossConfig):
    scale: float = knob(1.0, "multiplier", gt=0)


class ScaledSampledKL:
    Config = ScaledConfig
    needs_support = False

    def __call__(self, inputs, student, cfg):
        advantage = (inputs.teacher_logprobs_B_T - inputs.old_logprobs_B_T).detach()
        per_token = -(advantage * student.logprobs_B_T)
        loss = cfg.scale * aggregate(per_token, inputs.mask_B_T, cfg.agg)
        return loss, {"loss": float(loss.detach()), "plugin_scale": cfg.scale}


SCALED = ScaledSampledKL()


class CountingEngine(HFEngine):
    def generate(self, prompts, params):
        with open(os.environ["PLUGIN_ENGINE_LOG"], "a") as f:
            f.write(f"{len(prompts)}\\n")
        return super().generate(prompts, params)


def build_engine(model, *, renderer, workdir, config):
    return CountingEngine(model, renderer.eot_id, renderer.pad_id)
'''


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Build and install a plugin distribution; always uninstall it afterwards."""
    tag = uuid.uuid4().hex[:8]
    dist, module, env_name = (
        f"agentopd-test-plugin-{tag}",
        f"agentopd_test_plugin_{tag}",
        f"plugin-env-{tag}",
    )
    src = tmp_path / "plugin"
    src.mkdir()
    (src / f"{module}.py").write_text(PLUGIN_MODULE)
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=70.1"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "0.0.1"

            [project.entry-points."agentopd.envs"]
            {env_name} = "{module}:PluginEnv"

            [project.entry-points."agentopd.losses"]
            {env_name}-loss = "{module}:SCALED"

            [project.entry-points."agentopd.engines"]
            {env_name}-engine = "{module}:build_engine"

            [tool.setuptools]
            py-modules = ["{module}"]
            """
        )
    )
    try:
        out = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(src))
        assert out.returncode == 0, f"pip install failed:\n{out.stdout}\n{out.stderr}"
        yield {"dist": dist, "module": module, "env_name": env_name}
    finally:
        _pip("uninstall", "-y", dist)
        registry("envs").refresh()
    assert _pip("show", dist).returncode != 0, "plugin was not uninstalled"


@pytest.mark.slow
def test_plugin_package_registers_through_entry_points(plugin: dict[str, Any]) -> None:
    code = textwrap.dedent(
        f"""
        import agentopd
        env = agentopd.make({plugin["env_name"]!r}, greeting="hi there", max_turns=2)
        messages, info = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(env.expert_action(messages))
        assert terminated and reward == 1.0, (obs, info)
        print(type(env).__module__)
        print(env.spec_name)
        print(agentopd.spec({plugin["env_name"]!r}).package)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    module, spec_name, package = out.stdout.split()
    assert module == plugin["module"]
    assert spec_name == plugin["env_name"]
    assert _normalise(package) == _normalise(plugin["dist"])

    # In this process, refresh() picks the freshly installed plugin up as well.
    envs = registry("envs")
    envs.refresh()
    assert plugin["env_name"] in envs.names()
    assert _normalise(envs.spec(plugin["env_name"]).package) == _normalise(plugin["dist"])


def test_refresh_forgets_uninstalled_plugins(fresh_name: str) -> None:
    envs = registry("envs")
    envs.refresh()
    before = envs.names()
    agentopd.register(fresh_name, entry_point=Widget)
    envs.unregister("lookup-chain")
    assert "lookup-chain" not in envs.names()
    envs.refresh()
    assert envs.names() == sorted({*before, fresh_name})


@pytest.mark.slow
def test_plugin_loss_and_engine_are_used_by_name_from_train(
    plugin: dict[str, Any], tmp_path: Path
) -> None:
    """A pip-installed package adds a loss (with its own config key) and an engine."""
    log = tmp_path / "engine.log"
    name = plugin["env_name"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentopd.cli",
            "train",
            "env=lookup-chain",
            f"loss={name}-loss",
            "loss_cfg.scale=2.5",
            f"engine={name}-engine",
            "steps=1",
            "episodes_per_step=2",
            "cold_start.steps=0",
            "eval.episodes=0",
            f"runs_dir={tmp_path / 'runs'}",
            "run_name=plugin",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PLUGIN_ENGINE_LOG": str(log)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert log.is_file() and sum(int(x) for x in log.read_text().split()) >= 2
    rows = [
        json.loads(x)
        for x in (tmp_path / "runs" / "plugin" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in rows if r.get("phase") == "train"]
    assert train and train[0]["learner/plugin_scale"] == 2.5
    choices = json.loads((tmp_path / "runs" / "plugin" / "choices.json").read_text())
    assert choices["engine"] == f"{name}-engine"
