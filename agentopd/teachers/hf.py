"""In-process transformers teacher (``teacher_backend=hf``).

One batched forward pass to the final hidden states per group of segments; the projection onto
the vocabulary, the top-k, the sampled token's log-prob and the entropy are then computed one
chunk of scored positions at a time (``teacher_cfg.chunk_size``), so the ``[B, T, V]`` logits
are never materialised (at a 151,936-token vocabulary they would be ~20 GB in bf16 for 16 x
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

import torch

from agentopd.logprobs import OutputHead, chunked_token_logprobs, output_head
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
        """One forward pass to final hidden states; the vocabulary projection, top-k and
        entropy then run ``config.chunk_size`` scored positions at a time
        (:func:`agentopd.logprobs.chunked_token_logprobs`), so ``[B, T, V]`` logits never exist."""
        width = max(len(r.tokens) for r in reqs)
        ids = torch.full((len(reqs), width), self.renderer.pad_id, dtype=torch.long)
        attn = torch.zeros((len(reqs), width), dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, : len(r.tokens)] = torch.tensor(r.tokens)
            attn[b, : len(r.tokens)] = 1
        hidden_B_T_H = self.model.base_model(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device)
        ).last_hidden_state
        # The distribution over token t lives at position t - 1 (next-token prediction).
        rows = [(b, p + r.shift - 1) for b, r in enumerate(reqs) for p in r.positions]
        if not rows:
            return [TeacherScores() for _ in reqs]
        b_idx = torch.tensor([b for b, _ in rows], device=hidden_B_T_H.device)
        t_idx = torch.tensor([t for _, t in rows], device=hidden_B_T_H.device)
        target_1_N = torch.tensor(
            [t for r in reqs for t in r.targets()], device=hidden_B_T_H.device
        )[None]
        head = self.model.get_output_embeddings()
        k = min(self.config.topk, head.weight.shape[0])
        scored_N_H = hidden_B_T_H[b_idx, t_idx]
        out = chunked_token_logprobs(
            scored_N_H[None],
            head.weight,
            target_1_N,
            lm_head_bias_V=getattr(head, "bias", None),
            chunk_size=self.config.chunk_size,
            student_topk=k,
            return_entropy=True,
        )
        # student_topk=k >= 1 and return_entropy=True: all three are filled in
        assert out.topk_ids_B_T_K is not None and out.topk_logprobs_B_T_K is not None
        assert out.entropy_B_T is not None
        chosen = out.logprobs_B_T[0].float().cpu().tolist()
        top_ids = out.topk_ids_B_T_K[0].cpu().tolist()
        top_lps = out.topk_logprobs_B_T_K[0].float().cpu().tolist()
        entropy = out.entropy_B_T[0].float().cpu().tolist()
        scores, n = [], 0
        for r in reqs:
            m = len(r.positions)
            scores.append(
                TeacherScores(
                    positions=r.positions,
                    logprobs=chosen[n : n + m],
                    topk_ids=top_ids[n : n + m],
                    topk_logprobs=top_lps[n : n + m],
                    entropy=entropy[n : n + m],
                    hidden_M_H=scored_N_H[n : n + m] if self.keep_hidden else None,
                )
                if m
                else TeacherScores()
            )
            n += m
        return scores
