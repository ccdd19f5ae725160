"""The learner: masked distillation (or SFT) updates on token-exact episodes.

Episodes become right-padded ``[B, T]`` batches of their segments. Position ``t`` of the shifted
arrays predicts token ``t + 1``; the loss mask is the episode's mask there, so prompts, tool
results and template tokens never carry loss. Student log-probs come from
:func:`agentopd.losses.chunked_token_logprobs`, so ``[tokens x vocab]`` logits are never
materialised for a whole batch. AdamW, gradient accumulation over micro-batches, clipping and a
learning-rate schedule; CPU by default, CUDA with bf16 autocast when available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from agentopd import losses
from agentopd.types import Episode


@dataclass
class Batch:
    """Padded tensors for a group of segments (already shifted for next-token prediction)."""

    input_ids_B_T: torch.Tensor
    attention_B_T: torch.Tensor
    target_B_S: torch.Tensor
    mask_B_S: torch.Tensor
    turn_B_S: torch.Tensor
    teacher_lp_B_S: torch.Tensor | None
    teacher_ids_B_S_K: torch.Tensor | None
    teacher_topk_lp_B_S_K: torch.Tensor | None
    teacher_entropy_B_S: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int(self.mask_B_S.sum())

    @property
    def sequences(self) -> int:
        return int((self.mask_B_S.sum(-1) > 0).sum())


def segments_of(episodes: list[Episode]) -> list[tuple[Episode, int]]:
    """(episode, segment index) pairs that contain at least one sampled token."""
    return [(ep, s) for ep in episodes for s, seg in enumerate(ep.segments) if any(seg.mask)]


def make_batch(
    items: list[tuple[Episode, int]], pad_id: int, topk: int, with_teacher: bool
) -> Batch:
    """Pad segments into a :class:`Batch`. With ``with_teacher``, episodes must be scored."""
    T = max(len(ep.segments[s].tokens) for ep, s in items)
    B, S = len(items), T - 1
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.bool)
    turn = torch.full((B, S), -1, dtype=torch.long)
    t_lp = torch.zeros((B, S)) if with_teacher else None
    t_ids = torch.zeros((B, S, topk), dtype=torch.long) if with_teacher else None
    t_topk = torch.zeros((B, S, topk)) if with_teacher else None
    t_ent = torch.zeros((B, S)) if with_teacher else None
    for b, (ep, s) in enumerate(items):
        seg = ep.segments[s]
        n = len(seg.tokens)
        ids[b, :n] = torch.tensor(seg.tokens)
        attn[b, :n] = 1
        mask[b, : n - 1] = torch.tensor(seg.mask[1:], dtype=torch.bool)
        for tr in ep.turns:
            if tr.segment == s:
                turn[b, max(tr.start - 1, 0) : tr.end - 1] = tr.index
        if with_teacher:
            if not ep.teacher or ep.teacher[s] is None:
                raise ValueError(
                    f"episode {ep.task_id} segment {s} has no teacher scores; run teacher.score first"
                )
            sc = ep.teacher[s]
            if sc["positions"] != [t for t, m in enumerate(seg.mask) if m]:
                raise ValueError(
                    f"teacher scores of episode {ep.task_id} do not match its mask (stale scores?)"
                )
            if sc["positions"]:
                pos = torch.tensor(sc["positions"]) - 1
                t_lp[b, pos] = torch.tensor(sc["logprobs"])
                k = min(topk, len(sc["topk_ids"][0]))
                t_ids[b, pos, :k] = torch.tensor(sc["topk_ids"])[:, :k]
                t_topk[b, pos, :k] = torch.tensor(sc["topk_logprobs"])[:, :k]
                if k < topk:
                    t_topk[b, pos, k:] = losses.LOG_FLOOR
                t_ent[b, pos] = torch.tensor(sc["entropy"])
    return Batch(ids, attn, ids[:, 1:], mask, turn, t_lp, t_ids, t_topk, t_ent)


@dataclass
class LearnerConfig:
    """Optimisation and objective settings (see ``agentopd.config`` for the user-facing keys)."""

    optimizer: str = "adamw"
    """``adamw`` or ``sgd`` (plain, no momentum). See the README on tiny students and AdamW."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int = 100
    micro_batch: int = 8
    loss: str = "rkl-sampled"
    clip_eps: float = 0.2
    tail: bool = True
    beta: float = 0.5
    agg: str = "token-mean"
    entropy_top_frac: float = 1.0
    overlap_only: bool = False
    chunk_size: int = 1024
    topk: int = 16


class Learner:
    """Owns the student model's optimizer and update step.

    Args:
        model: The student causal LM (trained in place).
        config: Learner settings.
        pad_id: Padding token id.
    """

    def __init__(self, model: Any, config: LearnerConfig, pad_id: int):
        self.model = model
        self.config = config
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        elif config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                model.parameters(),
                lr=config.lr,
                betas=(config.beta1, config.beta2),
                weight_decay=config.weight_decay,
            )
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.total_steps - c.warmup_steps))
        if c.schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if c.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    def _student(
        self, batch: Batch, support: torch.Tensor | None, want_topk: bool
    ) -> losses.TokenLogprobs:
        base = self.model.base_model
        head = self.model.get_output_embeddings()
        ids = batch.input_ids_B_T.to(self.device)
        attn = batch.attention_B_T.to(self.device)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with autocast:
            hidden = base(input_ids=ids, attention_mask=attn).last_hidden_state
        return losses.chunked_token_logprobs(
            hidden[:, :-1],
            head.weight,
            batch.target_B_S.to(self.device),
            lm_head_bias_V=getattr(head, "bias", None),
            chunk_size=self.config.chunk_size,
            topk_ids_B_T_K=None if support is None else support.to(self.device),
            student_topk=self.config.topk if want_topk else 0,
            return_entropy=True,
        )

    def step(self, episodes: list[Episode], mode: str = "opd") -> dict[str, float]:
        """One optimizer update on ``episodes`` (``mode``: ``"opd"`` or ``"sft"``)."""
        c = self.config
        items = segments_of(episodes)
        if not items:
            return {"learner/tokens": 0.0}
        opd = mode == "opd"
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = sum(sum(ep.segments[s].mask[1:]) for ep, s in items)
        total_seqs = len(items)
        sums: dict[str, float] = {}
        diag_rows: list[dict[str, torch.Tensor]] = []
        for i in range(0, len(items), c.micro_batch):
            mb = items[i : i + c.micro_batch]
            batch = make_batch(mb, self.pad_id, c.topk, with_teacher=opd)
            if batch.tokens == 0:
                continue
            st = self._student(batch, batch.teacher_ids_B_S_K if opd else None, want_topk=opd)
            mask = batch.mask_B_S.to(self.device)
            if not opd:
                loss, metrics = losses.sft_nll(st.logprobs_B_T, mask, c.agg)
            else:
                if c.entropy_top_frac < 1.0:
                    mask = losses.select_entropy_top_frac(
                        st.entropy_B_T.detach(), mask, c.entropy_top_frac
                    )
                if c.overlap_only:
                    mask = losses.select_overlap_only(
                        st.topk_ids_B_T_K, batch.teacher_ids_B_S_K.to(self.device), mask
                    )
                loss, metrics = self._opd_loss(st, batch, mask)
                diag_rows.append(_diag_row(batch, st))
            weight = (
                batch.tokens / max(1, total_tokens)
                if c.agg == "token-mean"
                else batch.sequences / max(1, total_seqs)
            )
            (loss * weight).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * (weight if k != "tokens" else 1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf")
        )
        self.optimizer.step()
        self.scheduler.step()
        out = {f"learner/{k}": v for k, v in sums.items()}
        out["learner/grad_norm"] = float(grad_norm)
        out["learner/lr"] = float(self.scheduler.get_last_lr()[0])
        out["learner/tokens"] = float(total_tokens)
        if diag_rows:
            out.update(_diagnostics(diag_rows))
        return out

    @torch.no_grad()
    def measure(self, episodes: list[Episode]) -> dict[str, float]:
        """Diagnostics (overlap, entropy gap, KL per turn index) without updating anything."""
        c = self.config
        items = segments_of(episodes)
        rows = []
        for i in range(0, len(items), c.micro_batch):
            batch = make_batch(items[i : i + c.micro_batch], self.pad_id, c.topk, with_teacher=True)
            st = self._student(batch, batch.teacher_ids_B_S_K, want_topk=True)
            rows.append(_diag_row(batch, st))
        return _diagnostics(rows) if rows else {}

    def step_sft(self, episodes: list[Episode]) -> dict[str, float]:
        """One SFT update (cold start, demonstration batches): NLL on mask-1 tokens."""
        return self.step(episodes, mode="sft")

    def _opd_loss(
        self, st: losses.TokenLogprobs, batch: Batch, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        t_lp = batch.teacher_lp_B_S.to(self.device)
        if c.loss == "rkl-sampled":
            # On-policy, one update per batch: the sampling policy equals the current weights, so
            # p_old is the current log-prob without gradient (ratio 1, gradient of the surrogate).
            return losses.rkl_sampled(
                st.logprobs_B_T,
                st.logprobs_B_T.detach(),
                t_lp,
                mask,
                clip_eps=c.clip_eps,
                agg=c.agg,
            )
        s_sup = st.support_logprobs_B_T_K
        t_sup = batch.teacher_topk_lp_B_S_K.to(self.device)
        if c.loss == "jsd":
            return losses.jsd(s_sup, t_sup, mask, beta=c.beta, tail=c.tail, agg=c.agg)
        return losses.LOSSES[c.loss](s_sup, t_sup, mask, tail=c.tail, agg=c.agg)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _diag_row(batch: Batch, st: losses.TokenLogprobs) -> dict[str, torch.Tensor]:
    return {
        "mask": batch.mask_B_S,
        "turn": batch.turn_B_S,
        "student_lp": st.logprobs_B_T.detach().cpu(),
        "teacher_lp": batch.teacher_lp_B_S,
        "student_ids": st.topk_ids_B_T_K.detach().cpu(),
        "student_topk_lp": st.topk_logprobs_B_T_K.detach().cpu(),
        "teacher_ids": batch.teacher_ids_B_S_K,
        "teacher_topk_lp": batch.teacher_topk_lp_B_S_K,
        "student_entropy": st.entropy_B_T.detach().cpu(),
        "teacher_entropy": batch.teacher_entropy_B_S,
    }


def _diagnostics(rows: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Overlap, entropy gap and teacher KL per turn index on the student's own tokens."""
    from agentopd import diagnostics

    flat: dict[str, list[torch.Tensor]] = {}
    for r in rows:
        m = r["mask"]
        for k, v in r.items():
            if k != "mask":
                flat.setdefault(k, []).append(v[m])
    # One row of N sampled tokens: shapes [1, N] and [1, N, K].
    cat = {k: torch.cat(v)[None] for k, v in flat.items()}
    metrics = diagnostics.compatibility(
        cat["student_ids"],
        cat["student_topk_lp"],
        cat["teacher_ids"],
        cat["teacher_topk_lp"],
        torch.ones_like(cat["turn"], dtype=torch.bool),
        student_logprobs_B_T=cat["student_lp"],
        teacher_logprobs_B_T=cat["teacher_lp"],
        turn_index_B_T=cat["turn"],
        student_entropy_B_T=cat["student_entropy"],
        teacher_entropy_B_T=cat["teacher_entropy"],
    )
    return {f"diag/{k}": float(v) for k, v in metrics.items()}
