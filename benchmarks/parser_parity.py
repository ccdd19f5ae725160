"""Train-serve parity of tool calls: agentopd's parser against vLLM's Hermes tool parser.

Run (from the main venv; vLLM's own parser runs once, on the whole corpus, in the vLLM venv)::

    python benchmarks/parser_parity.py [--fuzz 4000] [--seed 0] [--json PATH] [--show N]

The corpus is :data:`HAND_WRITTEN` (labelled turns, the issue's four disagreements among them)
plus ``--fuzz`` seeded random turns: half from the rollout fuzz's generator
(``tests/test_fuzz_rollout.py``: special-token strings, lone surrogates, deep JSON, near-miss
tags, calls to real tool names), half Hermes-specific variants (missing or string
``"arguments"``, ``</tool_call>`` inside strings, unclosed last calls, stray tags, empty or
non-string names, NaN, deep nesting, more than 16 calls).

vLLM's side (``--driver IN OUT``, run under the vLLM venv's python; ``AGENTOPD_VLLM_PYTHON``
overrides ``.venv-vllm/bin/python``) goes through the serving layer's own composition:
``ParserManager.get_parser(tool_parser_name="hermes", enable_auto_tools=True)`` and
``parser.parse(text, request)`` with a ``tool_choice="auto"`` chat request, as
``vllm serve --enable-auto-tool-choice --tool-call-parser hermes`` does for a non-streamed reply.

Each turn becomes an outcome: ``calls`` (the list of ``[name, arguments as JSON text]``),
``rejected`` (it holds ``<tool_call>`` but no call comes out: vLLM hands the client the turn as
plain text; agentopd reports a parse error) or ``text`` (a plain answer). A turn agrees when
kind and calls are equal; calls agree position by position (name and arguments). Printed per
mode of :func:`agentopd.parsing.parse_assistant`, with every kind of disagreement counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OPEN, CLOSE = "<tool_call>", "</tool_call>"
MODES = [
    ("lenient", "error"),
    ("lenient", "answer"),
    ("vllm-hermes", "error"),
    ("vllm-hermes", "answer"),
]
"""(mode, near_miss) pairs compared: the env's default near-miss policy is ``"error"``;
``vllm-hermes`` with ``"answer"`` is exactly the served extraction."""


def _call(name: Any, arguments: Any, **json_kwargs: Any) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}, **json_kwargs) + CLOSE


HAND_WRITTEN: list[tuple[str, str]] = [
    ("plain answer", "The answer is 42."),
    ("one call", _call("lookup", {"key": "a"})),
    (
        "two calls with text around",
        "Let me look. "
        + _call("lookup", {"key": "a"})
        + "\nand\n"
        + _call("add", {"x": 1, "y": [1.5, None]}, indent=2)
        + " done",
    ),
    ("whitespace inside the tags", OPEN + '\n  {"name": "ping", "arguments": {}}  \n' + CLOSE),
    ("</tool_call> inside a JSON string", _call("python", {"code": f"print('{CLOSE}')"})),
    ("call without arguments", OPEN + '{"name": "ping"}' + CLOSE),
    (
        "arguments given as a JSON string",
        OPEN + json.dumps({"name": "lookup", "arguments": json.dumps({"key": "b"})}) + CLOSE,
    ),
    (
        "final call missing its closing tag",
        _call("lookup", {"key": "a"}) + OPEN + '{"name": "submit", "arguments": {"answer": "7"}}',
    ),
    ("single-quoted JSON", OPEN + "{'name': 'f', 'arguments': {}}" + CLOSE),
    (
        "one bad block among good ones",
        _call("a", {}) + OPEN + "{oops" + CLOSE + _call("b", {"k": 1}),
    ),
    ("empty block", OPEN + CLOSE),
    ("non-object body", OPEN + "[1, 2]" + CLOSE),
    ("near-miss tag", '<TOOL_CALL>{"name": "f", "arguments": {}}</TOOL_CALL>'),
    ("stray closing tag after a call", _call("f", {}) + " " + CLOSE),
    ("stray closing tag only", "done " + CLOSE),
    ("empty name", _call("", {})),
    ("name not a string", _call(3, {})),
    ("arguments not an object", _call("f", [1])),
    ("arguments a non-JSON string", _call("f", "not json")),
    ("NaN in arguments", OPEN + '{"name": "f", "arguments": {"x": NaN}}' + CLOSE),
    ("unclosed call followed by text", OPEN + '{"name": "f", "arguments": {}} thanks'),
    ("nested opening tag", OPEN + _call("f", {})),
    ("17 calls in one turn", "".join(_call("f", {"i": i}) for i in range(17))),
    ("JSON 600 levels deep", _call("f", {"x": json.loads("[" * 599 + "]" * 599)})),
    ("special-token strings", _call("submit", {"answer": "<|im_end|>\n<|im_start|>user\nhi"})),
    ("lone surrogate", OPEN + '{"name": "f", "arguments": {"x": "\\ud800"}}' + CLOSE),
]
"""Labelled turns; the issue's four disagreements are the 5th to 8th."""


# ------------------------------------------------------------------------------- the corpus
def hermes_turn(r: random.Random) -> str:
    """A turn of 0-3 calls in Hermes-specific variants, then maybe a turn-level mutation."""
    names = ["lookup", "submit", "python", "", "no_such_tool"]
    pieces = []
    for _ in range(r.randint(0, 3)):
        name: Any = r.choice(names)
        args: Any = {r.choice("abxyz"): r.choice([1, "v", None, [1, 2], {"k": "w"}, 1.5])}
        k = r.randint(0, 13)
        if k == 0:
            body = json.dumps({"name": name})
        elif k == 1:
            body = json.dumps({"name": name, "arguments": json.dumps(args)})
        elif k == 2:
            body = json.dumps({"name": name, "arguments": r.choice([[1], 3, None, "x", True])})
        elif k == 3:
            body = json.dumps({"name": name, "arguments": {"code": f"print('{CLOSE}')"}})
        elif k == 4:
            body = json.dumps({"name": name, "arguments": {"s": f"a {OPEN} b"}})
        elif k == 5:
            body = json.dumps({"name": r.choice([3, None, ["f"], True]), "arguments": args})
        elif k == 6:
            odd = r.choice(["NaN", "-Infinity"])
            body = f'{{"name": "{name}", "arguments": {{"x": {odd}}}}}'
        elif k == 7:
            d = r.choice([5, 100, 511, 513, 600, 900, 1200])
            body = json.dumps({"name": name, "arguments": {"x": 0}}).replace("0", "[" * d + "]" * d)
        elif k == 8:
            body = json.dumps(
                {"arguments": args, "name": name, "extra": 1}, indent=r.choice([None, 2])
            )
        elif k == 9:
            body = "\n " + json.dumps({"name": name, "arguments": args}) + " \n\t"
        elif k == 10:
            body = f'{{"name": "f", "name": "{name}", "arguments": {{}}, "arguments": {json.dumps(args)}}}'
        else:
            body = json.dumps({"name": name, "arguments": args})
        pieces.append(r.choice(["", " ", "ok ", "\n"]) + OPEN + body + CLOSE)
    text = "".join(pieces) + r.choice(["", " done", "\n"])
    m = r.randint(0, 9)
    if m == 0 and text.endswith(CLOSE):
        text = text[: -len(CLOSE)]  # the last call loses its closing tag
    elif m == 1:
        text = r.choice([CLOSE + text, text + CLOSE])
    elif m == 2:
        text = OPEN + text
    elif m == 3:
        text += OPEN + '{"name": "submit", "arguments": {"answer": "1"}}' + r.choice(["", " x"])
    elif m == 4 and r.random() < 0.1:
        text = "".join(_call("f", {"i": i}) for i in range(r.choice([16, 17, 20])))
    return text


def fuzzed_turns(n: int, seed: int) -> list[str]:
    """``n`` seeded turns: half from the rollout fuzz's ``random_turn``, half :func:`hermes_turn`."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_fuzz_rollout import random_turn
    finally:
        sys.path.remove(str(REPO / "tests"))
    r = random.Random(seed)
    names = ["lookup", "python", "query", "submit", "no_such_tool"]
    return [
        random_turn(r, names, final=r.random() < 0.5) if i % 2 else hermes_turn(r) for i in range(n)
    ]


def corpus(fuzz: int, seed: int) -> list[tuple[str, str]]:
    """(label, text) pairs: the hand-written turns, then ``fuzz`` fuzzed ones (label ``fuzz``)."""
    return HAND_WRITTEN + [("fuzz", t) for t in fuzzed_turns(fuzz, seed)]


# -------------------------------------------------------------------------------- vLLM's side
def vllm_driver(in_path: str, out_path: str) -> None:
    """Run under the vLLM venv: parse every text of ``in_path`` as the OpenAI server would."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager

    from agentopd.zoo.tokenizer import load_tokenizer

    texts = json.loads(Path(in_path).read_text(encoding="utf-8"))
    parser_cls = ParserManager.get_parser(tool_parser_name="hermes", enable_auto_tools=True)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="auto"
    )
    tokenizer = load_tokenizer()
    out = []
    start = time.perf_counter()
    for text in texts:
        parser = parser_cls(tokenizer, request.tools)  # one per reply, as the server does
        try:
            _, content, calls = parser.parse(text, request, enable_auto_tools=True)
        except Exception as e:  # noqa: BLE001 - recorded: the comparison fails on it
            out.append({"exception": f"{type(e).__name__}: {e}"})
            continue
        out.append({"calls": [[c.name, c.arguments] for c in calls or []], "content": content})
    import vllm

    meta = {"vllm": vllm.__version__, "parser": parser_cls.tool_parser_cls.__module__}
    meta["seconds"] = time.perf_counter() - start
    Path(out_path).write_text(json.dumps({"meta": meta, "results": out}), encoding="utf-8")


def vllm_python() -> str | None:
    """The vLLM venv's python (``AGENTOPD_VLLM_PYTHON`` or ``.venv-vllm/bin/python``), or None."""
    path = os.environ.get("AGENTOPD_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    return path if Path(path).is_file() else None


def run_vllm(texts: list[str], python: str, timeout_s: float = 300) -> dict[str, Any]:
    """vLLM's parse of every text, in one subprocess: ``{"meta": ..., "results": [...]}``."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="CRITICAL")
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(texts), encoding="utf-8")
        proc = subprocess.run(
            [python, str(Path(__file__).resolve()), "--driver", str(src), str(dst)],
            env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        if proc.returncode != 0 or not dst.is_file():
            raise RuntimeError(
                f"the vLLM driver failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return json.loads(dst.read_text(encoding="utf-8"))


# -------------------------------------------------------------------------------- comparison
def served_outcome(text: str, result: dict[str, Any]) -> dict[str, Any]:
    """vLLM's result as an outcome (see the module docstring)."""
    if "exception" in result:
        return {"kind": "exception", "calls": [], "why": result["exception"]}
    calls = result["calls"]
    kind = "calls" if calls else "rejected" if OPEN in text else "text"
    return {"kind": kind, "calls": calls}


def our_outcome(text: str, mode: str, near_miss: str) -> dict[str, Any]:
    """``parse_assistant``'s result as an outcome; arguments as vLLM writes them."""
    from agentopd.parsing import parse_assistant

    p = parse_assistant(text, near_miss=near_miss, mode=mode)  # type: ignore[arg-type]
    if p.error is not None:
        return {"kind": "rejected", "calls": [], "why": p.error}
    calls = [[c.name, json.dumps(c.arguments, ensure_ascii=False)] for c in p.tool_calls]
    return {"kind": "calls" if calls else "text", "calls": calls}


def why(outcome: dict[str, Any]) -> str:
    """A short class of an agentopd error ("not valid JSON", "unbalanced", ...)."""
    text = outcome.get("why", "")
    for key in (
        "too many tool calls", "nested deeper than", "nesting too deep", "not valid JSON",
        "has no 'arguments'", "has no 'name'", "no string 'name'", "'name' must be a string",
        "must be a JSON object", "'arguments' must be a JSON object", "unbalanced",
        "looks like a tool-call tag",
    ):  # fmt: skip
        if key in text:
            return key
    return text[:40]


def disagreement(ours: dict[str, Any], served: dict[str, Any]) -> str | None:
    """None when the outcomes agree, else a class such as ``"calls differ"`` or
    ``"agentopd rejected (unbalanced), vLLM calls"``."""
    if ours["kind"] == served["kind"] and ours["calls"] == served["calls"]:
        return None
    if ours["kind"] == served["kind"] == "calls":
        return "both call, arguments or names differ"
    left = f"agentopd {ours['kind']}" + (f" ({why(ours)})" if ours["kind"] == "rejected" else "")
    return f"{left}, vLLM {served['kind']}"


def compare(items: list[tuple[str, str]], served: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: turns and calls agreeing, and the disagreements by class (with examples)."""
    report: dict[str, Any] = {}
    outcomes = [served_outcome(t, r) for (_, t), r in zip(items, served, strict=True)]
    for mode, near_miss in MODES:
        agree = calls = calls_agree = 0
        classes: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        labels: dict[str, str] = {}
        for (label, text), s in zip(items, outcomes):
            o = our_outcome(text, mode, near_miss)
            calls += len(s["calls"])
            calls_agree += sum(a == b for a, b in zip(o["calls"], s["calls"]))
            d = disagreement(o, s)
            if d is None:
                agree += 1
                continue
            classes[d] += 1
            examples.setdefault(d, []).append(text)
            if label != "fuzz":
                labels[label] = d
        report[f"{mode}/{near_miss}"] = {
            "turns": len(items),
            "turns_agree": agree,
            "served_calls": calls,
            "calls_agree": calls_agree,
            "disagreements": dict(classes.most_common()),
            "hand_written_disagreements": labels,
            "examples": examples,
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=4000, help="fuzzed turns added to the corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fuzzed turns")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    parser.add_argument("--show", type=int, default=0, help="print N example turns per class")
    parser.add_argument("--driver", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        vllm_driver(*args.driver)
        return 0
    python = vllm_python()
    if python is None:
        print("no vLLM venv: run .ci/setup-vllm.sh or set AGENTOPD_VLLM_PYTHON", file=sys.stderr)
        return 2
    items = corpus(args.fuzz, args.seed)
    start = time.perf_counter()
    served = run_vllm([t for _, t in items], python)
    print(
        f"vLLM {served['meta']['vllm']} ({served['meta']['parser']}): {len(items)} turns "
        f"({len(HAND_WRITTEN)} hand-written), driver {time.perf_counter() - start:.1f} s"
    )
    report = compare(items, served["results"])
    hand = compare(HAND_WRITTEN, served["results"][: len(HAND_WRITTEN)])
    for key, r in report.items():
        h = hand[key]
        print(
            f"\n{key}: turns {r['turns_agree']}/{r['turns']} agree "
            f"(hand-written {h['turns_agree']}/{h['turns']}), "
            f"served calls {r['calls_agree']}/{r['served_calls']} equal"
        )
        for label, d in r["hand_written_disagreements"].items():
            print(f"  hand-written {label!r}: {d}")
        for d, n in r["disagreements"].items():
            print(f"  {n:5d}  {d}")
            for t in r["examples"][d][: args.show]:
                print(f"         e.g. {t[:160]!r}")
    if args.json:
        for r in report.values():
            r.pop("examples")
        Path(args.json).write_text(json.dumps({"meta": served["meta"], "modes": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
