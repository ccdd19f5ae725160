"""Choosing a backend: ``make_sandbox(backend)``, ``auto`` resolution and availability reports.

``auto`` picks the strongest backend whose availability check passes (``docker`` > ``bwrap`` >
``local``) and logs its choice once per process; when that is ``local`` the log is a warning that
names why the stronger ones could not be used. An explicitly requested backend that is not
available raises :class:`~agentopd.sandbox.base.SandboxError` with the reason.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, cast

from agentopd.sandbox.base import Limits, Sandbox, SandboxError
from agentopd.sandbox.bwrap import BwrapSandbox
from agentopd.sandbox.docker_engine import DockerSandbox
from agentopd.sandbox.local import LocalSandbox

log = logging.getLogger("agentopd.sandbox")

BACKENDS: dict[str, type[Sandbox]] = {
    "docker": DockerSandbox,
    "bwrap": BwrapSandbox,
    "local": LocalSandbox,
}
"""Backends by name, strongest first."""
BACKEND_NAMES = ("auto", *BACKENDS)
_logged_auto: set[str] = set()


@dataclass
class Availability:
    """Whether one backend can run here, and why (not)."""

    backend: str
    available: bool
    details: str
    secure: bool


def availability(backend: str) -> Availability:
    """The availability check of one backend (cached per process)."""
    cls = _backend_class(backend)
    ok, details = cls.availability()
    return Availability(backend, ok, details, cls.secure)


def check_backends() -> list[Availability]:
    """Availability of every backend, strongest first."""
    return [availability(name) for name in BACKENDS]


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> the strongest available backend name; others are checked and returned."""
    if backend != "auto":
        a = availability(backend)
        if not a.available:
            raise SandboxError(f"sandbox backend {backend!r} is not available: {a.details}")
        return backend
    reports = check_backends()
    chosen = next(a for a in reports if a.available)  # local is always available
    if chosen.backend not in _logged_auto:
        _logged_auto.add(chosen.backend)
        if chosen.secure:
            log.info("sandbox backend 'auto' -> %r (%s)", chosen.backend, chosen.details)
        else:
            why = "; ".join(f"{a.backend}: {a.details}" for a in reports if not a.available)
            log.warning(
                "sandbox backend 'auto' -> %r, which is NOT a security boundary (%s). Stronger backends are unavailable: %s",
                chosen.backend,
                chosen.details,
                why,
            )
    return chosen.backend


def make_sandbox(
    backend: str = "auto", limits: Limits | None = None, timeout_s: float = 10.0, **kwargs: Any
) -> Sandbox:
    """A (not yet started) sandbox of the given backend.

    Args:
        backend: ``auto``, ``docker``, ``bwrap`` or ``local``.
        limits: Resource limits (defaults: :class:`Limits`).
        timeout_s: Default per-call timeout in seconds.
        **kwargs: Backend options (``image=`` for docker, ``python=`` for bwrap / local).
    """
    name = resolve_backend(backend)
    return _backend_class(name)(limits=limits, timeout_s=timeout_s, **kwargs)


def _backend_class(backend: str) -> type[Sandbox]:
    """A built-in backend, or one registered in ``agentopd.registry.sandboxes`` (plugins)."""
    if backend in BACKENDS:
        return BACKENDS[backend]
    from agentopd import registry

    try:
        # registry entries are untyped callables; the sandboxes group holds Sandbox classes
        return cast(type[Sandbox], registry.sandboxes.spec(backend).load())
    except KeyError:
        names = ", ".join(
            ["auto", *BACKENDS, *(n for n in registry.sandboxes.names() if n not in BACKENDS)]
        )
        near = difflib.get_close_matches(backend, names.split(", "), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise SandboxError(
            f"unknown sandbox backend {backend!r}; expected one of {names}.{hint}"
        ) from None
