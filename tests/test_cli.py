"""The real `agentopd` command in subprocesses: listing, check-env, config errors, train, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import agentopd

from agentopd.replay.store import EpisodeStore

FAST = [
    "env=lookup-chain",
    "env_kwargs.hops=1",
    "student=tiny",
    "teacher=tiny-teacher",
    "episodes_per_step=2",
    "cold_start.steps=0",
    "eval.episodes=0",
    "rollout.max_new_tokens=12",
]


def test_help_and_envs():
    r = agentopd("--help")
    assert r.returncode == 0 and "train" in r.stdout and "check-env" in r.stdout
    r = agentopd("envs")
    assert r.returncode == 0, r.stderr
    for name in ("lookup-chain", "sql", "code-sandbox"):
        assert name in r.stdout


def test_check_env_ok_and_typo():
    r = agentopd("check-env", "lookup-chain")
    assert r.returncode == 0, r.stdout + r.stderr
    r = agentopd("check-env", "lookup-chian")
    assert r.returncode != 0
    assert "Did you mean 'lookup-chain'?" in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stpes=3", "Did you mean 'steps'?"),
        ("steps=abc", "expected an integer"),
        ("env=lookup-chian", "Did you mean 'lookup-chain'?"),
        ("loss=rkl-topc", "Did you mean 'rkl-topk'?"),
        ("optim.schedule=cosin", "Did you mean 'cosine'?"),
        ("optim.name=adamm", "Did you mean 'adamw'?"),
        ("curriculum=tcod-f2", "Did you mean 'tcod-f2b'?"),
        ("steps", "expected key=value"),
    ],
)
def test_config_errors_are_clear(override, expected):
    r = agentopd("train", override)
    assert r.returncode == 2
    assert expected in " ".join((r.stdout + r.stderr).split())


def _train_rows(run: Path) -> list[dict]:
    return [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if '"phase": "train"' in x
    ]


@pytest.mark.slow
def test_train_two_steps_writes_run_dir(tmp_path):
    r = agentopd("train", *FAST, "steps=2", f"runs_dir={tmp_path}", "run_name=smoke", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "smoke"
    assert (run / "config.yaml").read_text().startswith("env: lookup-chain")
    rows = _train_rows(run)
    assert [row["step"] for row in rows] == [0, 1]
    for key in (
        "rollout/success",
        "learner/loss",
        "diag/overlap_ratio",
        "diag/sampled_kl",
        "throughput/rollout_tok_s",
        "teacher_seconds",
    ):
        assert key in rows[0], key
    stored = list(EpisodeStore(run).iter_episodes())
    assert [row.step for row, _ in stored] == [0, 0, 1, 1]
    assert all(e.teacher and e.teacher[0].k == 16 for _, e in stored if e.segments[0].mask.count(1))
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 1
    ckpt = run / "checkpoints" / latest["path"]
    assert (ckpt / "model" / "config.json").exists() and (ckpt / "trainer.pt").exists()


@pytest.mark.slow
def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    args = [
        sys.executable,
        "-m",
        "agentopd.cli",
        "train",
        *FAST,
        "steps=5",
        "checkpoint_every=1",
        f"runs_dir={tmp_path}",
        "run_name=killed",
    ]
    run = tmp_path / "killed"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            latest = run / "checkpoints" / "latest.json"
            if latest.exists() and json.loads(latest.read_text())["step"] >= 1:
                break
            assert proc.poll() is None, "training exited before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    assert killed_at < 4, "the run finished before it was killed; the test proves nothing"
    r = agentopd(
        "train",
        *FAST,
        "steps=5",
        "checkpoint_every=1",
        f"runs_dir={tmp_path}",
        "run_name=killed",
        "resume=true",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed" in r.stdout
    assert [row["step"] for row in _train_rows(run)] == [0, 1, 2, 3, 4]
    steps = [row.step for row, _ in EpisodeStore(run).iter_episodes()]
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.slow
def test_collect_then_cold_start_from_file_then_eval_and_diagnose(tmp_path):
    demos = tmp_path / "demos.jsonl"
    r = agentopd("collect", "env=lookup-chain", "model=expert", "episodes=6", f"output={demos}")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = demos.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["success"] for x in lines)
    r = agentopd(
        "train",
        *FAST,
        "steps=1",
        "cold_start.steps=2",
        f"cold_start.data={demos}",
        f"runs_dir={tmp_path}",
        "run_name=cs",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = tmp_path / "cs" / "cold_start_model"
    assert (model / "config.json").exists()
    r = agentopd(
        "eval",
        "env=lookup-chain",
        f"model={model}",
        "episodes=3",
        "samples=2",
        "temperature=1.0",
        "rollout.max_new_tokens=12",
        f"output={tmp_path / 'ev.jsonl'}",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pass@2" in r.stdout and "success (difficulty" in r.stdout
    assert len((tmp_path / "ev.jsonl").read_text().splitlines()) == 6
    r = agentopd(
        "diagnose",
        "env=lookup-chain",
        f"student={model}",
        "teacher=tiny-teacher",
        "episodes=3",
        "rollout.max_new_tokens=12",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert "diag/overlap_ratio" in out and "verdict:" in out and "per turn index" in out


@pytest.mark.slow
def test_gkd_lambda_zero_uses_demonstrations_and_temperature_schedule(tmp_path):
    r = agentopd(
        "train",
        *FAST,
        "steps=2",
        "gkd_lambda=0",
        "rollout.temperature=1.0",
        "temperature_end=0.5",
        f"runs_dir={tmp_path}",
        "run_name=gkd",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _train_rows(tmp_path / "gkd")
    assert [row["batch"] for row in rows] == ["demonstration", "demonstration"]
    assert [row["temperature"] for row in rows] == [1.0, 0.5]
    assert rows[1]["teacher_tokens"] > rows[0]["teacher_tokens"] > 0
    # The scripted expert played these demonstrations: no teacher time, but their own timing.
    assert rows[1]["teacher_seconds"] == rows[0]["teacher_seconds"] == 0
    assert rows[0]["time/step_s"] >= rows[0]["time/demos_s"] > 0
    assert rows[0]["demo/success"] == 1.0 and rows[0]["learner/loss"] > 0
    # Demonstration steps write no on-policy episodes.
    assert not (tmp_path / "gkd" / "episodes").exists()


@pytest.mark.slow
def test_eval_of_a_run_reproduces_its_held_out_number(tmp_path):
    """`agentopd eval model=RUN` with no other option takes the run's env, env_kwargs, rollout
    settings, seed, episode count and eval temperature, and gets training's number exactly."""
    r = agentopd(
        "train", "env=lookup-chain", "env_kwargs.min_hops=2", "env_kwargs.max_hops=3",
        "student=tiny-teacher-lookup-chain", "steps=1", "episodes_per_step=2",
        "cold_start.steps=0", "eval.before=false", "eval.teacher=false", "eval.episodes=12",
        "eval.temperature=1.0", "seed=3", "rollout.max_new_tokens=40",
        f"runs_dir={tmp_path}", "run_name=r", timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    trained = [json.loads(x) for x in lines if '"tag": "after training"' in x][0]
    episodes = tmp_path / "eval.jsonl"
    r = agentopd("eval", f"model={tmp_path / 'r'}", f"output={episodes}", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = " ".join(r.stdout.split())
    assert "from the run's config.yaml" in out and "env_kwargs.min_hops=2" in out
    got = [json.loads(x) for x in episodes.read_text().splitlines() if x.strip()]
    assert len(got) == 12
    success = sum(bool(e["success"]) for e in got) / len(got)
    assert success == trained["eval/success"], (success, trained["eval/success"])


def test_a_student_that_solves_nothing_without_a_cold_start_gets_a_hint(tmp_path):
    r = agentopd(
        "train", *FAST, "steps=0", "eval.episodes=4", "eval.after=false", "eval.teacher=false",
        f"runs_dir={tmp_path}", "run_name=hint",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = " ".join(r.stdout.split())
    assert "held-out success 0.0%" in out and "wants cold_start.steps=150" in out


def test_teacher_demonstrations_count_the_teachers_tokens_and_time(tmp_path):
    r = agentopd(
        "train", *FAST, "steps=1", "gkd_lambda=0", "demo_source=teacher",
        f"runs_dir={tmp_path}", "run_name=tdemo", timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = _train_rows(tmp_path / "tdemo")
    assert row["batch"] == "demonstration" and row["teacher_tokens"] > 0
    assert row["teacher_seconds"] == row["time/demos_s"] > 0
