"""Sandbox latency per backend: calls, episode start (pool vs fresh), calls under concurrency.

Run::

    python benchmarks/sandbox_latency.py [--calls 300] [--fresh-calls 20] [--backends docker,bwrap,local]
        [--episodes 40] [--concurrency 16,64] [--concurrent-calls 20]

For every available backend it measures, side by side in one run:

* ``persistent``: one started sandbox, ``run("x = 1")`` repeated (what an episode pays per call);
* ``fresh``: start a new sandbox, run the same call, stop it (what a per-call process would pay);
* **episode start**: how long until an episode holds a ready sandbox, from a warm
  :class:`~agentopd.sandbox.pool.SandboxPool` (``acquire``; the previous episode's
  sandbox was released and reset in the background meanwhile, as during a rollout) against a
  fresh sandbox (``start``), plus the background reset and the first call;
* **concurrency**: the p50 of a trivial call when N episodes (N = 1 and ``--concurrency``) each
  hold a pooled sandbox and call it at the same time, from N threads (as the rollout's tool
  threads do), and when the N sandboxes are live but called one at a time.

It prints p50 / p95 in milliseconds and checks the targets (exit status 1 if a measured
backend misses one): persistent call p50 < 5 ms, pool episode start p50 <= 5 ms, concurrent
call p50 <= 2x the single-episode p50. ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

from rich.console import Console
from rich.table import Table

from agentopd.sandbox import BACKENDS, Limits, availability, make_sandbox
from agentopd.sandbox.pool import SandboxPool

TARGET_P50_MS = 5.0
TARGET_START_MS = 5.0
TARGET_CONCURRENCY_RATIO = 2.0
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


def episode_start(backend: str, episodes: int) -> dict[str, list[float]]:
    """Pool ``acquire`` against a fresh ``start``, per episode (ms), with reset and first call."""
    out: dict[str, list[float]] = {"pool": [], "pool_first_call": [], "reset": [], "fresh": []}
    out["fresh_first_call"] = []
    pool = SandboxPool(backend, size=2, limits=Limits(), timeout_s=10)
    try:
        pool.warm(wait_s=120)
        for _ in range(episodes):
            t0 = time.perf_counter()
            box = pool.acquire()
            t1 = time.perf_counter()
            r = box.run(CODE)
            t2 = time.perf_counter()
            assert r.ok, r.to_text()
            out["pool"].append(1000 * (t1 - t0))
            out["pool_first_call"].append(1000 * (t2 - t1))
            pool.release(box)
            pool.idle()  # the reset runs in the background while the next episode is set up
        for _ in range(min(episodes, 10)):  # the reset itself, timed directly
            box = pool.acquire()
            box.run(CODE)
            t0 = time.perf_counter()
            box.reset()
            out["reset"].append(1000 * (time.perf_counter() - t0))
            pool.release(box)
            pool.idle()
    finally:
        pool.close()
    for _ in range(min(episodes, 20)):
        box = make_sandbox(backend, limits=Limits(), timeout_s=10)
        t0 = time.perf_counter()
        box.start()
        t1 = time.perf_counter()
        r = box.run(CODE)
        t2 = time.perf_counter()
        box.stop()
        assert r.ok, r.to_text()
        out["fresh"].append(1000 * (t1 - t0))
        out["fresh_first_call"].append(1000 * (t2 - t1))
    return out


def concurrency(backend: str, levels: list[int], calls: int) -> dict[int, dict[str, float]]:
    """Per N: call p50 / p95 with N episodes calling at once, and N live called one at a time."""
    most = max(levels)
    pool = SandboxPool(backend, size=most, limits=Limits(), timeout_s=30, workers=4)
    results: dict[int, dict[str, float]] = {}
    try:
        pool.warm(wait_s=600)
        boxes = [pool.acquire() for _ in range(most)]
        for box in boxes:
            for _ in range(3):
                box.run(CODE)  # warm-up
        for n in levels:
            latencies: list[list[float]] = [[] for _ in range(n)]
            barrier = threading.Barrier(n)

            def episode(
                i: int, barrier: threading.Barrier = barrier, latencies: list = latencies
            ) -> None:
                barrier.wait()
                for _ in range(calls):
                    t0 = time.perf_counter()
                    r = boxes[i].run(CODE)
                    latencies[i].append(1000 * (time.perf_counter() - t0))
                    assert r.ok, r.to_text()

            threads = [threading.Thread(target=episode, args=(i,)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            together = [x for lat in latencies for x in lat]
            one_by_one = []
            for k in range(max(calls, 20)):
                t1 = time.perf_counter()
                boxes[k % n].run(CODE)
                one_by_one.append(1000 * (time.perf_counter() - t1))
            results[n] = {
                "concurrent_p50_ms": percentile(together, 0.5),
                "concurrent_p95_ms": percentile(together, 0.95),
                "calls_per_s": n * calls / wall,
                "live_sequential_p50_ms": percentile(one_by_one, 0.5),
            }
        for box in boxes:
            pool.release(box)
    finally:
        pool.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="persistent calls per backend")
    parser.add_argument(
        "--fresh-calls", type=int, default=20, help="fresh-sandbox calls per backend"
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--episodes", type=int, default=40, help="pooled episode starts")
    parser.add_argument(
        "--concurrency", default="16,64", help="episodes running at once (comma-separated)"
    )
    parser.add_argument(
        "--concurrent-calls", type=int, default=20, help="calls per episode under concurrency"
    )
    args = parser.parse_args(argv)
    levels = sorted({1, *(int(n) for n in args.concurrency.split(",") if n)})

    console = Console(width=max(150, Console().width))
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

    start_table = Table(title="episode start: a ready sandbox, ms (p50 / p95)")
    for col in ("backend", "pool acquire", "fresh start", "fresh / pool", "reset (background)",
                "first call: pool", "first call: fresh", "target"):  # fmt: skip
        start_table.add_column(col, justify="right" if col != "backend" else "left")
    conc_table = Table(
        title=f"trivial call with N episodes at once, ms ({args.concurrent_calls} calls each; "
        f"{os.cpu_count()} CPU cores)"
    )
    for col in ("backend", "N", "p50 (all calling)", "p95", "vs N=1", "calls/s",
                "p50 (N live, one caller)", "vs N=1 ", "target"):  # fmt: skip
        conc_table.add_column(col, justify="right" if col != "backend" else "left")
    for backend in args.backends.split(","):
        if "unavailable" in results[backend]:
            continue
        st = episode_start(backend, args.episodes)
        row = {f"start_{k}_p50_ms": percentile(v, 0.5) for k, v in st.items()}
        row |= {f"start_{k}_p95_ms": percentile(v, 0.95) for k, v in st.items()}
        results[backend] |= row
        ok = row["start_pool_p50_ms"] <= TARGET_START_MS
        missed |= not ok
        start_table.add_row(
            backend,
            f"{row['start_pool_p50_ms']:.3f} / {row['start_pool_p95_ms']:.3f}",
            f"{row['start_fresh_p50_ms']:.1f} / {row['start_fresh_p95_ms']:.1f}",
            f"{row['start_fresh_p50_ms'] / max(row['start_pool_p50_ms'], 1e-6):.0f}x",
            f"{row['start_reset_p50_ms']:.1f} / {row['start_reset_p95_ms']:.1f}",
            f"{row['start_pool_first_call_p50_ms']:.2f}",
            f"{row['start_fresh_first_call_p50_ms']:.2f}",
            _verdict(ok, f"p50 <= {TARGET_START_MS:g} ms"),
        )
        conc = concurrency(backend, levels, args.concurrent_calls)
        results[backend]["concurrency"] = {str(n): v for n, v in conc.items()}
        single = conc[1]
        for n, c in conc.items():
            ratio = c["concurrent_p50_ms"] / single["concurrent_p50_ms"]
            live = c["live_sequential_p50_ms"] / single["live_sequential_p50_ms"]
            c["ratio_vs_single"], c["live_ratio_vs_single"] = ratio, live
            ok = n == 1 or ratio <= TARGET_CONCURRENCY_RATIO
            missed |= not ok
            conc_table.add_row(
                backend,
                str(n),
                f"{c['concurrent_p50_ms']:.2f}",
                f"{c['concurrent_p95_ms']:.2f}",
                f"{ratio:.1f}x",
                f"{c['calls_per_s']:.0f}",
                f"{c['live_sequential_p50_ms']:.2f}",
                f"{live:.1f}x",
                "" if n == 1 else _verdict(ok, f"<= {TARGET_CONCURRENCY_RATIO:g}x"),
            )
    console.print(start_table)
    console.print(conc_table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 1 if missed else 0


def _verdict(ok: bool, target: str) -> str:
    return f"[green]{target}[/]" if ok else f"[red]missed: {target}[/]"


if __name__ == "__main__":
    sys.exit(main())
