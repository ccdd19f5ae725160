"""Tool-call parsing for Hermes-style output.

The model writes zero or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks,
optionally around free text. No tool call means a plain final answer. :func:`parse_assistant`
never raises: anything malformed is reported in :attr:`Parsed.error` so the environment can tell
the model what went wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agentopd.types import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS_PER_TURN = 16


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


def parse_assistant(text: str) -> Parsed:
    """Split assistant text into free text and tool calls. Never raises."""
    try:
        return _parse(text)
    except Exception as e:  # noqa: BLE001 - the parser must never crash an episode
        return Parsed(
            content=str(text), error=f"could not parse the turn ({type(e).__name__}: {e})"
        )


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
