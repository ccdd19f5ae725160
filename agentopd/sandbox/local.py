"""``local`` backend: a plain subprocess with rlimits. NOT A SECURITY BOUNDARY.

The worker runs as a child process of the trainer with:

* rlimits: address space, file size, open files, CPU time, processes (NPROC, counted per user
  namespace), no core dumps;
* new user, network, IPC and PID namespaces when the kernel allows unprivileged user namespaces
  (no network; it cannot signal the trainer by PID; its System V IPC objects and POSIX message
  queues are its own, listed under ``/tmp/.mqueue``, removed by a reset and gone with it);
* uid/gid ``nobody`` when the trainer runs as root (so files readable only by root are hidden
  and the process limit applies: the kernel does not enforce NPROC on root);
* a scrubbed environment (the trainer's variables are not passed), a fresh temp work dir as cwd,
  HOME and TMPDIR, and ``PR_SET_PDEATHSIG`` so it dies with the trainer.

What it does NOT hide: the host filesystem (everything readable by the worker's uid, writable
places like ``/tmp``), other processes in ``/proc`` (and, when the trainer is not root, the
trainer's own ``/proc/<pid>/environ`` and files, since the uid is the same), CPU share. Use it
for trusted code and development; ``auto`` picks it only when ``docker`` and ``bwrap`` are both
unavailable, and says so in the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from agentopd.sandbox.base import (
    NOBODY,
    Channel,
    PipeChannel,
    Sandbox,
    kill_process_tree,
    libc,
    set_pdeathsig,
    spawn,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_DUMPABLE = 4
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
"""Replaced by fresh tmpfs mounts in the sandbox's own mount namespace (where the kernel allows)."""
WORK_DIR = "/tmp/work"
"""The work dir (cwd, HOME) inside the private ``/tmp``."""
MQUEUE_DIR = "/tmp/.mqueue"
"""Where the sandbox's own POSIX message queues are listed (an ``mqueue`` mount inside the
private ``/tmp``), so a reset can remove them."""
SYSTEM_DIRS = ("/", "/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc", "/proc", "/dev", "/tmp")

_NS_PROBE: tuple[int, str] | None = None
_PRIVATE_PROBE: tuple[bool, str] | None = None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def hidden_paths(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Host directories covered by an empty read-only tmpfs inside a private local sandbox.

    The trainer's working directory (where ``runs/`` and task files usually are), its home,
    ``/root`` and ``/home``, plus ``extra``; never a system directory or one holding the
    sandbox's interpreter.
    """
    python_dir = os.path.dirname(os.path.realpath(default_python()))
    out = []
    for d in (os.getcwd(), os.path.expanduser("~"), "/root", "/home", *extra):
        d = os.path.realpath(d)
        if d in SYSTEM_DIRS or python_dir.startswith(d.rstrip("/") + "/") or not os.path.isdir(d):
            continue
        if any(d.startswith(p + "/") for p in PRIVATE_DIRS):
            continue  # the sandbox gets a fresh, empty one of these anyway
        if d not in out:
            out.append(d)
    return out


def isolate(flags: int, private: bool, work_mb: int, hide: list[str]) -> None:
    """In the sandbox's child process, before exec: enter new namespaces (``flags``) and, with
    ``private``, give it its own ``/tmp`` (holding the work dir), ``/var/tmp``, ``/dev/shm``,
    hide ``hide`` and, with a PID namespace, mount a ``/proc`` that shows only the sandbox.

    The child then is PID 1 of the new PID namespace (this forks once; the parent waits and
    exits with the child's status). Raises ``OSError`` if a step fails.
    """
    uid, gid = os.getuid(), os.getgid()
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change cleared it: /proc/self/*_map needs it
    ipc = CLONE_NEWIPC if flags & CLONE_NEWUSER else 0  # its own System V IPC and mqueues
    _check(libc.unshare(flags | ipc | (CLONE_NEWNS if private else 0)), "unshare")
    if not private:
        return
    for path, text in (
        ("/proc/self/setgroups", "deny"),
        ("/proc/self/uid_map", f"{uid} {uid} 1"),
        ("/proc/self/gid_map", f"{gid} {gid} 1"),
    ):
        with open(path, "w") as f:
            f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for d in PRIVATE_DIRS:
        if os.path.isdir(d):
            size = work_mb + 16 if d == "/tmp" else 16
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=1777")
    for d in hide:
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=0555")
    os.mkdir(WORK_DIR, 0o700)
    if ipc:
        os.mkdir(MQUEUE_DIR, 0o755)
        try:
            _mount("mqueue", MQUEUE_DIR, "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            os.rmdir(MQUEUE_DIR)  # queues stay private to the sandbox, but cannot be listed
    os.chdir(WORK_DIR)
    if flags & CLONE_NEWPID:
        pid = os.fork()
        if pid:
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))  # subprocess's error pipe included
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        set_pdeathsig()
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def probe_private() -> tuple[bool, str]:
    """Whether :func:`isolate` with private mounts works here (cached)."""
    global _PRIVATE_PROBE
    if _PRIVATE_PROBE is not None:
        return _PRIVATE_PROBE
    flags, _ = probe_namespaces()
    if not flags & CLONE_NEWUSER:
        _PRIVATE_PROBE = (False, "no user namespaces")
        return _PRIVATE_PROBE
    drop = os.geteuid() == 0

    def preexec() -> None:
        if drop:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        isolate(flags, True, 1, [])

    script = "import os; print(os.getcwd(), os.listdir('/tmp'), os.getpid())"
    try:
        r = subprocess.run(
            [default_python(), "-I", "-S", "-c", script],
            capture_output=True, text=True, timeout=10, cwd="/", preexec_fn=preexec,
        )  # fmt: skip
        ok = r.returncode == 0 and r.stdout.split()[0] == WORK_DIR
        why = "" if ok else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as e:
        ok, why = False, str(e)
    _PRIVATE_PROBE = (ok, "private /tmp, /var/tmp, /dev/shm, /proc" if ok else why)
    return _PRIVATE_PROBE


def default_python() -> str:
    """The system interpreter (readable by ``nobody``), else the one running the trainer."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return os.path.realpath(sys.executable)


def probe_namespaces() -> tuple[int, str]:
    """Which ``unshare`` flags work here for the worker's uid: ``(flags, description)`` (cached)."""
    global _NS_PROBE
    if _NS_PROBE is not None:
        return _NS_PROBE
    drop = os.geteuid() == 0
    script = (
        "import ctypes,os,sys\n"
        f"if {drop}:\n os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "libc=ctypes.CDLL(None,use_errno=True)\n"
        "for f in map(int, sys.argv[1:]):\n"
        " pid=os.fork()\n"
        " if pid==0: os._exit(0 if libc.unshare(f)==0 else 1)\n"
        " if os.waitpid(pid,0)[1]==0: print(f); break\n"
    )
    candidates = [
        CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID,
        CLONE_NEWUSER | CLONE_NEWNET,
        CLONE_NEWUSER,
    ]
    try:
        out = subprocess.run(
            [default_python(), "-I", "-S", "-c", script, *map(str, candidates)],
            capture_output=True,
            text=True,
            timeout=10,
            cwd="/",
        ).stdout.strip()
        flags = int(out) if out else 0
    except (OSError, ValueError, subprocess.SubprocessError):
        flags = 0
    names = [
        n
        for f, n in ((CLONE_NEWUSER, "user"), (CLONE_NEWNET, "network"), (CLONE_NEWPID, "pid"))
        if flags & f
    ]
    desc = (
        f"{'/'.join(names)} namespaces"
        if names
        else "no namespaces (unprivileged user namespaces are not allowed)"
    )
    _NS_PROBE = (flags, desc)
    return _NS_PROBE


class LocalSandbox(Sandbox):
    """Subprocess + rlimits (+ user/network/PID namespaces where allowed). Not a security boundary."""

    name = "local"
    strength = 1
    secure = False

    def __init__(
        self, *args: Any, python: str | None = None, hide: list[str] | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.python = python or default_python()
        self.hide = list(hide or [])
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        _, ns = probe_namespaces()
        private, how = probe_private()
        who = f"uid {NOBODY}" if os.geteuid() == 0 else "the trainer's uid"
        mounts = how if private else f"shared /tmp ({how})"
        return True, f"rlimits + {ns}, {mounts}, runs as {who}; NOT a security boundary"

    def worker_config(self) -> dict[str, Any]:
        config = super().worker_config()
        config["pidns"] = bool(probe_namespaces()[0] & CLONE_NEWPID)
        config["cpus"] = self.limits.cpus
        flags = probe_namespaces()[0]
        private = probe_private()[0]
        config["scratch"] = [WORK_DIR, *PRIVATE_DIRS] if private else []
        if private and flags & CLONE_NEWUSER:
            config["scratch"].append(MQUEUE_DIR)
        # With a user namespace the sandbox has its own IPC namespace: its System V IPC objects
        # and POSIX message queues are its own and vanish with it.
        config["private_ipc"] = bool(flags & CLONE_NEWUSER)
        config["own_userns"] = bool(flags & CLONE_NEWUSER)
        config["private_net"] = bool(flags & CLONE_NEWNET)
        return config

    def _launch(self, config: dict[str, Any]) -> Channel:
        flags, _ = probe_namespaces()
        private = probe_private()[0]
        drop = os.geteuid() == 0
        hide = hidden_paths(self.hide) if private else []
        if private:
            work = WORK_DIR
        else:
            work = self._dir = tempfile.mkdtemp(prefix="agentopd-local-")
            if drop:
                os.chown(self._dir, NOBODY, NOBODY)
            config["scratch"] = [work]  # the host's /tmp is shared: only the work dir is ours
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": "/tmp" if private else work,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MALLOC_ARENA_MAX": "2",
        }

        def preexec() -> None:
            set_pdeathsig()
            if drop:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            if flags:
                isolate(flags, private, self.limits.work_dir_mb, hide)

        self._proc = spawn(
            lambda: subprocess.Popen(
                self.worker_argv(self.python, config),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/" if private else work,
                env=env,
                start_new_session=True,
                preexec_fn=preexec,
            )
        )
        return PipeChannel(self._proc)

    def _worker_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _crash_hint(self) -> str:
        if self._proc is not None and self._proc.poll() is not None and self._proc.returncode < 0:
            return f"killed by signal {-self._proc.returncode}"
        return ""

    def _destroy(self) -> None:
        proc, self._proc = self._proc, None
        kill_process_tree(proc)
        d, self._dir = self._dir, None
        if d:
            with contextlib.suppress(OSError):
                shutil.rmtree(d, ignore_errors=True)
