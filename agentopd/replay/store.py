"""The episode store: an index plus compact per-step token arrays, lossless and fast to open.

Layout inside a run directory::

    episodes/index.jsonl        one line per episode (see :class:`IndexRow`), appended per step
    episodes/step_000007.npz    every episode of step 7: token arrays + the rest as JSON

Why numpy ``.npz``: numpy is already a core dependency; an ``.npz`` is a zip of ``.npy`` arrays, so
one member (the JSON part, for text search) is read without inflating the token arrays; members
are deflate-compressed; and ``allow_pickle=False`` makes reading a shard safe. safetensors has no
compression (the top-k arrays would stay about 4x larger), and Arrow would add a large dependency
for no gain at this size.

What goes in a shard: each episode's ``Episode.to_json`` form, in which every list of numbers
under ``segments`` (token ids, mask, logprobs) is moved into a typed column and replaced by a
reference, and the teacher's arrays (:class:`~agentopd.types.TeacherScores`: positions, sampled
log-probs, top-k ids and log-probs, entropy) go into columns as they are. A column holds all
its entries of the step concatenated, in the smallest integer type that holds the values, or in
float32 when every value is exactly a float32 (teacher scores are), float64 otherwise. Reading
puts the numbers back and goes through ``Episode.from_json``, so ``to_json`` of a stored episode
is byte-for-byte what was written.

Crash safety: a step's shard is written to a temporary file, fsynced and renamed; only then are
its index lines appended and fsynced. A kill at any point leaves either a complete shard that the
index does not name yet (ignored; rewritten when the step is replayed) or a torn last index line
(reported and skipped). ``RunDir.truncate_logs`` cuts the index back to a checkpoint's size on
resume, so no episode is listed twice.

Old run directories keep a single ``episodes.jsonl`` (one ``{"step": .., **episode}`` per line);
:class:`EpisodeStore` reads those too.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agentopd.runs import fsync_dir
from agentopd.types import Episode

EPISODES_DIR = "episodes"
INDEX = f"{EPISODES_DIR}/index.jsonl"
LEGACY = "episodes.jsonl"
FORMAT_VERSION = 1
MAX_EPISODES_PER_SHARD = 256
_COL = "__col__"
_RAW = "__raw__"
_ARRAY_TREES = ("segments", "teacher")


class RunDirError(ValueError):
    """A run directory that cannot be read: missing, empty, or not a run directory; or a part
    of one (a shard, an index line) that is damaged."""


READ_ERRORS = (RunDirError, FileNotFoundError)
"""What reading one episode of a damaged run directory raises (a missing shard is the second)."""


# ------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class IndexRow:
    """One episode's line in ``episodes/index.jsonl``: what the list views show and filter on."""

    id: str
    """Episode id, unique in the run: ``"<step>-<position in the step>"``."""
    step: int
    """Training step (0 for an eval run)."""
    env: str
    """Registry name of the environment."""
    task_id: str
    """Task identity inside the env."""
    seed: int | None
    """Seed given to ``env.reset``."""
    reward: float
    """Total reward."""
    success: bool
    """Whether the env judged the task solved."""
    turns: int
    """Number of assistant turns."""
    stop_reason: str
    """Why the episode ended (a ``StopReason`` value)."""
    tool_errors: dict[str, int] = field(default_factory=dict)
    """Count per tool-error kind (``unknown_tool``, ``parse_error``, ...)."""
    sampled_tokens: int = 0
    """Tokens the student sampled (mask 1)."""
    tokens: int = 0
    """All tokens of all segments."""
    teacher_kl: float | None = None
    """Mean of log p - log q over the sampled tokens (None when the teacher did not score it)."""
    shard: str = ""
    """Where the episode lives, relative to the run directory (a shard, or ``episodes.jsonl``)."""
    row: int = 0
    """Position inside the shard, or the byte offset of the line in ``episodes.jsonl``."""

    @property
    def location(self) -> str:
        return f"{self.shard}#{self.row}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexRow:
        """The row of an index line's JSON object.

        Raises:
            ValueError: ``d`` is not an object, lacks a field, or a field has the wrong type;
                the message names the field.
        """
        check_row(d)
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


_MISSING = object()
_ROW_TYPES: dict[str, frozenset[type]] = {
    "id": frozenset({str}),
    "step": frozenset({int}),
    "env": frozenset({str}),
    "task_id": frozenset({str}),
    "seed": frozenset({int, type(None)}),
    "reward": frozenset({int, float}),
    "success": frozenset({bool}),
    "turns": frozenset({int}),
    "stop_reason": frozenset({str}),
    "tool_errors": frozenset({dict}),
    "sampled_tokens": frozenset({int}),
    "tokens": frozenset({int}),
    "teacher_kl": frozenset({int, float, type(None)}),
    "shard": frozenset({str}),
    "row": frozenset({int}),
}
_ROW_REQUIRED = frozenset(
    {"id", "step", "env", "task_id", "seed", "reward", "success", "turns", "stop_reason"}
)


def check_row(d: Any) -> None:
    """Raise ``ValueError`` naming the field unless ``d`` is an index line's JSON object: every
    required field present, every field of its type (JSON's exact types: no bool for an int)."""
    if type(d) is not dict:
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    for name, kinds in _ROW_TYPES.items():
        v = d.get(name, _MISSING)
        if v is _MISSING:
            if name in _ROW_REQUIRED:
                raise ValueError(f"missing field {name!r}")
        elif type(v) not in kinds:
            want = " or ".join(sorted("null" if k is type(None) else k.__name__ for k in kinds))
            raise ValueError(f"field {name!r} is {v!r}: expected {want}")
    errors = d.get("tool_errors")
    if errors and not all(type(k) is str and type(v) is int for k, v in errors.items()):
        raise ValueError(f"field 'tool_errors' is {errors!r}: expected counts by kind")


def _teacher_kl(d: dict[str, Any]) -> float | None:
    """Mean log p - log q of the sampled tokens, from an episode's JSON dict."""
    teacher = d.get("teacher")
    if not teacher:
        return None
    total, n = 0.0, 0
    for seg, t in zip(d.get("segments", []), teacher_segments(teacher)):
        if t is None:
            continue
        lp = seg.get("logprobs", [])
        for pos, q in zip(_numbers(t.get("positions", [])), _numbers(t.get("logprobs", []))):
            p = lp[pos] if isinstance(pos, int) and 0 <= pos < len(lp) else math.nan
            if _is_number(p) and _is_number(q) and math.isfinite(p - q):
                total += float(p) - float(q)
                n += 1
    return total / n if n else None


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _numbers(x: Any) -> list[Any]:
    """``x`` as a list of Python scalars (an array's ``tolist``; a list as it is)."""
    return x.tolist() if isinstance(x, np.ndarray) else list(x) if isinstance(x, list) else []


def teacher_segments(teacher: Any) -> list[dict[str, Any] | None]:
    """The per-segment teacher dicts of an episode's ``teacher`` field, in its JSON form.

    Accepts the list-of-dicts form (one dict per segment) and a dict holding such a list under
    ``segments``, so the viewers read both the current and the typed ``TeacherScores`` layout.
    """
    if teacher is None:
        return []
    if isinstance(teacher, dict):
        teacher = teacher.get("segments", [teacher])
    return [t if isinstance(t, dict) else None for t in teacher]


def index_row(d: dict[str, Any], *, id: str, step: int, shard: str, row: int) -> IndexRow:
    """The index line of an episode given as its ``to_json`` dict."""
    segs = d.get("segments", [])
    info = d.get("info") or {}
    errors = info.get("tool_errors") or {}
    return IndexRow(
        id=id,
        step=int(step),
        env=str(d.get("env", "")),
        task_id=str(d.get("task_id", "")),
        seed=d.get("seed"),
        reward=float(d.get("reward", 0.0)) if isinstance(d.get("reward"), int | float) else 0.0,
        success=bool(d.get("success", False)),
        turns=len(d.get("turns", [])),
        stop_reason=str(d.get("stop_reason", "answer")),
        tool_errors={str(k): int(v) for k, v in errors.items()} if isinstance(errors, dict) else {},
        sampled_tokens=sum(int(sum(s.get("mask", []))) for s in segs),
        tokens=sum(len(s.get("tokens", [])) for s in segs),
        teacher_kl=_teacher_kl(d),
        shard=shard,
        row=row,
    )


# ------------------------------------------------------------------------------------- columns
class _Columns:
    """Numeric lists pulled out of episode dicts, grouped by their path (``segments.tokens``)."""

    def __init__(self) -> None:
        self.entries: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, arr: np.ndarray) -> dict[str, Any]:
        entries = self.entries.setdefault(name, [])
        entries.append(arr)
        return {_COL: [name, len(entries) - 1]}

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, (name, entries) in enumerate(sorted(self.entries.items())):
            flat = [e.reshape(-1) for e in entries]
            is_float = np.array([e.dtype.kind == "f" for e in entries], dtype=np.uint8)
            data = np.concatenate(flat) if flat else np.zeros(0)
            data = _narrow(data)
            if data.dtype.kind == "f":
                # Byte planes (all first bytes, then all second bytes, ...) deflate about 20%
                # better than interleaved floats; the bytes themselves are unchanged.
                le = data.astype(data.dtype.newbyteorder("<"))
                data = le.view(np.uint8).reshape(-1, le.dtype.itemsize).T.copy()
            out[f"c{i}.data"] = data
            out[f"c{i}.rows"] = _narrow(np.array([e.shape[0] for e in entries], dtype=np.int64))
            out[f"c{i}.width"] = _narrow(
                np.array([e.shape[1] if e.ndim == 2 else -1 for e in entries], dtype=np.int64)
            )
            out[f"c{i}.float"] = is_float
            out[f"c{i}.name"] = np.frombuffer(name.encode(), dtype=np.uint8)
        return out


def _narrow(a: np.ndarray) -> np.ndarray:
    """The smallest dtype that holds ``a`` exactly."""
    if a.dtype.kind == "f":
        if a.size == 0:
            return a.astype(np.float32)
        f32 = a.astype(np.float32)
        same = np.array_equal(f32.astype(a.dtype), a, equal_nan=True)
        return f32 if same else a.astype(np.float64)
    if a.dtype.kind in "iu":
        if a.size == 0:
            return a.astype(np.uint8)
        lo, hi = int(a.min()), int(a.max())
        for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64):
            info = np.iinfo(t)
            if info.min <= lo and hi <= info.max:
                return a.astype(t)
    return a


def _as_numeric(x: list[Any]) -> np.ndarray | None:
    """``x`` as a 1-D or rectangular 2-D int/float array, or None when it is anything else."""
    if not x:
        return None
    first = x[0]
    if isinstance(first, list):
        if not first or not all(isinstance(r, list) and len(r) == len(first) for r in x):
            return None
        probe = first[0]
    else:
        probe = first
    if isinstance(probe, bool) or not isinstance(probe, int | float):
        return None
    try:
        arr = np.asarray(x)
    except (ValueError, OverflowError):
        return None
    if arr.dtype.kind not in "iuf" or arr.ndim not in (1, 2):
        return None
    if arr.dtype.kind == "f" and not _all_numbers(x):
        return None
    if arr.dtype.kind == "f" and _has_int(x):
        return None  # a mix of ints and floats would come back as floats: keep it as JSON
    return arr


def _all_numbers(x: list[Any]) -> bool:
    flat = x if not isinstance(x[0], list) else [v for r in x for v in r]
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)


def _has_int(x: list[Any]) -> bool:
    flat = x if not isinstance(x[0], list) else [v for r in x for v in r]
    return any(isinstance(v, int) for v in flat)


def _pull(x: Any, path: str, cols: _Columns) -> Any:
    if isinstance(x, np.ndarray):
        return cols.add(path, x)
    if isinstance(x, dict):
        if len(x) == 1 and next(iter(x)) in (_COL, _RAW):
            return {_RAW: x}
        return {k: _pull(v, f"{path}.{k}", cols) for k, v in x.items()}
    if isinstance(x, list):
        arr = _as_numeric(x)
        if arr is not None:
            return cols.add(path, arr)
        return [_pull(v, path, cols) for v in x]
    return x


def _put(x: Any, cols: dict[str, list[Any]]) -> Any:
    if isinstance(x, dict):
        if len(x) == 1 and _COL in x:
            name, i = x[_COL]
            return cols[name][i]
        if len(x) == 1 and _RAW in x:
            return x[_RAW]
        return {k: _put(v, cols) for k, v in x.items()}
    if isinstance(x, list):
        return [_put(v, cols) for v in x]
    return x


# ------------------------------------------------------------------------------------- writing
def episode_dict(ep: Episode | dict[str, Any]) -> dict[str, Any]:
    """An episode in its ``Episode.to_json`` form (non-finite floats as markers), except that
    the teacher's scores stay the arrays they are (:meth:`TeacherScores.arrays`): a shard
    stores them as columns directly."""
    if not isinstance(ep, Episode):
        return ep
    d = json.loads(replace(ep, teacher=None).to_json())
    if ep.teacher is not None:
        d["teacher"] = [None if sc is None else sc.arrays() for sc in ep.teacher]
    return d


def encode_shard(step: int, dicts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The arrays of one shard holding ``dicts`` (episodes in ``to_json`` form)."""
    cols = _Columns()
    metas = []
    for d in dicts:
        meta = dict(d)
        for key in _ARRAY_TREES:
            if key in meta:
                meta[key] = _pull(meta[key], key, cols)
        metas.append(meta)
    header = {"version": FORMAT_VERSION, "step": step, "episodes": metas}
    arrays = cols.arrays()
    arrays["meta"] = np.frombuffer(json.dumps(header, ensure_ascii=True).encode(), dtype=np.uint8)
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            # numpy's stubs let ``**kwds`` fill ``allow_pickle: bool``; the keys are array names
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_name(step: int, part: int = 0) -> str:
    """``episodes/step_000007.npz`` (and ``step_000007_01.npz`` for a large step's later parts)."""
    suffix = f"_{part:02d}" if part else ""
    return f"{EPISODES_DIR}/step_{step:06d}{suffix}.npz"


def write_step(
    run_path: str | Path,
    step: int,
    episodes: Iterable[Episode | dict[str, Any]],
    *,
    first_id: int = 0,
) -> list[IndexRow]:
    """Store one step's episodes: shard(s) first (atomic), then their index lines (fsynced).

    Args:
        run_path: The run directory.
        step: Training step (0 for evaluation).
        episodes: Episodes, or their ``to_json`` dicts.
        first_id: Number of the first episode in the step (ids are ``"<step>-<n>"``).

    Returns:
        The index rows appended.
    """
    root = Path(run_path)
    (root / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
    dicts = [episode_dict(e) for e in episodes]
    rows: list[IndexRow] = []
    for part, start in enumerate(range(0, len(dicts), MAX_EPISODES_PER_SHARD)):
        chunk = dicts[start : start + MAX_EPISODES_PER_SHARD]
        name = shard_name(step, part)
        _write_npz(root / name, encode_shard(step, chunk))
        rows += [
            index_row(d, id=f"{step}-{first_id + start + i}", step=step, shard=name, row=i)
            for i, d in enumerate(chunk)
        ]
    if rows:
        with open(root / INDEX, "a", encoding="utf-8") as f:
            f.write("".join(r.to_json() + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
    return rows


# ------------------------------------------------------------------------------------- reading
def decode_shard(arrays: Any) -> tuple[int, list[dict[str, Any]]]:
    """``(step, episode dicts in to_json form)`` from a shard's arrays (an ``NpzFile`` or dict)."""
    header = json.loads(bytes(arrays["meta"]).decode())
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"shard format version {header.get('version')!r}; this agentopd reads {FORMAT_VERSION}"
        )
    cols: dict[str, list[Any]] = {}
    i = 0
    while f"c{i}.name" in arrays:
        name = bytes(arrays[f"c{i}.name"]).decode()
        data = arrays[f"c{i}.data"]
        if data.ndim == 2:  # float byte planes, see _Columns.arrays
            data = data.T.copy().view(f"<f{data.shape[0]}").reshape(-1)
        rows = arrays[f"c{i}.rows"].astype(np.int64)
        widths = arrays[f"c{i}.width"].astype(np.int64)
        is_float = arrays[f"c{i}.float"]
        sizes = np.where(widths < 0, rows, rows * np.maximum(widths, 0))
        ends = np.cumsum(sizes)
        entries: list[Any] = []
        for j in range(len(rows)):
            chunk = data[ends[j] - sizes[j] : ends[j]]
            if widths[j] >= 0:
                chunk = chunk.reshape(int(rows[j]), int(widths[j]))
            chunk = chunk.astype(np.float64 if is_float[j] else np.int64)
            entries.append(chunk.tolist())
        cols[name] = entries
        i += 1
    dicts = []
    for meta in header["episodes"]:
        d = dict(meta)
        for key in _ARRAY_TREES:
            if key in d:
                d[key] = _put(d[key], cols)
        dicts.append(d)
    return int(header["step"]), dicts


def dict_to_episode(d: dict[str, Any]) -> Episode:
    """An :class:`Episode` from its ``to_json`` dict (the inverse of :func:`episode_dict`)."""
    return Episode.from_json(json.dumps(d, ensure_ascii=True))


@dataclass(frozen=True)
class Filter:
    """Which episodes a list shows. Every field left at its default matches everything."""

    steps: tuple[int, int] | None = None
    """Inclusive step range."""
    env: str | None = None
    """Environment name."""
    solved: bool | None = None
    """True: solved only; False: failed only."""
    stop_reason: str | None = None
    """A ``StopReason`` value."""
    tool_error: str | None = None
    """A tool-error kind the episode hit at least once (``any`` for any kind)."""
    text: str | None = None
    """Case-insensitive text searched in every message, sampled turn and tool result."""

    def matches_row(self, r: IndexRow) -> bool:
        """Whether the index line passes (everything but :attr:`text`)."""
        return self._match(r.step, r.env, r.success, r.stop_reason, r.tool_errors)

    def matches_dict(self, d: dict[str, Any]) -> bool:
        """:meth:`matches_row` on an index line still in its JSON form (no row object built)."""
        return self._match(
            d.get("step", 0),
            d.get("env", ""),
            d.get("success", False),
            d.get("stop_reason", ""),
            d.get("tool_errors") or {},
        )

    def _match(
        self, step: int, env: str, success: bool, stop: str, tool_errors: dict[str, int]
    ) -> bool:
        if self.steps is not None and not (self.steps[0] <= step <= self.steps[1]):
            return False
        if self.env is not None and env != self.env:
            return False
        if self.solved is not None and bool(success) != self.solved:
            return False
        if self.stop_reason is not None and stop != self.stop_reason:
            return False
        if self.tool_error is not None:
            if self.tool_error == "any":
                return any(v > 0 for v in tool_errors.values())
            return tool_errors.get(self.tool_error, 0) > 0
        return True

    @property
    def empty(self) -> bool:
        return self == Filter()


FILTER_HELP = (
    "step=N or step=A..B, env=NAME, solved, failed, stop=REASON, error=KIND (or error=any); "
    "other words are searched in the messages"
)


def parse_filter(text: str) -> Filter:
    """A :class:`Filter` from a query such as ``step=2..5 failed error=parse timeout``.

    Raises:
        ValueError: A malformed step or an unknown ``key=``; the message lists the syntax.
    """
    import shlex

    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    kw: dict[str, Any] = {}
    free: list[str] = []
    for w in words:
        key, eq, value = w.partition("=")
        low = key.lower()
        if not eq:
            if low in ("solved", "failed"):
                kw["solved"] = low == "solved"
            else:
                free.append(w)
        elif low == "step":
            lo, sep, hi = value.replace("-", "..", 1).partition("..")
            try:
                kw["steps"] = (int(lo), int(hi) if sep else int(lo))
            except ValueError:
                raise ValueError(f"bad step {value!r}: expected step=N or step=A..B") from None
        elif low == "env":
            kw["env"] = value
        elif low in ("stop", "stop_reason"):
            kw["stop_reason"] = value
        elif low in ("error", "tool_error"):
            kw["tool_error"] = value
        else:
            raise ValueError(f"unknown filter key {key!r}; expected {FILTER_HELP}")
    if free:
        kw["text"] = " ".join(free)
    return Filter(**kw)


def episode_text(d: dict[str, Any]) -> str:
    """Everything searchable in an episode dict: messages, sampled text, tool calls and results."""
    parts: list[str] = []
    for m in d.get("messages", []):
        parts.append(str(m.get("content") or ""))
        for c in m.get("tool_calls") or []:
            parts.append(json.dumps(c, ensure_ascii=False))
    for t in d.get("turns", []):
        parts.append(str(t.get("text") or ""))
        parts.append(str(t.get("parse_error") or ""))
        for m in t.get("tool_results", []):
            parts.append(str(m.get("content") or ""))
    return "\n".join(parts)


@dataclass
class Page:
    """One page of a filtered episode list."""

    rows: list[IndexRow]
    """The page's index lines."""
    number: int
    """0-based page number."""
    size: int
    """Page size."""
    matching: int
    """Episodes matching the filter (all pages)."""
    total: int
    """Episodes in the run."""

    @property
    def pages(self) -> int:
        return max(1, -(-self.matching // self.size))


class EpisodeStore:
    """Read-only access to a run directory's episodes (store or legacy ``episodes.jsonl``).

    Opening reads nothing but the index's line starts; pages, episodes and shards are read on
    demand, and only the last few shards are kept. Nothing under the run directory is ever
    written, created or locked.

    Args:
        run_path: The run directory.

    Raises:
        RunDirError: The directory is missing or holds no episodes; the message says what is
            there and what to run.
    """

    CACHE_SHARDS = 4

    def __init__(self, run_path: str | Path):
        self.path = Path(run_path)
        self.problems: list[str] = []
        """What is incomplete (torn last line, missing shard, ...), for the viewers to show."""
        if not self.path.exists():
            raise RunDirError(_missing_message(self.path))
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")
        index, legacy = self.path / INDEX, self.path / LEGACY
        if index.exists():
            self.format = "store"
            self._file = index
        elif legacy.exists():
            self.format = "jsonl"
            self._file = legacy
        else:
            raise RunDirError(_empty_message(self.path))
        self._offsets = self._line_starts()
        self._legacy_rows: list[IndexRow] | None = None
        self._shards: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._metas: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._filtered: tuple[Filter, np.ndarray] | None = None
        self._by_id: dict[str, int] | None = None
        self._bad: set[int] = set()
        self._seen_problems: set[str] = set(self.problems)
        if self.format == "jsonl":
            self._legacy()

    # ---------------------------------------------------------------------- index
    def _line_starts(self) -> np.ndarray:
        """Byte offsets of the complete lines; a last line without its newline is reported."""
        starts = [np.zeros(1, dtype=np.int64)]
        size = 0
        with open(self._file, "rb") as f:
            while chunk := f.read(1 << 20):
                nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
                starts.append(nl.astype(np.int64) + size + 1)
                size += len(chunk)
        offsets = np.concatenate(starts)
        if offsets[-1] != size:
            torn = size - int(offsets[-1])
            self.problems.append(
                f"{self._file.relative_to(self.path)}: the last line is incomplete ({torn} bytes, "
                "no newline): the run is being written or was killed mid-write; showing the "
                f"{len(offsets) - 1} complete episodes"
            )
        self._size = int(offsets[-1])
        return offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _read_lines(self, i: int, j: int) -> list[bytes]:
        lo, hi = int(self._offsets[i]), int(self._offsets[j])
        with open(self._file, "rb") as f:
            f.seek(lo)
            data = f.read(hi - lo)
        return data.split(b"\n")[: j - i]

    def _problem(self, text: str) -> None:
        if text not in self._seen_problems:
            self._seen_problems.add(text)
            self.problems.append(text)

    def _parse(self, i: int, line: bytes) -> IndexRow | None:
        """Line ``i`` of the index as a row, or None (reported once) when it is unreadable."""
        if self.format == "jsonl":
            return self._legacy()[i]
        if i in self._bad:
            return None
        try:
            return IndexRow.from_dict(json.loads(line))
        except (ValueError, TypeError, RecursionError) as e:
            self._bad.add(i)
            self._problem(f"{INDEX} line {i + 1}: {_short(e)}; skipped")
            return None

    def _parse_dict(self, i: int, line: bytes) -> dict[str, Any] | None:
        """Line ``i`` as its checked JSON object, for filtering (no row object is built); None
        (reported once) when the line is unreadable."""
        if i in self._bad:
            return None
        try:
            d = json.loads(line)
            check_row(d)
            return d
        except (ValueError, TypeError, RecursionError) as e:
            self._bad.add(i)
            self._problem(f"{INDEX} line {i + 1}: {_short(e)}; skipped")
            return None

    def row_at(self, i: int) -> IndexRow:
        """Index line ``i``.

        Raises:
            RunDirError: The line is damaged; the message names the file and line.
        """
        row: IndexRow | None
        if self.format == "jsonl":
            row = self._legacy()[i]
        else:
            row = self._parse(i, self._read_lines(i, i + 1)[0])
        if row is None:
            raise RunDirError(f"{self.path / INDEX} line {i + 1} is damaged and was skipped")
        return row

    def rows_at(self, indices: Iterable[int]) -> Iterator[IndexRow]:
        """The readable index lines among ``indices`` (damaged ones are reported and skipped)."""
        for i in indices:
            if self.format == "jsonl":
                yield self._legacy()[int(i)]
                continue
            row = self._parse(int(i), self._read_lines(int(i), int(i) + 1)[0])
            if row is not None:
                yield row

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[IndexRow]:
        """Index lines ``start`` .. ``stop`` in file order, read in blocks; damaged lines are
        reported in :attr:`problems` and skipped."""
        stop = len(self) if stop is None else min(stop, len(self))
        if self.format == "jsonl":
            yield from self._legacy()[start:stop]
            return
        block = 4096
        for i in range(start, stop, block):
            for j, line in enumerate(self._read_lines(i, min(i + block, stop))):
                row = self._parse(i + j, line)
                if row is not None:
                    yield row

    def _legacy(self) -> list[IndexRow]:
        """Legacy ``episodes.jsonl``: one row per line; unreadable lines are reported and left
        as None-free gaps (the list holds only readable lines, in file order)."""
        if self._legacy_rows is None:
            rows: list[IndexRow] = []
            counts: dict[int, int] = {}
            lines = self._read_lines(0, len(self)) if len(self) else []
            for i, line in enumerate(lines):
                try:
                    d = json.loads(line)
                    if not isinstance(d, dict):
                        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
                    step = d.get("step", 0)
                    if type(step) is not int:
                        raise ValueError(f"field 'step' is {step!r}: expected int")
                    row = index_row(d, id="", step=step, shard=LEGACY, row=int(self._offsets[i]))
                    IndexRow.from_dict(asdict(row))
                except (ValueError, TypeError, AttributeError, RecursionError) as e:
                    self._problem(f"{LEGACY} line {i + 1}: {_short(e)}; skipped")
                    continue
                n = counts.get(step, 0)
                counts[step] = n + 1
                rows.append(replace(row, id=f"{step}-{n}"))
            self._legacy_rows = rows
            self._offsets = self._offsets[: len(rows) + 1]  # __len__: the readable lines
        return self._legacy_rows

    def matching(self, flt: Filter | None = None) -> np.ndarray:
        """Line numbers of the episodes that pass ``flt`` (cached for the last filter)."""
        flt = flt or Filter()
        if self.format == "jsonl":
            self._legacy()
        if flt.empty:
            keep_all = np.arange(len(self), dtype=np.int64)
            return keep_all[~np.isin(keep_all, list(self._bad))] if self._bad else keep_all
        if self._filtered is not None and self._filtered[0] == flt:
            return self._filtered[1]
        if self.format == "jsonl":
            keep = [i for i, r in enumerate(self._legacy()) if flt.matches_row(r)]
        else:
            keep = []
            block = 4096
            for start in range(0, len(self), block):
                lines = self._read_lines(start, min(start + block, len(self)))
                for j, x in enumerate(lines):
                    d = self._parse_dict(start + j, x)
                    if d is not None and flt.matches_dict(d):
                        keep.append(start + j)
        if flt.text:
            needle = flt.text.lower()
            found = []
            for i in keep:
                try:
                    text = episode_text(self._text_dict(i))
                except READ_ERRORS as e:
                    self._problem(str(e))
                    continue
                if needle in text.lower():
                    found.append(i)
            keep = found
        out = np.asarray(keep, dtype=np.int64)
        self._filtered = (flt, out)
        return out

    def page(self, number: int = 0, size: int = 200, flt: Filter | None = None) -> Page:
        """Page ``number`` (0-based, clamped to the last page) of the filtered list."""
        size = max(1, size)
        idx = self.matching(flt)
        pages = max(1, -(-len(idx) // size))
        number = min(max(0, number), pages - 1)
        chosen = idx[number * size : (number + 1) * size]
        if len(chosen) and chosen[-1] - chosen[0] == len(chosen) - 1:
            rows = list(self.rows(int(chosen[0]), int(chosen[-1]) + 1))
        else:
            rows = list(self.rows_at(chosen))
        return Page(rows=rows, number=number, size=size, matching=len(idx), total=len(self))

    def find(self, episode_id: str) -> IndexRow:
        """The index line of ``episode_id``.

        Raises:
            KeyError: No such episode; the message names the ids that exist nearby.
        """
        if self._by_id is None:
            self._by_id = {}
            if self.format == "jsonl":
                self._by_id = {r.id: i for i, r in enumerate(self._legacy())}
            else:
                for i in range(0, len(self), 4096):
                    for j, line in enumerate(self._read_lines(i, min(i + 4096, len(self)))):
                        row = self._parse(i + j, line)
                        if row is not None:
                            self._by_id.setdefault(row.id, i + j)
        if episode_id not in self._by_id:
            import difflib

            near = difflib.get_close_matches(episode_id, list(self._by_id), n=3, cutoff=0.5)
            hint = f" Nearest: {', '.join(near)}." if near else ""
            first = next(iter(self._by_id), None)
            raise KeyError(
                f"no episode {episode_id!r} in {self.path} ({len(self)} episodes, ids "
                f"'<step>-<n>', e.g. {first!r}).{hint}"
            )
        return self.row_at(self._by_id[episode_id])

    # ---------------------------------------------------------------------- episodes
    def _load(self, name: str) -> Any:
        """The open ``NpzFile`` of shard ``name``.

        Raises:
            RunDirError: The shard is missing, empty, truncated or not a shard; the message names
                the file.
        """
        path = self.path / name
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise RunDirError(f"{INDEX} names shard {name!r}, outside {EPISODES_DIR}/")
        if not path.exists():
            raise FileNotFoundError(
                f"{name} is listed in {INDEX} but missing: the run directory is incomplete"
            )
        try:
            return np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any damage to the file is the same fact
            raise RunDirError(_damaged(name, e)) from None

    def _shard(self, name: str) -> list[dict[str, Any]]:
        if name in self._shards:
            self._shards.move_to_end(name)
            return self._shards[name]
        with self._load(name) as z:
            try:
                _, dicts = decode_shard(z)
            except Exception as e:  # noqa: BLE001 - a truncated member fails anywhere inside
                raise RunDirError(_damaged(name, e)) from None
        self._shards[name] = dicts
        while len(self._shards) > self.CACHE_SHARDS:
            self._shards.popitem(last=False)
        return dicts

    def _text_dict(self, i: int) -> dict[str, Any]:
        """Episode ``i`` with its messages and turns; from a shard only the JSON part is read."""
        row = self.row_at(i)
        if row.shard == LEGACY:
            return self.episode_dict(row)
        if row.shard not in self._metas:
            with self._load(row.shard) as z:
                try:
                    self._metas[row.shard] = json.loads(bytes(z["meta"]).decode())["episodes"]
                except Exception as e:  # noqa: BLE001
                    raise RunDirError(_damaged(row.shard, e)) from None
            while len(self._metas) > self.CACHE_SHARDS:
                self._metas.popitem(last=False)
        return self._episode_at(self._metas[row.shard], row)

    def _episode_at(self, dicts: list[dict[str, Any]], row: IndexRow) -> dict[str, Any]:
        if not 0 <= row.row < len(dicts) or not isinstance(dicts[row.row], dict):
            raise RunDirError(
                f"{row.shard} holds {len(dicts)} episodes; {INDEX} says episode {row.id} is "
                f"number {row.row}: the index and the shard disagree"
            )
        return dicts[row.row]

    def episode_dict(self, row: IndexRow) -> dict[str, Any]:
        """The ``to_json`` dict of the episode behind ``row``.

        Raises:
            RunDirError: Its shard (or line) is damaged; the message names the file.
        """
        if row.shard == LEGACY:
            with open(self.path / LEGACY, "rb") as f:
                f.seek(row.row)
                line = f.readline()
            try:
                d = json.loads(line)
            except ValueError as e:
                raise RunDirError(f"{LEGACY} at byte {row.row}: {_short(e)}") from None
            return d
        return self._episode_at(self._shard(row.shard), row)

    def episode(self, row: IndexRow | str) -> Episode:
        """The :class:`Episode` behind an index row or an episode id."""
        if isinstance(row, str):
            row = self.find(row)
        d = self.episode_dict(row)
        try:
            return dict_to_episode(d)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RunDirError(f"{row.location}: not a readable episode ({_short(e)})") from None

    def iter_episodes(self, flt: Filter | None = None) -> Iterator[tuple[IndexRow, Episode]]:
        """Every (index row, episode) passing ``flt``, shard by shard."""
        for row in self.rows_at(self.matching(flt)):
            yield row, self.episode(row)

    def readable(self, rows: Iterable[IndexRow]) -> Iterator[tuple[IndexRow, dict[str, Any]]]:
        """(row, episode dict) for each of ``rows`` whose episode can be read; the others are
        reported in :attr:`problems` (naming the file) and skipped."""
        for row in rows:
            try:
                yield row, self.episode_dict(row)
            except READ_ERRORS as e:
                self._problem(f"episode {row.id} skipped: {e}")

    def summary(self) -> str:
        """One line: how many episodes, steps and in which format."""
        return f"{self.path}: {len(self)} episodes ({'store' if self.format == 'store' else 'legacy episodes.jsonl'})"


def _short(e: BaseException, limit: int = 200) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _damaged(name: str, e: BaseException) -> str:
    return (
        f"{name} cannot be read ({type(e).__name__}: {_short(e)}): the shard is truncated or "
        "damaged; its episodes are skipped"
    )


def _missing_message(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    near = []
    if parent.is_dir():
        import difflib

        names = [p.name for p in parent.iterdir() if p.is_dir()]
        near = difflib.get_close_matches(path.name, names, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(str(parent / n) for n in near)}?" if near else ""
    return (
        f"no run directory at {path}.{hint} A run directory is what `agentopd train` or "
        "`agentopd eval` writes under runs/ (its path is printed at the start of the run)."
    )


def _empty_message(path: Path) -> str:
    present = sorted(p.name for p in path.iterdir())
    what = ", ".join(present) if present else "nothing"
    return (
        f"{path} holds no episodes yet (neither {INDEX} nor {LEGACY}); it contains: {what}. "
        "A training run writes episodes after its first on-policy step; `agentopd eval` writes "
        "them when it finishes."
    )


def shard_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Size in bytes of a shard written from ``arrays`` (for measurements)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # as in _write_npz
    return buf.tell()
