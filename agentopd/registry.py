"""One registry door for every pluggable kind.

Kinds: ``envs``, ``curricula``, ``losses``, ``engines``, ``teachers``, ``sandboxes`` and
``models``. Built-ins and third-party packages use the same door: Python entry points in the
groups ``agentopd.<kind>`` (``agentopd.envs``, ``agentopd.losses``, ...), whose values are
``"pkg.module:Attr"`` strings. :func:`register` adds an entry at run time, :func:`unregister`
removes one. Every unknown name is answered with "did you mean" and the valid names.

A kind may also resolve *prefixed* names (``openenv:echo``): :meth:`Registry.register_prefix`
maps ``"<prefix>:"`` to a factory that receives the rest of the name; a package declares one
with an entry point in the group ``agentopd.<kind>.prefixes`` (``gem = "pkg.mod:make_gem"``).

What each kind's entry point must be:

- ``envs``: an :class:`agentopd.Env` subclass (or a callable returning one).
- ``curricula``: a class taking ``env``, ``env_kwargs``, ``seed`` and its own kwargs.
- ``losses``: an object following :class:`agentopd.losses.Loss`.
- ``engines``: a factory following :class:`agentopd.engines.EngineFactory`.
- ``teachers``: a factory following :class:`agentopd.teachers.TeacherFactory`.
- ``sandboxes``: a :class:`agentopd.sandbox.base.Sandbox` subclass.
- ``models``: a callable returning ``(model, tokenizer)``.

Example::

    import agentopd
    agentopd.register("my-env", entry_point="my_pkg.envs:MyEnv", max_turns=8)
    env = agentopd.make("my-env", hops=3)
    agentopd.register("my-loss", entry_point="my_pkg.losses:MY_LOSS", kind="losses")
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("envs", "curricula", "losses", "engines", "teachers", "sandboxes", "models")
_SINGULAR = {
    "envs": "env",
    "curricula": "curriculum",
    "losses": "loss",
    "engines": "engine",
    "teachers": "teacher backend",
    "sandboxes": "sandbox backend",
    "models": "model",
}
# The entry-point value syntax of the packaging spec: "pkg.module:Attr.sub [extra1, extra2]".
_ENTRY_POINT = re.compile(r"^\s*(?P<module>[\w.]+)\s*:\s*(?P<attr>[\w.]+)\s*(\[.*\])?\s*$")


class UnknownNameError(KeyError):
    """An unknown registry name; the message carries the nearest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass
class Spec:
    """What the registry knows about one name."""

    name: str
    """Kebab-case registry name."""
    kind: str
    """One of :data:`KINDS`."""
    entry_point: str | Callable[..., Any]
    """``"pkg.module:Attr"`` or a callable."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the entry point unless overridden."""
    package: str = "(runtime)"
    """Distribution that provided it (``(runtime)`` for :func:`register`)."""

    def load(self) -> Callable[..., Any]:
        """Import and return the entry point."""
        if callable(self.entry_point):
            return self.entry_point
        m = _ENTRY_POINT.match(self.entry_point)
        if m is None:
            raise ValueError(
                f"entry point {self.entry_point!r} for {self.name!r} must look like 'pkg.module:Attr'"
            )
        obj: Any = importlib.import_module(m.group("module"))
        for part in m.group("attr").split("."):
            obj = getattr(obj, part)
        return obj

    def make(self, **kwargs: Any) -> Any:
        """Build an instance with ``defaults`` updated by ``kwargs``."""
        return self.load()(**{**self.defaults, **kwargs})


def _lazy_factory(name: str, value: str) -> Callable[..., Any]:
    """A prefix factory that imports the entry point ``value`` on first call."""

    def factory(rest: str, **kwargs: Any) -> Any:
        return Spec(name, "prefix", value).load()(rest, **kwargs)

    return factory


class Registry:
    """Name → :class:`Spec` for one kind, filled lazily from entry points."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self._specs: dict[str, Spec] = {}
        self._from_entry_points: set[str] = set()
        self._loaded_entry_points = False
        self._prefixes: dict[str, tuple[Callable[..., Any], str]] = {}

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for ep in importlib.metadata.entry_points(group=f"agentopd.{self.kind}"):
            if ep.name in self._specs:
                continue
            package = ep.dist.name if ep.dist is not None else "?"
            self._specs[ep.name] = Spec(ep.name, self.kind, ep.value, {}, package)
            self._from_entry_points.add(ep.name)
        # Name prefixes from group "agentopd.<kind>.prefixes" (value: a factory taking the rest
        # of the name); imported only when a prefixed name is built.
        for ep in importlib.metadata.entry_points(group=f"agentopd.{self.kind}.prefixes"):
            if ep.name not in self._prefixes:
                package = ep.dist.name if ep.dist is not None else "?"
                self._prefixes[ep.name] = (_lazy_factory(ep.name, ep.value), package)

    def refresh(self) -> None:
        """Re-read entry points (after installing or removing a plugin package in this process).

        Names added with :meth:`register` are kept.
        """
        for name in self._from_entry_points:
            self._specs.pop(name, None)
        self._from_entry_points.clear()
        self._loaded_entry_points = False
        importlib.invalidate_caches()
        self._load_entry_points()

    def register(
        self,
        name: str,
        entry_point: str | Callable[..., Any],
        *,
        package: str = "(runtime)",
        **defaults: Any,
    ) -> Spec:
        """Register (or replace) ``name``."""
        self._load_entry_points()
        spec = Spec(name, self.kind, entry_point, dict(defaults), package)
        self._specs[name] = spec
        self._from_entry_points.discard(name)
        return spec

    def register_prefix(
        self, prefix: str, factory: Callable[..., Any], *, package: str = "(runtime)"
    ) -> None:
        """Resolve every name ``"<prefix>:<rest>"`` to ``factory(rest, **kwargs)``.

        Used by adapters to foreign frameworks (``openenv:echo``, ``gem:game:GuessTheNumber``).
        """
        if not prefix or ":" in prefix:
            raise ValueError(f"a prefix is a non-empty name without ':', got {prefix!r}")
        self._prefixes[prefix] = (factory, package)

    def prefixes(self) -> list[str]:
        """Registered name prefixes (without the colon)."""
        self._load_entry_points()
        return sorted(self._prefixes)

    def unregister(self, name: str) -> Spec:
        """Remove ``name`` (until the next :meth:`refresh` if it came from an entry point)."""
        spec = self.spec(name)
        del self._specs[name]
        return spec

    def spec(self, name: str) -> Spec:
        """The spec for ``name``; unknown names raise :class:`UnknownNameError` with suggestions."""
        self._load_entry_points()
        if name in self._specs:
            return self._specs[name]
        prefix, sep, rest = name.partition(":")
        if sep and prefix in self._prefixes:
            factory, package = self._prefixes[prefix]

            def make(**kwargs: Any) -> Any:
                return factory(rest, **kwargs)

            return Spec(name, self.kind, make, {}, package)
        valid = sorted(self._specs)
        near = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        extra = "".join(f", {p}:<name>" for p in sorted(self._prefixes))
        raise UnknownNameError(
            f"unknown {_SINGULAR[self.kind]} {name!r}.{hint} "
            f"Valid names: {', '.join(valid) or '(none registered)'}{extra}."
        )

    def make(self, name: str, /, **kwargs: Any) -> Any:
        """Build ``name`` (positional only, so an entry point may take a ``name`` keyword)."""
        return self.spec(name).make(**kwargs)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._specs)

    def specs(self) -> list[Spec]:
        return [self._specs[n] for n in self.names()]


envs = Registry("envs")
curricula = Registry("curricula")
losses = Registry("losses")
engines = Registry("engines")
teachers = Registry("teachers")
sandboxes = Registry("sandboxes")
models = Registry("models")
_BY_KIND = {r.kind: r for r in (envs, curricula, losses, engines, teachers, sandboxes, models)}


def registry(kind: str) -> Registry:
    """The registry of one kind."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}") from None


def register(
    name: str, entry_point: str | Callable[..., Any], *, kind: str = "envs", **defaults: Any
) -> Spec:
    """Register an environment (or, with ``kind=``, any other pluggable kind)."""
    return registry(kind).register(name, entry_point, **defaults)


def unregister(name: str, kind: str = "envs") -> Spec:
    """Remove a registered name of one kind."""
    return registry(kind).unregister(name)


def make(name: str, /, **kwargs: Any) -> Any:
    """Build the environment registered as ``name``.

    The registry name is recorded on the instance as ``env.spec_name`` so episodes carry it.
    """
    env = envs.make(name, **kwargs)
    try:
        env.spec_name = name
    except AttributeError:
        pass
    return env


def spec(name: str, kind: str = "envs") -> Spec:
    return registry(kind).spec(name)


def list_registered(kind: str = "envs") -> list[str]:
    return registry(kind).names()
