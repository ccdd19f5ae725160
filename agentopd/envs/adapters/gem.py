"""``env=gem:<env_id>``: a GEM (``gem-llm``) env as an ``agentopd.Env``.

GEM envs are text in, text out: ``reset(seed) -> (observation, info)`` and
``step(text) -> (observation, reward, terminated, truncated, info)``. The opening observation is
the first user message, each later observation (with GEM's ``info["suffix"]``, "Enter your next
guess.", when there is one) the next; the student's turn is the action as it is.

GEM seeds Python's and NumPy's *global* generators on every reset and draws from them in step.
The adapter keeps that from leaking into the trainer: the global generator states are swapped in
and out around every GEM call, under one lock (GEM calls are serialised across threads).

Knobs: ``max_turns`` is set on the GEM env before its reset when the env has such an attribute
(the games do, and their instructions then state the new limit); ``split="eval"`` and
``task_index`` choose the seed. Envs whose data sets must be downloaded (``math:*``, ``qa:*``,
``code:*``) fail at build time here, as there is no network.

Example::

    env = agentopd.make("gem:game:GuessTheNumber-v0-easy")
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from agentopd.envs.adapters.base import ForeignEnv, ForeignStart, ForeignStep, require, unknown_id
from agentopd.types import Message

SYNTAX = "gem:<env_id> (e.g. gem:game:GuessTheNumber-v0-easy)"
_LOCK = threading.RLock()
T = TypeVar("T")


def _import_gem() -> Any:
    # `import gem` calls logging.basicConfig(level=INFO) when the root logger has no handler; a
    # placeholder handler keeps it from reconfiguring the trainer's logging.
    root = logging.getLogger()
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)
    try:
        return require("gem", package="gem-llm", extra="gem")
    finally:
        root.removeHandler(placeholder)


class GemEnv(ForeignEnv):
    """A GEM env behind the agentopd contract (see the module docstring).

    Args:
        env_id: GEM registry id (``game:GuessTheNumber-v0-easy``).
        env_kwargs: Keyword arguments for ``gem.make`` (override the registered ones).
        **kwargs: :class:`~agentopd.envs.adapters.base.ForeignEnv` arguments (``max_turns``, ...).
    """

    framework = "GEM"
    prefix = "gem"
    description = "A GEM (gem-llm) env: text observations, the turn is the action."

    def __init__(self, env_id: str, *, env_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        gem = _import_gem()
        from gem.envs.registration import ENV_REGISTRY

        if env_id not in ENV_REGISTRY:
            raise unknown_id("GEM", env_id, sorted(ENV_REGISTRY), SYNTAX)
        self._rng_state = (random.getstate(), np.random.get_state())
        self._gem = self._isolated(lambda: gem.make(env_id, **dict(env_kwargs or {})))
        limit = getattr(self._gem.unwrapped, "max_turns", None)
        self._own_limit = int(limit) if isinstance(limit, int) and limit > 0 else None
        super().__init__(env_id, **kwargs)

    def foreign_max_turns(self) -> int | None:
        return self._own_limit

    def foreign_reset(
        self, seed: int, index: int | None, split: str, max_turns: int
    ) -> ForeignStart:
        inner = self._gem.unwrapped
        if self._own_limit is not None:
            inner.max_turns = int(max_turns)
        obs, info = self._isolated(lambda: self._gem.reset(seed=seed))
        return ForeignStart([Message(role="user", content=str(obs))], info=dict(info or {}))

    def foreign_step(self, action: str) -> ForeignStep:
        obs, reward, terminated, truncated, info = self._isolated(lambda: self._gem.step(action))
        info = dict(info or {})
        text = str(obs)
        suffix = info.get("suffix")
        if suffix and not (terminated or truncated):
            text = f"{text}\n{suffix}"
        return ForeignStep(
            [Message(role="user", content=text)],
            float(reward),
            bool(terminated),
            bool(truncated),
            info,
        )

    def _isolated(self, fn: Callable[[], T]) -> T:
        with _LOCK, _swapped_global_rng(self):
            return fn()


@contextmanager
def _swapped_global_rng(env: Any) -> Iterator[None]:
    """Run with ``env``'s own global-RNG states; the caller's states are restored afterwards."""
    outer = (random.getstate(), np.random.get_state())
    random.setstate(env._rng_state[0])
    np.random.set_state(env._rng_state[1])
    try:
        yield
    finally:
        env._rng_state = (random.getstate(), np.random.get_state())
        random.setstate(outer[0])
        np.random.set_state(outer[1])


def make(env_id: str, **kwargs: Any) -> GemEnv:
    """Factory behind the ``gem:`` prefix."""
    return GemEnv(env_id, **kwargs)
