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

Example::

    from agentopd import registry
    from agentopd.teachers import TeacherConfig

    factory = registry.teachers.spec("hf").load()
    teacher = factory("tiny-teacher-lookup-chain", tokenizer=tok, config=TeacherConfig(), device="cpu")
    scores = teacher.score(episodes)          # also stored on each episode's ``teacher`` field
    assert scores[0][0].positions == [t for t, m in enumerate(episodes[0].segments[0].mask) if m]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agentopd.schema import knob
from agentopd.types import Episode, TeacherScores

__all__ = [
    "BackendUnavailableError",
    "ServerConfig",
    "Teacher",
    "TeacherConfig",
    "TeacherFactory",
    "TeacherScores",
    "TokenizerMismatchError",
    "check_tokenizers",
]


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers differ, so the teacher cannot score the student's ids."""


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
        512, "scored positions per vocabulary projection (hf: bounds memory to chunk x V)", ge=1
    )
    dtype: str = knob(
        "auto",
        "weights of the in-process teacher (hf): auto (bfloat16 on CUDA, float32 on CPU), "
        "float32, bfloat16",
        choices=("auto", "float32", "bfloat16"),
    )
    server: ServerConfig = knob(factory=ServerConfig, help="teacher_backend=server endpoint")


def teacher_dtype(mode: str, device: Any) -> Any:
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
