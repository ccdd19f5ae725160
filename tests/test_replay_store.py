"""The episode store: lossless round trip, compact columns, crash safety on resume, torn and
missing files, legacy ``episodes.jsonl``, filters and paging. No model is needed."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from agentopd.replay.store import (
    INDEX,
    LEGACY,
    EpisodeStore,
    Filter,
    RunDirError,
    decode_shard,
    encode_shard,
    episode_dict,
    parse_filter,
    write_step,
)
from agentopd.runs import RunDir
from agentopd.types import Episode, Message, Segment, StopReason, TeacherScores, ToolCall, Turn


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``agentopd ARGS`` in this process: (exit code, stdout, stderr)."""
    from agentopd.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def make_episode(i: int, *, k: int = 4, n_tokens: int = 12, teacher: bool = True) -> Episode:
    rng = np.random.default_rng(i)
    seg = Segment(prompt_len=4)
    seg.append([1, 2, 3, 4], None, sampled=False)
    lp = rng.normal(-1.0, 0.5, n_tokens).astype(np.float32).tolist()
    seg.append(rng.integers(5, 900, n_tokens).tolist(), lp, sampled=True)
    positions = [t for t, m in enumerate(seg.mask) if m]
    scores = TeacherScores(
        positions_M=positions,
        logprobs_M=rng.normal(-2, 1, len(positions)).astype(np.float32).tolist(),
        topk_ids_M_K=rng.integers(0, 900, (len(positions), k)).tolist(),
        topk_logprobs_M_K=np.sort(rng.normal(-3, 1, (len(positions), k)), axis=1)[:, ::-1]
        .astype(np.float32)
        .tolist(),
        entropy_M=rng.random(len(positions)).astype(np.float32).tolist(),
    )
    call = ToolCall(name="lookup", arguments={"key": f"k{i}"}, id=f"c{i}")
    result = Message(role="tool", content=f"value {i} " + "x" * 300, name="lookup", tool_call_id=f"c{i}")
    return Episode(
        env="lookup-chain",
        task_id=f"task-{i % 3}",
        seed=i,
        messages=[
            Message(role="system", content="sys"),
            Message(role="user", content=f"question {i} needle{i}"),
            Message(role="assistant", content="call", tool_calls=[call]),
            result,
        ],
        segments=[seg],
        turns=[Turn(index=0, segment=0, start=4, end=4 + n_tokens, text="call", tool_calls=[call], tool_results=[result])],
        reward=float(i % 2),
        success=bool(i % 2),
        stop_reason=StopReason.ANSWER if i % 2 else StopReason.MAX_TURNS,
        info={"tool_errors": {"unknown_tool": 1} if i % 3 == 0 else {}},
        teacher=[scores] if teacher else None,
    )


def roundtrip(eps: list[Episode]) -> list[Episode]:
    from agentopd.replay.store import dict_to_episode

    arrays = encode_shard(0, [episode_dict(e) for e in eps])
    _, dicts = decode_shard(arrays)
    return [dict_to_episode(d) for d in dicts]


def test_roundtrip_is_byte_exact_including_teacher_topk():
    eps = [make_episode(i) for i in range(6)] + [make_episode(9, teacher=False)]
    back = roundtrip(eps)
    assert [b.to_json() for b in back] == [e.to_json() for e in eps]
    assert back[0].teacher[0] == eps[0].teacher[0]
    assert back[0].teacher[0].topk_ids_M_K.tolist() == eps[0].teacher[0].topk_ids_M_K.tolist()


def test_roundtrip_edge_values():
    e = make_episode(1)
    seg = e.segments[0]
    # float64 values that float32 cannot hold, non-finite floats, huge ints, odd text
    seg.logprobs[5] = 0.1
    seg.logprobs[6] = math.nan
    seg.logprobs[7] = -math.inf
    e.teacher[0].entropy_M[0] = 1e-40  # a float32 subnormal
    e.teacher[0].logprobs_M[1] = float("inf")
    e.info["big"] = 2**70
    e.info["text"] = "line\u2028sep \ud800 lone"
    e.info["looks_like_marker"] = {"__col__": ["x", 0]}
    e.segments.append(Segment())  # an empty segment
    e.teacher.append(None)
    back = roundtrip([e])[0]
    assert back.to_json() == e.to_json()
    assert back.segments[0].logprobs[5] == 0.1
    assert math.isnan(back.segments[0].logprobs[6])


def test_columns_are_narrow_and_compact():
    eps = [make_episode(i, k=16, n_tokens=200) for i in range(16)]
    arrays = encode_shard(3, [episode_dict(e) for e in eps])
    names = {bytes(arrays[k]).decode(): k.split(".")[0] for k in arrays if k.endswith(".name")}
    assert arrays[names["segments.tokens"] + ".data"].dtype == np.uint16
    assert arrays[names["segments.mask"] + ".data"].dtype == np.uint8
    # float32 columns are stored as 4 byte planes
    assert arrays[names["teacher.topk_logprobs"] + ".data"].shape[0] == 4
    jsonl = sum(len(e.to_json()) for e in eps)
    from agentopd.replay.store import shard_bytes

    assert shard_bytes(arrays) < jsonl / 4


def test_write_read_page_find_and_filters(tmp_path):
    eps = [make_episode(i) for i in range(10)]
    write_step(tmp_path, 0, eps[:4])
    write_step(tmp_path, 1, eps[4:])
    store = EpisodeStore(tmp_path)
    assert len(store) == 10 and store.format == "store" and not store.problems
    page = store.page(1, 3)
    assert [r.id for r in page.rows] == ["0-3", "1-0", "1-1"] and page.pages == 4
    row = store.find("1-2")
    assert row.task_id == eps[6].task_id and row.shard == "episodes/step_000001.npz"
    assert store.episode("1-2").to_json() == eps[6].to_json()
    assert row.teacher_kl is not None and row.sampled_tokens == 12
    solved = store.matching(Filter(solved=True))
    assert len(solved) == 5
    assert len(store.matching(parse_filter("step=1 failed"))) == 3
    assert len(store.matching(parse_filter("error=unknown_tool"))) == 4
    assert len(store.matching(parse_filter("error=any step=0..0"))) == 2
    hits = store.page(0, 50, parse_filter("needle7")).rows
    assert [r.id for r in hits] == ["1-3"]
    with pytest.raises(KeyError, match="no episode '9-9'"):
        store.find("9-9")
    with pytest.raises(ValueError, match="unknown filter key"):
        parse_filter("colour=red")


def test_resume_after_kill_keeps_each_step_once(tmp_path):
    """Steps after the last checkpoint are dropped and replayed: no duplicate, no loss."""
    run = RunDir(tmp_path, "r")
    run.append_episodes(0, [make_episode(0), make_episode(1)])
    run.append_episodes(1, [make_episode(2)])
    sizes = run.log_sizes()  # what a checkpoint after step 1 records
    assert sizes[INDEX] > 0
    run.append_episodes(2, [make_episode(3), make_episode(4)])
    with open(run.path / INDEX, "a") as f:  # killed mid-way through step 3's index lines
        f.write('{"id": "3-0", "st')
    (run.path / "episodes" / "step_000004.npz").write_bytes(b"")  # an orphan shard
    run.truncate_logs(sizes)  # resume
    run.append_episodes(2, [make_episode(5)])  # the replayed step differs
    store = EpisodeStore(run.path)
    ids = [r.id for r in store.rows()]
    assert ids == ["0-0", "0-1", "1-0", "2-0"] and not store.problems
    assert store.episode("2-0").to_json() == make_episode(5).to_json()


def test_torn_last_line_shows_what_is_complete(tmp_path, capsys):
    write_step(tmp_path, 0, [make_episode(0), make_episode(1)])
    with open(tmp_path / INDEX, "a") as f:
        f.write('{"id": "1-0", "step": 1, "env"')
    store = EpisodeStore(tmp_path)
    assert len(store) == 2
    assert "incomplete" in store.problems[0] and "2 complete episodes" in store.problems[0]
    rc, out, err = cli(capsys, "replay", str(tmp_path), "--list")
    assert rc == 0, err
    assert "incomplete" in err and "0-1" in out


def test_missing_shard_is_a_clear_error(tmp_path, capsys):
    write_step(tmp_path, 0, [make_episode(0)])
    os.unlink(tmp_path / "episodes" / "step_000000.npz")
    store = EpisodeStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="listed in episodes/index.jsonl but missing"):
        store.episode("0-0")
    rc, _, err = cli(capsys, "replay", str(tmp_path), "--episode", "0-0")
    assert rc == 2 and "missing" in err


def test_legacy_episodes_jsonl_is_readable(tmp_path):
    eps = [make_episode(i) for i in range(3)]
    lines = [json.dumps({"step": s, **json.loads(e.to_json())}) for s, e in zip([0, 0, 1], eps)]
    (tmp_path / LEGACY).write_text("\n".join(lines) + "\n" + lines[0][:50])  # torn last line
    store = EpisodeStore(tmp_path)
    assert store.format == "jsonl" and len(store) == 3 and store.problems
    assert [r.id for r in store.rows()] == ["0-0", "0-1", "1-0"]
    assert store.episode("1-0").to_json() == eps[2].to_json()
    assert len(store.matching(Filter(solved=True))) == 1


def test_missing_and_empty_run_dirs(tmp_path, capsys):
    with pytest.raises(RunDirError, match="no run directory"):
        EpisodeStore(tmp_path / "nope")
    (tmp_path / "run-a").mkdir()
    (tmp_path / "run-a" / "config.yaml").write_text("env: x\n")
    with pytest.raises(RunDirError, match="holds no episodes yet.*config.yaml"):
        EpisodeStore(tmp_path / "run-a")
    rc, _, err = cli(capsys, "replay", str(tmp_path / "run-b"))
    assert rc == 2 and "Did you mean" in err and "run-a" in err
    rc, _, err = cli(capsys, "replay", str(tmp_path / "run-a"))
    assert rc == 2 and "holds no episodes yet" in err
    assert sorted(p.name for p in (tmp_path / "run-a").iterdir()) == ["config.yaml"]


def test_large_step_is_split_into_shards(tmp_path, monkeypatch):
    import agentopd.replay.store as store_mod

    monkeypatch.setattr(store_mod, "MAX_EPISODES_PER_SHARD", 3)
    rows = write_step(tmp_path, 0, [make_episode(i) for i in range(7)])
    assert [r.shard for r in rows][-1] == "episodes/step_000000_02.npz"
    store = EpisodeStore(tmp_path)
    assert [r.id for r in store.rows()] == [f"0-{i}" for i in range(7)]
    assert store.episode("0-6").to_json() == make_episode(6).to_json()
