"""The learner: masked distillation (or SFT) updates on token-exact episodes.

Each micro-batch of segments is packed once (:class:`agentopd.batch.TokenBatch`: several
segments a row, the shared prompt prefix run once) and goes through the one forward pass,
:func:`agentopd.batch.forward_logprobs`, which projects onto the vocabulary (chunked) at the
student's sampled tokens only. The losses read ``[B, S]`` views: position ``t`` predicts token
``t + 1`` of segment ``b``; the loss mask is the episode's mask there, so prompts, tool results
and template tokens never carry loss. AdamW, gradient accumulation over micro-batches, clipping and a
learning-rate schedule; CPU by default, CUDA with bf16 autocast when available.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, cast

import torch

from agentopd import distributed, fsdp, logprobs, losses, sft
from agentopd.batch import TokenBatch, forward_logprobs, pack, packs
from agentopd.schema import knob
from agentopd.teachers import UnusableScoresError, check_scores
from agentopd.types import Episode, TeacherScores


class NonFiniteUpdateError(FloatingPointError):
    """An update whose loss or gradient is NaN or infinite. It was not applied: the weights are
    those of the previous update, and no checkpoint holds the bad values."""


@dataclass
class Batch:
    """A group of segments: their :class:`~agentopd.batch.TokenBatch` (what the forward pass
    reads; the teacher's fields in it once scored) and the loss's ``[B, S]`` views (position
    ``t`` of row ``b`` predicts token ``t + 1`` of segment ``b``; 0 off the mask)."""

    packed: TokenBatch
    """The segments' tokens, packed; its ``mask_B_S`` is the loss mask."""

    @property
    def mask_B_S(self) -> torch.Tensor:
        """Loss mask: 1 where the next token was sampled by the student."""
        return self.packed.mask_B_S

    def _dense(self, value_M: torch.Tensor | None) -> torch.Tensor | None:
        return None if value_M is None else self.packed.scatter(value_M[None])

    @property
    def teacher_lp_B_S(self) -> torch.Tensor | None:
        return self._dense(self.packed.teacher_logprobs_M)

    @property
    def teacher_ids_B_S_K(self) -> torch.Tensor | None:
        return self._dense(self.packed.teacher_topk_ids_M_K)

    @property
    def teacher_topk_lp_B_S_K(self) -> torch.Tensor | None:
        return self._dense(self.packed.teacher_topk_logprobs_M_K)

    @property
    def teacher_hidden_M_H(self) -> torch.Tensor | None:
        """The teacher's final hidden states at the ``M`` mask-1 positions (None unless every
        segment's scores carry them)."""
        return self.packed.teacher_hidden_M_H

    @property
    def input_ids_B_T(self) -> torch.Tensor:
        """The segments right-padded (the dense layout, for references)."""
        return self.packed.dense()[0]

    @property
    def attention_B_T(self) -> torch.Tensor:
        return self.packed.dense()[1]

    @property
    def target_B_S(self) -> torch.Tensor:
        return self.input_ids_B_T[:, 1:]

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
    items: list[tuple[Episode, int]],
    pad_id: int,
    topk: int,
    with_teacher: bool,
    *,
    share_prefix: bool = True,
    packed: bool = True,
) -> Batch:
    """The :class:`Batch` of segments (``share_prefix`` and ``packed``: see
    :func:`agentopd.batch.pack`). With ``with_teacher``, episodes must be scored: their
    scores are gathered into the batch (:meth:`~agentopd.batch.TokenBatch.with_teacher`)."""
    segs = [ep.segments[s] for ep, s in items]
    tb = pack(
        [seg.tokens for seg in segs],
        [seg.mask for seg in segs],
        pad_id=pad_id,
        packed=packed,
        share_prefix=share_prefix,
    )
    turn_B_S = torch.full(tb.mask_B_S.shape, -1, dtype=torch.long)
    for b, (ep, s) in enumerate(items):
        for tr in ep.turns:
            if tr.segment == s:
                turn_B_S[b, max(tr.start - 1, 0) : tr.end - 1] = tr.index
    tb = replace(tb, turn_M=turn_B_S[tb.mask_B_S])
    if with_teacher:
        scores = [ep.teacher[s] if ep.teacher else None for ep, s in items]
        missing = next((items[i] for i, sc in enumerate(scores) if sc is None), None)
        if missing is not None:
            raise ValueError(
                f"episode {missing[0].task_id} segment {missing[1]} has no teacher scores; "
                "run teacher.score first"
            )
        tb = tb.with_teacher(cast(list[TeacherScores], scores), topk)
    return Batch(tb)


def packed_student_pass(
    model: Any,
    batch: TokenBatch,
    support_M_K: torch.Tensor | None,
    student_topk: int,
    chunk_size: int,
    teacher_hidden_M_H: torch.Tensor | None = None,
    teacher_head: logprobs.OutputHead | None = None,
    beta: float | None = None,
    entropy: bool = True,
) -> dict[str, torch.Tensor | None]:
    """The learner's student pass: :func:`agentopd.batch.forward_logprobs` (the projection,
    top-k and entropy at the batch's mask-1 positions only), as a dict of ``[1, M]`` /
    ``[1, M, K]`` tensors so that it can run as the forward of an
    :class:`agentopd.fsdp.Passes` (bf16 autocast of the decoder on CUDA).

    Given the teacher's hidden states at the mask-1 positions and its head, it also projects
    both models' full distributions there (:func:`agentopd.logprobs.chunked_divergence`): the
    exact reverse KL (``reverse_kl_B_T``, no grad) always, and with ``beta`` set the
    full-vocabulary objective's divergence (``divergence_B_T``, with grad).

    Agent episodes are mostly prompt, tool output and template tokens, so projecting only the
    student's own tokens skips most of the output layer's work; every consumer (losses, token
    selection, diagnostics) reads mask-1 positions only."""
    cuda = batch.tokens_R_W.device.type == "cuda"
    st, student_M_H = forward_logprobs(
        model,
        batch,
        support_M_K=support_M_K,
        topk=student_topk,
        entropy=entropy,
        chunk_size=chunk_size,
        autocast=torch.bfloat16 if cuda else None,
    )
    out = {f.name: getattr(st, f.name) for f in fields(st)}
    if teacher_hidden_M_H is not None and teacher_head is not None:
        with torch.set_grad_enabled(beta is not None and torch.is_grad_enabled()):
            div, rkl = logprobs.chunked_divergence(
                student_M_H if beta is not None else student_M_H.detach(),
                logprobs.output_head(model),
                teacher_hidden_M_H.to(student_M_H.device),
                teacher_head,
                beta=1.0 if beta is None else beta,
                chunk_size=chunk_size,
            )
        out["divergence_B_T"] = None if beta is None else div[None]
        out["reverse_kl_B_T"] = rkl[None]
    return out


def student_pass(
    model: Any,
    ids_B_T: torch.Tensor,
    attention_B_T: torch.Tensor,
    target_B_S: torch.Tensor,
    support_B_S_K: torch.Tensor | None,
    student_topk: int,
    chunk_size: int,
    mask_B_S: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """:func:`packed_student_pass` on right-padded rows (``target_B_S`` must be
    ``ids_B_T[:, 1:]``): the rows are packed, and its values come back as ``[B, S]`` /
    ``[B, S, K]`` tensors, 0 off ``mask_B_S`` (every real position without one)."""
    lengths = attention_B_T.sum(-1).tolist()
    valid_B_S = attention_B_T[:, 1:].bool()
    mask = valid_B_S if mask_B_S is None else mask_B_S.bool() & valid_B_S
    batch = pack(
        [ids_B_T[b, :n].tolist() for b, n in enumerate(lengths)],
        [[0, *mask[b, : n - 1].long().tolist()] for b, n in enumerate(lengths)],
        pad_id=0,
    ).to(ids_B_T.device)
    support = None if support_B_S_K is None else support_B_S_K[mask]
    out = packed_student_pass(model, batch, support, student_topk, chunk_size)
    return {k: None if v is None else batch.scatter(v) for k, v in out.items()}


SCHEDULES = ("constant", "cosine", "linear")


def enable_gradient_checkpointing(model: Any, mode: str, device: torch.device) -> bool:
    """Turn on transformers' activation checkpointing of ``model`` when ``mode`` asks for it
    (``auto``: on CUDA only). Returns whether it is on. The results are unchanged: only the
    backward pass recomputes each decoder layer's activations instead of keeping them."""
    on = mode == "on" or (mode == "auto" and device.type == "cuda")
    if not on:
        return False
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"optim.gradient_checkpointing={mode}: {type(model).__name__} does not support "
            "gradient checkpointing; set optim.gradient_checkpointing=off"
        )
    # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings
    # (LoRA) work too.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


@dataclass
class LearnerConfig:
    """Optimisation settings (the ``optim.*`` keys)."""

    name: str = knob("adamw", "optimizer (sgd: plain, no momentum)", choices=("adamw", "sgd"))
    lr: float = knob(1e-4, "peak learning rate", gt=0)
    weight_decay: float = knob(0.0, "decoupled weight decay", ge=0)
    beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: no clipping)", ge=0)
    warmup_steps: int = knob(0, "linear warm-up steps", ge=0)
    schedule: str = knob("constant", "learning-rate schedule after warm-up", choices=SCHEDULES)
    min_lr_frac: float = knob(
        0.1, "final learning rate of the cosine schedule, as a fraction of lr", ge=0, le=1
    )
    micro_batch: int = knob(8, "segments per forward/backward pass (gradient accumulation)", ge=1)
    epochs_per_batch: int = knob(
        1, "optimizer updates per rollout batch (PPO-style passes; >1 makes the clip act)", ge=1
    )
    gradient_checkpointing: str = knob(
        "auto",
        "recompute decoder-layer activations in the backward pass (less memory, ~1.3x compute): "
        "auto (on CUDA only), on, off",
        choices=("auto", "on", "off"),
    )
    sft_bf16: str = knob(
        "cuda",
        "bfloat16 autocast of SFT steps: cuda (on CUDA only), auto (also on CPUs that run it "
        "natively), on, off",
        choices=sft.BF16_MODES,
    )


class Learner:
    """Owns the student model's optimizer and update step.

    Args:
        model: The student causal LM (trained in place), or an :class:`agentopd.fsdp.Passes`
            around it (:func:`agentopd.fsdp.shard`'s, under ``distributed.strategy=fsdp2``:
            the optimizer then holds this rank's shards, and every pass is a collective).
        config: Optimisation settings.
        pad_id: Padding token id.
        loss: A registered loss name or a :class:`~agentopd.losses.Loss` object.
        loss_cfg: The loss's config (default: ``loss.Config()``).
        topk: Teacher top-k width that batches carry.
        total_steps: Length of the learning-rate schedule, in :meth:`step` calls.
        teacher_head: The output head of an in-process teacher whose scores carry its hidden
            states (``HFTeacher(keep_hidden=True)``): every step then reports the exact
            reverse KL (``diag/true_rkl``), and the full-vocabulary objectives can train.

    Raises:
        ValueError: A full-vocabulary loss without ``teacher_head``.
    """

    def __init__(
        self,
        model: Any,
        config: LearnerConfig | None = None,
        pad_id: int = 0,
        *,
        loss: str | losses.Loss = "rkl-sampled",
        loss_cfg: losses.LossConfig | None = None,
        topk: int = 16,
        total_steps: int = 100,
        teacher_head: logprobs.OutputHead | None = None,
    ):
        from agentopd import registry

        self.passes = fsdp.passes_of(model)
        """Runs every forward pass (the root FSDP unit when sharded)."""
        self.model = model = self.passes.model
        self.sharded = fsdp.is_sharded(self.passes)
        self.config = config = config or LearnerConfig()
        self.pad_id = pad_id
        # The losses group holds Loss objects; registry entries themselves are untyped.
        self.loss = (
            cast(losses.Loss, registry.losses.spec(loss).load()) if isinstance(loss, str) else loss
        )
        self.loss_cfg = loss_cfg if loss_cfg is not None else self.loss.Config()
        self.beta = losses.full_vocab_beta(self.loss, self.loss_cfg)
        """The full-vocabulary objective's ``beta`` (None: the loss is not one)."""
        self.teacher_head = teacher_head
        if self.beta is not None and teacher_head is None:
            raise ValueError(
                "a full-vocabulary loss needs the teacher's output head (teacher_head=...): "
                "only an in-process hf teacher (teacher_backend=hf) gives its full distribution"
            )
        self.topk = topk
        self.total_steps = total_steps
        self.device = next(model.parameters()).device
        self.gradient_checkpointing = enable_gradient_checkpointing(
            model, config.gradient_checkpointing, self.device
        )
        if config.name == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        elif config.name == "adamw":
            self.optimizer = torch.optim.AdamW(
                model.parameters(),
                lr=config.lr,
                betas=(config.beta1, config.beta2),
                weight_decay=config.weight_decay,
            )
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.name!r}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def cold_start(self, lr: float, steps: int) -> Learner:
        """The cold start's SFT learner: the same model (under ``fsdp2``: the same shards), loss
        and batches, with an optimizer of its own, AdamW at a constant ``lr`` for ``steps``
        steps. This learner's schedule and AdamW moments are untouched, so OPD starts them fresh
        afterwards. (Setting the shared optimizer's lr did not hold: the OPD scheduler reset it
        to ``optim.lr`` after the first step.)"""
        config = replace(self.config, name="adamw", lr=lr, schedule="constant", warmup_steps=0)
        return Learner(
            self.passes,
            config,
            self.pad_id,
            loss=self.loss,
            loss_cfg=self.loss_cfg,
            topk=self.topk,
            total_steps=steps,
            teacher_head=self.teacher_head,
        )

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps))
        if c.schedule == "cosine":
            floor = c.min_lr_frac
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if c.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    def _student(
        self,
        batch: Batch,
        support_M_K: torch.Tensor | None,
        want_topk: bool,
        full_vocab: bool = False,
        want_entropy: bool | None = None,
    ) -> logprobs.TokenLogprobs:
        """One student pass (:func:`packed_student_pass`), also at the ids ``support_M_K``
        (e.g. the teacher's top-k), its values as ``[B, S]`` tensors (0 off the mask); the
        entropy when ``want_entropy`` (default: with the top-k); with ``full_vocab`` (and the
        teacher's hidden states in the batch) also the exact reverse KL and, for a
        full-vocabulary loss, its divergence."""
        tb = batch.packed.to(self.device)
        hidden = tb.teacher_hidden_M_H if full_vocab and self.teacher_head is not None else None
        out = self.passes(
            packed_student_pass,
            tb,
            None if support_M_K is None else support_M_K.to(self.device),
            self.topk if want_topk else 0,
            self.loss_cfg.chunk_size,
            hidden,
            self.teacher_head if hidden is not None else None,
            self.beta,
            want_topk if want_entropy is None else want_entropy,
        )
        lp = out.pop("logprobs_B_T")
        assert lp is not None  # the pass always computes the target's log-prob
        rest = {k: None if v is None else tb.scatter(v) for k, v in out.items()}
        return logprobs.TokenLogprobs(tb.scatter(lp), **rest)

    def _passes_to_run(self, n: int) -> int:
        """How many passes this rank runs for its ``n`` micro-batches: ``n``, or sharded (every
        pass a collective) the most any rank has; the extra ones are :meth:`_dummy_pass`."""
        return int(distributed.all_max(n)) if self.sharded else n

    def _dummy_pass(self) -> torch.Tensor:
        """A pass over two padding tokens whose loss (returned) is 0 times the model's output:
        it takes part in a sharded model's collectives and changes no gradient."""
        tb = pack([[self.pad_id] * 2], [[0, 1]], pad_id=self.pad_id, share_prefix=False)
        out = self.passes(
            packed_student_pass, tb.to(self.device), None, 0, 1, None, None, None, False
        )
        return out["logprobs_B_T"].sum() * 0.0

    def step(self, episodes: list[Episode]) -> dict[str, float]:
        """One OPD update on ``episodes`` (scored by the teacher; :meth:`step_sft` for SFT).

        OPD: token selection (``entropy_top_frac``, ``overlap_only``) is decided over the whole
        batch before micro-batching, so the gradient does not depend on ``optim.micro_batch``.
        With ``optim.epochs_per_batch = E > 1`` the batch gets E optimizer updates; the student
        log-probs before the first one are ``p_old`` of the ``rkl-sampled`` ratio.
        """
        return self._step_opd(episodes)

    def _micro_batches(self, episodes: list[Episode], with_teacher: bool) -> list[Batch]:
        items = segments_of(episodes)
        mb = self.config.micro_batch
        # The prefix's cache needs the layers' activations (checkpointing drops them) and,
        # sharded, their weights after FSDP freed them: nothing is shared then.
        share = not (self.gradient_checkpointing or self.sharded)
        batches = [
            make_batch(
                items[i : i + mb],
                self.pad_id,
                self.topk,
                with_teacher,
                share_prefix=share,
                packed=packs(self.model),
            )
            for i in range(0, len(items), mb)
        ]
        return [b for b in batches if b.tokens > 0]

    @torch.no_grad()
    def _select(self, batches: list[Batch]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per micro-batch: the loss mask after batch-wide token selection, and ``p_old``."""
        lc = self.loss_cfg
        need_pass = lc.entropy_top_frac < 1.0 or lc.overlap_only or self.config.epochs_per_batch > 1
        masks = [b.mask_B_S.clone() for b in batches]
        olds: list[torch.Tensor] = []
        if not need_pass:
            return masks, olds
        was_training = self.model.training
        self.model.eval()
        entropies = []
        for _ in range(self._passes_to_run(len(batches)) - len(batches)):
            self._dummy_pass()
        for b, m in zip(batches, masks, strict=True):
            want_entropy = lc.entropy_top_frac < 1.0
            st = self._student(b, None, want_topk=lc.overlap_only, want_entropy=want_entropy)
            olds.append(st.logprobs_B_T.cpu())
            if want_entropy:
                assert st.entropy_B_T is not None  # asked for above
                entropies.append(st.entropy_B_T.cpu())
            if lc.overlap_only:
                assert st.topk_ids_B_T_K is not None and b.teacher_ids_B_S_K is not None
                m &= losses.select_overlap_only(st.topk_ids_B_T_K.cpu(), b.teacher_ids_B_S_K, m)
        self.model.train(was_training)
        if lc.entropy_top_frac < 1.0 and batches:
            # One selection over every token of the batch: flatten all micro-batches.
            flat_ent = torch.cat([e[m] for e, m in zip(entropies, masks, strict=True)])
            flat_mask = torch.ones_like(flat_ent, dtype=torch.bool)
            keep = losses.select_entropy_top_frac(flat_ent, flat_mask, lc.entropy_top_frac)
            offset = 0
            for m in masks:
                n = int(m.sum())
                m[m.clone()] = keep[offset : offset + n]
                offset += n
        return masks, olds

    def _step_opd(self, episodes: list[Episode]) -> dict[str, float]:
        c, lc = self.config, self.loss_cfg
        # Whatever backend scored them, nothing non-finite enters a batch. Under torchrun the
        # ranks agree first, so a bad score on one rank stops every rank, not only that one.
        try:
            check_scores([ep for ep in episodes if ep.teacher is not None], "(any)")
            problem = None
        except UnusableScoresError as e:
            problem = e
        if distributed.all_sum(int(problem is not None)):
            raise problem or UnusableScoresError(
                "another rank's teacher scores are not finite (its error says where)"
            )
        batches = self._micro_batches(episodes, with_teacher=True)
        if self.beta is not None and any(b.teacher_hidden_M_H is None for b in batches):
            raise ValueError(
                "a full-vocabulary loss needs the teacher's hidden states at the scored tokens; score the episodes with an "
                "in-process hf teacher built with keep_hidden=True (the builder does), in this "
                "step (they are dropped after each step)"
            )
        # Under torchrun a rank with an empty shard still takes part in every collective.
        if distributed.all_sum(len(batches)) == 0:
            return {"learner/tokens": 0.0}
        # Sharded, a rank without batches still runs the selection's (dummy) passes.
        masks, olds = self._select(batches) if batches or self.sharded else ([], [])
        # Under torchrun the normalisers are global: each rank holds a shard of the batch.
        total_tokens = distributed.all_sum(sum(int(m.sum()) for m in masks))
        total_seqs = distributed.all_sum(sum(int((m.sum(-1) > 0).sum()) for m in masks))
        self.model.train()
        diag_rows: list[dict[str, torch.Tensor]] = []
        sums: dict[str, float] = {}
        grad_norm = torch.tensor(0.0)
        for epoch in range(c.epochs_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            sums = {}
            for b in range(self._passes_to_run(len(batches))):
                mask = masks[b].to(self.device) if b < len(batches) else None
                if mask is None or not mask.any():
                    if self.sharded:  # the other ranks run a pass here too
                        self._dummy_pass().backward()
                    continue
                batch = batches[b]
                assert batch.teacher_lp_B_S is not None  # made with_teacher=True above
                assert batch.teacher_topk_lp_B_S_K is not None
                st = self._student(
                    batch,
                    batch.packed.teacher_topk_ids_M_K if self.loss.needs_support else None,
                    want_topk=epoch == 0,
                    full_vocab=self.beta is not None or epoch == 0,
                )
                old = olds[b].to(self.device) if olds else st.logprobs_B_T.detach()
                inputs = losses.LossInputs(
                    mask_B_T=mask,
                    old_logprobs_B_T=old,
                    teacher_logprobs_B_T=batch.teacher_lp_B_S.to(self.device),
                    teacher_topk_logprobs_B_T_K=batch.teacher_topk_lp_B_S_K.to(self.device),
                    student_mask_B_T=batch.mask_B_S.to(self.device),
                )
                loss, metrics = self.loss(inputs, st, lc)
                if epoch == 0:
                    diag_rows.append(_diag_row(batch, st))
                weight = (
                    int(mask.sum()) / max(1, total_tokens)
                    if lc.agg == "token-mean"
                    else int((mask.sum(-1) > 0).sum()) / max(1, total_seqs)
                )
                (loss * weight).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * (weight if k != "tokens" else 1.0)
            grad_norm = self._apply_gradients(distributed.all_sum_dict(sums))
        # Weighted by global normalisers, the ranks' sums add up to the whole batch's metrics.
        out = self._finish(distributed.all_sum_dict(sums), grad_norm)
        out["learner/tokens"] = float(total_tokens)
        out["learner/epochs"] = float(c.epochs_per_batch)
        diag_rows = _gather_rows(diag_rows)
        if diag_rows:
            out.update(_diagnostics(diag_rows))
        return out

    @torch.no_grad()
    def measure(self, episodes: list[Episode]) -> dict[str, float]:
        """Diagnostics (overlap, entropy gap, KL per turn index) without updating anything."""
        rows = []
        for batch in self._micro_batches(episodes, with_teacher=True):
            st = self._student(
                batch, batch.packed.teacher_topk_ids_M_K, want_topk=True, full_vocab=True
            )
            rows.append(_diag_row(batch, st))
        return _diagnostics(rows) if rows else {}

    def step_sft(
        self, episodes: list[Episode], extra: Sequence[sft.SftGroup] = ()
    ) -> dict[str, float]:
        """One SFT update (cold start, demonstration batches): NLL on mask-1 tokens.

        The loss is the ``loss_cfg.agg`` mean over ``episodes``' mask-1 tokens, plus, per group
        of ``extra``, its weight times its own mean (e.g. the zoo's copy drills). The pass is
        :func:`agentopd.sft.backward`'s packed one (shared prefix, packed rows, projection at
        trained positions only): the loss and gradient of a padded forward, faster. Under
        torchrun each rank passes its shard; the means and the gradient are over all shards.
        """
        c = self.config
        groups = [sft.SftGroup(episodes), *extra]
        has_work = any(sft.trained_segments(g.episodes) for g in groups)
        if distributed.all_sum(int(has_work)) == 0:  # every rank decides alike under torchrun
            return {"learner/tokens": 0.0}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = sft.backward(
            self.passes,
            groups,
            pad_id=self.pad_id,
            agg=self.loss_cfg.agg,
            micro_batch=c.micro_batch,
            chunk_size=self.loss_cfg.chunk_size,
            bf16=sft.bf16_enabled(c.sft_bf16, self.device),
        )
        sums = distributed.all_sum_dict(sums)
        return self._finish(sums, self._apply_gradients(sums))

    def _apply_gradients(self, sums: dict[str, float] | None = None) -> torch.Tensor:
        """Clip and apply the accumulated gradient, summed over torchrun ranks first (both steps
        normalise by counts over all ranks' shards); returns its norm.

        Raises:
            NonFiniteUpdateError: The loss (in ``sums``) or the gradient norm is NaN or
                infinite; the update is not applied (every rank sees the same summed values,
                so under torchrun all of them raise).
        """
        c = self.config
        if not self.sharded:  # sharded, FSDP's reduce-scatter summed them in the backward
            distributed.sum_gradients(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf")
        )
        full = getattr(grad_norm, "full_tensor", None)  # sharded: a DTensor
        grad_norm = full() if full is not None else grad_norm
        bad = {k: v for k, v in (sums or {}).items() if k == "loss" and not math.isfinite(v)}
        if bad or not math.isfinite(float(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            update = int(self.scheduler.last_epoch) + 1
            what = f"loss {bad['loss']}" if bad else f"gradient norm {float(grad_norm)}"
            raise NonFiniteUpdateError(
                f"learner update {update}: the {what} is not finite, so the update was not "
                "applied and the weights are unchanged. A NaN or infinite teacher score, or a "
                "diverging loss, causes this; check the teacher and the learning rate, then "
                "continue from the last checkpoint with resume=true."
            )
        self.optimizer.step()
        return grad_norm

    def _finish(self, sums: dict[str, float], grad_norm: torch.Tensor) -> dict[str, float]:
        """Advance the schedule once per step; the step's ``learner/*`` metrics."""
        self.scheduler.step()
        out = {f"learner/{k}": v for k, v in sums.items()}
        out["learner/grad_norm"] = float(grad_norm)
        out["learner/lr"] = float(self.scheduler.get_last_lr()[0])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and schedule state, in one process's format under any strategy (sharded:
        the full optimizer state gathered to rank 0, a collective every rank calls; the other
        ranks get an empty ``optimizer`` entry)."""
        optimizer = fsdp.full_optimizer_state_dict(self.passes, self.optimizer)
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s state (sharded: every rank passes the whole of it)."""
        fsdp.load_full_optimizer_state_dict(self.passes, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _diag_row(batch: Batch, st: logprobs.TokenLogprobs) -> dict[str, torch.Tensor]:
    """The diagnostics' inputs at the batch's ``M`` sampled tokens: the teacher's fields as the
    batch holds them, the student's taken from its ``[B, S]`` views in the same order."""
    tb, m = batch.packed, batch.mask_B_S
    # An OPD batch (teacher scores in it) and a pass that asked for the student's top-k.
    assert tb.teacher_logprobs_M is not None and tb.teacher_topk_ids_M_K is not None
    assert tb.teacher_topk_logprobs_M_K is not None and tb.teacher_entropy_M is not None
    assert st.topk_ids_B_T_K is not None and st.topk_logprobs_B_T_K is not None
    assert st.entropy_B_T is not None and tb.turn_M is not None

    def student(x: torch.Tensor) -> torch.Tensor:
        return x.detach()[m.to(x.device)].cpu()

    true_rkl = {} if st.reverse_kl_B_T is None else {"true_rkl": student(st.reverse_kl_B_T)}
    return {
        **true_rkl,
        "turn": tb.turn_M,
        "student_lp": student(st.logprobs_B_T),
        "teacher_lp": tb.teacher_logprobs_M.cpu(),
        "student_ids": student(st.topk_ids_B_T_K),
        "student_topk_lp": student(st.topk_logprobs_B_T_K),
        "teacher_ids": tb.teacher_topk_ids_M_K.cpu(),
        "teacher_topk_lp": tb.teacher_topk_logprobs_M_K.cpu(),
        "student_entropy": student(st.entropy_B_T),
        "teacher_entropy": tb.teacher_entropy_M.cpu(),
    }


def _gather_rows(rows: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Under torchrun, every rank's diagnostic rows on every rank, so the logged diagnostics
    cover the whole batch; ``rows`` itself in one process."""
    if distributed.world().size == 1:
        return rows
    per_rank: list[list[dict[str, torch.Tensor]]] = distributed.all_gather_list([rows])
    return [row for rank_rows in per_rank for row in rank_rows]


def _diagnostics(rows: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Overlap, entropy gap and teacher KL per turn index on the student's own tokens."""
    from agentopd import diagnostics

    if not all("true_rkl" in r for r in rows):  # some batch's teacher kept no hidden states
        rows = [{k: v for k, v in r.items() if k != "true_rkl"} for r in rows]
    # One row of N sampled tokens: shapes [1, N] and [1, N, K].
    cat = {k: torch.cat([r[k] for r in rows])[None] for k in rows[0]}
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
        reverse_kl_B_T=cat.get("true_rkl"),
    )
    return {f"diag/{k}": float(v) for k, v in metrics.items()}
