"""The curriculum contract: what the trainer asks of a curriculum at every step.

A curriculum turns a training step into rollout jobs (which tasks, which reset options such as
``max_turns`` or a replayed prefix, who else plays some turns) and says which knobs it set for
the metrics log. Its state is a small JSON-able dict saved in every checkpoint, so a resumed run
continues the same schedule. Evaluation never goes through a curriculum.

The built-in curricula (``agentopd.curricula``) derive from
:class:`agentopd.curricula.schedules.SeededCurriculum`; a plugin may implement this protocol
from scratch and register under the ``curricula`` kind (a class taking ``env``, ``env_kwargs``,
``seed`` and its own keyword arguments).

Example::

    class EveryTaskTwice:
        def __init__(self, env, env_kwargs=None, seed=0):
            self.env, self.env_kwargs, self.seed, self.step = env, dict(env_kwargs or {}), seed, 0

        def jobs(self, step, n):
            self.step = step
            first = self.seed + step * (n // 2)
            return [EpisodeJob(self.env, first + i // 2, {"split": "train"}, self.env_kwargs)
                    for i in range(n)]

        def describe(self, step):
            return {}

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, state):
            self.step = int(state.get("step", 0))
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from agentopd.rollout import EpisodeJob

METHODS = ("jobs", "describe", "state_dict", "load_state_dict")
"""The methods of :class:`Curriculum` (named in the builder's error for an object lacking one)."""


@runtime_checkable
class Curriculum(Protocol):
    """Which episodes a training step plays (see the module docstring)."""

    def jobs(self, step: int, n: int) -> list[EpisodeJob]:
        """The ``n`` rollout jobs of training step ``step``, deterministic in ``step`` and the
        curriculum's state (a resumed run gets the jobs the uninterrupted one got)."""
        ...

    def describe(self, step: int) -> dict[str, Any]:
        """Scalar knobs at ``step`` for the metrics log (``{"curriculum/horizon": 3}``)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The state a checkpoint stores (JSON-able)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the state :meth:`state_dict` returned."""
        ...
