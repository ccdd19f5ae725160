"""Environment mixtures: one run trains on several envs (``env=mix``).

A mixture is named by the reserved env name :data:`MIX` with its members under
``env_kwargs.envs``, each an env registry name with a weight, or with a weight and its own
constructor kwargs::

    agentopd train env=mix env_kwargs.envs='{lookup-chain: 1, sql: 1, code-sandbox: 1}'
    agentopd train env=mix \\
        env_kwargs.envs='{lookup-chain: {weight: 2, env_kwargs: {max_hops: 2}}, sql: 1}'

Every member's kwargs start from its group file's ``env_kwargs`` (``configs/env/<name>.yaml``),
as ``env=<name>`` alone would; ``env_kwargs.envs.<name>.env_kwargs`` overrides them.

What a mixture changes, and where:

- training tasks: :class:`MixtureCurriculum` keeps one curriculum per member (the run's
  ``curriculum`` with its ``curriculum_kwargs``, so ``tcod-f2b`` grows each env's horizon
  against that env's own turn limit) and splits every step's ``episodes_per_step`` between them
  by weight (:func:`apportion`); each job, and so each episode, names its member env;
- teachers: one per member (``teachers.<env>``, a default; :mod:`agentopd.teachers.routing`);
- held-out evaluation: each member on its own held-out tasks (``eval/<env>/success``), plus
  the weighted mean as ``eval/success``; the training rows split the same way
  (``rollout/<env>/success``);
- the replay list: episodes carry their member's name (``agentopd replay RUN --list --filter env=sql``).

A plain ``env=<name>`` is the one-member case: :func:`members` gives one :class:`Member`, so
callers loop over members without asking which kind of run they are in.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from agentopd.curriculum import Curriculum
from agentopd.rollout import EpisodeJob
from agentopd.schema import ConfigError

MIX = "mix"
"""The reserved ``env`` value of a mixture (never a registered env)."""
MEMBER_KEYS = ("weight", "env_kwargs")
"""The keys a member may give as a mapping (``{weight: 2, env_kwargs: {...}}``)."""


@dataclass(frozen=True)
class Member:
    """One env of a run (a mixture's member, or the run's only env)."""

    env: str
    """Registry name of the environment."""
    weight: float = 1.0
    """Share of the training episodes, relative to the other members' weights."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Its constructor kwargs."""


def is_mixture(env: str) -> bool:
    """Whether ``env`` names a mixture (``env=mix``)."""
    return env == MIX


def members(env: str, env_kwargs: dict[str, Any] | Any) -> list[Member]:
    """The envs of a run: a mixture's members in the order given, else ``env`` alone.

    Raises:
        ConfigError: A malformed mixture: no ``env_kwargs.envs``, another key beside it, an
            unknown env name (with the nearest valid one), a member that is itself a mixture,
            a weight that is not a positive number, or a member mapping with unknown keys.
    """
    kwargs = _plain(env_kwargs)
    if not is_mixture(env):
        return [Member(env, 1.0, dict(kwargs))]
    from agentopd import registry

    example = "env_kwargs.envs='{lookup-chain: 1, sql: 1}'"
    extra = sorted(k for k in kwargs if k != "envs")
    if extra:
        raise ConfigError(
            f"env=mix takes only env_kwargs.envs, got env_kwargs.{extra[0]}; give each env's "
            f"kwargs as env_kwargs.envs.<env>.env_kwargs (e.g. {example})"
        )
    spec = kwargs.get("envs")
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(
            f"env=mix needs its envs and weights: expected a mapping env -> weight in "
            f"env_kwargs.envs, got {spec!r}. Example: {example}"
        )
    out = []
    for name, value in spec.items():
        name = str(name)
        if name == MIX:
            raise ConfigError("env_kwargs.envs: a mixture cannot contain env=mix")
        try:
            registry.envs.spec(name)
        except KeyError as e:
            raise ConfigError(f"bad env name in env_kwargs.envs: {e}") from None
        weight, own = _member_value(name, value)
        out.append(Member(name, weight, {**group_env_kwargs(name), **own}))
    return out


def _member_value(name: str, value: Any) -> tuple[float, dict[str, Any]]:
    where = f"env_kwargs.envs.{name}"
    if isinstance(value, dict):
        unknown = [k for k in value if k not in MEMBER_KEYS]
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), MEMBER_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"unknown key {unknown[0]!r} in {where}.{hint} A member is a weight or a "
                f"mapping with {' and '.join(MEMBER_KEYS)}"
            )
        own = value.get("env_kwargs") or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{where}.env_kwargs must be a mapping, got {own!r}")
        weight = value.get("weight", 1.0)
    else:
        own, weight = {}, value
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise ConfigError(
            f"bad value {weight!r} for '{where}' weight: expected a positive number (its share "
            "of the training episodes relative to the other envs'). Nearest valid value: 1"
        )
    return float(weight), dict(own)


def group_env_kwargs(env: str) -> dict[str, Any]:
    """The ``env_kwargs`` of ``configs/env/<env>.yaml`` (empty when there is no such file)."""
    from omegaconf import DictConfig, OmegaConf

    from agentopd.config import configs_dir

    path = configs_dir() / "env" / f"{env}.yaml"
    if not path.is_file():
        return {}
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig) or "env_kwargs" not in node:
        return {}
    return dict(_plain(node.env_kwargs))


def _plain(kwargs: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(kwargs, DictConfig):
        out = OmegaConf.to_container(kwargs, resolve=True)
        assert isinstance(out, dict)
        return {str(k): v for k, v in out.items()}
    return dict(kwargs or {})


def apportion(n: int, weights: list[float], step: int = 0) -> list[int]:
    """Split ``n`` episodes between members by weight (largest remainder). Members whose
    remainders tie take turns from step to step, so over steps every member gets its share even
    when ``n`` is smaller than the number of members.

    Example::

        apportion(16, [1, 1, 1], step=0) == [6, 5, 5]
        apportion(16, [1, 1, 1], step=1) == [5, 6, 5]
    """
    total = sum(weights)
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    k = len(weights)
    # Larger remainder first; equal remainders rotate with the step.
    order = sorted(range(k), key=lambda i: (-round(quotas[i] - counts[i], 9), (i - step) % k))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureCurriculum:
    """A :class:`~agentopd.curriculum.Curriculum` over a mixture: one curriculum per member,
    every step's episodes split by weight (:func:`apportion`).

    Each member's curriculum is asked for its largest share, ``ceil(n * weight / total)``,
    every step and the first ``count`` of its jobs are played, so its task seeds never repeat
    from one step to the next whatever the split. Its knobs are logged per env
    (``curriculum/<env>/horizon``) and its state is saved per env in checkpoints.

    Args:
        parts: Member -> that member's curriculum, in the mixture's order.
    """

    def __init__(self, parts: list[tuple[Member, Curriculum]]):
        self.parts = parts

    def counts(self, step: int, n: int) -> list[int]:
        """How many of step ``step``'s ``n`` episodes each member plays."""
        return apportion(n, [m.weight for m, _ in self.parts], step)

    def jobs(self, step: int, n: int) -> list[EpisodeJob]:
        total = sum(m.weight for m, _ in self.parts)
        out: list[EpisodeJob] = []
        for (member, curriculum), count in zip(self.parts, self.counts(step, n), strict=True):
            most = math.ceil(n * member.weight / total)
            out.extend(curriculum.jobs(step, most)[:count])
        return out

    def describe(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for member, curriculum in self.parts:
            for key, value in curriculum.describe(step).items():
                head, _, tail = key.partition("/")
                out[f"{head}/{member.env}/{tail}" if tail else f"{key}/{member.env}"] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {m.env: c.state_dict() for m, c in self.parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for member, curriculum in self.parts:
            curriculum.load_state_dict(state.get(member.env, {}))
