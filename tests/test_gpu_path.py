"""The GPU path's settings, checked where they can be on a CPU, and on CUDA where there is one.

- ``optim.gradient_checkpointing`` changes memory, not results: one learner step with it on
  gives the same weights as with it off.
- ``teacher_cfg.dtype``: ``auto`` is bfloat16 on CUDA and float32 on CPU; a bfloat16 teacher's
  scores stay close to the float32 ones.
- Presets under ``configs/preset/`` compose, state their GPU memory, are refused on a machine
  without CUDA with a message that names the preset, and train end to end at tiny scale when
  their models are swapped for tiny local Qwen3 ones (every other setting as shipped).
- ``gpu``-marked tests run only on CUDA (``benchmarks/gpu_smoke.sh`` sets
  ``AGENTOPD_REQUIRE_GPU=1``, which turns their skip into a failure).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from agentopd import cli, config, make, zoo
from agentopd.config import ConfigError, compose
from agentopd.learner import Learner, LearnerConfig
from agentopd.renderer import Renderer
from agentopd.rollout import expert_episode
from agentopd.teachers import TeacherConfig, teacher_dtype
from agentopd.teachers.hf import HFTeacher

PRESETS = config.presets()


def _tiny_qwen3(root: Path, seed: int = 0) -> Path:
    tok = zoo.load_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=1024, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    )
    path = root / f"tiny-qwen3-{seed}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _episodes(n: int = 3):
    renderer = Renderer(zoo.load_tokenizer())
    env = make("lookup-chain")
    return [expert_episode(env, renderer, seed=s) for s in range(n)], renderer


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    model, _ = zoo.load(str(_tiny_qwen3(tmp_path)))
    episodes, renderer = _episodes()
    results = {}
    for mode in ("off", "on"):
        m = copy.deepcopy(model)
        learner = Learner(
            m, LearnerConfig(name="sgd", lr=0.5, gradient_checkpointing=mode), renderer.pad_id
        )
        assert learner.gradient_checkpointing is (mode == "on")
        assert m.is_gradient_checkpointing is (mode == "on")
        learner.step_sft(episodes)
        results[mode] = {k: v.detach().clone() for k, v in m.state_dict().items()}
    moved = max((results["on"][k] - model.state_dict()[k]).abs().max() for k in results["on"])
    diff = max((results["on"][k] - results["off"][k]).abs().max() for k in results["on"])
    assert moved > 1e-4, "the step did not move the weights; the comparison would be empty"
    assert diff < 1e-6, f"checkpointing changed the step by {diff}"


def test_gradient_checkpointing_auto_is_off_on_cpu():
    model, _ = zoo.load("tiny-base")
    learner = Learner(model, LearnerConfig(), 0)
    assert learner.gradient_checkpointing is torch.cuda.is_available()


def test_teacher_dtype_auto_and_bf16_scores_close():
    assert teacher_dtype("auto", "cpu") is torch.float32
    assert teacher_dtype("auto", "cuda") is torch.bfloat16
    assert teacher_dtype("float32", "cuda") is torch.float32
    episodes, renderer = _episodes(2)
    model, _ = zoo.load("tiny-teacher-lookup-chain")
    fp32 = HFTeacher(model, renderer, TeacherConfig()).score(copy.deepcopy(episodes))
    bf16 = HFTeacher(
        copy.deepcopy(model).to(torch.bfloat16), renderer, TeacherConfig()
    ).score(copy.deepcopy(episodes))
    a = torch.tensor([x for ep in fp32 for sc in ep for x in sc.logprobs_M.tolist()])
    b = torch.tensor([x for ep in bf16 for sc in ep for x in sc.logprobs_M.tolist()])
    assert len(a) > 20 and (a - b).abs().max() < 0.25, (a - b).abs().max()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_compose_and_state_gpu_memory(name):
    assert len(PRESETS) >= 3
    cfg = compose("train", [f"preset={name}", "device=cpu"])
    assert cfg.preset == name and cfg.gpu_memory_gib > 0
    assert zoo.is_hub_id(cfg.student) and zoo.is_hub_id(cfg.teacher)
    assert cfg.engine == "vllm" and cfg.optim.gradient_checkpointing == "on"
    text = (config.configs_dir() / "preset" / f"{name}.yaml").read_text()
    assert f"gpu_memory_gib: {cfg.gpu_memory_gib:g}" in text and "GB" in text
    # a preset sets model-scale lengths over the env group's small-model ones
    assert compose("train", [f"preset={name}", "device=cpu", "env=lookup-chain"]).rollout == cfg.rollout
    # and a key=value override still wins over the preset
    assert compose("train", [f"preset={name}", "device=cpu", "steps=3"]).steps == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_preset_without_a_gpu_names_the_preset():
    with pytest.raises(ConfigError, match="preset=qwen3-1.7b-from-8b is a GPU setup"):
        compose("train", ["preset=qwen3-1.7b-from-8b"])


def test_unknown_preset_did_you_mean():
    with pytest.raises(ConfigError, match="Did you mean 'qwen3-1.7b-from-8b'.*Available"):
        compose("train", ["preset=qwen3-1.7b-from8b"])


def test_yaml_bool_words_stay_strings_on_string_keys():
    cfg = compose("train", ["optim.sft_bf16=on", "optim.gradient_checkpointing=off", "run_name=no"])
    assert (cfg.optim.sft_bf16, cfg.optim.gradient_checkpointing, cfg.run_name) == ("on", "off", "no")
    assert compose("train", ["eval.before=off"]).eval.before is False  # a bool key stays a bool


@pytest.mark.slow
def test_preset_trains_at_tiny_scale(tmp_path, capsys):
    """Every setting of the full fine-tune preset as shipped (AdamW, checkpointing, bf16 teacher,
    no cold start, 1,024-token turns), with the models swapped for tiny local Qwen3 ones, the
    engine for hf and the device for the CPU."""
    student, teacher = _tiny_qwen3(tmp_path, 0), _tiny_qwen3(tmp_path, 1)
    runs = tmp_path / "runs"
    rc = cli.main([
        "train", "preset=qwen3-1.7b-from-8b", "env=lookup-chain", "device=cpu", "engine=hf",
        "gpu_memory_gib=0", f"student={student}", f"teacher={teacher}", "steps=1",
        "episodes_per_step=2", "eval.episodes=0", "rollout.max_new_tokens=24",
        f"runs_dir={runs}", "run_name=p",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    run_cfg = (runs / "p" / "config.yaml").read_text()
    assert "preset: qwen3-1.7b-from-8b" in run_cfg and "gradient_checkpointing: 'on'" in run_cfg
    rows = [json.loads(x) for x in (runs / "p" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [0]


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        if os.environ.get("AGENTOPD_REQUIRE_GPU") == "1":
            pytest.fail("AGENTOPD_REQUIRE_GPU=1 but torch sees no CUDA device")
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.mark.gpu
def test_cuda_auto_device_checkpointing_and_bf16_teacher(cuda, tmp_path):
    from agentopd.build import resolve_device

    assert resolve_device("auto").type == "cuda"
    model, _ = zoo.load(str(_tiny_qwen3(tmp_path)))
    model.to(cuda)
    episodes, renderer = _episodes()
    learner = Learner(model, LearnerConfig(name="sgd", lr=0.1), renderer.pad_id)
    assert learner.gradient_checkpointing  # auto: on on CUDA
    stats = learner.step_sft(episodes)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))
    teacher, _ = zoo.load("tiny-teacher-lookup-chain")
    teacher.to(device=cuda, dtype=teacher_dtype("auto", cuda))
    assert next(teacher.parameters()).dtype is torch.bfloat16
    scores = HFTeacher(teacher, renderer, TeacherConfig()).score(episodes)
    assert all(x <= 0 for ep in scores for sc in ep for x in sc.logprobs_M.tolist())


@pytest.mark.gpu
def test_gpu_memory_check_refuses_too_big_a_setup(cuda):
    with pytest.raises(ConfigError, match="GiB of GPU memory"):
        compose("train", ["device=cuda", "gpu_memory_gib=100000"])
