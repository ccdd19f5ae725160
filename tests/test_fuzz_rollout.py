"""Fuzz of the rollout path (issue 14): random assistant turns through ``env.step`` -> renderer ->
``Episode`` JSON round trip on each built-in env, with zero escaped exceptions.

Turns mix arbitrary text, near-miss markup, special-token strings, lone surrogates, deep JSON,
huge numbers and well-formed calls to the env's own tools (with random arguments; for
``code-sandbox`` random Python that prints, raises, loops or forges). Every episode is played
by :func:`agentopd.rollout.scripted_episode`, the rollout loop itself, so an exception anywhere
would end it as ``env_error``: the test requires that no episode does, and that its JSON line
reads back to the same line. At least 10,000 turns in total (counted, and checked at the end).

Fast path: one env instance per built-in env for the whole module; ``code-sandbox`` runs on the
``local`` backend (the cheapest to start) and keeps its sandbox between episodes (its
``close_episode`` is skipped until the module ends), so most examples pay no sandbox start.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentopd import make
from agentopd.env import Env
from agentopd.parsing import format_tool_call
from agentopd.renderer import Renderer
from agentopd.rollout import scripted_episode
from agentopd.types import Episode, StopReason
from agentopd.zoo.tokenizer import SPECIAL_TOKENS, load_tokenizer

EXAMPLES = {"lookup-chain": 560, "sql": 560, "code-sandbox": 230}
"""Episodes per env, of 1 to ``TURNS_PER_EPISODE`` turns (every turn but the last keeps the
episode going)."""
TURNS_PER_EPISODE = 12
MIN_TURNS = {"lookup-chain": 4200, "sql": 4200, "code-sandbox": 1600}
"""Turns each env must have played (10,000 in all): Hypothesis's draws are topped up with
seeded random episodes until they are reached, so the total never depends on its choices."""
TURNS: Counter[str] = Counter()

NEAR_MISSES = ["<TOOL_CALL>", "＜tool_call＞", "<tool\u200b_call>", "<tool-call>", "</ tool_call>"]
ODD = [
    "\ud800",
    "\udcff",
    "\udfff\ud800",
    "\x00",
    "\u2028",
    "\x85",
    "\ue000",
    "\ue001",
    "1e999",
    "-1e999",
    "9" * 5000,
    "NaN",
    '{"__float__": "NaN"}',
    '{"__deep__": [["=", 1]]}',
]
CODE = [
    "print(1)",
    "raise ValueError('\\ud800')",
    "print('<|im_end|>\\n<|im_start|>assistant\\n')",
    "import sys; sys.stdout.write('\\udcff')",
    "x = [0] * 10; x",
    "import os; os.write(1, bytes(range(256)))",
    "while True: pass",
    "import threading; threading.Thread(target=lambda: None).start()",
    "1/0",
    "print('x' * 5000)",
]

ALPHABET = 'ab <>/{}[]":,_-|\n\t0123456789' + "".join(SPECIAL_TOKENS) + "éß€😀\u200b\ufeff"


def random_text(r: random.Random, n: int = 40) -> str:
    return "".join(r.choice(ALPHABET) for _ in range(r.randint(0, n)))


def random_json(r: random.Random, depth: int = 0) -> Any:
    k = r.randint(0, 9 if depth < 3 else 5)
    if k <= 5:
        return [None, True, r.randint(-(10**20), 10**20), r.random() * 1e300, random_text(r, 12),
                r.choice(ODD), float("inf"), float("nan")][k if k < 5 else r.randint(5, 7)]  # fmt: skip
    if k <= 7:
        return [random_json(r, depth + 1) for _ in range(r.randint(0, 3))]
    return {random_text(r, 8): random_json(r, depth + 1) for _ in range(r.randint(0, 3))}


def random_call(r: random.Random, names: list[str]) -> str:
    name = r.choice(names)
    if name == "python":
        code = r.choice(CODE) if r.random() < 0.7 else f"print({random_text(r)!r})"
        return format_tool_call(name, {"code": code})
    keys = ["answer", "key", "query", "sql", "code", "x"]
    args = {r.choice(keys): random_json(r) for _ in range(r.randint(0, 2))}
    try:
        return format_tool_call(name, args)
    except ValueError:  # a number JSON cannot write
        return format_tool_call(name, {"x": repr(args)})


def continuing_piece(r: random.Random, names: list[str]) -> str:
    """A piece after which the episode goes on: a broken or near-miss tag, or a non-final call."""
    k = r.randint(0, 5)
    if k == 0:
        return r.choice(NEAR_MISSES) + '{"name": "submit", "arguments": {"answer": "1"}}'
    if k == 1:
        d = r.randint(1, 1200)
        return '<tool_call>{"name": "submit", "arguments": {"answer": ' + "[" * d + "]" * d + "}}"
    if k == 2:
        return "<tool_call>" + json.dumps(random_json(r), default=str) + "</tool_call>"
    if k == 3:
        return "<tool_call>" + random_text(r) + "</tool_call>"
    return random_call(r, [n for n in names if n != "submit"])


def random_turn(r: random.Random, names: list[str], final: bool) -> str:
    """1-4 pieces; unless ``final``, at least one keeps the episode going (and none submits)."""
    if not final:
        names = [n for n in names if n != "submit"]
    pieces = []
    for _ in range(r.randint(0, 3)):
        k = r.randint(0, 4)
        pieces.append(
            random_text(r) if k == 0 else r.choice(ODD) if k == 1 else r.choice(SPECIAL_TOKENS)
            if k == 2 else random_call(r, names)
        )  # fmt: skip
    if not final or not pieces:
        pieces.insert(r.randint(0, len(pieces)), continuing_piece(r, names))
    return "".join(pieces)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(load_tokenizer())


@pytest.fixture(scope="module")
def envs() -> Iterator[dict[str, Env]]:
    built = {
        "lookup-chain": make("lookup-chain"),
        "sql": make("sql"),
        "code-sandbox": make("code-sandbox", backend="local", timeout_s=0.5),
    }
    box_env = built["code-sandbox"]
    close_episode = box_env.close_episode
    box_env.close_episode = lambda: None  # type: ignore[method-assign]  # keep the sandbox
    for env in built.values():
        env.reset(seed=0)  # builds the toolset the strategies read
    yield built
    box_env.close_episode = close_episode  # type: ignore[method-assign]
    for env in built.values():
        env.close()


def play(env_name: str, env: Env, renderer: Renderer, seed: int, turns: list[str]) -> None:
    ep = scripted_episode(env, renderer, seed, turns, options={"max_turns": len(turns) + 1})
    assert ep.stop_reason != StopReason.ENV_ERROR, ep.info.get("error")
    line = ep.to_json()
    assert Episode.from_json(line).to_json() == line
    TURNS[env_name] += len(ep.turns)


@pytest.mark.slow
@pytest.mark.parametrize("env_name", list(EXAMPLES))
def test_random_turns_never_escape(env_name: str, envs: dict[str, Env], renderer: Renderer) -> None:
    env = envs[env_name]
    names = sorted({*env.toolset.names, "no_such_tool"})

    @settings(max_examples=EXAMPLES[env_name], deadline=None, database=None)
    @given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, TURNS_PER_EPISODE))
    def run(seed: int, n: int) -> None:
        # Hypothesis draws the seed and the length; the turns are expanded from the seed
        # (cheap to draw, and a failing example is reproduced by its seed).
        r = random.Random(seed)
        turns = [random_turn(r, names, final=i == n - 1) for i in range(n)]
        play(env_name, env, renderer, seed, turns)

    run()
    top_up = random.Random(f"top-up-{env_name}")
    while TURNS[env_name] < MIN_TURNS[env_name]:
        seed = top_up.randrange(2**31)
        r = random.Random(seed)
        turns = [
            random_turn(r, names, final=i == TURNS_PER_EPISODE - 1)
            for i in range(TURNS_PER_EPISODE)
        ]
        play(env_name, env, renderer, seed, turns)
    assert TURNS[env_name] >= MIN_TURNS[env_name], TURNS


def test_at_least_ten_thousand_turns_in_total() -> None:
    if len(TURNS) < len(EXAMPLES):
        pytest.fail(f"run the whole module: only {dict(TURNS)} were played")
    assert sum(TURNS.values()) >= 10_000, TURNS
