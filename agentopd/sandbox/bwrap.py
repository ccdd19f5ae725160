"""``bwrap`` backend: the worker inside bubblewrap with every namespace unshared.

Layout inside: ``/usr`` (and the ``/bin``, ``/lib``, ... links or binds) read-only from the host,
fresh ``/proc`` and ``/dev``, size-limited tmpfs at ``/work`` (cwd, HOME), ``/tmp`` and
``/dev/shm``, and a read-only root; nothing else of the host (no ``/home``, ``/root``, ``/etc`` beyond the loader
cache, no trainer files). Namespaces: user, mount, PID, network (no interfaces but loopback),
IPC, UTS, cgroup; no further user namespaces; all capabilities dropped; a new session; the
environment cleared. bwrap's ``--die-with-parent`` plus ``PR_SET_PDEATHSIG`` end it with the
trainer. The worker's supervisor is the sandbox's PID 1 (``--as-pid-1``: no bwrap init that code
could ptrace), and is not dumpable. When the trainer runs as root, bwrap itself is started as ``nobody`` so the sandbox maps
to an unprivileged host uid (the kernel does not enforce the process limit on root). Limits are
the worker's rlimits (address space, processes per user namespace, file size, open files, CPU
time) and ``Limits.cpus``, enforced by the supervisor's throttle (no cgroups here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from agentopd.sandbox.base import (
    NOBODY,
    Channel,
    PipeChannel,
    Sandbox,
    kill_process_tree,
    set_pdeathsig,
    spawn,
)

_AVAILABLE: tuple[bool, str] | None = None
SHM_MB = 16
"""Size of the private ``/dev/shm`` tmpfs (bwrap's ``--dev`` leaves it unlimited)."""


def _drop_privileges() -> None:
    set_pdeathsig()
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def bwrap_argv(limits_work_mb: int, python_prefix: str | None = None) -> list[str]:
    """The bwrap command line up to (not including) the program to run."""
    argv = [
        "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--as-pid-1",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for top in ("bin", "lib", "lib32", "lib64", "sbin"):
        path = f"/{top}"
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    argv += ["--ro-bind-try", "/etc/alternatives", "/etc/alternatives"]
    if python_prefix and not python_prefix.startswith("/usr/"):
        argv += ["--ro-bind", python_prefix, python_prefix]
    argv += ["--proc", "/proc", "--dev", "/dev", "--mqueue", "/dev/mqueue"]
    argv += ["--size", str(SHM_MB << 20), "--perms", "1777", "--tmpfs", "/dev/shm"]
    argv += ["--size", str(limits_work_mb << 20), "--perms", "1777", "--tmpfs", "/work"]
    argv += ["--size", str(16 << 20), "--perms", "1777", "--tmpfs", "/tmp"]
    argv += ["--remount-ro", "/", "--chdir", "/work", "--clearenv"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/work",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
    }
    env |= {"PYTHONDONTWRITEBYTECODE": "1", "MALLOC_ARENA_MAX": "2"}
    for k, v in env.items():
        argv += ["--setenv", k, v]
    return argv + ["--"]


class BwrapSandbox(Sandbox):
    """bubblewrap: all namespaces unshared, read-only binds, tmpfs work dir, rlimits."""

    name = "bwrap"
    strength = 2

    def __init__(self, *args: Any, python: str = "/usr/bin/python3", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.python = python
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        global _AVAILABLE
        if _AVAILABLE is None:
            _AVAILABLE = cls._probe()
        return _AVAILABLE

    @classmethod
    def _probe(cls) -> tuple[bool, str]:
        exe = shutil.which("bwrap")
        if exe is None:
            return False, "bwrap not found on PATH (apt-get install bubblewrap)"
        if not os.access("/usr/bin/python3", os.X_OK):
            return False, "/usr/bin/python3 not found (the sandbox runs the system python)"
        try:
            r = subprocess.run(
                bwrap_argv(1) + ["/usr/bin/python3", "-I", "-S", "-c", "print(1)"],
                capture_output=True,
                text=True,
                timeout=20,
                preexec_fn=_drop_privileges,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return False, f"bwrap failed to run: {e}"
        if r.returncode != 0 or r.stdout.strip() != "1":
            why = (r.stderr or r.stdout).strip().splitlines()
            return (
                False,
                f"bwrap cannot create its namespaces here: {why[-1] if why else r.returncode}",
            )
        version = subprocess.run(
            ["bwrap", "--version"], capture_output=True, text=True
        ).stdout.strip()
        return True, f"{version}; user/mount/pid/net/ipc/uts/cgroup namespaces"

    def worker_config(self) -> dict[str, Any]:
        return super().worker_config() | {
            "cpus": self.limits.cpus,
            # --dev's tmpfs is writable too; /dev/mqueue lists the POSIX message queues
            "scratch": ["/work", "/tmp", "/dev/shm", "/dev", "/dev/mqueue"],
            "private_ipc": True,
            "own_userns": True,
            "private_net": True,
        }

    def _launch(self, config: dict[str, Any]) -> Channel:
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(self.python)))
        argv = bwrap_argv(self.limits.work_dir_mb, prefix) + self.worker_argv(self.python, config)
        self._proc = spawn(
            lambda: subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
                start_new_session=True,
                preexec_fn=_drop_privileges,
            )
        )
        return PipeChannel(self._proc)

    def _worker_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _crash_hint(self) -> str:
        if self._proc is not None and self._proc.poll() is not None:
            code = self._proc.returncode
            return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return ""

    def _destroy(self) -> None:
        proc, self._proc = self._proc, None
        kill_process_tree(proc)
