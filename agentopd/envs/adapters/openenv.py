"""``env=openenv:<module>[:<Class>]``: an OpenEnv ``Environment`` run in process as an ``agentopd.Env``.

OpenEnv splits an env into a server-side ``Environment`` (``reset(seed=, episode_id=, **kw)``,
``step(action)``, ``state``) and an HTTP/WebSocket client. The adapter runs the server-side class
in this process, without a server: name its module (the class is found when the module defines
one ``Environment`` subclass) or ``module:Class``; ``env_kwargs.init`` holds its constructor
arguments.

Actions follow the env's ``Action`` model (read from ``step``'s type hints):

* one string field (``message: str``): the student's turn is that field;
* any other model: one tool, ``act``, whose parameters are the model's fields (pydantic
  validation errors come back as the tool's error message);
* an ``MCPEnvironment``: its MCP tools, listed after each reset, are the tools, and each call is
  a ``CallToolAction``.

Observations become messages: the observation's own fields (``done``, ``reward`` and ``metadata``
aside) as text, one field as it is, several as JSON. ``done`` ends the episode, ``reward`` carries
over (``None`` is 0).

Knobs: OpenEnv's ``reset`` takes ``**kwargs`` and ignores what it does not know, so the adapter
passes ``task_index``, ``split`` and ``max_turns`` only to a ``reset`` that names them in its
signature, and warns (once per knob) when a given knob has no such parameter: ``split="eval"``
then only moves the seed (``seed + EVAL_SEED_OFFSET``), which is a held-out split only for envs that
draw their task from the seed. ``max_turns`` is always enforced by the adapter.

Not mapped: remote envs (``AutoEnv``, HTTP clients, Docker images from the Hub: no network here),
rubric introspection, ``state`` (kept out of the student's view).

Example::

    env = agentopd.make("openenv:my_pkg.server.guess_environment", max_turns=6)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import typing
from typing import TYPE_CHECKING, Any

from agentopd.envs.adapters.base import (
    ForeignEnv,
    ForeignStart,
    ForeignStep,
    require,
    warn_once,
)
from agentopd.registry import UnknownNameError
from agentopd.tooling import Tool
from agentopd.types import Message

if TYPE_CHECKING:
    from pydantic import BaseModel

SYNTAX = "openenv:<module>[:<EnvironmentClass>]"
_OBS_BASE_FIELDS = {"done", "reward", "metadata"}
_KNOBS = ("task_index", "split", "max_turns")


def resolve(env_id: str) -> type:
    """The ``Environment`` subclass that ``env_id`` (``module`` or ``module:Class``) names.

    Raises:
        UnknownNameError: no such module, or no (or more than one) ``Environment`` class in it;
            the message lists the classes found, with "did you mean".
    """
    interfaces = require(
        "openenv.core.env_server.interfaces", package="openenv-core", extra="openenv"
    )
    base = interfaces.Environment
    module_name, _, cls_name = env_id.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UnknownNameError(
            f"openenv:{env_id}: module {module_name!r} is not importable ({e}). Name syntax: "
            f"{SYNTAX}, the module that defines the server-side Environment class."
        ) from None
    found = {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and issubclass(obj, base)
        and obj is not base
        and not inspect.isabstract(obj)
    }
    if cls_name:
        if cls_name in found:
            return found[cls_name]
        near = difflib.get_close_matches(cls_name, list(found), n=1, cutoff=0.4)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise UnknownNameError(
            f"openenv:{env_id}: {module_name} defines no OpenEnv Environment named {cls_name!r}.{hint} "
            f"Environments there: {', '.join(sorted(found)) or '(none)'}."
        )
    own = [c for c in found.values() if c.__module__ == module.__name__] or list(found.values())
    if len(own) != 1:
        raise UnknownNameError(
            f"openenv:{env_id}: expected one OpenEnv Environment class in {module_name}, found "
            f"{len(own)} ({', '.join(sorted(c.__name__ for c in own)) or 'none'}); "
            f"name one as openenv:{module_name}:<Class>."
        )
    return own[0]


class OpenEnvEnv(ForeignEnv):
    """An in-process OpenEnv ``Environment`` behind the agentopd contract (module docstring).

    Args:
        env_id: ``module`` or ``module:Class`` of the server-side Environment.
        init: Keyword arguments for the Environment's constructor.
        reset_kwargs: Extra keyword arguments for every ``reset`` (its own custom parameters).
        **kwargs: :class:`~agentopd.envs.adapters.base.ForeignEnv` arguments (``max_turns``, ...).
    """

    framework = "OpenEnv"
    prefix = "openenv"
    description = "An OpenEnv server-side Environment, in process."

    def __init__(
        self,
        env_id: str,
        *,
        init: dict[str, Any] | None = None,
        reset_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        cls = resolve(env_id)
        mcp = importlib.import_module("openenv.core.env_server.mcp_types")
        self._mcp_types = mcp
        mcp_env = importlib.import_module("openenv.core.env_server.mcp_environment")
        self._is_mcp = issubclass(cls, mcp_env.MCPEnvironment)
        self._env = cls(**dict(init or {}))
        self.reset_kwargs = dict(reset_kwargs or {})
        params = inspect.signature(self._env.reset).parameters
        self._reset_names = {
            n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        self._action_cls: type[BaseModel] | None = None if self._is_mcp else _action_type(cls)
        self._text_field = _single_str_field(self._action_cls) if self._action_cls else None
        self._options: dict[str, Any] = {}
        super().__init__(env_id, **kwargs)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._options = dict(options or {})
        return super().reset(seed=seed, options=options)

    # ---------------------------------------------------------------- hooks
    def foreign_reset(
        self, seed: int, index: int | None, split: str, max_turns: int
    ) -> ForeignStart:
        kwargs = dict(self.reset_kwargs)
        given = {k: self._options[k] for k in _KNOBS if k in self._options}
        for key, value in given.items():
            if key in self._reset_names:
                kwargs[key] = value
            elif not (key == "split" and value == "train"):
                warn_once(
                    self.spec_name,
                    key,
                    f"{self.spec_name}: its reset() has no {key!r} parameter and OpenEnv would ignore "
                    f"it silently; not passed ({'enforced by the adapter' if key == 'max_turns' else 'the seed chooses the task'})",
                )
        obs = self._env.reset(seed=seed, **kwargs)
        return ForeignStart(
            [Message(role="user", content=self._text(obs))], info=dict(obs.metadata or {})
        )

    def foreign_tools(self) -> list[Tool]:
        if self._is_mcp:
            listed = self._env.step(self._mcp_types.ListToolsAction())
            return [self._mcp_tool(t.name, t.description, t.input_schema) for t in listed.tools]
        if self._text_field is not None:
            return []
        action_cls = self._action_cls
        assert action_cls is not None  # every env but an MCP one has its Action model
        schema = action_cls.model_json_schema()
        props = {k: v for k, v in (schema.get("properties") or {}).items() if k != "metadata"}
        params = {
            "type": "object",
            "properties": props,
            "required": [r for r in schema.get("required", []) if r != "metadata"],
        }
        if "$defs" in schema:
            params["$defs"] = schema["$defs"]

        def act(**arguments: Any) -> str:
            action = action_cls(**arguments)
            return self.tool_step(self._observe(self._env.step(action), "tool"))

        doc = (action_cls.__doc__ or "").strip().splitlines()
        description = doc[0] if doc else f"Take one action in {self.env_id}."
        return [Tool("act", act, description, params)]

    def foreign_step(self, action: str) -> ForeignStep:
        if self._text_field is None:
            names = ", ".join(self.toolset.names) if self.toolset else ""
            return ForeignStep(
                [
                    Message(
                        role="user",
                        content=f"This env acts through tools only: call one of {names}.",
                    )
                ],
                0.0,
                False,
            )
        assert self._action_cls is not None  # _text_field is one of its fields
        return self._observe(self._env.step(self._action_cls(**{self._text_field: action})), "user")

    def foreign_close(self) -> None:
        self._env.close()

    # ---------------------------------------------------------------- mapping
    def _mcp_tool(self, name: str, description: str, schema: dict[str, Any]) -> Tool:
        def call(**arguments: Any) -> str:
            obs = self._env.step(
                self._mcp_types.CallToolAction(tool_name=name, arguments=arguments)
            )
            if obs.error is not None:
                raise RuntimeError(f"{obs.error.error_type.value}: {obs.error.message}")
            return self.tool_step(self._observe(obs, "tool"))

        params = dict(schema or {"type": "object", "properties": {}})
        params.setdefault("type", "object")
        return Tool(name, call, description or f"The {name} tool of {self.env_id}.", params)

    def _observe(self, obs: Any, role: str) -> ForeignStep:
        reward = float(obs.reward) if obs.reward is not None else 0.0
        text = self._text(obs)
        return ForeignStep(
            [Message(role=role, content=text)],
            reward,
            bool(obs.done),
            False,
            dict(obs.metadata or {}),
        )

    def _text(self, obs: Any) -> str:
        if isinstance(obs, self._mcp_types.CallToolObservation):
            return _tool_result_text(obs.result)
        data = {k: v for k, v in obs.model_dump().items() if k not in _OBS_BASE_FIELDS}
        if len(data) == 1:
            value = next(iter(data.values()))
            return value if isinstance(value, str) else json.dumps(value, default=str)
        return json.dumps(data, default=str, ensure_ascii=False)


def _action_type(cls: Any) -> type[BaseModel]:
    try:
        hints = typing.get_type_hints(cls.step)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall through to the error below
        hints = {}
    action = hints.get("action")
    if not (inspect.isclass(action) and hasattr(action, "model_json_schema")):
        raise ValueError(
            f"{cls.__name__}.step(action) must annotate its Action model (a pydantic Action "
            f"subclass) so the adapter knows what an action is; got {action!r}"
        )
    return typing.cast("type[BaseModel]", action)  # a class with pydantic's model API


def _single_str_field(action_cls: type[BaseModel]) -> str | None:
    fields = {k: f for k, f in action_cls.model_fields.items() if k != "metadata"}
    if len(fields) == 1:
        name, f = next(iter(fields.items()))
        if f.annotation is str:
            return name
    return None


def _tool_result_text(result: Any) -> str:
    content = getattr(result, "content", None)
    if isinstance(content, list):
        texts = [t for t in (getattr(c, "text", None) for c in content) if isinstance(t, str)]
        if len(texts) == len(content):
            return "\n".join(texts)
    if isinstance(result, dict) and "content" in result:
        return "\n".join(
            str(c.get("text", c)) if isinstance(c, dict) else str(c) for c in result["content"]
        )
    return result if isinstance(result, str) else json.dumps(result, default=str)


def make(env_id: str, **kwargs: Any) -> OpenEnvEnv:
    """Factory behind the ``openenv:`` prefix."""
    return OpenEnvEnv(env_id, **kwargs)
