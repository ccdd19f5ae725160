"""In-process vLLM teacher (``teacher_backend=vllm``; optional extra ``agentopd[vllm]``).

The teacher model is loaded into a vLLM engine of its own and scores the student's exact token
ids by prefill: ``prompt_logprobs=k`` with one generated token, as a vLLM server would
(:mod:`agentopd.teachers.server` does the same over HTTP). Top-k ids, their log-probs and the
sampled token's log-prob come from vLLM; the entropy is the top-k plus tail-bucket estimate of
:func:`agentopd.diagnostics.topk_entropy` (vLLM does not return full distributions).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from agentopd.renderer import Renderer
from agentopd.teachers import TeacherConfig, check_tokenizers, prefill
from agentopd.types import Episode, TeacherScores


def model_dir(name: str) -> Path | str:
    """What vLLM loads for ``name``: a path or a hub id as it is, or a zoo name (preset, base,
    artifact) saved once to a temporary directory in float32 with the zoo tokenizer (shipped
    zoo weights come without a tokenizer)."""
    from agentopd import zoo

    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if zoo.is_hub_id(name):
        return name
    model, tok = zoo.load(name)
    out = Path(tempfile.mkdtemp(prefix="agentopd-teacher-")) / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build(name: str, *, tokenizer: Any, config: TeacherConfig, device: Any) -> VLLMTeacher:
    """The ``vllm`` :class:`~agentopd.teachers.TeacherFactory`."""
    from transformers import AutoTokenizer

    from agentopd.engines.vllm import VLLMEngine, available

    why = available()
    if why is not None:
        from agentopd.teachers import BackendUnavailableError

        raise BackendUnavailableError(f"teacher backend 'vllm' is not available: {why}")
    path = model_dir(name)
    teacher_tok = AutoTokenizer.from_pretrained(str(path))
    check_tokenizers(tokenizer, teacher_tok)
    engine = VLLMEngine(path, max_logprobs=max(20, config.topk), max_batch_size=64)
    return VLLMTeacher(engine, Renderer(teacher_tok), config)


class VLLMTeacher:
    """Scores episodes with :meth:`agentopd.engines.vllm.VLLMEngine.prompt_logprobs`.

    Args:
        engine: A vLLM engine over the teacher model.
        renderer: A renderer over the teacher's tokenizer (re-renders the opening prompt).
        config: Scoring options (``topk``, ``system_prompt``, ``privileged``).
    """

    def __init__(self, engine: Any, renderer: Renderer, config: TeacherConfig | None = None):
        self.engine = engine
        self.renderer = renderer
        self.config = config or TeacherConfig()

    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        """Score every segment; sets ``episode.teacher`` and returns the scores per episode."""
        slots = prefill.empty_slots(episodes)
        reqs = prefill.requests(episodes, self.renderer, self.config)
        k = self.config.topk
        rows = self.engine.prompt_logprobs([r.tokens for r in reqs], k)
        for req, r in zip(reqs, rows, strict=True):
            slots[req.episode][req.segment] = prefill.from_prompt_logprobs(req, r, k)
        return prefill.filled(slots)
