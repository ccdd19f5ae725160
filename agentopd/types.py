"""The nouns of agentopd: messages, tool calls, turns, episodes and why an episode stopped.

An :class:`Episode` is token-exact: it stores the token ids exactly as the student sampled them
(plus the bridge tokens the framework inserted between turns), their sampled logprobs and a
per-token loss mask that is 1 only where the policy sampled the token. Everything round-trips
losslessly through JSON lines (:meth:`Episode.to_json` / :meth:`Episode.from_json`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class StopReason(StrEnum):
    """Why an episode ended. Each value is counted in the metrics as ``stop/<value>``."""

    ANSWER = "answer"
    """The agent submitted a final answer (or replied without a tool call)."""
    MAX_TURNS = "max_turns"
    """The turn limit (possibly set by a curriculum) was reached."""
    TOKEN_BUDGET = "token_budget"
    """The episode's token budget ran out (context or generation length)."""
    ERROR = "error"
    """The environment itself failed; the episode is kept for inspection, never for training."""
    PREFIX_MISMATCH = "prefix_mismatch"
    """The chat template rewrote history and the renderer was configured to stop."""


@dataclass
class ToolCall:
    """One tool call written by the model."""

    name: str
    """Tool name as written by the model (may be unknown to the env)."""
    arguments: dict[str, Any] = field(default_factory=dict)
    """Decoded JSON arguments."""
    id: str | None = None
    """Optional call id, echoed in the tool result."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments, "id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToolCall:
        return cls(name=d["name"], arguments=d.get("arguments", {}), id=d.get("id"))


@dataclass
class Message:
    """A chat message in OpenAI style."""

    role: str
    """``system``, ``user``, ``assistant`` or ``tool``."""
    content: str = ""
    """Text content. For an assistant message parsed from samples: the raw sampled text."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """Tool calls of an assistant message."""
    name: str | None = None
    """For ``tool`` messages: the tool that produced the result."""
    tool_call_id: str | None = None
    """For ``tool`` messages: the id of the call answered."""

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-style dict handed to ``apply_chat_template``."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [
                {
                    "type": "function",
                    "id": c.id,
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        if self.name is not None:
            d["name"] = self.name
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Message:
        calls = []
        for c in d.get("tool_calls") or []:
            fn = c.get("function", c)
            calls.append(
                ToolCall(name=fn["name"], arguments=fn.get("arguments", {}), id=c.get("id"))
            )
        return cls(
            role=d["role"],
            content=d.get("content") or "",
            tool_calls=calls,
            name=d.get("name"),
            tool_call_id=d.get("tool_call_id"),
        )


@dataclass
class Turn:
    """One assistant turn: the sampled span and what the environment answered."""

    index: int
    """0-based turn index within the episode."""
    segment: int
    """Index of the token segment holding this turn (see :class:`Segment`)."""
    start: int
    """Offset of the first sampled token of this turn in the segment's ``tokens``."""
    end: int
    """One past the last sampled token (the end-of-turn token included when it was sampled)."""
    text: str = ""
    """Decoded sampled text, for display only; training never re-encodes it."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """Tool calls parsed from the sampled text."""
    tool_results: list[Message] = field(default_factory=list)
    """Messages the environment answered with."""
    parse_error: str | None = None
    """Set when the sampled text held a malformed tool call."""
    replayed: bool = False
    """True for expert actions replayed by a curriculum (TCOD B2F); their mask is 0."""
    reward: float = 0.0
    """Reward returned by ``env.step`` for this turn."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        d["tool_results"] = [m.to_dict() for m in self.tool_results]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Turn:
        d = dict(d)
        d["tool_calls"] = [ToolCall.from_dict(c) for c in d.get("tool_calls", [])]
        d["tool_results"] = [Message.from_dict(m) for m in d.get("tool_results", [])]
        return cls(**d)


@dataclass
class Segment:
    """A contiguous token sequence: prompt, then sampled turns joined by bridge tokens.

    Most episodes have one segment. A new one starts only when the chat template rewrote history
    and the renderer was configured to re-render instead of failing.
    """

    tokens: list[int] = field(default_factory=list)
    """Token ids exactly as fed to / sampled from the model."""
    logprobs: list[float] = field(default_factory=list)
    """Sampled logprob per token; 0.0 where the token was not sampled."""
    mask: list[int] = field(default_factory=list)
    """1 where the student sampled the token (end-of-turn included), else 0."""
    prompt_len: int = 0
    """Length of the initial prompt of this segment."""

    def append(self, tokens: list[int], logprobs: list[float] | None, sampled: bool) -> None:
        """Append tokens; ``sampled`` sets their mask.

        Raises:
            ValueError: ``logprobs`` does not have one entry per token, or the segment is already
                misaligned. The segment is left unchanged.
        """
        tokens = list(tokens)
        logprobs = list(logprobs) if logprobs is not None else [0.0] * len(tokens)
        if len(logprobs) != len(tokens):
            raise ValueError(
                f"got {len(tokens)} tokens but {len(logprobs)} logprobs; expected one logprob per token"
            )
        if not (len(self.tokens) == len(self.logprobs) == len(self.mask)):
            raise ValueError(
                f"segment is misaligned: {len(self.tokens)} tokens, {len(self.logprobs)} logprobs, "
                f"{len(self.mask)} mask entries"
            )
        self.tokens.extend(tokens)
        self.logprobs.extend(logprobs)
        self.mask.extend([1 if sampled else 0] * len(tokens))


@dataclass
class Episode:
    """A full multi-turn episode, token-exact."""

    env: str
    """Registry name of the environment."""
    task_id: str
    """Identity of the task inside the environment."""
    seed: int | None = None
    """Seed passed to ``env.reset``."""
    messages: list[Message] = field(default_factory=list)
    """The conversation (system and user prompts, assistant turns, tool results)."""
    segments: list[Segment] = field(default_factory=list)
    """Token segments; see :class:`Segment`."""
    turns: list[Turn] = field(default_factory=list)
    """Assistant turns in order."""
    reward: float = 0.0
    """Total reward."""
    success: bool = False
    """Whether the task was solved (as judged by the env, outside the agent's reach)."""
    stop_reason: StopReason = StopReason.ANSWER
    """Why the episode ended."""
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (task metadata, counts of tool errors, curriculum knobs, ...)."""
    teacher: list[dict[str, Any]] | None = None
    """Per segment: teacher scores of the sampled tokens (``logprobs``, ``topk_ids``, ``topk_logprobs``)."""

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def num_sampled_tokens(self) -> int:
        return sum(sum(s.mask) for s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "task_id": self.task_id,
            "seed": self.seed,
            "messages": [m.to_dict() for m in self.messages],
            "segments": [asdict(s) for s in self.segments],
            "turns": [t.to_dict() for t in self.turns],
            "reward": self.reward,
            "success": self.success,
            "stop_reason": self.stop_reason.value,
            "info": self.info,
            "teacher": self.teacher,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Episode:
        return cls(
            env=d["env"],
            task_id=d["task_id"],
            seed=d.get("seed"),
            messages=[Message.from_dict(m) for m in d.get("messages", [])],
            segments=[Segment(**s) for s in d.get("segments", [])],
            turns=[Turn.from_dict(t) for t in d.get("turns", [])],
            reward=d.get("reward", 0.0),
            success=d.get("success", False),
            stop_reason=StopReason(d.get("stop_reason", "answer")),
            info=d.get("info", {}),
            teacher=d.get("teacher"),
        )

    def to_json(self) -> str:
        """One JSON line, valid JSON and UTF-8 encodable, with no line break under any convention.

        Non-finite floats are written as ``{"__float__": "NaN" | "Infinity" | "-Infinity"}``; a
        user dict that could be mistaken for such a marker is wrapped as ``{"__dict__": {...}}``.
        Line and paragraph separators and lone surrogates are written as ``\\uXXXX`` escapes.
        Limit: a high surrogate directly followed by a low one is read back as the combined
        character (JSON cannot tell the two apart).
        """
        line = json.dumps(_encode_floats(self.to_dict()), ensure_ascii=False, allow_nan=False)
        return _UNSAFE_IN_LINE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)

    @classmethod
    def from_json(cls, line: str) -> Episode:
        return cls.from_dict(_decode_floats(json.loads(line)))


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT_KEY, _DICT_KEY = "__float__", "__dict__"
# Characters json.dumps(ensure_ascii=False) leaves raw although str.splitlines() breaks on them
# (NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR) or UTF-8 cannot encode them (lone surrogates).
_UNSAFE_IN_LINE = re.compile("[\x85\u2028\u2029\ud800-\udfff]")


def _is_marker(x: dict[str, Any]) -> bool:
    return len(x) == 1 and next(iter(x)) in (_FLOAT_KEY, _DICT_KEY)


def _encode_floats(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return {_FLOAT_KEY: "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")}
    if isinstance(x, dict):
        encoded = {k: _encode_floats(v) for k, v in x.items()}
        return {_DICT_KEY: encoded} if _is_marker(x) else encoded
    if isinstance(x, list | tuple):
        return [_encode_floats(v) for v in x]
    return x


def _decode_floats(x: Any) -> Any:
    if isinstance(x, dict):
        if _is_marker(x):
            if _FLOAT_KEY in x:
                return _NONFINITE[x[_FLOAT_KEY]]
            return {k: _decode_floats(v) for k, v in x[_DICT_KEY].items()}
        return {k: _decode_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_floats(v) for v in x]
    return x
