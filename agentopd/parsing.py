"""Tool-call parsing for Hermes-style output.

The model writes zero or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks,
optionally around free text. No tool call means a plain final answer. :func:`parse_assistant`
never raises: anything malformed is reported in :attr:`Parsed.error` so the environment can tell
the model what went wrong.

Near misses (``<TOOL_CALL>``, fullwidth ``＜tool_call＞``, an invisible character or a space inside
the tag, ``<tool-call>``) are not calls, but with ``near_miss="error"`` (the default) they are not
taken as a final answer either: the turn gets a parse error whose hint shows the exact markup.
``near_miss="answer"`` keeps the literal reading (such text is a plain answer).

Two modes (``mode=``, the ``rollout.tool_parser`` key; see ``docs/parsing.md``):

- ``"lenient"`` (the default): a call body is read as one JSON value, so strings holding
  ``</tool_call>`` survive; a missing ``"arguments"`` is ``{}``; ``"arguments"`` given as a JSON
  string holding an object is decoded; a call without its closing tag, or a stray closing tag,
  is a parse error.
- ``"vllm-hermes"``: exactly the calls vLLM's OpenAI server extracts with its Hermes tool parser
  (``--tool-call-parser hermes``), which is what a served student's calls must pass. A block runs
  from ``<tool_call>`` to the next ``</tool_call>`` (or to the end of the turn for the last one);
  every block must be a JSON object with a string ``"name"`` and an ``"arguments"`` key, else
  the whole turn is rejected (a parse error here; behind vLLM the client gets the turn as plain
  text). ``"arguments"`` is passed through as written: a JSON string stays a string, and the
  tool answers with a schema error, as a served client would fail to dispatch it. Two
  deliberate exceptions: at most :data:`MAX_CALLS_PER_TURN` calls, and bodies nested deeper than
  :data:`MAX_JSON_DEPTH` are rejected (vLLM's own limit is Python's recursion limit minus its
  call stack, about 900-990: it depends on where it is called).

Time is linear in the length of the turn in both modes: parsing stops after
:data:`MAX_CALLS_PER_TURN` calls or as many malformed blocks (each costs at most one pass over the
turn), and only the first error is reported.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agentopd.types import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS_PER_TURN = 16
MAX_JSON_DEPTH = 512
"""Deepest container nesting of a call body that the ``vllm-hermes`` mode accepts."""
NearMiss = Literal["error", "answer"]
NEAR_MISS_POLICIES = ("error", "answer")
ParserMode = Literal["lenient", "vllm-hermes"]
PARSER_MODES = ("lenient", "vllm-hermes")
"""Values of ``parse_assistant(mode=...)`` and of the ``rollout.tool_parser`` key."""
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
    """Well-formed calls, in order. In the ``vllm-hermes`` mode ``arguments`` holds the JSON value
    as written, which need not be an object (the toolset answers a non-object with a schema
    error)."""
    error: str | None = None
    """Human-readable description of the first malformed call, if any."""

    @property
    def is_final_answer(self) -> bool:
        return not self.tool_calls and self.error is None


def format_tool_call(name: str, arguments: dict, *, json_kwargs: dict | None = None) -> str:
    """Render one call the way the model is expected to write it."""
    payload = json.dumps({"name": name, "arguments": arguments}, **(json_kwargs or {}))
    return f"{OPEN}{payload}{CLOSE}"


def parse_assistant(
    text: str, *, near_miss: NearMiss = "error", mode: ParserMode = "lenient"
) -> Parsed:
    """Split assistant text into free text and tool calls. Never raises for any ``text``.

    Args:
        text: The assistant turn as sampled.
        near_miss: ``"error"``: text with no exact tag but a near-miss tag (see the module
            docstring), or only a stray ``</tool_call>``, gets a parse error with a hint;
            ``"answer"``: it is a plain answer.
        mode: ``"lenient"`` or ``"vllm-hermes"`` (see the module docstring). With
            ``near_miss="answer"``, ``"vllm-hermes"`` gives exactly vLLM's Hermes extraction.

    Raises:
        ValueError: ``near_miss`` or ``mode`` is not one of the valid values.
    """
    if near_miss not in NEAR_MISS_POLICIES:
        raise ValueError(f"near_miss must be one of {NEAR_MISS_POLICIES}, got {near_miss!r}")
    if mode not in PARSER_MODES:
        raise ValueError(f"mode must be one of {PARSER_MODES}, got {mode!r}")
    try:
        parsed = _parse(text) if mode == "lenient" else _parse_vllm_hermes(text, near_miss)
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
        errors.append(_UNBALANCED)
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


_UNBALANCED = (
    f"unbalanced {OPEN} / {CLOSE} tags; write each call as "
    f'{OPEN}{{"name": ..., "arguments": {{...}}}}{CLOSE}'
)
_REJECTED = "vLLM's Hermes tool parser rejects the whole turn"


def _parse_vllm_hermes(text: str, near_miss: NearMiss) -> Parsed:
    """The ``vllm-hermes`` mode: the blocks of vLLM's ``<tool_call>(.*?)</tool_call>|<tool_call>(.*)``,
    each read by ``json.loads``; one bad block rejects the turn."""
    if not isinstance(text, str):
        return Parsed(content="", error=f"expected text, got {type(text).__name__}")
    if OPEN not in text:
        error = _UNBALANCED if near_miss == "error" and CLOSE in text else None
        return Parsed(content=text.strip(), error=error)
    calls: list[ToolCall] = []
    outside: list[str] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            outside.append(text[pos:])
            break
        outside.append(text[pos:start])
        body_start = start + len(OPEN)
        close = text.find(CLOSE, body_start)
        end = len(text) if close < 0 else close
        i = len(calls)
        if i >= MAX_CALLS_PER_TURN:
            return Parsed(
                content=text.strip(),
                error=f"too many tool calls in one turn (at most {MAX_CALLS_PER_TURN})",
            )
        call, problem = _hermes_call(text[body_start:end], i)
        if call is None:
            return Parsed(content=text.strip(), error=f"{problem}; {_REJECTED}")
        calls.append(call)
        if close < 0:
            break
        pos = close + len(CLOSE)
    return Parsed(content="".join(outside).strip(), tool_calls=calls)


def _hermes_call(body: str, i: int) -> tuple[ToolCall | None, str]:
    """One block as vLLM reads it: ``json.loads``, ``obj["name"]``, ``json.dumps(obj["arguments"])``."""
    where = f"tool call {i + 1}"
    # Checked on the text, before json.loads: its own limit depends on the caller's stack.
    if body.count("[") + body.count("{") > MAX_JSON_DEPTH and _nesting(body) > MAX_JSON_DEPTH:
        return None, f"{where} is nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        obj = json.loads(body)
    except RecursionError:  # only when called some 500 frames deep
        return None, f"{where} is nested deeper than {MAX_JSON_DEPTH} levels"
    except Exception as e:  # noqa: BLE001 - vLLM rejects the turn on any exception
        msg = e.msg if isinstance(e, json.JSONDecodeError) else f"{type(e).__name__}: {e}"
        return None, f"{where} is not valid JSON ({msg}): {_clip(body.strip())}"
    if not isinstance(obj, dict):
        return None, (
            f"{where} must be a JSON object with 'name' and 'arguments', got {_clip(body.strip())}"
        )
    missing = [k for k in ("name", "arguments") if k not in obj]
    if missing:
        return None, (
            f"{where} has no {' or '.join(repr(k) for k in missing)} key (write "
            f'"arguments": {{}} for a call without arguments): {_clip(body.strip())}'
        )
    if not isinstance(obj["name"], str):
        return None, f"{where}: 'name' must be a string: {_clip(body.strip())}"
    # vLLM re-encodes the arguments with json.dumps, which cannot fail at this depth.
    return ToolCall(name=obj["name"], arguments=obj["arguments"], id=f"call_{i}"), ""


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _nesting(body: str) -> int:
    """Deepest bracket nesting of ``body`` outside JSON strings (exact for valid JSON), at C
    speed: strings are dropped by a regex, the rest is a cumulative sum over code points."""
    codes = np.frombuffer(
        _JSON_STRING.sub("", body).encode("utf-32-le", "surrogatepass"), dtype=np.uint32
    )
    steps = ((codes == 91) | (codes == 123)).astype(np.int32)
    steps -= (codes == 93) | (codes == 125)
    return int(np.cumsum(steps).max(initial=0))


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _clip(s: str, n: int = 120) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."
