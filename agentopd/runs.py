"""The run directory: resolved config, metrics and episodes logs, checkpoints, resume.

Layout of ``runs/<name>/``::

    config.yaml          resolved configuration
    metrics.jsonl        one line per step (and per evaluation)
    episodes/            every training episode: tokens, mask, teacher top-k, reward, stop reason
        index.jsonl      one line per episode (agentopd.replay.store)
        step_000010.npz  the step's token arrays and messages
    checkpoints/step_000010/
        model/           save_pretrained format (weights, config, tokenizer)
        trainer.pt       optimizer, scheduler and RNG state
        state.json       step, curriculum state, byte sizes of the logs at this point
    checkpoints/latest.json

A checkpoint whose weights hold a NaN or an infinity is never written: the weights
(``*.safetensors`` under it) are checked before it is renamed into place and ``latest.json``
moves (:class:`NonFiniteCheckpointError`), so ``resume=true`` never continues from a destroyed
model.

Every file is written atomically (a temporary file, fsync, rename). The JSONL logs are appended
and fsynced; a checkpoint records their sizes, and resuming truncates them back to those sizes,
so steps after the last checkpoint are replayed without duplicating or losing a line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOGS = ("metrics.jsonl", "episodes.jsonl", "episodes/index.jsonl")
"""Append-only logs a checkpoint records the sizes of (``episodes.jsonl``: older runs)."""


def _constant(name: str) -> Any:
    raise ValueError(name)


def _finite_or_null(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return x


def strict_json_line(line: str) -> str:
    """``line`` unchanged when it is strict JSON; with each NaN/Infinity as ``null`` otherwise.

    Raises:
        ValueError: The line is not JSON at all.
    """
    try:
        json.loads(line, parse_constant=_constant)
        return line
    except ValueError:
        obj = json.loads(line)  # a line that is not JSON at all raises here
    return json.dumps(_finite_or_null(obj), allow_nan=False)


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint's weights hold NaN or infinite values; it was not saved."""


def non_finite_weights(directory: Path) -> tuple[str, int] | None:
    """The first ``(file: tensor, count)`` holding NaN or infinite values among the
    ``*.safetensors`` files under ``directory`` (read one tensor at a time), or None."""
    from safetensors import safe_open

    for f in sorted(directory.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = st.get_tensor(name)
                if t.is_floating_point():
                    bad = int(t.numel() - t.isfinite().sum())
                    if bad:
                        return f"{f.relative_to(directory)}: {name}", bad
    return None


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling (yielded) that replaces ``path`` only when the
    block finishes: readers see the old directory or the complete new one, never a half-written
    one, and a failure leaves ``path`` as it was and no temporary behind. Files get mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
        tmp.chmod(0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    """One run's directory.

    Args:
        root: ``runs_dir``.
        name: Run name (a subdirectory of ``root``).
        create: Create the directory (False: only read it, as torchrun ranks other than 0 do).
    """

    def __init__(self, root: str | Path, name: str, create: bool = True):
        self.path = Path(root) / name
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.file("config.yaml"), yaml_text)

    def append_jsonl(self, name: str, lines: list[str]) -> None:
        """Append lines and fsync them. Every line written is strict JSON: a NaN or infinity
        in a line (``json.dumps`` writes them as ``NaN``/``Infinity``, which JSON readers
        reject) is written as ``null``."""
        if not lines:
            return
        lines = [strict_json_line(line) for line in lines]
        with open(self.file(name), "a", encoding="utf-8") as f:
            f.write("".join(line.rstrip("\n") + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    def append_episodes(self, step: int, episodes: list[Any]) -> None:
        """Store one step's episodes: the step's shard, then its index lines (see
        :mod:`agentopd.replay.store`; a kill leaves the step complete or absent)."""
        from agentopd.replay.store import write_step

        write_step(self.path, step, episodes)

    def remove_partial_checkpoints(self) -> list[Path]:
        """Remove ``.step_*`` temporary directories a kill left mid-save; returns them."""
        removed = []
        if self.checkpoints.is_dir():
            for tmp in self.checkpoints.glob(".step_*"):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    def log_sizes(self) -> dict[str, int]:
        return {n: (self.file(n).stat().st_size if self.file(n).exists() else 0) for n in LOGS}

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        p = self.file(name)
        if not p.exists():
            return []
        return [
            json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()
        ]

    def save_checkpoint(
        self, step: int, write_payload: Any, state: dict[str, Any], keep: int = 2
    ) -> Path:
        """Save a checkpoint atomically.

        Args:
            step: Training step just completed.
            write_payload: ``fn(directory)`` that writes the model and trainer state into it.
            state: JSON-able state (curriculum, counters); log sizes are added here.
            keep: How many checkpoints to keep.
        """
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step_{step:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".step_{step:06d}."))
        try:
            write_payload(tmp)
            bad = non_finite_weights(tmp)
            if bad is not None:
                raise NonFiniteCheckpointError(
                    f"checkpoint of step {step} not saved: {bad[0]} holds {bad[1]:,} NaN or "
                    f"infinite values. {self.checkpoints / 'latest.json'} still points to the "
                    "last good checkpoint; continue from it with resume=true."
                )
            full_state = {**state, "step": step, "log_sizes": self.log_sizes()}
            atomic_write_text(tmp / "state.json", json.dumps(full_state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.checkpoints)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(
            self.checkpoints / "latest.json", json.dumps({"step": step, "path": final.name})
        )
        old = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint and its state, or None."""
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        info = json.loads(pointer.read_text())
        path = self.checkpoints / info["path"]
        state_file = path / "state.json"
        if not state_file.exists():
            return None
        return path, json.loads(state_file.read_text())

    def truncate_logs(self, sizes: dict[str, int]) -> None:
        """Cut the logs back to the sizes a checkpoint recorded (drop un-checkpointed steps)."""
        for name in LOGS:
            p = self.file(name)
            size = int(sizes.get(name, 0))
            if p.exists() and p.stat().st_size > size:
                with open(p, "r+b") as f:
                    f.truncate(size)
                    f.flush()
                    os.fsync(f.fileno())
