"""``env=verifiers:<module>``: verifiers' own loop against agentopd's local endpoint, token-checked.

The envs are built as verifiers' docs and ``vf-init`` build them (tests/verifiers_fixtures.py).
verifiers is a hard requirement: CI installs ``.[dev,adapters]``, and a missing package fails
these tests instead of skipping them. The listing, missing-package and did-you-mean checks are
parametrised rows in tests/test_adapters.py.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from agentopd import registry
from agentopd.config import ConfigError
from agentopd.conformance import check_env_conformance
from agentopd.engines import Sample
from agentopd.envs.adapters._endpoint import ChatEndpoint
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, run_episodes
from agentopd.types import StopReason

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from test_adapters import agentopd  # noqa: E402 - after tests/ is importable

WORD = "verifiers:verifiers_fixtures:WordTaskset"
RETRY = "verifiers:verifiers_fixtures:WordTaskset:RetryEnv"
REWRITING = "verifiers:verifiers_fixtures:RewritingTaskset:RetryEnv"
REWRITING_SINGLE = "verifiers:verifiers_fixtures:RewritingTaskset"
EXPLODING = "verifiers:verifiers_fixtures:ExplodingTaskset"


class _Scripted:
    """An engine that answers each prompt with the next of ``texts`` (the last one repeats)."""

    def __init__(self, renderer: Renderer, *texts: str):
        self.turns = [renderer.encode(t) + [renderer.eot_id] for t in texts]
        self.calls = 0

    def generate(self, prompts, params):
        out = []
        for _ in prompts:
            tokens = self.turns[min(self.calls, len(self.turns) - 1)]
            out.append(Sample(list(tokens), [-0.25] * len(tokens), True))
        self.calls += 1
        return out

    def load_weights(self, state_dict):
        pass


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    from agentopd import zoo

    return Renderer(zoo.load_tokenizer())


# ------------------------------------------------------------------------------ the wrapped env
def test_single_turn_episode_is_token_exact_and_scored_by_the_rubric(renderer):
    # seed 0 is "apple"; the student's reply goes to verifiers verbatim and its reward scores it
    (ep,) = run_episodes([EpisodeJob(WORD, 0, {}, {})], _Scripted(renderer, "elppa"), renderer)
    assert ep.stop_reason == StopReason.ANSWER, ep.info.get("error")
    assert ep.reward == 1.0 and ep.success
    seg = ep.segments[0]
    sampled = [t for t, m in zip(seg.tokens, seg.mask) if m]
    assert sampled == renderer.encode("elppa") + [renderer.eot_id]
    assert ep.num_turns == 1


def test_the_endpoint_returns_the_sampled_token_ids_and_logprobs(renderer, monkeypatch):
    from agentopd.envs.adapters import _endpoint

    sent = []  # a spy: every reply still goes out as it would
    real = _endpoint.ChatRequest.reply
    monkeypatch.setattr(
        _endpoint.ChatRequest,
        "reply",
        lambda self, text, **kw: sent.append(kw) or real(self, text, **kw),
    )
    (ep,) = run_episodes([EpisodeJob(WORD, 0, {}, {})], _Scripted(renderer, "elppa"), renderer)
    seg = ep.segments[0]
    t = ep.turns[0]
    assert sent == [
        {"token_ids": seg.tokens[t.start : t.end], "logprobs": [-0.25] * (t.end - t.start)}
    ]
    assert sent[0]["token_ids"] == renderer.encode("elppa") + [renderer.eot_id]


def test_multi_turn_env_replies_are_observations_at_mask_zero(renderer):
    engine = _Scripted(renderer, "wrong", "still wrong", "elppa")
    (ep,) = run_episodes([EpisodeJob(RETRY, 0, {}, {})], engine, renderer)
    assert ep.stop_reason == StopReason.ANSWER, ep.info.get("error")
    assert ep.num_turns == 3 and ep.reward == 1.0
    seg = ep.segments[0]
    sampled = [t for t, m in zip(seg.tokens, seg.mask) if m]
    assert sampled == [t for turn in engine.turns for t in turn]
    masked = renderer.decode([t for t, m in zip(seg.tokens, seg.mask) if not m])
    assert masked.count("Not quite, try again.") == 2
    assert "elppa" not in masked and "wrong" not in masked


def test_wrong_replies_score_zero_and_a_turn_limit_ends_the_verifiers_episode(renderer):
    jobs = [EpisodeJob(RETRY, 1, {"max_turns": 1}, {}), EpisodeJob(RETRY, 2, {}, {})]
    cut, played = run_episodes(jobs, _Scripted(renderer, "nope"), renderer)
    assert cut.stop_reason == StopReason.MAX_TURNS and cut.num_turns == 1
    assert played.stop_reason == StopReason.ANSWER and played.num_turns == 3
    assert played.reward == 0.0 and not played.success


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("name", [REWRITING, REWRITING_SINGLE])
def test_an_env_that_rewrites_the_students_reply_is_refused_per_episode(name, renderer):
    jobs = [EpisodeJob(name, 0, {}, {}), EpisodeJob(WORD, 0, {}, {})]
    refused, fine = run_episodes(jobs, _Scripted(renderer, "wrong"), renderer)
    assert refused.stop_reason == StopReason.ENV_ERROR
    assert "is not token-exact here, episode refused" in refused.info["error"]
    assert "(reply withheld)" in refused.info["error"]
    assert fine.stop_reason == StopReason.ANSWER


def test_check_env_refuses_the_rewriting_env_with_the_reason():
    report = check_env_conformance(REWRITING)
    assert not report.ok
    detail = " ".join(f.detail for f in report.failures)
    assert "not token-exact" in detail and "(reply withheld)" in detail


def test_a_foreign_env_raising_mid_episode_ends_only_that_episode(renderer):
    # ExplodingTask's reward raises for odd task indices
    jobs = [EpisodeJob(EXPLODING, 1, {}, {}), EpisodeJob(EXPLODING, 0, {}, {})]
    broken, fine = run_episodes(jobs, _Scripted(renderer, "elppa"), renderer)
    assert broken.stop_reason == StopReason.ENV_ERROR
    assert "the foreign reward crashed" in broken.info["error"]
    assert fine.stop_reason == StopReason.ANSWER and fine.reward == 1.0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("verifiers:verifiers_fixtures:ToolTaskset", "tool servers"),
        ("verifiers:verifiers_fixtures:WordTaskset:DuetEnv", "2 agent seats"),
    ],
)
def test_envs_that_cannot_be_token_exact_are_refused_when_built(name, reason):
    with pytest.raises(ConfigError, match=reason) as e:
        registry.make(name)
    assert "cannot be wrapped token-exactly" in str(e.value)


def test_held_out_tasks_are_the_eval_split():
    env = registry.make(WORD, held_out=2)
    train = {env.reset(seed=s)[1]["task_id"] for s in range(8)}
    held = {env.reset(seed=s, options={"split": "eval"})[1]["task_id"] for s in range(8)}
    env.close()
    assert len(train) == 4 and len(held) == 2 and not train & held
    with pytest.raises(ConfigError, match="held_out must be in"):
        registry.make(WORD, held_out=6)


def test_taskset_config_fields_come_from_env_kwargs_taskset():
    name = "verifiers:verifiers_fixtures:CasedTaskset"
    upper = registry.make(name, taskset={"letters": "upper"})
    obs, _ = upper.reset(seed=0)
    upper.close()
    assert "'APPLE'" in obs[-1].content
    lower = registry.make(name, **{"taskset.letters": "lower"})  # check-env's flat keys
    assert "'apple'" in lower.reset(seed=0)[0][-1].content
    lower.close()
    with pytest.raises(ConfigError, match=r"env_kwargs\.taskset\.letters: Field required"):
        registry.make(name)
    with pytest.raises(ConfigError, match="Did you mean 'letters'") as e:
        registry.make(name, taskset={"leters": "upper"})
    assert "letters: Literal['lower', 'upper']" in str(e.value)
    with pytest.raises(ConfigError, match="'lower' or 'upper' \\(got 'title'\\)"):
        registry.make(name, taskset={"letters": "title"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        registry.make(name, taskset="upper")


# ------------------------------------------------------------------------------ the endpoint
def test_endpoint_answers_plain_and_streamed_requests_with_the_exact_text():
    import threading

    endpoint = ChatEndpoint("m")
    route = endpoint.open_route()
    text = "caf\u00e9 <tool_call>{}</tool_call>\n"
    results: dict[bool, bytes] = {}

    def call(stream: bool) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        req = urllib.request.Request(
            endpoint.base_url(route) + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            results[stream] = r.read()

    for stream in (False, True):
        worker = threading.Thread(target=call, args=(stream,))
        worker.start()
        request = endpoint.next_item(route, timeout=30)
        assert request.messages == [{"role": "user", "content": "hi"}]
        request.reply(text, token_ids=[5, 7, 2], logprobs=[-0.5, -1.0, -0.25])
        worker.join(30)
    plain = json.loads(results[False])
    choice = plain["choices"][0]
    assert choice["message"]["content"] == text
    assert choice["token_ids"] == [5, 7, 2] and plain["usage"]["completion_tokens"] == 3
    assert [(c["token"], c["logprob"]) for c in choice["logprobs"]["content"]] == [
        ("token_id:5", -0.5), ("token_id:7", -1.0), ("token_id:2", -0.25)
    ]  # fmt: skip
    events = [
        json.loads(line[6:])
        for line in results[True].decode().splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]) == text
    assert [t for e in events for c in e["choices"] for t in c.get("token_ids", [])] == [5, 7, 2]
    endpoint.close_route(route)
    stale = urllib.request.Request(
        endpoint.base_url(route) + "/chat/completions", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(stale, timeout=30)
    assert e.value.code == 409
    endpoint.close()


# ------------------------------------------------------------------------------ check-env, train
def test_check_env_passes_and_says_what_it_skipped():
    # what `agentopd check-env` runs (cli.cmd_check_env), in process to spare the imports; the
    # command itself is exercised by the train test below
    report = check_env_conformance(RETRY)
    rows = {r.name: r for r in report.rows}
    assert report.ok, report
    assert "skipped: the env has no scripted expert" in rows["expert (train)"].detail
    assert rows["malformed actions"].ok and rows["rollout path"].ok


@pytest.mark.slow
def test_train_two_steps_with_a_named_teacher(tmp_path):
    r = agentopd(
        "train",
        f"env={RETRY}",
        "env_kwargs.held_out=2",
        "student=tiny",
        "teacher=tiny-teacher-lookup-chain",
        "steps=2",
        "episodes_per_step=2",
        "cold_start.steps=0",
        "eval.episodes=2",
        "rollout.max_new_tokens=12",
        f"runs_dir={tmp_path}",
        "run_name=a",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row.get("phase") == "train"] == [0, 1]
