"""Declared, checked knobs: the runtime dataclasses are the config schema.

A runtime config dataclass (``RolloutConfig``, ``TeacherConfig``, ``OptimConfig``, a loss's
config, ...) declares each field with :func:`knob`, which records a one-line meaning and the
valid range or choices in the field's metadata. :func:`check` validates an instance against
those declarations; ``agentopd.config`` uses the same metadata to type-check overrides and to
generate ``agentopd <command> --help``.

Example::

    @dataclass
    class MyConfig:
        lr: float = knob(1e-3, "learning rate", gt=0)
        mode: str = knob("fast", "how to run", choices=("fast", "exact"))

    check(MyConfig(lr=-1), "my")   # ConfigError: bad value -1 for 'my.lr': expected > 0 ...
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A bad key or value in a configuration or override."""


def knob(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field with a meaning and a valid range (``ge``/``gt``/``le``/``lt``) or
    ``choices``; pass ``factory`` instead of ``default`` for mutable defaults."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def describe_range(meta: dict[str, Any]) -> str:
    """``'> 0'``, ``'in [0, 1]'``, ``'one of a, b'`` or ``''`` for a knob's metadata."""
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    lo = f"[{meta['ge']}" if meta.get("ge") is not None else None
    lo = f"({meta['gt']}" if meta.get("gt") is not None else lo
    hi = f"{meta['le']}]" if meta.get("le") is not None else None
    hi = f"{meta['lt']})" if meta.get("lt") is not None else hi
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    if hi:
        return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
    return ""


def check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``value`` breaks the range or choices in ``meta``."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"bad value {value!r} for {key!r}: expected one of {', '.join(map(str, choices))}.{hint}"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"bad value {value!r} for {key!r}: expected a finite number")
    bounds = (
        ("ge", lambda b: value < b, lambda b: b),
        ("gt", lambda b: value <= b, lambda b: b + 1 if isinstance(value, int) else None),
        ("le", lambda b: value > b, lambda b: b),
        ("lt", lambda b: value >= b, lambda b: b - 1 if isinstance(value, int) else None),
    )
    for name, broken, nearest in bounds:
        bound = meta.get(name)
        if bound is not None and broken(bound):
            near = nearest(bound)
            hint = f" (nearest valid: {near!r})" if near is not None else ""
            raise ConfigError(
                f"bad value {value!r} for {key!r}: expected {describe_range(meta)}{hint}. "
                f"{meta.get('help', '')}".rstrip()
            )


def check(obj: Any, prefix: str = "") -> None:
    """Validate every knob of a dataclass instance, recursing into nested dataclasses."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check(value, key)
        elif f.metadata:
            check_value(key, value, dict(f.metadata))
