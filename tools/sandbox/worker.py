"""The persistent Python worker that runs *inside* a sandbox (stdlib only, Python >= 3.8).

The host starts it as ``python3 -I -S -u -c <this source> <config-json>``; it must not import
anything from agentopd. It keeps one globals dict alive across calls (like notebook cells) and
speaks length-prefixed JSON frames on its original stdin/stdout, which it moves to private
close-on-exec descriptors before any user code runs. User code sees fd 0 as ``/dev/null`` and fds
1 and 2 as pipes drained by two threads into bounded buffers (the first ``max_output`` bytes are
kept, the rest only counted).

Per call it enforces a soft timeout (a ``SIGALRM`` that raises inside the cell, so variables
survive); the host enforces the hard one by killing the whole sandbox. After every call it kills
every descendant process (it is a child subreaper, so daemonised grandchildren come back to it),
so nothing outlives a call. It exits when its stdin closes (the trainer went away).

Config keys: ``rlimits`` (name -> [soft, hard]), ``max_output`` (bytes), ``pidns`` (fork once to
become PID 1 of a PID namespace prepared by the launcher).
"""

import ast
import ctypes
import json
import os
import resource
import signal
import struct
import sys
import threading
import time
import traceback

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
HEADER = struct.Struct(">I")
PRIVATE_PIDNS = False


class CellTimeout(BaseException):
    """Raised inside the running cell when its time is up."""


def read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def send(fd, obj):
    data = json.dumps(obj).encode("utf-8")
    data = HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def recv(fd):
    (n,) = HEADER.unpack(read_exact(fd, HEADER.size))
    return json.loads(read_exact(fd, n).decode("utf-8"))


class Drain(threading.Thread):
    """Reads one capture pipe; splits the stream into calls at a per-call sentinel."""

    def __init__(self, fd, limit):
        super().__init__(daemon=True)
        self.fd, self.limit = fd, limit
        self.cond = threading.Condition()
        self.sentinel = None
        self.kept = bytearray()
        self.dropped = 0
        self.tail = b""
        self.done = None

    def arm(self, sentinel):
        with self.cond:
            self.sentinel, self.kept, self.dropped, self.tail, self.done = (
                sentinel,
                bytearray(),
                0,
                b"",
                None,
            )

    def take(self, timeout):
        with self.cond:
            self.cond.wait_for(lambda: self.done is not None, timeout)
            done = self.done
            if done is None:  # sentinel never arrived (pipe stuck): return what we have
                done = (bytes(self.kept), self.dropped)
            self.sentinel = None
            return done

    def _add(self, data):
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        self.dropped += max(0, len(data) - max(room, 0))

    def run(self):
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            with self.cond:
                if self.sentinel is None or self.done is not None:
                    continue  # output written between calls is discarded
                window = self.tail + chunk
                at = window.find(self.sentinel)
                if at < 0:
                    keep = len(window) - len(self.sentinel) + 1
                    if keep > 0:
                        self._add(window[:keep])
                        self.tail = window[keep:]
                    else:
                        self.tail = window
                    continue
                self._add(window[:at])
                self.done = (bytes(self.kept), self.dropped)
                self.cond.notify_all()


def children_of(pid):
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def descendants():
    me = os.getpid()
    if os.path.exists(f"/proc/{me}/task/{me}/children"):
        found, todo = [], children_of(me)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children_of(pid)
        return found
    parents = {}  # fallback: scan /proc
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                parents.setdefault(int(stat[stat.rfind(")") + 2 :].split()[1]), []).append(
                    int(name)
                )
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], list(parents.get(me, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def reap():
    n = 0
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


def kill_namespace():
    """In a private PID namespace: SIGKILL everything but ourselves (and the namespace's init)."""
    killed = 0
    for _ in range(1000):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            break
        except OSError:
            break
        time.sleep(0.001)
        killed += reap()
    return killed + reap()


def kill_descendants():
    """Stop then kill every descendant until none is left; returns how many were killed."""
    if PRIVATE_PIDNS:
        return kill_namespace()
    killed = set()
    for _ in range(200):
        reap()  # zombies do not count as alive
        pids = [p for p in descendants() if not is_zombie(p)]
        if not pids:
            return len(killed)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        killed.update(pids)
        time.sleep(0.002)
    return len(killed)


def is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2] in "ZX"
    except OSError:
        return True


def on_alarm(signum, frame):
    raise CellTimeout()


def run_cell(code, env):
    tree = ast.parse(code, "<cell>", "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<cell>", "exec"), env)
    if last is not None:
        value = eval(compile(last, "<cell>", "eval"), env)
        if value is not None:
            print(repr(value))


def format_exception(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next  # hide the worker's own frames
    lines = traceback.format_exception(type(exc), exc, tb)
    if tb is None:
        lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def main():
    global PRIVATE_PIDNS
    config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    PRIVATE_PIDNS = bool(config.get("pidns") or config.get("private_pidns"))
    libc = ctypes.CDLL(None, use_errno=True)
    if config.get("pidns") and os.getpid() != 1:
        pid = os.fork()  # the child is PID 1 of the new PID namespace
        if pid:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _, status = os.waitpid(pid, 0)
            os._exit(
                os.waitstatus_to_exitcode(status) & 0xFF
                if hasattr(os, "waitstatus_to_exitcode")
                else 1
            )
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.setpgid(0, 0)  # kill(0, ...) from the cell must not reach the helper outside
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for name, (soft, hard) in config.get("rlimits", {}).items():
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError, AttributeError):
            pass

    proto_in, proto_out = os.dup(0), os.dup(1)  # close-on-exec: children never see them
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    limit = int(config.get("max_output", 65536))
    drains, writers = [], []
    for fd in (1, 2):
        r, w = os.pipe()
        os.dup2(w, fd)
        writers.append(w)  # private copy: fds 1 and 2 are restored before every call
        drains.append(Drain(r, limit))
        drains[-1].start()
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    env = {"__name__": "__main__", "__builtins__": __builtins__}
    send(
        proto_out,
        {"ready": True, "pid": os.getpid(), "uid": os.getuid(), "python": sys.version.split()[0]},
    )
    calls = 0
    while True:
        try:
            req = recv(proto_in)
        except (EOFError, OSError, ValueError):
            kill_descendants()
            os._exit(0)
        calls += 1
        sentinel = f"\x00agentopd-{calls}-{os.urandom(8).hex()}\x00".encode()
        for d, w, fd in zip(drains, writers, (1, 2)):
            d.arm(sentinel)
            os.dup2(w, fd)
        exception, timed_out = None, False
        start = time.monotonic()
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(float(req.get("timeout", 10)), 0.001))
                run_cell(req["code"], env)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CellTimeout:
            timed_out = True
        except BaseException as e:  # noqa: BLE001 - the cell's failure is its result
            exception = format_exception(e)
        duration = time.monotonic() - start
        try:
            killed = kill_descendants()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001
                    pass
            for w in writers:
                os.write(w, sentinel)
            (out, out_dropped), (err, err_dropped) = (d.take(0.5) for d in drains)
        except CellTimeout:
            killed, out, out_dropped, err, err_dropped = 0, b"", 0, b"", 0
        send(
            proto_out,
            {
                "stdout": out.decode("utf-8", "replace"),
                "stderr": err.decode("utf-8", "replace"),
                "stdout_dropped": out_dropped,
                "stderr_dropped": err_dropped,
                "exception": exception,
                "timed_out": timed_out,
                "killed_processes": killed,
                "duration_s": duration,
            },
        )


if __name__ == "__main__":
    main()
