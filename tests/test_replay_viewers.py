"""The viewers on real run directories from two short training runs: the terminal viewer driven
by textual's Pilot, the printed episode, the HTML page and the diff of two runs in headless
Chromium (marked ``chromium``), ``--serve``, plots, exports, and ``agentopd eval``'s run
directory. No viewer may change a run directory."""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import os
import re
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import agentopd

from agentopd import seeds
from agentopd.replay.store import EpisodeStore, parse_filter
from agentopd.replay.view import Decoder, build_view, find_tokenizer

pytestmark = pytest.mark.slow  # one session fixture trains two short runs (about a minute)


@dataclass
class Runs:
    a: Path
    """tiny-teacher-lookup-chain sampling at temperature 1.5: mostly solved."""
    b: Path
    """tiny-teacher-sql playing lookup-chain: fails, with tool errors."""


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("replay-runs")
    common = [
        "train",
        "env=lookup-chain",
        "steps=2",
        "episodes_per_step=4",
        "cold_start.steps=0",
        "eval.episodes=4",
        "eval.before=false",
        f"runs_dir={root}",
    ]
    for name, extra in (
        ("a", ["student=tiny-teacher-lookup-chain"]),
        ("b", ["student=tiny-teacher-sql"]),
    ):
        r = agentopd(*common, *extra, f"run_name={name}", timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return Runs(root / "a", root / "b")


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``root`` with size, mtime and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from agentopd.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_runs_use_the_store(runs: Runs):
    for run in (runs.a, runs.b):
        assert (run / "episodes" / "index.jsonl").is_file()
        assert not (run / "episodes.jsonl").exists()
        store = EpisodeStore(run)
        assert len(store) == 8 and not store.problems
        assert {r.step for r in store.rows()} == {0, 1}
    rows_b = list(EpisodeStore(runs.b).rows())
    assert all(r.teacher_kl is not None for r in rows_b)
    assert any(sum(r.tool_errors.values()) for r in rows_b)


# ----------------------------------------------------------------------------------- terminal
def screen_text(app: object) -> str:
    """What the terminal shows, as plain text (from textual's SVG screenshot)."""
    svg = app.export_screenshot()  # type: ignore[attr-defined]
    lines = re.findall(r"<text[^>]*>(.*?)</text>", svg, flags=re.S)
    return html.unescape("".join(lines)).replace("\xa0", " ")


def test_terminal_viewer_with_pilot(runs: Runs, tmp_path: Path):
    from textual.widgets import DataTable

    from agentopd.replay.tui import ReplayApp

    before = snapshot(runs.b)
    store = EpisodeStore(runs.b)
    first = store.episode("0-0")
    call = first.turns[0].tool_calls[0] if first.turns[0].tool_calls else None
    result = first.turns[0].tool_results[0].content if first.turns[0].tool_results else ""

    async def drive() -> None:
        app = ReplayApp(store, Decoder(find_tokenizer(runs.b)))
        async with app.run_test(size=(220, 70)) as pilot:
            await pilot.pause()
            table = app.query_one("#list", DataTable)
            assert table.row_count == 8
            text = screen_text(app)
            assert "0-0" in text and "1-3" in text and "8 of 8 episodes" in text
            assert "episode 0-0" in text and "turn 0" in text
            assert "tool call" in text and "result" in text
            if call is not None:
                assert call.name in text
            assert result.splitlines()[0][:40] in text
            assert "teacher top-k at this token" in text and "token 1/" in text
            await pilot.press("right_square_bracket", "right_square_bracket")
            assert "token 3/" in screen_text(app)
            await pilot.press("down")
            await pilot.pause()
            assert "episode 0-1" in screen_text(app)
            await pilot.press("slash")
            for ch in "step=1":
                await pilot.press(ch)
            await pilot.press("enter")
            await pilot.pause()
            assert table.row_count == 4
            text = screen_text(app)
            assert "4 of 8 episodes match the filter" in text and "episode 1-0" in text
            app.save_screenshot(str(tmp_path / "tui.svg"))

    asyncio.run(drive())
    assert (tmp_path / "tui.svg").stat().st_size > 10_000
    assert snapshot(runs.b) == before


def test_print_one_episode_untruncated(
    runs: Runs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("COLUMNS", "240")  # a wide terminal: no header is cut to an ellipsis
    store = EpisodeStore(runs.b)
    ep = store.episode("1-2")
    rc, out, err = cli(capsys, "replay", str(runs.b), "--episode", "1-2", "--tokens")
    assert rc == 0, err
    assert "episode 1-2" in out and "FAILED" in out
    flat = re.sub(r"\s+", "", out)
    for turn in ep.turns:
        for m in turn.tool_results:
            assert re.sub(r"\s+", "", m.content) in flat  # every result, in full
    # Layout-free: a narrow terminal may wrap the table's headers.
    assert "sampledtokensofepisode1-2" in flat and "teachertop-3" in flat
    rc, _, err = cli(capsys, "replay", str(runs.b), "--episode", "7-7")
    assert rc == 2 and "no episode '7-7'" in err


def test_view_model_aligns_teacher_scores(runs: Runs):
    store = EpisodeStore(runs.b)
    row = store.find("0-1")
    ep = store.episode(row)
    view = build_view(store.episode_dict(row), row, Decoder(find_tokenizer(runs.b)))
    sampled = [t for turn in view.turns for t in turn.tokens if t.mask]
    assert len(sampled) == ep.num_sampled_tokens
    seg, scores = ep.segments[0], ep.teacher[0]
    pos = int(scores.positions_M[3])
    tok = sampled[3]
    assert tok.id == seg.tokens[pos]
    assert tok.disagreement == pytest.approx(seg.logprobs[pos] - float(scores.logprobs_M[3]))
    assert [t[0] for t in tok.topk] == scores.topk_ids_M_K[3].tolist()
    assert view.kl == pytest.approx(row.teacher_kl)


# ----------------------------------------------------------------------------------- html
REQUIRE_ENV = "AGENTOPD_REQUIRE_BACKENDS"


def require_chromium() -> None:
    """Skip without Chromium, or fail when ``AGENTOPD_REQUIRE_BACKENDS`` lists ``chromium``."""
    from replay_chromium import chromium_path

    if chromium_path() is not None:
        return
    required = {b.strip() for b in os.environ.get(REQUIRE_ENV, "").split(",")}
    if "chromium" in required:
        pytest.fail(
            f"chromium is required by {REQUIRE_ENV} but not on PATH (apt-get install chromium)"
        )
    pytest.skip("chromium not on PATH (apt-get install chromium)")


def test_html_is_self_contained(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    before = snapshot(runs.b)
    out = tmp_path / "b.html"
    rc, _, err = cli(capsys, "replay", str(runs.b), "--html", str(out))
    assert rc == 0, err
    page = out.read_text()
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    data = json.loads(
        re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)[
            1
        ].replace("<\\/", "</")
    )
    assert len(data["rows"]) == 8 and len(data["episodes"]) == 8
    assert snapshot(runs.b) == before


@pytest.mark.chromium
def test_html_viewer_in_chromium(runs: Runs, tmp_path: Path):
    require_chromium()
    from replay_chromium import Chromium

    from agentopd.replay.html import write_page

    store = EpisodeStore(runs.b)
    out = tmp_path / "b.html"
    write_page(store, out, Decoder(find_tokenizer(runs.b)))
    first = store.episode("0-0")
    with Chromium(width=1400, height=900) as c:
        c.call("Network.enable")
        c.open(out)
        assert all(u.startswith(("file:", "data:", "about:")) for u in c.network_requests())
        assert c.js("document.querySelectorAll('#list tr.row').length") == 8
        assert c.js("document.querySelectorAll('#view .turn').length") == first.num_turns
        assert c.js("document.querySelectorAll('#view .strip .cell').length") == first.num_turns
        results = c.js(
            "[...document.querySelectorAll('#view .calls .result pre')].map(e => e.textContent)"
        )
        expected = [m.content for t in first.turns for m in t.tool_results]
        assert results[: len(expected)] == expected  # each result in full, beside its call
        n_sampled = c.js("document.querySelectorAll('#view .tok.m1').length")
        assert n_sampled == first.num_sampled_tokens
        # hover a sampled token with the mouse: the teacher's top-k appears
        x, y = c.js(
            "(() => { const r = document.querySelectorAll('#view .tok.m1')[2].getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        assert c.js("getComputedStyle(document.getElementById('tip')).display") == "none"
        c.hover(x, y)
        tip = c.js("document.getElementById('tip').innerText")
        assert c.js("getComputedStyle(document.getElementById('tip')).display") == "block"
        assert "teacher top-k" in tip and "log p − log q" in tip
        assert c.js("document.querySelectorAll('#tip table.topk tr').length") == 16
        shot = c.screenshot(tmp_path / "html.png")
        assert shot.stat().st_size > 20_000
        # the filters and the search
        c.js(
            "document.getElementById('f-step').value = '1';"
            "document.getElementById('f-step').dispatchEvent(new Event('change'))"
        )
        assert c.js("document.querySelectorAll('#list tr.row').length") == 4
        c.js(
            "document.getElementById('f-step').value = '';"
            "document.getElementById('f-step').dispatchEvent(new Event('change'))"
        )
        # an episode of step 1 with a tool result: its text is the search needle
        key, needle = next(
            (r.id, m.content[:30])
            for r in store.rows()
            if r.step == 1
            for t in store.episode(r.id).turns
            for m in t.tool_results
        )
        c.js(
            f"const s = document.getElementById('f-text'); s.value = {json.dumps(needle)};"
            "s.dispatchEvent(new Event('input'))"
        )
        shown = c.js("[...document.querySelectorAll('#list tr.row')].map(r => r.dataset.key)")
        assert key in shown and len(shown) < 8


@pytest.mark.chromium
def test_diff_of_two_runs_in_chromium(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    require_chromium()
    from replay_chromium import Chromium

    before = snapshot(runs.a), snapshot(runs.b)
    out = tmp_path / "diff.html"
    rc, stdout, err = cli(capsys, "replay", str(runs.a), str(runs.b), "--html", str(out))
    assert rc == 0, err
    assert "compared 8 tasks" in stdout
    solved_a = sum(r.success for r in EpisodeStore(runs.a).rows())
    with Chromium() as c:
        c.open(out)
        rows = c.js("document.querySelectorAll('#list tr.row').length")
        assert rows == 8
        cells = c.js(
            "[...document.querySelectorAll('#list tr.row')].map(r => [...r.cells].map(x => x.textContent))"
        )
        assert sum(row[2] == "solved" for row in cells) == solved_a
        assert all(row[3] == "failed" for row in cells)
        assert all(row[4].startswith("turn ") for row in cells)  # the runs diverge somewhere
        assert c.js("document.querySelectorAll('#view .cols > div').length") == 2
        assert "the runs diverge here" in c.js("document.getElementById('view').innerText")
        c.js(
            "document.getElementById('f-out').value = 'a';"
            "document.getElementById('f-out').dispatchEvent(new Event('change'))"
        )
        assert c.js("document.querySelectorAll('#list tr.row').length") == solved_a
        c.screenshot(tmp_path / "diff.png")
    assert (snapshot(runs.a), snapshot(runs.b)) == before


@pytest.mark.chromium
def test_served_viewer_in_chromium(runs: Runs):
    require_chromium()
    from replay_chromium import Chromium

    from agentopd.replay.html import make_server

    store = EpisodeStore(runs.b)
    server = make_server(store, Decoder(find_tokenizer(runs.b)), port=0, page_size=3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Chromium() as c:
            c.call("Page.navigate", url=f"http://127.0.0.1:{server.server_address[1]}/")
            c.js(
                "new Promise(r => { const t = setInterval(() => { if (document.querySelector('#view .turn')) { clearInterval(t); r(1); } }, 50); })"
            )
            assert c.js("document.querySelectorAll('#list tr.row').length") == 3
            assert "page 1/3" in c.js("document.getElementById('count').innerText")
            c.js("document.getElementById('next').click()")
            c.js("new Promise(r => setTimeout(r, 500))")
            keys = c.js("[...document.querySelectorAll('#list tr.row')].map(r => r.dataset.key)")
            assert keys == ["0-3", "1-0", "1-1"]
            assert c.js("document.querySelectorAll('#view .tok.m1').length") > 0
    finally:
        server.shutdown()
        server.server_close()


def test_serve_pages_and_episodes(runs: Runs):
    from agentopd.replay.html import make_server

    store = EpisodeStore(runs.a)
    server = make_server(store, Decoder(find_tokenizer(runs.a)), port=0, page_size=3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert '"served": true' in page
        body = json.loads(urllib.request.urlopen(base + "/api/page?n=2", timeout=10).read())
        assert body["pages"] == 3 and [r["id"] for r in body["rows"]] == ["1-2", "1-3"]
        q = urllib.parse.quote("step=0")
        body = json.loads(urllib.request.urlopen(f"{base}/api/page?n=0&q={q}", timeout=10).read())
        assert body["matching"] == 4
        ep = json.loads(urllib.request.urlopen(base + "/api/episode?id=1-3", timeout=10).read())
        assert ep["episode"]["id"] == "1-3" and ep["episode"]["turns"] and ep["vocab"]
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------- plot, export
def test_plot_two_runs(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    before = snapshot(runs.a)
    out = tmp_path / "curves.png"
    rc, _, err = cli(capsys, "plot", str(runs.a), str(runs.b), "-o", str(out), "--label", "A")
    assert rc == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    rc, _, err = cli(capsys, "plot", str(tmp_path / "missing"), "-o", str(out))
    assert rc == 2 and "no run directory" in err
    assert snapshot(runs.a) == before


def test_export_jsonl_roundtrip(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from agentopd.types import Episode

    before = snapshot(runs.b)
    out = tmp_path / "b.jsonl"
    rc, _, err = cli(capsys, "export", str(runs.b), "--jsonl", str(out))
    assert rc == 0, err
    lines = out.read_text().splitlines()
    store = EpisodeStore(runs.b)
    assert len(lines) == len(store)
    for line, row in zip(lines, store.rows()):
        d = json.loads(line)
        assert (d["id"], d["step"]) == (row.id, row.step)
        assert Episode.from_json(line).to_json() == store.episode(row).to_json()
    # the exported file is an old-style run directory that the viewer reads the same way
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "episodes.jsonl").write_text(out.read_text())
    old = EpisodeStore(legacy)
    assert [r.id for r in old.rows()] == [r.id for r in store.rows()]
    assert old.episode("1-1").to_json() == store.episode("1-1").to_json()
    assert snapshot(runs.b) == before


def test_export_inspect_read_back(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from inspect_ai.log import read_eval_log

    before = snapshot(runs.b)
    out = tmp_path / "b.eval"
    rc, _, err = cli(capsys, "export", str(runs.b), "--inspect", str(out))
    assert rc == 0, err
    log = read_eval_log(str(out))
    store = EpisodeStore(runs.b)
    assert log.status == "success" and len(log.samples) == len(store)
    by_id = {s.metadata["agentopd_id"]: s for s in log.samples}
    for row in store.rows():
        s, ep = by_id[row.id], store.episode(row)
        assert s.scores["success"].value == (1.0 if row.success else 0.0)
        assert s.scores["reward"].value == row.reward
        assert [m.role for m in s.messages][:2] == ["system", "user"]
        assistant = [m for m in s.messages if m.role == "assistant"]
        assert len(assistant) == ep.num_turns
        assert [m.text for m in assistant] == [t.text for t in ep.turns]
        calls = [c.function for m in assistant for c in (m.tool_calls or [])]
        assert calls == [c.name for t in ep.turns for c in t.tool_calls]
        tools = [m for m in s.messages if m.role == "tool"]
        assert [m.text for m in tools] == [r.content for t in ep.turns for r in t.tool_results]
        ids = {c.id for m in assistant for c in (m.tool_calls or [])}
        assert all(m.tool_call_id in ids for m in tools if m.function != "error")
    assert snapshot(runs.b) == before


# ----------------------------------------------------------------------------------- eval
def test_eval_writes_its_own_run_and_reproduces_training(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "eval", "env=lookup-chain", f"model={runs.a}", "episodes=4")
    assert rc == 0, err
    eval_dir = runs.a.parent / "eval-lookup-chain-a-s0"  # beside the run it evaluated
    store = EpisodeStore(eval_dir)
    first = seeds.task_base(0, "eval")  # training's held-out tasks for seed 0
    assert len(store) == 4 and [r.seed for r in store.rows()] == [first + i for i in range(4)]
    mine = [json.loads(x) for x in (eval_dir / "metrics.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (runs.a / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in train if r.get("tag") == "after training"][-1]
    for key in (
        "eval/success",
        "eval/mean_turns",
        "eval/success_by_difficulty",
        "eval/stop_reasons",
    ):
        assert mine[0][key] == after[key], key
    assert "agentopd replay" in out
    # pass@k at temperature 0 warns that the samples are identical
    rc, _, err = cli(
        capsys, "eval", "env=lookup-chain", f"model={runs.a}", "episodes=1", "samples=2"
    )
    assert rc == 0 and "pass@k equals pass@1" in err
    assert (runs.a.parent / "eval-lookup-chain-a-s0-2" / "episodes" / "index.jsonl").is_file()
    # runs_dir and run_name place the eval run; a name that holds a run is refused up front
    rc, _, err = cli(
        capsys,
        "eval",
        f"model={runs.a}",
        "episodes=1",
        f"runs_dir={tmp_path / 'evals'}",
        "run_name=mine",
    )
    assert rc == 0, err
    assert (tmp_path / "evals" / "mine" / "metrics.jsonl").is_file()
    rc, _, err = cli(
        capsys,
        "eval",
        f"model={runs.a}",
        "episodes=1",
        f"runs_dir={tmp_path / 'evals'}",
        "run_name=mine",
    )
    assert rc == 2 and "already holds a run" in " ".join(err.split())
    assert len((tmp_path / "evals" / "mine" / "metrics.jsonl").read_text().splitlines()) == 1
    # a zoo model has no run directory: the eval run goes to runs/ under the working directory
    from agentopd.cli import _runs_root_of

    assert _runs_root_of("tiny-teacher-lookup-chain") == Path("runs")
    assert _runs_root_of(str(runs.a / "checkpoints" / "step_000001" / "model")) == runs.a.parent


def test_filters_match_the_index(runs: Runs):
    store = EpisodeStore(runs.b)
    errors = {k for r in store.rows() for k, v in r.tool_errors.items() if v}
    kind = sorted(errors)[0]
    expected = [r.id for r in store.rows() if r.tool_errors.get(kind, 0) > 0 and r.step == 1]
    got = [r.id for r in store.page(0, 50, parse_filter(f"error={kind} step=1")).rows]
    assert got == expected and got
