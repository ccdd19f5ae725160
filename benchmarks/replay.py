"""Replay speed and memory on large synthetic runs: is the viewer still fast at 100,000 episodes?

Run::

    python benchmarks/replay.py [--episodes 10000 100000] [--per-step 16] [--json out.json]

For each size it builds a run directory of that many synthetic episodes shaped like the default
code-sandbox job's (one segment of about 700 tokens, 3 turns, about 120 sampled tokens scored
with the teacher's top-16, tool calls and results). Writing every step through the store would
take minutes at 100k, so a few distinct steps are written with the real writer (their time per
step is reported) and every other step reuses one of their shard files by hard link, with its own
index lines: the index, which is what grows, is exactly what a real run of that size would have.

Then, each in a fresh process (so the numbers include nothing cached), it measures:

* ``first page``: open the run and read the viewer's first list page (200 episodes), target
  under 2 s; also with the terminal viewer itself (textual, headless) until its list is drawn;
* ``episode``: open one episode from the last step;
* ``filter``: a list page filtered on step and outcome (scans the whole index);
* ``html page``: export one HTML page of 200 episodes;
* ``peak RSS`` of each process (``VmHWM``); the target is that it does not grow with the
  run: at 10k and at 100k it should be about the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agentopd.replay.store import INDEX, shard_name, write_step
from agentopd.types import Episode, Message, Segment, StopReason, TeacherScores, ToolCall, Turn

TEMPLATES = 8


def synthetic_episode(rng: np.random.Generator, i: int) -> Episode:
    """One episode shaped like a default code-sandbox one."""
    prompt = rng.integers(5, 2000, 380).tolist()
    seg = Segment(prompt_len=len(prompt))
    seg.append(prompt, None, sampled=False)
    turns, messages = (
        [],
        [Message("system", "Solve the task with python. " * 8), Message("user", f"task {i}")],
    )
    for t in range(3):
        start = len(seg.tokens)
        n = int(rng.integers(25, 55))
        seg.append(
            rng.integers(5, 2000, n).tolist(),
            rng.normal(-0.6, 0.5, n).astype(np.float32).tolist(),
            sampled=True,
        )
        call = ToolCall("python", {"code": f"print(sum(range({i + t})))"}, id=f"call_{t}")
        result = Message(
            "tool",
            content=str(sum(range(i + t))) + "\n" * 2,
            name="python",
            tool_call_id=f"call_{t}",
        )
        turns.append(
            Turn(
                index=t,
                segment=0,
                start=start,
                end=start + n,
                text="<tool_call>..",
                tool_calls=[call],
                tool_results=[result],
            )
        )
        messages += [Message("assistant", "<tool_call>..", tool_calls=[call]), result]
        seg.append(rng.integers(5, 2000, 40).tolist(), None, sampled=False)
    pos = [p for p, m in enumerate(seg.mask) if m]
    scores = TeacherScores(
        positions_M=pos,
        logprobs_M=rng.normal(-1, 1, len(pos)).astype(np.float32).tolist(),
        topk_ids_M_K=rng.integers(0, 2000, (len(pos), 16)).tolist(),
        topk_logprobs_M_K=np.sort(rng.normal(-4, 2, (len(pos), 16)), axis=1)[:, ::-1]
        .astype(np.float32)
        .tolist(),
        entropy_M=rng.random(len(pos)).astype(np.float32).tolist(),
    )
    ok = bool(rng.random() < 0.4)
    return Episode(
        env="code-sandbox",
        task_id=f"task-{i % 997}",
        seed=i,
        messages=messages,
        segments=[seg],
        turns=turns,
        reward=float(ok),
        success=ok,
        stop_reason=StopReason.ANSWER if ok else StopReason.MAX_TURNS,
        info={"tool_errors": {} if ok else {"timeout": 1}},
        teacher=[scores],
    )


def build_run(root: Path, episodes: int, per_step: int) -> dict[str, float]:
    """A run directory of ``episodes`` episodes; returns the real writer's time per step."""
    rng = np.random.default_rng(0)
    steps = -(-episodes // per_step)
    t0 = time.perf_counter()
    templates = []
    for s in range(min(TEMPLATES, steps)):
        eps = [synthetic_episode(rng, s * per_step + j) for j in range(per_step)]
        templates.append((s, write_step(root, s, eps)))
    write_s = (time.perf_counter() - t0) / len(templates)
    lines = []
    for s in range(len(templates), steps):
        src_step, rows = templates[s % len(templates)]
        os.link(root / shard_name(src_step), root / shard_name(s))
        n = min(per_step, episodes - s * per_step)
        for j, r in enumerate(rows[:n]):
            d = {**r.__dict__, "id": f"{s}-{j}", "step": s, "shard": shard_name(s)}
            lines.append(json.dumps(d) + "\n")
        if len(lines) > 50_000:
            with open(root / INDEX, "a") as f:
                f.writelines(lines)
            lines = []
    with open(root / INDEX, "a") as f:
        f.writelines(lines)
    shard_bytes = sum((root / shard_name(s)).stat().st_size for s, _ in templates) / len(templates)
    return {
        "write_step_s": write_s,
        "shard_mb_per_step": shard_bytes / 1e6,
        "index_mb": (root / INDEX).stat().st_size / 1e6,
    }


PROBE = r"""
import json, sys, time
run, what = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
from agentopd.replay.store import EpisodeStore, parse_filter
from agentopd.replay.view import Decoder
if what == "tui":
    import asyncio
    from agentopd.replay.tui import ReplayApp
if what == "html":
    from agentopd.replay.html import write_page
import_s = time.perf_counter() - t0
out = {"import_s": import_s}
t0 = time.perf_counter()
store = EpisodeStore(run)
if what == "first_page":
    page = store.page(0, 200)
    assert len(page.rows) == 200
elif what == "episode":
    last = store.row_at(len(store) - 1)
    ep = store.episode(last)
    assert ep.turns
elif what == "filter":
    page = store.page(0, 200, parse_filter(f"step=0..{len(store) // 32} solved"))
    assert page.rows
elif what == "html":
    write_page(store, __import__("pathlib").Path(sys.argv[3]), Decoder(None), page=3, page_size=200)
elif what == "tui":
    async def go():
        app = ReplayApp(store, Decoder(None))
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            assert app.query_one("#list").row_count == 200
    asyncio.run(go())
out["seconds"] = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent that forked us.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
out["peak_rss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else float("nan")
print(json.dumps(out))
"""


def probe(run: Path, what: str, *extra: str) -> dict[str, float]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(run), what, *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"probe {what} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--per-step", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--dir", type=Path, help="build the runs here (default: a temp dir)")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in args.episodes:
            run = Path(tmp) / f"run-{n}"
            t0 = time.perf_counter()
            built = build_run(run, n, args.per_step)
            built["build_s"] = time.perf_counter() - t0
            console.print(f"built {n} episodes in {built['build_s']:.1f} s: {built}")
            row = {"build": built}
            for what in ("first_page", "tui", "episode", "filter", "html"):
                extra = [str(Path(tmp) / f"page-{n}.html")] if what == "html" else []
                row[what] = probe(run, what, *extra)
                console.print(f"  {what}: {row[what]}")
            results[n] = row
    table = Table(title="agentopd replay on synthetic runs (fresh process per measurement)")
    table.add_column("episodes", justify="right")
    for col in (
        "first page s",
        "TUI first page s",
        "episode s",
        "filter s",
        "HTML page s",
        "peak RSS MB (first page / TUI / html)",
    ):
        table.add_column(col, justify="right")
    for n, row in results.items():
        table.add_row(
            f"{n:,}",
            f"{row['first_page']['seconds']:.3f}",
            f"{row['tui']['seconds']:.3f}",
            f"{row['episode']['seconds']:.3f}",
            f"{row['filter']['seconds']:.3f}",
            f"{row['html']['seconds']:.3f}",
            f"{row['first_page']['peak_rss_mb']:.0f} / {row['tui']['peak_rss_mb']:.0f} / {row['html']['peak_rss_mb']:.0f}",
        )
    console.print(table)
    first = next(iter(results.values()))
    console.print(
        "import time, not included above: agentopd.replay.store "
        f"{first['first_page']['import_s']:.2f} s, with textual {first['tui']['import_s']:.2f} s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    ok = all(row["first_page"]["seconds"] < 2.0 for row in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
