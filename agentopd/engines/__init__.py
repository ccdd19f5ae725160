"""Generation backends: the :class:`Engine` protocol, ``hf`` (transformers) and ``vllm`` (optional)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class SamplingParams:
    """How to sample one batch of turns."""

    max_new_tokens: int = 128
    """Generation limit per turn."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int | None = None
    """Seed for this call (None: continue the engine's generator)."""


@dataclass
class Sample:
    """One generated turn."""

    tokens: list[int] = field(default_factory=list)
    """Sampled token ids (the end-of-turn token included when it was sampled)."""
    logprobs: list[float] = field(default_factory=list)
    """Log-probability of each sampled token under the sampling distribution."""
    finished: bool = False
    """True when the end-of-turn token was sampled (False: the length limit cut the turn)."""


class Engine(Protocol):
    """Generates next turns from token prompts.

    Example::

        engine = HFEngine(model, tokenizer)
        samples = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=32))
        engine.load_weights(model.state_dict())
    """

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """Generate one turn per prompt, stopping at the end-of-turn token."""
        ...

    def load_weights(self, state_dict: dict[str, Any]) -> None:
        """Make the engine sample from new weights."""
        ...
