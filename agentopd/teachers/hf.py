"""In-process transformers teacher (``teacher_backend=hf``).

One batched forward pass per group of segments; at each scored position only the rows that are
needed are turned into log-probabilities. The teacher may see its own system prompt or
privileged context: the opening prompt is then re-rendered for the teacher and positions are
realigned so each student token gets the teacher's distribution at that token.
"""

from __future__ import annotations

from typing import Any

import torch

from agentopd.renderer import Renderer
from agentopd.teachers import TeacherConfig, check_tokenizers
from agentopd.types import Episode, Message, TeacherScores


def build(name: str, *, tokenizer: Any, config: TeacherConfig, device: Any) -> HFTeacher:
    """The ``hf`` :class:`~agentopd.teachers.TeacherFactory`: load ``name`` (a zoo name or a
    ``save_pretrained`` directory), check its tokenizer against the student's, freeze it."""
    from agentopd import zoo

    model, teacher_tok = zoo.load(name, progress=True)
    check_tokenizers(tokenizer, teacher_tok)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return HFTeacher(model, Renderer(teacher_tok), config)


class HFTeacher:
    """Scores episodes with an in-process causal LM.

    Args:
        model: The teacher causal LM.
        renderer: A renderer over the teacher's tokenizer (used to re-render the opening prompt).
        config: Scoring options.
    """

    def __init__(self, model: Any, renderer: Renderer, config: TeacherConfig | None = None):
        self.model = model
        self.renderer = renderer
        self.config = config or TeacherConfig()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def teacher_prompt(self, episode: Episode) -> list[int] | None:
        """Re-rendered opening prompt for the teacher, or None to use the student's tokens."""
        cfg = self.config
        if cfg.system_prompt is None and not cfg.privileged:
            return None
        n = episode.n_prompt_messages
        if n <= 0:
            raise ValueError(
                "episode has no n_prompt_messages; it was not produced by agentopd.rollout"
            )
        msgs = [Message(**vars(m)) for m in episode.messages[:n]]
        system = cfg.system_prompt
        if msgs and msgs[0].role == "system":
            base = msgs[0].content if system is None else system
            msgs = msgs[1:]
        else:
            base = system or ""
        if cfg.privileged:
            base = (base + "\n" + episode.privileged_context).strip()
        msgs = [Message(role="system", content=base), *msgs]
        tokens, _ = self.renderer.initial_prompt(msgs, episode.tools)
        return tokens

    @torch.no_grad()
    def full_logprobs(self, tokens: list[int]) -> torch.Tensor:
        """The teacher's full next-token distribution at every position: ``[T, V]`` log-probs.

        Row ``t`` is the distribution over token ``t + 1``. In-process only (large: T x V floats).
        """
        ids = torch.tensor([tokens], device=self.device)
        return torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)

    @torch.no_grad()
    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        """Score every segment; sets ``episode.teacher`` and returns the scores per episode."""
        items = []
        for ep in episodes:
            ep.teacher = [None] * len(ep.segments)  # type: ignore[list-item]
            prompt = self.teacher_prompt(ep)
            for s, seg in enumerate(ep.segments):
                positions = [t for t, m in enumerate(seg.mask) if m]
                if s == 0 and prompt is not None:
                    tokens = prompt + seg.tokens[seg.prompt_len :]
                    shift = len(prompt) - seg.prompt_len
                else:
                    tokens, shift = seg.tokens, 0
                items.append((ep, s, tokens, positions, shift))
        bs = max(1, self.config.batch_size)
        for i in range(0, len(items), bs):
            self._score_batch(items[i : i + bs])
        return [list(ep.teacher) for ep in episodes]  # type: ignore[arg-type]

    def _score_batch(self, items: list[tuple[Episode, int, list[int], list[int], int]]) -> None:
        width = max(len(t) for _, _, t, _, _ in items)
        pad = self.renderer.pad_id
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        attn = torch.zeros((len(items), width), dtype=torch.long)
        for b, (_, _, toks, _, _) in enumerate(items):
            ids[b, : len(toks)] = torch.tensor(toks)
            attn[b, : len(toks)] = 1
        was_training = self.model.training
        self.model.eval()
        logits_B_T_V = self.model(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device)
        ).logits
        if was_training:
            self.model.train()
        k = self.config.topk
        for b, (ep, s, toks, positions, shift) in enumerate(items):
            if not positions:
                ep.teacher[s] = TeacherScores()
                continue
            # The distribution over token t lives at position t - 1 (next-token prediction).
            pos = torch.tensor([p + shift - 1 for p in positions], device=logits_B_T_V.device)
            logp_N_V = torch.log_softmax(logits_B_T_V[b, pos].float(), dim=-1)
            target = torch.tensor([toks[p + shift] for p in positions], device=logp_N_V.device)
            chosen_N = logp_N_V.gather(-1, target[:, None]).squeeze(-1)
            top_N_K = logp_N_V.topk(min(k, logp_N_V.shape[-1]), dim=-1)
            entropy_N = -(logp_N_V.exp() * logp_N_V).sum(-1)
            ep.teacher[s] = TeacherScores(
                positions=positions,
                logprobs=chosen_N.cpu().tolist(),
                topk_ids=top_N_K.indices.cpu().tolist(),
                topk_logprobs=top_N_K.values.cpu().tolist(),
                entropy=entropy_N.cpu().tolist(),
            )
