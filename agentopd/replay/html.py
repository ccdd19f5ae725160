"""``agentopd replay RUN --html OUT.html``: one self-contained page (no network assets), the diff
of two runs, and ``--serve`` for browsing every page of a large run from 127.0.0.1.

The page holds one list page of episodes (``--page``, ``--page-size``) with the filters and the
text search, each episode's turns with tokens shaded by the teacher's disagreement, the teacher's
top-k on hover, each tool call beside its full result, and a strip of per-turn teacher KL.
Everything (CSS, JS, data) is inlined; the data is JSON in a ``<script type="application/json">``.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from agentopd.replay.store import (
    READ_ERRORS,
    EpisodeStore,
    Filter,
    IndexRow,
    Page,
    parse_filter,
)
from agentopd.replay.text import LEGEND
from agentopd.replay.view import SHADE_CLIP, Decoder, EpisodeView, build_view, visible


def _asset(name: str) -> str:
    return (importlib.resources.files("agentopd.replay") / "assets" / name).read_text("utf-8")


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def episode_payload(view: EpisodeView, vocab: dict[int, str], decode: Decoder) -> dict[str, Any]:
    """The compact JSON the page renders; token texts go to ``vocab`` (id -> text) once each."""
    turns = []
    for t in view.turns:
        toks = []
        for k in t.tokens:
            vocab.setdefault(k.id, k.text)
            top = [x for tid, _, p in k.topk for x in (tid, p)]
            toks.append([k.id, k.mask, _r(k.logp), _r(k.logq), _r(k.entropy, 3), top])
            for tid, text, _ in k.topk:
                if tid not in vocab:
                    vocab[tid] = text
        turns.append(
            {
                "index": t.index,
                "kl": _r(t.kl),
                "reward": t.reward,
                "replayed": t.replayed,
                "parse_error": t.parse_error,
                "text": t.text,
                "toks": toks,
                "calls": [[c.name, c.arguments, c.result, c.error] for c in t.calls],
            }
        )
    return {
        "id": view.id,
        "step": view.step,
        "env": view.env,
        "task_id": view.task_id,
        "seed": view.seed,
        "reward": view.reward,
        "success": view.success,
        "stop_reason": view.stop_reason,
        "tool_errors": view.tool_errors,
        "kl": _r(view.kl),
        "prompt": [list(m) for m in view.prompt],
        "turns": turns,
    }


def _facets(rows: Iterable[IndexRow]) -> dict[str, list[Any]]:
    """The values each filter drop-down offers."""
    steps: set[int] = set()
    envs: set[str] = set()
    stops: set[str] = set()
    kinds: set[str] = set()
    for r in rows:
        steps.add(r.step)
        envs.add(r.env)
        stops.add(r.stop_reason)
        kinds.update(k for k, v in r.tool_errors.items() if v)
    errors = sorted(kinds)
    return {
        "steps": sorted(steps),
        "envs": sorted(envs),
        "stops": sorted(stops),
        "errors": (["any"] if errors else []) + errors,
    }


def script_json(data: Any) -> str:
    """``data`` as JSON that can sit inside a ``<script>`` element whatever its strings hold:
    every ``<``, ``>`` and ``&`` is written as a ``\\u`` escape, so no ``</script>``, ``<!--``
    or ``<script`` can end the element or switch the parser's script state."""
    blob = json.dumps(data, ensure_ascii=True, allow_nan=False)
    return blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _document(title: str, data: dict[str, Any]) -> str:
    blob = script_json(data)
    problems = "".join(f"<div>⚠ {html.escape(p)}</div>" for p in data.get("problems", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_asset("viewer.css")}</style></head>
<body>
<header><h1>{html.escape(title)}</h1><span class="sub">{html.escape(data.get("subtitle", ""))}</span></header>
{f'<div class="problems">{problems}</div>' if problems else ""}
<main>
<section id="side">
  <div id="filters">
    <select id="f-step"></select><select id="f-env"></select>
    <select id="f-out"></select><select id="f-stop"></select>
    <select id="f-err" class="wide"></select>
    <input id="f-text" class="wide" type="search" placeholder="search messages, calls and results">
  </div>
  <div id="count"></div>
  <div id="list"></div>
</section>
<section id="view"></section>
</main>
<div id="tip"></div>
<script id="data" type="application/json">{blob}</script>
<script>{_asset("viewer.js")}</script>
</body></html>
"""


def page_data(
    store: EpisodeStore, page: Page, decode: Decoder, *, with_episodes: bool = True
) -> dict[str, Any]:
    """The page's JSON: its rows, facets for the filters, and (static pages) its episodes."""
    vocab: dict[int, str] = {}
    episodes = {}
    if with_episodes:
        for row, d in store.readable(page.rows):
            view = build_view(d, row, decode)
            episodes[row.id] = episode_payload(view, vocab, decode)
    note = ""
    if page.pages > 1:
        note = (
            f"page {page.number + 1} of {page.pages} ({page.size} per page); "
            "other pages: --page N, or --serve"
        )
    return {
        "clip": SHADE_CLIP,
        "legend": LEGEND,
        "subtitle": store.summary(),
        "problems": list(store.problems),
        "rows": [asdict(r) for r in page.rows],
        "episodes": episodes,
        "vocab": {str(k): v for k, v in vocab.items()},
        "facets": _facets(page.rows),
        "pageNote": note,
        "diff": False,
        "served": False,
    }


def write_page(
    store: EpisodeStore,
    out: Path,
    decode: Decoder,
    *,
    flt: Filter | None = None,
    page: int = 0,
    page_size: int = 200,
) -> Page:
    """Write one list page of ``store`` as a self-contained HTML file; returns the page."""
    p = store.page(page, page_size, flt)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_document(f"agentopd replay · {store.path.name}", page_data(store, p, decode)))
    return p


# ------------------------------------------------------------------------------------- diff
def _key(r: IndexRow, seen: dict[tuple[Any, ...], int]) -> tuple[Any, ...]:
    base = (r.env, r.task_id, r.seed)
    n = seen[base]
    seen[base] += 1
    return (*base, n)


def divergence(a: EpisodeView, b: EpisodeView) -> dict[str, int] | None:
    """The first turn (and token in it) where the two episodes' tokens differ; None if equal."""
    for i, (ta, tb) in enumerate(zip(a.turns, b.turns)):
        ia, ib = [t.id for t in ta.tokens], [t.id for t in tb.tokens]
        if ia != ib:
            j = next((k for k, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
            return {"turn": i, "token": j}
    if len(a.turns) != len(b.turns):
        return {"turn": min(len(a.turns), len(b.turns)), "token": 0}
    return None


def write_diff(
    a: EpisodeStore,
    b: EpisodeStore,
    out: Path,
    decode: Decoder,
    *,
    flt: Filter | None = None,
    limit: int = 200,
) -> int:
    """Write a page comparing the same tasks in two runs; returns the number of tasks shown.

    Episodes pair up by (env, task id, seed, occurrence), so the k-th attempt at a task in one
    run meets the k-th attempt in the other. Up to ``limit`` tasks, those in both runs first.
    """
    sides: list[dict[tuple[Any, ...], IndexRow]] = []
    for store in (a, b):
        seen: dict[tuple[Any, ...], int] = defaultdict(int)
        sides.append({_key(r, seen): r for r in store.rows_at(store.matching(flt))})
    keys = [k for k in sides[0] if k in sides[1]]
    keys += [k for k in sides[0] if k not in sides[1]] + [k for k in sides[1] if k not in sides[0]]
    keys = keys[:limit]
    vocab: dict[int, str] = {}
    eps: list[dict[str, Any]] = [{}, {}]
    pairs = []
    for k in keys:
        views: list[EpisodeView | None] = []
        for s, store in enumerate((a, b)):
            row = sides[s].get(k)
            got = None if row is None else next(iter(store.readable([row])), None)
            if got is None:
                views.append(None)
                continue
            row, d = got
            view = build_view(d, row, decode)
            eps[s][row.id] = episode_payload(view, vocab, decode)
            views.append(view)
        ra, rb = sides[0].get(k), sides[1].get(k)
        pairs.append(
            {
                "key": "|".join(map(str, k)),
                "a": None if ra is None else asdict(ra),
                "b": None if rb is None else asdict(rb),
                "diverge": divergence(views[0], views[1]) if views[0] and views[1] else None,
            }
        )
    both = [asdict(r) for s in sides for r in s.values()]
    data = {
        "clip": SHADE_CLIP,
        "legend": LEGEND,
        "subtitle": f"A = {a.path}  ·  B = {b.path}",
        "problems": a.problems + b.problems,
        "rows": pairs,
        "eps_a": eps[0],
        "eps_b": eps[1],
        "vocab": {str(k): v for k, v in vocab.items()},
        "facets": _facets([IndexRow.from_dict(r) for r in both]),
        "names": [str(a.path), str(b.path)],
        "pageNote": f"first {limit} tasks" if len(keys) == limit else "",
        "diff": True,
        "served": False,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_document(f"agentopd replay · {a.path.name} vs {b.path.name}", data))
    return len(pairs)


# ------------------------------------------------------------------------------------- serve
def make_server(
    store: EpisodeStore,
    decode: Decoder,
    *,
    port: int = 8765,
    flt: Filter | None = None,
    page_size: int = 200,
) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 serving the viewer, list pages and episodes on demand.

    It answers only requests whose ``Host`` names the address it bound (``127.0.0.1:PORT`` or
    ``localhost:PORT``): a web page that rebinds its own domain name to 127.0.0.1 (DNS
    rebinding) gets 421 and no data.
    """
    lock = threading.Lock()
    first = store.page(0, page_size, flt)
    shell = page_data(store, first, decode, with_episodes=False)
    shell.update(served=True, rows=[], pageNote="served: pages load on demand")
    shell["facets"] = _facets(store.rows())  # one streaming pass over the index
    index_html = _document(f"agentopd replay · {store.path.name}", shell).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, body: bytes, ctype: str, code: int = 200) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: Any, code: int = 200) -> None:
            self._send(json.dumps(obj, allow_nan=False).encode(), "application/json", code)

        def _host_ok(self) -> bool:
            assert isinstance(self.server, ThreadingHTTPServer)  # the server made below
            bound = self.server.server_address[1]
            host = (self.headers.get("Host") or "").strip().lower()
            return host in (f"127.0.0.1:{bound}", f"localhost:{bound}")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self._host_ok():
                self._json({"error": "this server answers only Host 127.0.0.1:PORT"}, 421)
                return
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                if url.path in ("/", "/index.html"):
                    self._send(index_html, "text/html; charset=utf-8")
                elif url.path == "/api/page":
                    text = q.get("q", "")
                    f = parse_filter(text) if text else (flt or Filter())
                    with lock:
                        p = store.page(int(q.get("n", 0)), page_size, f)
                    self._json(
                        {
                            "rows": [asdict(r) for r in p.rows],
                            "page": p.number,
                            "pages": p.pages,
                            "matching": p.matching,
                            "total": p.total,
                        }
                    )
                elif url.path == "/api/episode":
                    vocab: dict[int, str] = {}
                    with lock:
                        row = store.find(q.get("id", ""))
                        try:
                            view = build_view(store.episode_dict(row), row, decode)
                        except READ_ERRORS as e:
                            self._json({"error": visible(str(e))}, 500)
                            return
                    ep = episode_payload(view, vocab, decode)
                    self._json({"episode": ep, "vocab": {str(k): v for k, v in vocab.items()}})
                else:
                    self._json({"error": f"no such path {url.path}"}, 404)
            except (KeyError, ValueError) as e:
                self._json({"error": str(e.args[0] if e.args else e)}, 400)

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve(store: EpisodeStore, decode: Decoder, **kwargs: Any) -> None:
    """Serve until Ctrl-C."""
    server = make_server(store, decode, **kwargs)
    print(f"agentopd replay: http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
