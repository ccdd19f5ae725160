"""guided-opd: the p(step) schedule, mask 0 exactly on guide turns, state, and a real train run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import agentopd

from agentopd import registry, zoo
from agentopd.engines import Sample, SamplingParams
from agentopd.renderer import Renderer
from agentopd.replay.store import EpisodeStore
from agentopd.rollout import EpisodeJob, GuideSpec, run_episodes

ENV_KW = {"hops": 4}
STUDENT_TEXT = '<tool_call>{"name": "lookup", "arguments": {"key": "s00"}}</tool_call>'
TEACHER_TEXT = '<tool_call>{"name": "lookup", "arguments": {"key": "t99"}}</tool_call>'


@pytest.fixture(scope="module")
def renderer():
    return Renderer(zoo.load_tokenizer())


class FixedEngine:
    """'Samples' one fixed text per prompt, so a test knows who played each turn."""

    def __init__(self, renderer: Renderer, text: str):
        self.renderer, self.text = renderer, text
        self.temperatures: list[float] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        self.temperatures.append(params.temperature)
        toks = self.renderer.encode(self.text) + [self.renderer.eot_id]
        return [Sample(tokens=toks, logprobs=[-0.5] * len(toks), finished=True) for _ in prompts]

    def load_weights(self, state_dict) -> None:
        pass


def guided(**kw):
    return registry.curricula.make("guided-opd", env="lookup-chain", env_kwargs=ENV_KW, **kw)


def _turn_masks(ep) -> list[set[int]]:
    return [set(ep.segments[t.segment].mask[t.start : t.end]) for t in ep.turns]


def test_mask_is_zero_exactly_on_teacher_turns(renderer):
    jobs = [
        EpisodeJob("lookup-chain", s, {"split": "train"}, ENV_KW, GuideSpec(p=0.5, seed=s))
        for s in range(8)
    ]
    student, teacher = FixedEngine(renderer, STUDENT_TEXT), FixedEngine(renderer, TEACHER_TEXT)
    episodes = run_episodes(jobs, student, renderer, guide=teacher)
    n_guided = n_student = 0
    for ep in episodes:
        guided_turns = set(ep.guided_turns)
        assert ep.num_turns == 6  # hops + 2: nobody submits, the turn limit ends it
        for turn, mask in zip(ep.turns, _turn_masks(ep), strict=True):
            if turn.index in guided_turns:
                assert turn.text == TEACHER_TEXT and mask == {0}
                n_guided += 1
            else:
                assert turn.text == STUDENT_TEXT and mask == {1}
                n_student += 1
        seg = ep.segments[0]
        assert sum(seg.mask) == sum(
            t.end - t.start for t in ep.turns if t.index not in guided_turns
        )
        assert ep.guide_tokens == sum(t.end - t.start for t in ep.turns if t.index in guided_turns)
    assert n_guided > 5 and n_student > 5  # p = 0.5 over 48 turns: both kinds occur
    again = run_episodes(jobs, student, renderer, guide=teacher)
    assert [e.guided_turns for e in again] == [e.guided_turns for e in episodes]


def test_expert_guide_turns_are_masked_and_move_the_episode_on(renderer):
    job = EpisodeJob(
        "lookup-chain",
        3,
        {"split": "train"},
        ENV_KW,
        GuideSpec(p=1.0, seed=3, source="expert"),
    )
    [ep] = run_episodes([job], FixedEngine(renderer, STUDENT_TEXT), renderer)
    assert ep.success and ep.num_turns == 5 and ep.num_sampled_tokens == 0
    assert ep.guided_turns == [0, 1, 2, 3, 4] and ep.guide_tokens == 0


def test_p_zero_plays_only_the_student_and_teacher_guide_needs_an_engine(renderer):
    student = FixedEngine(renderer, STUDENT_TEXT)
    job = EpisodeJob("lookup-chain", 1, {}, ENV_KW, GuideSpec(p=0.0, seed=1))
    [ep] = run_episodes([job], student, renderer)
    assert not ep.guided_turns and all(m == {1} for m in _turn_masks(ep))
    with pytest.raises(ValueError, match="no guide engine"):
        run_episodes(
            [EpisodeJob("lookup-chain", 1, {}, ENV_KW, GuideSpec(p=0.3, seed=1))],
            student,
            renderer,
        )
    with pytest.raises(ValueError, match=r"guide p must be in \[0, 1\], got 1.5"):
        GuideSpec(p=1.5, seed=1)
    with pytest.raises(ValueError, match="guide source must be one of"):
        GuideSpec(p=0.3, seed=1, source="oracle")


def test_guide_temperature_is_the_specs(renderer):
    student, teacher = FixedEngine(renderer, STUDENT_TEXT), FixedEngine(renderer, TEACHER_TEXT)
    job = EpisodeJob("lookup-chain", 2, {}, ENV_KW, GuideSpec(p=1.0, seed=2, temperature=0.0))
    run_episodes([job], student, renderer, guide=teacher)
    assert teacher.temperatures and set(teacher.temperatures) == {0.0} and not student.temperatures


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_p_decays_to_zero_and_jobs_stop_carrying_a_guide(schedule):
    c = guided(p_start=0.8, decay_steps=10, schedule=schedule)
    ps = [c.p(n) for n in range(14)]
    assert ps[0] == pytest.approx(0.8)
    assert all(a > b for a, b in zip(ps[:10], ps[1:10]))  # strictly decreasing before D
    assert ps[10:] == [0.0] * 4
    if schedule == "linear":
        assert ps[5] == pytest.approx(0.4)
    else:
        assert ps[5] == pytest.approx(0.08)
    assert all(j.guide and j.guide.p == pytest.approx(ps[3]) for j in c.jobs(step=3, n=3))
    assert all(j.guide is None for j in c.jobs(step=10, n=3))
    assert c.describe(5) == {"curriculum/guide_p": pytest.approx(ps[5])}


def test_state_round_trips_and_bad_knobs_are_refused():
    a, b = guided(p_start=0.5, decay_steps=8), guided(p_start=0.5, decay_steps=8)
    ja = a.jobs(step=3, n=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.step == 3 and b.state_dict() == a.state_dict() == {
        "step": 3,
        "p": pytest.approx(0.3125),
    }
    assert [(j.seed, j.options) for j in b.jobs(step=3, n=4)] == [(j.seed, j.options) for j in ja]
    for kw, match in (
        ({"p_start": 1.5}, "p_start"),
        ({"decay_steps": 0}, "decay_steps"),
        ({"schedule": "cosine"}, "schedule"),
        ({"source": "oracle"}, "source"),
    ):
        with pytest.raises(ValueError, match=match):
            guided(**kw)


TRAIN_ARGS = (
    "train",
    "env=lookup-chain",
    "env_kwargs.hops=3",
    "student=tiny",
    "teacher=tiny-teacher",
    "episodes_per_step=3",
    "cold_start.steps=0",
    "eval.episodes=0",
    "rollout.max_new_tokens=24",
    "curriculum=guided-opd",
    "curriculum_kwargs.p_start=0.9",
    "curriculum_kwargs.decay_steps=2",
    "checkpoint_every=1",
    "steps=2",
)


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory) -> Path:
    """Two uninterrupted guided-opd training steps."""
    runs = tmp_path_factory.mktemp("guided")
    r = agentopd(*TRAIN_ARGS, f"runs_dir={runs}", "run_name=guided", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return runs / "guided"


def _step_episodes(run: Path, step: int) -> list:
    return [e for row, e in EpisodeStore(run).iter_episodes() if row.step == step]


@pytest.mark.slow
def test_train_two_steps_with_guided_opd(guided_run):
    run = guided_run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("phase") == "train"]
    assert [row["curriculum/guide_p"] for row in train] == [pytest.approx(0.9), pytest.approx(0.45)]
    episodes = [e for row, e in EpisodeStore(run).iter_episodes() if row.step == 0]
    guided_tokens = 0
    for ep in episodes:
        turns = set(ep.guided_turns)
        for t in ep.turns:
            assert set(ep.segments[t.segment].mask[t.start : t.end]) == (
                {0} if t.index in turns else {1}
            )
        guided_tokens += ep.guide_tokens
    assert guided_tokens > 0  # p = 0.9: the teacher played turns
    assert train[0]["teacher_tokens"] == guided_tokens + sum(e.num_sampled_tokens for e in episodes)
    state = json.loads(next(Path(run / "checkpoints").glob("*/state.json")).read_text())
    assert state["curriculum"]["step"] in (0, 1) and "p" in state["curriculum"]


@pytest.mark.slow
def test_resume_after_a_kill_restores_the_guided_curriculum(guided_run, tmp_path):
    """Killed right after the step-0 checkpoint (curriculum state step 0, p = 0.9), then
    resumed: step 1 runs at p = 0.45 and plays the same guided mixture, token for token, as the
    uninterrupted run."""
    import os
    import signal

    os.environ["AGENTOPD_KILL_AT"] = "checkpoint:0"
    try:
        r = agentopd(*TRAIN_ARGS, f"runs_dir={tmp_path}", "run_name=k", timeout=600)
    finally:
        del os.environ["AGENTOPD_KILL_AT"]
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "k"
    state = json.loads((run / "checkpoints" / "step_000000" / "state.json").read_text())
    assert state["curriculum"] == {"step": 0, "p": pytest.approx(0.9)}
    r = agentopd(*TRAIN_ARGS, f"runs_dir={tmp_path}", "run_name=k", "resume=true", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("phase") == "train"]
    assert [row["step"] for row in train] == [0, 1]
    assert train[1]["curriculum/guide_p"] == pytest.approx(0.45)
    resumed, reference = _step_episodes(run, 1), _step_episodes(guided_run, 1)
    assert [e.guided_turns for e in resumed] == [e.guided_turns for e in reference]
    assert [e.segments[0].tokens for e in resumed] == [e.segments[0].tokens for e in reference]


def test_a_guide_needs_the_teacher_only_when_the_teacher_may_play():
    assert GuideSpec(p=0.3, seed=1).needs_teacher
    assert not GuideSpec(p=0.0, seed=1).needs_teacher
    assert not GuideSpec(p=0.3, seed=1, source="expert").needs_teacher
