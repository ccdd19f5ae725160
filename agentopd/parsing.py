"""Tool-call parsing for Hermes-style output.

The model writes zero or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks,
optionally around free text. No tool call means a plain final answer. :func:`parse_assistant`
never raises: anything malformed is reported in :attr:`Parsed.error` so the environment can tell
the model what went wrong.

Near misses (``<TOOL_CALL>``, fullwidth ``＜tool_call＞``, an invisible character or a space inside
the tag, ``<tool-call>``) are not calls, but with ``near_miss="error"`` (the default) they are not
taken as a final answer either: the turn gets a parse error whose hint shows the exact markup.
``near_miss="answer"`` keeps the literal reading (such text is a plain answer).

Time is linear in the length of the turn: parsing stops after :data:`MAX_CALLS_PER_TURN` calls or
as many malformed blocks (each costs at most one pass over the turn), and only the first error is
reported.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

from agentopd.types import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS_PER_TURN = 16
NearMiss = Literal["error", "answer"]
NEAR_MISS_POLICIES = ("error", "answer")
# After NFKC (fullwidth -> ASCII), dropping invisible format characters and casefolding: a tag
# that reads as a tool-call tag. Bounded repetitions keep the search linear.
_NEAR_MISS = re.compile(r"<\s{0,3}/?\s{0,3}tool[\s_\-.]{0,3}calls?\s{0,3}>")
_FORMAT_CHARS = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
)
"""Invisible format characters (Unicode category Cf) that can hide inside a tag."""


@dataclass
class Parsed:
    """Result of parsing one assistant turn."""

    content: str
    """Text outside the tool-call blocks, stripped."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """Well-formed calls, in order."""
    error: str | None = None
    """Human-readable description of the first malformed call, if any."""

    @property
    def is_final_answer(self) -> bool:
        return not self.tool_calls and self.error is None


def format_tool_call(name: str, arguments: dict, *, json_kwargs: dict | None = None) -> str:
    """Render one call the way the model is expected to write it."""
    payload = json.dumps({"name": name, "arguments": arguments}, **(json_kwargs or {}))
    return f"{OPEN}{payload}{CLOSE}"


def parse_assistant(text: str, *, near_miss: NearMiss = "error") -> Parsed:
    """Split assistant text into free text and tool calls. Never raises.

    Args:
        text: The assistant turn as sampled.
        near_miss: ``"error"``: text with no exact tag but a near-miss tag (see the module
            docstring) gets a parse error with a hint; ``"answer"``: it is a plain answer.
    """
    if near_miss not in NEAR_MISS_POLICIES:
        raise ValueError(f"near_miss must be one of {NEAR_MISS_POLICIES}, got {near_miss!r}")
    try:
        parsed = _parse(text)
        if near_miss == "error" and parsed.is_final_answer:
            tag = near_miss_tag(parsed.content)
            if tag is not None:
                what = (
                    f"a tag that reads as {tag!r} but holds fullwidth, invisible or other "
                    "look-alike characters"
                    if tag in (OPEN, CLOSE)
                    else f"{tag!r}"
                )
                parsed.error = (
                    f"{what} looks like a tool-call tag but is not one, so nothing was run; "
                    f'write exactly {OPEN}{{"name": ..., "arguments": {{...}}}}{CLOSE} '
                    "(lowercase ASCII, no spaces or invisible characters in the tags)"
                )
        return parsed
    except Exception as e:  # noqa: BLE001 - the parser must never crash an episode
        return Parsed(
            content=str(text), error=f"could not parse the turn ({type(e).__name__}: {e})"
        )


def near_miss_tag(text: str) -> str | None:
    """The first near-miss tool-call tag in ``text``, or ``None``.

    A near miss reads as a tool-call tag after NFKC normalization (fullwidth brackets and
    letters), removal of invisible format characters (zero-width space, joiners, ...) and
    casefolding. It is returned as written when ``text`` is ASCII, else as normalized. Call it on
    text that holds no exact tag (an exact tag matches too). Linear time, C speed.
    """
    if text.isascii():
        m = _NEAR_MISS.search(text.lower())
        return text[m.start() : m.end()] if m else None
    folded = _FORMAT_CHARS.sub("", unicodedata.normalize("NFKC", text)).casefold()
    m = _NEAR_MISS.search(folded)
    return m.group() if m else None


def _parse(text: str) -> Parsed:
    if not isinstance(text, str):
        return Parsed(content="", error=f"expected text, got {type(text).__name__}")
    calls: list[ToolCall] = []
    errors: list[str] = []
    outside: list[str] = []
    unbalanced = False
    pos = i = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            outside.append(text[pos:])
            break
        outside.append(text[pos:start])
        block = _next_block(text, start + len(OPEN))
        if block is None:
            outside.append(text[start:])
            unbalanced = True
            break
        obj, body, pos = block
        if len(errors) >= MAX_CALLS_PER_TURN:  # bounded work per turn: linear time
            outside.append(text[start:])
            break
        if len(calls) >= MAX_CALLS_PER_TURN:
            errors.append(f"too many tool calls in one turn (at most {MAX_CALLS_PER_TURN})")
            outside.append(text[pos:])
            break
        call, problem = _to_call(obj, body, i)
        if call is not None:
            calls.append(call)
        else:
            errors.append(problem)
        i += 1
    rest = "".join(outside)
    if not errors and (unbalanced or CLOSE in rest):
        errors.append(
            f"unbalanced {OPEN} / {CLOSE} tags; write each call as "
            f'{OPEN}{{"name": ..., "arguments": {{...}}}}{CLOSE}'
        )
    return Parsed(content=rest.strip(), tool_calls=calls, error=errors[0] if errors else None)


_DECODER = json.JSONDecoder()
_NOT_JSON = object()


def _next_block(text: str, body_start: int) -> tuple[Any, str, int] | None:
    """The block whose body starts at ``body_start``: (decoded object or error text, body, end).

    The body is first read as one JSON value followed by the closing tag, so strings holding
    ``</tool_call>`` survive; otherwise it runs to the next closing tag. ``None``: no closing tag.
    """
    j = _skip_ws(text, body_start)
    try:
        obj, after = _DECODER.raw_decode(text, j)
    except (ValueError, RecursionError):
        pass
    else:
        k = _skip_ws(text, after)
        if text.startswith(CLOSE, k):
            return obj, text[body_start:k], k + len(CLOSE)
    close = text.find(CLOSE, body_start)
    if close < 0:
        return None
    body = text[body_start:close]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        obj = (_NOT_JSON, e.msg)
    except (ValueError, RecursionError) as e:
        obj = (_NOT_JSON, "nesting too deep" if isinstance(e, RecursionError) else str(e))
    return obj, body, close + len(CLOSE)


def _to_call(obj: Any, body: str, i: int) -> tuple[ToolCall | None, str]:
    body = body.strip()
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] is _NOT_JSON:
        return None, f"tool call {i + 1} is not valid JSON ({obj[1]}): {_clip(body)}"
    if not isinstance(obj, dict):
        return None, (
            f"tool call {i + 1} must be a JSON object with 'name' and 'arguments', "
            f"got {_clip(body)}"
        )
    name = obj.get("name")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            pass
    if not isinstance(name, str) or not name:
        return None, f"tool call {i + 1} has no string 'name': {_clip(body)}"
    if not isinstance(args, dict):
        return None, (
            f"tool call {i + 1}: 'arguments' must be a JSON object, "
            f"got {type(args).__name__}: {_clip(body)}"
        )
    return ToolCall(name=name, arguments=args, id=f"call_{i}"), ""


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _clip(s: str, n: int = 120) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."
