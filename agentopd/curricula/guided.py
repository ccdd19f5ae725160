"""``guided-opd``: teacher and student turns mixed in each training episode, the teacher's share
decaying to zero.

At step n every turn of every training episode is played by the guide with probability p(n),
else by the student. The guide is the teacher model generating through a rollout engine
(``source="teacher"``, the default; the trainer builds the engine around the teacher model) or the
env's scripted expert (``source="expert"``). Guide turns enter the episode with mask 0, so only
the student's own turns are distilled; they steer the episode into states a good policy visits,
from which the student then acts.

Schedules (``decay_steps`` = D, ``p_start`` = p0):

* ``linear``: p(n) = p0 · max(0, 1 − n / D);
* ``exponential``: p(n) = p0 · 0.01^(n / D) for n < D, then 0 (p has fallen to 1% of p0 at D).

Both reach exactly 0 at n = D, after which the curriculum is ``uniform``. The choice per turn is
deterministic in (task seed, turn index), so a resumed run replays the same mixture.

Example::

    agentopd train env=lookup-chain curriculum=guided-opd \\
        curriculum_kwargs.p_start=0.5 curriculum_kwargs.decay_steps=20
"""

from __future__ import annotations

import math
from typing import Any

from agentopd.curricula.schedules import SeededCurriculum
from agentopd.env import missing_expert
from agentopd.registry import make
from agentopd.rollout import GUIDE_SOURCES, GuideSpec

SCHEDULES = ("linear", "exponential")


class GuidedOPD(SeededCurriculum):
    """Mix guide (teacher or expert) turns into training episodes with probability p(step).

    Args:
        env: Registry name of the environment.
        env_kwargs: Its constructor kwargs.
        seed: Base seed of the tasks.
        p_start: Probability that a turn is the guide's at step 0, in [0, 1].
        decay_steps: Steps after which p is 0 (>= 1).
        schedule: ``linear`` or ``exponential`` (see the module docstring).
        source: ``teacher`` (the teacher model generates the guide turns) or ``expert`` (the
            env's scripted expert plays them; the env must have one).
        temperature: Sampling temperature of teacher guide turns (None: the rollout's).

    Raises:
        ValueError: A knob is out of range or not one of the listed choices.
    """

    name = "guided-opd"

    def __init__(
        self,
        env: str,
        env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        p_start: float = 0.5,
        decay_steps: int = 20,
        schedule: str = "linear",
        source: str = "teacher",
        temperature: float | None = None,
    ):
        super().__init__(env, env_kwargs, seed)
        if not 0.0 <= p_start <= 1.0:
            raise ValueError(f"guided-opd: p_start must be in [0, 1], got {p_start}")
        if decay_steps < 1:
            raise ValueError(f"guided-opd: decay_steps must be >= 1, got {decay_steps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"guided-opd: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if source not in GUIDE_SOURCES:
            raise ValueError(f"guided-opd: source must be one of {GUIDE_SOURCES}, got {source!r}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"guided-opd: temperature must be >= 0, got {temperature}")
        if source == "expert":
            probe = make(env, **self.env_kwargs)
            try:
                reason = missing_expert(probe)
            finally:
                probe.close()
            if reason:
                raise ValueError(
                    f"guided-opd: source='expert' but env {env!r} has no scripted expert "
                    f"({reason}); use source='teacher'"
                )
        self.p_start, self.decay_steps = float(p_start), int(decay_steps)
        self.schedule, self.source = schedule, source
        self.temperature = None if temperature is None else float(temperature)

    def p(self, step: int) -> float:
        """Probability that a turn at training step ``step`` is played by the guide."""
        if step >= self.decay_steps:
            return 0.0
        frac = step / self.decay_steps
        if self.schedule == "linear":
            return self.p_start * (1.0 - frac)
        return self.p_start * math.pow(0.01, frac)

    def guide_for(self, step: int, seed: int) -> GuideSpec | None:
        p = self.p(step)
        if p <= 0:
            return None
        return GuideSpec(p=p, seed=seed, source=self.source, temperature=self.temperature)

    def describe(self, step: int) -> dict[str, Any]:
        return {"curriculum/guide_p": self.p(step)}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "p": self.p(self.step)}
