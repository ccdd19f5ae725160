"""``agentopd replay RUN``: the interactive terminal viewer (textual).

Left: the episode list, one page at a time, with a filter line (``step=3 failed error=parse
some words``: the words are searched in every message). Right: the highlighted episode, each turn's
tokens shaded by the teacher's disagreement and each tool call beside its untruncated result.
Bottom: the selected sampled token's scores and the teacher's top-k alternatives.

Keys: up/down pick an episode, ``[``/``]`` walk the sampled tokens, ``n``/``p`` next/previous
page, ``/`` edit the filter, ``q`` quit. The viewer only reads the run directory.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from agentopd.replay.store import FILTER_HELP, EpisodeStore, Filter, IndexRow, parse_filter
from agentopd.replay.text import (
    LIST_COLUMNS,
    render_episode,
    render_token,
    row_cells,
    sampled_tokens,
)
from agentopd.replay.view import Decoder, EpisodeView, build_view, visible


class ReplayApp(App[None]):
    """The terminal viewer over one run directory.

    Args:
        store: The run's episodes.
        decoder: Token id -> text.
        flt: The initial filter.
        page_size: Episodes per list page.
        episode: Episode id to open first.
    """

    TITLE = "agentopd replay"
    CSS = """
    #left { width: 44%; }
    #list { height: 1fr; }
    #status { height: auto; color: $text-muted; }
    #right { width: 56%; border-left: solid $primary; }
    #token { height: auto; max-height: 40%; border-top: solid $primary; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("n", "page(1)", "next page"),
        Binding("p", "page(-1)", "prev page"),
        Binding("right_square_bracket", "token(1)", "next token"),
        Binding("left_square_bracket", "token(-1)", "prev token"),
        Binding("slash", "focus_filter", "filter"),
    ]

    def __init__(
        self,
        store: EpisodeStore,
        decoder: Decoder,
        flt: Filter | None = None,
        page_size: int = 200,
        episode: str | None = None,
        query: str = "",
    ):
        super().__init__()
        self.store = store
        self.decoder = decoder
        self.flt = flt or Filter()
        self.filter_query = query
        self.page_size = page_size
        self.page_number = 0
        self.first_episode = episode
        self.view: EpisodeView | None = None
        self.token_index = 0
        self._rows: dict[str, IndexRow] = {}

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="left"):
                yield Input(
                    value=self.filter_query, placeholder=f"filter: {FILTER_HELP}", id="filter"
                )
                yield Static(id="status")
                yield DataTable(id="list", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="right"):
                yield Static(id="episode")
        yield Static(id="token")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = visible(str(self.store.path))
        table = self.query_one("#list", DataTable)
        table.add_columns(*LIST_COLUMNS)
        self.refresh_list()
        if self.first_episode:
            self.show_episode(self.store.find(self.first_episode))
        table.focus()

    # ---------------------------------------------------------------------- list
    def refresh_list(self) -> None:
        page = self.store.page(self.page_number, self.page_size, self.flt)
        self.page_number = page.number
        table = self.query_one("#list", DataTable)
        table.clear()
        self._rows = {}
        for r in page.rows:
            self._rows[r.id] = r
            table.add_row(*row_cells(r), key=r.id)
        status = (
            f"page {page.number + 1}/{page.pages} · {page.matching} of {page.total} episodes"
            f"{'' if self.flt.empty else ' match the filter'}"
        )
        for problem in self.store.problems:
            status += f"\n⚠ {problem}"
        self.query_one("#status", Static).update(Text(visible(status)))
        if not page.rows:
            self.query_one("#episode", Static).update(Text("no episode matches the filter"))
            self.query_one("#token", Static).update("")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value if event.row_key is not None else None
        if key in self._rows:
            self.show_episode(self._rows[key])

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            self.flt = parse_filter(event.value)
        except ValueError as e:
            self.query_one("#status", Static).update(Text(visible(f"filter: {e}"), style="red"))
            return
        self.page_number = 0
        self.refresh_list()
        self.query_one("#list", DataTable).focus()

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_page(self, delta: int) -> None:
        self.page_number += delta
        self.refresh_list()

    # ---------------------------------------------------------------------- episode
    def show_episode(self, row: IndexRow) -> None:
        try:
            d = self.store.episode_dict(row)
        except (OSError, ValueError) as e:
            msg = visible(f"cannot read {row.id}: {e}")
            self.query_one("#episode", Static).update(Text(msg, "red"))
            return
        self.view = build_view(d, row, self.decoder)
        self.token_index = 0
        self._draw_episode()

    def action_token(self, delta: int) -> None:
        if self.view is None:
            return
        n = len(sampled_tokens(self.view))
        self.token_index = max(0, min(self.token_index + delta, max(0, n - 1)))
        self._draw_episode()

    def _draw_episode(self) -> None:
        assert self.view is not None
        self.query_one("#episode", Static).update(render_episode(self.view, self.token_index))
        self.query_one("#token", Static).update(render_token(self.view, self.token_index))


def run_tui(store: EpisodeStore, decoder: Decoder, **kwargs: Any) -> None:
    """Run the viewer until the user quits."""
    ReplayApp(store, decoder, **kwargs).run()
