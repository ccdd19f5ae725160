"""Conformance checks for any registered environment (``agentopd check-env NAME [key=value ...]``).

:func:`check_env_conformance` builds the env through the registry and runs, each as one row of a
:class:`ConformanceReport`:

* ``build``: ``agentopd.make(name, **kwargs)`` works (an unknown name fails with the registry's
  "Did you mean ...?" message; an entry point that does not import fails with its error);
* ``gymnasium check_env``: Gymnasium's own checker passes (its warnings are reported as a
  separate warning row);
* ``tool schemas``: every tool has a name and a description, and its parameters are a valid
  JSON Schema (Draft 2020-12) object schema;
* ``seeded reset``: the same seed gives the same opening messages and task;
* ``expert (train)`` / ``expert (eval)``: the scripted expert solves every seeded episode
  (skipped, with the reason, for an env whose ``expert_unavailable`` says it has none);
* ``random actions``: ``env.action_space.sample()`` never raises and always gets an answer;
* ``malformed actions``: garbage, broken tags, wrong argument types, unknown tools, huge
  arguments, empty and non-UTF-8-ish text never raise; broken tool calls get a message and
  leave the episode running;
* ``rollout path``: the expert's episode and every malformed action (up to
  ``ROLLOUT_MAX_CHARS``), played through the real
  rollout loop (:func:`agentopd.rollout.scripted_episode`) with the zoo tokenizer, end without
  ``env_error`` (no exception in step, tools, rendering) and survive the JSON round trip. This
  fails, not warns: such results would end episodes of a training run as ``env_error``;
* ``close``: ``env.close()`` does not raise.

Generic by design: nothing here knows about a particular environment.

Example::

    report = check_env_conformance("lookup-chain", hops=3)
    rich.print(report.render())
    assert report.ok
"""

from __future__ import annotations

import functools
import json
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from rich.table import Table

from agentopd.parsing import format_tool_call
from agentopd.registry import UnknownNameError, make
from agentopd.types import Message

MAX_DETAIL_CHARS = 400
ROLLOUT_MAX_CHARS = 20_000
"""Malformed actions longer than this are left out of the (slower) rollout-path check."""
RESULT_SLACK_CHARS = 1000
"""A single tool result may exceed ``env.max_output_chars`` by at most this (error preamble)."""


class Skipped(Exception):
    """Raised by a check that does not apply to this env; the message says why."""


@dataclass
class CheckResult:
    """One row of a conformance report."""

    name: str
    """What was checked."""
    ok: bool
    """Whether it passed (warnings always pass)."""
    detail: str = ""
    """What happened: counts on success, the first problem on failure."""
    warning: bool = False
    """A problem worth reading that does not fail the report."""


@dataclass
class ConformanceReport:
    """The rows of one :func:`check_env_conformance` run."""

    env: str
    """Registry name checked."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments the env was built with."""
    rows: list[CheckResult] = field(default_factory=list)
    """One row per check, in the order they ran."""

    @property
    def ok(self) -> bool:
        """True when at least one check ran and none failed."""
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.rows if not r.ok]

    def add(self, name: str, ok: bool, detail: str = "", warning: bool = False) -> CheckResult:
        row = CheckResult(name, bool(ok), _clip(detail), warning)
        self.rows.append(row)
        return row

    def render(self) -> Table:
        """A ``rich`` table: one row per check with a pass / warn / FAIL status."""
        args = " ".join(f"{k}={v}" for k, v in self.kwargs.items())
        verdict = "[green]passed[/]" if self.ok else "[red]FAILED[/]"
        table = Table(title=f"check-env {self.env} {args}".rstrip() + f": {verdict}")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for r in self.rows:
            status = (
                "[red]FAIL[/]" if not r.ok else "[yellow]warn[/]" if r.warning else "[green]ok[/]"
            )
            table.add_row(r.name, status, r.detail)
        return table

    def __str__(self) -> str:
        lines = [f"check-env {self.env}: {'passed' if self.ok else 'FAILED'}"]
        for r in self.rows:
            status = "FAIL" if not r.ok else "warn" if r.warning else "ok"
            lines.append(f"  [{status}] {r.name}: {r.detail}")
        return "\n".join(lines)


def check_env_conformance(name: str, n_episodes: int = 5, **kwargs: Any) -> ConformanceReport:
    """Check that the env registered as ``name`` (built with ``kwargs``) follows the contract.

    Args:
        name: Registry name of the environment.
        n_episodes: Seeded episodes the expert must solve, per split.
        **kwargs: Passed to the environment's constructor.

    Returns:
        The report; it never raises for a problem in the environment.
    """
    report = ConformanceReport(env=name, kwargs=dict(kwargs))
    try:
        env = make(name, **kwargs)
    except UnknownNameError as e:
        report.add("build", False, str(e))
        return report
    except Exception as e:  # noqa: BLE001 - a broken env is a failed check
        report.add("build", False, f"agentopd.make({name!r}) raised {_describe(e)}")
        return report
    report.add("build", True, f"{type(env).__module__}.{type(env).__qualname__}")
    checks: list[tuple[str, Callable[[Any, ConformanceReport], str]]] = [
        ("gymnasium check_env", _check_gymnasium),
        ("tool schemas", _check_schemas),
        ("seeded reset", _check_determinism),
        ("expert (train)", lambda env, _: _check_expert(env, n_episodes, "train")),
        ("expert (eval)", lambda env, _: _check_expert(env, n_episodes, "eval")),
        ("random actions", lambda env, _: _check_random(env, max(n_episodes, 3))),
        ("malformed actions", _check_malformed),
        ("rollout path", _check_rollout),
    ]
    try:
        for check_name, check in checks:
            at = len(report.rows)
            try:
                row = CheckResult(check_name, True, _clip(check(env, report)))
            except Skipped as e:
                row = CheckResult(check_name, True, _clip(f"skipped: {e}"), warning=True)
            except Exception as e:  # noqa: BLE001 - each check reports its own failure
                row = CheckResult(check_name, False, _clip(_describe(e)))
            report.rows.insert(at, row)
    finally:
        try:
            env.close()
        except Exception as e:  # noqa: BLE001
            report.add("close", False, f"env.close() raised {_describe(e)}")
        else:
            report.add("close", True, "env.close() returned")
    return report


# -------------------------------------------------------------------- checks
def _check_gymnasium(env: Any, report: ConformanceReport) -> str:
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    if caught:
        text = "; ".join(sorted({str(w.message) for w in caught}))
        report.add("gymnasium warnings", True, f"{len(caught)} warning(s): {text}", warning=True)
    return "passed" + (f" with {len(caught)} warning(s)" if caught else "")


def _check_schemas(env: Any, report: ConformanceReport) -> str:
    _, info = env.reset(seed=0)
    tools = info.get("tools")
    if tools == [] and getattr(env, "answer_tool", None) is None:
        return "no tools: actions and answers are plain text"
    _require(
        isinstance(tools, list) and tools, f"info['tools'] must be a non-empty list, got {tools!r}"
    )
    names: list[str] = []
    for i, schema in enumerate(tools):
        _require(isinstance(schema, dict), f"tool {i} schema is not a dict: {schema!r}")
        fn = schema.get("function", schema)
        name, description, params = fn.get("name"), fn.get("description"), fn.get("parameters")
        _require(isinstance(name, str) and name, f"tool {i} has no name")
        _require(
            isinstance(description, str) and description.strip(),
            f"tool {name!r} has no description",
        )
        _require(isinstance(params, dict), f"tool {name!r} has no parameters object")
        try:
            jsonschema.Draft202012Validator.check_schema(params)
        except jsonschema.SchemaError as e:
            raise AssertionError(f"tool {name!r}: invalid JSON Schema: {e.message}") from None
        _require(
            params.get("type") == "object", f"tool {name!r}: parameters must have type 'object'"
        )
        json.dumps(schema)
        names.append(name)
    _require(len(set(names)) == len(names), f"duplicate tool names: {names}")
    answer_tool = getattr(env, "answer_tool", None)
    _require(
        answer_tool is None or answer_tool in names,
        f"answer tool {answer_tool!r} missing from {names}",
    )
    return f"{len(names)} tools: {', '.join(names)}"


def _check_determinism(env: Any, report: ConformanceReport) -> str:
    for seed in (0, 1, 12345):
        for split in ("train", "eval"):
            obs_a, info_a = env.reset(seed=seed, options={"split": split})
            obs_b, info_b = env.reset(seed=seed, options={"split": split})
            _require(
                [m.to_dict() for m in obs_a] == [m.to_dict() for m in obs_b]
                and info_a.get("task_id") == info_b.get("task_id"),
                f"reset(seed={seed}, split={split!r}) gave different tasks: "
                f"{info_a.get('task_id')!r} vs {info_b.get('task_id')!r}",
            )
    return "same seed, same messages and task_id (train and eval)"


def _check_expert(env: Any, n_episodes: int, split: str) -> str:
    reason = getattr(env, "expert_unavailable", None)
    if reason:
        raise Skipped(f"the env has no scripted expert ({reason})")
    turns: list[int] = []
    for seed in range(n_episodes):
        obs, info = env.reset(seed=seed, options={"split": split})
        _require(isinstance(obs, list) and obs, f"seed {seed}: reset returned no messages")
        horizon = int(info.get("max_turns", getattr(env, "max_turns", 64)))
        done, reward, step_info, n = False, 0.0, {}, 0
        while not done:
            _require(n < horizon + 1, f"seed {seed}: episode did not end within {horizon} turns")
            action = env.expert_action(list(env.messages))
            _, reward, terminated, truncated, step_info = env.step(action)
            done, n = terminated or truncated, n + 1
            if truncated and not terminated:
                raise AssertionError(
                    f"seed {seed} ({split}): truncated after {n} turns without an answer; "
                    f"last messages: {_tail(env.messages)}"
                )
        _require(
            bool(step_info.get("success")) and reward > 0,
            f"seed {seed} ({split}): expert failed (reward {reward}, answer "
            f"{step_info.get('answer')!r}); last messages: {_tail(env.messages)}",
        )
        turns.append(n)
    return f"{n_episodes}/{n_episodes} solved, {sum(turns) / len(turns):.1f} turns on average"


def _check_random(env: Any, n_episodes: int) -> str:
    steps = 0
    for seed in range(n_episodes):
        env.reset(seed=seed)
        env.action_space.seed(seed)
        done = False
        while not done:
            action = env.action_space.sample()
            messages, reward, terminated, truncated, info = _step_checked(env, action)
            _require(
                messages or terminated,
                f"action {action!r}: no message came back and the episode did not end",
            )
            done, steps = terminated or truncated, steps + 1
    return f"{steps} random steps over {n_episodes} episodes"


def _check_malformed(env: Any, report: ConformanceReport) -> str:
    _, info = env.reset(seed=0)
    cases = list(_malformed_actions(info.get("tools") or []))
    limit = int(getattr(env, "max_output_chars", 4000)) + RESULT_SLACK_CHARS
    unencodable: list[str] = []
    for label, action, must_continue in cases:
        env.reset(seed=0)
        try:
            messages, _, terminated, truncated, _ = _step_checked(env, action)
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{label}: step raised {_describe(e)}") from None
        if must_continue:
            _require(messages, f"{label}: no message told the model what was wrong")
            _require(not terminated, f"{label}: the episode terminated instead of going on")
        else:
            _require(messages or terminated, f"{label}: no message and the episode did not end")
        for m in messages:
            _require(
                len(m.content) <= limit,
                f"{label}: a {len(m.content)}-character result (limit {limit}) was not truncated",
            )
            try:
                m.content.encode("utf-8")
            except UnicodeEncodeError:
                unencodable.append(label)
    if unencodable:
        report.add(
            "utf-8 results",
            True,
            "results are not valid UTF-8 (lone surrogates echoed) after: "
            + ", ".join(sorted(set(unencodable))),
            warning=True,
        )
    return f"{len(cases)} malformed actions handled"


def _check_rollout(env: Any, report: ConformanceReport) -> str:
    from agentopd.renderer import Renderer
    from agentopd.rollout import expert_episode, scripted_episode
    from agentopd.types import Episode, StopReason
    from agentopd.zoo.tokenizer import load_tokenizer

    renderer = Renderer(load_tokenizer())
    _, info = env.reset(seed=0)
    cases: list[tuple[str, Callable[[], Episode]]] = []
    if not getattr(env, "expert_unavailable", None):  # the expert checks said why not
        cases.append(("expert episode", lambda: expert_episode(env, renderer, seed=0)))
    for label, action, _ in _malformed_actions(info.get("tools") or []):
        text = action.content if isinstance(action, Message) else str(action)
        if len(text) > ROLLOUT_MAX_CHARS:
            continue  # the huge cases only cost time here; "malformed actions" covers them
        cases.append((label, functools.partial(scripted_episode, env, renderer, 0, [text])))
    for label, play in cases:
        try:
            ep = play()
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{label}: the rollout raised {_describe(e)}") from None
        if ep.stop_reason == StopReason.ENV_ERROR:
            last = str(ep.info.get("error", "")).strip().splitlines()[-1:]
            raise AssertionError(
                f"{label}: the episode ended as env_error, a rollout would lose it: "
                f"{last[0] if last else '?'}"
            )
        line = ep.to_json()
        if Episode.from_json(line).to_json() != line:
            raise AssertionError(f"{label}: the episode does not survive the JSON round trip")
    return f"{len(cases)} episodes through the rollout loop, renderer and JSON round trip"


def _malformed_actions(tools: list[dict[str, Any]]) -> Iterator[tuple[str, Any, bool]]:
    """(label, action, must_continue): the episode must go on after actions marked True."""
    yield "garbage text", "asdf qwer {{{ ]]] <<>> ::", False
    yield "empty string", "", False
    yield "whitespace", " \n\t ", False
    yield (
        "non-UTF-8-ish text",
        b"\xff\xfe\x00caf\xe9 \x80\x81".decode("latin-1") + "\udcff\x00",
        False,
    )
    yield "unclosed <tool_call>", '<tool_call>{"name": "submit", "arguments": {', True
    yield "stray </tool_call>", 'oops </tool_call> {"name": "x"}', True
    yield "invalid JSON in call", "<tool_call>{name: submit}</tool_call>", True
    yield "call is a list", "<tool_call>[1, 2, 3]</tool_call>", True
    yield "call without name", '<tool_call>{"arguments": {}}</tool_call>', True
    yield (
        "arguments not an object",
        '<tool_call>{"name": "submit", "arguments": [1]}</tool_call>',
        True,
    )
    yield "deeply nested JSON", "<tool_call>" + "[" * 100_000 + "</tool_call>", True
    yield "raw surrogate in call", "<tool_call>\udcff</tool_call>", True
    yield "surrogate in JSON", '<tool_call>{"name": "\\udcff", "arguments": {}}</tool_call>', True
    yield "unknown tool", format_tool_call("no_such_tool_xyz", {"a": 1}), True
    yield "huge tool name", format_tool_call("t" * 200_000, {}), True
    yield "many calls", format_tool_call("no_such_tool_xyz", {}) * 40, True
    yield "message object", Message(role="assistant", content="<tool_call>{</tool_call>"), True
    for schema in tools:
        fn = schema.get("function", schema)
        name = fn.get("name", "?")
        props: dict[str, Any] = (fn.get("parameters") or {}).get("properties") or {}
        if props:
            bad = {p: _wrong_value(s) for p, s in props.items()}
            yield f"{name}: wrong argument types", format_tool_call(name, bad), True
        yield f"{name}: unexpected argument", format_tool_call(name, {"zz_unexpected": 1}), True
        for p, s in props.items():
            if _accepts_string(s):
                huge = format_tool_call(name, {p: "x" * 200_000})
                yield f"{name}: huge {p!r}", huge, name != "submit"
                weird = format_tool_call(name, {p: "\udcff\x00\u202e\ufffd"})
                yield f"{name}: non-UTF-8-ish {p!r}", weird, name != "submit"


def _wrong_value(schema: dict[str, Any]) -> Any:
    """A JSON value that does not match ``schema`` (an object rarely matches a scalar type)."""
    types = _types(schema)
    if "object" in types or not types:
        return [[1], None]
    return {"not": ["a", types[0]]}


def _types(schema: dict[str, Any]) -> list[str]:
    t = schema.get("type")
    out = [t] if isinstance(t, str) else list(t or [])
    for sub in schema.get("anyOf", []) + schema.get("oneOf", []):
        out += _types(sub)
    return out


def _accepts_string(schema: dict[str, Any]) -> bool:
    return "string" in _types(schema) or not schema


# -------------------------------------------------------------------- helpers
def _step_checked(env: Any, action: Any) -> tuple[list[Any], float, bool, bool, dict[str, Any]]:
    out = env.step(action)
    _require(isinstance(out, tuple) and len(out) == 5, f"step must return a 5-tuple, got {out!r}")
    messages, reward, terminated, truncated, info = out
    _require(
        isinstance(messages, list) and all(isinstance(m, Message) for m in messages),
        f"step must return a list of Message, got {messages!r}",
    )
    _require(all(isinstance(m.content, str) for m in messages), "message content must be str")
    _require(isinstance(reward, float), f"reward must be a float, got {type(reward).__name__}")
    _require(
        isinstance(terminated, bool) and isinstance(truncated, bool),
        "terminated/truncated must be bool",
    )
    _require(isinstance(info, dict), f"info must be a dict, got {type(info).__name__}")
    return messages, reward, terminated, truncated, info


def _require(condition: Any, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _describe(e: BaseException) -> str:
    if isinstance(e, AssertionError) and str(e):
        return str(e)
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _tail(messages: list[Message], n: int = 3) -> str:
    return " | ".join(f"[{m.role}] {m.content[:120]!r}" for m in messages[-n:])


def _clip(text: str, n: int = MAX_DETAIL_CHARS) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 3] + "..."
