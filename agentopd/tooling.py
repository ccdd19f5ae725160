"""Tools: ``@tool`` turns a typed, documented function into an OpenAI-style function schema, and a
:class:`Toolset` validates arguments with jsonschema and dispatches calls.

Every failure becomes a tool-result message that tells the model what went wrong, never an
exception: the episode goes on and the failure kind is counted as ``tool_error/<kind>``.
Kinds: ``parse`` (unparseable call, counted by the rollout), ``unknown_tool``, ``schema``,
``exception``, ``timeout``, ``oversize``.

Example::

    @tool
    def lookup(key: str) -> str:
        \"\"\"Look up a key in the store.

        Args:
            key: The key to look up.
        \"\"\"
        return store[key]

    tools = Toolset([lookup])
    result = tools.call(ToolCall("lookup", {"key": "a"}))
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import re
import threading
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from agentopd.renderer import valid_utf8
from agentopd.types import Message, ToolCall

TRUNCATION_MARKER = "\n[... output truncated: {dropped} more characters not shown ...]"
"""The note appended to clipped text. Sandboxes use it too, so that clipping text that already
holds a note reports the total: the note's count plus the characters cut around it."""
_TRUNCATION_NOTE = re.compile(
    r"\n\[\.\.\. output truncated: (\d{1,15}) more (?:characters|bytes) not shown \.\.\.\]"
)

_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_type(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _PY_TO_JSON:
        return {"type": _PY_TO_JSON[annotation]}
    if annotation is None or annotation is type(None):
        return {"type": "null"}
    if origin is Literal:
        kinds = {_PY_TO_JSON.get(type(a)) for a in args}
        enum: dict[str, Any] = {"enum": list(args)}
        return {"type": kinds.pop(), **enum} if len(kinds) == 1 and None not in kinds else enum
    if origin in (list, tuple) or annotation in (list, tuple):
        item = _json_type(args[0]) if args else {}
        return {"type": "array", "items": item} if item else {"type": "array"}
    if origin is dict or annotation is dict:
        value = _json_type(args[1]) if len(args) == 2 else {}
        return {"type": "object", "additionalProperties": value} if value else {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        nullable = len(non_none) < len(args)
        if len(non_none) == 1:
            schema = _json_type(non_none[0])
            if not nullable:
                return schema
            if set(schema) == {"type"} and isinstance(schema["type"], str):
                return {"type": [schema["type"], "null"]}
            return {"anyOf": [schema, {"type": "null"}]}
        return {
            "anyOf": [_json_type(a) for a in non_none] + ([{"type": "null"}] if nullable else [])
        }
    if annotation is Any or annotation is inspect.Parameter.empty:
        return {}
    raise TypeError(
        f"unsupported tool parameter type {annotation!r}; use str, int, float, bool, list, dict or Literal"
    )


_SECTION = re.compile(
    r"^(Args|Arguments|Attributes|Examples?|Keyword Args|Keyword Arguments|Notes?|Raises|"
    r"References|Returns|See Also|Todo|Warnings?|Yields):\s*$"
)
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(\(.*?\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Google-style docstring -> (description, {arg: description}).

    In an ``Args:`` section, a line indented like the first argument starts a new argument; a
    line indented deeper continues the current one (so it may contain a colon).
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    arg_indent: int | None = None
    current: str | None = None
    for line in lines:
        header = _SECTION.match(line)
        if header:
            section, arg_indent, current = header.group(1), None, None
            continue
        if section is None:
            description.append(line)
            continue
        if (
            section not in ("Args", "Arguments", "Keyword Args", "Keyword Arguments")
            or not line.strip()
        ):
            continue
        indent = len(line) - len(line.lstrip())
        if arg_indent is None:
            arg_indent = indent
        m = _ARG_LINE.match(line.strip())
        if indent <= arg_indent and m:
            current = m.group(1).lstrip("*")
            params[current] = m.group(3).strip()
        elif current is not None:
            params[current] = (params[current] + " " + line.strip()).strip()
    return "\n".join(description).strip(), params


@dataclass
class Tool:
    """A callable tool with its JSON schema."""

    name: str
    """Name the model uses to call it."""
    fn: Callable[..., Any]
    """The Python function."""
    description: str
    """What the tool does (from the docstring)."""
    parameters: dict[str, Any]
    """JSON schema of the arguments object."""

    @property
    def schema(self) -> dict[str, Any]:
        """OpenAI-style function schema, as passed to ``apply_chat_template(tools=...)``."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Decorator: build a :class:`Tool` from a typed function and its Google-style docstring.

    Bound methods work too: decorate the method and access it on the instance.
    """

    def build(f: Callable[..., Any]) -> Tool | _ToolDescriptor:
        params = list(inspect.signature(f).parameters)
        if params and params[0] == "self":
            return _ToolDescriptor(f, name)
        return _make_tool(f, name)

    return build(fn) if fn is not None else build


def _make_tool(f: Callable[..., Any], name: str | None, skip_self: bool = False) -> Tool:
    description, arg_docs = _parse_docstring(f.__doc__ or "")
    if not description:
        raise ValueError(
            f"tool {f.__name__!r} needs a docstring: the model reads it as the tool description"
        )
    hints = typing.get_type_hints(f)
    props: dict[str, Any] = {}
    required: list[str] = []
    for i, (pname, p) in enumerate(inspect.signature(f).parameters.items()):
        if skip_self and i == 0:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {f.__name__!r}: *args/**kwargs are not allowed in tools")
        prop = _json_type(hints.get(pname, inspect.Parameter.empty))
        if pname in arg_docs:
            prop["description"] = arg_docs[pname]
        props[pname] = prop
        if p.default is inspect.Parameter.empty:
            required.append(pname)
    parameters = {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }
    return Tool(name=name or f.__name__, fn=f, description=description, parameters=parameters)


class _ToolDescriptor:
    """Makes ``@tool`` on a method give a bound :class:`Tool` per instance."""

    def __init__(self, f: Callable[..., Any], name: str | None):
        self.f = f
        self.template = _make_tool(f, name, skip_self=True)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        bound = types.MethodType(self.f, obj)
        return Tool(self.template.name, bound, self.template.description, self.template.parameters)


def _validator(schema: dict[str, Any]) -> Any:
    """A checked jsonschema validator; cached, since envs rebuild the same tools every episode."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        return _build_validator(schema)
    return _cached_validator(key)


@functools.lru_cache(maxsize=1024)
def _cached_validator(schema_json: str) -> Any:
    return _build_validator(json.loads(schema_json))


def _build_validator(schema: dict[str, Any]) -> Any:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


class _ToolTimeout(Exception):
    """Raised by :meth:`Toolset._run` only: distinct from a ``TimeoutError`` raised by the tool."""


def _safe_str(x: Any) -> str:
    try:
        return str(x)
    except Exception:  # noqa: BLE001 - a broken __str__ must not crash the episode
        return f"<unprintable {type(x).__name__}>"


class ToolError(Exception):
    """Raise from a tool to report a failure of a given kind with verbatim text for the model.

    The model sees ``text`` as the tool result; the failure is counted as ``tool_error/<kind>``.

    Example::

        raise ToolError("timeout", "the code ran past 5 s and was interrupted")
    """

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind
        self.text = text


@dataclass
class ToolResult:
    """Outcome of one call: the message for the model plus the failure kind, if any."""

    message: Message
    """The ``tool`` message handed back to the model."""
    error: str | None = None
    """``None`` on success, else the failure kind (``unknown_tool``, ``schema``, ...)."""
    value: Any = None
    """The raw Python return value on success."""


@dataclass
class Toolset:
    """A set of tools with validation, timeouts and output limits.

    Args:
        tools: The tools.
        timeout_s: Per-call wall-clock timeout (``None`` for none). A call that overruns is
            reported to the model; its thread is abandoned (tools that need hard limits run in a
            sandbox that enforces them).
        max_output_chars: Results longer than this are truncated with a visible marker.
    """

    tools: list[Tool]
    timeout_s: float | None = 30.0
    max_output_chars: int = 4000
    _by_name: dict[str, Tool] = field(init=False, repr=False)
    _validators: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {}
        self._validators = {}
        for t in self.tools:
            if not isinstance(t, Tool):
                raise TypeError(f"{t!r} is not a Tool; decorate it with @agentopd.tool")
            if t.name in self._by_name:
                raise ValueError(f"duplicate tool name {t.name!r}")
            self._by_name[t.name] = t
            self._validators[t.name] = _validator(t.parameters)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def call(self, call: ToolCall) -> ToolResult:
        """Validate and run one call; never raises for anything the model did."""

        def fail(kind: str, text: str) -> ToolResult:
            return ToolResult(
                self._message(call, self._clip(f"Error ({kind}): {text}")[0]), error=kind
            )

        tool_ = self._by_name.get(call.name) if isinstance(call.name, str) else None
        if tool_ is None:
            near = difflib.get_close_matches(str(call.name), self.names, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            return fail(
                "unknown_tool",
                f"no tool named {_safe_str(call.name)!r}.{hint} Available tools: {', '.join(self.names)}.",
            )
        if not isinstance(call.arguments, dict):
            return fail(
                "schema", f"arguments must be a JSON object, got {type(call.arguments).__name__}."
            )
        try:
            error = jsonschema.exceptions.best_match(
                self._validators[tool_.name].iter_errors(call.arguments)
            )
        except RecursionError:
            return fail("schema", f"arguments for {tool_.name!r} are nested too deeply.")
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            return fail(
                "schema", f"invalid arguments for {tool_.name!r} at {where}: {error.message}."
            )
        try:
            value = self._run(tool_, call.arguments)
        except _ToolTimeout:
            return fail("timeout", f"{tool_.name!r} did not finish within {self.timeout_s:g} s.")
        except ToolError as e:
            return ToolResult(self._message(call, self._clip(e.text)[0]), error=e.kind)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - tool bugs are reported to the model
            return fail("exception", f"{tool_.name!r} raised {type(e).__name__}: {_safe_str(e)}")
        try:
            text = (
                value
                if isinstance(value, str)
                else json.dumps(value, default=str, ensure_ascii=False)
            )
        except (TypeError, ValueError, RecursionError):
            text = _safe_str(value)
        text, truncated = self._clip(text)
        return ToolResult(
            self._message(call, text), error="oversize" if truncated else None, value=value
        )

    def _clip(self, text: str) -> tuple[str, bool]:
        """At most ``max_output_chars`` of ``text`` plus a note with the true dropped count.

        Truncation notes inside the dropped part (a sandbox already clipped its output) are not
        counted as dropped text; their own counts are added instead.
        """
        if len(text) <= self.max_output_chars:
            return text, False
        cut, inner, note_chars = self.max_output_chars, 0, 0
        for m in _TRUNCATION_NOTE.finditer(text, max(0, cut - 80)):
            if m.end() <= cut:
                continue
            cut = min(cut, m.start())
            inner += int(m.group(1))
            note_chars += len(m.group())
        dropped = len(text) - cut - note_chars + inner
        return text[:cut] + TRUNCATION_MARKER.format(dropped=dropped), True

    def _run(self, tool_: Tool, arguments: dict[str, Any]) -> Any:
        if self.timeout_s is None:
            return tool_.fn(**arguments)
        # A daemon thread, not a ThreadPoolExecutor: the executor joins its workers at interpreter
        # exit, so one tool that never returns would keep the whole process from exiting.
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = tool_.fn(**arguments)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=target, name=f"tool-{tool_.name}", daemon=True).start()
        if not done.wait(self.timeout_s):
            raise _ToolTimeout
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    @staticmethod
    def _message(call: ToolCall, text: str) -> Message:
        """The tool message, valid UTF-8 (lone surrogates become U+FFFD, visibly)."""
        return Message(
            role="tool",
            content=valid_utf8(text),
            name=valid_utf8(_safe_str(call.name)),
            tool_call_id=call.id,
        )
