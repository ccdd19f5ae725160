"""Foreign environments are bounded (issue 26): a ``gym:`` env whose reset or step never
returns, one that answers a NaN or infinite reward, and one whose observation is huge, played
through the real rollout loop and ``check-env``.

The hanging env blocks on an event the test releases at the end, so no thread outlives the
module; the adapter's deadline (``call_timeout_s``) is what ends the episode.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import gymnasium
import pytest
from gymnasium import spaces

from agentopd.conformance import check_env_conformance
from agentopd.engines import Sample
from agentopd.metrics import episode_summary
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, RolloutConfig, run_episodes
from agentopd.tooling import TRUNCATION_MARKER
from agentopd.types import StopReason

RELEASE = threading.Event()
HUGE = 200_000


class MoodyEnv(gymnasium.Env):
    """Text in, text out; ``mode`` says how it misbehaves."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.observation_space = spaces.Text(max_length=10**7)
        self.action_space = spaces.Text(max_length=10**4)
        self.n = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if self.mode == "hang_reset":
            RELEASE.wait()
        self.n = 0
        return ("x" * HUGE if self.mode == "huge_reset" else "Say something."), {}

    def step(self, action: str):
        self.n += 1
        if self.mode == "hang_step":
            RELEASE.wait()
        reward = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(self.mode, 0.0)
        obs = "y" * HUGE if self.mode == "huge_step" else f"heard {self.n}"
        return obs, reward, False, False, {}


gymnasium.register(id="MoodyTest-v0", entry_point=f"{__name__}:MoodyEnv")


@pytest.fixture(scope="module", autouse=True)
def release_hung_calls():
    RELEASE.clear()
    yield
    RELEASE.set()


class Say:
    """The student: always says the same short text."""

    def __init__(self, renderer: Renderer):
        self.tokens = renderer.encode("hello") + [renderer.eot_id]

    def generate(self, prompts, params):
        return [Sample(list(self.tokens), [-0.5] * len(self.tokens), True) for _ in prompts]

    def load_weights(self, state_dict):
        pass


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    from agentopd import zoo

    return Renderer(zoo.load_tokenizer())


def job(mode: str, seed: int = 0, **kw: Any) -> EpisodeJob:
    return EpisodeJob(
        "gym:MoodyTest-v0", seed, {}, {"env_kwargs": {"mode": mode}, "max_turns": 3, **kw}
    )


def test_a_hanging_step_or_reset_ends_only_that_episode(renderer):
    eps = run_episodes(
        [
            job("hang_step", call_timeout_s=0.5),
            job("ok"),
            job("hang_reset", call_timeout_s=0.5),
        ],
        Say(renderer),
        renderer,
    )
    stuck, fine, stuck_reset = eps
    assert stuck.stop_reason == StopReason.ENV_ERROR
    assert "step did not return within call_timeout_s=0.5 s" in stuck.info["error"]
    assert stuck_reset.stop_reason == StopReason.ENV_ERROR
    assert "reset did not return within call_timeout_s=0.5 s" in stuck_reset.info["error"]
    assert fine.stop_reason == StopReason.MAX_TURNS and fine.num_turns == 3


def test_the_default_deadline_is_one_a_user_would_expect():
    from agentopd import registry

    env = registry.make("gym:MoodyTest-v0")
    assert env.call_timeout_s == 120.0 and env.max_observation_chars == 16_000
    env.close()


def test_check_env_reports_a_hanging_env_as_failed():
    report = check_env_conformance(
        "gym:MoodyTest-v0", n_episodes=1, env_kwargs={"mode": "hang_reset"}, call_timeout_s=0.3
    )
    assert not report.ok
    failed = [r for r in report.rows if not r.ok]
    assert failed and any("did not return within" in r.detail for r in failed), report.rows


@pytest.mark.parametrize("mode", ["nan", "inf", "-inf"])
def test_a_non_finite_reward_is_an_env_error(renderer, mode):
    bad, fine = run_episodes([job(mode), job("ok")], Say(renderer), renderer)
    assert bad.stop_reason == StopReason.ENV_ERROR
    assert f"returned reward {float(mode)!r} on turn 1" in bad.info["error"]
    assert math.isfinite(bad.reward) and bad.reward == 0.0
    summary = episode_summary([bad, fine])
    assert all(math.isfinite(v) for v in summary.values())


@pytest.mark.parametrize("mode", ["huge_step", "huge_reset"])
def test_a_huge_observation_is_cut_and_the_budget_holds(renderer, mode):
    cfg = RolloutConfig(max_new_tokens=16, max_episode_tokens=1536)
    (ep,) = run_episodes([job(mode)], Say(renderer), renderer, cfg)
    shown = [m.content for m in ep.messages if m.role == "user" and len(m.content) > 10_000]
    assert shown, "the observation reached the student"
    for c in shown:  # the reset's prompt wraps the observation in the adapter's instructions
        assert len(c) < 16_000 + 100 and " more characters not shown" in c[16_000:]
    if mode == "huge_step":
        # the step's observation is exactly HUGE characters: the note counts what was cut
        assert shown[0].endswith(TRUNCATION_MARKER.format(dropped=HUGE - 16_000))
        assert ep.stop_reason == StopReason.TOKEN_BUDGET
        assert all(len(s.tokens) <= cfg.max_episode_tokens for s in ep.segments)
        assert ep.num_turns == 1


def test_a_small_cap_is_honoured(renderer):
    (ep,) = run_episodes(
        [job("huge_step", max_observation_chars=500)],
        Say(renderer),
        renderer,
        RolloutConfig(max_new_tokens=16, max_episode_tokens=100_000),
    )
    cut = [m.content for m in ep.messages if m.role == "user" and m.content.startswith("yyy")]
    assert cut and all(c == "y" * 500 + TRUNCATION_MARKER.format(dropped=HUGE - 500) for c in cut)
    assert ep.stop_reason == StopReason.MAX_TURNS


def test_check_env_finishes_on_a_50_mb_observation(monkeypatch):
    monkeypatch.setattr(f"{__name__}.HUGE", 50_000_000)
    report = check_env_conformance(
        "gym:MoodyTest-v0", n_episodes=1, env_kwargs={"mode": "huge_step"}
    )
    assert report.ok, [r for r in report.rows if not r.ok]
    assert any(r.name == "rollout path" and r.ok for r in report.rows)
