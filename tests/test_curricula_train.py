"""Every registered curriculum through ``agentopd train`` end to end, and what each promises
there: tcod-f2b truncates training episodes at its horizon but never evaluation, tcod-b2f's
replayed expert prefix is mask 0 in the stored episodes, and the checkpoint holds the
curriculum's state, which ``resume=true`` restores and continues from.

The student is the shipped lookup-chain teacher, so evaluation episodes run their full length
(2-4 turns on 1-3 hops) and a truncation would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentopd import cli, registry
from agentopd.replay.store import EpisodeStore

ARGS = [
    "train", "env=lookup-chain", "student=tiny-teacher-lookup-chain", "steps=2",
    "episodes_per_step=2", "cold_start.steps=0", "eval.episodes=4", "eval.before=false",
    "checkpoint_every=1", "rollout.max_new_tokens=40",
]  # fmt: skip


def _rows(run: Path, phase: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase") == phase]


def _checkpoint_state(run: Path) -> dict:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    return json.loads((run / "checkpoints" / latest["path"] / "state.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.curricula.names())
def test_every_curriculum_trains_end_to_end(name, tmp_path, capsys):
    extra = {
        "tcod-f2b": ["curriculum_kwargs.k_start=1", "curriculum_kwargs.eta=100"],
        "tcod-b2f": ["curriculum_kwargs.k_start=1", "curriculum_kwargs.eta=100"],
    }.get(name, [])
    rc = cli.main([*ARGS, f"curriculum={name}", *extra, f"runs_dir={tmp_path}", "run_name=c"])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "c"
    train = _rows(run, "train")
    assert [r["step"] for r in train] == [0, 1]
    assert _checkpoint_state(run)["curriculum"]["step"] >= 1
    after = _rows(run, "eval")[-1]
    if name == "tcod-f2b":
        # horizon 1: every training episode is cut after one turn; evaluation is not
        assert all(r["curriculum/horizon"] == 1 and r["rollout/turns"] == 1 for r in train)
        assert after["eval/mean_turns"] > 1.5
    if name == "tcod-b2f":
        episodes = [ep for _, ep in EpisodeStore(run).iter_episodes()]
        replayed = [e for e in episodes if e.replayed_turns > 0]
        assert replayed, "k=1 on 1-3 hops must replay a prefix in some episode"
        for ep in replayed:
            seg = ep.segments[0]
            assert sum(seg.mask[: seg.prompt_len]) == 0 and ep.num_turns == 1


@pytest.mark.slow
def test_resume_restores_the_curriculum_state(tmp_path, capsys):
    base = [*ARGS, "curriculum=tcod-f2b", "curriculum_kwargs.k_start=1",
            "curriculum_kwargs.eta=1", f"runs_dir={tmp_path}", "run_name=r"]  # fmt: skip
    assert cli.main(base) == 0, capsys.readouterr().err
    assert _checkpoint_state(tmp_path / "r")["curriculum"] == {"step": 1}
    rc = cli.main([*base, "steps=4", "resume=true", "resume_override=true"])
    assert rc == 0, capsys.readouterr().err
    train = _rows(tmp_path / "r", "train")
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    assert [r["curriculum/horizon"] for r in train] == [1, 2, 3, 4]
    assert _checkpoint_state(tmp_path / "r")["curriculum"] == {"step": 3}
