"""Test helpers: run a test per backend, and check that nothing was left behind.

* :func:`backend_params` gives ``pytest.param`` per backend, marked ``docker`` / ``bwrap``.
* :func:`require_backend` skips a test whose backend cannot run here, with the availability
  check's reason, unless the backend is listed in ``AGENTOPD_REQUIRE_BACKENDS`` (comma separated,
  as CI sets it): then the test fails instead.
* :func:`sandbox_processes` and :func:`leftovers` list live sandbox processes / containers, so a
  test can assert that none survive a sandbox's ``stop``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from agentopd.sandbox.base import NOBODY
from agentopd.sandbox.factory import BACKENDS, availability

REQUIRE_ENV = "AGENTOPD_REQUIRE_BACKENDS"


def required_backends() -> set[str]:
    """Backends listed in ``AGENTOPD_REQUIRE_BACKENDS``."""
    return {b.strip() for b in os.environ.get(REQUIRE_ENV, "").split(",") if b.strip()}


def backend_params() -> list[Any]:
    """One ``pytest.param`` per backend, strongest first, with the backend's marker."""
    import pytest

    marks = {"docker": [pytest.mark.docker], "bwrap": [pytest.mark.bwrap], "local": []}
    return [pytest.param(name, marks=marks[name], id=name) for name in BACKENDS]


def require_backend(name: str) -> None:
    """Skip (or fail, if required by ``AGENTOPD_REQUIRE_BACKENDS``) when ``name`` cannot run."""
    import pytest

    a = availability(name)
    if a.available:
        return
    if name in required_backends():
        pytest.fail(
            f"sandbox backend {name!r} is required by {REQUIRE_ENV} but unavailable: {a.details}"
        )
    pytest.skip(f"sandbox backend {name!r} unavailable: {a.details}")


def sandbox_processes(before: set[tuple[int, str]] | None = None) -> list[str]:
    """Live processes that may belong to sandboxes, as ``"pid cmdline"``.

    When the trainer is root, sandboxes run as uid 65534 and every live process of that uid
    counts. Otherwise processes of the trainer's uid that are not in ``before`` (a
    :func:`process_snapshot`) and are not this process count.
    """
    uid = os.getuid()
    found = []
    for pid, start in process_snapshot():
        if before is not None and (pid, start) in before:
            continue
        if pid == os.getpid():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode("utf-8", "replace")
            )
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        real_uid = int(fields.get("Uid", "-1 0").split()[0])
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if real_uid == (NOBODY if uid == 0 else uid):
            found.append(f"{pid} {cmd[:120]}")
    return found


def process_snapshot() -> set[tuple[int, str]]:
    """``{(pid, start time)}`` of every live process."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            out.add((int(name), stat[stat.rfind(")") + 2 :].split()[19]))
    return out


def sandbox_containers() -> list[str]:
    """Sandbox containers known to the Docker daemon (empty if it is unreachable)."""
    try:
        from agentopd.sandbox.docker_engine import list_sandbox_containers

        return [f"{c.short_id} {c.status}" for c in list_sandbox_containers()]
    except Exception:  # noqa: BLE001 - no daemon, no containers
        return []


def leftovers(before: set[tuple[int, str]] | None = None, wait_s: float = 5.0) -> list[str]:
    """Sandbox processes and containers still alive after waiting up to ``wait_s`` for teardown."""
    deadline = time.monotonic() + wait_s
    while True:
        left = sandbox_processes(before) + sandbox_containers()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
