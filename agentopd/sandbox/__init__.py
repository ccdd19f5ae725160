"""Sandboxes for running model-written code: one interface (start, run, stop), three backends.

* ``docker``: hardened container (no network, read-only root, tmpfs work dir, memory / CPU /
  pids limits, no capabilities, no-new-privileges, uid nobody); image built locally.
* ``bwrap``: bubblewrap with every namespace unshared, read-only binds, tmpfs, rlimits.
* ``local``: subprocess with rlimits (+ user / network / PID namespaces where allowed). NOT a
  security boundary.
* ``auto``: the strongest available, logged once.

Each sandbox keeps one Python worker alive across calls (variables persist like notebook cells),
restarts it after a timeout or crash and says so, and removes everything it made at stop, at
interpreter exit, on SIGTERM and when the trainer dies. A :class:`SandboxPool` keeps started
sandboxes and resets them between episodes (``pool.py``). See ``docs/sandbox.md``.

Example::

    from agentopd.sandbox import make_sandbox

    with make_sandbox("auto", timeout_s=5) as box:
        box.run("x = 2 ** 10")
        print(box.run("x + 1").to_text())  # 1025
"""

from agentopd.sandbox.base import ExecResult, Limits, Sandbox, SandboxError, stop_all
from agentopd.sandbox.factory import (
    BACKEND_NAMES,
    BACKENDS,
    Availability,
    availability,
    check_backends,
    make_sandbox,
    resolve_backend,
)
from agentopd.sandbox.pool import SandboxPool, close_pools, shared_pool

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "Availability",
    "ExecResult",
    "Limits",
    "Sandbox",
    "SandboxError",
    "SandboxPool",
    "availability",
    "check_backends",
    "close_pools",
    "make_sandbox",
    "resolve_backend",
    "shared_pool",
    "stop_all",
]
