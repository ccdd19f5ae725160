"""In-process transformers teacher (``teacher_backend=hf``).

Each group of segments is packed (:func:`agentopd.batch.pack`: several a row, the shared
prompt prefix once) and goes through the one forward pass,
:func:`agentopd.batch.forward_logprobs`: the decoder, then the projection onto the vocabulary,
the top-k, the sampled token's log-prob and the entropy one chunk of scored positions at a time
(``teacher_cfg.chunk_size``) at the scored positions only, so the ``[B, T, V]`` logits are
never materialised (at a 151,936-token vocabulary they would be ~20 GB in bf16 for 16 x
4,096 tokens). The teacher may see its own system prompt or
privileged context: the opening prompt is then re-rendered for the teacher and positions are
realigned so each student token gets the teacher's distribution at that token.

With ``keep_hidden`` set (the builder sets it for training and ``diagnose``), the teacher also
hands over its final hidden states at the scored positions (``TeacherScores.hidden_M_H``,
``[M, H]``: 576 numbers a token for SmolLM2 against a 49,152-token vocabulary) and lends its
output head (:meth:`HFTeacher.output_head`), so the learner can project the teacher's *full*
distribution next to the student's (the full-vocabulary objectives, ``diag/true_rkl``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agentopd.batch import forward_logprobs, pack, packs
from agentopd.logprobs import OutputHead, output_head
from agentopd.renderer import Renderer
from agentopd.teachers import TeacherConfig, check_tokenizers, prefill, teacher_dtype
from agentopd.types import Episode, TeacherScores


def build(name: str, *, tokenizer: Any, config: TeacherConfig, device: Any) -> HFTeacher:
    """The ``hf`` :class:`~agentopd.teachers.TeacherFactory`: load ``name`` (a zoo name or a
    ``save_pretrained`` directory), check its tokenizer against the student's, freeze it."""
    from agentopd import zoo

    model, teacher_tok = zoo.load(name, progress=True)
    check_tokenizers(tokenizer, teacher_tok)
    model.to(device=device, dtype=teacher_dtype(config.dtype, device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return HFTeacher(model, Renderer(teacher_tok), config)


class HFTeacher:
    """Scores episodes with an in-process causal LM.

    Args:
        model: The teacher causal LM.
        renderer: A renderer over the teacher's tokenizer (used to re-render the opening prompt).
        config: Scoring options.
        keep_hidden: Also return the final hidden states at the scored positions
            (``TeacherScores.hidden_M_H``), for the learner's full-vocabulary projection.
    """

    def __init__(
        self,
        model: Any,
        renderer: Renderer,
        config: TeacherConfig | None = None,
        *,
        keep_hidden: bool = False,
    ):
        self.model = model
        self.renderer = renderer
        self.config = config or TeacherConfig()
        self.keep_hidden = keep_hidden

    def output_head(self) -> OutputHead:
        """The teacher's output head (frozen weights), to project ``hidden_M_H`` with."""
        return output_head(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def teacher_prompt(self, episode: Episode) -> list[int] | None:
        """Re-rendered opening prompt for the teacher, or None to use the student's tokens."""
        return prefill.teacher_prompt(self.renderer, self.config, episode)

    @torch.no_grad()
    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        """Score every segment; sets ``episode.teacher`` and returns the scores per episode."""
        slots = prefill.empty_slots(episodes)
        reqs = prefill.requests(episodes, self.renderer, self.config)
        bs = max(1, self.config.batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(reqs), bs):
                batch = reqs[i : i + bs]
                for req, sc in zip(batch, self._score_batch(batch), strict=True):
                    slots[req.episode][req.segment] = sc
        finally:
            if was_training:
                self.model.train()
        return prefill.filled(slots)

    def _score_batch(self, reqs: list[prefill.Request]) -> list[TeacherScores]:
        """The requests packed into one :class:`~agentopd.batch.TokenBatch` (shared prompt
        prefix once), one :func:`~agentopd.batch.forward_logprobs` pass: the vocabulary
        projection, top-k and entropy at the scored positions only, ``config.chunk_size`` at a
        time, so ``[B, T, V]`` logits never exist."""
        masks = []
        for r in reqs:
            # The distribution over token t lives at position t - 1 (next-token prediction).
            at = [p + r.shift for p in r.positions]
            if any(t < 1 for t in at):
                raise ValueError("a scored token at position 0 has no prediction to score it")
            mask = [0] * len(r.tokens)
            for t in at:
                mask[t] = 1
            masks.append(mask)
        if not any(r.positions for r in reqs):
            return [TeacherScores() for _ in reqs]
        tb = pack(
            [r.tokens for r in reqs], masks, pad_id=self.renderer.pad_id, packed=packs(self.model)
        )
        k = min(self.config.topk, self.model.get_output_embeddings().weight.shape[0])
        out, scored_N_H = forward_logprobs(
            self.model, tb.to(self.device), topk=k, entropy=True, chunk_size=self.config.chunk_size
        )
        # topk=k >= 1 and entropy=True: all three are filled in
        assert out.topk_ids_B_T_K is not None and out.topk_logprobs_B_T_K is not None
        assert out.entropy_B_T is not None
        # One copy to the host per field; each segment's scores are views of it.
        chosen_M = out.logprobs_B_T[0].float().cpu().numpy()
        top_ids_M_K = out.topk_ids_B_T_K[0].cpu().numpy()
        top_lps_M_K = out.topk_logprobs_B_T_K[0].float().cpu().numpy()
        entropy_M = out.entropy_B_T[0].float().cpu().numpy()
        scores, n = [], 0
        for r in reqs:
            m = len(r.positions)
            scores.append(
                TeacherScores(
                    positions_M=np.asarray(r.positions),
                    logprobs_M=chosen_M[n : n + m],
                    topk_ids_M_K=top_ids_M_K[n : n + m],
                    topk_logprobs_M_K=top_lps_M_K[n : n + m],
                    entropy_M=entropy_M[n : n + m],
                    hidden_M_H=scored_N_H[n : n + m] if self.keep_hidden else None,
                )
                if m
                else TeacherScores()
            )
            n += m
        return scores
