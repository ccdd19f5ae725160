"""A warm pool of started sandboxes, reset between episodes: ``acquire`` in microseconds.

Starting a sandbox costs tens to hundreds of milliseconds (a container, a set of namespaces, two
Python processes); a batch of 64-256 code episodes per training step pays that for every
episode. A :class:`SandboxPool` keeps started sandboxes of one configuration (backend, limits,
timeout, backend options) and hands one out per episode:

* :meth:`SandboxPool.acquire` returns a started sandbox that is clean (fresh, or reset and
  checked), or starts one on the spot when none is ready;
* :meth:`SandboxPool.release` hands it back; background threads reset it
  (:meth:`Sandbox.reset`: every process killed, the writable places emptied, IPC objects, kernel
  keys and sockets checked, a fresh Python executor) and health-check it with one call. A
  sandbox that fails either is stopped and replaced, never reused.

The pool keeps at most ``size`` sandboxes ready. It refills in the background up to
``min(size, the most sandboxes ever in use at once)`` (what the batch actually needs) and
:meth:`SandboxPool.warm` fills it ahead of time. Pools of the same configuration are shared
within a process (:func:`shared_pool`); :func:`close_pools` stops them all and every sandbox
they hold, and runs at interpreter exit, on SIGTERM / SIGHUP and after Ctrl-C (through
:func:`agentopd.sandbox.base.stop_all`). If the trainer is killed outright, the backends'
own clean-up applies (docker containers are labelled with their owner and reaped by the next
run). See ``docs/sandbox.md`` for what a reset does and does not restore.

Example::

    from agentopd.sandbox.pool import SandboxPool

    pool = SandboxPool("bwrap", size=4)
    box = pool.acquire()
    box.run("x = 1")
    pool.release(box)  # reset in the background; the next acquire gets a clean one
    pool.close()
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agentopd.sandbox.base import Limits, Sandbox, SandboxError, on_stop_all
from agentopd.sandbox.factory import make_sandbox, resolve_backend

log = logging.getLogger("agentopd.sandbox")

MAX_POOL_SIZE = 1024
"""Largest ``size`` accepted (a typo guard, far above a batch of episodes)."""
HEALTH_CODE = "print(6 * 7)"
HEALTH_OUTPUT = "42\n"


def check_pool_size(value: Any, key: str = "pool_size") -> int:
    """``value`` as a pool size, or a ``ValueError`` naming ``key``, what is expected and why.

    Raises:
        ValueError: ``value`` is not an integer in ``0..MAX_POOL_SIZE`` (bools are refused).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{key} must be an integer >= 0 (0 = a fresh sandbox per episode), "
            f"got {value!r} ({type(value).__name__})"
        )
    if not 0 <= value <= MAX_POOL_SIZE:
        nearest = min(max(value, 0), MAX_POOL_SIZE)
        raise ValueError(
            f"{key} must be between 0 and {MAX_POOL_SIZE}, got {value}; nearest valid value: {nearest}"
        )
    return value


@dataclass
class PoolStats:
    """Counters of one pool (read them for benchmarks and tests)."""

    acquired: int = 0
    """Sandboxes handed out."""
    hits: int = 0
    """... of which were ready in the pool."""
    started: int = 0
    """Sandboxes started (inline on a miss, or in the background)."""
    resets: int = 0
    """Successful resets (sandbox back in the pool)."""
    discarded: int = 0
    """Sandboxes stopped because their reset or health check failed, they died, or the pool
    was full."""
    failures: list[str] = field(default_factory=list)
    """The last few reasons a sandbox was discarded or a start failed."""


class SandboxPool:
    """Started sandboxes of one configuration, reset between episodes.

    Args:
        backend: ``auto``, ``docker``, ``bwrap`` or ``local`` (resolved once, at construction).
        size: Most sandboxes kept ready (0: :meth:`acquire` starts a fresh one every time and
            :meth:`release` stops it).
        limits: Resource limits of every sandbox.
        timeout_s: Default per-call timeout of every sandbox.
        reset_timeout_s: How long a reset may take before the sandbox is discarded.
        workers: Background threads that reset, health-check and start sandboxes.
        **options: Backend options (``image=`` for docker, ...), as for
            :func:`~agentopd.sandbox.factory.make_sandbox`.

    Thread-safe. Sandboxes handed out are the caller's until :meth:`release`; the pool never
    touches them meanwhile.
    """

    def __init__(
        self,
        backend: str = "auto",
        size: int = 8,
        limits: Limits | None = None,
        timeout_s: float = 10.0,
        reset_timeout_s: float = 10.0,
        workers: int = 2,
        **options: Any,
    ):
        self.backend = resolve_backend(backend)
        self.size = check_pool_size(size, "size")
        self.limits = limits or Limits()
        self.timeout_s = float(timeout_s)
        self.reset_timeout_s = float(reset_timeout_s)
        self.options = dict(options)
        self.stats = PoolStats()
        self._ready: deque[Sandbox] = deque()
        self._dirty: deque[Sandbox] = deque()
        self._in_use = 0
        self._peak = 0
        self._starting = 0
        self._resetting = 0
        self._want = 0
        self._closed = False
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._n_workers = max(1, int(workers))
        on_stop_all(self.close)

    # ------------------------------------------------------------ public API
    def acquire(self) -> Sandbox:
        """A started, clean sandbox for one episode (ready in the pool, or started now).

        Waits for a sandbox whose reset is in flight when nothing is ready (a reset is much
        cheaper than a start), else starts one inline.

        Raises:
            SandboxError: The pool is closed, or a sandbox could not be started.
        """
        with self._cond:
            self._check_open()
            self.stats.acquired += 1
            self._in_use += 1
            self._peak = max(self._peak, self._in_use)
            deadline = time.monotonic() + self.reset_timeout_s
            while True:
                while self._ready:
                    box = self._ready.popleft()
                    if box.running and box._worker_alive():
                        self.stats.hits += 1
                        self._cond.notify_all()  # the refill target may have moved
                        return box
                    self._discard(box, "died while waiting in the pool")
                if not (self._resetting or self._dirty) or time.monotonic() >= deadline:
                    break
                self._cond.wait(deadline - time.monotonic())
            self._cond.notify_all()
        try:
            return self._start()
        except BaseException:
            with self._cond:
                self._in_use -= 1
            raise

    def release(self, box: Sandbox) -> None:
        """Hand ``box`` back after its episode; it is reset in the background (never blocks)."""
        with self._cond:
            self._in_use = max(0, self._in_use - 1)
            if self._closed or self.size == 0:
                closing = True
            else:
                closing = False
                self._dirty.append(box)
                self._ensure_threads()
                self._cond.notify_all()
        if closing:
            box.stop()

    def warm(self, n: int | None = None, wait_s: float | None = None) -> int:
        """Start sandboxes in the background until ``n`` (default ``size``) are ready.

        Args:
            n: How many to have ready (at most ``size``).
            wait_s: Wait up to this long for them; ``None`` returns at once.

        Returns:
            How many are ready now.
        """
        with self._cond:
            self._check_open()
            self._want = max(self._want, min(self.size, self.size if n is None else n))
            self._ensure_threads()
            self._cond.notify_all()
            if wait_s is not None:
                deadline = time.monotonic() + wait_s
                while len(self._ready) < self._want and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
            return len(self._ready)

    @property
    def ready(self) -> int:
        """Sandboxes ready to hand out now."""
        with self._cond:
            return len(self._ready)

    def idle(self, wait_s: float = 10.0) -> bool:
        """Wait until no reset or start is in flight (for tests and benchmarks); True if so."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._dirty or self._resetting or self._starting or self._refill_needed():
                if time.monotonic() >= deadline:
                    return False
                self._cond.wait(min(0.05, deadline - time.monotonic()))
            return True

    def close(self) -> None:
        """Stop refilling and stop every sandbox the pool holds (idempotent).

        Sandboxes handed out and not yet released are the caller's; they are stopped when
        released, and by ``stop_all`` at exit.
        """
        with self._cond:
            self._closed = True
            boxes = list(self._ready) + list(self._dirty)
            self._ready.clear()
            self._dirty.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        for box in boxes:
            with contextlib.suppress(Exception):
                box.stop()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=self.reset_timeout_s + 5)
        with _pools_lock:
            for key, pool in list(_pools.items()):
                if pool is self:
                    del _pools[key]

    # ------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox pool is closed")

    def _start(self) -> Sandbox:
        box = make_sandbox(
            self.backend, limits=self.limits, timeout_s=self.timeout_s, **self.options
        )
        try:
            box.start()
        except BaseException:
            box.stop()
            raise
        with self._cond:
            self.stats.started += 1
        return box

    def _discard(self, box: Sandbox, why: str) -> None:
        """Count and stop ``box`` (called with or without the lock; stopping is idempotent)."""
        self.stats.discarded += 1
        self.stats.failures = (self.stats.failures + [why])[-8:]
        log.debug("sandbox pool: discarded a %s sandbox: %s", self.backend, why)
        with contextlib.suppress(Exception):
            box.stop()

    def _target(self) -> int:
        return min(self.size, max(self._peak, self._want))

    def _refill_needed(self) -> bool:
        owned = len(self._ready) + len(self._dirty) + self._resetting + self._starting
        return not self._closed and owned + self._in_use < self._target()

    def _ensure_threads(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self._n_workers:
            t = threading.Thread(target=self._work, name="agentopd-sandbox-pool", daemon=True)
            t.start()
            self._threads.append(t)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._dirty or self._refill_needed()):
                    self._cond.wait()
                if self._closed:
                    return
                if self._dirty:
                    box, job = self._dirty.popleft(), "reset"
                    self._resetting += 1
                else:
                    box, job = None, "start"
                    self._starting += 1
            try:
                if job == "reset":
                    assert box is not None
                    self._recycle(box)
                else:
                    self._refill()
            finally:
                with self._cond:
                    if job == "reset":
                        self._resetting -= 1
                    else:
                        self._starting -= 1
                    self._cond.notify_all()

    def _recycle(self, box: Sandbox) -> None:
        """Reset and health-check ``box``; back into the pool, or discarded."""
        try:
            box.reset(timeout_s=self.reset_timeout_s)
            box.limits, box.timeout_s = self.limits, self.timeout_s
            r = box.run(HEALTH_CODE, timeout_s=self.reset_timeout_s)
            if r.stdout != HEALTH_OUTPUT or not r.ok or r.restarted or r.killed_processes:
                raise SandboxError(f"health check failed: {r.to_text()[:200]}")
        except Exception as e:  # noqa: BLE001 - any failure: the sandbox is not reused
            self._discard(box, str(e))
            return
        with self._cond:
            if self._closed or len(self._ready) >= self.size:
                keep = False
            else:
                keep = True
                self.stats.resets += 1
                self._ready.append(box)
        if not keep:
            self._discard(box, "the pool is full" if not self._closed else "the pool is closed")

    def _refill(self) -> None:
        try:
            box = self._start()
        except Exception as e:  # noqa: BLE001 - retried by the next acquire's inline start
            with self._cond:
                self.stats.failures = (self.stats.failures + [f"start failed: {e}"])[-8:]
                self._want = 0
                self._peak = min(self._peak, self._in_use)  # do not spin on a broken backend
            log.warning("sandbox pool: could not start a %s sandbox: %s", self.backend, e)
            return
        with self._cond:
            if self._closed or len(self._ready) >= self.size:
                keep = False
            else:
                keep = True
                self._ready.append(box)
        if not keep:
            box.stop()


# ---------------------------------------------------------------------------- shared pools
_pools: dict[tuple[Any, ...], SandboxPool] = {}
_pools_lock = threading.Lock()


def shared_pool(
    backend: str, size: int, limits: Limits, timeout_s: float, **options: Any
) -> SandboxPool:
    """The process's pool for this configuration (created on first use).

    Every env instance of a run (one per episode) asks for the same configuration and gets the
    same pool, so sandboxes released by one episode are acquired by the next.
    """
    name = resolve_backend(backend)
    key = (
        name,
        size,
        limits,
        float(timeout_s),
        tuple(sorted((k, repr(v)) for k, v in options.items())),
    )
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None or pool._closed:
            pool = _pools[key] = SandboxPool(
                name, size=size, limits=limits, timeout_s=timeout_s, **options
            )
        return pool


def close_pools() -> None:
    """Close every shared pool of this process and stop the sandboxes they hold."""
    with _pools_lock:
        pools = list(_pools.values())
    for pool in pools:
        pool.close()


def live_pools() -> list[SandboxPool]:
    """The shared pools open now."""
    with _pools_lock:
        return [p for p in _pools.values() if not p._closed]
