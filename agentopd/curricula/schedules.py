"""Temporal curricula (TCOD) and plain baselines: which tasks, and how many turns, at each step.

A curriculum turns a training step into episode jobs (seed + reset options); the contract is
:class:`agentopd.curriculum.Curriculum`. Its state is a small dict saved in every checkpoint, so
a resumed run continues the same schedule.

* ``uniform``: full horizon, fresh seeded tasks every step.
* ``horizon-sorted``: a fixed pool of tasks, ordered short to long, walked through in order.
* ``tcod-f2b``: at step n the student plays only the first k = min(k_start + ⌊n/η⌋, max_turns)
  turns of each episode (``options["max_turns"] = k``); only those turns are distilled.
* ``tcod-b2f``: from a successful expert episode of length L, replay its first L − k actions
  (they enter the prompt with mask 0) and let the student play from turn L − k to the end.

Evaluation never goes through a curriculum: it always uses the full horizon.
"""

from __future__ import annotations

import functools
from typing import Any

from agentopd import seeds
from agentopd.curriculum import Curriculum
from agentopd.registry import make
from agentopd.rollout import EpisodeJob, GuideSpec


class SeededCurriculum(Curriculum):
    """Base class of the built-in curricula (a :class:`~agentopd.curriculum.Curriculum`): step
    ``n``'s tasks are fresh seeds of the run's ``curriculum`` stream. Subclasses override
    :meth:`options_for` (and :meth:`guide_for`).

    Args:
        env: Registry name of the environment.
        env_kwargs: Its constructor kwargs.
        seed: Base seed; step ``n``'s tasks use seeds derived from it.
    """

    def __init__(self, env: str, env_kwargs: dict[str, Any] | None = None, seed: int = 0):
        self.env = env
        self.env_kwargs = dict(env_kwargs or {})
        self.seed = seed
        self.first_task = seeds.task_base(seed, "curriculum")
        """The first training task seed (the run seed's ``curriculum`` stream)."""
        self.step = 0

    def jobs(self, step: int, n: int) -> list[EpisodeJob]:
        """The rollout's jobs for training step ``step`` (deterministic in ``step``)."""
        self.step = step
        out = []
        for i in range(n):
            seed = self.first_task + step * n + i
            job = self.job(seed, self.options_for(step, seed))
            job.guide = self.guide_for(step, seed)
            out.append(job)
        return out

    def job(self, seed: int, options: dict[str, Any]) -> EpisodeJob:
        """One rollout job on this curriculum's env."""
        return EpisodeJob(self.env, seed, options, dict(self.env_kwargs))

    def options_for(self, step: int, seed: int) -> dict[str, Any]:
        """The env's reset options for task ``seed`` at ``step``."""
        return {"split": "train"}

    def guide_for(self, step: int, seed: int) -> GuideSpec | None:
        """Who else plays task ``seed``'s turns at ``step`` (``guided-opd``); None: nobody."""
        return None

    def describe(self, step: int) -> dict[str, Any]:
        """Scalar knobs at ``step`` for the metrics log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))


class Uniform(SeededCurriculum):
    """Full horizon on fresh tasks every step."""


class HorizonSorted(SeededCurriculum):
    """A pool of tasks ordered by difficulty (short to long), visited in order.

    Args:
        pool_size: Number of tasks in the pool (cycled when exhausted).
    """

    def __init__(
        self,
        env: str,
        env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        pool_size: int = 512,
    ):
        super().__init__(env, env_kwargs, seed)
        probe = make(env, **self.env_kwargs)
        try:
            scored = []
            for i in range(pool_size):
                s = self.first_task + i
                _, info = probe.reset(seed=s, options={"split": "train"})
                scored.append((int(info.get("difficulty", 1)), s))
        finally:
            probe.close()
        self.pool = [s for _, s in sorted(scored)]

    def jobs(self, step: int, n: int) -> list[EpisodeJob]:
        self.step = step
        return [
            self.job(self.pool[(step * n + i) % len(self.pool)], {"split": "train"})
            for i in range(n)
        ]


class _Temporal(SeededCurriculum):
    """Shared schedule of the TCOD curricula: k = k_start + floor(step / eta)."""

    name = "tcod"

    def __init__(
        self,
        env: str,
        env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        k_start: int = 1,
        eta: int = 5,
    ):
        super().__init__(env, env_kwargs, seed)
        if k_start < 1 or eta < 1:
            raise ValueError(
                f"{self.name} needs k_start >= 1 and eta >= 1, got k_start={k_start}, eta={eta}"
            )
        self.k_start, self.eta = k_start, eta

    def k(self, step: int) -> int:
        return self.k_start + step // self.eta


class TcodF2B(_Temporal):
    """Front-to-back: the horizon grows from ``k_start`` by one turn every ``eta`` steps."""

    name = "tcod-f2b"

    @functools.cached_property
    def max_turns(self) -> int:
        """The env's own turn limit, which caps the horizon."""
        probe = make(self.env, **self.env_kwargs)
        try:
            return int(probe.max_turns)
        finally:
            probe.close()

    def horizon(self, step: int) -> int:
        return min(self.k(step), self.max_turns)

    def options_for(self, step: int, seed: int) -> dict[str, Any]:
        return {"split": "train", "max_turns": self.horizon(step)}

    def describe(self, step: int) -> dict[str, Any]:
        return {"curriculum/horizon": self.horizon(step)}


class TcodB2F(_Temporal):
    """Back-to-front: replay all but the last k expert actions; k grows like ``tcod-f2b``."""

    name = "tcod-b2f"

    @functools.cached_property
    def _expert_cache(self) -> dict[int, list[str]]:
        """The expert's actions per task seed (filled by :meth:`expert_actions`)."""
        return {}

    def expert_actions(self, seed: int) -> list[str]:
        """The expert's actions on task ``seed``, from one successful episode cached per seed.

        Raises:
            RuntimeError: The expert did not solve the task, so there is no teacher episode to
                replay from.
        """
        if seed in self._expert_cache:
            return self._expert_cache[seed]
        env = make(self.env, **self.env_kwargs)
        try:
            env.reset(seed=seed, options={"split": "train"})
            actions, solved = [], False
            for _ in range(env.max_turns):
                action = env.expert_action(list(env.messages))
                actions.append(action)
                _, reward, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    solved = bool(info.get("success", reward > 0)) and terminated
                    break
        finally:
            env.close()
        if not solved:
            raise RuntimeError(
                f"tcod-b2f: the expert of {self.env} did not solve task seed {seed}; "
                "b2f needs a successful teacher episode to replay"
            )
        self._expert_cache[seed] = actions
        return actions

    def options_for(self, step: int, seed: int) -> dict[str, Any]:
        actions = self.expert_actions(seed)
        keep = max(0, len(actions) - self.k(step))
        return {"split": "train", "replay": actions[:keep]}

    def describe(self, step: int) -> dict[str, Any]:
        return {"curriculum/k": self.k(step)}
