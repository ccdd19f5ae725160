"""``verifiers:<module>[:<Taskset>[:<Env>]]``: a verifiers (``verifiers.v1``) env, run by verifiers itself.

verifiers runs its own loop: a harness program (here its tool-less ``null`` chat harness) asks an
OpenAI-compatible endpoint for each assistant turn, and the taskset's ``@vf.reward`` functions
score the finished trace. This adapter inverts that control so agentopd's rollout loop keeps
generating the student's tokens:

* :meth:`VerifiersEnv.reset` starts one verifiers episode (``Env.run_episode``) on a background
  event loop, with a model client whose ``base_url`` is a local endpoint on 127.0.0.1
  (:mod:`agentopd.envs.adapters._endpoint`). The harness's first chat-completions request blocks
  there; its messages are the observation.
* :meth:`VerifiersEnv.step` answers that request with exactly the text the student sampled, then
  waits for the next request (the env's reply, e.g. a user message: the new messages are the
  observation, at mask 0 in the episode) or for the end of the episode (the rubric's reward).
* Token-exactness is checked on every request: after the opening one (text messages ending with
  a user message: the observation, whatever verifiers' hooks made of the task's prompt), each
  must be the previous request's messages + the student's exact text + new user messages, and
  the trace verifiers scores must hold the student's replies verbatim. An env that rewrites what
  the student wrote (a response ``@vf.intercept`` hook; a harness that compacts history), asks
  for ``n > 1`` or sends tools fails that episode with the reason (``env_error``; the batch goes
  on). verifiers itself refuses request hooks that rewrite earlier messages.
* Refused when built (``ConfigError`` with the reason): an env with more than one seat that uses
  the run's model (the student would play all of them), tasks with tool servers (MCP tool calls
  are not mapped), a seat or taskset that pins a harness other than ``null`` (programs such as
  ``bash`` or ``codex`` run their own tools in containers), a chat program whose packages are
  missing.

The ``null`` harness's program is a PEP 723 script that verifiers installs with ``uv`` (network)
and runs as a subprocess. The adapter runs that same program code in this process
(:mod:`agentopd.envs.adapters._verifiers_harness`), as verifiers' ``Harness`` contract allows, so nothing is downloaded.

Episodes are played by this process's verifiers objects: one background loop and one endpoint per
env id, shared by all episodes (each episode has its own route). Limits: no scripted expert, LLM
judges need their own reachable endpoint, ``replay`` re-sends stored turns through verifiers'
loop (the prefix is reproduced only when the env's answers depend on the replies alone).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentopd.config import ConfigError
from agentopd.envs.adapters._endpoint import ChatEndpoint, ChatRequest
from agentopd.envs.adapters._verifiers_harness import chat_program, harness_id
from agentopd.envs.adapters.base import (
    ForeignEnv,
    ForeignStart,
    ForeignStep,
    _jsonable,
    require,
    unknown_id,
    warn_once,
)
from agentopd.registry import UnknownNameError
from agentopd.types import Message

if TYPE_CHECKING:
    from pydantic import BaseModel

SYNTAX = "verifiers:<module>[:<TasksetClass>[:<EnvClass>]]"
MODEL = "agentopd-student"
"""The model name verifiers sends; the endpoint serves only the student."""


class NotTokenExactError(RuntimeError):
    """A verifiers request or trace that does not extend the student's exact conversation."""


@dataclass
class _Done:
    """Posted on an episode's route when its ``run_episode`` future finished."""

    task: asyncio.Task


# ---------------------------------------------------------------------------- resolution
def _builtin_ids() -> list[str]:
    import pkgutil

    import verifiers.v1.tasksets as builtin

    return sorted(m.name for m in pkgutil.iter_modules(builtin.__path__))


def _import(module_name: str, env_id: str) -> types.ModuleType:
    builtin = f"verifiers.v1.tasksets.{module_name}"
    target = (
        builtin if "." not in module_name and importlib.util.find_spec(builtin) else module_name
    )
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and e.name != target and not target.startswith(e.name + "."):
            raise ConfigError(
                f"verifiers:{env_id}: importing {target!r} failed: it needs the package "
                f"{e.name!r}, which is not installed"
            ) from None
        raise unknown_id("verifiers", module_name, _builtin_ids(), SYNTAX) from None


def _classes(module: types.ModuleType, base: type) -> dict[str, type]:
    """``base`` subclasses the module exports (``__all__``), else those it defines."""
    exported = getattr(module, "__all__", None)
    names = exported or [n for n in vars(module) if not n.startswith("_")]
    return {
        n: obj
        for n in names
        if inspect.isclass(obj := getattr(module, n, None))
        and issubclass(obj, base)
        and obj is not base
        and not inspect.isabstract(obj)
        and (exported is not None or obj.__module__ == module.__name__)
    }


def _pick(
    module: types.ModuleType, base: type, name: str | None, kind: str, env_id: str
) -> type | None:
    found = _classes(module, base)
    if name is not None:
        if name in found:
            return found[name]
        near = difflib.get_close_matches(name, list(found), n=1, cutoff=0.4)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise UnknownNameError(
            f"verifiers:{env_id}: module {module.__name__!r} has no {kind} class {name!r}.{hint} "
            f"Available: {', '.join(sorted(found)) or '(none)'} (name syntax: {SYNTAX})"
        )
    if kind == "Env":
        # verifiers pairs a taskset with the Env its module exports (``__all__``); without one
        # the env is SingleAgentEnv unless named.
        exported = hasattr(module, "__all__")
        return next(iter(found.values())) if exported and len(found) == 1 else None
    if len(found) != 1:
        raise UnknownNameError(
            f"verifiers:{env_id}: expected one Taskset class in {module.__name__!r}, found "
            f"{', '.join(sorted(found)) or 'none'}; name one: verifiers:{module.__name__}:<TasksetClass>"
        )
    return next(iter(found.values()))


def resolve(env_id: str) -> tuple[type, type | None]:
    """The ``(Taskset class, Env class or None)`` that ``env_id`` names.

    Raises:
        UnknownNameError: no such module (the built-in taskset ids, with "did you mean") or class.
    """
    import verifiers.v1 as vf

    parts = env_id.split(":")
    if not parts[0] or len(parts) > 3:
        raise UnknownNameError(f"verifiers:{env_id}: expected {SYNTAX}")
    module = _import(parts[0], env_id)
    taskset = _pick(module, vf.Taskset, parts[1] if len(parts) > 1 else None, "Taskset", env_id)
    env_cls = _pick(module, vf.Env, parts[2] if len(parts) > 2 else None, "Env", env_id)
    assert taskset is not None  # a Taskset is found or _pick raises
    return taskset, env_cls


def _plugin_id(taskset: type, env_cls: type | None) -> str:
    """A module id verifiers' loader imports: exports exactly ``taskset`` (and ``env_cls``)."""
    key = f"{taskset.__module__}.{taskset.__qualname__}|{env_cls and env_cls.__qualname__}"
    name = "agentopd_vf_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    if name not in sys.modules:
        module = types.ModuleType(name, f"agentopd alias of {key}")
        exported = [taskset] + ([env_cls] if env_cls is not None else [])
        for i, cls in enumerate(exported):
            setattr(module, f"export_{i}", cls)
        vars(module)["__all__"] = [f"export_{i}" for i in range(len(exported))]
        sys.modules[name] = module
    return name


# ---------------------------------------------------------------------------- the shared runner
class _Runner:
    """One verifiers env, serving on a background event loop, plus the endpoint its model calls reach."""

    def __init__(
        self,
        env_id: str,
        taskset_cls: type,
        env_cls: type | None,
        max_tasks: int,
        taskset_args: Mapping[str, Any],
    ):
        import verifiers.v1 as vf
        from verifiers.v1.configs.agent import agent_config_fields
        from verifiers.v1.utils.generic import concrete_type
        from verifiers.v1.utils.loaders import default_harness_id

        self.env_id = env_id
        env_cls = env_cls or vf.SingleAgentEnv
        plugin = _plugin_id(taskset_cls, env_cls if env_cls is not vf.SingleAgentEnv else None)
        own_harness = default_harness_id(plugin)
        if own_harness not in ("bash", "null"):
            self._refuse(
                f"its taskset pins the harness {own_harness!r}; only verifiers' tool-less `null` "
                "chat harness is mapped (a program harness runs its own tools in a container)"
            )
        config_cls = concrete_type(env_cls, vf.EnvConfig, origin=vf.Env) or vf.EnvConfig
        taskset_config = _taskset_config(
            env_id, vf.taskset_config_type(plugin), plugin, taskset_args
        )
        seats = agent_config_fields(config_cls(taskset=taskset_config))
        student = [name for name, seat in seats.items() if seat.client is None]
        if len(student) != 1:
            self._refuse(
                f"{env_cls.__name__} has {len(student)} agent seats that use the run's model "
                f"({', '.join(student) or 'none'}); the student can play exactly one"
            )
        (seat,) = student
        pinned = seats[seat].harness
        if pinned is not None and pinned.id != "null":
            self._refuse(
                f"seat {seat!r} pins the harness {pinned.id!r}; only verifiers' tool-less `null` "
                "chat harness is mapped"
            )
        overrides = {
            name: value.model_copy(
                update={
                    "harness": vf.HarnessConfig(id=harness_id()),
                    "runtime": vf.SubprocessConfig(),
                    "retries": vf.RetryConfig(max_retries=0),
                }
            )
            if name == seat
            else value
            for name, value in seats.items()
        }
        self.config = config_cls(taskset=taskset_config, **overrides)
        chat_program()
        self.env = env_cls(self.config)
        taskset = self.env.taskset
        if not taskset.bounded:
            taskset = taskset.take(max_tasks)
        self.tasks = list(taskset)[:max_tasks]
        if not self.tasks:
            self._refuse("its taskset yields no tasks")
        task_cls = type(self.tasks[0])
        if task_cls.toolsets(self.tasks[0].config) or type(self.env.taskset).toolsets(
            self.env.taskset.config
        ):
            self._refuse(
                "its tasks have tool servers (Task.toolsets / Taskset.toolsets); MCP tool calls "
                "are not mapped to agentopd tools yet"
            )
        from verifiers.v1.utils.decorators import discover_decorated

        hooks = [fn.__name__ for fn in discover_decorated(self.tasks[0], "intercept")]
        if hooks:
            warn_once(
                f"verifiers:{env_id}",
                "intercept",
                f"verifiers:{env_id}: its tasks have @vf.intercept hooks ({', '.join(hooks)}); an "
                "episode in which one replaces the student's reply is refused as not token-exact",
            )
        self.endpoint = ChatEndpoint(MODEL)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name=f"agentopd-verifiers-{env_id}", daemon=True
        )
        self._thread.start()
        self._stop: asyncio.Event | None = None
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._serving = asyncio.run_coroutine_threadsafe(self._serve(ready), self.loop)
        ready.result(timeout=120)

    def _refuse(self, reason: str) -> None:
        raise ConfigError(f"verifiers:{self.env_id} cannot be wrapped token-exactly: {reason}")

    async def _serve(self, ready: concurrent.futures.Future) -> None:
        self._stop = asyncio.Event()
        try:
            async with self.env.serving():
                ready.set_result(True)
                await self._stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    def submit(self, coro: Any, on_done: Any) -> asyncio.Task:
        """Run ``coro`` as a task on the loop; ``on_done(task)`` runs when it finishes."""

        async def start() -> asyncio.Task:
            task = asyncio.ensure_future(coro)
            task.add_done_callback(on_done)
            return task

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=30)

    def cancel(self, task: asyncio.Task, timeout: float = 30.0) -> None:
        """Cancel ``task`` and wait until it has unwound (its program and servers are down)."""

        async def stop() -> None:
            task.cancel()
            await asyncio.wait([task], timeout=timeout)

        if not task.done():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=timeout + 5)

    def shutdown(self) -> None:
        """Leave ``serving()`` (interception servers down), stop the loop and the endpoint."""
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._serving.result(timeout=15)
        except BaseException:  # noqa: BLE001 - shutting down at exit: nothing left to report to
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.endpoint.close()

    def context(self, route: int) -> Any:
        import verifiers.v1 as vf

        return vf.ModelContext(
            model=MODEL,
            client=vf.EvalClientConfig(
                base_url=self.endpoint.base_url(route), api_key_var="AGENTOPD_VERIFIERS_API_KEY"
            ),
        )


def _taskset_config(
    env_id: str, config_cls: type[BaseModel], plugin: str, args: Mapping[str, Any]
) -> Any:
    """``config_cls`` (the taskset's ``vf.TasksetConfig``) built from ``env_kwargs.taskset``.

    Raises:
        ConfigError: an unknown field (with "did you mean" and the fields there are), a missing
            required field or a bad value (verifiers' validation message, with the field's type).
    """
    from pydantic import ValidationError

    fields = {n: f for n, f in config_cls.model_fields.items() if n != "id"}

    def describe(name: str) -> str:
        field = fields[name]
        tp = field.annotation
        kind = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        return f"{name}: {kind}" + ("" if field.is_required() else f" = {field.default!r}")

    listing = "; ".join(describe(n) for n in fields)
    for key in args:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"verifiers:{env_id}: env_kwargs.taskset.{key} is not a field of "
                f"{config_cls.__name__}.{hint} Its fields: {listing}"
            )
    try:
        return config_cls(id=plugin, **args)
    except ValidationError as e:
        problems = "; ".join(
            f"env_kwargs.taskset.{'.'.join(map(str, err['loc']))}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
            for err in e.errors()
        )
        raise ConfigError(
            f"verifiers:{env_id}: bad taskset config for {config_cls.__name__}: {problems}. "
            f"Its fields: {listing}"
        ) from None


_runners: dict[tuple[str, int, str], _Runner] = {}
_runners_lock = threading.Lock()


def _shutdown_runners() -> None:
    with _runners_lock:
        runners = list(_runners.values())
        _runners.clear()
    for runner in runners:
        runner.shutdown()


def _runner(env_id: str, max_tasks: int, taskset_args: Mapping[str, Any]) -> _Runner:
    with _runners_lock:
        key = (env_id, max_tasks, json.dumps(taskset_args, sort_keys=True, default=repr))
        if key not in _runners:
            if not _runners:
                atexit.register(_shutdown_runners)
            taskset_cls, env_cls = resolve(env_id)
            _runners[key] = _Runner(env_id, taskset_cls, env_cls, max_tasks, taskset_args)
        return _runners[key]


# ---------------------------------------------------------------------------- the adapter
def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise NotTokenExactError(f"{where} has non-text content ({str(content)[:200]}); only text maps")


def _normal(messages: list[Any], where: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise NotTokenExactError(f"{where}: message {i} is not a chat message: {str(m)[:200]}")
        if m.get("tool_calls") or m["role"] == "tool":
            raise NotTokenExactError(f"{where}: message {i} holds tool calls; tools are not mapped")
        out.append((str(m["role"]), _text(m.get("content"), f"{where}: message {i}")))
    return out


def _wire(text: str) -> str:
    """``text`` as it can cross HTTP/JSON to verifiers: lone surrogates become U+FFFD.

    The student's tokens decode to valid text already; this only matters for text that did not
    come from a tokenizer (``agentopd check-env``'s malformed actions).
    """
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def _first_difference(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"message {i} ({x[0]}): agentopd holds {x[1][:160]!r}, the env sent {y[0]} {y[1][:160]!r}"
    return (
        f"the env sent {len(b)} messages where agentopd holds {len(a)} (a prefix of them dropped)"
    )


class VerifiersEnv(ForeignEnv):
    """A verifiers env as an ``agentopd.Env`` (see the module docstring).

    Args:
        env_id: ``<module>[:<TasksetClass>[:<EnvClass>]]``: a module exporting one ``vf.Taskset``
            (verifiers' own taskset id: an installed taskset package or a built-in one), or the
            classes to use from it. An ``Env`` subclass in the module is used when it is the only
            one (else ``SingleAgentEnv``).
        held_out: The last ``held_out`` tasks are the eval split (``split="eval"``); the others
            are the training tasks. 0: eval draws from the training tasks (with a warning).
        max_tasks: At most this many tasks are read from the taskset (an infinite one included).
        taskset: Fields of the taskset's config (its ``vf.TasksetConfig`` subclass), e.g.
            ``{"game": "Hangman-v0"}`` for verifiers' ``textarena`` taskset; on the command line
            ``env_kwargs.taskset.game=Hangman-v0`` (``taskset.game=Hangman-v0`` for ``agentopd
            check-env``, whose keys are flat). An unknown, missing or bad field is a
            ``ConfigError`` that lists the config's fields.
        reply_timeout_s: How long to wait for verifiers' next request or its end of episode.
        **kwargs: ``max_turns``, ``success_reward``, ``system_prompt`` of :class:`ForeignEnv`.
    """

    framework = "verifiers"
    prefix = "verifiers"
    takes_whole_turn = True

    def __init__(
        self,
        env_id: str,
        *,
        held_out: int = 0,
        max_tasks: int = 10_000,
        taskset: Mapping[str, Any] | None = None,
        reply_timeout_s: float = 600.0,
        **kwargs: Any,
    ):
        require("verifiers.v1", package="verifiers", extra="verifiers")
        if taskset is not None and not isinstance(taskset, Mapping):
            raise ConfigError(
                f"verifiers:{env_id}: env_kwargs.taskset must be a mapping of taskset config "
                f"fields (e.g. env_kwargs.taskset.game=Hangman-v0), got {taskset!r}"
            )
        args = {str(k): v for k, v in (taskset or {}).items()}
        for key in [k for k in kwargs if k.startswith("taskset.")]:
            # ``agentopd check-env verifiers:textarena taskset.game=Hangman-v0`` passes flat keys
            args[key.removeprefix("taskset.")] = kwargs.pop(key)
        self._runner = _runner(env_id, int(max_tasks), args)
        n = len(self._runner.tasks)
        if not 0 <= int(held_out) < n:
            raise ConfigError(
                f"verifiers:{env_id}: held_out must be in [0, {n - 1}] (the taskset has {n} tasks), "
                f"got {held_out}"
            )
        self.held_out = int(held_out)
        self.reply_timeout_s = float(reply_timeout_s)
        self._route: int | None = None
        self._episode: asyncio.Task | None = None
        self._pending: ChatRequest | None = None
        self._sampled: tuple[list[int], list[float]] | None = None
        self._conversation: list[tuple[str, str]] = []
        self._replies: list[str] = []
        super().__init__(env_id, **kwargs)

    # ---------------------------------------------------------------- ForeignEnv hooks
    def foreign_reset(
        self, seed: int, index: int | None, split: str, max_turns: int
    ) -> ForeignStart:
        self._abort()
        tasks = self._runner.tasks
        n_train = len(tasks) - self.held_out
        if split == "eval" and self.held_out:
            pool = tasks[n_train:]
        else:
            if split == "eval":
                warn_once(
                    self.spec_name,
                    "held_out",
                    f"{self.spec_name}: no held-out tasks (env_kwargs.held_out=0), so eval episodes "
                    "are drawn from the training tasks",
                )
            pool = tasks[:n_train]
        pick = index if index is not None else seed
        task = pool[pick % len(pool)]
        self._route = self._runner.endpoint.open_route()
        route = self._route
        self._conversation, self._replies, self._sampled = [], [], None
        endpoint = self._runner.endpoint
        coro = self._runner.env.run_episode(task, self._runner.context(route))
        self._episode = self._runner.submit(coro, lambda t: endpoint.post(route, _Done(t)))
        item = self._next("the opening request")
        if isinstance(item, _Done):
            raise RuntimeError(
                f"{self.spec_name}: the verifiers episode ended before the model was asked "
                f"anything: {self._failure(item) or 'no error recorded'}"
            )
        try:
            messages = self._check(item, "the opening request")
            if not messages or messages[-1][0] != "user":
                raise NotTokenExactError(
                    f"the opening request must end with a user message, got roles {[r for r, _ in messages]}"
                )
        except NotTokenExactError as e:
            self._refuse_request(item, e)
        self._pending = item
        self._conversation = messages
        return ForeignStart(
            [Message(role=r, content=c) for r, c in messages],
            task_id=str(task.data.id or task.data.name or f"task-{task.data.idx}"),
            info={"idx": task.data.idx, "key": task.key},
        )

    def observe_sampled(self, token_ids: list[int], logprobs: list[float]) -> None:
        """The rollout loop's hook: the exact token ids and log-probs of the turn that the next
        :meth:`step` answers with; the endpoint returns them with the text."""
        self._sampled = (list(token_ids), list(logprobs))

    def foreign_step(self, action: str) -> ForeignStep:
        request, self._pending = self._pending, None
        if request is None:
            raise RuntimeError(f"{self.spec_name}: no verifiers request is waiting for a reply")
        sent = _wire(action)
        ids, lps = self._sampled if self._sampled is not None else ([], [])
        self._sampled = None
        request.reply(sent, token_ids=ids, logprobs=lps)
        self._conversation.append(("assistant", sent))
        self._replies.append(sent)
        item = self._next("the next request")
        if isinstance(item, _Done):
            return self._finished(item)
        try:
            messages = self._check(item, "the next request")
            held = self._conversation
            if messages[: len(held)] != held:
                raise NotTokenExactError(
                    f"the env rewrote the conversation: {_first_difference(held, messages)}"
                )
            new = messages[len(held) :]
            if not new:
                raise NotTokenExactError("the env asked again without a new message")
            if any(role != "user" for role, _ in new):
                raise NotTokenExactError(
                    f"the env added {[r for r, _ in new]} messages; only user messages map to observations"
                )
        except NotTokenExactError as e:
            self._refuse_request(item, e)
        self._pending = item
        self._conversation = messages
        return ForeignStep([Message(role="user", content=c) for _, c in new], 0.0, False)

    def close_episode(self) -> None:
        self._abort()
        super().close_episode()

    def foreign_close(self) -> None:
        self._abort()

    # ---------------------------------------------------------------- internals
    def _next(self, what: str) -> Any:
        assert self._route is not None
        item = self._runner.endpoint.next_item(self._route, self.reply_timeout_s)
        if item is None:
            raise TimeoutError(
                f"{self.spec_name}: verifiers sent neither {what} nor its end of episode within "
                f"{self.reply_timeout_s:g}s (env_kwargs.reply_timeout_s)"
            )
        return item

    def _check(self, request: ChatRequest, what: str) -> list[tuple[str, str]]:
        body = request.body
        if int(body.get("n") or 1) != 1:
            raise NotTokenExactError(
                f"{what} asks for n={body['n']} completions; one student turn answers one"
            )
        if body.get("tools"):
            raise NotTokenExactError(f"{what} offers tools; tool calls are not mapped")
        return _normal(request.messages, what)

    def _refuse_request(self, request: ChatRequest, error: NotTokenExactError) -> None:
        request.fail(422, f"agentopd refused this request: {error}")
        self._abort()
        raise NotTokenExactError(
            f"{self.spec_name} is not token-exact here, episode refused: {error}"
        )

    def _failure(self, done: _Done) -> str | None:
        try:
            episode = done.task.result()
        except BaseException as e:  # noqa: BLE001 - reported as this episode's failure
            return f"{type(e).__name__}: {e}"
        errors = list(episode.errors) + [e for t in episode.traces for e in t.errors]
        if errors:
            return "; ".join(f"{e.type}: {e.message}" for e in errors[:3])
        return None

    def _finished(self, done: _Done) -> ForeignStep:
        failure = self._failure(done)
        self._close_route()
        if failure:
            raise RuntimeError(f"{self.spec_name}: the verifiers episode failed: {failure}")
        episode = done.task.result()
        trace = episode.traces[-1]
        scored = [
            _text(m.model_dump().get("content"), "the trace") for m in trace.assistant_messages
        ]
        if scored != self._replies:
            raise NotTokenExactError(
                f"{self.spec_name} is not token-exact here, episode refused: the trace verifiers "
                f"scored holds the replies {[s[:80] for s in scored]}, the student wrote "
                f"{[s[:80] for s in self._replies]}"
            )
        truncated = bool(trace.is_timeout or trace.is_truncated)
        info = {
            "rewards": {k: r.score for k, r in trace.rewards.items()},
            "metrics": _jsonable(dict(trace.metrics)),
            "stop_condition": trace.stop_condition,
        }
        return ForeignStep([], float(trace.reward), not truncated, truncated, info)

    def _close_route(self) -> None:
        if self._route is not None:
            self._runner.endpoint.close_route(self._route)
            self._route = None

    def _abort(self) -> None:
        """End a running verifiers episode (agentopd stopped it: turn limit, reset, close)."""
        if self._pending is not None:
            self._pending.fail(503, "agentopd ended this episode")
            self._pending = None
        episode, self._episode = self._episode, None
        if episode is not None:
            self._runner.cancel(episode)
        self._close_route()


def make(env_id: str, **kwargs: Any) -> VerifiersEnv:
    """Factory behind the ``verifiers:`` prefix."""
    return VerifiersEnv(env_id, **kwargs)
