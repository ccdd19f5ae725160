"""Hugging Face models by path or hub id through the one loading path (``zoo.load``).

Tiny Qwen3 and Llama models are built from config (attention head size 64, which vLLM's CPU
attention needs; the zoo tokenizer) and saved locally; nothing is downloaded. ``agentopd train``
takes them as ``student=`` / ``teacher=`` paths with the hf engine, and the Qwen3 one with
``engine=vllm`` in the vLLM venv. A hub id goes through the same code path: offline, an id
that is not in the local cache fails at start-up with a clear error and leaves no run dir.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from agentopd import cli, zoo

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "env=lookup-chain", "cold_start.steps=0", "eval.episodes=0", "steps=1",
         "episodes_per_step=2", "rollout.max_new_tokens=16", "device=cpu"]  # fmt: skip


def _save(arch: str, root: Path) -> Path:
    tok = zoo.load_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    cls, cfg = (
        (Qwen3ForCausalLM, Qwen3Config) if arch == "qwen3" else (LlamaForCausalLM, LlamaConfig)
    )
    model = cls(cfg(**common))
    path = root / f"tiny-{arch}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {arch: _save(arch, root) for arch in ("qwen3", "llama")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_train_with_local_hf_models(local_models, arch, tmp_path, capsys):
    path = local_models[arch]
    model, tok = zoo.load(str(path))
    assert type(model).__name__ == ("Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM")
    assert len(tok) == len(zoo.load_tokenizer())
    runs = tmp_path / "runs"
    rc = cli.main([*TRAIN, f"student={path}", f"teacher={path}", f"runs_dir={runs}", "run_name=m"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (runs / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [0]


def test_hub_id_goes_through_the_same_path_and_fails_clearly_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import; the constant is what is used
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert zoo.is_hub_id("Qwen/Qwen3-1.7B") and not zoo.is_hub_id(str(tmp_path))
    runs = tmp_path / "runs"
    rc = cli.main([*TRAIN, "student=agentopd-tests/no-such-model", f"runs_dir={runs}"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "student=agentopd-tests/no-such-model could not be loaded" in err, err
    assert not runs.exists() or not any(runs.iterdir())


DRIVER = r"""
import sys
from agentopd import cli
sys.exit(cli.main(["train", "env=lookup-chain", "engine=vllm", f"student={sys.argv[1]}",
    f"teacher={sys.argv[1]}", f"runs_dir={sys.argv[2]}", "run_name=q", "steps=2",
    "episodes_per_step=2", "cold_start.steps=0", "eval.episodes=0", "rollout.max_new_tokens=16",
    "device=cpu"]))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_qwen3_student_with_vllm_engine(local_models, tmp_path):
    python = os.environ.get("AGENTOPD_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        reason = "no vLLM venv (run .ci/setup-vllm.sh or set AGENTOPD_VLLM_PYTHON)"
        if os.environ.get("AGENTOPD_REQUIRE_VLLM") == "1":
            pytest.fail(f"AGENTOPD_REQUIRE_VLLM=1 but {reason}")
        pytest.skip(reason)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [python, "-c", DRIVER, str(local_models["qwen3"]), str(runs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(x) for x in (runs / "q" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [0, 1]
