"""What the viewers show of an episode: turns, tokens with the teacher's disagreement, calls
beside their results. One model for the terminal viewer, the printed episode and the HTML page.

The disagreement of a sampled token y_t is ``log p(y_t) - log q(y_t)``: the student's sampled
logprob minus the teacher's logprob of the same token at the same position. Positive means the
student liked the token more than the teacher did; the sampled reverse-KL estimate of a turn is
its mean over the turn's sampled tokens.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agentopd.replay.store import IndexRow, teacher_segments

SHADE_CLIP = 4.0
"""|log p - log q| (nats) at which the shading is darkest."""

BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""Characters that reorder the text around them (Trojan Source): always shown as markers."""


def _marker(c: str) -> str:
    n = ord(c)
    if n < 0x20:
        return chr(0x2400 + n)  # control pictures: ␛ for ESC, ␍ for CR, ...
    if n == 0x7F:
        return "\u2421"  # ␡
    return f"\u27e8U+{n:04X}\u27e9"  # ⟨U+202E⟩


_VISIBLE = {
    n: _marker(chr(n))
    for n in [*range(0x20), 0x7F, *range(0x80, 0xA0), *map(ord, BIDI_CONTROLS)]
    if n not in (0x09, 0x0A)
}


def visible(text: str) -> str:
    """``text`` safe to print to a terminal and honest to read: every control character but
    newline and tab (C0, DEL, C1, so ESC sequences such as OSC 52 or a clear-screen) becomes a
    visible marker (``␛``, ``⟨U+009B⟩``), and so does every bidi control (``⟨U+202E⟩``)."""
    return text.translate(_VISIBLE)


# ------------------------------------------------------------------------------------- tokens
class Decoder:
    """Token id -> display text, through a ``tokenizer.json`` (the ``tokenizers`` library).

    Without a tokenizer every token shows as ``<id>``.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._tok: Any = None
        self._cache: dict[int, str] = {}
        if self.path is not None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.path))

    @property
    def available(self) -> bool:
        return self._tok is not None

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self._tok is None:
                text = f"<{token_id}>"
            else:
                text = self._tok.decode([int(token_id)], skip_special_tokens=False)
                if not text:
                    text = self._tok.id_to_token(int(token_id)) or f"<{token_id}>"
            self._cache[token_id] = text
        return text


def find_tokenizer(run_path: str | Path) -> Path | None:
    """The ``tokenizer.json`` a run's episodes were tokenized with, or None when unknown.

    Looks at the run's newest checkpoint, its cold-start model, the model an eval run named
    (a ``save_pretrained`` path), and, for zoo students, the shipped zoo tokenizer.
    """
    root = Path(run_path)
    candidates = sorted(
        glob.glob(str(root / "checkpoints" / "step_*" / "model" / "tokenizer.json"))
    )
    candidates.reverse()
    candidates.append(str(root / "cold_start_model" / "tokenizer.json"))
    cfg = read_config(root)
    for key in ("model", "student"):
        value = cfg.get(key)
        if isinstance(value, str) and value:
            candidates.append(str(Path(value).expanduser() / "tokenizer.json"))
    for c in candidates:
        if Path(c).is_file():
            return Path(c)
    spec = importlib.util.find_spec("agentopd.zoo")
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "assets" / "tokenizer.json"
        if shipped.is_file():
            return shipped
    return None


def read_config(root: Path) -> dict[str, Any]:
    p = root / "config.yaml"
    if not p.is_file():
        return {}
    out: dict[str, Any] = {}
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if line and not line.startswith((" ", "\t", "#")) and ":" in line:
            k, _, v = line.partition(":")
            v = v.strip()
            if v and v not in ("null", "~"):
                out[k.strip()] = v.strip("'\"")
    return out


# ------------------------------------------------------------------------------------- model
@dataclass
class TokenView:
    """One token of an assistant turn."""

    id: int
    text: str
    mask: int
    """1 where the student sampled the token (trained on), else 0."""
    logp: float | None
    """Student's sampled logprob (None where not sampled)."""
    logq: float | None
    """Teacher's logprob of the same token (None where the teacher did not score it)."""
    topk: list[tuple[int, str, float]] = field(default_factory=list)
    """Teacher's top-k alternatives: (token id, text, probability), most likely first."""
    entropy: float | None = None
    """Teacher's entropy at this position."""

    @property
    def disagreement(self) -> float | None:
        """log p - log q of the sampled token, or None without both."""
        if self.logp is None or self.logq is None:
            return None
        d = self.logp - self.logq
        return d if math.isfinite(d) else None


@dataclass
class CallView:
    """A tool call and the result the env gave it (either may be missing)."""

    name: str | None
    arguments: str
    """Arguments as pretty JSON."""
    result: str | None
    """The result message's content, untruncated."""
    result_name: str | None = None
    error: bool = False
    """The result reports an error (``Error (...)``)."""


@dataclass
class TurnView:
    index: int
    text: str
    tokens: list[TokenView]
    calls: list[CallView]
    parse_error: str | None
    replayed: bool
    reward: float

    @property
    def kl(self) -> float | None:
        """Mean log p - log q over the turn's scored sampled tokens."""
        ds = [t.disagreement for t in self.tokens if t.mask and t.disagreement is not None]
        return sum(ds) / len(ds) if ds else None


@dataclass
class EpisodeView:
    id: str
    step: int
    env: str
    task_id: str
    seed: int | None
    reward: float
    success: bool
    stop_reason: str
    tool_errors: dict[str, int]
    prompt: list[tuple[str, str]]
    """(role, content) of the messages before the first assistant turn."""
    turns: list[TurnView]
    has_teacher: bool

    @property
    def kl(self) -> float | None:
        ds = [
            t.disagreement
            for turn in self.turns
            for t in turn.tokens
            if t.mask and t.disagreement is not None
        ]
        return sum(ds) / len(ds) if ds else None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def build_view(d: dict[str, Any], row: IndexRow, decode: Decoder, topk: int = 16) -> EpisodeView:
    """The view of an episode given as its ``to_json`` dict."""
    segments = d.get("segments", [])
    teachers = teacher_segments(d.get("teacher"))
    scored: list[dict[int, int]] = [
        {int(p): i for i, p in enumerate((t or {}).get("positions", []))} for t in teachers
    ]
    tops = [_topk_rows(t, topk) for t in teachers]
    turns: list[TurnView] = []
    for t in d.get("turns", []):
        s = int(t.get("segment", 0))
        seg = segments[s] if s < len(segments) else {}
        tea = teachers[s] if s < len(teachers) else None
        pos_of = scored[s] if s < len(scored) else {}
        toks, mask, lps = seg.get("tokens", []), seg.get("mask", []), seg.get("logprobs", [])
        tv = []
        for pos in range(int(t.get("start", 0)), min(int(t.get("end", 0)), len(toks))):
            m = int(mask[pos]) if pos < len(mask) else 0
            logq = top = ent = None
            j = pos_of.get(pos)
            if tea is not None and j is not None:
                logq = _num(_at(tea.get("logprobs"), j))
                ent = _num(_at(tea.get("entropy"), j))
                ids, probs = tops[s](j)
                top = list(zip(ids, map(decode, ids), probs))
            tv.append(
                TokenView(
                    id=int(toks[pos]),
                    text=decode(int(toks[pos])),
                    mask=m,
                    logp=_num(lps[pos]) if m and pos < len(lps) else None,
                    logq=logq,
                    topk=top or [],
                    entropy=ent,
                )
            )
        turns.append(
            TurnView(
                index=int(t.get("index", len(turns))),
                text=str(t.get("text", "")),
                tokens=tv,
                calls=_pair_calls(t.get("tool_calls", []), t.get("tool_results", [])),
                parse_error=t.get("parse_error"),
                replayed=bool(t.get("replayed", False)),
                reward=_num(t.get("reward")) or 0.0,
            )
        )
    prompt = []
    for m in d.get("messages", []):
        if m.get("role") == "assistant":
            break
        prompt.append((str(m.get("role", "")), str(m.get("content") or "")))
    return EpisodeView(
        id=row.id,
        step=row.step,
        env=row.env,
        task_id=row.task_id,
        seed=row.seed,
        reward=row.reward,
        success=row.success,
        stop_reason=row.stop_reason,
        tool_errors=dict(row.tool_errors),
        prompt=prompt,
        turns=turns,
        has_teacher=any(t is not None for t in teachers),
    )


def _topk_rows(
    tea: dict[str, Any] | None, topk: int
) -> Callable[[int], tuple[list[int], list[float]]]:
    """Row ``j`` of a segment's teacher top-k as (ids, probabilities rounded to 1e-4), computed
    for the whole segment at once; entries that are not finite numbers are left out."""
    if tea is None:
        return lambda j: ([], [])
    ids, lqs = tea.get("topk_ids"), tea.get("topk_logprobs")
    try:
        ids_a = np.asarray(ids, dtype=np.int64)[:, :topk]
        p = np.round(np.exp(np.asarray(lqs, dtype=np.float64)[:, :topk]), 4)
        fast = ids_a.shape == p.shape and bool(np.isfinite(p).all())
    except (ValueError, TypeError, IndexError):
        fast = False
    if fast:
        rows_ids, rows_p = ids_a.tolist(), p.tolist()
        return lambda j: (rows_ids[j], rows_p[j]) if j < len(rows_ids) else ([], [])

    def slow(j: int) -> tuple[list[int], list[float]]:
        a, b = _at(ids, j), _at(lqs, j)
        if not isinstance(a, list) or not isinstance(b, list):
            return [], []
        pairs = [
            (int(x), round(math.exp(y), 4))
            for x, y in list(zip(a, b))[:topk]
            if isinstance(x, int) and _num(y) is not None and math.isfinite(y)
        ]
        return [x for x, _ in pairs], [y for _, y in pairs]

    return slow


def _at(xs: Any, i: int) -> Any:
    return xs[i] if isinstance(xs, list) and i < len(xs) else None


def pair_calls(
    calls: list[dict[str, Any]], results: list[dict[str, Any]]
) -> list[tuple[int | None, int | None]]:
    """(call index, result index) pairs: by call id where one matches, else the next unused
    result; results answering no call come last with call index None."""
    remaining = list(range(len(results)))
    out: list[tuple[int | None, int | None]] = []
    for ci, c in enumerate(calls):
        match = None
        if c.get("id"):
            match = next((i for i in remaining if results[i].get("tool_call_id") == c["id"]), None)
        if match is None and remaining:
            match = remaining[0]
        if match is not None:
            remaining.remove(match)
        out.append((ci, match))
    out += [(None, i) for i in remaining]
    return out


def _pair_calls(calls: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[CallView]:
    return [
        _call_view(None if c is None else calls[c], None if r is None else results[r])
        for c, r in pair_calls(calls, results)
    ]


def _call_view(call: dict[str, Any] | None, result: dict[str, Any] | None) -> CallView:
    content = None if result is None else str(result.get("content") or "")
    return CallView(
        name=None if call is None else str(call.get("name")),
        arguments=""
        if call is None
        else json.dumps(call.get("arguments", {}), ensure_ascii=False, indent=1),
        result=content,
        result_name=None if result is None else result.get("name"),
        error=bool(content and content.startswith("Error")),
    )
