"""The vLLM engine against the transformers model it loads: logprobs, stopping, greedy, weights.

vLLM lives in its own venv (``.ci/setup-vllm.sh`` builds ``.venv-vllm``) because it pins its own
torch. This test runs in the main venv: it saves two tiny zoo models, runs :data:`DRIVER` under
the vLLM venv's python (``AGENTOPD_VLLM_PYTHON`` overrides the path), and checks the JSON that
comes back against ``transformers`` here. Without that venv it skips, unless
``AGENTOPD_REQUIRE_VLLM=1`` (CI), where it fails.

Model ``a`` is a tiny preset given a short SFT on lookup-chain expert turns, so that it samples
the end-of-turn token within a few dozen tokens; model ``b`` is another random init, the weights
that ``load_weights`` pushes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agentopd import make, zoo
from agentopd.engines import SamplingParams
from agentopd.engines.hf import HFEngine
from agentopd.renderer import Renderer
from agentopd.rollout import expert_episode
from agentopd.types import Episode
from agentopd.zoo.bootstrap import Recipe, train, with_overrides


def needs_vllm(fn):
    """Marks a test that drives the vLLM venv (``vllm`` and ``slow``)."""
    return pytest.mark.vllm(pytest.mark.slow(fn))


REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 64
TEMPERATURE = 0.7
MAX_MODEL_LEN = 1024
LOGPROB_ATOL = 1e-3
"""|vLLM sampled logprob - HF teacher-forced logprob| allowed per token. Both run the same fp32
weights and differ only in kernels (vLLM's CPU paged attention and repacked linears vs. torch
sdpa) and summation order. The worst token seen here over ~1k sampled tokens is ~2e-6 (printed
with ``-s``); 1e-3 leaves room for other CPUs' kernels (AVX2 vs AVX-512 paths) and still catches
a wrong position, temperature or top-p, which all move logprobs by more than 0.05."""

DRIVER = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from agentopd.engines import SamplingParams
from agentopd.engines.vllm import VLLMEngine
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, RolloutConfig, run_episodes
from agentopd import zoo

spec = json.load(open(sys.argv[1]))
prompts, n = spec["prompts"], spec["max_new"]
engine = VLLMEngine(spec["a"], max_model_len=spec["max_model_len"], seed=0)


def gen(temperature, seed=None, max_new=n, batch=prompts):
    out = engine.generate(batch, SamplingParams(max_new, temperature, 1.0, seed))
    return [{"tokens": s.tokens, "logprobs": s.logprobs, "finished": s.finished} for s in out]


res = {"eot_id": engine.eot_id}
res["sampled"] = gen(1.0, seed=0)
res["sampled_again"] = gen(1.0, seed=0)
res["tempered"] = gen(spec["temperature"], seed=1)
res["greedy_a"] = gen(0.0)
full = spec["max_model_len"]
res["too_long"] = gen(1.0, seed=0, batch=[[1] * full, [1] * (full - 3)])
renderer = Renderer(zoo.load_tokenizer())
jobs = [EpisodeJob("lookup-chain", i, env_kwargs={"hops": 2}) for i in range(4)]
eps = run_episodes(jobs, engine, renderer, RolloutConfig(max_new_tokens=n, temperature=1.0), seed=0)
res["episodes"] = [e.to_json() for e in eps]
b = AutoModelForCausalLM.from_pretrained(spec["b"], dtype=torch.float32)
engine.load_weights(b.state_dict())
res["greedy_b"] = gen(0.0)
a = AutoModelForCausalLM.from_pretrained(spec["a"], dtype=torch.float32)
engine.load_weights(a.state_dict())
res["greedy_a_again"] = gen(0.0)
json.dump(res, open(sys.argv[2], "w"))
"""


def _vllm_python() -> str | None:
    path = os.environ.get("AGENTOPD_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    return path if Path(path).is_file() else None


@pytest.fixture(scope="module")
def tok():
    return zoo.load_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok):
    return Renderer(tok)


@pytest.fixture(scope="module")
def models(tok, renderer, tmp_path_factory):
    """Model ``a`` (briefly SFT'd on expert turns) and ``b`` (random), saved for vLLM."""
    torch.manual_seed(0)
    env = make("lookup-chain", hops=2)
    examples = [expert_episode(env, renderer, seed, {"split": "train"}) for seed in range(32)]
    a = zoo.build_model("tiny", seed=0)
    short = {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5}
    recipe = with_overrides(Recipe(preset="tiny"), short)
    train(a, examples, recipe, 0)
    b = zoo.build_model("tiny", seed=1)
    root = tmp_path_factory.mktemp("vllm-models")
    for name, model in (("a", a), ("b", b)):
        model.eval()
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"a": a, "b": b, "dir": root}


@pytest.fixture(scope="module")
def prompts(renderer):
    """Rendered lookup-chain prompts: first turns, and after one expert turn and its tool result."""
    out = []
    for seed in range(6):
        env = make("lookup-chain", hops=2)
        messages, info = env.reset(seed=seed)
        tokens, _ = renderer.initial_prompt(messages, info.get("tools") or [])
        out.append(tokens)
    for seed in range(6, 10):
        env = make("lookup-chain", hops=3)
        segment = expert_episode(env, renderer, seed, {"split": "train"}).segments[0]
        tokens, mask = segment.tokens, segment.mask
        second_turn = mask.index(0, mask.index(1))  # end of the first expert turn
        second_turn = mask.index(1, second_turn)  # start of the second one
        out.append(tokens[:second_turn])
    return out


@pytest.fixture(scope="module")
def vllm_run(request, tmp_path_factory):
    """The driver's JSON; skips (or fails under ``AGENTOPD_REQUIRE_VLLM=1``) before any work."""
    python = _vllm_python()
    if python is None:
        reason = (
            "no vLLM venv (run .ci/setup-vllm.sh, or point AGENTOPD_VLLM_PYTHON at a python "
            "with vllm and agentopd installed)"
        )
        if os.environ.get("AGENTOPD_REQUIRE_VLLM") == "1":
            pytest.fail(f"AGENTOPD_REQUIRE_VLLM=1 but {reason}")
        pytest.skip(reason)
    models, prompts = request.getfixturevalue("models"), request.getfixturevalue("prompts")
    work = tmp_path_factory.mktemp("vllm-run")
    spec = {
        "a": str(models["dir"] / "a"),
        "b": str(models["dir"] / "b"),
        "prompts": prompts,
        "max_new": MAX_NEW,
        "temperature": TEMPERATURE,
        "max_model_len": MAX_MODEL_LEN,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "driver.py").write_text(DRIVER)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [python, str(work / "driver.py"), str(work / "spec.json"), str(work / "out.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"vLLM driver failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    print(f"vLLM driver: {time.perf_counter() - start:.1f}s")
    return json.loads((work / "out.json").read_text())


def _teacher_forced(model, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1).tolist()


def _hf_greedy(model, renderer, prompts) -> list[list[int]]:
    engine = HFEngine(model, renderer.eot_id, renderer.pad_id)
    # One prompt at a time: no left padding, so the comparison is about the engines only.
    return [
        engine.generate([p], SamplingParams(MAX_NEW, temperature=0.0))[0].tokens for p in prompts
    ]


def _worst_logprob_error(samples, model, prompts, temperature: float) -> float:
    worst = 0.0
    for prompt, s in zip(prompts, samples, strict=True):
        assert len(s["tokens"]) == len(s["logprobs"]) > 0
        ref = _teacher_forced(model, prompt, s["tokens"], temperature)
        worst = max(worst, max(abs(x - y) for x, y in zip(ref, s["logprobs"], strict=True)))
    return worst


@needs_vllm
@pytest.mark.parametrize(
    "key,model,temperature",
    [
        ("sampled", "a", 1.0),
        ("tempered", "a", TEMPERATURE),  # logprobs of the tempered distribution actually sampled
        ("greedy_a", "a", 1.0),  # greedy: the model's own distribution, as in HFEngine
        ("greedy_b", "b", 1.0),  # after load_weights: b's, with no stale prefix-cache KV of a
    ],
)
def test_logprobs_match_teacher_forcing(vllm_run, models, prompts, key, model, temperature):
    worst = _worst_logprob_error(vllm_run[key], models[model], prompts, temperature)
    print(f"{key}: max |vLLM - HF| logprob = {worst:.2e}")
    assert worst < LOGPROB_ATOL, f"{key}: max |vLLM - HF| logprob = {worst:.2e}"


@needs_vllm
def test_same_seed_same_samples(vllm_run):
    assert vllm_run["sampled"] == vllm_run["sampled_again"]
    firsts = {tuple(s["tokens"][:8]) for s in vllm_run["sampled"][:6]}
    assert len(firsts) > 1, "one seed per call must still give each prompt its own stream"


@needs_vllm
def test_stops_at_end_of_turn_and_keeps_it_once(vllm_run, renderer):
    eot = vllm_run["eot_id"]
    assert eot == renderer.eot_id
    samples = [s for k in ("sampled", "tempered", "greedy_a") for s in vllm_run[k]]
    finished = [s for s in samples if s["finished"]]
    print(f"{len(finished)}/{len(samples)} turns ended with the end-of-turn token")
    assert len(finished) >= 5, "model a should end turns itself; the stop is not tested otherwise"
    for s in samples:
        if s["finished"]:
            assert s["tokens"][-1] == eot and s["tokens"].count(eot) == 1
        else:
            assert eot not in s["tokens"] and len(s["tokens"]) == MAX_NEW
    # No room left in max_model_len: an empty unfinished turn; little room: cut at the limit.
    full, almost = vllm_run["too_long"]
    assert full == {"tokens": [], "logprobs": [], "finished": False}
    assert 1 <= len(almost["tokens"]) <= 3


@needs_vllm
def test_greedy_matches_hf_engine(vllm_run, models, prompts, renderer):
    hf = _hf_greedy(models["a"], renderer, prompts)
    assert [s["tokens"] for s in vllm_run["greedy_a"]] == hf


@needs_vllm
def test_load_weights_switches_to_the_new_model(vllm_run, models, prompts, renderer):
    greedy_b = [s["tokens"] for s in vllm_run["greedy_b"]]
    assert greedy_b != [s["tokens"] for s in vllm_run["greedy_a"]]
    assert greedy_b == _hf_greedy(models["b"], renderer, prompts)
    # Loading a's weights back restores a's outputs exactly (prefix cache dropped, no stale KV).
    assert vllm_run["greedy_a_again"] == vllm_run["greedy_a"]


@needs_vllm
def test_run_episodes_with_vllm_engine(vllm_run, renderer):
    episodes = [Episode.from_json(e) for e in vllm_run["episodes"]]
    assert len(episodes) == 4 and sum(len(e.turns) for e in episodes) > 4
    print("episodes:", [(len(e.turns), e.stop_reason.value, e.success) for e in episodes])
    for ep in episodes:
        assert ep.stop_reason is not None
        sampled = set()
        for t in ep.turns:
            seg = ep.segments[t.segment]
            assert t.end > t.start
            assert seg.mask[t.start : t.end] == [1] * (t.end - t.start)
            assert all(lp <= 0 for lp in seg.logprobs[t.start : t.end])
            sampled.update((t.segment, i) for i in range(t.start, t.end))
        for s, seg in enumerate(ep.segments):
            assert len(seg.tokens) == len(seg.mask) == len(seg.logprobs)
            assert sum(seg.mask[: seg.prompt_len]) == 0
            for i, m in enumerate(seg.mask):
                assert m == ((s, i) in sampled)
        # Every turn but an unfinished last one ends with the end-of-turn token.
        for t in ep.turns[:-1]:
            assert ep.segments[t.segment].tokens[t.end - 1] == renderer.eot_id


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vllm is installed in this venv"
)
def test_import_without_vllm_and_clear_error():
    from agentopd.engines.vllm import VLLMEngine

    with pytest.raises(ImportError, match=r"pip install 'agentopd\[vllm\]'"):
        VLLMEngine("/nonexistent")


if __name__ == "__main__":  # pragma: no cover - handy for a manual run
    sys.exit(pytest.main([__file__, "-v", "-s"]))
