"""Generation backends: the :class:`Engine` protocol, ``hf`` (transformers) and ``vllm`` (optional).

Backends are registered in ``agentopd.registry.engines`` (entry-point group ``agentopd.engines``)
and chosen with ``engine=<name>``; each entry point is an :class:`EngineFactory`.
"""

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


class EngineFactory(Protocol):
    """Builds a rollout engine around the student being trained.

    ``model`` is the learner's model (an in-process engine may share its parameters),
    ``renderer`` gives the end-of-turn and padding ids, and ``workdir`` is a directory the
    engine may use (e.g. to save weights for an out-of-process server). Raise
    :class:`ImportError` with the ``pip install`` line when a needed package is missing.

    Example::

        def build(model, *, renderer, workdir):
            return MyEngine(model, eot_id=renderer.eot_id)

        # pyproject.toml: [project.entry-points."agentopd.engines"] my-engine = "my_pkg:build"
    """

    def __call__(self, model: Any, *, renderer: Any, workdir: Any) -> Engine: ...
