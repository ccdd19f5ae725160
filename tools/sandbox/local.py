"""``local`` backend: a plain subprocess with rlimits. NOT A SECURITY BOUNDARY.

The worker runs as a child process of the trainer with:

* rlimits: address space, file size, open files, CPU time, processes (NPROC, counted per user
  namespace), no core dumps;
* new user, network and PID namespaces when the kernel allows unprivileged user namespaces (no
  network; it cannot signal the trainer by PID);
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
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from agentopd.tools.sandbox.base import (
    NOBODY,
    Channel,
    PipeChannel,
    Sandbox,
    kill_process_tree,
    libc,
    set_pdeathsig,
    spawn,
)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

_NS_PROBE: tuple[int, str] | None = None


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

    def __init__(self, *args: Any, python: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.python = python or default_python()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        _, ns = probe_namespaces()
        who = f"uid {NOBODY}" if os.geteuid() == 0 else "the trainer's uid"
        return True, f"rlimits + {ns}, runs as {who}; NOT a security boundary"

    def worker_config(self) -> dict[str, Any]:
        config = super().worker_config()
        config["pidns"] = bool(probe_namespaces()[0] & CLONE_NEWPID)
        return config

    def _launch(self, config: dict[str, Any]) -> Channel:
        flags, _ = probe_namespaces()
        drop = os.geteuid() == 0
        self._dir = tempfile.mkdtemp(prefix="agentopd-local-")
        if drop:
            os.chown(self._dir, NOBODY, NOBODY)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self._dir,
            "TMPDIR": self._dir,
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
                libc.unshare(flags)

        self._proc = spawn(
            lambda: subprocess.Popen(
                self.worker_argv(self.python, config),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self._dir,
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
