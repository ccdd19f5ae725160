"""``env=skyrl-gym:<env_id>``: a SkyRL-gym text env as an ``agentopd.Env``, over a task file.

A SkyRL-gym env is built per task: ``skyrl_gym.make(env_id, env_config=..., extras=row)`` where
the row comes from a SkyRL-format data set (``prompt``: chat messages, ``reward_spec``:
``{"method": ..., "ground_truth": ...}``, ``extra_info``). ``init(prompt)`` gives the opening
conversation and ``step(text)`` a dict of new ``observations``, ``reward``, ``done`` and
``metadata``. The student's turn is the action as it is; observations become user messages
(SkyRL's own roles are kept for ``system``/``user``; any other role is shown as ``user``).

Tasks: ``tasks`` is a JSON-lines (or JSON list) file of such rows, or the list itself;
``eval_tasks`` the held-out rows for ``split="eval"`` (without it, eval draws from ``tasks``, with a
warning). ``task_index`` picks a row; otherwise the seed draws one. ``max_turns`` is handed over as
``extras["max_turns"]`` (the SkyRL convention the multi-turn envs read) and enforced here.

SkyRL reports only ``done``: an episode its env ends is "terminated", even when the env ended it
for reaching its own turn limit.

Example::

    env = agentopd.make("skyrl-gym:gsm8k_multi_turn", tasks="gsm8k_rows.jsonl", max_turns=3)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from agentopd.envs.adapters.base import (
    ForeignEnv,
    ForeignStart,
    ForeignStep,
    require,
    unknown_id,
    warn_once,
)
from agentopd.types import Message

SYNTAX = "skyrl-gym:<env_id> with env_kwargs.tasks=<file.jsonl>"


def load_tasks(source: str | Path | list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows of a SkyRL-format task set from a JSONL/JSON file or a list.

    Raises:
        ValueError: no rows, or a row without a ``prompt`` list of messages.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"{key}={source!r}: no such file (expected JSON lines of SkyRL task rows)"
            )
        text = path.read_text()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    else:
        rows = [dict(r) for r in source]
    if not rows:
        raise ValueError(f"{key}: no task rows")
    for i, row in enumerate(rows):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
            raise ValueError(
                f"{key} row {i}: expected a 'prompt' list of chat messages "
                f"({{'role': ..., 'content': ...}}), got {str(prompt)[:120]!r}"
            )
    return rows


class SkyRLGymEnv(ForeignEnv):
    """A SkyRL-gym text env behind the agentopd contract (see the module docstring).

    Args:
        env_id: SkyRL-gym registry id (``gsm8k``, ``gsm8k_multi_turn``, ``text2sql``, ...).
        tasks: Training rows: a JSONL/JSON file path or a list of dicts.
        eval_tasks: Held-out rows (same forms), used for ``split="eval"``.
        env_config: The ``env_config`` passed to ``skyrl_gym.make``.
        **kwargs: :class:`~agentopd.envs.adapters.base.ForeignEnv` arguments (``max_turns``, ...).
    """

    framework = "SkyRL-gym"
    prefix = "skyrl-gym"
    description = "A SkyRL-gym text env over a SkyRL-format task file."

    def __init__(
        self,
        env_id: str,
        *,
        tasks: str | list[dict[str, Any]] | None = None,
        eval_tasks: str | list[dict[str, Any]] | None = None,
        env_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self._skyrl = require("skyrl_gym", package="skyrl-gym", extra="skyrl")
        valid = sorted(self._skyrl.registry)
        if env_id not in valid:
            raise unknown_id("SkyRL-gym", env_id, valid, SYNTAX)
        if tasks is None:
            raise TypeError(
                f"skyrl-gym:{env_id} needs env_kwargs.tasks: a JSONL file of SkyRL task rows "
                "(prompt, reward_spec, extra_info); SkyRL-gym envs ship no tasks of their own"
            )
        self.tasks = load_tasks(tasks, "tasks")
        self.eval_tasks = load_tasks(eval_tasks, "eval_tasks") if eval_tasks is not None else None
        self.env_config = dict(env_config or {})
        self._env: Any = None
        super().__init__(env_id, **kwargs)

    def foreign_reset(
        self, seed: int, index: int | None, split: str, max_turns: int
    ) -> ForeignStart:
        self._close_inner()
        rows = self.tasks
        if split == "eval":
            if self.eval_tasks is None:
                warn_once(
                    self.spec_name,
                    "eval_tasks",
                    f"{self.spec_name}: no eval_tasks given, so split='eval' draws from the "
                    "training tasks (not held out)",
                )
            else:
                rows = self.eval_tasks
        i = (
            index % len(rows)
            if index is not None
            else int(np.random.default_rng(seed).integers(len(rows)))
        )
        row = rows[i]
        extras = {
            "reward_spec": row.get("reward_spec", {}),
            "extra_info": row.get("extra_info", {}) or {},
            "max_turns": int(max_turns),
            **{k: v for k, v in row.items() if k not in ("prompt", "reward_spec", "extra_info")},
        }
        self._env = self._skyrl.make(self.env_id, env_config=self.env_config, extras=extras)
        conversation, metadata = self._env.init([dict(m) for m in row["prompt"]])
        messages = [_message(m) for m in conversation]
        return ForeignStart(messages, task_id=f"{split}/{i}", info=dict(metadata or {}))

    def foreign_step(self, action: str) -> ForeignStep:
        out = self._env.step(action)
        messages = [_message(m) for m in out.get("observations") or []]
        metadata = dict(out.get("metadata") or {})
        return ForeignStep(
            messages, float(out.get("reward") or 0.0), bool(out.get("done")), False, metadata
        )

    def foreign_close(self) -> None:
        self._close_inner()

    def _close_inner(self) -> None:
        if self._env is not None:
            env, self._env = self._env, None
            env.close()


def _message(m: dict[str, Any]) -> Message:
    role = m.get("role", "user")
    return Message(
        role=role if role in ("system", "user") else "user", content=str(m.get("content", ""))
    )


def make(env_id: str, **kwargs: Any) -> SkyRLGymEnv:
    """Factory behind the ``skyrl-gym:`` prefix."""
    return SkyRLGymEnv(env_id, **kwargs)
