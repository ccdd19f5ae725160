"""Every bad value fails at compose/build time with a clear message, before a run dir exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentopd.cli import main

BASE = [
    "env=lookup-chain",
    "steps=1",
    "episodes_per_step=2",
    "cold_start.steps=0",
    "eval.episodes=0",
]

CASES = [
    (["loss=jsd", "loss_cfg.beta=2"], "loss_cfg.beta"),
    (["teacher_cfg.topk=0"], "teacher_cfg.topk"),
    (["teacher_cfg.topk=-1"], "teacher_cfg.topk"),
    (["teacher_cfg.topk=100000"], "vocabulary size"),
    (["cold_start.steps=2", "cold_start.data=/nonexistent.jsonl"], "cold_start.data"),
    (["student=no-such-model"], "student=no-such-model"),
    (["optim.lr=-0.05"], "optim.lr"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens"),
    (["steps=-3"], "'steps'"),
    (["episodes_per_step=0"], "episodes_per_step"),
    (["loss_cfg.entropy_top_frac=1.5"], "entropy_top_frac"),
    (["loss_cfg.clip_eps=-1"], "clip_eps"),
    (["gkd_lambda=2"], "gkd_lambda"),
    (["rollout.temperature=-1"], "rollout.temperature"),
    (["cold_start.batch_size=0"], "cold_start.batch_size"),
    (["loss_cfg.beta=0.5"], "has no such setting"),
    (["loss=rkl-topks"], "Did you mean 'rkl-topk'"),
    (["engine=hff"], "Did you mean 'hf'"),
    (["teacher_backend=server"], "needs teacher_cfg.server.url"),
    (["optim.name=adam"], "Did you mean 'adamw'"),
    (["env_kwargs.no_such_kwarg=1"], "env_kwargs"),
    (["env_kwargs.distractors=99"], "distractors must be in 0..8"),
    (["stpes=3"], "Did you mean 'steps'"),
    (["rollout.temperature=0.5"], "estimates the KL from the student's sampled tokens"),
    (["temperature_end=0.5"], "temperature schedule is refused"),
    (["rollout.top_p=0.9"], "rollout.top_p"),
]


def _run(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    runs = tmp_path / "runs"
    rc = main(["train", *BASE, *args, f"runs_dir={runs}"])
    err = capsys.readouterr().err
    assert rc == 2, f"expected a config error (exit 2) for {args}, got {rc}: {err}"
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was left behind"
    return " ".join(err.split())


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_value_fails_before_a_run_dir_exists(args, expected, tmp_path, capsys):
    assert expected in _run(args, tmp_path, capsys)


def test_empty_teacher_directory(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _run([f"teacher={empty}"], tmp_path, capsys)
    assert "holds no model" in msg


def test_cold_start_data_without_successes(tmp_path, capsys):
    data = tmp_path / "demos.jsonl"
    data.write_text("not json\n")
    msg = _run(["cold_start.steps=2", f"cold_start.data={data}"], tmp_path, capsys)
    assert "line 1 is not an episode" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_gpu(tmp_path, capsys):
    msg = _run(["device=cuda"], tmp_path, capsys)
    assert "no CUDA device" in msg and "device=cpu" in msg


def test_eval_on_a_run_directory(tmp_path, capsys):
    runs = tmp_path / "runs"
    empty_run = runs / "not-yet"
    empty_run.mkdir(parents=True)
    (empty_run / "config.yaml").write_text("env: lookup-chain\n")
    assert main(["eval", f"model={empty_run}", "episodes=1"]) == 2
    assert "without a checkpoint" in " ".join(capsys.readouterr().err.split())
    assert main(["train", *BASE, f"runs_dir={runs}", "run_name=done"]) == 0
    capsys.readouterr()
    assert main(["eval", f"model={runs / 'done'}", "episodes=2", "env=lookup-chain"]) == 0
    assert "success" in capsys.readouterr().out


def test_help_lists_every_key(capsys):
    from agentopd.config import _all_keys, compose

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key in _all_keys(compose("train")):
        if not key.startswith(("env_kwargs.", "curriculum_kwargs.")):
            assert f"  {key} " in text or f"  {key}.*" in text, key


def test_topk_objectives_accept_any_rollout_temperature():
    """fkl-topk / rkl-topk / jsd are exact at every visited state: temperature only moves the
    states, so compose accepts it; rkl-sampled does not (CASES above)."""
    from agentopd.config import compose, validate

    for loss in ("fkl-topk", "rkl-topk", "jsd"):
        validate(compose("train", [*BASE, f"loss={loss}", "rollout.temperature=0.5"]))
    validate(compose("train", [*BASE, "rollout.temperature=0"]))  # greedy: determinism checks
    validate(compose("train", [*BASE, "gkd_lambda=0", "rollout.temperature=0.5"]))  # SFT only


def test_a_group_file_may_choose_the_loss_and_its_settings(tmp_path, monkeypatch):
    """An env (or preset) file that names a loss gets that loss's settings class, so it may also
    set the loss's own keys; ``loss=`` on the command line still wins over it."""
    import shutil

    from agentopd import config

    root = tmp_path / "configs"
    shutil.copytree(config.configs_dir(), root)
    (root / "env" / "lookup-chain.yaml").write_text(
        "loss: fkl-topk\nloss_cfg:\n  tail: false\n", encoding="utf-8"
    )
    monkeypatch.setattr(config, "configs_dir", lambda: root)
    cfg = config.compose("train", ["env=lookup-chain"])
    assert cfg.loss == "fkl-topk" and cfg.loss_cfg.tail is False
    assert config.compose("train", ["env=sql"]).loss == "rkl-sampled"
    assert config.compose("train", ["env=lookup-chain", "loss=rkl-topk"]).loss == "rkl-topk"


def test_an_env_file_serves_every_command_and_still_refuses_typos(tmp_path, monkeypatch):
    """The main job's env file sets train-only keys (student, cold_start, loss, optim): the other
    commands compose the same env without them; a key that no command has is still refused."""
    import shutil

    from agentopd import config

    train = config.compose("train", ["env=code-sandbox"])
    assert train.student.endswith("@layers=0,1,3") and train.cold_start.steps == 0
    assert config.compose("train", ["env=code-sandbox", "student=tiny-base"]).student == "tiny-base"
    for command in ("eval", "collect", "diagnose"):
        cfg = config.compose(command, ["env=code-sandbox"])
        assert cfg.rollout.max_new_tokens == 96  # the env's own settings still apply
        assert "cold_start" not in cfg
    root = tmp_path / "configs"
    shutil.copytree(config.configs_dir(), root)
    (root / "env" / "sql.yaml").write_text("studnet: tiny-base\n", encoding="utf-8")
    monkeypatch.setattr(config, "configs_dir", lambda: root)
    for command in ("train", "eval"):
        with pytest.raises(config.ConfigError, match="studnet"):
            config.compose(command, ["env=sql"])
