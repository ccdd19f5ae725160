"""Episode JSONL round-trip (property-based) and the loss-mask invariants of ``Segment.append``."""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentopd.types import (
    Episode,
    Message,
    Segment,
    StopReason,
    TeacherScores,
    ToolCall,
    Turn,
)

# ---------------------------------------------------------------- comparison that sees NaN and -0.0


def same(a: Any, b: Any) -> bool:
    """Deep equality that also compares types, NaN with NaN and the sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
            and np.array_equal(np.signbit(a) & (a == a), np.signbit(b) & (b == b))
        )
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------- strategies

text = st.text(max_size=40)
# Keys that collide with the non-finite float encoding are drawn on purpose.
keys = st.one_of(st.sampled_from(["__float__", "__dict__", "name", ""]), st.text(max_size=8))
any_float = st.floats(allow_nan=True, allow_infinity=True)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), any_float, text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=8,
)
json_object = st.dictionaries(keys, json_value, max_size=4)
tool_calls = st.lists(
    st.builds(ToolCall, name=text, arguments=json_object, id=st.none() | text), max_size=2
)
messages = st.builds(
    Message,
    role=st.sampled_from(["system", "user", "assistant", "tool"]),
    content=text,
    tool_calls=tool_calls,
    name=st.none() | text,
    tool_call_id=st.none() | text,
)


@st.composite
def segments(draw: st.DrawFn) -> Segment:
    n = draw(st.integers(0, 12))
    return Segment(
        tokens=draw(st.lists(st.integers(0, 2**31), min_size=n, max_size=n)),
        logprobs=draw(st.lists(any_float, min_size=n, max_size=n)),
        mask=draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)),
        prompt_len=draw(st.integers(0, n)),
    )


turns = st.builds(
    Turn,
    index=st.integers(0, 50),
    segment=st.integers(0, 3),
    start=st.integers(0, 1000),
    end=st.integers(0, 1000),
    text=text,
    tool_calls=tool_calls,
    tool_results=st.lists(messages, max_size=2),
    parse_error=st.none() | text,
    replayed=st.booleans(),
    reward=any_float,
)


@st.composite
def teacher_scores(draw: st.DrawFn) -> TeacherScores:
    n, k = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    f32 = st.floats(width=32)

    def rows(values: st.SearchStrategy[Any]) -> list[list[Any]]:
        return draw(st.lists(st.lists(values, min_size=k, max_size=k), min_size=n, max_size=n))

    return TeacherScores(
        positions_M=draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)),
        logprobs_M=draw(st.lists(f32, min_size=n, max_size=n)),
        topk_ids_M_K=rows(st.integers(0, 1000)),
        topk_logprobs_M_K=rows(f32),
        entropy_M=draw(st.lists(f32, min_size=n, max_size=n)),
    )


teacher = st.none() | st.lists(st.none() | teacher_scores(), max_size=3)
episodes = st.builds(
    Episode,
    env=text,
    task_id=text,
    seed=st.none() | st.integers(),
    messages=st.lists(messages, max_size=3),
    segments=st.lists(segments(), max_size=3),
    turns=st.lists(turns, max_size=3),
    reward=any_float,
    success=st.booleans(),
    stop_reason=st.sampled_from(list(StopReason)),
    info=json_object,
    teacher=teacher,
)


# ---------------------------------------------------------------- round-trip


@settings(max_examples=100, deadline=None)
@given(episodes)
def test_episode_jsonl_round_trip_is_lossless(ep: Episode) -> None:
    line = ep.to_json()
    assert len(line.splitlines()) == 1
    line.encode("utf-8")  # writable to a UTF-8 file
    back = Episode.from_json(line)
    assert isinstance(back.stop_reason, StopReason)
    assert all(isinstance(m, Message) for m in back.messages)
    assert all(isinstance(t, Turn) for t in back.turns)
    assert all(isinstance(s, Segment) for s in back.segments)
    assert same(asdict(back), asdict(ep))
    assert back.to_json() == line


def test_round_trip_through_a_file_with_odd_unicode(tmp_path: Path) -> None:
    weird = "line\u2028sep\u2029para\x85nel\r\n\ud800lone\udfffsurrogates \U0001f600 é"
    eps = [
        Episode(env="e", task_id=weird, messages=[Message(role="user", content=weird)]),
        Episode(env="e", task_id="2", info={"__float__": "NaN"}, reward=-math.inf),
    ]
    path = tmp_path / "episodes.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for ep in eps:
            f.write(ep.to_json() + "\n")
    raw = path.read_text(encoding="utf-8")
    assert len(raw.splitlines()) == 2
    back = [Episode.from_json(line) for line in raw.splitlines()]
    assert back[0].task_id == weird and back[0].messages[0].content == weird
    assert back[1].info == {"__float__": "NaN"}
    assert back[1].reward == -math.inf


def test_marker_lookalikes_in_user_data_are_not_decoded() -> None:
    info = {
        "a": {"__float__": "NaN"},
        "b": {"__float__": "not-a-float-name"},
        "c": {"__dict__": {"__float__": "Infinity"}},
        "d": {"__float__": 1, "other": 2},
        "e": math.nan,
    }
    back = Episode.from_json(Episode(env="e", task_id="t", info=info).to_json())
    assert same(back.info, info)


def test_non_finite_logprobs_and_teacher_survive() -> None:
    seg = Segment(tokens=[1, 2, 3], logprobs=[math.nan, math.inf, -math.inf], mask=[1, 1, 0])
    ep = Episode(
        env="e",
        task_id="t",
        segments=[seg],
        teacher=[TeacherScores(logprobs_M=[math.nan, -0.0, -math.inf], topk_ids_M_K=[[1, 2]])],
    )
    line = ep.to_json()
    assert "NaN" in line and "Infinity" in line
    back = Episode.from_json(line)
    assert same(asdict(back), asdict(ep))


def test_to_dict_covers_every_field() -> None:
    for cls, d in [
        (Episode, Episode(env="e", task_id="t").to_dict()),
        (Turn, Turn(index=0, segment=0, start=0, end=0).to_dict()),
    ]:
        assert {f.name for f in fields(cls)} == set(d)


# ---------------------------------------------------------------- Segment.append mask invariants


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 50_000), max_size=8),
            st.booleans(),
            st.booleans(),
        ),
        max_size=10,
    )
)
def test_append_masks_exactly_the_sampled_tokens(
    chunks: list[tuple[list[int], bool, bool]],
) -> None:
    seg = Segment()
    expected_mask: list[int] = []
    expected_logprobs: list[float] = []
    for tokens, sampled, with_logprobs in chunks:
        logprobs = [-0.5 - i for i in range(len(tokens))] if with_logprobs else None
        seg.append(tokens, logprobs, sampled=sampled)
        expected_mask += [int(sampled)] * len(tokens)
        expected_logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)
        assert len(seg.tokens) == len(seg.logprobs) == len(seg.mask)
    assert seg.tokens == [t for tokens, _, _ in chunks for t in tokens]
    assert seg.mask == expected_mask
    assert seg.logprobs == expected_logprobs
    assert sum(seg.mask) == sum(len(t) for t, sampled, _ in chunks if sampled)


def test_append_rejects_mismatched_logprobs_and_leaves_segment_unchanged() -> None:
    seg = Segment()
    seg.append([1, 2], [-0.1, -0.2], sampled=True)
    before = asdict(seg)
    with pytest.raises(ValueError, match="logprob"):
        seg.append([3, 4, 5], [-0.3], sampled=True)
    with pytest.raises(ValueError, match="logprob"):
        seg.append([6], [-0.3, -0.4], sampled=False)
    assert asdict(seg) == before


def test_append_refuses_an_already_misaligned_segment() -> None:
    seg = Segment(tokens=[1, 2], logprobs=[0.0], mask=[0, 0])
    with pytest.raises(ValueError, match="misaligned"):
        seg.append([3], None, sampled=True)
    assert seg.tokens == [1, 2]


def test_num_sampled_tokens_counts_mask() -> None:
    a, b = Segment(), Segment()
    a.append([1, 2, 3], None, sampled=False)
    a.append([4, 5], [-1.0, -2.0], sampled=True)
    b.append([6], [-0.1], sampled=True)
    assert Episode(env="e", task_id="t", segments=[a, b]).num_sampled_tokens == 3


def test_stop_reason_formats_as_its_value() -> None:
    assert f"stop/{StopReason.MAX_TURNS}" == "stop/max_turns"
