"""What every teacher backend shares: which token sequence to score per segment, and how
per-position prompt log-probs (vLLM's ``prompt_logprobs`` format) become
:class:`~agentopd.types.TeacherScores`.

A :class:`Request` is one segment as the teacher sees it: the student's token ids, with the
opening prompt re-rendered when the teacher has its own system prompt or privileged context
(``shift`` = how many tokens longer the teacher's prompt is). Student position ``p`` is teacher
position ``p + shift``, and the teacher's distribution over it is the one after
``tokens[: p + shift]``.

Backends that cannot return the full distribution (``vllm``, ``server``) report entropy from the
top-k plus one tail bucket holding the remaining mass
(:func:`agentopd.diagnostics.topk_entropy`): a lower bound of
the full entropy, exact when the top-k hold all the mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from agentopd.diagnostics import topk_entropy
from agentopd.renderer import Renderer
from agentopd.types import Episode, Message, TeacherScores

if TYPE_CHECKING:
    from agentopd.teachers import TeacherConfig


@dataclass
class Request:
    """One segment to score."""

    episode: int
    """Index of the episode in the scored batch."""
    segment: int
    """Index of the segment in that episode."""
    tokens: list[int]
    """Token ids the teacher sees (the student's, with the teacher's own opening prompt)."""
    positions: list[int]
    """The segment's mask-1 positions (student indexing)."""
    shift: int
    """Teacher index minus student index of every scored token."""

    def targets(self) -> list[int]:
        """The sampled token at each scored position."""
        return [self.tokens[p + self.shift] for p in self.positions]


def teacher_prompt(renderer: Renderer, config: TeacherConfig, episode: Episode) -> list[int] | None:
    """The opening prompt re-rendered for the teacher, or None to use the student's tokens.

    ``config`` is a :class:`~agentopd.teachers.TeacherConfig` (``system_prompt``,
    ``privileged``).
    """
    if config.system_prompt is None and not config.privileged:
        return None
    n = episode.n_prompt_messages
    if n <= 0:
        raise ValueError(
            "episode has no n_prompt_messages; it was not produced by agentopd.rollout"
        )
    msgs = [Message(**vars(m)) for m in episode.messages[:n]]
    system = config.system_prompt
    if msgs and msgs[0].role == "system":
        base = msgs[0].content if system is None else system
        msgs = msgs[1:]
    else:
        base = system or ""
    if config.privileged:
        base = (base + "\n" + episode.privileged_context).strip()
    msgs = [Message(role="system", content=base), *msgs]
    tokens, _ = renderer.initial_prompt(msgs, episode.tools)
    return tokens


def requests(episodes: list[Episode], renderer: Renderer, config: TeacherConfig) -> list[Request]:
    """One :class:`Request` per segment of every episode, in order."""
    out = []
    for e, ep in enumerate(episodes):
        prompt = teacher_prompt(renderer, config, ep)
        for s, seg in enumerate(ep.segments):
            positions = [t for t, m in enumerate(seg.mask) if m]
            if s == 0 and prompt is not None:
                tokens = prompt + seg.tokens[seg.prompt_len :]
                shift = len(prompt) - seg.prompt_len
            else:
                tokens, shift = list(seg.tokens), 0
            out.append(Request(e, s, tokens, positions, shift))
    return out


def empty_slots(episodes: list[Episode]) -> list[list[TeacherScores | None]]:
    """Set every episode's ``teacher`` to one empty slot per segment and return those lists
    (the same objects), for the backend to fill as its requests are answered."""
    slots = []
    for ep in episodes:
        ep.teacher = [None] * len(ep.segments)
        slots.append(ep.teacher)
    return slots


def filled(slots: list[list[TeacherScores | None]]) -> list[list[TeacherScores]]:
    """Copies of the slots once every one holds scores (:func:`requests` asks one per
    segment, so an empty slot is a backend bug)."""
    out = []
    for row in slots:
        scores = [s for s in row if s is not None]
        assert len(scores) == len(row), "a segment was left without teacher scores"
        out.append(scores)
    return out


def from_prompt_logprobs(
    req: Request, rows: list[dict[int, tuple[float, int]] | None], k: int
) -> TeacherScores:
    """Scores of one request from per-position prompt log-probs.

    Args:
        req: The request that was scored.
        rows: One entry per token of ``req.tokens``: ``{token_id: (logprob, rank)}`` holding the
            top-``k`` ids and the actual token (vLLM's ``prompt_logprobs=k``); entry 0 is None.
        k: Top-k to report.

    Raises:
        ValueError: A row is missing its actual token or holds fewer than ``k`` ranked ids.
    """
    if not req.positions:
        return TeacherScores()
    if len(rows) != len(req.tokens):
        raise ValueError(f"got {len(rows)} prompt-logprob rows for {len(req.tokens)} tokens")
    n = len(req.positions)
    logprobs_M = np.zeros(n)
    ids_M_K = np.zeros((n, k), dtype=np.int64)
    lps_M_K = np.zeros((n, k))
    for j, (p, target) in enumerate(zip(req.positions, req.targets(), strict=True)):
        row = rows[p + req.shift]
        if row is None or target not in row:
            raise ValueError(f"no log-prob for the sampled token {target} at position {p}")
        logprobs_M[j] = row[target][0]
        ranked = sorted(((r, t, lp) for t, (lp, r) in row.items() if r is not None and r <= k))
        if len(ranked) < k:
            raise ValueError(f"position {p}: {len(ranked)} ranked ids, expected top-{k}")
        ids_M_K[j] = [t for _, t, _ in ranked[:k]]
        lps_M_K[j] = [lp for _, _, lp in ranked[:k]]
    entropy_M = topk_entropy(torch.from_numpy(lps_M_K)).numpy()
    return TeacherScores(np.asarray(req.positions), logprobs_M, ids_M_K, lps_M_K, entropy_M)
