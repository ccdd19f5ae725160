"""Resume after a kill at any point: every row exactly once, no torn lines, no silent surprises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from agentopd.cli import main

ARGS = [
    "env=lookup-chain",
    "steps=4",
    "episodes_per_step=2",
    "cold_start.steps=3",
    "cold_start.episodes=4",
    "eval.episodes=2",
    "eval.every=2",
    "checkpoint_every=2",
]


def _train(runs: Path, *extra: str, kill_at: str | None = None, kill_after: float | None = None):
    env = {k: v for k, v in os.environ.items() if k != "AGENTOPD_KILL_AT"}
    if kill_at:
        env["AGENTOPD_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "agentopd.cli", "train", *ARGS, f"runs_dir={runs}", *extra]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if kill_after is not None:
        time.sleep(kill_after)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _rows(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]  # a torn line would fail to parse here
    return [(r["phase"], r["step"], r.get("tag")) for r in rows]


@pytest.mark.slow
def test_kills_at_every_phase_then_resume_give_each_row_exactly_once(tmp_path):
    ref_runs, runs = tmp_path / "ref", tmp_path / "runs"
    rc, out = _train(ref_runs, "run_name=r")
    assert rc == 0, out
    expected = _rows(ref_runs / "r")
    assert Counter(expected) == Counter(set(expected)), "reference has duplicates"

    kills = ["cold_start:1", "eval:after cold start", "checkpoint:1", "train:2"]
    rc, out = _train(runs, "run_name=k", kill_at=kills[0])
    assert rc == -signal.SIGKILL, out
    for point in kills[1:]:
        rc, out = _train(runs, "run_name=k", "resume=true", kill_at=point)
        assert rc == -signal.SIGKILL, (point, out)
    rc, out = _train(runs, "run_name=k", "resume=true", kill_after=4.0)  # a random moment
    rc, out = _train(runs, "run_name=k", "resume=true")
    assert rc == 0, out
    got = _rows(runs / "k")
    assert Counter(got) == Counter(expected)
    assert not list((runs / "k" / "checkpoints").glob(".step_*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    rc, out = _train(runs, "run_name=done", "steps=1", "cold_start.steps=0", "eval.episodes=0")
    assert rc == 0, out
    return runs


def test_resume_of_a_missing_run_names_the_runs_that_exist(finished, capsys):
    assert main(["train", *ARGS, f"runs_dir={finished}", "run_name=dnoe", "resume=true"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no run 'dnoe'" in err and "Did you mean 'done'" in err


def test_resume_with_other_options_refuses_with_a_diff_unless_overridden(finished, capsys):
    base = [f"runs_dir={finished}", "run_name=done", "resume=true", "env=lookup-chain"]
    assert main(["train", *base, "optim.lr=0.5"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "optim.lr: 0.05 -> 0.5" in err and "resume_override=true" in err
    assert main(["train", *base, "optim.lr=0.5", "resume_override=true", "eval.episodes=0"]) == 0
    changes = (finished / "done" / "config_changes.jsonl").read_text()
    assert "optim.lr" in changes
    # the override was for that command only: the next change is refused again
    assert main(["train", *base, "optim.lr=0.7"]) == 2
    assert "optim.lr: 0.5 -> 0.7" in " ".join(capsys.readouterr().err.split())


def test_resume_without_run_name_picks_the_newest_matching_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("lookup-chain-rkl-sampled-s0", "lookup-chain-rkl-sampled-s0-2"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text("env: lookup-chain\nloss: rkl-sampled\n")
        time.sleep(0.05)
    from rich.console import Console

    from agentopd.config import compose
    from agentopd.resume import resume_target

    cfg = compose("train", ["env=lookup-chain", f"runs_dir={runs}", "resume=true"])
    console = Console(record=True)
    assert resume_target(cfg, console) == "lookup-chain-rkl-sampled-s0-2"
    assert "most recent matching run" in console.export_text()


def test_resume_of_a_run_saved_before_newer_keys_existed(finished, tmp_path, capsys):
    """A run whose config.yaml predates keys added since (here ``preset``, ``gpu_memory_gib``
    and ``engine_cfg``) resumes as it is; setting one of those keys is still a change."""
    import shutil

    from omegaconf import OmegaConf

    runs = tmp_path / "runs"
    shutil.copytree(finished / "done", runs / "old")
    saved = OmegaConf.load(runs / "old" / "config.yaml")
    for key in ("preset", "gpu_memory_gib", "engine_cfg"):
        saved.pop(key)
    OmegaConf.save(saved, runs / "old" / "config.yaml")
    base = [f"runs_dir={runs}", "run_name=old", "resume=true", "env=lookup-chain"]
    assert main(["train", *base]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["train", *base, "engine_cfg.max_model_len=1024"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    # the first resume wrote the keys back with their defaults, so the change reads as one
    assert "engine_cfg.max_model_len: 0 -> 1024" in err and "resume_override=true" in err, err


def test_resume_of_a_run_not_started_yet_starts_it(tmp_path):
    """A preemptible machine reruns one command: resume=true run_name=X starts X the first time."""
    rc, out = _train(tmp_path, "run_name=fresh", "resume=true", "steps=1", "cold_start.steps=0",
                     "eval.episodes=0")  # fmt: skip
    assert rc == 0, out
    assert (
        "no run 'fresh'" in " ".join(out.split()) and (tmp_path / "fresh" / "config.yaml").is_file()
    )
    rc, out = _train(tmp_path, "run_name=fresh", "resume=true", "steps=1", "cold_start.steps=0",
                     "eval.episodes=0")  # fmt: skip
    assert rc == 0, out  # the second time it continues (nothing left to do) instead


def test_the_loop_reaches_its_named_points_in_order(tmp_path):
    """The points a crash test may kill at (agentopd.hooks), as the loop reaches them."""
    from rich.console import Console

    from agentopd.config import compose
    from agentopd.hooks import TrainerHooks
    from agentopd.trainer import train

    class Record(TrainerHooks):
        def __init__(self):
            self.seen: list[str] = []

        def point(self, where: str) -> None:
            self.seen.append(where)

    cfg = compose("train", [*ARGS, "steps=2", "eval.every=0", "eval.teacher=false",
                            f"runs_dir={tmp_path}", "run_name=h"])  # fmt: skip
    hooks = Record()
    train(cfg, Console(quiet=True), hooks=hooks)
    assert hooks.seen == [
        "eval:before training",
        *(f"cold_start:{i}" for i in range(3)),
        "eval:after cold start",
        "train:0",
        "train:1",
        "checkpoint:1",
        "eval:after training",
    ]
