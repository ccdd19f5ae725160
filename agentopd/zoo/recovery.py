"""Recovery demonstrations: expert episodes with injected, student-like errors.

A teacher trained only on clean expert trajectories has never seen a state that follows a
mistake, yet those are the states a cold-started student visits. This module makes episodes in
which, at some turns, a *mutated* expert action is played instead of the expert's (a malformed
call, a miscopied argument, a wrong tool name); the environment answers it as it would answer
the student; then the expert continues from there and recovers (the built-in experts read the
tool results, so they redo the step the error spoiled). The injected turns get mask 0 and the
expert's turns mask 1, so SFT on these episodes trains on the recovery and never on the error.

Episodes are played through :func:`agentopd.rollout.scripted_episode` (the product's rollout
loop, token-exact); a first pass on a separate env instance decides the turn texts. The zoo's
``recovery`` teachers (``tiny-teacher-<env>-recovery``, :mod:`agentopd.zoo.bootstrap`'s
``recovery_episodes`` recipe field) add such episodes to the clean expert data.

The same injection measures a model's **recovery rate** (:func:`recovery_jobs`,
:func:`recovery_rate`; ``agentopd diagnose`` reports it for the teacher): the expert plays a
held-out task up to a chosen turn, that turn is replaced by an error, and the model under test
plays on from the env's answer to it; the rate is the fraction of such episodes it still solves.

Example::

    renderer = Renderer(zoo.load_tokenizer())
    episodes = recovery_episodes("lookup-chain", {"min_hops": 8, "max_hops": 16}, range(100),
                                 renderer, error_rate=0.2)
    learner.step_sft([e for e in episodes if e.success])

    jobs = recovery_jobs("lookup-chain", {}, range(32))
    rate = recovery_rate(run_episodes(jobs, teacher_engine, renderer, RolloutConfig(temperature=0)))
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agentopd.env import Env
from agentopd.parsing import CLOSE, OPEN
from agentopd.registry import make
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, scripted_episode
from agentopd.types import Episode

ERROR_KINDS = ("malformed", "wrong-value", "wrong-tool")
"""``malformed``: the call's JSON or closing tag is cut; ``wrong-value``: one character of a
string argument is changed (a miscopied key or query value; in ``code-sandbox`` a changed digit of
the cell, so the step prints a wrong intermediate result); ``wrong-tool``: the tool name is
misspelled."""


@dataclass
class Injected:
    """What :func:`plan_turns` decided for one episode."""

    turns: list[str]
    """Assistant texts in order."""
    injected: list[int]
    """Indices into ``turns`` of the injected errors."""
    kinds: list[str]
    """The kind of each injected error (same order as ``injected``)."""


def mutate(action: str, kind: str, rng: random.Random, answer_tool: str | None = "submit") -> str:
    """A student-like error made from the expert's ``action`` (raw text of one tool call).

    Raises:
        ValueError: ``kind`` is not one of :data:`ERROR_KINDS`.
    """
    if kind not in ERROR_KINDS:
        raise ValueError(f"error kind must be one of {ERROR_KINDS}, got {kind!r}")
    call = _parse_call(action)
    if kind == "malformed" or call is None:
        body = action.removesuffix(CLOSE)
        cut = rng.randint(len(OPEN) + 1, max(len(OPEN) + 1, len(body) - 2))
        return body[:cut]
    name, args = call
    if kind == "wrong-tool":
        return action.replace(f'"{name}"', f'"{name[:-1] or name}{name[-1] * 2}"', 1)
    strings = [k for k, v in args.items() if isinstance(v, str) and v]
    if not strings:
        return mutate(action, "malformed", rng, answer_tool)
    key = rng.choice(strings)
    value = args[key]
    i = rng.randrange(len(value))
    ch = value[i]
    new = str((int(ch) + rng.randint(1, 9)) % 10) if ch.isdigit() else ("x" if ch != "x" else "y")
    args = {**args, key: value[:i] + new + value[i + 1 :]}
    return f"{OPEN}{json.dumps({'name': name, 'arguments': args})}{CLOSE}"


def plan_turns(
    env: Env,
    seed: int,
    error_rate: float,
    rng: random.Random,
    max_errors: int = 3,
    kinds: tuple[str, ...] = ERROR_KINDS,
    split: str = "train",
) -> Injected:
    """Play the expert on ``env`` (task ``seed`` of ``split``), replacing each non-final action
    by an error with probability ``error_rate`` (at most ``max_errors``, never two in a row,
    never a mutated answer that would end the episode). Returns the turn texts."""
    horizon = _horizon(env, seed, max_errors, split)
    env.reset(seed=seed, options={"split": split, "max_turns": horizon})
    turns: list[str] = []
    injected: list[int] = []
    chosen: list[str] = []
    while True:
        action = env.expert_action(list(env.messages))
        is_answer = _is_answer(action, env.answer_tool)
        last_was_error = bool(injected) and injected[-1] == len(turns) - 1
        if (
            not is_answer
            and not last_was_error
            and len(injected) < max_errors
            and rng.random() < error_rate
        ):
            kind = rng.choice(kinds)
            action = mutate(action, kind, rng, env.answer_tool)
            injected.append(len(turns))
            chosen.append(kind)
        turns.append(action)
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            return Injected(turns, injected, chosen)


def recovery_episodes(
    env_name: str,
    env_kwargs: dict[str, Any],
    seeds: Iterable[int],
    renderer: Renderer,
    error_rate: float = 0.2,
    max_errors: int = 3,
    seed: int = 0,
    kinds: tuple[str, ...] = ERROR_KINDS,
) -> list[Episode]:
    """Episodes with injected errors (mask 0) and the expert's recovery (mask 1), one per seed.

    ``episode.info["injected_turns"]`` and ``info["injected_kinds"]`` say which turns were errors.
    The turn limit is the env's plus ``max_errors``, so the errors do not use up the expert's
    turns. Where the errors go depends only on (``seed``, task seed), so any split of ``seeds``
    into several calls gives the same episodes.

    Raises:
        ValueError: ``error_rate`` is outside [0, 1] or ``kinds`` names an unknown kind.
    """
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    _check_kinds(kinds)
    planner, player = make(env_name, **env_kwargs), make(env_name, **env_kwargs)
    out = []
    try:
        for s in seeds:
            rng = random.Random(f"recovery:{seed}:{s}")
            plan = plan_turns(planner, s, error_rate, rng, max_errors, kinds)
            options = {"split": "train", "max_turns": _horizon(player, s, max_errors)}
            ep = scripted_episode(player, renderer, s, plan.turns, options=options)
            for i in plan.injected:
                turn = ep.turns[i]
                seg = ep.segments[turn.segment]
                seg.mask[turn.start : turn.end] = [0] * (turn.end - turn.start)
            ep.info["injected_turns"] = list(plan.injected)
            ep.info["injected_kinds"] = list(plan.kinds)
            out.append(ep)
    finally:
        planner.close()
        player.close()
    return out


# ------------------------------------------------------------------------ recovery rate
def recovery_jobs(
    env_name: str,
    env_kwargs: dict[str, Any],
    seeds: Iterable[int],
    *,
    split: str = "eval",
    seed: int = 0,
    kinds: tuple[str, ...] = ERROR_KINDS,
) -> list[EpisodeJob]:
    """One rollout job per task seed that starts right after an injected error.

    The expert plays task ``s`` of ``split`` up to a turn drawn uniformly among its non-final
    turns; that turn is replaced by an error of a kind drawn from ``kinds``
    (:func:`mutate`). The job replays this prefix (``options["replay"]``: the env answers the
    error as it would answer a model) and leaves the rest of the episode, with one extra turn
    for the error, to the policy that plays it. ``options["injected"]`` records the error's
    ``turn`` and ``kind`` (kept in ``episode.info["options"]``).

    Raises:
        ValueError: ``kinds`` names an unknown kind.
    """
    _check_kinds(kinds)
    env = make(env_name, **env_kwargs)
    jobs = []
    try:
        for s in seeds:
            rng = random.Random(f"recovery-jobs:{seed}:{s}")
            clean = plan_turns(env, s, 0.0, rng, 0, kinds, split)
            if len(clean.turns) < 2:  # nothing to inject before the answer
                continue
            at = rng.randrange(len(clean.turns) - 1)
            kind = rng.choice(kinds)
            prefix = [*clean.turns[:at], mutate(clean.turns[at], kind, rng, env.answer_tool)]
            options = {
                "split": split,
                "replay": prefix,
                "max_turns": _horizon(env, s, 1, split),
                "injected": {"turn": at, "kind": kind},
            }
            jobs.append(EpisodeJob(env_name, s, options, dict(env_kwargs)))
    finally:
        env.close()
    return jobs


def recovery_rate(episodes: Iterable[Episode]) -> dict[str, float]:
    """Success of episodes played from :func:`recovery_jobs`: ``recovery_rate`` overall,
    ``recovery_rate/<kind>`` per injected kind and ``recovery_episodes`` (their count)."""
    eps = list(episodes)
    by_kind: dict[str, list[bool]] = {}
    for ep in eps:
        injected = ep.info.get("options", {}).get("injected")
        if injected is None:
            raise ValueError(
                f"episode {ep.task_id!r} was not played from recovery_jobs (no options['injected'])"
            )
        by_kind.setdefault(str(injected["kind"]), []).append(bool(ep.success))
    out = {
        "recovery_rate": sum(ep.success for ep in eps) / len(eps) if eps else float("nan"),
        "recovery_episodes": float(len(eps)),
    }
    for kind, wins in sorted(by_kind.items()):
        out[f"recovery_rate/{kind}"] = sum(wins) / len(wins)
    return out


def _check_kinds(kinds: Iterable[str]) -> None:
    for k in kinds:
        if k not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {ERROR_KINDS}, got {k!r}")


def _horizon(env: Env, seed: int, extra: int, split: str = "train") -> int:
    _, info = env.reset(seed=seed, options={"split": split})
    return int(info["max_turns"]) + extra


def _parse_call(action: str) -> tuple[str, dict[str, Any]] | None:
    m = re.fullmatch(re.escape(OPEN) + r"(.*)" + re.escape(CLOSE), action.strip(), re.S)
    if not m:
        return None
    try:
        payload = json.loads(m.group(1))
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("arguments"), dict):
        return None
    return str(payload.get("name", "")), dict(payload["arguments"])


def _is_answer(action: str, answer_tool: str | None) -> bool:
    call = _parse_call(action)
    return call is not None and call[0] == (answer_tool or "submit")
