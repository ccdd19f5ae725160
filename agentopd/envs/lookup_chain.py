"""``lookup-chain``: pointer chasing over a seeded key-value store.

Each episode draws a small store whose keys and values are short tokens such as ``k17`` or
``q4``. The prompt names a start key and a number of hops; the agent calls ``lookup(key)``,
looks up the value it got, and so on ``hops`` times, then submits the last value. The expert
needs exactly ``hops + 1`` turns (``hops`` lookups and one ``submit``), so ``hops`` is the
difficulty and a curriculum can grade it with ``min_hops``/``max_hops`` or ``options["hops"]``.

Episodes are a few hundred characters, small enough for a tiny model to learn by SFT on a CPU.

Long horizons (``docs/long_horizon.md``): ``min_hops=8 max_hops=16`` with ``distractors=2``
adds, next to every key of the chain, near-miss keys (one digit changed, or the digits
swapped) that do exist in the store, so a slightly wrong copy no longer gets the telling
``no key`` answer: it silently leads the chain astray, and the error shows only at the end.

Example::

    env = agentopd.make("lookup-chain", hops=3)
    messages, info = env.reset(seed=0)
    messages, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from agentopd.env import Env, Task, answered_calls
from agentopd.tooling import Tool, tool
from agentopd.types import Message

SYSTEM_PROMPT = (
    'Call a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call>. '
    "Tools: lookup(key), submit(answer)."
)
KEY_LETTERS = "abcdefghijklmnopqrstuvwxyz"
KEY_NUMBERS = 100
EVAL_SHARE = 5
"""One task in ``EVAL_SHARE`` belongs to the eval split; the rest to train (disjoint by content)."""


class LookupChainEnv(Env):
    """Follow a chain of keys through a key-value store and submit the final value.

    Args:
        hops: Number of lookups needed (the difficulty), used when ``min_hops``/``max_hops``
            are not given.
        min_hops: Smallest number of hops drawn per episode (default ``hops``).
        max_hops: Largest number of hops drawn per episode (default ``hops``).
        store_size: Number of keys in the store (at least ``max_hops + 1``; raised if needed
            for a per-reset ``options["hops"]``).
        max_turns: Turn limit. ``None`` (default) gives each episode ``hops + 2`` turns: the
            expert's ``hops + 1`` and one to spare. An explicit value applies to every episode.
        distractors: Near-miss keys added to the store per key of the chain (0, the default,
            leaves the store, and so every task, exactly as without it).
        **kwargs: Passed to :class:`agentopd.Env` (``tool_timeout_s``, ``max_output_chars``,
            ``render_mode``).

    ``reset`` options: ``hops`` (this episode's hop count), plus the base options
    (``split``, ``task_index``, ``max_turns``, ``replay``).
    """

    description = "Follow a chain of keys with lookup(key) `hops` times and submit the final value."
    system_prompt = SYSTEM_PROMPT

    def __init__(
        self,
        hops: int = 2,
        min_hops: int | None = None,
        max_hops: int | None = None,
        store_size: int = 24,
        max_turns: int | None = None,
        distractors: int = 0,
        **kwargs: Any,
    ):
        if not 0 <= distractors <= 8:
            raise ValueError(f"distractors must be in 0..8, got {distractors}")
        self.distractors = int(distractors)
        self.min_hops = int(hops if min_hops is None else min_hops)
        self.max_hops = int(max(hops, self.min_hops) if max_hops is None else max_hops)
        if not 1 <= self.min_hops <= self.max_hops:
            raise ValueError(
                f"need 1 <= min_hops <= max_hops, got min_hops={self.min_hops}, "
                f"max_hops={self.max_hops}"
            )
        if store_size < self.max_hops + 1:
            raise ValueError(
                f"store_size={store_size} is too small for {self.max_hops} hops; "
                f"use store_size >= {self.max_hops + 1}"
            )
        if store_size > len(KEY_LETTERS) * KEY_NUMBERS:
            raise ValueError(f"store_size must be <= {len(KEY_LETTERS) * KEY_NUMBERS}")
        self.store_size = int(store_size)
        self._auto_max_turns = max_turns is None
        super().__init__(max_turns=self.max_hops + 2 if max_turns is None else max_turns, **kwargs)

    # ---------------------------------------------------------------- task
    def new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        if "hops" in options:
            hops = int(options["hops"])
            if hops < 1:
                raise ValueError(f"options['hops'] must be >= 1, got {hops}")
        else:
            hops = int(rng.integers(self.min_hops, self.max_hops + 1))
        size = max(self.store_size, hops + 1)
        want_eval = options.get("split") == "eval"
        while True:
            store, chain = _draw_store(rng, size, hops)
            if self.distractors:
                _add_distractors(rng, store, chain, self.distractors)
            digest = _digest(store, chain)
            if (int(digest, 16) % EVAL_SHARE == 0) == want_eval:
                break
        if self._auto_max_turns:
            # The base class reads ``self.max_turns`` after ``new_task``: a per-task horizon.
            self.max_turns = hops + 2
        start = chain[0]
        # Fixed-width keys and wording keep every copy at a fixed offset: tiny models learn it fast.
        # The key is quoted so it tokenizes exactly as inside the tool call's JSON ('"', 'q', '0',
        # '2'); unquoted, the byte-level BPE merges the space into ' q', a different token to copy.
        prompt = f'Start at "{start}". Follow the chain with lookup {hops} times, then submit the final value.'
        return Task(
            id=f"{start}-h{hops}-{digest[:8]}",
            prompt=prompt,
            answer=chain[-1],
            difficulty=hops,
            data={"store": store, "chain": chain, "hops": hops},
        )

    def build_tools(self, task: Task) -> list[Tool]:
        store: dict[str, str] = task.data["store"]

        @tool
        def lookup(key: str) -> str:
            """Return the value stored under a key.

            Args:
                key: The key to look up, e.g. "k17".
            """
            key = str(key).strip()
            if key in store:
                return store[key]
            return f"no key {key[:40]!r}"

        return [lookup]

    def check_answer(self, task: Task, answer: str) -> bool:
        return answer.strip().strip("\"'").strip() == task.answer

    # ---------------------------------------------------------------- expert
    def expert_action(self, messages: list[Message]) -> str:
        """Look up the last value until ``hops`` lookups are done, then submit it.

        The expert reads the values from the tool results in ``messages`` (it never reads the
        store), so it also continues correctly after replayed or student turns.
        """
        if self.task is None:
            raise RuntimeError("call reset() before expert_action()")
        results = {
            k: v.strip()
            for k, v in answered_calls(messages, "lookup", "key").items()
            if not v.strip().startswith(("no key", "Error"))
        }
        current = self.task.data["chain"][0]
        for _ in range(self.task.data["hops"]):
            if current not in results:
                return self.call("lookup", key=current)
            current = results[current]
        return self.submit_call(current)

    def _tool_names_hint(self) -> list[str]:
        return ["lookup", self.answer_tool or "submit"]


def _draw_store(rng: np.random.Generator, size: int, hops: int) -> tuple[dict[str, str], list[str]]:
    """A store of ``size`` keys whose first ``hops + 1`` keys (in draw order) form the chain."""
    codes = rng.choice(len(KEY_LETTERS) * KEY_NUMBERS, size=size, replace=False)
    keys = [f"{KEY_LETTERS[c // KEY_NUMBERS]}{c % KEY_NUMBERS:02d}" for c in codes.tolist()]
    chain = keys[: hops + 1]
    targets = rng.integers(0, size, size=size).tolist()
    store = {k: keys[t] for k, t in zip(keys, targets)}
    for a, b in zip(chain, chain[1:]):
        store[a] = b
    return store, chain


def _add_distractors(
    rng: np.random.Generator, store: dict[str, str], chain: list[str], per_key: int
) -> None:
    """Add up to ``per_key`` near-miss keys of each chain key (never a chain key itself), each
    pointing at a random key of the store, so a miscopied key returns a plausible value."""
    keys = list(store)
    for key in chain[1:]:
        letter, digits = key[0], key[1:]
        near = {f"{letter}{digits[::-1]}"}
        for pos in (0, 1):
            for d in "0123456789":
                near.add(letter + digits[:pos] + d + digits[pos + 1 :])
        candidates = sorted(k for k in near if k not in store)
        picked = rng.choice(len(candidates), size=min(per_key, len(candidates)), replace=False)
        for i in sorted(picked.tolist()):
            store[candidates[i]] = keys[int(rng.integers(len(keys)))]


def _digest(store: dict[str, str], chain: list[str]) -> str:
    text = ";".join(f"{k}={v}" for k, v in sorted(store.items())) + "|" + ",".join(chain)
    return hashlib.sha256(text.encode()).hexdigest()
