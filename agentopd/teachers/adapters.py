"""LoRA expert teachers over one shared base model, in process (``teacher_backend=hf``).

When several envs of a run route to teachers that are LoRA adapters over the same base (the
zoo's env experts ``smollm2-135m-<env>``, or directories holding a peft adapter whose
``adapter_config.json`` names its base), the builder loads the base once and every adapter
beside it, unmerged (:func:`agentopd.lora.load_experts`). Each expert is an
:class:`ExpertTeacher`: the ``hf`` teacher over the shared model, which switches the active
adapter (:func:`agentopd.lora.use_expert`) before it scores. With
:class:`~agentopd.teachers.routing.RoutingTeacher` grouping the batch by teacher, a step
switches adapters once per expert, and memory holds one base plus N small adapters instead of
N full models.

An unmerged adapter computes ``W x + (alpha / r) B A x`` where a merged one computes
``(W + (alpha / r) B A) x``: the same function, equal up to float rounding (the tests compare
the two at 1e-4 on log-probs in float32).

Example::

    experts = build_experts(
        "smollm2-135m",
        {"smollm2-135m-lookup-chain": path1, "smollm2-135m-sql": path2},
        tokenizer=tok, config=TeacherConfig(), device="cpu",
    )
    experts["smollm2-135m-sql"].score(episodes)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agentopd import lora
from agentopd.engines import Engine, SamplingParams
from agentopd.renderer import Renderer
from agentopd.teachers import TeacherConfig, check_tokenizers, teacher_dtype
from agentopd.teachers.hf import HFTeacher
from agentopd.types import Episode, TeacherScores


class SharedBase:
    """One base model holding several LoRA adapters, unmerged; one is active at a time.

    Args:
        model: The base causal LM (its weights are not copied).
        adapters: Adapter name (a peft adapter name: no dots) -> its directory.
    """

    def __init__(self, model: Any, adapters: dict[str, Path]):
        self.model = lora.load_experts(model, adapters)
        self.names = list(adapters)
        self.active: str | None = None

    def use(self, name: str) -> None:
        """Make adapter ``name`` the active one."""
        if name != self.active:
            lora.use_expert(self.model, name)
            self.active = name


class ExpertTeacher(HFTeacher):
    """The ``hf`` teacher of one expert of a :class:`SharedBase`."""

    def __init__(self, shared: SharedBase, adapter: str, renderer: Renderer, config: TeacherConfig):
        super().__init__(shared.model, renderer, config)
        self.shared = shared
        self.adapter = adapter

    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        self.shared.use(self.adapter)
        return super().score(episodes)


class ExpertEngine:
    """A rollout engine over a :class:`SharedBase` that plays one expert: it activates the
    expert's adapter before every generation (the teacher's demonstrations and evaluation)."""

    def __init__(self, engine: Engine, teacher: ExpertTeacher):
        self.engine = engine
        self.teacher = teacher

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Any]:
        self.teacher.shared.use(self.teacher.adapter)
        return self.engine.generate(prompts, params)

    def load_weights(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("an expert teacher's engine is frozen: it takes no new weights")


def build_experts(
    base: str,
    adapters: dict[str, Path],
    *,
    tokenizer: Any,
    config: TeacherConfig,
    device: Any,
) -> dict[str, ExpertTeacher]:
    """Load ``base`` once with every adapter of ``adapters`` (teacher name -> directory) and
    return one :class:`ExpertTeacher` per teacher name.

    Raises:
        TokenizerMismatchError: The base's tokenizer differs from the student's ``tokenizer``.
        ValueError: An adapter does not fit the base.
    """
    from agentopd import zoo

    model, teacher_tok = zoo.load(base, progress=True)
    check_tokenizers(tokenizer, teacher_tok)
    model.to(device=device, dtype=teacher_dtype(config.dtype, device)).eval()
    names = {name: f"expert{i}" for i, name in enumerate(adapters)}
    shared = SharedBase(model, {names[n]: path for n, path in adapters.items()})
    shared.model.to(device=device, dtype=teacher_dtype(config.dtype, device))
    renderer = Renderer(teacher_tok)
    return {n: ExpertTeacher(shared, names[n], renderer, config) for n in adapters}
