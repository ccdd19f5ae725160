"""Tool-call parsing for Hermes-style output.

The model writes zero or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks,
optionally around free text. No tool call means a plain final answer. :func:`parse_assistant`
never raises: anything malformed is reported in :attr:`Parsed.error` so the environment can tell
the model what went wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from agentopd.types import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)
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
        return Parsed(content=str(text), error=f"could not parse the turn ({type(e).__name__}: {e})")


def _parse(text: str) -> Parsed:
    if not isinstance(text, str):
        return Parsed(content="", error=f"expected text, got {type(text).__name__}")
    calls: list[ToolCall] = []
    error: str | None = None
    for i, m in enumerate(_BLOCK.finditer(text)):
        if len(calls) >= MAX_CALLS_PER_TURN:
            error = error or f"too many tool calls in one turn (at most {MAX_CALLS_PER_TURN})"
            break
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nesting too deep"
            error = error or f"tool call {i + 1} is not valid JSON ({msg}): {_clip(body)}"
            continue
        if not isinstance(obj, dict):
            error = error or f"tool call {i + 1} must be a JSON object with 'name' and 'arguments', got {_clip(body)}"
            continue
        name = obj.get("name")
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, RecursionError):
                pass
        if not isinstance(name, str) or not name:
            error = error or f"tool call {i + 1} has no string 'name': {_clip(body)}"
            continue
        if not isinstance(args, dict):
            error = error or f"tool call {i + 1}: 'arguments' must be a JSON object, got {_clip(json.dumps(args))}"
            continue
        calls.append(ToolCall(name=name, arguments=args, id=f"call_{i}"))
    outside = _BLOCK.sub("", text)
    if error is None and (OPEN in outside or CLOSE in outside):
        error = f"unbalanced {OPEN} / {CLOSE} tags; write each call as {OPEN}{{\"name\": ..., \"arguments\": {{...}}}}{CLOSE}"
    return Parsed(content=outside.strip(), tool_calls=calls, error=error)


def _clip(s: str, n: int = 120) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."
