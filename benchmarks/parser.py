"""Tool-call parser time against input size: it must grow linearly, up to 5 MB per turn.

Run::

    python benchmarks/parser.py [--max-mb 5] [--repeat 3] [--modes lenient,vllm-hermes] [--json PATH]

For each parser mode (``lenient``, ``vllm-hermes``) and each adversarial shape (empty blocks repeated, unclosed tags, stray closing tags, unclosed
JSON, unterminated strings, near-miss tags in ASCII and fullwidth, valid calls, plain text) it
times :func:`agentopd.parsing.parse_assistant` at sizes growing tenfold from 5 KB to ``--max-mb``
and prints the best of ``--repeat`` runs and the ratio to the previous size. Linear time gives
ratios near 10 (constant overheads make small sizes lower); quadratic time gives ratios near
100. Exit status 1 if a ratio between the two largest sizes exceeds ``--max-ratio`` (default 30; a loaded machine adds noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from agentopd.parsing import PARSER_MODES, format_tool_call, parse_assistant

SHAPES: dict[str, Callable[[int], str]] = {
    "empty blocks": lambda n: "<tool_call></tool_call>" * (n // 23),
    "unclosed tags": lambda n: "<tool_call>" * (n // 11),
    "stray closing tags": lambda n: "</tool_call>" * (n // 12),
    "unclosed JSON": lambda n: '<tool_call>{"a": ' * (n // 17),
    "unterminated strings": lambda n: '<tool_call>"' * (n // 12),
    "newlines + empty blocks": lambda n: "<tool_call>\n</tool_call>\n" * (n // 25),
    "near-miss ASCII": lambda n: "<TOOL_CALL>" * (n // 11),
    "near-miss fullwidth": lambda n: "＜tool\u200b_call＞ " * (n // 14),
    "valid calls": lambda n: format_tool_call("f", {"x": "y" * 64}) * (n // 100),
    "one huge call": lambda n: format_tool_call("f", {"x": "y" * n}),
    "plain text": lambda n: "the answer is 42. " * (n // 18),
}


def best_time(text: str, repeat: int, mode: str = "lenient") -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        parse_assistant(text, mode=mode)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=5.0, help="largest input, in MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (best is kept)")
    parser.add_argument("--max-ratio", type=float, default=30.0, help="fail above this ratio")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--modes", default=",".join(PARSER_MODES), help="comma-separated parser modes to time"
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in PARSER_MODES]
    if bad:
        parser.error(f"unknown mode {bad[0]!r}; expected some of {', '.join(PARSER_MODES)}")

    sizes = []
    n = 5_000
    while n <= args.max_mb * 1_000_000:
        sizes.append(n)
        n *= 10
    if sizes[-1] < args.max_mb * 1_000_000:
        sizes.append(int(args.max_mb * 1_000_000))
    table = Table(title="parse_assistant time (best of runs) and ratio to the previous size")
    table.add_column("shape")
    for size in sizes:
        table.add_column(f"{size / 1e6:g} MB", justify="right")
    results: dict[str, list[dict[str, float]]] = {}
    failed = False
    for mode in modes:
        for shape, make in SHAPES.items():
            name = shape if mode == "lenient" else f"{shape} ({mode})"
            row, prev = [], None
            results[name] = []
            for size in sizes:
                text = make(size)
                t = best_time(text, args.repeat, mode)
                ratio = t / prev if prev else None
                results[name].append({"chars": len(text), "seconds": t, "ratio": ratio or 0.0})
                row.append(f"{t * 1e3:.1f} ms" + (f" (x{ratio:.1f})" if ratio else ""))
                prev = t
            last = results[name][-1]["ratio"]
            if last > args.max_ratio:
                failed = True
                row[-1] = f"[red]{row[-1]}[/]"
            table.add_row(name, *row)
    Console(width=200).print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
