"""Temporal curricula (TCOD) and plain baselines: which tasks, and how many turns, at each step.

A curriculum turns a training step into episode jobs (seed + reset options); the contract is
:class:`agentopd.curriculum.Curriculum`. Its state is a small dict saved in every checkpoint, so
a resumed run continues the same schedule.

* ``uniform``: full horizon, fresh seeded tasks every step.
* ``horizon-sorted``: a fixed pool of tasks, ordered short to long, walked through in order.
* ``tcod-f2b``: at step n the student plays only the first k = min(k_start + ⌊n/η⌋, max_turns)
  turns of each episode (``options["max_turns"] = k``); only those turns are distilled.
* ``tcod-b2f``: from a successful episode of length L, replay its first L − k actions (they
  enter the prompt with mask 0) and let the student play from turn L − k to the end. The
  episodes are the env's scripted expert's, or stored teacher or expert episodes
  (``episodes=<JSONL written by agentopd collect>``), which envs without a scripted expert need.

Evaluation never goes through a curriculum: it always uses the full horizon.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from agentopd import seeds
from agentopd.config import ConfigError
from agentopd.curriculum import Curriculum
from agentopd.env import missing_expert
from agentopd.registry import make
from agentopd.rollout import EpisodeJob, GuideSpec
from agentopd.types import Episode


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
            seed = self.task_seed(step * n + i)
            job = self.job(seed, self.options_for(step, seed))
            job.guide = self.guide_for(step, seed)
            out.append(job)
        return out

    def task_seed(self, index: int) -> int:
        """The seed of the ``index``-th training task handed out (step ``n``'s ``i``-th job of
        ``m`` per step is task ``n * m + i``)."""
        return self.first_task + index

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

    def task_seed(self, index: int) -> int:
        return self.pool[index % len(self.pool)]


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
    """Back-to-front: replay all but the last k actions of a successful episode of each task; k
    grows like ``tcod-f2b``.

    Without ``episodes`` the env's scripted expert plays each fresh training task once (cached).
    With ``episodes``, the successful episodes of that file (teacher or expert, as written by
    ``agentopd collect``) are replayed instead, and the training tasks are the tasks they solved
    (matched by seed, in an order drawn from the run's ``curriculum`` seed stream, cycled).

    Args:
        *args: ``env``, ``env_kwargs``, ``seed``, ``k_start``, ``eta`` as for ``tcod-f2b``.
        episodes: JSONL of episodes of this env written by ``agentopd collect``. Required when
            the env has no scripted expert.
        **kwargs: The same, by name.

    Raises:
        ConfigError: No ``episodes`` and the env has no scripted expert; or the file is missing,
            holds episodes of another env, or no whole successful episode.
    """

    name = "tcod-b2f"

    def __init__(self, *args: Any, episodes: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.episodes = episodes
        self.stored: dict[int, Episode] | None = None
        """The stored episode replayed on each task seed (None: the scripted expert plays)."""
        self._verified: set[int] = set()
        if episodes is None:
            self._require_expert()
            return
        self.stored = _stored_episodes(self.env, str(episodes))
        order = np.random.default_rng(seeds.seed_of(self.seed, "curriculum")).permutation(
            len(self.stored)
        )
        tasks = sorted(self.stored)
        self.pool = [tasks[i] for i in order]
        """The training tasks: the seeds of the stored episodes, in the order they are handed out."""

    def _require_expert(self) -> None:
        probe = make(self.env, **self.env_kwargs)
        try:
            reason = missing_expert(probe)
        finally:
            probe.close()
        if reason:
            raise ConfigError(
                f"tcod-b2f: env {self.env} has no scripted expert ({reason}), and no stored "
                "episodes were given; set curriculum_kwargs.episodes=<JSONL of successful "
                f"episodes of {self.env}>, made with `agentopd collect env={self.env} "
                "model=<teacher> output=episodes.jsonl` (same env_kwargs)"
            )

    def task_seed(self, index: int) -> int:
        if self.stored is None:
            return super().task_seed(index)
        return self.pool[index % len(self.pool)]

    def jobs(self, step: int, n: int) -> list[EpisodeJob]:
        out = super().jobs(step, n)
        if self.stored is not None:
            self._verify_tasks([j.seed for j in out])
        return out

    def _verify_tasks(self, task_seeds: list[int]) -> None:
        """Check once per task that the env's task on that seed is the stored episode's (they
        differ when the episodes were collected with other ``env_kwargs``).

        Raises:
            ConfigError: A task differs.
        """
        assert self.stored is not None
        todo = [s for s in dict.fromkeys(task_seeds) if s not in self._verified]
        if not todo:
            return
        env = make(self.env, **self.env_kwargs)
        try:
            for s in todo:
                _, info = env.reset(seed=s, options={"split": "train"})
                stored = self.stored[s].task_id
                if str(info.get("task_id", "")) != stored:
                    raise ConfigError(
                        f"tcod-b2f: curriculum_kwargs.episodes={self.episodes}: the episode of "
                        f"seed {s} is task {stored!r}, but {self.env} gives task "
                        f"{info.get('task_id')!r} on that seed; collect the episodes with the "
                        "same env_kwargs as training"
                    )
                self._verified.add(s)
        finally:
            env.close()

    @functools.cached_property
    def _expert_cache(self) -> dict[int, list[str]]:
        """The expert's actions per task seed (filled by :meth:`expert_actions`)."""
        return {}

    def expert_actions(self, seed: int) -> list[str]:
        """The replayed actions of task ``seed``: the stored episode's assistant turns, or the
        scripted expert's actions from one successful episode cached per seed.

        Raises:
            KeyError: Stored episodes are replayed and none is of task ``seed``.
            RuntimeError: The expert did not solve the task, so there is no teacher episode to
                replay from.
        """
        if self.stored is not None:
            if seed not in self.stored:
                raise KeyError(
                    f"tcod-b2f: curriculum_kwargs.episodes={self.episodes} holds no successful "
                    f"episode of task seed {seed}"
                )
            return [t.text for t in self.stored[seed].turns]
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


def _stored_episodes(env: str, path: str) -> dict[int, Episode]:
    """The first whole successful episode of each task seed in ``path`` (``tcod-b2f``'s
    ``episodes``).

    Raises:
        ConfigError: The file is missing or unreadable, holds episodes of another env, or no
            successful episode that starts at turn 0 and records its seed.
    """
    from agentopd.build import load_demos

    key = "curriculum_kwargs.episodes"
    how = f"`agentopd collect env={env} model=<teacher or expert> output={path}`"
    episodes = load_demos(path, key)
    others = sorted({e.env for e in episodes} - {env})
    if others:
        raise ConfigError(
            f"tcod-b2f: {key}={path} holds episodes of {', '.join(others)}, but training is on "
            f"env={env}; expected episodes of {env}, made with {how}"
        )
    by_seed: dict[int, Episode] = {}
    for ep in episodes:
        if ep.seed is not None and ep.turns and ep.replayed_turns == 0:
            by_seed.setdefault(int(ep.seed), ep)
    if not by_seed:
        raise ConfigError(
            f"tcod-b2f: {key}={path} holds no whole successful episode with a task seed (every "
            f"one replays a prefix or lacks its seed); expected episodes made with {how}"
        )
    return by_seed
