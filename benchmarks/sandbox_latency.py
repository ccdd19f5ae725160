"""Latency of a trivial sandboxed tool call per backend: persistent worker vs a fresh sandbox.

Run::

    python benchmarks/sandbox_latency.py [--calls 300] [--fresh-calls 20] [--backends docker,bwrap,local]

For every available backend it measures, side by side in one run:

* ``persistent``: one started sandbox, ``run("x = 1")`` repeated (what an episode pays per call);
* ``fresh``: start a new sandbox, run the same call, stop it (what a per-call process would pay).

It prints p50 / p95 in milliseconds and checks the target "persistent p50 < 5 ms" per backend
(exit status 1 if a measured backend misses it). ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from agentopd.tools.sandbox import BACKENDS, Limits, availability, make_sandbox
from rich.console import Console
from rich.table import Table

TARGET_P50_MS = 5.0
CODE = "x = 1"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def persistent(backend: str, calls: int) -> list[float]:
    with make_sandbox(backend, limits=Limits(), timeout_s=10) as box:
        for _ in range(10):  # warm-up
            box.run(CODE)
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            r = box.run(CODE)
            out.append(1000 * (time.perf_counter() - t0))
            assert r.ok, r.to_text()
    return out


def fresh(backend: str, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        with make_sandbox(backend, limits=Limits(), timeout_s=10) as box:
            r = box.run(CODE)
        out.append(1000 * (time.perf_counter() - t0))
        assert r.ok, r.to_text()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="persistent calls per backend")
    parser.add_argument(
        "--fresh-calls", type=int, default=20, help="fresh-sandbox calls per backend"
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    console = Console(width=max(110, Console().width))
    table = Table(title=f"trivial tool call ({CODE!r}) latency, ms")
    for col in (
        "backend",
        "persistent p50",
        "persistent p95",
        "fresh p50",
        "fresh p95",
        "speed-up (p50)",
        "target",
    ):
        table.add_column(col, justify="right" if col != "backend" else "left")
    results: dict[str, dict[str, float | str]] = {}
    missed = False
    for backend in args.backends.split(","):
        a = availability(backend)
        if not a.available:
            table.add_row(backend, "-", "-", "-", "-", "-", f"unavailable: {a.details}")
            results[backend] = {"unavailable": a.details}
            continue
        p = persistent(backend, args.calls)
        f = fresh(backend, args.fresh_calls)
        row = {
            "persistent_p50_ms": percentile(p, 0.5),
            "persistent_p95_ms": percentile(p, 0.95),
            "persistent_mean_ms": statistics.fmean(p),
            "fresh_p50_ms": percentile(f, 0.5),
            "fresh_p95_ms": percentile(f, 0.95),
        }
        results[backend] = row
        ok = row["persistent_p50_ms"] < TARGET_P50_MS
        missed |= not ok
        table.add_row(
            backend,
            f"{row['persistent_p50_ms']:.2f}",
            f"{row['persistent_p95_ms']:.2f}",
            f"{row['fresh_p50_ms']:.1f}",
            f"{row['fresh_p95_ms']:.1f}",
            f"{row['fresh_p50_ms'] / row['persistent_p50_ms']:.0f}x",
            f"[green]p50 < {TARGET_P50_MS:g} ms[/]"
            if ok
            else f"[red]p50 >= {TARGET_P50_MS:g} ms[/]",
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
