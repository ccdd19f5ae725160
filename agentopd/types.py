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
import sys
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import numpy as np


class StopReason(StrEnum):
    """Why an episode ended. Each value is counted in the metrics as ``stop/<value>``."""

    ANSWER = "answer"
    """The agent submitted a final answer (or replied without a tool call)."""
    MAX_TURNS = "max_turns"
    """The turn limit (possibly set by a curriculum) was reached."""
    TOKEN_BUDGET = "token_budget"
    """The episode's token budget ran out (context or generation length)."""
    ENV_ERROR = "env_error"
    """An exception in this episode's env step, tool, rendering or serialization ended it (the
    message is in ``Episode.info["error"]``); the rest of the batch went on. Kept for inspection,
    never for training."""
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
        # Not dataclasses.asdict: it deep-copies tool-call arguments recursively.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
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

    def to_dict(self) -> dict[str, Any]:
        # Shallow list copies: dataclasses.asdict deep-copies every token id (slow).
        return {
            "tokens": list(self.tokens),
            "logprobs": list(self.logprobs),
            "mask": list(self.mask),
            "prompt_len": self.prompt_len,
        }

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


@dataclass(eq=False)
class TeacherScores:
    """What the teacher hands the learner for one segment: its view of every sampled token.

    The fields are numpy arrays (lists are converted on construction), aligned on their first
    axis: entry ``i`` belongs to token ``positions_M[i]`` of the segment, and ``positions_M``
    are exactly the segment's mask-1 positions, in order. The learner gathers them into a step's
    :class:`~agentopd.batch.TokenBatch` (:meth:`~agentopd.batch.TokenBatch.with_teacher`); the
    replay store writes them as they are. In JSON (:meth:`to_dict`) each field is a list under
    its name without the shape suffix (``positions``, ``logprobs``, ``topk_ids``, ...).

    Example::

        scores = TeacherScores(positions_M=[5, 6], logprobs_M=[-0.1, -2.3],
                               topk_ids_M_K=[[7, 9], [4, 7]],
                               topk_logprobs_M_K=[[-0.1, -2.5], [-0.4, -1.2]],
                               entropy_M=[0.3, 1.1])
        assert scores.k == 2 and len(scores) == 2
    """

    positions_M: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """int64: indices into ``Segment.tokens`` of the scored (mask-1) tokens."""
    logprobs_M: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """float32: teacher log-probability of the token the student sampled, per position."""
    topk_ids_M_K: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    """int64: the teacher's top-k token ids per position, most likely first."""
    topk_logprobs_M_K: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    """float32: teacher log-probabilities at ``topk_ids_M_K``."""
    entropy_M: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """float32: entropy (nats) of the teacher's full next-token distribution per position."""
    hidden_M_H: Any = field(default=None, repr=False)
    """Training-time only: the teacher's final hidden states at ``positions_M`` (a ``[M, H]``
    tensor on the teacher's device), from which the learner projects the teacher's full
    distribution (the full-vocabulary objectives, ``diag/true_rkl``). Only an in-process
    teacher that was asked to keep them sets it; never serialized (:meth:`to_dict` leaves it
    out) and dropped once the step used it (:func:`drop_teacher_hidden`)."""

    def __post_init__(self) -> None:
        for name, (dtype, ndim) in _SCORE_DTYPES.items():
            a: np.ndarray = np.asarray(getattr(self, name), dtype=dtype)
            if ndim == 2 and a.ndim == 1 and a.size == 0:
                a = a.reshape(0, 0)
            setattr(self, name, a)

    def __len__(self) -> int:
        return len(self.positions_M)

    def __eq__(self, other: object) -> bool:
        """Same arrays (NaN equal to NaN); the hidden states are not compared."""
        if not isinstance(other, TeacherScores):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, n), getattr(other, n), equal_nan=n not in _INT_SCORES)
            for n in _SCORE_DTYPES
        )

    @property
    def k(self) -> int:
        """Number of top-k entries per position (0 when nothing was scored)."""
        return int(self.topk_ids_M_K.shape[1]) if self.topk_ids_M_K.ndim == 2 else 0

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored fields by their JSON names (``positions``, ``logprobs``, ...)."""
        return {_json_name(n): getattr(self, n) for n in _SCORE_DTYPES}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields as lists (the hidden states are not stored)."""
        return {k: v.tolist() for k, v in self.arrays().items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherScores:
        return cls(**{n: d.get(_json_name(n), []) for n in _SCORE_DTYPES})


_SCORE_DTYPES: dict[str, tuple[type, int]] = {
    "positions_M": (np.int64, 1),
    "logprobs_M": (np.float32, 1),
    "topk_ids_M_K": (np.int64, 2),
    "topk_logprobs_M_K": (np.float32, 2),
    "entropy_M": (np.float32, 1),
}
"""The stored fields of :class:`TeacherScores`: dtype and number of axes."""
_INT_SCORES = frozenset(n for n, (t, _) in _SCORE_DTYPES.items() if t is np.int64)


def _json_name(field_name: str) -> str:
    """A field's name without its shape suffix: ``topk_ids_M_K`` -> ``topk_ids``."""
    return field_name.split("_M")[0]


def drop_teacher_hidden(episodes: list[Episode]) -> None:
    """Release the teacher's hidden states (:attr:`TeacherScores.hidden_M_H`) of ``episodes``:
    they serve one learner step and must not outlive it."""
    for ep in episodes:
        for sc in ep.teacher or []:
            if sc is not None:
                sc.hidden_M_H = None


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
    n_prompt_messages: int = 0
    """How many of ``messages`` form the opening prompt (system, user) that ``reset`` returned."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The tool schemas the student was shown (OpenAI function format)."""
    privileged_context: str = ""
    """Context only a privileged teacher may see (``Env.privileged_context``); never rendered
    for the student."""
    replayed_turns: int = 0
    """Assistant turns replayed before the episode's first played turn (``options["replay"]``,
    e.g. ``tcod-b2f``'s expert prefix); the played turns' indices start here."""
    guided_turns: list[int] = field(default_factory=list)
    """Indices of the turns a guide (teacher or expert, ``guided-opd``) played; mask 0."""
    guide_tokens: int = 0
    """Tokens the teacher generated as a guide (teacher compute, counted by the trainer)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form extras for people and metrics (task metadata, tool-error counts, curriculum
    knobs); nothing in the training path depends on them."""
    teacher: list[TeacherScores | None] | None = None
    """Per segment: the teacher's scores of its sampled tokens (None until scored)."""

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
            "segments": [s.to_dict() for s in self.segments],
            "turns": [t.to_dict() for t in self.turns],
            "reward": self.reward,
            "success": self.success,
            "stop_reason": self.stop_reason.value,
            "n_prompt_messages": self.n_prompt_messages,
            "tools": self.tools,
            "privileged_context": self.privileged_context,
            "replayed_turns": self.replayed_turns,
            "guided_turns": self.guided_turns,
            "guide_tokens": self.guide_tokens,
            "info": self.info,
            "teacher": None
            if self.teacher is None
            else [None if t is None else t.to_dict() for t in self.teacher],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Episode:
        info: dict[str, Any] = dict(d.get("info", {}))
        teacher = d.get("teacher")
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
            n_prompt_messages=int(d.get("n_prompt_messages", 0)),
            tools=d.get("tools", []),
            privileged_context=d.get("privileged_context", ""),
            replayed_turns=int(d.get("replayed_turns", 0)),
            guided_turns=[int(i) for i in d.get("guided_turns", [])],
            guide_tokens=int(d.get("guide_tokens", 0)),
            info=info,
            teacher=None
            if teacher is None
            else [None if t is None else TeacherScores.from_dict(t) for t in teacher],
        )

    def to_json(self) -> str:
        """One JSON line, valid JSON and UTF-8 encodable, with no line break under any convention.

        Never raises, whatever the episode holds, and nothing in it can reach a recursion limit:

        * non-finite floats are written as ``{"__float__": "NaN" | "Infinity" | "-Infinity"}``,
          integers too long for ``json`` (over 4,000 digits) as ``{"__int__": "<hex>"}``;
        * containers nested deeper than ``MAX_NESTING`` (model-written tool-call arguments can be
          nested about a thousand deep) are written as ``{"__deep__": [...]}``, a flat pre-order
          listing that :meth:`from_json` rebuilds exactly, without recursion;
        * a user dict that could be mistaken for such a marker is wrapped as ``{"__dict__": {...}}``;
        * values JSON has no type for are written as their ``repr`` (tuples as lists, non-string
          keys as strings): these do not round-trip;
        * line and paragraph separators and lone surrogates are written as ``\\uXXXX`` escapes.
          Limit: a high surrogate directly followed by a low one is read back as the combined
          character (JSON cannot tell the two apart).
        """
        line = json.dumps(_encode(self.to_dict(), 0), ensure_ascii=False, allow_nan=False)
        return _UNSAFE_IN_LINE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)

    @classmethod
    def from_json(cls, line: str) -> Episode:
        """Read one line written by :meth:`to_json` (markers decoded, deep values rebuilt)."""
        return cls.from_dict(_decode(json.loads(line)))


MAX_NESTING = 64
"""Containers deeper than this inside an episode are serialized flat (see :meth:`Episode.to_json`)."""
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT_KEY, _DICT_KEY, _DEEP_KEY, _INT_KEY = "__float__", "__dict__", "__deep__", "__int__"
_MARKERS = frozenset((_FLOAT_KEY, _DICT_KEY, _DEEP_KEY, _INT_KEY))
_MAX_INT_BITS = 13_000
"""About 3,900 decimal digits: below Python's 4,300-digit limit on int/str conversion."""
# Characters json.dumps(ensure_ascii=False) leaves raw although str.splitlines() breaks on them
# (NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR) or UTF-8 cannot encode them (lone surrogates).
_UNSAFE_IN_LINE = re.compile("[\x85\u2028\u2029\ud800-\udfff]")


def _is_marker(x: dict[str, Any]) -> bool:
    return len(x) == 1 and next(iter(x)) in _MARKERS


def _scalar(x: Any) -> Any:
    """A JSON scalar (or a one-key marker dict) for a non-container value."""
    if x is None or isinstance(x, bool | str):
        return x
    if isinstance(x, int):
        return {_INT_KEY: format(x, "x")} if x.bit_length() > _MAX_INT_BITS else int(x)
    if isinstance(x, float):
        if math.isfinite(x):
            return float(x)
        return {_FLOAT_KEY: "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")}
    item = getattr(x, "item", None)  # numpy scalars
    if callable(item):
        try:
            value = item()
        except Exception:  # noqa: BLE001 - falls back to repr below
            value = None
        if isinstance(value, bool | int | float | str):
            return _scalar(value)
    try:
        return repr(x)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not lose the episode
        return f"<unprintable {type(x).__name__}>"


_MAX_PLAIN_INT = 1 << _MAX_INT_BITS
_MAX_FLOAT = sys.float_info.max


def _plain_numbers(x: list[Any] | tuple[Any, ...]) -> bool:
    """Whether every item is an ``int`` JSON can write or a finite ``float`` (no copy needed)."""
    for v in x:
        t = type(v)
        if t is int:
            if not -_MAX_PLAIN_INT < v < _MAX_PLAIN_INT:
                return False
        elif t is not float or not -_MAX_FLOAT <= v <= _MAX_FLOAT:
            return False
    return True


def _key(k: Any) -> str:
    return k if isinstance(k, str) else str(_scalar(k))


def _encode(x: Any, depth: int) -> Any:
    if isinstance(x, dict):
        if depth >= MAX_NESTING:
            return {_DEEP_KEY: _flatten(x)}
        encoded = {_key(k): _encode(v, depth + 1) for k, v in x.items()}
        return {_DICT_KEY: encoded} if _is_marker(encoded) else encoded
    if isinstance(x, list | tuple):
        if _plain_numbers(x):  # token ids, logprobs, masks: the common case, kept fast
            return x if isinstance(x, list) else list(x)
        if depth >= MAX_NESTING:
            return {_DEEP_KEY: _flatten(x)}
        return [_encode(v, depth + 1) for v in x]
    return _scalar(x)


def _flatten(root: Any) -> list[Any]:
    """Pre-order listing: ``["[", n]`` a list of n items, ``["{", keys]`` a dict, ``["=", v]`` a
    scalar (itself encoded by :func:`_scalar`). Iterative: any depth."""
    out: list[Any] = []
    todo = [root]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            out.append(["{", [_key(k) for k in x]])
            todo.extend(reversed(list(x.values())))
        elif isinstance(x, list | tuple):
            out.append(["[", len(x)])
            todo.extend(reversed(x))
        else:
            out.append(["=", _scalar(x)])
    return out


def _unflatten(flat: list[Any]) -> Any:
    """Inverse of :func:`_flatten`, iterative."""
    root: list[Any] = []
    # Each open container: (container, keys or None, how many children are still missing).
    stack: list[tuple[Any, list[str] | None, list[int]]] = [(root, None, [1])]
    for kind, arg in flat:
        if kind == "{":
            value: Any = {}
        elif kind == "[":
            value = []
        else:
            value = _decode(arg)
        parent, keys, missing = stack[-1]
        if keys is None:
            parent.append(value)
        else:
            parent[keys[len(keys) - missing[0]]] = value
        missing[0] -= 1
        while stack and stack[-1][2][0] == 0:
            stack.pop()
        if kind == "{" and arg:
            stack.append((value, list(arg), [len(arg)]))
        elif kind == "[" and arg:
            stack.append((value, None, [int(arg)]))
    return root[0]


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if _is_marker(x):
            key, value = next(iter(x.items()))
            if key == _FLOAT_KEY:
                return _NONFINITE[value]
            if key == _INT_KEY:
                return int(value, 16)
            if key == _DEEP_KEY:
                return _unflatten(value)
            return {k: _decode(v) for k, v in value.items()}
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        if _plain_numbers(x):
            return x
        return [_decode(v) for v in x]
    return x
