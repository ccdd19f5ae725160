"""``engine=vllm`` end to end (``agentopd train``, ``eval`` and ``collect`` sample from vLLM),
and ``teacher_backend=vllm`` (in-process prefill scoring) against the hf teacher.

One driver process under the vLLM venv (``.venv-vllm``, see ``tests/test_vllm_engine.py``) runs
the real commands through :func:`agentopd.cli.main`, with ``VLLMEngine.load_weights`` wrapped so
that every weight push is checked where it happens: vLLM's log-probs of a fixed token sequence
(prefill ``prompt_logprobs``) must equal the learner's (the student's own forward pass) within
:data:`SYNC_ATOL` right after the push, and differ from vLLM's log-probs before it. The
test in this venv reads the driver's JSON and the run directory it wrote.

Without the vLLM venv it skips, unless ``AGENTOPD_REQUIRE_VLLM=1`` (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import vllm_python

from agentopd.types import Episode

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SYNC_ATOL = 1e-4
"""|vLLM - learner| log-prob allowed per token after a push (both float32; seen: ~1e-6)."""

DRIVER = r"""
import json, sys
import torch
from agentopd import cli
from agentopd.engines import vllm as V

out_path, runs = sys.argv[1], sys.argv[2]
FIXED = None
checks = []
_push = V.VLLMEngine.load_weights


def learner_logprobs(engine, state_dict, tokens):
    # The learner's weights in a plain transformers model: the reference vLLM must match.
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(engine.model_path))
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()


def checked(self, state_dict):
    global FIXED
    if FIXED is None:
        from agentopd import zoo
        tok = zoo.load_tokenizer()
        FIXED = tok.encode("lookup(key='k3') -> v7; answer(value='v7')", add_special_tokens=False)
    def vllm_lp():
        rows = self.prompt_logprobs([FIXED])[0]
        return [rows[t][FIXED[t]][0] for t in range(1, len(FIXED))]
    before = vllm_lp()
    _push(self, state_dict)
    after = vllm_lp()
    ref = learner_logprobs(self, state_dict, FIXED)
    checks.append({
        "sync": max(abs(a - b) for a, b in zip(after, ref)),
        "moved": max(abs(a - b) for a, b in zip(after, before)),
    })


V.VLLMEngine.load_weights = checked
common = ["env=lookup-chain", "engine=vllm", "device=cpu", "rollout.max_new_tokens=32"]
res = {}
res["train_rc"] = cli.main(["train", *common, f"steps={STEPS}", "episodes_per_step=6",
    "cold_start.steps=0", "eval.episodes=0", "optim.lr=0.5", f"runs_dir={runs}", "run_name=v"])
res["checks"] = checks
run = f"{runs}/v"
res["eval_rc"] = cli.main(["eval", *common, f"model={run}", "episodes=4", f"output={runs}/eval.jsonl"])
res["collect_rc"] = cli.main(["collect", *common, f"model={run}", "episodes=4",
    "only_successful=false", f"output={runs}/collect.jsonl"])

# teacher_backend=vllm: in-process prompt_logprobs scores against the hf teacher, then a step.
from agentopd import zoo
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.teachers import TeacherConfig
from agentopd.teachers import hf as HT, vllm as VT
tok = zoo.load_tokenizer()
jobs = [EpisodeJob("lookup-chain", s, {"split": "train"}, {"hops": 2}) for s in range(3)]
eps = expert_episodes(jobs, Renderer(tok))
tcfg = TeacherConfig(topk=8, system_prompt="You are the teacher.")
got = VT.build("tiny-teacher-lookup-chain", tokenizer=tok, config=tcfg, device="cpu").score(eps)
ref = HT.build("tiny-teacher-lookup-chain", tokenizer=tok, config=tcfg, device="cpu").score(eps)
worst, n, top1 = 0.0, 0, True
for ea, eb in zip(got, ref):
    for a, b in zip(ea, eb):
        assert a.positions_M.tolist() == b.positions_M.tolist()
        n += len(a)
        worst = max([worst] + [abs(x - y) for x, y in zip(a.logprobs_M.tolist(), b.logprobs_M.tolist())]
                    + [abs(x - y) for la, lb in zip(a.topk_logprobs_M_K.tolist(), b.topk_logprobs_M_K.tolist())
                       for x, y in zip(la, lb)])
        top1 &= all(ia[0] == ib[0] for ia, ib in zip(a.topk_ids_M_K.tolist(), b.topk_ids_M_K.tolist()))
res["vllm_teacher"] = {"worst": worst, "positions": n, "top1_equal": top1}
res["teacher_train_rc"] = cli.main(["train", "env=lookup-chain", "teacher_backend=vllm",
    "device=cpu", "steps=1", "episodes_per_step=2", "cold_start.steps=0", "eval.episodes=0",
    "rollout.max_new_tokens=16", f"runs_dir={runs}", "run_name=t"])
json.dump(res, open(out_path, "w"))
""".replace("STEPS", str(STEPS))


def vllm_env() -> dict[str, str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def driven(tmp_path_factory):
    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm-train")
    (work / "driver.py").write_text(DRIVER)
    start = time.perf_counter()
    proc = subprocess.run(
        [python, str(work / "driver.py"), str(work / "out.json"), str(work / "runs")],
        cwd=work,
        env=vllm_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not (work / "out.json").exists():
        pytest.fail(f"vLLM driver failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    print(f"vLLM train/eval/collect driver: {time.perf_counter() - start:.1f}s")
    return json.loads((work / "out.json").read_text()), work / "runs", proc.stdout


@pytest.mark.vllm
@pytest.mark.slow
def test_train_pushes_weights_after_every_update(driven):
    res, runs, _ = driven
    assert res["train_rc"] == 0
    checks = res["checks"]
    print("per-step |vLLM - learner| / |after - before|:", checks)
    assert len(checks) == STEPS, "one weight push per learner update"
    for c in checks:
        assert c["sync"] < SYNC_ATOL, c
        assert c["moved"] > 100 * SYNC_ATOL, f"the update did not reach vLLM: {c}"


@pytest.mark.vllm
@pytest.mark.slow
def test_train_run_dir_records_vllm_and_token_exact_episodes(driven):
    res, runs, _ = driven
    run = runs / "v"
    assert json.loads((run / "choices.json").read_text())["engine"] == "vllm"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("phase") == "train"]
    assert [r["step"] for r in train] == list(range(STEPS))
    assert all(r["throughput/rollout_tok_s"] > 0 for r in train)
    assert (run / "checkpoints" / "latest.json").is_file()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_teacher_equals_hf_teacher_and_trains(driven):
    res, runs, _ = driven
    t = res["vllm_teacher"]
    print("teacher_backend=vllm vs hf:", t)
    assert t["positions"] > 20 and t["top1_equal"] and t["worst"] < 1e-3
    assert res["teacher_train_rc"] == 0
    choices = json.loads((runs / "t" / "choices.json").read_text())
    assert choices["teacher_backend"] == "vllm"


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_and_collect_with_vllm(driven):
    res, runs, _ = driven
    assert res["eval_rc"] == 0 and res["collect_rc"] == 0
    for name in ("eval.jsonl", "collect.jsonl"):
        episodes = [Episode.from_json(x) for x in (runs / name).read_text().splitlines()]
        assert len(episodes) == 4, name
        for ep in episodes:
            for seg in ep.segments:
                assert len(seg.tokens) == len(seg.mask) == len(seg.logprobs)
                sampled = [lp for lp, m in zip(seg.logprobs, seg.mask) if m]
                assert sampled and all(lp <= 0 for lp in sampled)
