"""The ``agentopd replay``, ``agentopd plot`` and ``agentopd export`` commands.

::

    agentopd replay RUN                        interactive terminal viewer (a list page if not a TTY)
    agentopd replay RUN --episode 3-5          print one episode (add --tokens for per-token scores)
    agentopd replay RUN --html OUT.html        one self-contained page (filters, search, token hover)
    agentopd replay RUN_A RUN_B --html OUT.html   the same tasks side by side
    agentopd replay RUN --serve                browse every page from 127.0.0.1
    agentopd plot RUN [RUN ...] -o OUT.png     training curves of one or more runs
    agentopd export RUN --jsonl OUT.jsonl      every episode as JSON lines (``-`` for stdout)
    agentopd export RUN --inspect OUT.eval     an Inspect AI log (pip install 'agentopd[inspect]')

All of them only read the run directory. Filters (``--filter 'step=3 failed error=parse'``)
select episodes the same way in every command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from agentopd.replay.store import (
    FILTER_HELP,
    READ_ERRORS,
    EpisodeStore,
    Filter,
    RunDirError,
    parse_filter,
)
from agentopd.replay.view import visible

console = Console()
err = Console(stderr=True, soft_wrap=True)
_opened: list[EpisodeStore] = []
"""Stores the running command opened; their problems are printed as warnings when it ends."""


def _say(out: Console, label: str, style: str, message: object) -> None:
    """Print ``label: message`` with the message as plain text (run data is never markup)."""
    out.print(Text.assemble((label, style), " ", visible(str(message))))


def _filter(args: argparse.Namespace) -> Filter:
    return parse_filter(" ".join(args.filter or []))


def _open(path: str) -> EpisodeStore:
    store = EpisodeStore(path)
    _opened.append(store)
    return store


def _warn_problems() -> None:
    """Every problem met while reading (damaged lines, unreadable shards), once each."""
    for store in _opened:
        for problem in store.problems:
            _say(err, "warning:", "yellow", problem)
    _opened.clear()


def _decoder(args: argparse.Namespace, run: str) -> Any:
    from agentopd.replay.view import Decoder, find_tokenizer

    path = args.tokenizer or find_tokenizer(run)
    if path is None:
        _say(err, "warning:", "yellow", "no tokenizer found for this run: tokens show as <id>")
    return Decoder(path)


def cmd_replay(args: argparse.Namespace) -> int:
    from agentopd.replay.text import render_episode, render_page, render_token_table
    from agentopd.replay.view import build_view

    flt = _filter(args)
    if len(args.runs) > 2:
        raise RunDirError(f"replay takes one run, or two to compare; got {len(args.runs)}")
    stores = [_open(r) for r in args.runs]
    decoder = _decoder(args, args.runs[0])
    if len(stores) == 2:
        if not args.html:
            raise RunDirError("comparing two runs writes a page: add --html OUT.html")
        from agentopd.replay.html import write_diff

        n = write_diff(
            stores[0], stores[1], Path(args.html), decoder, flt=flt, limit=args.page_size
        )
        console.print(Text(f"compared {n} tasks → {args.html}"))
        return 0
    store = stores[0]
    if args.serve:
        from agentopd.replay.html import serve

        serve(store, decoder, port=args.port, flt=flt, page_size=args.page_size)
        return 0
    if args.html:
        from agentopd.replay.html import write_page

        page = write_page(
            store, Path(args.html), decoder, flt=flt, page=args.page - 1, page_size=args.page_size
        )
        console.print(
            Text(
                f"page {page.number + 1}/{page.pages}: {len(page.rows)} of {page.matching} "
                f"episodes → {args.html}"
            )
        )
        return 0
    if args.episode:
        row = store.find(args.episode)
        view = build_view(store.episode_dict(row), row, decoder)
        console.print(render_episode(view, side_by_side=sys.stdout.isatty()))
        if args.tokens:
            console.print(render_token_table(view))
        return 0
    if not sys.stdout.isatty() or args.list:
        page = store.page(args.page - 1, args.page_size, flt)
        out = console if sys.stdout.isatty() else Console(width=max(console.width, 160))
        out.print(render_page(page, str(store.path)))
        return 0
    from agentopd.replay.tui import run_tui

    run_tui(store, decoder, flt=flt, page_size=args.page_size, query=" ".join(args.filter or []))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from agentopd.replay.export import write_inspect, write_jsonl

    store = _open(args.run)
    flt = _filter(args)
    if not args.jsonl and not args.inspect:
        raise RunDirError("say what to export: --jsonl OUT.jsonl (or -) and/or --inspect OUT.eval")
    if args.jsonl:
        n = write_jsonl(store, args.jsonl, flt)
        if args.jsonl != "-":
            console.print(Text(f"{n} episodes → {args.jsonl}"))
    if args.inspect:
        n = write_inspect(store, Path(args.inspect), flt)
        console.print(
            Text(
                f"{n} samples → {args.inspect} (open with `inspect view --log-dir "
                f"{Path(args.inspect).parent}`)"
            )
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from agentopd.replay.plot import plot_runs

    out = plot_runs([Path(r) for r in args.runs], Path(args.output), labels=args.label)
    console.print(Text(f"plot → {out}"))
    return 0


def _run(fn: Any) -> Any:
    """Exit codes: 0 (with a warning per problem when the run opened only partially), 2 when
    what was asked for cannot be opened; every error is one message, no traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        _opened.clear()
        try:
            return fn(args)
        except (*READ_ERRORS, KeyError, ValueError, OSError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            _say(err, "error:", "red", msg)
            return 2
        finally:
            _warn_problems()

    return wrapped


def register_cli(sub: Any) -> None:
    """Add ``replay``, ``plot`` and ``export`` to the ``agentopd`` subcommands."""
    s = sub.add_parser(
        "replay",
        help="view episodes: terminal viewer, one episode, HTML page, diff of two runs",
        description="View a run's episodes. " + (__doc__ or "").split("::")[1].split("All of")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("runs", nargs="+", metavar="RUN", help="run directory (two to compare)")
    s.add_argument("--episode", metavar="ID", help="print one episode (ids: <step>-<n>)")
    s.add_argument("--tokens", action="store_true", help="with --episode: per-token score table")
    s.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML page")
    s.add_argument("--serve", action="store_true", help="serve every page on 127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--list", action="store_true", help="print a list page instead of the viewer")
    s.add_argument("--page", type=int, default=1, help="1-based page of the filtered list")
    s.add_argument("--page-size", type=int, default=200, help="episodes per page")
    s.add_argument("--filter", nargs="*", metavar="TERM", help=FILTER_HELP)
    s.add_argument("--tokenizer", metavar="tokenizer.json", help="override the run's tokenizer")
    s.set_defaults(func=_run(cmd_replay))

    s = sub.add_parser("export", help="export episodes as JSON lines or an Inspect AI log")
    s.add_argument("run", metavar="RUN")
    s.add_argument("--jsonl", metavar="OUT.jsonl", help="JSON lines ('-' for stdout)")
    s.add_argument("--inspect", metavar="OUT.eval", help="Inspect AI log (needs inspect-ai)")
    s.add_argument("--filter", nargs="*", metavar="TERM", help=FILTER_HELP)
    s.set_defaults(func=_run(cmd_export))

    s = sub.add_parser("plot", help="PNG curves of one or more runs")
    s.add_argument("runs", nargs="+", metavar="RUN")
    s.add_argument("-o", "--output", default="agentopd-plot.png", metavar="OUT.png")
    s.add_argument("--label", action="append", help="legend label per run (repeat)")
    s.set_defaults(func=_run(cmd_plot))
