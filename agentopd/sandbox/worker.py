"""The persistent Python worker that runs *inside* a sandbox (stdlib only, Python >= 3.8).

The host starts it as ``python3 -I -S -u -c <this source> <config-json>``; it must not import
anything from agentopd. Two processes:

* the **supervisor** owns the protocol with the host (length-prefixed JSON frames on its original
  stdin/stdout). It never runs model code, is not dumpable (so code in the sandbox cannot
  ptrace it or read its memory or descriptors) and, where the sandbox has a PID namespace, is its
  PID 1 (signals from inside do not reach it);
* the **executor**, a child of the supervisor, keeps one globals dict across calls (like notebook
  cells) and runs the model's code. It is a fresh interpreter (the supervisor forks and execs
  this source again with ``--executor``), so nothing of the supervisor's memory (its stack
  frames, the last call's output buffers, the previous episode's requests) is in its reach. Its descriptors: ``/dev/null`` as stdin, two pipes as stdout
  and stderr (drained by the supervisor into bounded buffers: the first ``max_output`` bytes are
  kept, the rest counted), a request pipe and a done pipe. It cannot reach the host protocol.

Per call the supervisor sends the code to the executor, captures its output, and takes the call
as finished only when the executor is verifiably idle again: exactly one done frame arrived, the
executor has a single thread, it is blocked reading its request pipe, and its descriptors 1, 2, request and done still are the supervisor's
pipes. Anything else (forged or garbage frames, closed or replaced descriptors, threads still
alive after the call, the executor dying) restarts the executor, and the result says so and that
variables are lost; a later call is never answered with an earlier call's output. After every
call every other process in the sandbox is killed (the supervisor is a child subreaper).

Timeouts: at ``timeout`` the executor interrupts the cell itself (``SIGALRM``; variables survive);
``KILL_GRACE_S`` later the supervisor kills and restarts the executor. CPU: with ``cpus`` > 0 the
supervisor throttles the sandbox's processes to that many cores (``SIGSTOP`` / ``SIGCONT`` duty
cycle on their measured CPU time) during a call; between calls nothing runs.

Reset (a ``{"id": n, "reset": true}`` request, used by the sandbox pool between episodes):
the supervisor kills the executor and every other process, removes what the code left in the
backend's writable places (``scratch``), System V IPC objects (``private_ipc``) and the uid's
kernel keys (``own_userns``), checks all of it and the network tables (``private_net``)
against what it recorded at start-up, and starts a fresh executor; the reply lists anything that
differs, and the host then discards the sandbox instead of reusing it.

Config keys: ``rlimits`` (name -> [soft, hard], set on the executor), ``max_output`` (bytes),
``pidns`` (fork once to become PID 1 of a PID namespace prepared by the launcher), ``cpus``,
``scratch`` (list of dirs), ``private_ipc``, ``own_userns``, ``private_net`` (booleans).
"""

import ast
import codecs
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
F_SETPIPE_SZ = 1031
HEADER = struct.Struct(">I")
MAX_REQUEST = 64 << 20
KILL_GRACE_S = 0.2
"""The supervisor kills the executor this long after the cell's own timeout."""
THREAD_GRACE_S = 0.05
"""Extra threads get this long after the cell to end by themselves."""
CPU_TICK_S = 0.05
THROTTLE_SLACK_S = 0.1
"""CPU seconds (per allowed core) the sandbox may run ahead before it is stopped: measurement
noise (clock ticks) must not stop a single busy process under ``cpus=1``."""
READ_SYSCALL = {"x86_64": 0, "aarch64": 63, "riscv64": 63, "ppc64le": 3, "s390x": 3}.get(
    os.uname().machine
)
EXECUTOR_FLAG = "--executor"
"""``argv[1]`` of an exec'd executor: ``--executor CONFIG REQ DONE OUT ERR`` (fd numbers)."""
SOURCE = None
"""This file's source as the host passed it (``python3 ... -c SOURCE``), read at start-up from
``/proc/self/cmdline``: what an executor is exec'd from."""


def own_source():
    """The ``-c`` program of this process's command line (None if it cannot be read)."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        return args[args.index(b"-c") + 1].decode()
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


def _read_some(fd, n):
    """Up to ``n`` bytes from the non-blocking ``fd``: None when none are there yet, ``b""`` at
    end of file or when the descriptor fails."""
    try:
        return os.read(fd, n)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class CellTimeout(BaseException):
    """Raised inside the running cell when its time is up."""


class Broken(Exception):
    """The executor is not in a state the supervisor can trust; it must be restarted."""


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
    if n > MAX_REQUEST:
        raise ValueError("frame too large")
    return json.loads(read_exact(fd, n).decode("utf-8"))


# ---------------------------------------------------------------------------- executor
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


def format_exception(exc, limit):
    try:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
            tb = tb.tb_next  # hide the executor's own frames
        if tb is None:
            text = "".join(traceback.format_exception_only(type(exc), exc))
        else:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001 - a broken __str__ must not kill the executor
        text = f"{type(exc).__name__} (the exception could not be formatted)\n"
    if len(text) > limit:
        text = text[:limit] + "\n[... traceback truncated ...]\n"
    return text


def executor_main(config, req_fd, done_fd, out_fd, err_fd):
    """The executor's loop (never returns). Only the fds it was given are open."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the supervisor reads our /proc entries
    for name, (soft, hard) in config.get("rlimits", {}).items():
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError, AttributeError):
            pass
    limit = int(config.get("max_output", 65536))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    out = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    err = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    inp = open(0, encoding="utf-8", closefd=False)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = {"__name__": "__main__", "__builtins__": __builtins__}
    send(done_fd, {"ready": True})
    while True:
        try:
            req = recv(req_fd)
            code, timeout = str(req["code"]), max(float(req["timeout"]), 0.001)
        except BaseException:  # noqa: BLE001 - a broken request pipe: let the supervisor restart us
            os._exit(3)
        for fd, saved in ((1, out_fd), (2, err_fd)):
            try:
                os.dup2(saved, fd)  # undo a redirection by the previous cell
            except OSError:
                pass
        sys.stdout, sys.stderr, sys.stdin = out, err, inp
        exception, timed_out = None, False
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                run_cell(code, env)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CellTimeout:
            timed_out = True
        except BaseException as e:  # noqa: BLE001 - the cell's failure is its result
            exception = format_exception(e, limit)
        for stream in (sys.stdout, sys.stderr, out, err):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        try:
            send(done_fd, {"exception": exception, "timed_out": timed_out})
        except BaseException:  # noqa: BLE001
            os._exit(4)


# ---------------------------------------------------------------------------- process table
def my_proc_pid():
    """Our pid as the mounted /proc numbers it (the host's, when /proc is not our namespace's)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


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


def proc_children_supported():
    return os.path.exists(f"/proc/{my_proc_pid()}/task/{my_proc_pid()}/children")


def descendants(root):
    """Every descendant of ``root`` (/proc numbering)."""
    if proc_children_supported():
        found, todo = [], children_of(root)
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
                ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
                parents.setdefault(ppid, []).append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def own_pid(proc_pid):
    """``proc_pid`` (/proc numbering) as a pid we can signal (our namespace's numbering)."""
    try:
        with open(f"/proc/{proc_pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return proc_pid


def stat_fields(proc_pid):
    try:
        with open(f"/proc/{proc_pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def cpu_seconds(proc_pids):
    ticks = 0
    for p in proc_pids:
        fields = stat_fields(p)
        if fields is not None:
            try:
                ticks += int(fields[11]) + int(fields[12])
            except (ValueError, IndexError):
                pass
    return ticks / os.sysconf("SC_CLK_TCK")


REAPED: dict[int, int] = {}
"""Wait status of every child reaped so far (the executor's is looked up here)."""


def reap():
    """Reap every exited child (orphans re-parented to us included) into :data:`REAPED`."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        REAPED[pid] = status


def describe_status(status):
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"status {status}"


# ---------------------------------------------------------------------------- supervisor
class Capture:
    """One output pipe: the first ``limit`` bytes kept, the rest counted: bytes, and the
    characters they decode to (UTF-8 with replacement, as the kept part is shown), so a note
    counts what was cut for any bytes, binary included."""

    def __init__(self, fd, limit):
        self.fd, self.limit = fd, limit
        self.reset()

    def reset(self):
        self.kept, self.dropped, self._chars = bytearray(), 0, 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def dropped_chars(self):
        """Characters of the dropped bytes (a sequence split at the end is flushed here)."""
        self._chars += len(self._decoder.decode(b"", True))
        return self._chars

    def read(self):
        """Read what is there; False at end of file."""
        chunk = _read_some(self.fd, 1 << 20)
        if chunk is None:
            return True
        if not chunk:
            return False
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.dropped += len(chunk)
            self._chars += len(self._decoder.decode(chunk))
        return True

    def drain(self):
        while True:
            try:
                ready = select.select([self.fd], [], [], 0)[0]
            except (OSError, ValueError):
                return
            if not ready or not self.read():
                return


class Executor:
    """The supervisor's handle on one executor process."""

    def __init__(self, config):
        self.config = config
        limit = int(config.get("max_output", 65536))
        req_r, self.req_w = os.pipe()
        self.done_r, done_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)  # fewer wake-ups for big outputs
            except OSError:
                pass
        self.links = {fd: f"pipe:[{os.fstat(fd).st_ino}]" for fd in (req_r, done_w, out_w, err_w)}
        self.fds = {"request": req_r, "done": done_w, "stdout": out_w, "stderr": err_w}
        keep = (req_r, done_w, out_w, err_w)
        if SOURCE is None:
            for fd in (*keep, out_r, err_r, self.req_w, self.done_r):
                os.close(fd)
            raise Broken("cannot read this worker's source from /proc/self/cmdline to exec it")
        python = sys.executable or "/usr/bin/python3"
        argv = [python, "-I", "-S", "-u", "-c", SOURCE, EXECUTOR_FLAG, json.dumps(config)]
        argv += [str(fd) for fd in keep]
        pid = os.fork()
        if pid == 0:
            try:
                for fd in range(3, 1024):
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                for fd in keep:
                    os.set_inheritable(fd, True)
                ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # kept by exec
                # A fresh interpreter, not this fork: the supervisor's frames and heap hold the
                # previous episode's requests and outputs.
                os.execv(python, argv)
            finally:
                os._exit(5)
        self.pid = pid
        self.proc_pid = None
        for fd in keep:
            os.close(fd)
        self.out, self.err = Capture(out_r, limit), Capture(err_r, limit)
        for fd in (out_r, err_r, self.done_r, self.req_w):
            os.set_blocking(fd, False)
        self.done_buf = bytearray()
        self.status = None
        frames = self.wait_frames(time.monotonic() + 30.0)
        if frames != [{"ready": True}]:
            self.kill()
            raise Broken("the executor did not start")
        self.proc_pid = self.find_proc_pid()
        if not self.wait_idle(time.monotonic() + 5.0):
            self.kill()
            raise Broken("the executor did not become idle after start-up")

    def find_proc_pid(self):
        me = my_proc_pid()
        for p in children_of(me) if proc_children_supported() else descendants(me):
            if own_pid(p) == self.pid:
                return p
        return self.pid

    def alive(self):
        if self.status is not None:
            return False
        reap()
        if self.pid in REAPED:
            self.status = REAPED.pop(self.pid)
            return False
        return True

    def wait_frames(self, deadline):
        """Complete frames from the done pipe (waits for at least one until ``deadline``)."""
        while True:
            frames = self.take_frames()
            if frames or time.monotonic() >= deadline:
                return frames
            select.select([self.done_r], [], [], max(0.0, deadline - time.monotonic()))
            if not self.read_done():
                return self.take_frames()

    def read_done(self):
        chunk = _read_some(self.done_r, 1 << 16)
        if chunk is None:
            return True
        if not chunk:
            return False
        self.done_buf += chunk
        if len(self.done_buf) > 4 * MAX_REQUEST:
            raise Broken("the executor's done pipe overflowed")
        return True

    def take_frames(self):
        frames = []
        while len(self.done_buf) >= HEADER.size:
            (n,) = HEADER.unpack(self.done_buf[: HEADER.size])
            if n > MAX_REQUEST:
                raise Broken("garbage on the executor's done pipe")
            if len(self.done_buf) < HEADER.size + n:
                break
            data = bytes(self.done_buf[HEADER.size : HEADER.size + n])
            del self.done_buf[: HEADER.size + n]
            try:
                frames.append(json.loads(data.decode("utf-8")))
            except ValueError:
                raise Broken("garbage on the executor's done pipe") from None
        return frames

    def idle_state(self):
        """Whether the executor is idle: one thread, blocked reading its request pipe, and its
        descriptors 1, 2, request and done still the supervisor's pipes.

        Raises:
            Broken: a descriptor was replaced, or the executor was made unreadable.
        """
        p = self.proc_pid
        try:
            if len(os.listdir(f"/proc/{p}/task")) != 1:
                return False
            with open(f"/proc/{p}/syscall") as f:
                fields = f.read().split()
            for name, fd in self.fds.items():
                want = self.links[fd]
                expected_fd = 1 if name == "stdout" else 2 if name == "stderr" else fd
                if os.readlink(f"/proc/{p}/fd/{expected_fd}") != want:
                    raise Broken(f"the code replaced the executor's {name} descriptor")
        except FileNotFoundError:
            return False
        except PermissionError:
            raise Broken("the code made the executor unreadable by its supervisor") from None
        except OSError:
            return False
        if len(fields) < 9 or fields[0] == "running":
            return False
        try:
            nr, fd = int(fields[0]), int(fields[1], 16)
        except ValueError:
            return False
        return (READ_SYSCALL is None or nr == READ_SYSCALL) and fd == self.fds["request"]

    def wait_idle(self, deadline):
        """Poll until idle (True); False at the deadline or if the executor died."""
        delay = 0.0001
        while True:
            if not self.alive():
                return False
            if self.idle_state():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def kill(self):
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                _, self.status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self.status = REAPED.pop(self.pid, 0)
        for fd in (self.req_w, self.done_r, self.out.fd, self.err.fd):
            try:
                os.close(fd)
            except OSError:
                pass


def kill_leftovers(keep_proc_pid):
    """Stop then kill every process of the sandbox except us and the executor; returns how many."""
    killed = set()
    me = my_proc_pid()
    for _ in range(200):
        pids = []
        for p in descendants(me):
            fields = stat_fields(p) if p != keep_proc_pid else None
            if fields is not None and fields[0] not in "ZX":
                pids.append(p)
        if not pids:
            break
        targets = [own_pid(p) for p in pids]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in targets:
                if pid is not None:
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
        killed.update(pids)
        time.sleep(0.001)
        reap()
    reap()
    return len(killed)


class Supervisor:
    """Runs calls in an executor it restarts whenever the executor cannot be trusted."""

    def __init__(self, config):
        self.config = config
        self.cpus = float(config.get("cpus") or 0)
        self.executor = None

    def ensure_executor(self):
        if self.executor is None:
            self.executor = Executor(self.config)

    def restart(self, why):
        """Kill the executor and everything else; the note for the result."""
        if self.executor is not None:
            self.executor.out.drain()
            self.executor.err.drain()
            self.executor.kill()
        self.executor = None
        kill_leftovers(None)
        return why + " The Python executor was restarted: variables from earlier calls are lost."

    def call(self, code, timeout):
        start = time.monotonic()
        notes, restarted = [], False
        if self.executor is not None and not self.executor.alive():
            why = describe_status(self.executor.status)
            notes.append(
                self.restart(f"The Python executor had died after the previous call ({why}).")
            )
            restarted = True
        try:
            self.ensure_executor()
        except (Broken, OSError) as e:
            notes.append(f"The Python executor could not start: {e}.")
            return self.result(start, crashed=True, restarted=True, notes=notes)
        ex = self.executor
        ex.out.drain()  # nothing should be there between calls; never count it
        ex.err.drain()
        ex.out.reset()
        ex.err.reset()
        try:
            status, why, frames, killed = self.run(ex, code, timeout, start)
        except Broken as e:
            status, why, frames, killed = "broken", f"{e}.", [], 0
        exception, timed_out, crashed = None, False, False
        done = len(frames) == 1 and valid_done(frames[0])
        if done:  # the cell's own outcome, also when the executor is restarted after it
            exception, timed_out = frames[0]["exception"], frames[0]["timed_out"]
        elif status == "idle":
            status, why = "broken", "The code wrote to the executor's private done pipe."
        elif status == "exited":
            status, why = "died", why.replace("exited right after", "died during")
        if status != "idle":
            crashed = status == "died"
            timed_out = timed_out or status == "timeout"
            notes.append(self.restart(why))
            restarted = True
        killed += kill_leftovers(self.executor.proc_pid if self.executor else None)
        return self.result(
            start, ex.out, ex.err, exception, timed_out, crashed, restarted, killed, notes
        )

    def run(self, ex, code, timeout, start):
        """Send one cell and wait; (status, why, done frames, leftover processes killed).

        status: ``idle`` (the call finished and the executor is verifiably idle), ``timeout``,
        ``died``, ``exited`` (after its done frame) or ``broken``.
        """
        data = json.dumps({"code": code, "timeout": timeout}).encode("utf-8")
        pending = HEADER.pack(len(data)) + data
        kill_at = start + timeout + KILL_GRACE_S
        frames, killed, poll = [], 0, 0.0002
        throttle = Throttle(self.cpus) if self.cpus > 0 else None
        try:
            while True:
                now = time.monotonic()
                if now >= kill_at:
                    return (
                        "timeout",
                        (
                            f"The code ran past the {timeout:g} s time limit and did not stop when "
                            "interrupted, so it was killed."
                        ),
                        frames,
                        killed,
                    )
                wait = kill_at - now
                if throttle is not None:
                    wait = min(wait, throttle.tick(now))
                if frames:
                    wait, poll = min(wait, poll), min(poll * 2, 0.005)
                wlist = [ex.req_w] if pending else []
                r, w, _ = select.select(
                    [ex.out.fd, ex.err.fd, ex.done_r], wlist, [], max(0.0, wait)
                )
                if w:
                    try:
                        pending = pending[os.write(ex.req_w, pending) :]
                    except BlockingIOError:
                        pass
                for cap in (ex.out, ex.err):
                    if cap.fd in r:
                        cap.read()
                if ex.done_r in r:
                    ex.read_done()
                frames += ex.take_frames()
                if not ex.alive():
                    ex.out.drain()
                    ex.err.drain()
                    ex.read_done()
                    frames += ex.take_frames()
                    how = describe_status(ex.status)
                    if frames and not pending:
                        return (
                            "exited",
                            f"The Python executor exited right after the call ({how}).",
                            frames,
                            killed,
                        )
                    return (
                        "died",
                        f"The Python executor died during the call ({how}).",
                        frames,
                        killed,
                    )
                if not frames or pending:
                    continue
                if throttle is not None:
                    throttle.resume()
                killed += kill_leftovers(ex.proc_pid)
                verdict = self.settle(ex)
                ex.read_done()
                frames += ex.take_frames()
                if verdict == "idle":
                    ex.out.drain()
                    ex.err.drain()
                    return "idle", "", frames, killed
                if verdict != "busy":
                    return "broken", verdict, frames, killed
        finally:
            if throttle is not None:
                throttle.resume()

    def settle(self, ex):
        """After a done frame: ``idle``, ``busy`` (keep waiting) or why it cannot be trusted."""
        grace_end = time.monotonic() + THREAD_GRACE_S
        while True:
            try:
                idle = ex.idle_state()
            except Broken as e:
                return f"{e}."
            if idle:
                return "idle"
            try:
                threads = len(os.listdir(f"/proc/{ex.proc_pid}/task"))
            except OSError:
                return "busy"
            if threads <= 1:
                return "busy"  # not at its read yet, or a cell that forged its done frame
            if time.monotonic() >= grace_end:
                return (
                    f"{threads - 1} thread(s) started by the code were still running after the call "
                    "and were stopped."
                )
            time.sleep(0.001)

    def result(self, start, out=None, err=None, exception=None, timed_out=False, crashed=False,
               restarted=False, killed=0, notes=()):  # fmt: skip
        def text(cap):
            return cap.kept.decode("utf-8", "replace") if cap is not None else ""

        return {
            "stdout": text(out),
            "stderr": text(err),
            "stdout_dropped": out.dropped if out else 0,
            "stderr_dropped": err.dropped if err else 0,
            "stdout_dropped_chars": out.dropped_chars if out else 0,
            "stderr_dropped_chars": err.dropped_chars if err else 0,
            "exception": exception,
            "timed_out": bool(timed_out),
            "crashed": bool(crashed),
            "restarted": bool(restarted),
            "killed_processes": int(killed),
            "duration_s": time.monotonic() - start,
            "note": " ".join(notes),
        }


def valid_done(frame):
    return (
        isinstance(frame, dict)
        and set(frame) == {"exception", "timed_out"}
        and (frame["exception"] is None or isinstance(frame["exception"], str))
        and isinstance(frame["timed_out"], bool)
    )


class Throttle:
    """Keeps the sandbox's processes at ``cpus`` cores on average (SIGSTOP / SIGCONT)."""

    def __init__(self, cpus):
        self.cpus = cpus
        self.me = my_proc_pid()
        self.t, self.cpu = time.monotonic(), self.measure()
        self.debt = 0.0
        self.stopped = []
        self.resume_at = 0.0

    def measure(self):
        return cpu_seconds(descendants(self.me))

    def tick(self, now):
        """Account CPU since the last tick, stop or resume; the time until the next tick."""
        if self.stopped:
            if now < self.resume_at:
                return self.resume_at - now
            self.resume()
            return CPU_TICK_S
        if now - self.t < CPU_TICK_S:
            return CPU_TICK_S - (now - self.t)
        cpu = self.measure()
        self.debt = max(
            self.debt + (cpu - self.cpu) - self.cpus * (now - self.t), -0.05 * self.cpus
        )
        self.t, self.cpu = now, cpu
        if self.debt > THROTTLE_SLACK_S * self.cpus:
            self.stopped = [own_pid(p) for p in descendants(self.me)]
            for pid in self.stopped:
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except OSError:
                        pass
            self.resume_at = now + self.debt / self.cpus
            self.debt = 0.0
            return self.resume_at - now
        return CPU_TICK_S

    def resume(self):
        for pid in self.stopped:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
        if self.stopped:
            self.stopped = []
            self.t, self.cpu = time.monotonic(), self.measure()


# ---------------------------------------------------------------------------- reset
KEYCTL_SYSCALL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "ppc64le": 288, "s390x": 280}.get(
    os.uname().machine
)
KEYCTL_CLEAR = 7
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
USER_KEYRINGS = ("_uid.", "_uid_ses.", ".user_reg")
"""Keyrings the kernel makes for the sandbox's uid on first use; they are emptied, not removed."""
IPC_RMID = 0
NET_TABLES = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix", "packet")
MAX_WIPE_DEPTH = 64
"""Directories nested deeper than this make the reset fail (the sandbox is then discarded)."""


def signature(path, dir_fd=None):
    """What identifies a directory entry: type, inode, permissions, owner, link target."""
    st = os.lstat(path, dir_fd=dir_fd)
    link = os.readlink(path, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
    return [stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid,
            link]  # fmt: skip


def table_rows(path):
    """Data lines of a /proc table (its header line not counted); -1 if it cannot be read."""
    try:
        with open(path) as f:
            return max(0, len(f.read().splitlines()) - 1)
    except OSError:
        return -1


def user_xattrs(path):
    try:
        return sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user."))
    except OSError:
        return []


def visible_keys():
    """Descriptions of the keys this process can see in /proc/keys (empty if none or hidden)."""
    try:
        with open("/proc/keys") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(None, 8)
        if len(fields) == 9:
            out.append(fields[8].rsplit(":", 1)[0].strip())
    return out


class Baseline:
    """The sandbox as it was at start-up: what :func:`reset` restores and then checks.

    ``scratch`` (config) lists the writable places of this backend (the work dir, ``/tmp``,
    ``/dev/shm``, ...). Entries present at start-up (mount points, device nodes) are kept and
    must be unchanged after a reset; everything else in them is removed.
    """

    def __init__(self, config):
        self.declared = isinstance(config.get("scratch"), list)
        """A backend that does not say where the code can write cannot be reset (only replaced)."""
        self.scratch = [d for d in config.get("scratch") or [] if os.path.isdir(d)]
        self.private_ipc = bool(config.get("private_ipc"))
        self.own_userns = bool(config.get("own_userns"))
        self.private_net = bool(config.get("private_net"))
        self.roots = {d: signature(d) for d in self.scratch}
        self.xattrs = {d: user_xattrs(d) for d in self.scratch}
        self.entries = {}
        for d in self.scratch:
            self.entries[d] = {name: signature(os.path.join(d, name)) for name in os.listdir(d)}
        self.net = {t: table_rows(f"/proc/net/{t}") for t in NET_TABLES} if self.private_net else {}


def remove_entry(parent_fd, name, depth):
    """Remove ``name`` (a file, link or whole tree) under ``parent_fd``; entries removed."""
    try:
        os.unlink(name, dir_fd=parent_fd)
        return 1
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        return 0
    if depth > MAX_WIPE_DEPTH:
        raise Broken(f"directories nested deeper than {MAX_WIPE_DEPTH} levels")
    os.chmod(name, 0o700, dir_fd=parent_fd)  # a directory (not a link): unlink said so
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        n = sum(remove_entry(fd, child, depth + 1) for child in os.listdir(fd))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)
    return n + 1


def wipe(base):
    """Empty every scratch dir back to its start-up entries; (entries removed, problems)."""
    removed, problems = 0, []
    for d in base.scratch:
        try:
            if signature(d)[:3] != base.roots[d][:3]:
                problems.append(f"{d} was replaced")
                continue
            if signature(d)[3] != base.roots[d][3]:
                os.chmod(d, base.roots[d][3])
            for name in user_xattrs(d):
                if name not in base.xattrs[d]:
                    os.removexattr(d, name, follow_symlinks=False)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                for name in os.listdir(fd):
                    if name not in base.entries[d]:
                        removed += remove_entry(fd, name, 1)
            finally:
                os.close(fd)
        except (OSError, Broken) as e:
            problems.append(f"could not empty {d}: {e}")
    return removed, problems


def remove_ipc(libc):
    """Remove every System V shared memory segment, message queue and semaphore set."""
    for table, fn, col in (("shm", "shmctl", 1), ("msg", "msgctl", 1), ("sem", "semctl", 1)):
        try:
            with open(f"/proc/sysvipc/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            try:
                ident = int(row.split()[col])
            except (ValueError, IndexError):
                continue
            if fn == "semctl":
                libc.semctl(ident, 0, IPC_RMID)
            else:
                getattr(libc, fn)(ident, IPC_RMID, None)


def foreign_keys():
    return [k for k in visible_keys() if not k.startswith(USER_KEYRINGS)]


def clear_keyrings(libc):
    """Unlink every key from the uid's keyrings and wait (briefly) for the kernel to free them."""
    if KEYCTL_SYSCALL is None:
        return
    for ring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
        libc.syscall(KEYCTL_SYSCALL, KEYCTL_CLEAR, ctypes.c_long(ring))
    deadline = time.monotonic() + 0.5  # unreferenced keys are garbage-collected asynchronously
    while foreign_keys() and time.monotonic() < deadline:
        time.sleep(0.002)


def check(base):
    """What a reset left different from start-up (an empty list when the sandbox is clean)."""
    problems = []
    me = my_proc_pid()
    left = [p for p in descendants(me) if (stat_fields(p) or ["X"])[0] not in "ZX"]
    if left:
        problems.append(f"{len(left)} process(es) still alive")
    for d in base.scratch:
        try:
            now = {name: signature(os.path.join(d, name)) for name in os.listdir(d)}
            if signature(d) != base.roots[d]:
                problems.append(f"{d} changed")
        except OSError as e:
            problems.append(f"cannot read {d}: {e}")
            continue
        extra = sorted(set(now) - set(base.entries[d]))
        changed = sorted(n for n in base.entries[d] if now.get(n) != base.entries[d][n])
        if extra:
            problems.append(f"{d} still holds {extra[:5]}")
        if changed:
            problems.append(f"{d}: {changed[:5]} changed or missing")
        if user_xattrs(d) != base.xattrs[d]:
            problems.append(f"{d} has extended attributes")
    if base.private_ipc:
        for table in ("shm", "msg", "sem"):
            if table_rows(f"/proc/sysvipc/{table}") > 0:
                problems.append(f"System V IPC {table} objects remain")
    if base.own_userns:
        keys = foreign_keys()
        if keys:
            problems.append(f"kernel keys remain: {keys[:5]}")
    for table, rows in base.net.items():
        now = table_rows(f"/proc/net/{table}")
        if now > rows:
            problems.append(f"{now - rows} {table} socket(s) remain (e.g. TCP TIME_WAIT)")
    return problems


def reset(sup, base):
    """Bring the sandbox back to its start-up state for the next episode; the reply frame.

    Kills the executor and every other process, removes System V IPC objects (private IPC
    namespace only) and the user's kernel keys (own user namespace only), empties the scratch
    dirs, then checks all of it (and the network tables) against the start-up baseline and
    starts a fresh executor. ``ok`` is false, with ``problems``, when anything differs: the host
    then discards the sandbox.
    """
    start = time.monotonic()
    libc = ctypes.CDLL(None, use_errno=True)
    if sup.executor is not None:
        sup.executor.kill()
        sup.executor = None
    killed = kill_leftovers(None)
    problems = []
    if base.private_ipc:
        remove_ipc(libc)
    if base.own_userns:
        clear_keyrings(libc)
    removed, problems = wipe(base)
    problems += check(base)
    if not base.declared:
        problems.append("the backend does not declare its writable places (config 'scratch')")
    if not problems:
        try:
            sup.ensure_executor()
        except (Broken, OSError) as e:
            problems.append(f"the Python executor could not start: {e}")
    return {
        "reset": True,
        "ok": not problems,
        "problems": problems,
        "killed_processes": killed,
        "removed_entries": removed,
        "duration_s": time.monotonic() - start,
    }


def valid_request(req):
    if isinstance(req, dict) and req.get("reset") is True:
        return set(req) == {"id", "reset"} and isinstance(req["id"], int)
    return (
        isinstance(req, dict)
        and isinstance(req.get("id"), int)
        and isinstance(req.get("code"), str)
        and isinstance(req.get("timeout"), (int, float))
        and not isinstance(req.get("timeout"), bool)
    )


def main():
    global SOURCE
    if len(sys.argv) == 7 and sys.argv[1] == EXECUTOR_FLAG:
        req_fd, done_fd, out_fd, err_fd = map(int, sys.argv[3:7])
        executor_main(json.loads(sys.argv[2]), req_fd, done_fd, out_fd, err_fd)
    SOURCE = own_source()
    config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    libc = ctypes.CDLL(None, use_errno=True)
    if config.get("pidns") and os.getpid() != 1:
        pid = os.fork()  # the child is PID 1 of the new PID namespace
        if pid:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # nothing in the sandbox may ptrace or read us
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    proto_in, proto_out = os.dup(0), os.dup(1)  # close-on-exec, and closed in the executor
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    sup = Supervisor(config)
    notes = ""
    try:
        base = Baseline(config)
    except OSError as e:
        base, notes = None, f"the sandbox's start-up state could not be recorded: {e}"
    try:
        sup.ensure_executor()
    except (Broken, OSError) as e:
        notes = f"the Python executor could not start: {e}"
    send(
        proto_out,
        {
            "ready": True,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "python": sys.version.split()[0],
            "note": notes,
        },
    )
    while True:
        try:
            req = recv(proto_in)
        except (EOFError, OSError, ValueError):
            kill_leftovers(None)
            os._exit(0)
        if not valid_request(req):
            kill_leftovers(None)
            os._exit(2)
        if req.get("reset") is True:
            result = reset(sup, base) if base is not None else {
                "reset": True, "ok": False, "problems": [notes], "killed_processes": 0,
                "removed_entries": 0, "duration_s": 0.0,
            }  # fmt: skip
        else:
            result = sup.call(req["code"], max(float(req["timeout"]), 0.001))
        result["id"] = req["id"]
        try:
            send(proto_out, result)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.EBADF):
                kill_leftovers(None)
                os._exit(0)
            raise


if __name__ == "__main__":
    main()
