"""The multi-turn rollout loop.

A batch of episodes advances turn by turn: the prompts of all active episodes go to the engine in
one call, the sampled turns are stepped through their environments in a thread pool (so slow
tools overlap), and the renderer appends bridge tokens for the tool results. Each episode ends on
an answer, the turn limit, the token budget, or an environment error, and records why.

The same loop plays scripted experts (:func:`expert_episodes`): their text is encoded once and
treated as "sampled" (mask 1), which is what cold-start SFT trains on.

Guided episodes (the ``guided-opd`` curriculum) mix policies within one episode: a job whose
``guide`` is a :class:`GuideSpec` (e.g. ``GuideSpec(p=0.4, seed=7, source="teacher")``) hands
each turn, with probability ``p`` (drawn per episode and turn index from ``seed``), to the
teacher engine passed as ``run_episodes(..., guide=...)`` or to the env's scripted expert
(source ``expert``). Guide turns get mask 0 and their turn indices are listed in
``episode.guided_turns`` (the teacher's generated tokens in ``episode.guide_tokens``); only the
student's own turns are distilled.
"""

from __future__ import annotations

import concurrent.futures
import math
import random
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agentopd.engines import Engine, Sample, SamplingParams
from agentopd.env import Env, RolloutEnv, rollout_env
from agentopd.parsing import PARSER_MODES
from agentopd.registry import make
from agentopd.renderer import PrefixMismatchError, Renderer
from agentopd.schema import knob
from agentopd.types import Episode, Segment, StopReason, Turn


@dataclass
class RolloutConfig:
    """Knobs of the rollout loop (the ``rollout.*`` keys)."""

    max_new_tokens: int = knob(96, "generation limit per turn", ge=1)
    max_episode_tokens: int = knob(
        1536, "token budget per segment (prompt + all turns + bridges)", ge=2
    )
    temperature: float = knob(1.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = knob(1.0, "nucleus sampling mass", gt=0, le=1)
    tool_workers: int = knob(8, "threads that run env.step (tool calls) concurrently", ge=1)
    mask_parse_errors: bool = knob(
        False, "give mask 0 to turns whose tool calls could not be parsed"
    )
    tool_parser: str = knob(
        "lenient",
        "how tool calls are read: lenient, or vllm-hermes (what vLLM's Hermes parser "
        "accepts; docs/parsing.md)",
        choices=PARSER_MODES,
    )
    on_prefix_mismatch: str = knob(
        "error",
        "when the chat template rewrites history: fail, or start a new segment",
        choices=("error", "new-segment"),
    )


@dataclass
class GuideSpec:
    """Who else plays a guided episode's turns (``guided-opd``), and how often.

    Each turn is the guide's with probability ``p``, decided from ``seed`` and the turn index
    (so a rerun mixes the same turns). ``source`` ``teacher``: the teacher model generates it
    (at ``temperature``, default the rollout's); ``expert``: the env's scripted expert writes it.
    Guide turns get mask 0.
    """

    p: float
    seed: int
    source: str = "teacher"
    temperature: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"guide p must be in [0, 1], got {self.p!r}")
        if self.source not in GUIDE_SOURCES:
            raise ValueError(f"guide source must be one of {GUIDE_SOURCES}, got {self.source!r}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"guide temperature must be >= 0, got {self.temperature!r}")

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher model may play some turns, so that :func:`run_episodes` needs a
        guide engine around it."""
        return self.source == "teacher" and self.p > 0


@dataclass
class EpisodeJob:
    """What to play: an env, its constructor kwargs, a seed and reset options."""

    env: str
    """Registry name of the environment."""
    seed: int
    """Seed for ``env.reset``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Reset options (task choice, ``max_turns``, ``replay``, ``split``)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor kwargs."""
    guide: GuideSpec | None = None
    """Guided episode (``guided-opd``): who else plays its turns; None: the student alone."""


@dataclass
class _Live:
    env: Env
    episode: Episode
    tools: list[dict[str, Any]]
    stream_text: str
    done: bool = False
    pending: Sample | None = None
    guided: bool = False
    """The current turn is played by the guide (teacher or expert): it gets mask 0."""
    guide: GuideSpec | None = None
    """The job's guide spec."""

    def __post_init__(self) -> None:
        self.io: RolloutEnv = rollout_env(self.env)
        """The env's rollout part: tool parser, sampled-token observation, message history."""


Policy = Callable[[list["_Live"]], list[Sample]]


def run_episodes(
    jobs: list[EpisodeJob],
    engine: Engine,
    renderer: Renderer,
    config: RolloutConfig | None = None,
    *,
    seed: int | None = None,
    guide: Engine | None = None,
) -> list[Episode]:
    """Play ``jobs`` with the engine's policy; returns one token-exact episode per job.

    Jobs with a :class:`GuideSpec` are guided: each of their turns is played, with the spec's
    probability, by ``guide`` (source ``teacher``, sampling at the spec's ``temperature``,
    default the rollout's) or by the env's scripted expert (source ``expert``), and gets mask 0.

    Raises:
        ValueError: A job asks for a teacher guide and ``guide`` is None.
    """
    cfg = config or RolloutConfig()
    for job in jobs:
        _check_guide_spec(job, guide)
    call_seeds = call_seed_stream(seed)

    def policy(lives: list[_Live]) -> list[Sample]:
        call_seed = next(call_seeds)
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, call_seed)
        out: list[Sample | None] = [None] * len(lives)
        by_source: dict[str, list[int]] = {"student": [], "teacher": [], "expert": []}
        temperature = cfg.temperature
        for i, lv in enumerate(lives):
            lv.guided = _guide_turn(lv)
            spec = lv.guide
            by_source[spec.source if lv.guided and spec else "student"].append(i)
            if lv.guided and spec and spec.temperature is not None:
                temperature = float(spec.temperature)
        groups: list[tuple[str, Any, SamplingParams]] = [("student", engine, params)]
        if by_source["teacher"]:
            t_seed = None if call_seed is None else call_seed ^ _GUIDE_SEED_SALT
            t_params = SamplingParams(cfg.max_new_tokens, temperature, cfg.top_p, t_seed)
            groups.append(("teacher", guide, t_params))
        for source, eng, p in groups:
            idx = by_source[source]
            if idx:
                samples = eng.generate([lives[i].episode.segments[-1].tokens for i in idx], p)
                for i, sample in zip(idx, samples, strict=True):
                    out[i] = sample
        for i in by_source["expert"]:
            out[i] = _expert_sample(lives[i], renderer)
        for i in by_source["teacher"]:
            sample = out[i]
            assert sample is not None  # every teacher-guided slot was filled above
            lives[i].episode.guide_tokens += len(sample.tokens)
        return out  # type: ignore[return-value]

    return _play(jobs, policy, renderer, cfg)


GUIDE_SOURCES = ("teacher", "expert")
_GUIDE_SEED_SALT = 0x5EED_7EAC
"""Mixed into a call's seed for the guide engine, so student and guide never share a stream."""


def call_seed_stream(seed: int | None) -> Iterator[int | None]:
    """The seed of each successive engine call of one rollout.

    Call ``k`` of a rollout seeded with ``seed`` gets ``SeedSequence([seed, k])``'s first 31-bit
    word: every turn draws fresh random numbers (re-seeding every call with the same value would
    replay the first turn's draws), and a rerun with the same ``seed`` is identical. ``None``
    gives ``None`` forever (each engine continues its own generator).
    """
    k = 0
    while True:
        if seed is None:
            yield None
        else:
            state = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, k])
            yield int(state.generate_state(1, dtype=np.uint32)[0] >> 1)
        k += 1


def _check_guide_spec(job: EpisodeJob, guide: Engine | None) -> None:
    spec = job.guide
    if spec is not None and spec.needs_teacher and guide is None:
        raise ValueError(
            "a job asks for teacher-guided turns (GuideSpec source 'teacher') but run_episodes "
            "got no guide engine; pass guide=<teacher engine> or use source 'expert'"
        )


def _guide_turn(lv: _Live) -> bool:
    """Whether the guide plays this episode's next turn (deterministic in seed and turn index)."""
    spec = lv.guide
    if spec is None or spec.p <= 0:
        return False
    index = lv.episode.replayed_turns + len(lv.episode.turns)
    if random.Random(f"guide:{int(spec.seed)}:{index}").random() >= float(spec.p):
        return False
    lv.episode.guided_turns.append(index)
    return True


def expert_episodes(
    jobs: list[EpisodeJob], renderer: Renderer, config: RolloutConfig | None = None
) -> list[Episode]:
    """Play ``jobs`` with each env's scripted expert (mask 1 on the expert's tokens)."""
    cfg = config or RolloutConfig(max_new_tokens=10_000, max_episode_tokens=100_000)

    def policy(lives: list[_Live]) -> list[Sample]:
        return [_expert_sample(lv, renderer) for lv in lives]

    return _play(jobs, policy, renderer, cfg)


def _expert_sample(lv: _Live, renderer: Renderer, guarded: bool = True) -> Sample:
    """The env's scripted expert's next turn as a sample: the one place the rollout calls
    ``expert_action`` (expert episodes, expert-guided turns). Guarded, an expert that raises
    ends its episode as ``env_error`` and plays nothing; unguarded, the exception propagates."""

    def tokens() -> list[int]:
        return renderer.encode(lv.env.expert_action(list(lv.io.messages))) + [renderer.eot_id]

    toks = (_guarded(lv, tokens) if guarded else tokens()) or []
    return Sample(tokens=toks, logprobs=[0.0] * len(toks), finished=True)


def expert_episode(
    env: Env, renderer: Renderer, seed: int, options: dict[str, Any] | None = None
) -> Episode:
    """One expert episode on an already-built env (convenience for tests and bootstrapping)."""
    name = getattr(env, "spec_name", type(env).__name__)
    lv = _start_with(env, EpisodeJob(name, seed, dict(options or {})), renderer)
    cfg = RolloutConfig(max_new_tokens=10_000, max_episode_tokens=100_000)

    def policy(lives: list[_Live]) -> list[Sample]:
        return [_expert_sample(lives[0], renderer, guarded=False)]

    _loop([lv], policy, renderer, cfg, close=False)
    return lv.episode


def scripted_episode(
    env: Env,
    renderer: Renderer,
    seed: int,
    turns: list[str],
    options: dict[str, Any] | None = None,
) -> Episode:
    """Play the assistant texts ``turns`` in order on an already-built env, through the same
    loop as :func:`run_episodes` (an exception ends the episode as ``env_error``). Past the last
    text the policy answers ``""``. For conformance checks, tests and fuzzing.
    """
    name = getattr(env, "spec_name", type(env).__name__)
    lv = _start_or_fail(env, EpisodeJob(name, seed, dict(options or {})), renderer)
    cfg = RolloutConfig(max_new_tokens=1_000_000, max_episode_tokens=10_000_000)
    todo = list(turns)

    def policy(lives: list[_Live]) -> list[Sample]:
        text = todo.pop(0) if todo else ""
        toks = _guarded(lives[0], lambda: renderer.encode(text) + [renderer.eot_id]) or []
        return [Sample(tokens=toks, logprobs=[0.0] * len(toks), finished=True)]

    _loop([lv], policy, renderer, cfg, close=False)
    return lv.episode


# ------------------------------------------------------------------------------------------
def _start_with(env: Env, job: EpisodeJob, renderer: Renderer) -> _Live:
    messages, info = env.reset(seed=job.seed, options=job.options)
    tools = info.get("tools") or []
    tokens, text = renderer.initial_prompt(messages, tools)
    seg = Segment(prompt_len=len(tokens))
    seg.append(tokens, None, sampled=False)
    ep = Episode(
        env=job.env,
        task_id=str(info.get("task_id", "")),
        seed=job.seed,
        segments=[seg],
        replayed_turns=int(info.get("replayed_turns", 0)),
        info={
            "difficulty": info.get("difficulty", 1),
            "max_turns": info.get("max_turns"),
            "options": {k: v for k, v in job.options.items() if k != "replay"},
            "tool_errors": {},
        },
        n_prompt_messages=len(messages),
        tools=tools,
        privileged_context=env.privileged_context(),
    )
    return _Live(env=env, episode=ep, tools=tools, stream_text=text, guide=job.guide)


def _play(
    jobs: list[EpisodeJob], policy: Policy, renderer: Renderer, cfg: RolloutConfig
) -> list[Episode]:
    lives = []
    try:
        for job in jobs:
            env = make(job.env, **job.env_kwargs)
            rollout_env(env).tool_parser = cfg.tool_parser
            lives.append(_start_or_fail(env, job, renderer))
        _loop(lives, policy, renderer, cfg, close=True)
    finally:
        for lv in lives:
            _close(lv)
    return [lv.episode for lv in lives]


def _start_or_fail(env: Env, job: EpisodeJob, renderer: Renderer) -> _Live:
    """:func:`_start_with`, or an already finished ``env_error`` episode if reset or render fails."""
    try:
        return _start_with(env, job, renderer)
    except Exception as e:  # noqa: BLE001 - one broken episode must not lose the batch
        ep = Episode(env=job.env, task_id="", seed=job.seed, segments=[Segment()])
        lv = _Live(env=env, episode=ep, tools=[], stream_text="")
        _fail(lv, e)
        return lv


def _fail(lv: _Live, error: BaseException) -> None:
    """End the episode with ``env_error``, keeping the traceback in ``info["error"]``."""
    text = getattr(error, "__traceback_text__", None) or "".join(
        traceback.format_exception(type(error), error, error.__traceback__)
    )
    lv.episode.info["error"] = text
    _finish(lv, StopReason.ENV_ERROR)


def _guarded(lv: _Live, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; an exception ends this episode with ``env_error`` (returns ``False``).

    A :class:`PrefixMismatchError` still propagates: a template that rewrites history is a
    configuration error of the whole run (invariant 3: fail loudly), not one episode's.
    """
    try:
        return fn(*args)
    except PrefixMismatchError:
        raise
    except Exception as e:  # noqa: BLE001 - an env, tool or rendering bug ends this episode only
        _fail(lv, e)
        return False


def _close(lv: _Live) -> None:
    try:
        lv.env.close()
    except Exception:  # noqa: BLE001 - closing must not hide the rollout's own result
        pass


def _loop(
    lives: list[_Live], policy: Policy, renderer: Renderer, cfg: RolloutConfig, close: bool
) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, cfg.tool_workers)) as pool:
        while True:
            active = [lv for lv in lives if not lv.done]
            for lv in active:
                if len(lv.episode.segments[-1].tokens) >= cfg.max_episode_tokens:
                    _finish(lv, StopReason.TOKEN_BUDGET)
            active = [lv for lv in active if not lv.done]
            if not active:
                break
            samples = policy(active)
            stepping = []
            for lv, sample in zip(active, samples, strict=True):
                if not lv.done and _guarded(lv, _record_turn, lv, sample, renderer, cfg):
                    stepping.append(lv)
            futures = [(lv, pool.submit(_step, lv)) for lv in stepping]
            for lv, fut in futures:
                result = fut.result()
                _guarded(lv, _after_step, lv, result, renderer, cfg)
    for lv in lives:
        lv.episode.messages = list(lv.io.messages)
        if close:
            _close(lv)


def _record_turn(lv: _Live, sample: Sample, renderer: Renderer, cfg: RolloutConfig) -> bool:
    """Append the sampled tokens; returns whether the turn should be stepped."""
    ep = lv.episode
    seg = ep.segments[-1]
    room = cfg.max_episode_tokens - len(seg.tokens)
    tokens, logprobs, finished = sample.tokens[:room], sample.logprobs[:room], sample.finished
    if len(tokens) < len(sample.tokens):
        finished = False
    start = len(seg.tokens)
    seg.append(tokens, logprobs, sampled=not lv.guided)  # guide turns are not the student's
    content, ended = renderer.strip_eot(tokens)
    text = renderer.decode(content)
    lv.stream_text += renderer.decode(tokens)
    turn = Turn(
        index=ep.replayed_turns + len(ep.turns),
        segment=len(ep.segments) - 1,
        start=start,
        end=start + len(tokens),
        text=text,
    )
    ep.turns.append(turn)
    if not (finished and ended):
        _finish(lv, StopReason.TOKEN_BUDGET)
        return False
    lv.pending = sample
    return True


def _step(lv: _Live) -> tuple[Any, ...] | BaseException:
    try:
        turn = lv.episode.turns[-1]
        # An env that hands the turn to a foreign loop (verifiers) also passes on the exact
        # sampled ids and their log-probs; every other env ignores them.
        seg = lv.episode.segments[turn.segment]
        lv.io.observe_sampled(
            seg.tokens[turn.start : turn.end], seg.logprobs[turn.start : turn.end]
        )
        return lv.env.step(turn.text)
    except Exception as e:  # noqa: BLE001 - an env bug ends this episode, not the batch
        e.__traceback_text__ = traceback.format_exc()  # type: ignore[attr-defined]
        return e


def _after_step(lv: _Live, result: Any, renderer: Renderer, cfg: RolloutConfig) -> None:
    ep = lv.episode
    turn = ep.turns[-1]
    if isinstance(result, BaseException):
        _fail(lv, result)
        return
    new_messages, reward, terminated, truncated, info = result
    if not math.isfinite(float(reward)):
        raise ValueError(
            f"env {ep.env!r} returned a non-finite reward ({reward!r}) at turn {turn.index}; "
            "rewards must be finite numbers"
        )
    assistant = lv.io.messages[-1 - len(new_messages)]
    turn.tool_calls = list(assistant.tool_calls)
    turn.tool_results = list(new_messages)
    turn.parse_error = info.get("parse_error")
    turn.reward = float(reward)
    ep.reward += float(reward)
    counts = Counter(ep.info.get("tool_errors", {}))
    counts.update(info.get("tool_errors", []))
    ep.info["tool_errors"] = dict(counts)
    if turn.parse_error is not None and cfg.mask_parse_errors:
        seg = ep.segments[turn.segment]
        seg.mask[turn.start : turn.end] = [0] * (turn.end - turn.start)
    if terminated:
        ep.success = bool(info.get("success", reward > 0))
        _finish(lv, StopReason.ANSWER)
        return
    if truncated:
        _finish(lv, StopReason.MAX_TURNS)
        return
    bridge = renderer.bridge(lv.stream_text, lv.io.messages, lv.tools)
    held = 0 if bridge.new_segment else len(ep.segments[-1].tokens)
    if held + len(bridge.tokens) > cfg.max_episode_tokens:
        # The observation does not fit the token budget: the episode ends here rather than
        # growing past max_episode_tokens (its messages still hold the observation).
        _finish(lv, StopReason.TOKEN_BUDGET)
        return
    if bridge.new_segment:
        seg = Segment(prompt_len=len(bridge.tokens))
        seg.append(bridge.tokens, None, sampled=False)
        ep.segments.append(seg)
        lv.stream_text = bridge.text
        ep.info["segments_restarted"] = ep.info.get("segments_restarted", 0) + 1
    else:
        ep.segments[-1].append(bridge.tokens, None, sampled=False)
        lv.stream_text += bridge.text


def _finish(lv: _Live, reason: StopReason) -> None:
    lv.done = True
    lv.episode.stop_reason = reason
