"""Transformers generation engine: all active episodes of a step in one batched ``generate`` call.

Prompts are left-padded; the KV cache, temperature and top-p come from ``transformers``. The
logprob stored per sampled token is the log-probability under the distribution actually sampled
from (after temperature / top-p). Only that one number per sequence is kept at each decoding step:
the step's ``[B, V]`` scores are released as soon as it is read (:class:`_SampledLogprobs`), so
generation holds no ``[B, N, V]`` stack however long the turn or large the vocabulary. With the learner's model passed in, ``load_weights`` is a no-op:
engine and learner share parameters.

With ``dtype=torch.bfloat16`` (``engine_cfg.dtype=bfloat16``) the engine generates with a
bfloat16 copy of the model instead (plain weights, LoRA adapters merged), refreshed by every
``load_weights``: decoding a small model on a CPU is bound by reading the weights, so half the
bytes is close to twice the tokens per second. The learner still computes its own float32
log-probs; only the sampler's precision changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from agentopd.engines import EngineConfig, Sample, SamplingParams

if TYPE_CHECKING:
    from agentopd.renderer import Renderer


class _SampledLogprobs(StoppingCriteria):
    """A ``transformers`` stopping criterion that never stops: after each decoding step it reads
    the log-probability of the token just chosen under that step's processed scores (the
    distribution sampled from), keeps it (``[B]``), and frees the step's ``[B, V]`` scores."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        step = scores[-1]
        logp_B_V = torch.log_softmax(step.float(), dim=-1)
        self.steps.append(logp_B_V.gather(-1, input_ids[:, -1:].to(step.device)).squeeze(-1))
        del logp_B_V
        step.set_()  # release the storage the generate loop would keep until it returns
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """Batched generation with a ``transformers`` causal LM.

    Args:
        model: A causal LM (``AutoModelForCausalLM``).
        eot_id: End-of-turn token id (generation stops there).
        pad_id: Padding token id.
        max_batch_size: Split larger batches into chunks of this size.
    """

    def __init__(
        self,
        model: Any,
        eot_id: int,
        pad_id: int,
        max_batch_size: int = 64,
        dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.generator_seed: int | None = None
        own = next(model.parameters()).dtype
        self.copy = dtype is not None and dtype != own
        """Whether generation runs on a copy of the model in ``dtype``."""
        self.gen_model = _plain_copy(model, dtype) if dtype is not None and self.copy else model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, state_dict: dict[str, Any]) -> None:
        if self.copy:
            self.gen_model.load_state_dict(state_dict)
            return
        own = self.model.state_dict()
        if all(own[k].data_ptr() == v.data_ptr() for k, v in state_dict.items() if k in own):
            return
        self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out: list[Sample] = []
        for i in range(0, len(prompts), self.max_batch_size):
            out.extend(self._generate(prompts[i : i + self.max_batch_size], params))
        return out

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if not prompts:
            return []
        model = self.gen_model
        was_training = model.training
        model.eval()
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[b, width - len(p) :] = 1
        greedy = params.temperature <= 0
        record = _SampledLogprobs()
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": not greedy,
            "eos_token_id": self.eot_id,
            "pad_token_id": self.pad_id,
            "output_scores": True,
            "return_dict_in_generate": True,
            "stopping_criteria": StoppingCriteriaList([record]),
        }
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        gen = model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), **kwargs
        )
        if was_training:
            model.train()
        new_B_N = gen.sequences[:, width:].cpu()
        chosen_B_N = torch.stack(record.steps, dim=1).cpu()
        samples = []
        for b in range(len(prompts)):
            toks = new_B_N[b].tolist()
            n = len(toks)
            finished = False
            if self.eot_id in toks:
                n = toks.index(self.eot_id) + 1
                finished = True
            samples.append(
                Sample(
                    tokens=toks[:n],
                    logprobs=[float(x) for x in chosen_B_N[b, :n]],
                    finished=finished,
                )
            )
        return samples


def _plain_copy(model: Any, dtype: torch.dtype) -> Any:
    """A plain transformers model of ``model``'s architecture in ``dtype``, holding its weights
    (LoRA adapters merged)."""
    from transformers import AutoModelForCausalLM

    from agentopd import lora

    copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    copy.load_state_dict(lora.engine_weights(model))
    copy.generation_config = model.generation_config
    return copy.to(next(model.parameters()).device).eval()


def build(
    model: Any,
    *,
    renderer: Renderer,
    workdir: str | Path | None = None,
    config: EngineConfig | None = None,
) -> HFEngine:
    """The ``hf`` :class:`~agentopd.engines.EngineFactory`: shares the learner's parameters
    (no weight push needed), or with ``engine_cfg.dtype=bfloat16`` generates with a bfloat16
    copy that every ``load_weights`` refreshes; ``auto`` and ``float32`` share."""
    dtype = torch.bfloat16 if config is not None and config.dtype == "bfloat16" else None
    return HFEngine(model, renderer.eot_id, renderer.pad_id, dtype=dtype)
