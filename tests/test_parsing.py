"""Hermes tool-call parsing: unit cases and a fuzz over garbage and near-miss calls.

The fuzz runs at least 10,000 examples: ``parse_assistant`` must never raise, and a well-formed
call must come back exactly. ``Env.step`` of a tiny env is fuzzed the same way. The
``vllm-hermes`` mode gets its own unit cases (each way it reads a turn differently from the
default) and a fuzz; ``tests/test_parser_parity.py`` compares it with vLLM's own parser.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentopd.env import Env, Task
from agentopd.parsing import (
    CLOSE,
    MAX_CALLS_PER_TURN,
    MAX_JSON_DEPTH,
    OPEN,
    Parsed,
    format_tool_call,
    parse_assistant,
)
from agentopd.tooling import Tool, tool
from agentopd.types import Message

# ---------------------------------------------------------------- unit cases


def test_plain_final_answer() -> None:
    p = parse_assistant("  The answer is 42.  ")
    assert p == Parsed(content="The answer is 42.", tool_calls=[], error=None)
    assert p.is_final_answer


def test_several_calls_with_text_around() -> None:
    text = (
        "Let me look. "
        + format_tool_call("lookup", {"key": "a"})
        + "\nand\n"
        + format_tool_call(
            "add", {"x": 1, "y": [1.5, None, {"z": True}]}, json_kwargs={"indent": 2}
        )
        + " done"
    )
    p = parse_assistant(text)
    assert p.error is None and not p.is_final_answer
    assert [(c.name, c.arguments) for c in p.tool_calls] == [
        ("lookup", {"key": "a"}),
        ("add", {"x": 1, "y": [1.5, None, {"z": True}]}),
    ]
    assert [c.id for c in p.tool_calls] == ["call_0", "call_1"]
    assert p.content == "Let me look. \nand\n done"


def test_whitespace_inside_tags_and_missing_arguments() -> None:
    p = parse_assistant(f'{OPEN}\n  {{"name": "ping"}}  \n{CLOSE}')
    assert p.error is None and p.tool_calls[0].name == "ping" and p.tool_calls[0].arguments == {}


def test_arguments_as_json_string() -> None:
    body = json.dumps({"name": "lookup", "arguments": json.dumps({"key": "b", "n": [1, 2]})})
    p = parse_assistant(OPEN + body + CLOSE)
    assert p.error is None
    assert p.tool_calls[0].arguments == {"key": "b", "n": [1, 2]}


def test_arguments_string_that_is_not_an_object() -> None:
    p = parse_assistant(OPEN + json.dumps({"name": "f", "arguments": "not json"}) + CLOSE)
    assert p.tool_calls == [] and "'arguments' must be a JSON object" in p.error


def test_close_tag_inside_a_string_argument() -> None:
    args = {"code": f"print('{CLOSE}')", "note": f"{OPEN} nested"}
    p = parse_assistant("x " + format_tool_call("run", args) + " y")
    assert p.error is None
    assert p.tool_calls[0].arguments == args
    assert p.content == "x  y"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (f'{OPEN}{{"name": "f", "arguments": {{}}}}', "unbalanced"),
        (f'{{"name": "f"}}{CLOSE}', "unbalanced"),
        (f"{OPEN}[1, 2]{CLOSE}", "must be a JSON object"),
        (f'{OPEN}"just a string"{CLOSE}', "must be a JSON object"),
        (f"{OPEN}{{'name': 'f'}}{CLOSE}", "not valid JSON"),
        (f'{OPEN}{{"name": "f", "arguments": {{}}{CLOSE}', "not valid JSON"),
        (f'{OPEN}{{"arguments": {{}}}}{CLOSE}', "no string 'name'"),
        (f'{OPEN}{{"name": 3, "arguments": {{}}}}{CLOSE}', "no string 'name'"),
        (f'{OPEN}{{"name": "", "arguments": {{}}}}{CLOSE}', "no string 'name'"),
        (f'{OPEN}{{"name": "f", "arguments": [1]}}{CLOSE}', "'arguments' must be a JSON object"),
        (f"{OPEN}{'[' * 100_000}{CLOSE}", "nesting too deep"),
        (f"{OPEN}{'1' * 5000}{CLOSE}", "not valid JSON"),
        (f"{OPEN}{CLOSE}", "not valid JSON"),
    ],
)
def test_malformed_calls_are_reported(text: str, fragment: str) -> None:
    p = parse_assistant(text)
    assert p.error is not None and fragment in p.error
    assert not p.is_final_answer


def test_one_bad_block_does_not_hide_the_good_ones() -> None:
    text = format_tool_call("a", {}) + f"{OPEN}{{oops{CLOSE}" + format_tool_call("b", {"k": 1})
    p = parse_assistant(text)
    assert [c.name for c in p.tool_calls] == ["a", "b"]
    assert "tool call 2 is not valid JSON" in p.error


def test_too_many_calls() -> None:
    text = "".join(format_tool_call("f", {"i": i}) for i in range(MAX_CALLS_PER_TURN + 3))
    p = parse_assistant(text)
    assert len(p.tool_calls) == MAX_CALLS_PER_TURN and "too many tool calls" in p.error


def test_non_text_input() -> None:
    p = parse_assistant(None)  # type: ignore[arg-type]
    assert p.error is not None and p.tool_calls == []


def test_error_text_is_clipped() -> None:
    p = parse_assistant(f"{OPEN}{{{'x' * 10_000}{CLOSE}")
    assert p.error is not None and len(p.error) < 400


# ---------------------------------------------------------------- the vllm-hermes mode


def hermes(text: str, near_miss: str = "answer") -> Parsed:
    return parse_assistant(text, near_miss=near_miss, mode="vllm-hermes")  # type: ignore[arg-type]


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        parse_assistant("x", mode="strict")  # type: ignore[arg-type]


def test_hermes_close_tag_inside_a_string_rejects_the_turn() -> None:
    p = hermes(format_tool_call("a", {}) + format_tool_call("run", {"code": f"print('{CLOSE}')"}))
    assert p.tool_calls == [] and "tool call 2 is not valid JSON" in p.error
    assert "rejects the whole turn" in p.error


def test_hermes_missing_arguments_rejects_the_turn() -> None:
    p = hermes(f'{OPEN}{{"name": "ping"}}{CLOSE}')
    assert p.tool_calls == [] and "no 'arguments' key" in p.error
    p = hermes(f'{OPEN}{{"arguments": {{}}}}{CLOSE}')
    assert p.tool_calls == [] and "no 'name' key" in p.error


@pytest.mark.parametrize("args", [json.dumps({"key": "b"}), "not json", [1], 3, None, True])
def test_hermes_passes_arguments_through_as_written(args: Any) -> None:
    p = hermes(OPEN + json.dumps({"name": "f", "arguments": args}) + CLOSE)
    assert p.error is None and p.tool_calls[0].arguments == args


def test_hermes_last_call_may_lack_its_closing_tag() -> None:
    text = format_tool_call("a", {"k": 1}) + f' then {OPEN}{{"name": "b", "arguments": {{}}}}\n'
    p = hermes(text)
    assert p.error is None and [(c.name, c.arguments) for c in p.tool_calls] == [
        ("a", {"k": 1}),
        ("b", {}),
    ]
    assert p.content == "then"
    assert "not valid JSON" in hermes(f'{OPEN}{{"name": "b", "arguments": {{}}}} thanks').error


def test_hermes_ignores_stray_closing_tags_after_a_call() -> None:
    p = hermes(format_tool_call("a", {}) + f" {CLOSE}")
    assert p.error is None and [c.name for c in p.tool_calls] == ["a"]


def test_hermes_text_without_an_opening_tag() -> None:
    assert hermes(f"done {CLOSE}").is_final_answer
    assert "unbalanced" in hermes(f"done {CLOSE}", near_miss="error").error
    assert "looks like a tool-call tag" in hermes("<TOOL_CALL>{}</TOOL_CALL>", "error").error
    assert hermes("<TOOL_CALL>{}</TOOL_CALL>").is_final_answer


@pytest.mark.parametrize(
    "text, fragment",
    [
        (f"{OPEN}{CLOSE}", "not valid JSON"),
        (f"{OPEN}[1, 2]{CLOSE}", "must be a JSON object"),
        (f"{OPEN}{{'name': 'f', 'arguments': {{}}}}{CLOSE}", "not valid JSON"),
        (f'{OPEN}{{"name": 3, "arguments": {{}}}}{CLOSE}', "'name' must be a string"),
        (OPEN + format_tool_call("f", {}), "not valid JSON"),  # nested opening tag
        (format_tool_call("a", {}) + f"{OPEN}{{oops{CLOSE}", "tool call 2 is not valid JSON"),
        (f"{OPEN}{'1' * 5000}{CLOSE}", "not valid JSON"),  # Python's int digit limit
        (f'{OPEN}{{"name": "f", "arguments": {"[" * 600 + "]" * 600}}}{CLOSE}', "deeper than"),
        (f"{OPEN}{'[' * 100_000}{CLOSE}", "deeper than"),
        ("".join(format_tool_call("f", {}) for _ in range(MAX_CALLS_PER_TURN + 1)), "too many"),
    ],
)
def test_hermes_rejects_the_whole_turn(text: str, fragment: str) -> None:
    p = hermes(text)
    assert p.tool_calls == [] and p.error is not None and fragment in p.error, p.error


def test_hermes_accepts_what_vllm_accepts() -> None:
    depth = MAX_JSON_DEPTH - 2  # the call object and the arguments object are two levels
    deep = json.loads("[" * depth + "]" * depth)
    for name, args in [("", {}), ("f", {"x": float("nan")}), ("f", {"x": "\ud800 <|im_end|>"})]:
        p = hermes(OPEN + json.dumps({"name": name, "arguments": args}) + CLOSE)
        assert p.error is None and p.tool_calls[0].name == name
    p = hermes(OPEN + json.dumps({"name": "f", "arguments": {"x": deep}}) + CLOSE)
    assert p.error is None
    p = hermes(OPEN + '{"name": "f", "name": "g", "arguments": {"a": 1}, "extra": 0}' + CLOSE)
    assert p.error is None and p.tool_calls[0].name == "g"


@pytest.mark.parametrize(
    "text",
    [
        f"{OPEN}\n{CLOSE}\n" * 80_000,
        OPEN * 180_000,
        CLOSE * 160_000,
        f'{OPEN}{{"a": ' * 110_000,
        f'{OPEN}"' * 160_000,
        format_tool_call("f", {"x": [[0]] * 100_000}),  # many brackets: the depth check runs
        format_tool_call("f", {"x": "y" * 2_000_000}),
        OPEN + "[" * 2_000_000,
    ],
    ids=["empty", "unclosed", "stray", "json", "strings", "brackets", "huge", "deep"],
)
def test_hermes_is_linear_in_the_turn_length(text: str) -> None:
    t0 = time.perf_counter()
    p = hermes(text)
    assert time.perf_counter() - t0 < 1.0, len(text)  # 0.5-2 MB; tens of ms when idle
    assert isinstance(p, Parsed)


# ---------------------------------------------------------------- fuzz strategies

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(), inner, max_size=3)
    ),
    max_leaves=8,
)
json_args = st.dictionaries(st.text(max_size=10), json_value, max_size=4)
names = st.text(min_size=1, max_size=20)
# Cheaper arguments for the 10,000-example fuzz: one level of nesting is enough to damage.
flat_args = st.dictionaries(
    st.text(max_size=8), st.one_of(json_leaf, st.lists(json_leaf, max_size=3)), max_size=3
)
free_text = st.text(max_size=30).filter(lambda s: OPEN not in s and CLOSE not in s)
lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@st.composite
def near_miss(draw: st.DrawFn) -> str:
    """An almost-valid tool call, damaged in one of many ways."""
    body = json.dumps({"name": draw(names), "arguments": draw(flat_args)})
    damage = draw(
        st.sampled_from(
            [
                "truncate",
                "single_quotes",
                "extra_brace",
                "missing_brace",
                "junk_inside",
                "deep_nesting",
                "surrogate",
                "drop_close",
                "drop_open",
                "double_open",
                "swap_tags",
                "unicode_tags",
                "non_object",
                "string_args",
            ]
        )
    )
    if damage == "truncate":
        body = body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    elif damage == "single_quotes":
        body = body.replace('"', "'")
    elif damage == "extra_brace":
        body = body + "}" * draw(st.integers(1, 3))
    elif damage == "missing_brace":
        body = body[:-1]
    elif damage == "junk_inside":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.text(max_size=10)) + body[at:]
    elif damage == "deep_nesting":
        depth = draw(st.integers(500, 5_000))
        body = '{"name": "f", "arguments": ' + "[" * depth + "]" * draw(st.integers(0, depth)) + "}"
    elif damage == "surrogate":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(lone_surrogates) + body[at:]
    elif damage == "non_object":
        body = json.dumps(draw(st.one_of(json_leaf, st.lists(json_leaf, max_size=3))))
    elif damage == "string_args":
        body = json.dumps({"name": draw(names), "arguments": draw(st.text(max_size=20))})
    text = OPEN + body + CLOSE
    if damage == "drop_close":
        text = OPEN + body
    elif damage == "drop_open":
        text = body + CLOSE
    elif damage == "double_open":
        text = OPEN + OPEN + body + CLOSE
    elif damage == "swap_tags":
        text = CLOSE + body + OPEN
    elif damage == "unicode_tags":
        text = "<tool_cаll>" + body + "</tool_cаll>"  # Cyrillic a
    return draw(free_text) + text + draw(free_text)


@st.composite
def wellformed_turn(draw: st.DrawFn) -> tuple[str, list[tuple[str, dict[str, Any]]], str]:
    calls = draw(st.lists(st.tuples(names, json_args), max_size=4))
    pieces = [draw(free_text)]
    for name, args in calls:
        indent = draw(st.sampled_from([None, 1]))
        pieces.append(format_tool_call(name, args, json_kwargs={"indent": indent}))
        pieces.append(draw(free_text))
    return "".join(pieces), calls, "".join(pieces[::2])


any_text = st.one_of(
    st.text(max_size=100),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=50),
    st.text(alphabet=st.characters(min_codepoint=0xD000, max_codepoint=0xE100), max_size=20),
    st.lists(
        st.sampled_from([*'<>/tool_cal{}[]":,\\ ', OPEN, CLOSE, '"name"', '"arguments"']),
        max_size=30,
    ).map("".join),
    near_miss(),
)


def check_parsed(p: Parsed) -> None:
    assert isinstance(p, Parsed) and isinstance(p.content, str)
    assert p.error is None or isinstance(p.error, str)
    assert len(p.tool_calls) <= MAX_CALLS_PER_TURN
    for c in p.tool_calls:
        assert isinstance(c.name, str) and c.name and isinstance(c.arguments, dict)


FUZZ = settings(
    max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@FUZZ
@given(any_text)
def test_fuzz_parse_never_raises(text: str) -> None:
    check_parsed(parse_assistant(text))


@settings(max_examples=1_500, deadline=None, database=None)
@given(any_text, st.sampled_from(["error", "answer"]))
def test_fuzz_vllm_hermes_never_raises(text: str, near_miss: str) -> None:
    p = parse_assistant(text, near_miss=near_miss, mode="vllm-hermes")  # type: ignore[arg-type]
    assert isinstance(p, Parsed) and isinstance(p.content, str)
    assert len(p.tool_calls) <= MAX_CALLS_PER_TURN
    assert all(isinstance(c.name, str) for c in p.tool_calls)
    assert not (p.tool_calls and p.error)  # the turn is rejected whole, or not at all


@settings(max_examples=300, deadline=None, database=None)
@given(wellformed_turn())
def test_wellformed_calls_are_recovered_exactly(
    turn: tuple[str, list[tuple[str, dict[str, Any]]], str],
) -> None:
    text, calls, outside = turn
    # vllm-hermes cuts a body at the first closing tag: only when no string holds a tag.
    tags_only_as_tags = text.count(OPEN) == text.count(CLOSE) == len(calls)
    for mode in ("lenient", "vllm-hermes") if tags_only_as_tags else ("lenient",):
        p = parse_assistant(text, mode=mode)  # type: ignore[arg-type]
        check_parsed(p)
        assert p.error is None
        assert [(c.name, c.arguments) for c in p.tool_calls] == calls
        assert p.content == outside.strip()
        assert p.is_final_answer == (not calls)


# ---------------------------------------------------------------- Env.step fuzz


class TinyEnv(Env):
    """Find a number with ``peek`` and submit it."""

    def new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        n = int(rng.integers(0, 100))
        return Task(id=str(n), prompt="Peek at the number and submit it.", answer=n)

    def build_tools(self, task: Task) -> list[Tool]:
        @tool
        def peek(scale: float = 1.0) -> float:
            """Return the number, scaled.

            Args:
                scale: Multiplier.
            """
            return task.answer * scale

        return [peek]

    def check_answer(self, task: Task, answer: str) -> bool:
        return math.isclose(float(answer), task.answer)

    def expert_action(self, messages: list[Message]) -> str:
        if messages[-1].role == "tool":
            return self.submit_call(messages[-1].content)
        return self.call("peek")


def test_tiny_env_expert_solves_it() -> None:
    env = TinyEnv(max_turns=4)
    msgs, info = env.reset(seed=3)
    assert {t["function"]["name"] for t in info["tools"]} == {"peek", "submit"}
    obs, reward, terminated, truncated, info = env.step(env.expert_action(msgs))
    assert not terminated and info["tool_errors"] == []
    obs, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
    assert terminated and not truncated and reward == 1.0 and info["success"]


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(
        st.one_of(
            any_text,
            st.builds(format_tool_call, st.sampled_from(["peek", "submit", "peak"]), json_args),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_env_step_never_raises(actions: list[str]) -> None:
    env = TinyEnv(max_turns=3, tool_timeout_s=5.0)
    env.reset(seed=0)
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, list) and all(isinstance(m, Message) for m in obs)
        assert reward in (0.0, 1.0) and not (terminated and truncated)
        assert (info["parse_error"] is not None) == ("parse" in info["tool_errors"])
        if terminated or truncated:
            env.reset(seed=0)
