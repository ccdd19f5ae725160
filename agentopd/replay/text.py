"""Rich renderings of episodes and lists: the printed ``--episode`` view and the terminal viewer's
panes share them.

Everything that came from a run (text the model wrote, tool results, task ids, token texts) is
plain text, never Rich markup, and goes through :func:`~agentopd.replay.view.visible` first, so no
escape sequence the model wrote reaches the terminal and no bidi control reorders what is shown.

Token shading: the background of each sampled token is red where the student gave it more
probability than the teacher (log p - log q > 0) and blue where the teacher gave it more, darkest
at |log p - log q| >= :data:`~agentopd.replay.view.SHADE_CLIP` nats. Tokens the student sampled
(mask 1, trained on) are underlined; mask-0 tokens (replayed expert turns, masked parse errors)
are dim.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from agentopd.replay.store import IndexRow, Page
from agentopd.replay.view import SHADE_CLIP, EpisodeView, TokenView, TurnView, visible

LEGEND = (
    "shading: log p - log q of the sampled token (red: student above teacher, blue: teacher "
    f"above student, darkest at ±{SHADE_CLIP:g} nats); underlined: trained on (mask 1); "
    "dim: mask 0"
)


def shade_rgb(d: float | None) -> tuple[int, int, int] | None:
    """Background colour for a disagreement ``d`` (None: no teacher score, no shading)."""
    if d is None:
        return None
    a = min(abs(d) / SHADE_CLIP, 1.0)
    if d >= 0:
        return (255, int(235 - 135 * a), int(235 - 135 * a))
    return (int(235 - 135 * a), int(235 - 95 * a), 255)


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _visible(text: str) -> str:
    return visible(text).replace("\n", "⏎\n")


def plain(text: object, style: str = "") -> Text:
    """Run data as a :class:`Text`: controls and bidi shown as markers, never read as markup."""
    return Text(visible(str(text)), style=style)


def token_text(turn: TurnView, selected: int | None = None, offset: int = 0) -> Text:
    """The turn's tokens as shaded text; ``selected`` is an episode-wide sampled-token number."""
    out = Text()
    n = offset
    for t in turn.tokens:
        style = ""
        if t.mask:
            rgb = shade_rgb(t.disagreement)
            style = "underline"
            if rgb is not None:
                style += f" black on rgb({rgb[0]},{rgb[1]},{rgb[2]})"
            if selected is not None and n == selected:
                style = "bold reverse"
            n += 1
        else:
            style = "dim"
        out.append(_visible(t.text), style=style)
    return out


def sampled_tokens(view: EpisodeView) -> list[tuple[TurnView, TokenView]]:
    """Every mask-1 token of the episode in order, with its turn (what a cursor walks)."""
    return [(turn, t) for turn in view.turns for t in turn.tokens if t.mask]


def render_header(view: EpisodeView) -> Text:
    verdict = ("SOLVED", "bold green") if view.success else ("FAILED", "bold red")
    errors = ", ".join(f"{k}×{v}" for k, v in sorted(view.tool_errors.items()) if v) or "none"
    return Text.assemble(
        (f"episode {visible(view.id)}", "bold"),
        f"  step {view.step}  env {visible(view.env)}  task {visible(view.task_id)}  "
        f"seed {view.seed}  reward {view.reward:g}  ",
        verdict,
        f"  stop {visible(view.stop_reason)}  teacher KL {fmt(view.kl, 3)}  "
        f"tool errors: {visible(errors)}",
    )


def render_calls(turn: TurnView, side_by_side: bool = True) -> RenderableType | None:
    """Each tool call beside its full result, one row per call (or, for printing to a file or
    a pipe, each call followed by its result)."""
    if not turn.calls and not turn.parse_error:
        return None
    if not side_by_side:
        lines: list[RenderableType] = []
        for c in turn.calls:
            call = "(no call)" if c.name is None else visible(f"{c.name}({c.arguments})")
            lines.append(Text.assemble(("call → ", "bold"), call))
            result = "(no result)" if c.result is None else visible(c.result)
            lines.append(Text.assemble(("result ← ", "bold"), (result, "red" if c.error else "")))
        if turn.parse_error and not any(c.error for c in turn.calls):
            lines.append(Text.assemble(("parse error: ", "bold red"), visible(turn.parse_error)))
        return Group(*lines)
    table = Table(show_header=True, header_style="bold", expand=True, show_lines=True)
    table.add_column("tool call", ratio=1, overflow="fold")
    table.add_column("result", ratio=1, overflow="fold")
    for c in turn.calls:
        call_cell = (
            Text("(no call)", style="dim") if c.name is None else plain(f"{c.name}({c.arguments})")
        )
        if c.result is None:
            result_cell = Text("(no result)", style="dim")
        else:
            result_cell = plain(c.result, style="red" if c.error else "")
        table.add_row(call_cell, result_cell)
    if turn.parse_error and not any(c.error for c in turn.calls):
        table.add_row(Text("(parse error)", style="red"), plain(turn.parse_error, style="red"))
    return table


def render_episode(
    view: EpisodeView, selected: int | None = None, side_by_side: bool = True
) -> Group:
    """The whole episode: header, prompts, each turn's shaded tokens and its calls and results."""
    parts: list[RenderableType] = [render_header(view), Text(LEGEND, style="italic dim")]
    if not view.has_teacher:
        parts.append(
            Text("(no teacher scores in this episode: tokens are not shaded)", style="dim")
        )
    for role, content in view.prompt:
        parts.append(Text.assemble((f"[{visible(role)}] ", "bold cyan"), visible(content)))
    offset = 0
    for turn in view.turns:
        tags = ["replayed (mask 0)"] if turn.replayed else []
        title = f"turn {turn.index}  KL {fmt(turn.kl, 3)}  reward {turn.reward:g}"
        parts.append(Rule(Text(" ".join([title, *tags])), align="left", style="cyan"))
        parts.append(token_text(turn, selected, offset))
        offset += sum(1 for t in turn.tokens if t.mask)
        calls = render_calls(turn, side_by_side)
        if calls is not None:
            parts.append(Padding(calls, (0, 0, 0, 2)))
    return Group(*parts)


def render_token(view: EpisodeView, selected: int) -> RenderableType:
    """The selected sampled token: its scores and the teacher's top-k alternatives."""
    tokens = sampled_tokens(view)
    if not tokens:
        return Text("no sampled tokens in this episode", style="dim")
    selected = max(0, min(selected, len(tokens) - 1))
    turn, t = tokens[selected]
    head = Text.assemble(
        (f"token {selected + 1}/{len(tokens)} (turn {turn.index}) ", "bold"),
        (visible(repr(t.text)), "bold"),
        f"  id {t.id}  mask {t.mask}  log p {fmt(t.logp, 3)}  log q {fmt(t.logq, 3)}  "
        f"log p - log q {fmt(t.disagreement, 3)}  teacher entropy {fmt(t.entropy, 3)}",
    )
    if not t.topk:
        return Group(head, Text("teacher top-k: not scored", style="dim"))
    table = Table(title="teacher top-k at this token", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("q", justify="right")
    for i, (tid, text, prob) in enumerate(t.topk, 1):
        style = "bold green" if tid == t.id else ""
        table.add_row(str(i), plain(repr(text)), str(tid), f"{prob:.3f}", style=style)
    return Group(head, table)


def render_token_table(view: EpisodeView, top: int = 3) -> Table:
    """Every sampled token as a row (position, text, log p, log q, difference, teacher top-n)."""
    table = Table(title=plain(f"sampled tokens of episode {view.id}"), show_lines=False)
    for col in ("turn", "#", "token", "log p", "log q", "log p - log q", f"teacher top-{top}"):
        table.add_column(col, justify="right" if col in ("turn", "#") else "left")
    for i, (turn, t) in enumerate(sampled_tokens(view)):
        alts = "  ".join(f"{text!r} {p:.2f}" for _, text, p in t.topk[:top])
        table.add_row(
            str(turn.index),
            str(i),
            plain(repr(t.text)),
            fmt(t.logp, 3),
            fmt(t.logq, 3),
            fmt(t.disagreement, 3),
            plain(alts),
        )
    return table


LIST_COLUMNS = ("id", "step", "env", "task", "reward", "solved", "turns", "stop", "errors", "KL")


def row_cells(r: IndexRow) -> tuple[Text, ...]:
    """A list row's cells, in :data:`LIST_COLUMNS` order (plain text, never markup)."""
    errors = sum(r.tool_errors.values())
    cells = (
        r.id,
        str(r.step),
        r.env,
        r.task_id,
        f"{r.reward:g}",
        "yes" if r.success else "no",
        str(r.turns),
        r.stop_reason,
        str(errors) if errors else "",
        fmt(r.teacher_kl, 2),
    )
    return tuple(plain(c) for c in cells)


def render_page(page: Page, title: str) -> Table:
    table = Table(
        title=plain(
            f"{title}: page {page.number + 1}/{page.pages}, {page.matching} of {page.total} episodes"
        )
    )
    for c in LIST_COLUMNS:
        table.add_column(c)
    for r in page.rows:
        table.add_row(*row_cells(r))
    return table
