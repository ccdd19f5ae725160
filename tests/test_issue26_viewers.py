"""Viewers treat transcripts as hostile (issue 26).

A hostile env and a scripted student play real episodes through the rollout loop; the episodes
are written with the store's own writer, so every string travels the way a training run's do.
The model and the env write ``<!--<script>``, terminal escape sequences (OSC 52 clipboard,
window title, clear screen, OSC 8 link), bidi controls and Rich markup (``[/]``, also in the task
id). Damaged run directories (a truncated shard, a 0-byte shard, bad index lines, a legacy
``episodes.jsonl`` with garbage) open as far as they are intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agentopd import Env, Task, register, tool
from agentopd.engines import Sample, SamplingParams
from agentopd.registry import unregister
from agentopd.renderer import Renderer
from agentopd.replay.store import INDEX, LEGACY, EpisodeStore, write_step
from agentopd.rollout import EpisodeJob, run_episodes
from agentopd.types import Message
from agentopd.zoo.tokenizer import load_tokenizer

OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"  # writes "rm -rf ~" to the user's clipboard
TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J\x1b[H"
OSC8 = "\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\"
C1 = "\x9b31m"  # 8-bit CSI
BIDI = "\u202e\u2066"
HTML = "<!--<script>"
MARKUP = "[/] [bold]x[/bold] [link=http://e]"
HOSTILE = f"{HTML} {OSC52}{TITLE}{CLEAR}{OSC8}{C1} {BIDI}evil{MARKUP}"
TASK_ID = "task[/]" + BIDI + "\x1b[2J"
ESCAPES = ("\x1b", "\x07", "\x9b", "\u202e", "\u2066")


class HostileEnv(Env):
    """Every string it shows the model is hostile: the task id, the prompt and each tool result."""

    description = "test env whose strings attack the viewers"

    def new_task(self, rng: Any, options: dict[str, Any]) -> Task:
        return Task(id=TASK_ID, prompt="Call echo. " + HOSTILE, answer="ok")

    def build_tools(self, task: Task) -> list[Any]:
        @tool
        def echo() -> str:
            """Echo something."""
            return "result " + HOSTILE

        return [echo]

    def check_answer(self, task: Task, answer: str) -> bool:
        return answer == "ok"

    def expert_action(self, messages: list[Message]) -> str:
        return self.call("echo") if messages[-1].role == "user" else self.submit_call("ok")


class ScriptedEngine:
    """The student: writes hostile text before its tool call on each turn."""

    def __init__(self, renderer: Renderer, texts: list[str]):
        self.renderer, self.texts = renderer, texts

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        out = []
        for p in prompts:
            n = (sum(1 for t in p if t == self.renderer.eot_id) - 2) // 2
            text = self.texts[min(n, len(self.texts) - 1)]
            toks = self.renderer.encode(text) + [self.renderer.eot_id]
            out.append(Sample(tokens=toks, logprobs=[-0.5] * len(toks), finished=True))
        return out

    def load_weights(self, state_dict: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with two steps of hostile episodes (the store's own writer)."""
    register("test-hostile-viewer", entry_point=f"{__name__}:HostileEnv")
    try:
        r = Renderer(load_tokenizer())
        probe = HostileEnv()
        engine = ScriptedEngine(
            r, [HOSTILE + "\n" + probe.call("echo"), HOSTILE + probe.submit_call("ok")]
        )
        root = tmp_path_factory.mktemp("hostile") / "run"
        for step in (0, 1):
            eps = run_episodes([EpisodeJob("test-hostile-viewer", s) for s in range(2)], engine, r)
            assert all(ep.turns for ep in eps)
            write_step(root, step, eps)
    finally:
        unregister("test-hostile-viewer")
    return root


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from agentopd.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_no_raw_escapes(text: str) -> None:
    for c in ESCAPES:
        assert c not in text, f"{c!r} reached the terminal raw"
    for c in "\x00\x08\x0b\x0c\x0d\x7f":
        assert c not in text, f"{c!r} reached the terminal raw"


# ----------------------------------------------------------------------------------- terminal
def test_printed_episode_and_tokens_escape_controls(hostile_run: Path, capsys):
    store = EpisodeStore(hostile_run)
    assert store.row_at(0).task_id == TASK_ID  # the strings did travel through the store
    rc, out, err = cli(capsys, "replay", str(hostile_run), "--episode", "0-0", "--tokens")
    assert rc == 0, err
    assert_no_raw_escapes(out + err)
    flat = re.sub(r"\s+", "", out)  # the console wraps at 80 columns under pytest
    assert "␛]52;c;cm0gLXJmIH4=␇" in flat  # shown, visibly
    assert "⟨U+202E⟩⟨U+2066⟩" in flat and "⟨U+009B⟩" in flat
    assert "task[/]" in flat and "[bold]x[/bold]" in flat  # markup shown as text, not applied


def test_list_and_non_tty_view_do_not_read_markup(hostile_run: Path, capsys):
    rc, out, err = cli(capsys, "replay", str(hostile_run), "--list")
    assert rc == 0, err
    assert "task[/]⟨U+202E⟩" in re.sub(r"\s+", "", out)
    assert_no_raw_escapes(out + err)
    rc, out, err = cli(capsys, "replay", str(hostile_run))  # not a TTY under pytest
    assert rc == 0, err
    assert "task[/]" in out


def test_terminal_viewer_shows_markers(hostile_run: Path):
    import asyncio

    from agentopd.replay.tui import ReplayApp
    from agentopd.replay.view import Decoder, find_tokenizer

    store = EpisodeStore(hostile_run)
    app = ReplayApp(store, Decoder(find_tokenizer(hostile_run)), episode="0-1")

    async def drive() -> str:
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause()
            return app.export_screenshot()

    svg = asyncio.run(drive())
    assert "⟨U+202E⟩" in svg and "␛" in svg
    assert "\u202e" not in svg and "\x1b" not in svg


# ----------------------------------------------------------------------------------- html
def page_data(page: str) -> dict[str, Any]:
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m[1])


def test_embedded_json_cannot_leave_its_script_element(hostile_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "page.html"
    rc, _, err = cli(capsys, "replay", str(hostile_run), "--html", str(out))
    assert rc == 0, err
    page = out.read_text()
    blob = re.search(r'<script id="data" type="application/json">(.*)', page, re.S)[1]
    blob = blob[: blob.index("</script>")]
    assert "<" not in blob and ">" not in blob  # nothing the HTML parser could act on
    data = page_data(page)
    assert data["rows"][0]["task_id"] == TASK_ID and len(data["episodes"]) == 4
    assert HTML in json.dumps(data["episodes"], ensure_ascii=False)  # lossless
    diff = tmp_path / "diff.html"
    rc, _, err = cli(capsys, "replay", str(hostile_run), str(hostile_run), "--html", str(diff))
    assert rc == 0, err
    assert len(page_data(diff.read_text())["rows"]) == 4


def require_chromium() -> None:
    from replay_chromium import chromium_path

    if chromium_path() is not None:
        return
    if "chromium" in {
        b.strip() for b in os.environ.get("AGENTOPD_REQUIRE_BACKENDS", "").split(",")
    }:
        pytest.fail("chromium is required by AGENTOPD_REQUIRE_BACKENDS but not on PATH")
    pytest.skip("chromium not on PATH (apt-get install chromium)")


@pytest.mark.chromium
def test_hostile_page_and_diff_render_in_chromium(hostile_run: Path, tmp_path: Path):
    require_chromium()
    from replay_chromium import Chromium

    from agentopd.replay.html import write_diff, write_page
    from agentopd.replay.view import Decoder, find_tokenizer

    store = EpisodeStore(hostile_run)
    decoder = Decoder(find_tokenizer(hostile_run))
    page, diff = tmp_path / "page.html", tmp_path / "diff.html"
    write_page(store, page, decoder)
    write_diff(store, EpisodeStore(hostile_run), diff, decoder)
    with Chromium() as c:
        c.open(page)
        assert c.js("document.querySelectorAll('#list tr.row').length") == 4
        assert c.js("document.querySelectorAll('#view .turn').length") == 2
        text = c.js("document.getElementById('view').innerText")
        assert HTML in text and "⟨U+202E⟩⟨U+2066⟩evil" in text and "␛]52" in text
        assert "\u202e" not in text and "\x1b" not in text
        listed = c.js("document.getElementById('list').innerText")
        assert "task[/]⟨U+202E⟩" in listed
        c.open(diff)
        assert c.js("document.querySelectorAll('#list tr.row').length") == 4
        assert "⟨U+202E⟩" in c.js("document.getElementById('view').innerText")


def test_serve_checks_the_host_header(hostile_run: Path):
    from agentopd.replay.html import make_server
    from agentopd.replay.view import Decoder

    server = make_server(EpisodeStore(hostile_run), Decoder(None), port=0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def get(path: str, host: str | None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if host is not None:
            req.add_unredirected_header("Host", host)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}"):
            for path in ("/", "/api/page", "/api/episode?id=0-0"):
                code, body = get(path, host)
                assert code == 421 and b"evil" not in body, (host, path)
        assert get("/api/episode?id=0-0", f"127.0.0.1:{port}")[0] == 200
        code, body = get("/api/episode?id=0-0", f"localhost:{port}")
        assert code == 200 and "evil" in json.loads(body)["episode"]["turns"][0]["text"]
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------- damaged
@pytest.fixture
def damaged(hostile_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run)
    return run


def test_truncated_and_empty_shards(damaged: Path, tmp_path: Path, capsys):
    shard = damaged / "episodes" / "step_000001.npz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rc, out, err = cli(capsys, "replay", str(damaged), "--episode", "1-0")
    assert rc == 2 and "step_000001.npz" in err and "truncated or damaged" in err
    assert "Traceback" not in err
    rc, out, err = cli(capsys, "replay", str(damaged), "--episode", "0-1")
    assert rc == 0 and "result" in out
    page = tmp_path / "p.html"
    rc, out, err = cli(capsys, "replay", str(damaged), "--html", str(page))
    assert rc == 0 and "warning:" in err and "step_000001.npz" in err
    data = page_data(page.read_text())
    assert sorted(data["episodes"]) == ["0-0", "0-1"] and len(data["rows"]) == 4
    assert any("step_000001.npz" in p for p in data["problems"])
    jsonl = tmp_path / "out.jsonl"
    rc, out, err = cli(capsys, "export", str(damaged), "--jsonl", str(jsonl))
    assert rc == 0 and "2 episodes" in out and "step_000001.npz" in err
    shard.write_bytes(b"")
    rc, out, err = cli(capsys, "replay", str(damaged), "--episode", "1-1")
    assert rc == 2 and "step_000001.npz" in err and "Traceback" not in err
    rc, out, err = cli(capsys, "replay", str(damaged), "--filter", "evil", "--list")
    assert rc == 0 and "0-0" in out and "step_000001.npz" in err


@pytest.mark.parametrize(
    "bad",
    [
        b"garbage, not json",
        b'{"id": "0-9", "step": 0}',  # missing fields
        b'{"id": "0-9", "step": "zero", "env": "e", "task_id": "t", "seed": 1, "reward": 0, '
        b'"success": false, "turns": 1, "stop_reason": "answer"}',  # wrong type
        b"[1, 2]",
        b'{"id": 5, "step": 0, "env": "e", "task_id": "t", "seed": 1, "reward": 0, '
        b'"success": false, "turns": 1, "stop_reason": "answer", "tool_errors": {"x": "y"}}',
    ],
)
def test_a_bad_index_line_is_named_and_skipped(damaged: Path, capsys, bad: bytes):
    index = damaged / INDEX
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:2]) + bad + b"\n" + b"".join(lines[2:]))
    for args in ([], ["--list"], ["--filter", "solved", "--list"], ["--episode", "1-1"]):
        rc, out, err = cli(capsys, "replay", str(damaged), *args)
        assert rc == 0, err
        assert "episodes/index.jsonl line 3" in err and "skipped" in err, args
        assert "Traceback" not in err
    rc, out, err = cli(capsys, "replay", str(damaged), "--list")
    assert all(i in out for i in ("0-0", "0-1", "1-0", "1-1"))
    store = EpisodeStore(damaged)
    assert [r.id for r in store.rows()] == ["0-0", "0-1", "1-0", "1-1"]
    assert [r.id for _, r in zip(range(9), (row for row, _ in store.iter_episodes()))] == [
        "0-0",
        "0-1",
        "1-0",
        "1-1",
    ]


def test_legacy_episodes_jsonl_with_garbage(hostile_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "legacy"
    run.mkdir()
    rc, _, err = cli(capsys, "export", str(hostile_run), "--jsonl", str(run / LEGACY))
    assert rc == 0, err
    lines = (run / LEGACY).read_bytes().splitlines(keepends=True)
    (run / LEGACY).write_bytes(
        lines[0] + b"not json\n" + b"[]\n" + b'{"step": "x"}\n' + b"".join(lines[1:])
    )
    rc, out, err = cli(capsys, "replay", str(run), "--list")
    assert rc == 0, err
    for n in (2, 3, 4):
        assert f"{LEGACY} line {n}" in err
    assert "Traceback" not in err
    rc, out, err = cli(capsys, "replay", str(run), "--episode", "1-1")
    assert rc == 0 and "result" in out, err
    assert len(EpisodeStore(run)) == 4


def test_export_to_a_terminal_writes_no_raw_controls(hostile_run: Path, monkeypatch):
    import io

    from agentopd.replay.export import write_jsonl

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stdout", term)
    assert write_jsonl(EpisodeStore(hostile_run), "-") == 4
    text = term.getvalue()
    assert_no_raw_escapes(text)
    assert json.loads(text.splitlines()[0])["task_id"] == TASK_ID  # the same data
