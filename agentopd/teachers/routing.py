"""Teacher routing: a teacher per env, with a default (``teachers.<env>=NAME``).

A run on a mixture of envs (:mod:`agentopd.mixture`) distils every episode from the teacher of
its env. The routing table comes from two keys:

- ``teachers``: env -> teacher model, with the key ``default`` for every env not named;
- ``teacher``: the default when ``teachers.default`` is not given; ``auto`` (without any
  ``teachers``) means each env's own ``tiny-teacher-<env>``.

Every env of the run must end up with a teacher and every teacher must share the student's
tokenizer; the builder checks both before any model loads (:func:`routes` at compose time,
tokenizers in :func:`agentopd.build.check_teachers`).

:class:`RoutingTeacher` is itself a :class:`~agentopd.teachers.Teacher`: it partitions the
episodes by their env's teacher, lets each teacher score its share in one call, and hands the
scores back in episode order. Teachers that are LoRA experts over one base model share that
base in memory (:mod:`agentopd.teachers.adapters`).

Example::

    table = routes(["lookup-chain", "sql"], {"sql": "my-sql-teacher", "default": "tiny-teacher"})
    # {"lookup-chain": "tiny-teacher", "sql": "my-sql-teacher"}
    teacher = RoutingTeacher({"lookup-chain": t1, "sql": t2}, TeacherConfig())
    scores = teacher.score(episodes)          # scores[i] belongs to episodes[i]
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from agentopd.schema import ConfigError
from agentopd.teachers import Teacher, TeacherConfig
from agentopd.types import Episode, TeacherScores

DEFAULT = "default"
"""The key of ``teachers`` that names the teacher of every env not named."""
AUTO = "auto"


def auto_teacher(env: str) -> str:
    """The teacher ``teacher=auto`` means for ``env``: its tiny zoo teacher."""
    return f"tiny-teacher-{env}"


def routes(envs: list[str], teachers: Mapping[str, str], teacher: str = AUTO) -> dict[str, str]:
    """The teacher of every env in ``envs`` (see the module docstring).

    Args:
        envs: The run's envs.
        teachers: The ``teachers`` key: env -> teacher, ``default`` -> the rest's.
        teacher: The ``teacher`` key (the default when ``teachers`` has no ``default``).

    Raises:
        ConfigError: A key of ``teachers`` that is not an env of the run (with the nearest), or
            an env left without a teacher (with what to add).
    """
    for key in teachers:
        if key != DEFAULT and key not in envs:
            valid = [*envs, DEFAULT]
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"unknown key 'teachers.{key}': {key!r} is not an env of this run.{hint} "
                f"Valid keys: {', '.join(valid)}"
            )
    default = teachers.get(DEFAULT) or (teacher if teacher != AUTO else None)
    out = {}
    for env in envs:
        name = teachers.get(env) or default
        if name is None and teachers:
            named = ", ".join(f"{k}={v}" for k, v in teachers.items())
            raise ConfigError(
                f"env {env!r} has no teacher: teachers names {named} and there is no default. "
                f"Add teachers.{env}=<model> or teachers.default=<model> (or teacher=<model>)"
            )
        name = name or AUTO
        out[env] = auto_teacher(env) if name == AUTO else name
    return out


class RoutingTeacher:
    """Scores each episode with the teacher of its env (``episode.env``).

    Args:
        teachers: Env -> its teacher; envs may share a teacher object (scored together).
        config: The scoring options (``teacher_cfg``), shared by every teacher.
    """

    def __init__(self, teachers: Mapping[str, Teacher], config: TeacherConfig):
        self.teachers = dict(teachers)
        self.config = config

    def teacher_for(self, env: str) -> Teacher:
        """The teacher of ``env``.

        Raises:
            KeyError: ``env`` is not routed (an episode of an env outside the run).
        """
        try:
            return self.teachers[env]
        except KeyError:
            raise KeyError(
                f"no teacher routed for env {env!r}; routed envs: {', '.join(self.teachers)}"
            ) from None

    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        """Score every episode with its env's teacher; sets ``episode.teacher`` and returns
        the scores in episode order."""
        groups: dict[int, tuple[Teacher, list[int]]] = {}
        for i, ep in enumerate(episodes):
            t = self.teacher_for(ep.env)
            groups.setdefault(id(t), (t, []))[1].append(i)
        out: list[list[TeacherScores]] = [[] for _ in episodes]
        for t, idx in groups.values():
            for i, scores in zip(idx, t.score([episodes[i] for i in idx]), strict=True):
                out[i] = scores
        return out
