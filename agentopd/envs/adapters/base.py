"""``ForeignEnv``: the part every adapter shares, turning a step-based foreign env into an ``Env``.

A subclass wraps one foreign env (GEM, SkyRL-gym, OpenEnv, Gymnasium) and implements three hooks:
:meth:`ForeignEnv.foreign_reset` (opening messages for a chosen seed or task index),
:meth:`ForeignEnv.foreign_step` (one text action, or one tool call where the foreign env has
tools) and optionally :meth:`ForeignEnv.foreign_tools`. Everything else is decided here, once:

* **Actions.** The student's turn goes to the foreign env verbatim, as text. A turn that holds
  agentopd tool-call markup (``<tool_call>...``) is parsed as tool calls instead: a well-formed call
  runs the foreign env's tool of that name (an unknown name gets the list of tools), a malformed
  one gets an error message. Neither reaches a text-only foreign env, and the episode goes on.
* **Observations** become messages: a text observation is a ``user`` message, a tool result a
  ``tool`` message.
* **Reward and termination** carry over per step. ``info["success"]`` is the foreign env's own
  success flag when it reports one, else "the episode terminated with a step reward of at least
  ``success_reward``".
* **Curriculum knobs.** ``max_turns`` is enforced here (and handed to the foreign env where it
  has such a knob); ``seed`` and ``task_index`` choose the foreign task; ``split="eval"`` moves to
  a disjoint seed range (``seed + EVAL_SEED_OFFSET``) or to the adapter's held-out tasks;
  ``replay`` plays a stored prefix through :meth:`step`. Any other option would be dropped and
  gets a warning, once per key.
* **No scripted expert.** Foreign envs ship none; ``expert_unavailable`` says so and
  ``agentopd check-env`` reports the expert checks as skipped with that reason.

* **Bounded calls.** Every call into the foreign env (reset, step, close) runs with a deadline,
  ``call_timeout_s`` (120 s by default; ``null``: none). A call that overruns raises
  :class:`ForeignTimeoutError`; the rollout loop ends that episode as ``env_error`` with the
  reason and the batch goes on (``agentopd check-env`` reports a failed row). The stuck call is
  left behind in a daemon thread, and the env refuses new calls until it returns.
* **Bounded observations.** A text observation longer than ``max_observation_chars`` (16,000 by
  default) is cut before it is tokenized, with a note the student sees that counts the cut
  characters, as a tool's oversized output is. (The rollout also ends an episode whose next
  observation would not fit its token budget, as ``token_budget``.)
* **Finite rewards.** A reward that is not a finite number (NaN, an infinity, not a number) is
  an error naming the env and the turn: the episode ends as ``env_error``.

A foreign env that raises inside :meth:`step` is not caught here: the rollout loop ends that
episode with an error stop reason and the batch goes on.
"""

from __future__ import annotations

import difflib
import importlib
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from agentopd.config import ConfigError
from agentopd.env import EVAL_SEED_OFFSET, AssistantTextSpace, Env
from agentopd.parsing import parse_assistant
from agentopd.registry import UnknownNameError
from agentopd.tooling import TRUNCATION_MARKER, Tool, Toolset
from agentopd.types import Message

KNOWN_OPTIONS = frozenset({"seed", "task_index", "max_turns", "split", "replay"})
"""Reset options every adapter handles."""
DEFAULT_MAX_TURNS = 8
"""Turn limit when neither the caller nor the foreign env names one."""
DEFAULT_CALL_TIMEOUT_S = 120.0
"""Seconds a foreign reset, step or close may take before the episode ends as ``env_error``."""
DEFAULT_MAX_OBSERVATION_CHARS = 16_000
"""Characters of one foreign observation kept; the rest is cut with a note."""
_warned: set[tuple[str, str]] = set()


class ForeignTimeoutError(TimeoutError):
    """A call into the foreign env did not return within ``call_timeout_s``."""


class MissingPackageError(ConfigError, ImportError):
    """An adapter's foreign package is not installed; the message holds the pip line."""


def require(module: str, *, package: str, extra: str) -> Any:
    """Import ``module`` of the foreign ``package``, or say which extra installs it.

    Raises:
        MissingPackageError: the import failed; the message names ``pip install 'agentopd[extra]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackageError(
            f"the {extra} adapter needs the {package!r} package, which is not importable "
            f"({type(e).__name__}: {e}). Install it with: pip install 'agentopd[{extra}]'"
        ) from None


def unknown_id(framework: str, env_id: str, valid: list[str], syntax: str) -> UnknownNameError:
    """The error for an id the foreign registry does not know: nearest ids and all valid ones."""
    near = difflib.get_close_matches(env_id, valid, n=3, cutoff=0.4)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    shown = ", ".join(valid[:60]) + (f", ... ({len(valid)} in all)" if len(valid) > 60 else "")
    return UnknownNameError(
        f"unknown {framework} env id {env_id!r} (name syntax: {syntax}).{hint} "
        f"Available: {shown or '(none registered)'}."
    )


def warn_once(env: str, key: str, message: str) -> None:
    """A ``UserWarning`` for (env, key), shown once per process."""
    if (env, key) in _warned:
        return
    _warned.add((env, key))
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass
class ForeignStart:
    """What a foreign reset produced."""

    messages: list[Message]
    """Opening messages (system and user), as the student sees them."""
    task_id: str | None = None
    """Stable task identity; ``None``: ``seed-<foreign seed>`` (the seed is the task)."""
    info: dict[str, Any] = field(default_factory=dict)
    """The foreign reset's info (kept in ``info["foreign"]``)."""


@dataclass
class ForeignStep:
    """What one foreign step produced."""

    messages: list[Message]
    """New messages for the student (may be empty when the episode ended)."""
    reward: float
    """The foreign step's reward."""
    terminated: bool
    """The task ended (answer given, game won or lost)."""
    truncated: bool = False
    """A foreign limit cut the episode."""
    info: dict[str, Any] = field(default_factory=dict)
    """The foreign step's info; a boolean ``success`` key is used as the success flag."""


class ForeignEnv(Env):
    """Base class of the adapters (see the module docstring).

    Args:
        env_id: The foreign env's id (the part of the agentopd name after the prefix).
        max_turns: Turn limit; ``None``: the foreign env's own limit (:meth:`foreign_max_turns`),
            else ``DEFAULT_MAX_TURNS``.
        success_reward: A terminating step reward at or above this counts as success when the
            foreign env reports no success flag.
        system_prompt: A system message put before the foreign env's opening messages
            (``None``: none, the foreign env's prompt is all the student sees).
        call_timeout_s: Deadline of each foreign reset, step and close (``None``: none).
        max_observation_chars: Longest foreign observation kept (the rest is cut, with a note).
        **kwargs: ``tool_timeout_s``, ``max_output_chars``, ``render_mode`` of :class:`Env`.
    """

    answer_tool = None
    system_prompt = ""
    framework: str = "foreign"
    """Name of the foreign framework, for messages."""
    prefix: str = ""
    """The agentopd name prefix (``gem``, ``openenv``, ...)."""
    expert_unavailable: str | None = (
        "foreign envs ship no scripted expert; name a teacher (teacher=...) and use cold_start.steps=0"
    )
    """Why :meth:`expert_action` cannot play (``agentopd check-env`` reports the skip)."""
    passes_options: frozenset[str] = frozenset()
    """Reset options beyond :data:`KNOWN_OPTIONS` that this adapter hands to the foreign env."""
    takes_whole_turn: bool = False
    """The foreign env gets every turn verbatim, tool-call markup included, and runs its own
    tools (verifiers): :meth:`step` neither parses calls for :meth:`foreign_tools` nor answers
    malformed ones itself."""

    def __init__(
        self,
        env_id: str,
        *,
        max_turns: int | None = None,
        success_reward: float = 1.0,
        system_prompt: str | None = None,
        call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S,
        max_observation_chars: int = DEFAULT_MAX_OBSERVATION_CHARS,
        **kwargs: Any,
    ):
        if call_timeout_s is not None and not float(call_timeout_s) > 0:
            raise ConfigError(f"call_timeout_s must be > 0 or null, got {call_timeout_s!r}")
        if int(max_observation_chars) < 1:
            raise ConfigError(f"max_observation_chars must be >= 1, got {max_observation_chars!r}")
        self.call_timeout_s = None if call_timeout_s is None else float(call_timeout_s)
        self.max_observation_chars = int(max_observation_chars)
        self._running: tuple[str, threading.Event] | None = None
        self.env_id = env_id
        self.success_reward = float(success_reward)
        self._explicit_max_turns = max_turns
        if system_prompt is not None:
            self.system_prompt = system_prompt
        super().__init__(max_turns=max_turns or DEFAULT_MAX_TURNS, **kwargs)
        self.spec_name = f"{self.prefix}:{env_id}"
        self._over = True
        self._last_tool_step: ForeignStep | None = None

    # ---------------------------------------------------------------- subclass hooks
    def foreign_reset(
        self, seed: int, index: int | None, split: str, max_turns: int
    ) -> ForeignStart:
        """Start a foreign episode.

        Args:
            seed: Seed for the foreign env (already moved to the eval range for ``split="eval"``).
            index: ``options["task_index"]`` when given (adapters with a task list pick that row).
            split: ``"train"`` or ``"eval"``.
            max_turns: This episode's turn limit, for foreign envs that take one.
        """
        raise NotImplementedError

    def foreign_step(self, action: str) -> ForeignStep:
        """Send one text action to the foreign env."""
        raise NotImplementedError

    def foreign_tools(self) -> list[Tool]:
        """Tools of the foreign env for this episode (called after :meth:`foreign_reset`)."""
        return []

    def foreign_max_turns(self) -> int | None:
        """The foreign env's own turn limit, if it has one."""
        return None

    def foreign_close(self) -> None:
        """Release the foreign env."""

    # ---------------------------------------------------------------- Env hooks
    def expert_action(self, messages: list[Message]) -> str:
        raise NotImplementedError(f"{self.spec_name}: {self.expert_unavailable}")

    def privileged_context(self) -> str:
        return ""

    def close_episode(self) -> None:
        self._over = True

    def close(self) -> None:
        try:
            if self._running is None or self._running[1].is_set():
                self._bounded("close", self.foreign_close)
        finally:
            super().close()

    # ---------------------------------------------------------------- bounded foreign calls
    def _bounded(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the ``call_timeout_s`` deadline (see the module docstring).

        Raises:
            ForeignTimeoutError: The call overran, or an earlier one is still running.
        """
        if self._running is not None:
            earlier, done = self._running
            if not done.is_set():
                raise ForeignTimeoutError(
                    f"{self.spec_name}: the {self.framework} env's {earlier} has not returned "
                    f"(it overran call_timeout_s={self.call_timeout_s:g} s); this env cannot be "
                    f"used until it does"
                )
            self._running = None
        if self.call_timeout_s is None:
            return fn(*args)
        # A daemon thread: a foreign call that never returns must not keep the process alive.
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=target, name=f"{self.prefix}-{what}", daemon=True).start()
        if not done.wait(self.call_timeout_s):
            self._running = (what, done)
            raise ForeignTimeoutError(
                f"{self.spec_name}: the {self.framework} env's {what} did not return within "
                f"call_timeout_s={self.call_timeout_s:g} s (env_kwargs.call_timeout_s raises "
                "the limit)"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _reward(self, value: Any) -> float:
        """The foreign reward as a float, or an error naming the env and turn."""
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if isinstance(value, bool) or not math.isfinite(x):
            raise ValueError(
                f"{self.spec_name}: the {self.framework} env returned reward {value!r} on turn "
                f"{self.turn}; a reward must be a finite number"
            )
        return x

    def _cap(self, messages: list[Message]) -> list[Message]:
        """``messages`` with each content cut to ``max_observation_chars`` (with a note)."""
        limit = self.max_observation_chars
        out = []
        for m in messages:
            content = m.content if isinstance(m.content, str) else str(m.content)
            if len(content) > limit:
                note = TRUNCATION_MARKER.format(dropped=len(content) - limit)
                m = replace(m, content=content[:limit] + note)
            out.append(m)
        return out

    # ---------------------------------------------------------------- gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        gymnasium_reset = super(Env, self).reset  # gymnasium.Env.reset: seeds self.np_random
        gymnasium_reset(seed=seed)
        options = dict(options or {})
        for key in sorted(set(options) - KNOWN_OPTIONS - self.passes_options):
            warn_once(
                self.spec_name,
                key,
                f"{self.spec_name}: reset option {key!r} has no counterpart in {self.framework} "
                f"and is dropped (handled: {', '.join(sorted(KNOWN_OPTIONS | self.passes_options))})",
            )
        split = str(options.get("split", "train"))
        if split not in ("train", "eval"):
            raise ValueError(f"options['split'] must be 'train' or 'eval', got {split!r}")
        index = options.get("task_index")
        if index is not None and int(index) < 0:
            raise ValueError(f"options['task_index'] must be >= 0, got {index}")
        base = int(index) if index is not None else seed
        if base is None:
            base = int(self.np_random.integers(2**31 - EVAL_SEED_OFFSET - 1))
        foreign_seed = base + (EVAL_SEED_OFFSET if split == "eval" else 0)
        limit = options.get("max_turns", self._explicit_max_turns)
        self.turn = 0
        start = self._bounded(
            "reset",
            self.foreign_reset,
            foreign_seed,
            None if index is None else int(index),
            split,
            int(limit) if limit is not None else (self.foreign_max_turns() or DEFAULT_MAX_TURNS),
        )
        start.messages = self._cap(list(start.messages))
        if limit is None:
            limit = self.foreign_max_turns() or DEFAULT_MAX_TURNS
        self._horizon = int(limit)
        if self._horizon < 1:
            raise ValueError(f"max_turns must be >= 1, got {self._horizon}")
        self.toolset = Toolset(
            self.foreign_tools(),
            timeout_s=self.tool_timeout_s,
            max_output_chars=self.max_output_chars,
        )
        self.action_space = AssistantTextSpace(self.toolset.names or ["act"])
        self.action_space.seed(seed)
        self.turn = 0
        self.answer = None
        self._over = False
        self.error_counts = Counter()
        self.messages = []
        if self.system_prompt:
            self.messages.append(Message(role="system", content=self.system_prompt))
        self.messages.extend(start.messages)
        task_id = start.task_id or f"seed-{foreign_seed}"
        prompt = next((m.content for m in reversed(self.messages) if m.role == "user"), "")
        self.task = _task(task_id, prompt)
        for action in list(options.get("replay") or []):
            _, _, terminated, truncated, _ = self.step(action)
            if terminated or truncated:
                raise ValueError(
                    f"options['replay'] ended the episode after {self.turn} actions; "
                    "a replayed prefix must leave at least one turn for the policy"
                )
        info = {
            "tools": self.toolset.schemas,
            "task": self.task.public(),
            "task_id": task_id,
            "difficulty": 1,
            "max_turns": self._horizon,
            "replayed_turns": self.turn,
            "foreign": _jsonable(start.info),
        }
        return list(self.messages), info

    def step(
        self, action: str | Message
    ) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        if self.task is None or self.toolset is None:
            raise RuntimeError("call reset() before step()")
        if self._over or self.turn >= self._horizon:
            raise RuntimeError("episode is over; call reset()")
        text = action.content if isinstance(action, Message) else str(action)
        parsed = parse_assistant(text)
        self.messages.append(Message(role="assistant", content=text, tool_calls=parsed.tool_calls))
        self.turn += 1
        new: list[Message] = []
        errors: list[str] = []
        reward, terminated, truncated, foreign_info = 0.0, False, False, {}
        if parsed.error is not None and not self.takes_whole_turn:
            errors.append("parse")
            new.append(
                Message(
                    role="tool",
                    name="error",
                    content=f"Error (parse): {parsed.error.rstrip('.')}. The turn's tool calls were not run.",
                )
            )
        elif parsed.tool_calls and not self.takes_whole_turn:
            for call in parsed.tool_calls:
                result = self.toolset.call(call)
                if result.error:
                    errors.append(result.error)
                new.append(result.message)
                outcome = getattr(self, "_last_tool_step", None)
                self._last_tool_step = None
                if isinstance(outcome, ForeignStep):
                    reward += self._reward(outcome.reward)
                    foreign_info = outcome.info
                    new.extend(self._cap(list(outcome.messages)))
                    if outcome.terminated or outcome.truncated:
                        terminated, truncated = outcome.terminated, outcome.truncated
                        break
        else:
            out = self._bounded("step", self.foreign_step, text)
            reward, terminated, truncated = self._reward(out.reward), out.terminated, out.truncated
            foreign_info = out.info
            new.extend(self._cap(list(out.messages)))
        for kind in errors:
            self.error_counts[kind] += 1
        # A foreign env that says "terminated and truncated" was cut by its own limit.
        if terminated and truncated:
            terminated = False
        if not terminated and self.turn >= self._horizon:
            truncated = True
        self._over = terminated or truncated
        flag = foreign_info.get("success") if isinstance(foreign_info, dict) else None
        success = (
            bool(flag)
            if isinstance(flag, bool | np.bool_)
            else terminated and reward >= self.success_reward
        )
        self.messages.extend(new)
        info = {
            "tool_errors": errors,
            "parse_error": parsed.error,
            "success": bool(success and terminated),
            "answer": text if terminated else None,
            "turn": self.turn,
            "foreign": _jsonable(foreign_info),
        }
        return new, float(reward), bool(terminated), bool(truncated), info

    def tool_step(self, outcome: ForeignStep) -> str:
        """For :meth:`foreign_tools` implementations: record a tool call's foreign step.

        The tool returns this method's result (the text of the observation's first message);
        :meth:`step` carries the reward and termination over and appends the other messages.
        """
        self._last_tool_step = ForeignStep(
            outcome.messages[1:],
            outcome.reward,
            outcome.terminated,
            outcome.truncated,
            outcome.info,
        )
        return outcome.messages[0].content if outcome.messages else ""


def _task(task_id: str, prompt: str) -> Any:
    from agentopd.env import Task

    return Task(id=task_id, prompt=prompt)


def _jsonable(x: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of foreign info (episodes store it); unknown objects become strings."""
    if depth > 6:
        return str(x)
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float | np.floating):
        return float(x)
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    if isinstance(x, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v, depth + 1) for v in x]
    return str(x)[:2000]
