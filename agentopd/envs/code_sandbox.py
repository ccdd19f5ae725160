"""``code-sandbox``: computational tasks solved by running Python in a sandbox.

Tools: ``python(code)`` runs code in a persistent sandboxed worker (variables persist between
calls like notebook cells; stdout, stderr and exceptions come back, truncated with a marker past
``max_output_chars``) and the automatic ``submit(answer)``. The reward is computed in the trainer
from the submitted answer; nothing the code does inside the sandbox can change it.

Built-in tasks come from a seeded generator and are chains of ``steps`` templated operations;
step 1 computes a number from scratch, each later step transforms the previous result. The
scripted expert runs one short cell per step that updates the session variable ``x`` and prints
it, then submits the last number printed, so a task of ``steps`` steps takes ``steps + 1`` turns
and ``steps`` is the difficulty::

    user:      Step 1: x = the sum of the squares of 1..37. Step 2: x = x squared modulo 101.
               Submit x.
    assistant: python(code="x=sum(i*i for i in range(1,37+1))\nprint(x)")  -> 17575
    assistant: python(code="x=x*x%101\nprint(x)")                           -> 6
    assistant: submit(answer="6")

Keeping ``x`` in the session spares the model from copying intermediate numbers from one cell's
output into the next cell (``print(17575*17575%101)``), which is where a tiny model fails (see
``docs/zoo.md``). When something else has run in the session since its last cell (a student's
cell, a crash that restarted the worker), the expert cannot trust ``x`` and restates it first
(``x=17575\nx=x*x%101\nprint(x)``).

Prompts, code and outputs are kept short and templated so that a tiny model can learn the expert
by SFT on a CPU. Your own tasks: ``tasks_file=path.jsonl``, one JSON object per line (checked
with jsonschema; a bad line raises :class:`TaskFileError` naming the line)::

    {"prompt": "What is 2**100 mod 7?", "answer": 2, "solution": ["print(2**100 % 7)"]}

Keys: ``prompt`` and ``answer`` (required), ``id``, ``difficulty`` (expected python calls),
``solution`` (the expert's cells; it submits the last line printed by the last one, or the
reference answer when there is no solution), ``setup`` (code run in the sandbox before the
first call, e.g. to create data files), ``split`` (``eval`` tasks are held out from training
and are the eval split when there are any; others are train tasks).

The sandbox backend is configurable (``backend="auto" | "docker" | "bwrap" | "local"``, see
``docs/sandbox.md``). Episodes take their sandbox from a warm pool shared by the process's env
instances (``pool_size``, default :data:`DEFAULT_POOL_SIZE`; 0 starts a fresh sandbox per
episode): on the first ``python`` call, and it goes back at the end of the episode
(``close_episode`` / ``close``), where it is reset (every process killed, files, IPC objects
and keys removed, a fresh Python executor) before another episode gets it.

Example::

    env = agentopd.make("code-sandbox", backend="auto", max_steps=2)
    messages, info = env.reset(seed=0)
    messages, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
    env.close()
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from agentopd.env import Env, Task, answered_call_log, answered_calls
from agentopd.sandbox import Limits, Sandbox, make_sandbox, resolve_backend
from agentopd.sandbox.pool import SandboxPool, check_pool_size, shared_pool
from agentopd.tooling import Tool, ToolError, tool
from agentopd.types import Message

SYSTEM_PROMPT = (
    'Call a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call>. '
    "Tools: python(code), submit(answer)."
)
EVAL_SHARE = 5
"""One built-in task in ``EVAL_SHARE`` belongs to the eval split (disjoint by content)."""
DEFAULT_POOL_SIZE = 16
"""Sandboxes the pool keeps ready (the default batch, ``episodes_per_step``, is 16)."""

TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt", "answer"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "prompt": {"type": "string", "minLength": 1},
        "answer": {"type": ["string", "number"]},
        "difficulty": {"type": "integer", "minimum": 1},
        "solution": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "setup": {"type": "string"},
        "split": {"enum": ["train", "eval"]},
    },
}
"""JSON Schema of one line of a ``tasks_file``."""


class TaskFileError(ValueError):
    """A ``tasks_file`` line that is not valid JSON or does not match :data:`TASK_SCHEMA`."""


# ---------------------------------------------------------------------------- built-in tasks
@dataclass(frozen=True)
class Op:
    """One templated step: its prompt phrase, the expert's code and the reference function."""

    name: str
    phrase: str
    """Prompt text with ``{a}``, ``{b}`` parameters (and ``x`` for the previous result)."""
    code: str
    """The expert's cell, with parameters ``{a}``, ``{b}``; it reads the session variable ``x``
    (the previous step's result) and leaves the new result in ``x``, printed."""
    ref: Callable[..., int]
    """Reference result from (x, a, b), computed in the trainer."""
    params: tuple[tuple[int, int], ...]
    """Inclusive ranges of the parameters ``a``, ``b``."""


def _primes_below(n: int) -> int:
    return sum(all(k % d for d in range(2, k)) for k in range(2, n))


def _next_prime(n: int) -> int:
    n += 1
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


FIRST_OPS = (
    Op("squares", "the sum of the squares of 1..{a}", "x=sum(i*i for i in range(1,{a}+1))\nprint(x)",
       lambda x, a, b: sum(i * i for i in range(1, a + 1)), ((5, 99),)),
    Op("primes", "the number of primes below {a}", "x=sum(all(k%d for d in range(2,k)) for k in range(2,{a}))\nprint(x)",
       lambda x, a, b: _primes_below(a), ((20, 999),)),
    Op("multiples", "the sum of the multiples of 3 or 5 below {a}", "x=sum(k for k in range(1,{a}) if k%3==0 or k%5==0)\nprint(x)",
       lambda x, a, b: sum(k for k in range(1, a) if k % 3 == 0 or k % 5 == 0), ((10, 999),)),
    Op("power", "{a} to the power {b} modulo 997", "x=pow({a},{b},997)\nprint(x)",
       lambda x, a, b: pow(a, b, 997), ((2, 99), (10, 999))),
)  # fmt: skip
NEXT_OPS = (
    Op("digitsum", "the digit sum of x*{a}", "x=sum(map(int,str(x*{a})))\nprint(x)",
       lambda x, a, b: sum(map(int, str(x * a))), ((2, 99),)),
    Op("square-mod", "x squared modulo {a}", "x=x*x%{a}\nprint(x)",
       lambda x, a, b: x * x % a, ((101, 9999),)),
    Op("divisors", "the number of divisors of x+{a}", "n=x+{a}\nx=sum(n%d==0 for d in range(1,n+1))\nprint(x)",
       lambda x, a, b: sum((x + a) % d == 0 for d in range(1, x + a + 1)), ((1, 99),)),
    Op("next-prime", "the smallest prime above x", "x+=1\nwhile any(x%d==0 for d in range(2,int(x**.5)+1)):x+=1\nprint(x)",
       lambda x, a, b: _next_prime(x), ()),
)  # fmt: skip


def _draw_chain(rng: np.random.Generator, steps: int) -> list[tuple[Op, int, int]]:
    chain = []
    for i in range(steps):
        ops = FIRST_OPS if i == 0 else NEXT_OPS
        op = ops[int(rng.integers(len(ops)))]
        a, b = (int(rng.integers(lo, hi + 1)) for lo, hi in (op.params + ((0, 0), (0, 0)))[:2])
        chain.append((op, a, b))
    return chain


def chain_values(chain: list[tuple[Op, int, int]]) -> list[int]:
    """Reference value after each step."""
    values, x = [], 0
    for op, a, b in chain:
        x = int(op.ref(x, a, b))
        values.append(x)
    return values


def step_code(op: Op, a: int, b: int, x: int | None = None) -> str:
    """The expert's cell for one step; with ``x`` given it first restates ``x=<value>``.

    Without ``x`` the cell relies on the session's ``x`` from the previous step's cell.
    """
    code = op.code.format(a=a, b=b)
    return code if x is None else f"x={x}\n{code}"


def chain_prompt(chain: list[tuple[Op, int, int]]) -> str:
    parts = []
    for i, (op, a, b) in enumerate(chain, 1):
        phrase = op.phrase.format(a=a, b=b)
        parts.append(f"x = {phrase}." if len(chain) == 1 else f"Step {i}: x = {phrase}.")
    return " ".join(parts) + " Submit x."


# ---------------------------------------------------------------------------- task files
def load_tasks_file(path: str | Path) -> list[Task]:
    """Read and validate a JSONL task file.

    Raises:
        TaskFileError: ``"<path>:<line>: <what is wrong>"`` for the first bad line.
        FileNotFoundError: The file does not exist.
    """
    path = Path(path)
    validator = jsonschema.Draft202012Validator(TASK_SCHEMA)
    tasks: list[Task] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(
                f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            where = "/".join(str(p) for p in err.absolute_path)
            raise TaskFileError(f"{path}:{lineno}: {where + ': ' if where else ''}{err.message}")
        task_id = obj.get("id") or f"line{lineno}"
        if task_id in seen:
            raise TaskFileError(f"{path}:{lineno}: duplicate id {task_id!r}")
        seen.add(task_id)
        solution = obj.get("solution")
        tasks.append(
            Task(
                id=task_id,
                prompt=obj["prompt"],
                answer=str(obj["answer"]),
                difficulty=int(obj.get("difficulty", len(solution) if solution else 1)),
                data={"solution": solution, "setup": obj.get("setup"), "split": obj.get("split")},
            )
        )
    if not tasks:
        raise TaskFileError(f"{path}: no tasks (the file is empty)")
    return tasks


def answers_match(answer: str, reference: str) -> bool:
    """Numeric comparison when both parse as numbers, else exact after trimming quotes/space."""
    a, r = answer.strip().strip("\"'").strip(), str(reference).strip()
    try:
        fa, fr = float(a), float(r)
    except ValueError:
        return a == r
    if math.isnan(fa) or math.isnan(fr):
        return False
    return abs(fa - fr) <= 1e-6 * max(1.0, abs(fr))


# ---------------------------------------------------------------------------- env
class CodeSandboxEnv(Env):
    """Solve computational tasks with a sandboxed ``python`` tool; submit the number.

    Args:
        steps: Steps per built-in task (the difficulty) when ``min_steps``/``max_steps`` are
            not given.
        min_steps: Fewest steps drawn per episode (default 1).
        max_steps: Most steps drawn per episode (default 3).
        tasks_file: A JSONL file of your own tasks (replaces the built-in generator).
        backend: Sandbox backend: ``auto`` (strongest available), ``docker``, ``bwrap``,
            ``local`` (not a security boundary).
        timeout_s: Per-call time limit of the ``python`` tool.
        memory_mb: Memory limit of the sandbox.
        max_turns: Turn limit; ``None`` gives each episode its difficulty + 2 turns.
        sandbox_options: Extra backend options (``image=`` for docker).
        pool_size: Most started sandboxes kept ready between episodes (shared by every env
            instance of this configuration in the process); 0 gives each episode a fresh one.
        **kwargs: Passed to :class:`agentopd.Env` (``max_output_chars``, ``tool_timeout_s``,
            ``render_mode``).

    ``reset`` options: ``steps`` (this episode's number of steps), plus the base options.
    """

    description = "Compute numbers by running Python in a sandbox (python(code)), then submit."
    system_prompt = SYSTEM_PROMPT

    def __init__(
        self,
        steps: int | None = None,
        min_steps: int | None = None,
        max_steps: int | None = None,
        tasks_file: str | Path | None = None,
        backend: str = "auto",
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        max_turns: int | None = None,
        sandbox_options: dict[str, Any] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        **kwargs: Any,
    ):
        self.min_steps = int(min_steps if min_steps is not None else steps or 1)
        self.max_steps = int(
            max_steps if max_steps is not None else steps or max(3, self.min_steps)
        )
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"
            )
        self.file_tasks = load_tasks_file(tasks_file) if tasks_file is not None else None
        self.backend = resolve_backend(backend)
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.sandbox_options = dict(sandbox_options or {})
        self.pool_size = check_pool_size(pool_size)
        self._auto_max_turns = max_turns is None
        most = max(t.difficulty for t in self.file_tasks) if self.file_tasks else self.max_steps
        kwargs.setdefault("tool_timeout_s", self.timeout_s + 60.0)  # sandbox start-up included
        super().__init__(max_turns=most + 2 if max_turns is None else max_turns, **kwargs)
        self._sandbox: Sandbox | None = None
        self._pool: SandboxPool | None = None
        self._setup_done = False

    # ---------------------------------------------------------------- task
    def new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        want_eval = options.get("split") == "eval"
        if self.file_tasks is not None:
            if want_eval:  # tasks marked eval if there are any, else all of them
                pool = [t for t in self.file_tasks if t.data["split"] == "eval"] or self.file_tasks
            else:  # everything not marked eval
                pool = [t for t in self.file_tasks if t.data["split"] != "eval"] or self.file_tasks
            task = pool[int(rng.integers(len(pool)))]
        else:
            steps = int(options.get("steps", rng.integers(self.min_steps, self.max_steps + 1)))
            if steps < 1:
                raise ValueError(f"options['steps'] must be >= 1, got {steps}")
            while True:
                chain = _draw_chain(rng, steps)
                digest = hashlib.sha256(
                    repr([(op.name, a, b) for op, a, b in chain]).encode()
                ).hexdigest()
                if (int(digest, 16) % EVAL_SHARE == 0) == want_eval:
                    break
            values = chain_values(chain)
            task = Task(
                id=f"{'-'.join(op.name for op, _, _ in chain)}-{digest[:8]}",
                prompt=chain_prompt(chain),
                answer=str(values[-1]),
                difficulty=steps,
                data={"chain": chain, "values": values},
            )
        if self._auto_max_turns:
            self.max_turns = task.difficulty + 2  # read by the base class right after new_task
        return task

    def build_tools(self, task: Task) -> list[Tool]:
        env = self

        @tool
        def python(code: str) -> str:
            """Run Python code in a sandbox and return its output. Variables persist between calls.

            Args:
                code: Python source; use print() to show results.
            """
            return env.run_code(str(code))

        return [python]

    def check_answer(self, task: Task, answer: str) -> bool:
        return answers_match(answer, str(task.answer))

    # ---------------------------------------------------------------- sandbox
    def run_code(self, code: str) -> str:
        """Run ``code`` in this episode's sandbox (started on first use); the tool result text."""
        box = self._box()
        setup = self.task.data.get("setup") if self.task is not None else None
        if setup and not self._setup_done:
            r = box.run(setup, timeout_s=max(self.timeout_s, 30.0))
            if not r.ok:
                return f"Error: the task's setup code failed: {r.to_text()[:500]}"
            self._setup_done = True
        result = box.run(code, timeout_s=self.timeout_s)
        if result.restarted:
            self._setup_done = False
        # Sandbox failures reach the model as the worker's own text and are counted by kind.
        if result.timed_out:
            raise ToolError("timeout", result.to_text())
        if result.crashed:
            raise ToolError("crash", result.to_text())
        return result.to_text()

    def _box(self) -> Sandbox:
        if self._sandbox is None:
            limits = Limits(
                memory_mb=self.memory_mb, max_output_bytes=max(256, self.max_output_chars)
            )
            if self.pool_size:
                self._pool = shared_pool(
                    self.backend, self.pool_size, limits, self.timeout_s, **self.sandbox_options
                )
                self._sandbox = self._pool.acquire()
            else:
                self._sandbox = make_sandbox(
                    self.backend, limits=limits, timeout_s=self.timeout_s, **self.sandbox_options
                )
            self._setup_done = False
        return self._sandbox

    def close_episode(self) -> None:
        box, self._sandbox = getattr(self, "_sandbox", None), None
        pool, self._pool = getattr(self, "_pool", None), None
        if box is not None and pool is not None:
            pool.release(box)  # reset in the background before another episode gets it
        elif box is not None:
            box.stop()

    # ---------------------------------------------------------------- expert
    def expert_action(self, messages: list[Message]) -> str:
        """One cell per step that updates and prints ``x``; then submit the last value.

        It replays the session's history of cells in order: a step counts as done when its own
        cell printed a number while ``x`` could be trusted (nothing else had run since the
        previous step's cell, or the cell restated ``x`` itself). Any other cell makes ``x``
        untrusted, and the next cell restates it, so the expert continues correctly after
        replayed or student turns, crashes and restarts.
        """
        if self.task is None:
            raise RuntimeError("call reset() before expert_action()")
        if "chain" not in self.task.data:
            return self._expert_from_solution(answered_calls(messages, "python", "code"))
        chain = self.task.data["chain"]
        done, x, trusted = 0, None, True  # x stays None until step 1 (which does not read it)
        for code, result in answered_call_log(messages, "python", "code"):
            if done < len(chain):
                op, a, b = chain[done]
                ok = {step_code(op, a, b, x)}
                if trusted:
                    ok.add(step_code(op, a, b))
                value = _last_int(result)
                if code in ok and value is not None:
                    done, x, trusted = done + 1, value, True
                    continue
            trusted = False
        if done == len(chain):
            return self.submit_call(x)
        op, a, b = chain[done]
        return self.call("python", code=step_code(op, a, b, None if trusted else x))

    def _expert_from_solution(self, results: dict[str, str]) -> str:
        assert self.task is not None
        solution = self.task.data.get("solution")
        if not solution:
            return self.submit_call(self.task.answer)
        for code in solution:
            if code not in results or results[code].startswith("Error"):
                return self.call("python", code=code)
        lines = results[solution[-1]].strip().splitlines()
        return self.submit_call(lines[-1].strip() if lines else "")

    def _tool_names_hint(self) -> list[str]:
        return ["python", self.answer_tool or "submit"]


def _last_int(text: str | None) -> int | None:
    if not text:
        return None
    lines = text.strip().splitlines()
    try:
        return int(lines[-1].strip()) if len(lines) == 1 else None
    except ValueError:
        return None
