"""``env=gym:<id>``: a Gymnasium env with text (or small discrete) actions as an ``agentopd.Env``.

Observations: a ``Text`` observation is shown as it is; any other observation is shown through
the env's ``ansi`` rendering when it has one (FrozenLake, Taxi, CliffWalking), else as
``str(observation)``. Actions: with a ``Text`` action space the student's turn is the action; with
``Discrete(n)`` the last integer in the turn (or one of ``action_names``) is the action. A turn that
names no valid action gets a message saying what is expected and the episode goes on; the
foreign env is not stepped. Other action spaces are refused when the env is built.

``gym:<module>:<id>`` imports ``module`` first (Gymnasium's own syntax for plugin envs).

Example::

    env = agentopd.make("gym:FrozenLake-v1", max_turns=6, env_kwargs={"is_slippery": False})
"""

from __future__ import annotations

import re
from typing import Any

from agentopd.envs.adapters.base import ForeignEnv, ForeignStart, ForeignStep, unknown_id
from agentopd.types import Message

SYNTAX = "gym:<id> or gym:<module>:<id>"
_INT = re.compile(r"-?\d+")
_HIGHLIGHT = re.compile(r"\x1b\[[0-9;]*m(.+?)\x1b\[0m")
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class GymTextEnv(ForeignEnv):
    """A Gymnasium env behind the agentopd contract (see the module docstring).

    Args:
        env_id: Gymnasium id (``FrozenLake-v1``, ``my_pkg.envs:Guess-v0``).
        env_kwargs: Keyword arguments for ``gymnasium.make``.
        action_names: Names of the ``Discrete`` actions, in order; the student may write a name
            or its index.
        instructions: Text put before the first observation (default: the env id and what an
            action looks like).
        **kwargs: :class:`~agentopd.envs.adapters.base.ForeignEnv` arguments (``max_turns``, ...).
    """

    framework = "Gymnasium"
    prefix = "gym"
    description = "A Gymnasium env with Text or Discrete actions (gym:<id>)."

    def __init__(
        self,
        env_id: str,
        *,
        env_kwargs: dict[str, Any] | None = None,
        action_names: list[str] | None = None,
        instructions: str | None = None,
        **kwargs: Any,
    ):
        import gymnasium
        from gymnasium import spaces

        kwargs_for_make = dict(env_kwargs or {})
        module, _, bare = env_id.rpartition(":")
        if module:
            __import__(module)
        if bare not in gymnasium.registry:
            raise unknown_id("Gymnasium", env_id, sorted(gymnasium.registry), SYNTAX)
        spec = gymnasium.spec(bare)
        try:
            probe = gymnasium.make(bare, **kwargs_for_make)
        except TypeError as e:
            raise TypeError(f"gymnasium.make({bare!r}) rejected env_kwargs: {e}") from None
        if (
            "ansi" in probe.metadata.get("render_modes", [])
            and "render_mode" not in kwargs_for_make
        ):
            probe.close()
            kwargs_for_make["render_mode"] = "ansi"
            probe = gymnasium.make(bare, **kwargs_for_make)
        self._gym = probe
        self._ansi = kwargs_for_make.get("render_mode") == "ansi"
        space = self._gym.action_space
        if isinstance(space, spaces.Text):
            self._kind = "text"
        elif isinstance(space, spaces.Discrete):
            self._kind = "discrete"
            self._start, self._n = int(space.start), int(space.n)
        else:
            raise ValueError(
                f"gym:{env_id}: action space {space} is not supported; the gym adapter maps "
                "Text and Discrete action spaces"
            )
        self._text_obs = isinstance(self._gym.observation_space, spaces.Text)
        self.action_names = [str(a) for a in action_names] if action_names else None
        if self.action_names and (self._kind != "discrete" or len(self.action_names) != self._n):
            raise ValueError(
                f"action_names needs one name per Discrete action ({getattr(self, '_n', 0)}), "
                f"got {len(self.action_names)}"
            )
        self.instructions = instructions
        self._limit = spec.max_episode_steps
        super().__init__(env_id, **kwargs)

    # ---------------------------------------------------------------- hooks
    def foreign_max_turns(self) -> int | None:
        return self._limit

    def foreign_reset(
        self, seed: int, index: int | None, split: str, max_turns: int
    ) -> ForeignStart:
        obs, info = self._gym.reset(seed=seed)
        text = self._observation_text(obs)
        intro = self.instructions or f"You are acting in the Gymnasium environment {self.env_id}."
        prompt = f"{intro}\n\n{text}\n\n{self._action_help()}"
        return ForeignStart([Message(role="user", content=prompt)], info=dict(info))

    def foreign_step(self, action: str) -> ForeignStep:
        value, problem = self._parse_action(action)
        if problem is not None:
            return ForeignStep([Message(role="user", content=problem)], 0.0, False)
        obs, reward, terminated, truncated, info = self._gym.step(value)
        messages = [] if terminated else [Message(role="user", content=self._observation_text(obs))]
        return ForeignStep(messages, float(reward), bool(terminated), bool(truncated), dict(info))

    def foreign_close(self) -> None:
        self._gym.close()

    # ---------------------------------------------------------------- mapping
    def _observation_text(self, obs: Any) -> str:
        if self._text_obs:
            return str(obs)
        if self._ansi:
            frame = self._gym.render()
            if isinstance(frame, str) and frame.strip():
                # ANSI colour marks the agent's cell (FrozenLake, Taxi): keep it as [x], drop the rest.
                return _ESCAPE.sub("", _HIGHLIGHT.sub(r"[\1]", frame)).strip("\n")
        return f"Observation: {obs}"

    def _action_help(self) -> str:
        if self._kind == "text":
            return "Reply with your action as text."
        last = self._start + self._n - 1
        names = (
            " ("
            + ", ".join(f"{self._start + i} = {n}" for i, n in enumerate(self.action_names))
            + ")"
            if self.action_names
            else ""
        )
        return f"Reply with one action: an integer from {self._start} to {last}{names}."

    def _parse_action(self, text: str) -> tuple[Any, str | None]:
        if self._kind == "text":
            if self._gym.action_space.contains(text):
                return text, None
            return None, (
                f"Invalid action: it is not in the action space {self._gym.action_space} "
                "(too long or a character outside its charset). The env was not stepped."
            )
        if self.action_names:
            lowered = text.strip().lower()
            for i, name in enumerate(self.action_names):
                if lowered == name.lower():
                    return self._start + i, None
        found = _INT.findall(text)
        if found:
            value = int(found[-1])
            if self._start <= value < self._start + self._n:
                return value, None
        return None, f"Invalid action {text[:80]!r}. {self._action_help()} The env was not stepped."


def make(env_id: str, **kwargs: Any) -> GymTextEnv:
    """Factory behind the ``gym:`` prefix."""
    if not env_id:
        raise unknown_id("Gymnasium", env_id, [], SYNTAX)
    return GymTextEnv(env_id, **kwargs)
