"""Adapters that bring foreign env frameworks into agentopd as ``agentopd.Env``\\ s.

Each adapter is an env name prefix, resolved through :mod:`agentopd.registry` (entry-point group
``agentopd.envs.prefixes`` in ``pyproject.toml``), and its foreign package is an optional extra
imported only when such an env is built:

======================  ===================  =====================================
name                    extra                wraps
======================  ===================  =====================================
``gym:<id>``            (core)               Gymnasium envs with Text/Discrete actions
``gem:<env_id>``        ``agentopd[gem]``    GEM (``gem-llm``) envs
``skyrl-gym:<env_id>``  ``agentopd[skyrl]``  SkyRL-gym text envs, over a task file
``openenv:<module>``    ``agentopd[openenv]`` OpenEnv ``Environment`` classes, in process
``verifiers:<module>``  ``agentopd[verifiers]`` verifiers (``verifiers.v1``) envs, run by verifiers
======================  ===================  =====================================

This module imports no foreign package; docs/envs.md says what each adapter maps and what not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdapterInfo:
    """What ``agentopd envs`` shows for one prefix."""

    prefix: str
    """Name prefix, without the colon."""
    syntax: str
    """How to name an env."""
    example: str
    """A name that works once the extra is installed."""
    install: str
    """The pip line (empty when the core install suffices)."""
    module: str
    """Top-level module of the foreign package (to tell whether it is installed)."""
    wraps: str
    """One line on what it wraps."""


ADAPTERS: dict[str, AdapterInfo] = {
    a.prefix: a
    for a in (
        AdapterInfo(
            "gym",
            "gym:<id> | gym:<module>:<id>",
            "gym:FrozenLake-v1",
            "",
            "gymnasium",
            "Gymnasium envs with Text or Discrete actions (ansi rendering as the observation)",
        ),
        AdapterInfo(
            "gem",
            "gem:<env_id>",
            "gem:game:GuessTheNumber-v0-easy",
            "pip install 'agentopd[gem]'",
            "gem",
            "GEM (gem-llm) text games, math, code and QA envs",
        ),
        AdapterInfo(
            "skyrl-gym",
            "skyrl-gym:<env_id>  env_kwargs.tasks=<file.jsonl>",
            "skyrl-gym:gsm8k_multi_turn",
            "pip install 'agentopd[skyrl]'",
            "skyrl_gym",
            "SkyRL-gym BaseTextEnv envs over a SkyRL-format task file",
        ),
        AdapterInfo(
            "openenv",
            "openenv:<module>[:<EnvironmentClass>]",
            "openenv:my_pkg.server.my_environment",
            "pip install 'agentopd[openenv]'",
            "openenv",
            "OpenEnv server-side Environment classes run in process (MCP tools become tools)",
        ),
        AdapterInfo(
            "verifiers",
            "verifiers:<module>[:<TasksetClass>[:<EnvClass>]]",
            "verifiers:my_pkg.my_taskset",
            "pip install 'agentopd[verifiers]'",
            "verifiers",
            "verifiers v1 tasksets run by verifiers' own loop against a local endpoint (token-checked)",
        ),
    )
}


def installed(info: AdapterInfo) -> bool:
    """Whether the adapter's foreign package can be imported (checked without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(info.module) is not None
    except (ImportError, ValueError):
        return False


def make_gym(rest: str, **kwargs: Any) -> Any:
    """``gym:`` prefix factory."""
    from agentopd.envs.adapters.gym import make

    return make(rest, **kwargs)


def make_gem(rest: str, **kwargs: Any) -> Any:
    """``gem:`` prefix factory."""
    from agentopd.envs.adapters.gem import make

    return make(rest, **kwargs)


def make_skyrl_gym(rest: str, **kwargs: Any) -> Any:
    """``skyrl-gym:`` prefix factory."""
    from agentopd.envs.adapters.skyrl import make

    return make(rest, **kwargs)


def make_openenv(rest: str, **kwargs: Any) -> Any:
    """``openenv:`` prefix factory."""
    from agentopd.envs.adapters.openenv import make

    return make(rest, **kwargs)


def make_verifiers(rest: str, **kwargs: Any) -> Any:
    """``verifiers:`` prefix factory."""
    from agentopd.envs.adapters.verifiers import make

    return make(rest, **kwargs)


def adapter_table(prefixes: list[str]) -> Any:
    """The ``agentopd envs`` table of name prefixes: syntax, example, what it wraps, install state."""
    from rich.table import Table

    table = Table(title="env adapters: name a foreign env as env=<prefix>:<id> (docs/envs.md)")
    for col in ("prefix", "name syntax", "example", "wraps", "installed"):
        table.add_column(col)
    for prefix in prefixes:
        info = ADAPTERS.get(prefix)
        if info is None:
            table.add_row(prefix, f"{prefix}:<name>", "", "(a prefix registered by a plugin)", "")
            continue
        state = "yes" if installed(info) else f"no: {info.install}"
        table.add_row(prefix, info.syntax, info.example, info.wraps, state)
    return table
