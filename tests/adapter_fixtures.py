"""Foreign envs built the way their frameworks' docs build them, for tests/test_adapters.py.

Importable as ``adapter_fixtures`` (the tests put ``tests/`` on ``PYTHONPATH`` for subprocesses).
"""

from __future__ import annotations

import random
from typing import Any

from fastmcp import FastMCP
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.mcp_environment import MCPEnvironment
from openenv.core.env_server.mcp_types import CallToolAction
from openenv.core.env_server.types import Action, Observation, State

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime"]


class WordAction(Action):
    """The agent's reply."""

    message: str


class WordObservation(Observation):
    text: str = ""


class ReverseWordEnvironment(Environment):
    """OpenEnv env with a one-string action: reverse a word (reward 1 when right)."""

    def __init__(self, explode_at: int = 0):
        super().__init__()
        self.explode_at = explode_at
        self._state = State()
        self.word = WORDS[0]

    def reset(
        self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any
    ) -> WordObservation:
        self.word = random.Random(seed).choice(WORDS)
        self._state = State(episode_id=episode_id, step_count=0)
        return WordObservation(text=f"Write the word {self.word!r} backwards.")

    def step(
        self, action: WordAction, timeout_s: float | None = None, **kwargs: Any
    ) -> WordObservation:
        self._state.step_count += 1
        if self.explode_at and self._state.step_count >= self.explode_at:
            raise RuntimeError("the foreign env crashed")
        if action.message.strip() == self.word[::-1]:
            return WordObservation(text="Correct.", done=True, reward=1.0)
        return WordObservation(text="Not quite, try again.", reward=0.0)

    @property
    def state(self) -> State:
        return self._state


class GuessAction(Action):
    """Guess the secret number."""

    guess: int
    note: str = ""


class GuessObservation(Observation):
    feedback: str = ""
    turn: int = 0


class GuessNumberEnvironment(Environment):
    """OpenEnv env with a structured action: guess a number in 1..8 from higher/lower hints."""

    def __init__(self):
        super().__init__()
        self._state = State()
        self.secret = 1

    def reset(
        self, seed: int | None = None, episode_id: str | None = None, task_index: int | None = None
    ) -> GuessObservation:
        self.secret = (
            (task_index % 8 + 1) if task_index is not None else random.Random(seed).randint(1, 8)
        )
        self._state = State(episode_id=episode_id, step_count=0)
        return GuessObservation(feedback="Guess the number between 1 and 8.")

    def step(
        self, action: GuessAction, timeout_s: float | None = None, **kwargs: Any
    ) -> GuessObservation:
        self._state.step_count += 1
        n = self._state.step_count
        if action.guess == self.secret:
            return GuessObservation(feedback="Correct!", turn=n, done=True, reward=1.0)
        hint = "higher" if action.guess < self.secret else "lower"
        return GuessObservation(feedback=f"{hint} than {action.guess}", turn=n, reward=0.0)

    @property
    def state(self) -> State:
        return self._state


GSM8K_ROWS = [
    {
        "prompt": [{"role": "user", "content": f"What is {a} plus {b}? End with '#### ANSWER'."}],
        "reward_spec": {"method": "rule", "ground_truth": str(a + b)},
        "extra_info": {},
    }
    for a, b in [(2, 3), (4, 4), (7, 1), (5, 6), (9, 2), (3, 8)]
]
"""SkyRL-format rows, the shape SkyRL-gym's gsm8k data sets have."""


class VaultEnvironment(MCPEnvironment):
    """OpenEnv MCP env (an ``MCPEnvironment`` over a FastMCP server, as OpenEnv's docs build one).

    Four shelves hold notes; one names the secret word. ``read_shelf(shelf)`` reads a note,
    ``submit(word)`` ends the episode with reward 1 when the word is right. A shelf outside 0..3
    makes the tool raise.
    """

    def __init__(self) -> None:
        mcp = FastMCP("vault")
        self.word = WORDS[0]
        self.shelf = 0

        @mcp.tool()
        def read_shelf(shelf: int) -> str:
            """Read the note on a shelf (0 to 3)."""
            if not 0 <= shelf <= 3:
                raise ValueError(f"there is no shelf {shelf}; shelves are 0 to 3")
            return f"The secret word is {self.word!r}." if shelf == self.shelf else "Empty shelf."

        @mcp.tool()
        def submit(word: str) -> str:
            """Submit the secret word (ends the episode)."""
            return "Correct." if word == self.word else "Wrong."

        super().__init__(mcp)
        self._state = State()

    def reset(
        self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any
    ) -> Observation:
        rng = random.Random(seed)
        self.word, self.shelf = rng.choice(WORDS), rng.randrange(4)
        self._state = State(episode_id=episode_id, step_count=0)
        return WordObservation(text="Find the secret word on one of the shelves 0-3 and submit it.")

    def step(self, action: Action, timeout_s: float | None = None, **kwargs: Any) -> Observation:
        self._state.step_count += 1
        obs = super().step(action, timeout_s=timeout_s, **kwargs)
        if isinstance(action, CallToolAction) and action.tool_name == "submit":
            obs.done = True
            obs.reward = 1.0 if action.arguments.get("word") == self.word else 0.0
        return obs

    def _step_impl(self, action: Action, timeout_s: float | None = None, **kwargs: Any) -> Observation:
        return WordObservation(text="This env acts through its MCP tools only.")

    @property
    def state(self) -> State:
        return self._state
