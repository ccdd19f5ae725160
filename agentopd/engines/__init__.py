"""Generation backends: the :class:`Engine` protocol, ``hf`` (transformers) and ``vllm`` (optional).

Backends are registered in ``agentopd.registry.engines`` (entry-point group ``agentopd.engines``)
and chosen with ``engine=<name>``; each entry point is an :class:`EngineFactory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from agentopd.schema import knob

ENGINE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class EngineConfig:
    """Rollout-engine settings (the ``engine_cfg.*`` keys). ``hf`` reads ``dtype`` only (it
    shares the learner's model unless ``dtype=bfloat16``); ``vllm`` reads all of them."""

    dtype: str = knob(
        "auto",
        "weights and activations of generation: auto (vllm: float32 on CPU, bfloat16 on CUDA; "
        "hf: the learner's model itself), float32, bfloat16 (hf: a bfloat16 copy refreshed "
        "after every update, ~2x faster decoding on CPU)",
        choices=ENGINE_DTYPES,
    )
    gpu_memory_utilization: float = knob(
        0.3,
        "vllm on CUDA: share of the GPU for its weights and KV cache (the learner and an "
        "in-process teacher need the rest)",
        gt=0,
        le=1,
    )
    max_model_len: int = knob(
        0,
        "vllm: longest prompt plus turn, in tokens (0: the model's context length, at most "
        "32768); bounds the KV cache",
        ge=0,
    )
    kv_cache_gib: int = knob(
        1, "vllm on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless already set)", ge=1
    )


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
    ``renderer`` gives the end-of-turn and padding ids, ``workdir`` is a directory the
    engine may use (e.g. to save weights for an out-of-process server), and ``config`` holds
    the ``engine_cfg.*`` settings (an :class:`EngineConfig`). Raise :class:`ImportError` with the
    ``pip install`` line when a needed package is missing.

    Example::

        def build(model, *, renderer, workdir, config):
            return MyEngine(model, eot_id=renderer.eot_id)

        # pyproject.toml: [project.entry-points."agentopd.engines"] my-engine = "my_pkg:build"
    """

    def __call__(
        self, model: Any, *, renderer: Any, workdir: Any, config: EngineConfig
    ) -> Engine: ...
