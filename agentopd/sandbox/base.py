"""The sandbox interface (start, run code, stop) and the host side of the worker protocol.

A :class:`Sandbox` owns one persistent Python worker (see ``worker.py``) inside some isolation
backend. Backends implement only :meth:`Sandbox._launch` (start the isolated worker and return a
:class:`Channel` to it) and :meth:`Sandbox._destroy` (kill and remove everything it made).
Everything else lives here: the ready handshake, per-call soft and hard timeouts, restarting a
worker after a timeout or crash (the result says so), resetting a sandbox between episodes
(:meth:`Sandbox.reset`, used by ``pool.py``), and removing every live sandbox at interpreter
exit, on SIGTERM / SIGHUP and (through the backends) when the trainer dies. A backend tells
the worker what a reset must restore through :meth:`Sandbox.worker_config` (``scratch``,
``private_ipc``, ``own_userns``, ``private_net``; see ``worker.py``).

Example::

    from agentopd.sandbox import make_sandbox

    with make_sandbox("auto") as box:
        box.run("x = 6 * 7")
        print(box.run("print(x)").stdout)  # "42\\n"
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import queue
import select
import signal
import struct
import subprocess
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentopd.tooling import TRUNCATION_MARKER

WORKER_SOURCE = (Path(__file__).with_name("worker.py")).read_text()
HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
HARD_GRACE_S = 0.5
"""The host kills the sandbox this long after the soft timeout (the worker's supervisor kills and
restarts its executor 0.2 s after it, so this is the backstop for a supervisor that hangs)."""
PR_SET_PDEATHSIG = 1
NOBODY = 65534


class SandboxError(RuntimeError):
    """The sandbox could not be started or talked to."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox. Each backend enforces what it can (see docs/sandbox.md)."""

    memory_mb: int = 512
    """Address space of the worker (rlimit) and, for docker, the container memory limit."""
    cpus: float = 1.0
    """CPU cores the sandbox may use (docker: CPU quota; bwrap and local: the worker's supervisor
    throttles the sandbox's processes with SIGSTOP / SIGCONT during a call; 0 turns that off)."""
    pids: int = 64
    """Maximum number of processes (docker pids cgroup; rlimit NPROC per user namespace else)."""
    work_dir_mb: int = 64
    """Size of the writable work dir (tmpfs for docker / bwrap)."""
    file_size_mb: int = 32
    """Largest file the code may write (rlimit FSIZE)."""
    open_files: int = 256
    """Maximum open file descriptors (rlimit NOFILE)."""
    cpu_time_s: int = 3600
    """CPU seconds over the whole life of a worker (rlimit CPU; a backstop, per-call time is the timeout)."""
    max_output_bytes: int = 65536
    """Bytes of stdout and of stderr kept per call; the rest is counted and reported as truncated."""

    def rlimits(self, nproc: bool = True) -> dict[str, list[int]]:
        """The rlimits the worker sets on itself at start-up."""
        mb = 1 << 20
        r = {
            "RLIMIT_AS": [self.memory_mb * mb, self.memory_mb * mb],
            "RLIMIT_FSIZE": [self.file_size_mb * mb, self.file_size_mb * mb],
            "RLIMIT_NOFILE": [self.open_files, self.open_files],
            "RLIMIT_CPU": [self.cpu_time_s, self.cpu_time_s],
            "RLIMIT_CORE": [0, 0],
        }
        if nproc:
            r["RLIMIT_NPROC"] = [self.pids, self.pids]
        return r


@dataclass
class ExecResult:
    """Outcome of one :meth:`Sandbox.run` call."""

    stdout: str = ""
    """Captured standard output (at most ``Limits.max_output_bytes``)."""
    stderr: str = ""
    """Captured standard error (same limit)."""
    exception: str | None = None
    """Traceback of an exception the code raised (state is kept, like a notebook cell)."""
    timed_out: bool = False
    """The code ran past its timeout and was stopped."""
    crashed: bool = False
    """The code's process died during the call (killed, out of memory, ``os._exit``, ...)."""
    restarted: bool = False
    """The Python executor (or the whole sandbox) was restarted: variables from earlier calls
    are lost. ``detail`` says why (a crash, a timeout the code ignored, threads still running
    after the call, tampering with the executor's private pipes)."""
    stdout_dropped: int = 0
    """Bytes of stdout not kept (over the limit)."""
    stderr_dropped: int = 0
    """Bytes of stderr not kept."""
    stdout_dropped_chars: int = 0
    """Characters of stdout not kept (UTF-8 code points; what the truncation note reports)."""
    stderr_dropped_chars: int = 0
    """Characters of stderr not kept."""
    killed_processes: int = 0
    """Leftover processes the worker killed after the call."""
    duration_s: float = 0.0
    """Wall time of the call as seen by the host."""
    detail: str = ""
    """What went wrong, for crashes and timeouts."""

    @property
    def ok(self) -> bool:
        return not (self.exception or self.timed_out or self.crashed)

    def to_text(self) -> str:
        """The tool result shown to the model: stdout, then stderr, errors and truncation notes."""
        parts: list[str] = []
        if self.stdout:
            parts.append(self.stdout + _dropped_note(self.stdout_dropped_chars))
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr + _dropped_note(self.stderr_dropped_chars))
        if self.exception:
            parts.append(self.exception.rstrip("\n"))
        if self.timed_out or self.crashed:
            parts.append(f"Error: {self.detail}")
        elif self.detail:
            parts.append(f"[{self.detail}]")
        if self.killed_processes:
            parts.append(
                f"[{self.killed_processes} leftover process(es) were killed after the call]"
            )
        return "\n".join(p.rstrip("\n") for p in parts) if parts else "(no output)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dropped_note(n: int) -> str:
    return TRUNCATION_MARKER.format(dropped=n) if n else ""


# ---------------------------------------------------------------------------- channels
class Channel(ABC):
    """A byte pipe to the worker: ``send`` requests, ``recv`` its stdout bytes with a deadline."""

    @abstractmethod
    def send(self, data: bytes) -> None: ...

    @abstractmethod
    def recv(self, deadline: float) -> bytes | None:
        """Some bytes of the worker's protocol stream; ``None`` at the deadline; ``b""`` at EOF."""

    @abstractmethod
    def close(self) -> None: ...

    def stderr_tail(self) -> str:
        """Last bytes the worker (or the launcher) wrote to its own stderr, for error messages."""
        return ""


class PipeChannel(Channel):
    """A channel over a child process's stdin / stdout pipes (local and bwrap)."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._in = proc.stdin.fileno()
        self._out = proc.stdout.fileno()
        self._err = proc.stderr.fileno() if proc.stderr is not None else None
        self._err_tail = b""

    def send(self, data: bytes) -> None:
        while data:
            data = data[os.write(self._in, data) :]

    def recv(self, deadline: float) -> bytes | None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            fds = [self._out] + ([self._err] if self._err is not None else [])
            ready, _, _ = select.select(fds, [], [], left)
            if self._err is not None and self._err in ready:
                chunk = os.read(self._err, 65536)
                if chunk:
                    self._err_tail = (self._err_tail + chunk)[-4096:]
                else:
                    self._err = None
            if self._out in ready:
                return os.read(self._out, 1 << 20)

    def stderr_tail(self) -> str:
        if self._err is not None:
            with contextlib.suppress(OSError):
                if select.select([self._err], [], [], 0)[0]:
                    self._err_tail = (self._err_tail + os.read(self._err, 65536))[-4096:]
        return self._err_tail.decode("utf-8", "replace").strip()

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()


class FrameReader:
    """Reassembles length-prefixed JSON frames from a byte stream."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def read(self, channel: Channel, deadline: float) -> dict[str, Any] | None:
        """The next frame, ``None`` at the deadline. Raises ``EOFError`` / ``SandboxError``."""
        while True:
            if len(self.buf) >= HEADER.size:
                (n,) = HEADER.unpack(self.buf[: HEADER.size])
                if n > MAX_FRAME:
                    raise SandboxError(f"protocol error: frame of {n} bytes from the worker")
                if len(self.buf) >= HEADER.size + n:
                    data = bytes(self.buf[HEADER.size : HEADER.size + n])
                    del self.buf[: HEADER.size + n]
                    try:
                        frame = json.loads(data)
                    except ValueError as e:
                        raise SandboxError(
                            f"protocol error: bad frame from the worker ({e})"
                        ) from e
                    if not isinstance(frame, dict):
                        raise SandboxError("protocol error: frame is not an object")
                    return frame
            chunk = channel.recv(deadline)
            if chunk is None:
                return None
            if not chunk:
                raise EOFError("the worker closed its output")
            self.buf += chunk


_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int,),
    "stdout": (str,),
    "stderr": (str,),
    "stdout_dropped": (int,),
    "stderr_dropped": (int,),
    "stdout_dropped_chars": (int,),
    "stderr_dropped_chars": (int,),
    "exception": (str, type(None)),
    "timed_out": (bool,),
    "crashed": (bool,),
    "restarted": (bool,),
    "killed_processes": (int,),
    "duration_s": (int, float),
    "note": (str,),
}


def result_from_frame(frame: dict[str, Any], call_id: int) -> ExecResult:
    """The :class:`ExecResult` of a worker's result frame, checked field by field.

    Raises:
        SandboxError: A field is missing or has the wrong type, or the frame answers another
            call. The caller then restarts the sandbox: a stream that went out of step is never
            read on.
    """
    for key, types in _RESULT_FIELDS.items():
        value = frame.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise SandboxError(
                f"protocol error: result field {key!r} should be "
                f"{' or '.join(t.__name__ for t in types)}, got {type(value).__name__}"
            )
    if frame["id"] != call_id:
        raise SandboxError(f"protocol error: result for call {frame['id']}, expected {call_id}")
    return ExecResult(
        stdout=frame["stdout"],
        stderr=frame["stderr"],
        exception=frame["exception"],
        timed_out=frame["timed_out"],
        crashed=frame["crashed"],
        restarted=frame["restarted"],
        stdout_dropped=frame["stdout_dropped"],
        stderr_dropped=frame["stderr_dropped"],
        stdout_dropped_chars=frame["stdout_dropped_chars"],
        stderr_dropped_chars=frame["stderr_dropped_chars"],
        killed_processes=frame["killed_processes"],
        detail=frame["note"],
    )


_RESET_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int,),
    "reset": (bool,),
    "ok": (bool,),
    "problems": (list,),
    "killed_processes": (int,),
    "removed_entries": (int,),
    "duration_s": (int, float),
}


def reset_from_frame(frame: dict[str, Any], call_id: int) -> ExecResult:
    """The outcome of a worker's reset reply, checked field by field (as :func:`result_from_frame`).

    Raises:
        SandboxError: A field is missing or has the wrong type, the reply answers another call,
            or ``ok`` disagrees with ``problems``.
    """
    for key, types in _RESET_FIELDS.items():
        value = frame.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise SandboxError(f"protocol error: reset field {key!r} has the wrong type")
    if frame["id"] != call_id or frame["reset"] is not True:
        raise SandboxError(f"protocol error: reply to call {frame['id']}, expected reset {call_id}")
    if not all(isinstance(p, str) for p in frame["problems"]) or frame["ok"] == bool(
        frame["problems"]
    ):
        raise SandboxError("protocol error: reset reply with inconsistent problems")
    return ExecResult(
        killed_processes=frame["killed_processes"],
        detail=f"reset: {frame['removed_entries']} entries removed",
    )


def encode_frame(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj).encode("utf-8")
    return HEADER.pack(len(data)) + data


# ---------------------------------------------------------------------------- sandbox
class Sandbox(ABC):
    """One isolated, persistent Python worker: :meth:`start`, :meth:`run` code, :meth:`stop`.

    Args:
        limits: Resource limits.
        timeout_s: Default per-call timeout.
        startup_timeout_s: How long to wait for a fresh worker to say it is ready.

    The worker starts lazily on the first :meth:`run` if :meth:`start` was not called. After a
    timeout the worker is interrupted inside the cell (variables survive) or, if that does not
    work within ``HARD_GRACE_S``, the whole sandbox is destroyed and the next call starts a fresh
    one (``ExecResult.restarted``). Thread-safe (calls are serialised).
    """

    name: str = "base"
    """Backend name."""
    strength: int = 0
    """Higher is stronger isolation; ``auto`` picks the strongest available."""
    secure: bool = True
    """False for backends that are not a security boundary."""

    def __init__(
        self, limits: Limits | None = None, timeout_s: float = 10.0, startup_timeout_s: float = 30.0
    ):
        self.limits = limits or Limits()
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._channel: Channel | None = None
        self._reader = FrameReader()
        self._lock = threading.RLock()
        self.worker_info: dict[str, Any] = {}
        self.restarts = 0
        self._calls = 0

    # ------------------------------------------------------------ backend hooks
    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """Cheap check: ``(usable, reason or details)``; never raises."""

    @abstractmethod
    def _launch(self, config: dict[str, Any]) -> Channel:
        """Start the isolated worker with ``python3 -I -S -u -c WORKER_SOURCE json(config)``."""

    @abstractmethod
    def _destroy(self) -> None:
        """Kill the worker and remove every process, container and directory this sandbox made."""

    def worker_argv(self, python: str, config: dict[str, Any]) -> list[str]:
        return [python, "-I", "-S", "-u", "-c", WORKER_SOURCE, json.dumps(config)]

    def worker_config(self) -> dict[str, Any]:
        return {"rlimits": self.limits.rlimits(), "max_output": self.limits.max_output_bytes}

    # ------------------------------------------------------------ public API
    @property
    def running(self) -> bool:
        return self._channel is not None

    def start(self) -> None:
        """Start the worker (no-op if it is running)."""
        with self._lock:
            if self._channel is not None:
                return
            _register(self)
            try:
                self._channel = self._launch(self.worker_config())
                self._reader = FrameReader()
                deadline = time.monotonic() + self.startup_timeout_s
                frame = self._reader.read(self._channel, deadline)
                if frame is None or not frame.get("ready"):
                    raise SandboxError(f"worker did not start within {self.startup_timeout_s:g} s")
                self.worker_info = frame
            except (EOFError, OSError, SandboxError) as e:
                tail = self._channel.stderr_tail() if self._channel is not None else ""
                self._teardown()
                raise SandboxError(
                    f"{self.name} sandbox failed to start: {e}" + (f": {tail}" if tail else "")
                ) from e

    def run(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` in the worker; never raises for anything the code does."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            notice = ""
            if self._channel is not None and not self._worker_alive():
                hint = self._crash_hint()
                self._teardown()
                self.restarts += 1
                notice = (
                    "[the Python worker had died after the previous call"
                    + (f" ({hint})" if hint else "")
                    + "; it was restarted and variables from earlier calls are lost]\n"
                )
            self.start()
            assert self._channel is not None
            t0 = time.monotonic()
            self._calls += 1
            try:
                self._channel.send(
                    encode_frame({"id": self._calls, "code": str(code), "timeout": timeout})
                )
                frame = self._reader.read(self._channel, t0 + timeout + HARD_GRACE_S)
                if frame is not None:
                    r = result_from_frame(frame, self._calls)
            except (EOFError, OSError, SandboxError) as e:
                return self._fail(t0, crashed=True, why=e)
            if frame is None:
                return self._fail(t0, timed_out=True, timeout=timeout)
            r.duration_s = time.monotonic() - t0
            if r.timed_out and not r.restarted:
                r.detail = (
                    f"the code ran past the {timeout:g} s time limit and was interrupted; "
                    "variables from earlier calls are kept."
                )
            if notice:
                r.restarted, r.detail = True, (notice + " " + r.detail).strip()
            return r

    def reset(self, timeout_s: float = 10.0) -> ExecResult:
        """Bring a running sandbox back to its start-up state, for the next episode.

        The worker kills every process in the sandbox, removes everything the code left in the
        backend's writable places (work dir, ``/tmp``, ``/dev/shm``, ...), System V IPC objects
        and kernel keys where the sandbox has its own IPC / user namespace, checks that against
        what it recorded at start-up (network sockets included) and starts a fresh Python
        executor: variables, imports, environment variables and cwd are back to a fresh
        sandbox's. Limits (rlimits, docker's memory / CPU / pids cgroup) are untouched.

        Returns:
            The outcome (``killed_processes``, ``detail`` with the entries removed, and
            ``duration_s``).

        Raises:
            SandboxError: The sandbox is not running, did not answer within ``timeout_s``, or
                is not clean after the reset (the message lists what differs). The caller must
                then discard it (:meth:`stop`), never reuse it.
        """
        with self._lock:
            if self._channel is None or not self._worker_alive():
                raise SandboxError(f"{self.name} sandbox cannot be reset: it is not running")
            t0 = time.monotonic()
            self._calls += 1
            try:
                self._channel.send(encode_frame({"id": self._calls, "reset": True}))
                frame = self._reader.read(self._channel, t0 + timeout_s)
            except (EOFError, OSError, SandboxError) as e:
                self._teardown()
                raise SandboxError(f"{self.name} sandbox reset failed: {e}") from e
            if frame is None:
                self._teardown()
                raise SandboxError(f"{self.name} sandbox did not reset within {timeout_s:g} s")
            try:
                r = reset_from_frame(frame, self._calls)
            except SandboxError:
                self._teardown()
                raise
            if frame["problems"]:
                self._teardown()
                raise SandboxError(
                    f"{self.name} sandbox is not clean after its reset: "
                    + "; ".join(frame["problems"])
                )
            self.restarts = 0
            r.duration_s = time.monotonic() - t0
            return r

    def stop(self) -> None:
        """Kill the worker and remove everything the sandbox made (idempotent)."""
        with self._lock:
            self._teardown()
            _unregister(self)

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ internals
    def _fail(
        self,
        t0: float,
        *,
        crashed: bool = False,
        timed_out: bool = False,
        timeout: float = 0.0,
        why: object = None,
    ) -> ExecResult:
        tail = self._channel.stderr_tail() if self._channel is not None else ""
        hint = self._crash_hint()
        self._teardown()
        self.restarts += 1
        if timed_out:
            detail = (
                f"the code ran past the {timeout:g} s time limit and was killed. The Python worker "
                "was restarted: variables from earlier calls are lost."
            )
        else:
            detail = (
                "the Python worker died during the call"
                + (f" ({hint})" if hint else "")
                + ". It was restarted: variables from earlier calls are lost."
            )
            if tail:
                detail += f" Worker stderr: {tail[-300:]}"
        return ExecResult(
            timed_out=timed_out,
            crashed=crashed,
            restarted=True,
            duration_s=time.monotonic() - t0,
            detail=detail,
        )

    def _worker_alive(self) -> bool:
        """Cheap liveness check before a call (a dead worker is restarted with a notice)."""
        return True

    def _crash_hint(self) -> str:
        """Backend-specific reason for a crash (e.g. out of memory); empty if unknown."""
        return ""

    def _teardown(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        try:
            self._destroy()
        except Exception:  # noqa: BLE001 - best effort; stale-resource cleanup catches the rest
            pass


# ---------------------------------------------------------------------------- process helpers
libc = ctypes.CDLL(None, use_errno=True)


def set_pdeathsig() -> None:
    """In a forked child: get SIGKILL when the parent thread dies."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Spawner:
    """Starts children from one long-lived thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, and tools often run
    in short-lived pool threads; forking from this thread ties the child's life to the process.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def __call__(self, fn: Callable[[], Any]) -> Any:
        with self._guard:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="agentopd-sandbox-spawner", daemon=True
                )
                self._thread.start()
        done: queue.Queue[Any] = queue.Queue()
        self._jobs.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                done.put((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                done.put((False, e))


spawn = _Spawner()


def descendant_pids(root: int) -> list[int]:
    """Every live descendant of ``root`` (scans ``/proc``)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(name))
    found, todo = [], list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def kill_process_tree(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL ``proc``, its process group and every descendant, and reap it."""
    if proc is None:
        return
    for _ in range(3):
        pids = descendant_pids(proc.pid)
        if not pids:
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# ---------------------------------------------------------------------------- cleanup
_live: weakref.WeakSet[Sandbox] = weakref.WeakSet()
_hooks_installed = False
_hooks_lock = threading.Lock()


def _register(box: Sandbox) -> None:
    _install_hooks()
    _live.add(box)


def _unregister(box: Sandbox) -> None:
    _live.discard(box)


_stop_hooks: list[Callable[[], None]] = []


def on_stop_all(hook: Callable[[], None]) -> None:
    """Run ``hook`` first whenever :func:`stop_all` runs (pools stop refilling before the sweep).

    Also installs the atexit and signal hooks, so a hook is run at interpreter exit even if no
    sandbox was started yet.
    """
    _install_hooks()
    if hook not in _stop_hooks:
        _stop_hooks.append(hook)


def stop_all() -> None:
    """Stop every live sandbox of this process (atexit, signals, tests)."""
    for hook in list(_stop_hooks):
        with contextlib.suppress(Exception):
            hook()
    for box in list(_live):
        with contextlib.suppress(Exception):
            box.stop()


def _install_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(stop_all)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _die_cleanly)


def _die_cleanly(signum: int, frame: object) -> None:
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
