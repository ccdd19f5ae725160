"""``agentopd.Env``: the Gymnasium base class for multi-turn tool-use episodes.

Contract (Gymnasium's, with chat messages as observations):

* ``reset(seed=, options=) -> (messages, info)``: the opening messages (system + user) and an
  ``info`` dict with the tool schemas (``info["tools"]``), the public task (``info["task"]``) and
  its id (``info["task_id"]``).
* ``step(action) -> (messages, reward, terminated, truncated, info)``: ``action`` is the assistant
  turn, raw text (parsed here) or a :class:`~agentopd.types.Message`. ``messages`` are the tool
  results (or a note on what was wrong with the turn). ``terminated``: the agent answered;
  ``truncated``: the turn limit cut the episode.

``options`` carries curriculum knobs: ``task_index`` (pick a task deterministically),
``max_turns`` (override the horizon), ``replay`` (a list of assistant actions to replay before
the student plays; the returned messages then include them, and ``info["replayed_turns"]`` says
how many), ``split`` (``"train"`` or ``"eval"``; held-out tasks come from a disjoint seed range).

A subclass implements :meth:`new_task`, :meth:`build_tools`, :meth:`check_answer` and
:meth:`expert_action`; a ``submit(answer)`` tool is added automatically.

Optional part: what the rollout loop reads or sets beyond ``reset``/``step``
(:class:`RolloutEnv`): the tool-call parser, the sampled tokens of each turn and the message
history. :class:`Env` implements all of it; the rollout reaches it through :func:`rollout_env`.

Example::

    from agentopd import Env, Task, tool

    class Echo(Env):
        description = "Repeat a secret word found with a tool."

        def new_task(self, rng, options):
            word = str(rng.choice(["apple", "pear", "plum"]))
            return Task(id=word, prompt="Find the secret word and submit it.", answer=word)

        def build_tools(self, task):
            @tool
            def secret() -> str:
                \"\"\"Return the secret word.\"\"\"
                return task.answer
            return [secret]

        def check_answer(self, task, answer):
            return answer.strip() == task.answer

        def expert_action(self, messages):
            if messages[-1].role == "tool":
                return self.submit_call(messages[-1].content)
            return self.call("secret")
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import gymnasium
import numpy as np

from agentopd.parsing import NEAR_MISS_POLICIES, format_tool_call, parse_assistant
from agentopd.renderer import valid_utf8
from agentopd.tooling import Tool, Toolset, tool
from agentopd.types import Message

EVAL_SEED_OFFSET = 1_000_003
DEFAULT_SYSTEM_PROMPT = (
    "You are an agent that solves tasks with tools. Call a tool with "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>. '
    "When you know the answer, call submit."
)


@dataclass
class Task:
    """One task of an environment."""

    id: str
    """Stable identity (used in episodes and metrics)."""
    prompt: str
    """What the user asks."""
    answer: Any = None
    """Reference answer; never shown to the agent (a teacher may get it as privileged context)."""
    difficulty: int = 1
    """Expected number of tool calls (or hops) needed; used for curricula and per-length metrics."""
    data: dict[str, Any] = field(default_factory=dict)
    """Anything else the env needs."""
    max_turns: int | None = None
    """Per-task turn limit (None: the env's ``max_turns``); ``options["max_turns"]`` wins over both."""

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "difficulty": self.difficulty}


def answered_calls(messages: list[Message], tool_name: str, argument: str) -> dict[str, str]:
    """``{argument value: result text}`` for every ``tool_name`` call answered in ``messages``.

    A helper for scripted experts that act on what earlier tool calls returned. A value called
    twice keeps its latest result; :func:`answered_call_log` keeps the order and every call.
    """
    return dict(answered_call_log(messages, tool_name, argument))


def answered_call_log(
    messages: list[Message], tool_name: str, argument: str
) -> list[tuple[str, str]]:
    """``(argument value, result text)`` for every answered ``tool_name`` call, in call order.

    For experts whose tools keep state between calls (a Python session), where what ran before
    and in which order matters.
    """
    log: list[tuple[str, str]] = []
    pending: dict[str | None, str] = {}
    for m in messages:
        if m.role == "assistant":
            pending = {
                c.id: str(c.arguments.get(argument, ""))
                for c in m.tool_calls
                if c.name == tool_name and isinstance(c.arguments, dict)
            }
        elif m.role == "tool" and m.name == tool_name and m.tool_call_id in pending:
            log.append((pending[m.tool_call_id], m.content))
    return log


@runtime_checkable
class RolloutEnv(Protocol):
    """What the rollout loop (:mod:`agentopd.rollout`) uses of an env besides Gymnasium's
    ``reset``/``step``/``close``. :class:`Env` provides every member (``observe_sampled`` as a
    no-op), so a subclass only overrides what it needs; an env built otherwise must have them.
    """

    tool_parser: str
    """How the env reads tool calls in a turn's text (``"lenient"`` or ``"vllm-hermes"``). The
    rollout sets it from ``rollout.tool_parser`` before ``reset``."""

    messages: list[Message]
    """The conversation so far, updated by ``reset`` and ``step``: after ``step`` the assistant
    message of the turn (with the tool calls the env parsed) is followed by exactly the new
    messages ``step`` returned. The rollout renders the next prompt's bridge tokens from it and
    stores it in the episode."""

    def observe_sampled(self, token_ids: list[int], logprobs: list[float]) -> None:
        """The exact token ids and log-probs the policy sampled for the turn that the next
        ``step`` receives as text (called just before that ``step``). An env that hands the
        turn to a foreign loop (verifiers) passes them on; others ignore them."""


def rollout_env(env: Any) -> RolloutEnv:
    """``env`` as the rollout loop uses it (see :class:`RolloutEnv`).

    Raises:
        TypeError: ``env`` lacks a member of :class:`RolloutEnv`.
    """
    if isinstance(env, RolloutEnv):
        return env
    missing = [m for m in ("tool_parser", "messages", "observe_sampled") if not hasattr(env, m)]
    raise TypeError(
        f"{type(env).__name__} lacks {', '.join(missing)} of agentopd.env.RolloutEnv, which the "
        "rollout loop uses; derive the env from agentopd.Env"
    )


class MessagesSpace(gymnasium.Space):
    """A list of :class:`Message` (the observation space of every agentopd env)."""

    def __init__(self, seed: int | None = None):
        super().__init__(shape=None, dtype=None, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(m, Message) for m in x)

    def sample(self, mask: Any = None, probability: Any = None) -> list[Message]:
        n = int(self.np_random.integers(1, 3))
        return [Message(role="tool", content=_random_text(self.np_random)) for _ in range(n)]

    @property
    def is_np_flattenable(self) -> bool:
        return False


class AssistantTextSpace(gymnasium.Space):
    """Assistant turns as raw text; ``sample`` mixes gibberish, near-miss and well-formed calls."""

    def __init__(self, tool_names: list[str] | None = None, seed: int | None = None):
        super().__init__(shape=None, dtype=None, seed=seed)
        self.tool_names = tool_names or ["submit"]

    def contains(self, x: Any) -> bool:
        return isinstance(x, str | Message)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        r = self.np_random
        kind = int(r.integers(0, 5))
        name = str(r.choice(self.tool_names + ["no_such_tool"]))
        if kind == 0:
            return _random_text(r)
        if kind == 1:
            return '<tool_call>{"name": "' + name + '", "arguments": {'
        if kind == 2:
            return format_tool_call(name, {"x": _random_text(r)})
        if kind == 3:
            return format_tool_call(name, {"answer": _random_text(r)})
        return "<tool_call>[1, 2, 3]</tool_call> trailing </tool_call>"

    @property
    def is_np_flattenable(self) -> bool:
        return False


def _random_text(r: np.random.Generator) -> str:
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789 {}\"':,<>/_-")
    return "".join(r.choice(alphabet, size=int(r.integers(0, 24))))


class Env(gymnasium.Env):
    """Base class for multi-turn tool environments (see the module docstring)."""

    metadata = {"render_modes": ["ansi"]}
    description: str = ""
    """One line shown by ``agentopd envs``."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    answer_tool: str | None = "submit"
    """Name of the auto-added answer tool; ``None`` to use only plain-text answers."""
    near_miss: str = "error"
    """A turn with a near-miss tool-call tag (``<TOOL_CALL>``, fullwidth brackets, ...):
    ``"error"`` answers with a parse error and a hint; ``"answer"`` takes it as a final answer
    (see :func:`agentopd.parsing.parse_assistant`). Also a constructor argument."""
    tool_parser: str = "lenient"
    """How tool calls are read: ``"lenient"`` or ``"vllm-hermes"`` (exactly what vLLM's Hermes
    tool parser extracts; see ``docs/parsing.md``). The rollout loop sets it from
    ``rollout.tool_parser`` (:class:`RolloutEnv`)."""

    def __init__(
        self,
        max_turns: int = 8,
        tool_timeout_s: float = 10.0,
        max_output_chars: int = 2000,
        render_mode: str | None = None,
        near_miss: str | None = None,
    ):
        super().__init__()
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if near_miss is not None:
            if near_miss not in NEAR_MISS_POLICIES:
                raise ValueError(
                    f"near_miss must be one of {', '.join(NEAR_MISS_POLICIES)}, got {near_miss!r}"
                )
            self.near_miss = near_miss
        self.max_turns = max_turns
        self.tool_timeout_s = tool_timeout_s
        self.max_output_chars = max_output_chars
        self.render_mode = render_mode
        self.spec_name = type(self).__name__
        self.observation_space = MessagesSpace()
        self.task: Task | None = None
        self.toolset: Toolset | None = None
        self.messages: list[Message] = []
        self.turn = 0
        self.answer: str | None = None
        self.error_counts: Counter[str] = Counter()
        self._horizon = max_turns
        self.action_space = AssistantTextSpace(self._tool_names_hint())

    # ---------------------------------------------------------------- subclass hooks
    def new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        """Make the task for this episode from ``rng`` (seeded by ``reset``) and ``options``."""
        raise NotImplementedError

    def build_tools(self, task: Task) -> list[Tool]:
        """The tools for this episode (bound to per-episode state); ``submit`` is added for you."""
        raise NotImplementedError

    def check_answer(self, task: Task, answer: str) -> bool:
        """Whether ``answer`` solves ``task``. Runs in the trainer, outside the agent's reach."""
        raise NotImplementedError

    def expert_action(self, messages: list[Message]) -> str:
        """The scripted expert's next assistant turn (raw text) given the conversation so far."""
        raise NotImplementedError

    def close_episode(self) -> None:
        """Release per-episode resources (sandboxes, database handles). Called on reset/close."""

    def observe_sampled(self, token_ids: list[int], logprobs: list[float]) -> None:
        """The sampled token ids and log-probs of the turn the next :meth:`step` receives
        (:class:`RolloutEnv`); ignored here."""

    def privileged_context(self) -> str:
        """Extra context a teacher may see (e.g. for self-distillation): the reference answer."""
        return f"(Privileged: the correct answer is {self.task.answer!r}.)" if self.task else ""

    # ---------------------------------------------------------------- helpers for experts
    @staticmethod
    def call(name: str, **arguments: Any) -> str:
        """Raw text of one well-formed tool call."""
        return format_tool_call(name, arguments)

    def submit_call(self, answer: Any) -> str:
        return format_tool_call(self.answer_tool or "submit", {"answer": str(answer)})

    # ---------------------------------------------------------------- gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        self.close_episode()
        rng = self.np_random
        split_tag = 1 if options.get("split") == "eval" else 0
        if split_tag and seed is not None:
            rng = np.random.default_rng(seed + EVAL_SEED_OFFSET)
        elif split_tag:
            rng = np.random.default_rng(int(self.np_random.integers(2**62)) + EVAL_SEED_OFFSET)
        if "task_index" in options:
            if int(options["task_index"]) < 0:
                raise ValueError(f"options['task_index'] must be >= 0, got {options['task_index']}")
            # A distinct stream from plain seeds: [index, tag, split] never equals default_rng(index).
            rng = np.random.default_rng([int(options["task_index"]), 0x7A5C, split_tag])
        self.task = self.new_task(rng, options)
        tools = list(self.build_tools(self.task))
        if self.answer_tool:
            tools.append(self._make_submit_tool())
        self.toolset = Toolset(
            tools, timeout_s=self.tool_timeout_s, max_output_chars=self.max_output_chars
        )
        self.action_space = AssistantTextSpace(self.toolset.names)
        self.action_space.seed(seed)
        self._horizon = int(options.get("max_turns", self.task.max_turns or self.max_turns))
        self.turn = 0
        self.answer = None
        self.error_counts = Counter()
        self.messages = []
        if self.system_prompt:
            self.messages.append(Message(role="system", content=self.system_prompt))
        self.messages.append(Message(role="user", content=self.task.prompt))
        replay = list(options.get("replay") or [])
        for action in replay:
            self._apply(action)
            if self.answer is not None or self.turn >= self._horizon:
                raise ValueError(
                    f"options['replay'] ended the episode after {self.turn} of {len(replay)} actions; "
                    "a replayed prefix must leave at least one turn for the policy"
                )
        info = {
            "tools": self.toolset.schemas,
            "task": self.task.public(),
            "task_id": self.task.id,
            "difficulty": self.task.difficulty,
            "max_turns": self._horizon,
            "replayed_turns": self.turn,
        }
        return list(self.messages), info

    def step(
        self, action: str | Message
    ) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        if self.task is None or self.toolset is None:
            raise RuntimeError("call reset() before step()")
        if self.answer is not None or self.turn >= self._horizon:
            raise RuntimeError("episode is over; call reset()")
        new, errors, parse_error = self._apply(action)
        terminated = self.answer is not None
        truncated = not terminated and self.turn >= self._horizon
        success = terminated and self._safe_check(self.answer)
        reward = 1.0 if success else 0.0
        info = {
            "tool_errors": errors,
            "parse_error": parse_error,
            "success": bool(success),
            "answer": self.answer,
            "turn": self.turn,
        }
        return new, float(reward), bool(terminated), bool(truncated), info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n".join(f"[{m.role}] {m.content}" for m in self.messages)

    def close(self) -> None:
        self.close_episode()
        super().close()

    # ---------------------------------------------------------------- internals
    def _apply(self, action: str | Message) -> tuple[list[Message], list[str], str | None]:
        text = action.content if isinstance(action, Message) else str(action)
        parsed = parse_assistant(text, near_miss=self.near_miss, mode=self.tool_parser)  # type: ignore[arg-type]
        self.messages.append(Message(role="assistant", content=text, tool_calls=parsed.tool_calls))
        self.turn += 1
        new: list[Message] = []
        errors: list[str] = []
        if parsed.error is not None:
            errors.append("parse")
            new.append(
                Message(
                    role="tool",
                    name="error",
                    content=valid_utf8(
                        f"Error (parse): {parsed.error.rstrip('.')}. The turn's tool calls were not run."
                    ),
                )
            )
        elif not parsed.tool_calls:
            # A plain-text reply is the final answer.
            self.answer = parsed.content
        else:
            assert self.toolset is not None  # reset() built it before any action
            for call in parsed.tool_calls:
                result = self.toolset.call(call)
                if result.error:
                    errors.append(result.error)
                new.append(result.message)
                if self.answer is not None:
                    break
        for kind in errors:
            self.error_counts[kind] += 1
        self.messages.extend(new)
        return new, errors, parsed.error

    def _safe_check(self, answer: str | None) -> bool:
        assert self.task is not None  # step() refuses to run before reset()
        try:
            return bool(self.check_answer(self.task, "" if answer is None else str(answer)))
        except Exception:  # noqa: BLE001 - a bad answer is a wrong answer
            return False

    def _make_submit_tool(self) -> Tool:
        env = self

        @tool(name=self.answer_tool)
        def submit(answer: str | int | float) -> str:
            """Submit the final answer. This ends the episode.

            Args:
                answer: The final answer.
            """
            env.answer = str(answer)
            return "Answer submitted."

        return submit

    def _tool_names_hint(self) -> list[str]:
        return [self.answer_tool or "submit"]


def missing_expert(env: Any) -> str | None:
    """Why ``env`` has no scripted expert, or None when it has one.

    An env says it has none with an ``expert_unavailable`` reason (the foreign-env adapters) or
    by leaving :meth:`Env.expert_action` unimplemented.
    """
    reason = getattr(env, "expert_unavailable", None)
    if reason:
        return str(reason)
    if getattr(type(env), "expert_action", Env.expert_action) is Env.expert_action:
        return f"{type(env).__name__} does not implement expert_action"
    return None
