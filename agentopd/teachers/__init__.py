"""Teachers: what scores the student's sampled tokens, behind one protocol.

A teacher takes token-exact episodes and, for every token the student sampled (mask 1), returns
its log-probability of that token, its top-k ids and log-probs there and its entropy, as one
:class:`~agentopd.types.TeacherScores` per segment. It scores the *same token ids* the student
produced (never re-tokenized text); it may see its own system prompt or privileged context, in
which case positions are realigned so each student token gets the teacher's distribution at
that token.

Backends are registered in ``agentopd.registry.teachers`` (entry-point group
``agentopd.teachers``) and chosen with ``teacher_backend=<name>``:

- ``hf``: in-process transformers (:mod:`agentopd.teachers.hf`).
- ``vllm``: in-process vLLM ``prompt_logprobs`` (:mod:`agentopd.teachers.vllm`).
- ``server``: HTTP prefill scoring on a vLLM OpenAI-compatible server
  (:mod:`agentopd.teachers.server`; ``teacher_cfg.server.*``).

A backend entry point is a :class:`TeacherFactory`.

A run on several envs routes each episode to its env's teacher
(:class:`agentopd.teachers.routing.RoutingTeacher`, itself a :class:`Teacher`); teachers that are
LoRA adapters over one base share that base in memory (:mod:`agentopd.teachers.adapters`).

Example::

    from agentopd import registry
    from agentopd.teachers import TeacherConfig

    factory = registry.teachers.spec("hf").load()
    teacher = factory("tiny-teacher-lookup-chain", tokenizer=tok, config=TeacherConfig(), device="cpu")
    scores = teacher.score(episodes)          # also stored on each episode's ``teacher`` field
    assert scores[0][0].positions_M.tolist() == [t for t, m in enumerate(episodes[0].segments[0].mask) if m]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from agentopd.schema import knob
from agentopd.types import Episode, TeacherScores

if TYPE_CHECKING:
    import torch

__all__ = [
    "BackendUnavailableError",
    "ServerConfig",
    "Teacher",
    "TeacherConfig",
    "TeacherFactory",
    "TeacherScores",
    "TokenizerMismatchError",
    "UnusableScoresError",
    "check_scores",
    "check_tokenizers",
]


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers differ, so the teacher cannot score the student's ids."""


class UnusableScoresError(ValueError):
    """A teacher backend returned scores that must not reach the learner: a NaN or infinite
    value, or lists whose shape is not the one asked for. The message names the backend, the
    episode, the segment and the position."""


class BackendUnavailableError(RuntimeError):
    """A registered backend that cannot run here (missing package, not implemented yet)."""


@dataclass
class ServerConfig:
    """The HTTP scoring endpoint of ``teacher_backend=server`` (``teacher_cfg.server.*``)."""

    url: str | None = knob(
        None, "base URL of a vLLM OpenAI-compatible server, e.g. http://127.0.0.1:8000"
    )
    model: str | None = knob(
        None, "served model name (null: the teacher name if served, else the only one served)"
    )
    api_key_env: str = knob(
        "AGENTOPD_TEACHER_API_KEY", "environment variable with the API key (unset: no key sent)"
    )
    timeout_s: float = knob(120.0, "seconds before one HTTP request is abandoned", gt=0)
    retries: int = knob(3, "retries of a failed request (connection error, 429, 5xx)", ge=0)
    backoff_s: float = knob(1.0, "delay before the first retry; doubles every retry", ge=0)
    concurrency: int = knob(8, "scoring requests in flight at once", ge=1)


@dataclass
class TeacherConfig:
    """How the teacher scores (``teacher_cfg.*``)."""

    topk: int = knob(16, "teacher top-k ids and log-probs kept per student token", ge=1)
    system_prompt: str | None = knob(
        None, "system prompt the teacher sees instead of the student's (null: the same)"
    )
    privileged: bool = knob(
        False, "append the env's privileged context (e.g. the answer) to the teacher's prompt"
    )
    batch_size: int = knob(16, "segments per teacher forward pass", ge=1)
    chunk_size: int = knob(
        512,
        "scored positions per vocabulary projection, at most (hf; also capped at 32 Mi logits)",
        ge=1,
    )
    dtype: str = knob(
        "auto",
        "weights of the in-process teacher (hf): auto (bfloat16 on CUDA, float32 on CPU), "
        "float32, bfloat16",
        choices=("auto", "float32", "bfloat16"),
    )
    server: ServerConfig = knob(factory=ServerConfig, help="teacher_backend=server endpoint")


def teacher_dtype(mode: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype ``teacher_cfg.dtype`` asks for on ``device`` (``auto``: bfloat16 on
    CUDA, where an 8B teacher then needs 16 GB instead of 32 GB; float32 elsewhere)."""
    import torch

    if mode == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[mode]


@runtime_checkable
class Teacher(Protocol):
    """Scores episodes; see the module docstring."""

    config: TeacherConfig

    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        """Score every segment of every episode; sets and returns ``episode.teacher``."""
        ...


class TeacherFactory(Protocol):
    """Builds a teacher backend from a model name or path (the ``teacher=`` key)."""

    def __call__(
        self, name: str, *, tokenizer: Any, config: TeacherConfig, device: Any
    ) -> Teacher: ...


def _episode_name(i: int, ep: Episode) -> str:
    return f"episode {i} of the batch (env {ep.env}, task {ep.task_id!r}, seed {ep.seed})"


def check_scores(episodes: list[Episode], backend: str, k: int | None = None) -> None:
    """Check every episode's ``teacher`` scores before they enter a batch.

    Each segment's scores must cover exactly its mask-1 positions, with one sampled log-prob,
    one entropy and one top-``k`` row of ids and log-probs per position, and every number must
    be finite. Every backend's scores pass through here (a backend calls it at the end of its
    ``score``), so a teacher that answers NaN or infinity stops the step with a clear error
    instead of putting a NaN gradient into the weights.

    Args:
        episodes: The scored episodes (``episode.teacher`` set).
        backend: Who scored them, for the message (``"server http://host:8000"``).
        k: The top-k asked for (None: any, but the same in every row).

    Raises:
        UnusableScoresError: The first bad value or shape, naming the backend and the episode.
    """
    for i, ep in enumerate(episodes):
        teacher = ep.teacher or []
        if len(teacher) != len(ep.segments):
            raise UnusableScoresError(
                f"teacher backend {backend}: {_episode_name(i, ep)} has {len(ep.segments)} "
                f"segments but {len(teacher)} scored"
            )
        for s, (seg, sc) in enumerate(zip(ep.segments, teacher, strict=True)):
            where = f"teacher backend {backend}: {_episode_name(i, ep)}, segment {s}"
            want = [t for t, m in enumerate(seg.mask) if m]
            if sc is None:
                if not want:
                    continue  # nothing sampled: nothing to score
                raise UnusableScoresError(f"{where}: not scored")
            if not np.array_equal(sc.positions_M, want):
                raise UnusableScoresError(
                    f"{where}: scored {len(sc.positions_M)} positions, expected the segment's "
                    f"{len(want)} sampled tokens"
                )
            n = len(want)
            for name in ("logprobs_M", "topk_ids_M_K", "topk_logprobs_M_K", "entropy_M"):
                got = len(getattr(sc, name))
                if got != n:
                    raise UnusableScoresError(f"{where}: {got} {name} for {n} positions")
            if not n:
                continue
            width = k if k is not None else sc.k
            ids, lps = sc.topk_ids_M_K.shape[1], sc.topk_logprobs_M_K.shape[1]
            if ids != width or lps != width:
                raise UnusableScoresError(
                    f"{where}: {ids} top-k ids and {lps} log-probs per position, expected {width}"
                )
            for name, values in (
                ("sampled-token log-prob", sc.logprobs_M),
                ("top-k log-prob", sc.topk_logprobs_M_K),
                ("entropy", sc.entropy_M),
            ):
                bad = np.flatnonzero(~np.isfinite(values.reshape(n, -1)).all(axis=1))
                if len(bad):
                    j = int(bad[0])
                    value = values[j].tolist()
                    raise UnusableScoresError(
                        f"{where}, position {want[j]}: {name} is {value!r}, not a finite "
                        f"number; {len(bad)} of {n} positions are bad. Check the teacher (a "
                        "NaN here would put a NaN gradient into the student's weights)"
                    )


def check_tokenizers(student: Any, teacher: Any) -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map text to the same ids."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv == tv and student.eos_token == teacher.eos_token:
        return
    only_s = sorted(set(sv) - set(tv))[:5]
    only_t = sorted(set(tv) - set(sv))[:5]
    moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:5]
    raise TokenizerMismatchError(
        "teacher and student tokenizers differ, so the teacher cannot score the student's token ids: "
        f"student vocab {len(sv)}, teacher vocab {len(tv)}; only in student {only_s}, only in teacher "
        f"{only_t}, different ids for {moved}; eos {student.eos_token!r} vs {teacher.eos_token!r}. "
        "Pick a teacher from the same model family (same tokenizer)."
    )
