"""``@tool`` schema generation and ``Toolset.call``: every failure is a tool message with a kind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any, Literal

import pytest

from agentopd.tooling import TRUNCATION_MARKER, Tool, Toolset, tool
from agentopd.types import ToolCall

# ---------------------------------------------------------------- schema generation


@tool
def search(
    query: str,
    limit: int,
    threshold: float,
    exact: bool,
    tags: list[str],
    filters: dict,
    mode: Literal["fast", "slow"],
    owner: str | None = None,
    page: int = 1,
) -> str:
    """Search the catalogue.

    Longer explanation that is part of the description.

    Args:
        query: What to look for.
        limit (int): At most this many results.
        threshold: Minimum score; results below it are
            dropped. Note: scores are in [0, 1].
        exact: Exact match only.
        tags: Tags that must all be present.
        filters: Field -> value filters.
        mode: Search speed.
        owner: Only items of this owner.
        page: 1-based page number.

    Returns:
        The matches, one per line.
    """
    return f"{query}:{limit}"


def props(t: Tool) -> dict[str, Any]:
    return t.parameters["properties"]


def test_schema_types_from_hints() -> None:
    p = props(search)
    assert p["query"]["type"] == "string"
    assert p["limit"]["type"] == "integer"
    assert p["threshold"]["type"] == "number"
    assert p["exact"]["type"] == "boolean"
    assert p["tags"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": p["tags"]["description"],
    }
    assert p["filters"]["type"] == "object"
    assert p["mode"]["enum"] == ["fast", "slow"] and p["mode"]["type"] == "string"
    assert p["owner"]["type"] == ["string", "null"]
    assert p["page"]["type"] == "integer"


def test_required_and_closed_object() -> None:
    params = search.parameters
    assert params["type"] == "object"
    assert params["required"] == ["query", "limit", "threshold", "exact", "tags", "filters", "mode"]
    assert params["additionalProperties"] is False


def test_descriptions_from_google_docstring() -> None:
    assert search.description == (
        "Search the catalogue.\n\nLonger explanation that is part of the description."
    )
    p = props(search)
    assert p["query"]["description"] == "What to look for."
    assert p["limit"]["description"] == "At most this many results."
    # A continuation line holding a colon stays with its argument.
    assert p["threshold"]["description"] == (
        "Minimum score; results below it are dropped. Note: scores are in [0, 1]."
    )
    assert "Note" not in p and "Returns" not in search.description


def test_openai_style_schema() -> None:
    s = search.schema
    assert s["type"] == "function"
    assert s["function"]["name"] == "search"
    assert s["function"]["parameters"] is search.parameters


def test_tool_name_override_and_plain_call() -> None:
    @tool(name="add-numbers")
    def add(a: int, b: int = 2) -> int:
        """Add two numbers."""
        return a + b

    assert add.name == "add-numbers"
    assert add(1) == 3
    assert add.parameters["required"] == ["a"]


def test_optional_union_and_dict_of_values() -> None:
    @tool
    def f(
        x: int | str | None = None, y: dict[str, int] | None = None, z: list[int] | None = None
    ) -> str:
        """Do f."""
        return ""

    p = props(f)
    assert p["x"] == {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}
    assert p["y"] == {
        "anyOf": [{"type": "object", "additionalProperties": {"type": "integer"}}, {"type": "null"}]
    }
    assert p["z"] == {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]}
    ts = Toolset([f])
    assert ts.call(ToolCall("f", {"x": None, "y": None, "z": None})).error is None
    assert ts.call(ToolCall("f", {"y": {"a": "b"}})).error == "schema"


def test_method_tools_bind_per_instance() -> None:
    class Store:
        def __init__(self, data: dict[str, str]):
            self.data = data

        @tool
        def get(self, key: str) -> str:
            """Read a key.

            Args:
                key: The key.
            """
            return self.data[key]

    a, b = Store({"k": "A"}), Store({"k": "B"})
    assert isinstance(a.get, Tool)
    assert "self" not in props(a.get)
    assert a.get.parameters["required"] == ["key"]
    assert Toolset([a.get]).call(ToolCall("get", {"key": "k"})).value == "A"
    assert Toolset([b.get]).call(ToolCall("get", {"key": "k"})).value == "B"


def test_missing_docstring_is_an_error() -> None:
    with pytest.raises(ValueError, match="docstring"):

        @tool
        def nodoc(x: int) -> int:
            return x


def test_unsupported_type_and_varargs_are_errors() -> None:
    with pytest.raises(TypeError, match="unsupported"):

        @tool
        def bad(x: set) -> None:
            """Bad."""

    with pytest.raises(TypeError, match=r"\*args"):

        @tool
        def star(*xs: int) -> None:
            """Star."""


def test_toolset_rejects_non_tools_and_duplicates() -> None:
    with pytest.raises(TypeError, match="@agentopd.tool"):
        Toolset([lambda: None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="duplicate"):
        Toolset([search, search])


# ---------------------------------------------------------------- Toolset.call


@tool
def echo(text: str) -> str:
    """Echo text back."""
    return text


@tool
def boom(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"kaput {x}")


@tool
def slow(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "woke"


@tool
def inner_timeout() -> str:
    """Raise a TimeoutError of its own."""
    raise TimeoutError("database did not answer")


@tool
def exits() -> str:
    """Call sys.exit."""
    sys.exit(3)


@tool
def structured(n: int) -> dict:
    """Return a structure."""
    return {"n": n, "city": "Zürich"}


@tool
def odd_value() -> dict:
    """Return something json cannot encode."""
    return {(1, 2): "tuple key"}


@pytest.fixture
def toolset() -> Toolset:
    return Toolset(
        [echo, boom, slow, inner_timeout, exits, structured, odd_value, search],
        timeout_s=0.3,
        max_output_chars=300,
    )


def test_success_returns_the_value(toolset: Toolset) -> None:
    r = toolset.call(ToolCall("echo", {"text": "hi"}, id="c1"))
    assert r.error is None and r.value == "hi"
    assert r.message.role == "tool" and r.message.content == "hi"
    assert r.message.name == "echo" and r.message.tool_call_id == "c1"


def test_structured_values_are_json_without_ascii_escapes(toolset: Toolset) -> None:
    r = toolset.call(ToolCall("structured", {"n": 3}))
    assert r.error is None and r.value == {"n": 3, "city": "Zürich"}
    assert r.message.content == '{"n": 3, "city": "Zürich"}'


def test_unserialisable_value_does_not_raise(toolset: Toolset) -> None:
    r = toolset.call(ToolCall("odd_value", {}))
    assert r.error is None and "tuple key" in r.message.content


def test_unknown_tool_suggests_nearest(toolset: Toolset) -> None:
    r = toolset.call(ToolCall("ecko", {"text": "hi"}))
    assert r.error == "unknown_tool"
    assert "Did you mean 'echo'?" in r.message.content
    assert "Error (unknown_tool)" in r.message.content
    far = toolset.call(ToolCall("zzzzzzzz", {}))
    assert far.error == "unknown_tool" and "Did you mean" not in far.message.content


def test_unhashable_tool_name_is_unknown_tool(toolset: Toolset) -> None:
    r = toolset.call(ToolCall(["echo"], {}))  # type: ignore[arg-type]
    assert r.error == "unknown_tool"


@pytest.mark.parametrize(
    "arguments, where",
    [
        ({}, "text"),  # missing required
        ({"text": 3}, "text"),  # wrong type
        ({"text": "a", "extra": 1}, "extra"),  # not in the schema
    ],
)
def test_schema_violation(toolset: Toolset, arguments: dict[str, Any], where: str) -> None:
    r = toolset.call(ToolCall("echo", arguments))
    assert r.error == "schema" and r.value is None
    assert r.message.content.startswith("Error (schema)") and where in r.message.content


def test_non_object_arguments_are_schema_errors(toolset: Toolset) -> None:
    r = toolset.call(ToolCall("echo", ["hi"]))  # type: ignore[arg-type]
    assert r.error == "schema" and "JSON object" in r.message.content


def test_bool_is_not_an_integer(toolset: Toolset) -> None:
    assert toolset.call(ToolCall("boom", {"x": True})).error == "schema"


def test_exception_inside_tool(toolset: Toolset) -> None:
    r = toolset.call(ToolCall("boom", {"x": 7}))
    assert r.error == "exception"
    assert "RuntimeError" in r.message.content and "kaput 7" in r.message.content


def test_tool_raising_timeouterror_is_an_exception_not_a_timeout(toolset: Toolset) -> None:
    r = toolset.call(ToolCall("inner_timeout", {}))
    assert r.error == "exception" and "database did not answer" in r.message.content


def test_sys_exit_inside_tool_is_an_exception(toolset: Toolset) -> None:
    assert toolset.call(ToolCall("exits", {})).error == "exception"
    no_timeout = Toolset([exits], timeout_s=None)
    assert no_timeout.call(ToolCall("exits", {})).error == "exception"


def test_timeout_returns_promptly(toolset: Toolset) -> None:
    t0 = time.monotonic()
    r = toolset.call(ToolCall("slow", {"seconds": 5.0}))
    elapsed = time.monotonic() - t0
    assert r.error == "timeout" and "0.3 s" in r.message.content
    assert elapsed < 0.3 + 0.5
    assert toolset.call(ToolCall("slow", {"seconds": 0.0})).value == "woke"


def test_hung_tool_does_not_block_interpreter_exit() -> None:
    code = textwrap.dedent(
        """
        import time
        from agentopd.tooling import Toolset, tool
        from agentopd.types import ToolCall

        @tool
        def hang() -> str:
            \"\"\"Never returns in time.\"\"\"
            time.sleep(60)
            return "late"

        r = Toolset([hang], timeout_s=0.1).call(ToolCall("hang", {}))
        assert r.error == "timeout", r
        print("done")
        """
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert time.monotonic() - t0 < 20


def test_oversize_is_truncated_with_marker() -> None:
    toolset = Toolset([echo], max_output_chars=50)
    r = toolset.call(ToolCall("echo", {"text": "x" * 120}))
    assert r.error == "oversize" and r.value == "x" * 120
    assert r.message.content == "x" * 50 + TRUNCATION_MARKER.format(dropped=70)
    assert "output truncated: 70 more characters" in r.message.content
    exact = toolset.call(ToolCall("echo", {"text": "y" * 50}))
    assert exact.error is None and exact.message.content == "y" * 50


def test_error_messages_respect_the_output_limit() -> None:
    toolset = Toolset([echo], max_output_chars=50)
    r = toolset.call(ToolCall("echo", {"text": 1, "z" * 5000: 1}))
    assert r.error == "schema"
    assert len(r.message.content) <= 50 + len(TRUNCATION_MARKER.format(dropped=10**6))


def test_names_schemas_and_contains(toolset: Toolset) -> None:
    assert toolset.names[:2] == ["echo", "boom"]
    assert "echo" in toolset and "nope" not in toolset
    assert [s["function"]["name"] for s in toolset.schemas] == toolset.names
