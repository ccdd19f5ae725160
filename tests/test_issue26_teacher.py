"""Nothing non-finite reaches the weights (issue 26).

A fake scoring server on 127.0.0.1 answers in vLLM's ``prompt_logprobs`` format and misbehaves
on purpose: NaN / +inf / -inf for a sampled token's log-prob, NaN in one top-k entry, too few
top-k entries, a wrong number of positions, and a correct reply dripped one byte at a time.
Every case is a :class:`TeacherServerError` that names the server (and the episode), never a
silent NaN. The learner refuses an update whose gradient is not finite (weights unchanged), a
checkpoint with non-finite weights is never written, and ``metrics.jsonl`` stays strict JSON.
"""

from __future__ import annotations

import copy
import http.server
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from agentopd import zoo
from agentopd.learner import Learner, NonFiniteUpdateError
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.runs import NonFiniteCheckpointError, RunDir
from agentopd.teachers import (
    ServerConfig,
    TeacherConfig,
    UnusableScoresError,
    check_scores,
)
from agentopd.teachers import server as server_teacher
from agentopd.types import TeacherScores

K = 4


class FakeScorer(http.server.BaseHTTPRequestHandler):
    """``POST /v1/completions``: a well-formed reply, broken the way ``mode`` says."""

    mode = "ok"

    def do_POST(self):  # noqa: N802 - http.server's name
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tokens, k, mode = req["prompt"], req["prompt_logprobs"], type(self).mode
        rows: list = [None]
        for t in range(1, len(tokens)):
            row = {str(1000 + r): {"logprob": -1.0 - r, "rank": r + 1} for r in range(k)}
            row[str(tokens[t])] = {"logprob": -0.5, "rank": 2}
            rows.append(row)
        last = rows[-1]
        if mode in ("nan", "inf", "-inf"):
            last[str(tokens[-1])]["logprob"] = float(mode)
        elif mode == "nan-topk":
            last[str(1000)]["logprob"] = float("nan")
        elif mode == "few-topk":
            for r in range(1, k):
                del last[str(1000 + r)]
        elif mode == "positions":
            rows = rows[:-3]
        body = json.dumps({"choices": [{"prompt_logprobs": rows}]}).encode()  # NaN as bare NaN
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drip":
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                return
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def renderer():
    return Renderer(zoo.load_tokenizer())


@pytest.fixture(scope="module")
def episodes(renderer):
    return expert_episodes(
        [EpisodeJob("lookup-chain", 10 + i, env_kwargs={"hops": 2}) for i in range(2)], renderer
    )


@pytest.fixture
def fake():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeScorer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    FakeScorer.mode = "ok"
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def teacher(url: str, renderer: Renderer, **server: float) -> server_teacher.ServerTeacher:
    cfg = TeacherConfig(topk=K, server=ServerConfig(url=url, retries=0, backoff_s=0, **server))
    return server_teacher.ServerTeacher(server_teacher.Client(cfg.server), "m", renderer, cfg)


def test_fake_server_scores_are_accepted(fake, renderer, episodes):
    eps = copy.deepcopy(episodes)
    scores = teacher(fake, renderer).score(eps)
    assert scores[0][0].logprobs_M[0] == -0.5 and scores[0][0].k == K
    check_scores(eps, "test", K)


@pytest.mark.parametrize("mode", ["nan", "inf", "-inf", "nan-topk"])
def test_non_finite_scores_are_refused(fake, renderer, episodes, mode):
    FakeScorer.mode = mode
    eps = copy.deepcopy(episodes)
    with pytest.raises(server_teacher.TeacherServerError) as e:
        teacher(fake, renderer).score(eps)
    msg = str(e.value)
    assert fake in msg and "episode 0 of the batch" in msg and "not a finite number" in msg
    assert ("top-k" in msg) == (mode == "nan-topk")


@pytest.mark.parametrize(
    ("mode", "said"), [("few-topk", "ranked ids, expected top-4"), ("positions", "rows for")]
)
def test_malformed_replies_name_the_server(fake, renderer, episodes, mode, said):
    FakeScorer.mode = mode
    with pytest.raises(server_teacher.TeacherServerError, match=said) as e:
        teacher(fake, renderer).score(copy.deepcopy(episodes))
    assert fake in str(e.value) and "episode 0" in str(e.value)


def test_a_dripping_reply_hits_the_whole_request_deadline(fake, renderer, episodes):
    """The reply is correct but arrives one byte every 50 ms (tens of seconds in all); each
    read returns well within the timeout, so only a deadline on the request stops it."""
    FakeScorer.mode = "drip"
    with pytest.raises(server_teacher.TeacherServerError, match="TimeoutError.*timeout_s=0.5"):
        teacher(fake, renderer, timeout_s=0.5).score(copy.deepcopy(episodes))


def test_check_scores_refuses_bad_shapes_and_values(episodes):
    eps = copy.deepcopy(episodes)
    for ep in eps:
        ep.teacher = []
        for seg in ep.segments:
            pos = [t for t, m in enumerate(seg.mask) if m]
            n = len(pos)
            ep.teacher.append(
                TeacherScores(pos, [-1.0] * n, [[1] * K] * n, [[-1.0] * K] * n, [0.5] * n)
            )
    check_scores(eps, "hf", K)
    bad = copy.deepcopy(eps)
    bad[1].teacher[0].entropy_M[3] = float("nan")
    with pytest.raises(UnusableScoresError, match="backend hf: episode 1 .*entropy is nan"):
        check_scores(bad, "hf", K)
    bad = copy.deepcopy(eps)
    bad[0].teacher[0].topk_ids_M_K = bad[0].teacher[0].topk_ids_M_K[:, : K - 1]
    with pytest.raises(
        UnusableScoresError, match="3 top-k ids and 4 log-probs per position, expected 4"
    ):
        check_scores(bad, "hf", K)
    bad = copy.deepcopy(eps)
    bad[0].teacher[0].positions_M = bad[0].teacher[0].positions_M[:-1]
    with pytest.raises(UnusableScoresError, match="expected the segment's"):
        check_scores(bad, "hf", K)


# ----------------------------------------------------------------------------------- learner
def test_learner_refuses_a_non_finite_update(episodes, renderer, monkeypatch):
    eps = copy.deepcopy(episodes)
    for ep in eps:
        ep.teacher = []
        for seg in ep.segments:
            pos = [t for t, m in enumerate(seg.mask) if m]
            n = len(pos)
            ep.teacher.append(
                TeacherScores(pos, [-1.0] * n, [[1] * K] * n, [[-1.0] * K] * n, [0.5] * n)
            )
    eps[0].teacher[0].logprobs_M[2] = float("nan")
    model = zoo.build_model("tiny", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    learner = Learner(model, pad_id=renderer.pad_id, loss="rkl-sampled", topk=K)
    # Whatever backend scored them, the batch refuses non-finite scores ...
    with pytest.raises(UnusableScoresError, match="episode 0 .*position .*not a finite number"):
        learner.step(eps)
    # ... and past that check (a loss that diverges by itself), the update is not applied.
    monkeypatch.setattr("agentopd.learner.check_scores", lambda *a, **k: None)
    with pytest.raises(NonFiniteUpdateError, match="learner update 1: .*not finite"):
        learner.step(eps)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
        assert p.grad is None
    eps[0].teacher[0].logprobs_M[2] = -1.0
    out = learner.step(eps)  # the next good batch trains normally
    assert math.isfinite(out["learner/loss"])
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path: Path):
    from safetensors.torch import save_file

    run = RunDir(tmp_path, "r")

    def good(d: Path) -> None:
        (d / "model").mkdir()
        save_file({"w": torch.ones(3)}, d / "model" / "model.safetensors")

    def bad(d: Path) -> None:
        (d / "model").mkdir()
        save_file(
            {"w": torch.tensor([1.0, float("nan"), float("inf")])}, d / "model" / "m.safetensors"
        )

    run.save_checkpoint(1, good, {})
    with pytest.raises(NonFiniteCheckpointError, match="step 2 not saved: .*w holds 2 NaN"):
        run.save_checkpoint(2, bad, {})
    assert json.loads((run.checkpoints / "latest.json").read_text())["step"] == 1
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest.json", "step_000001"]


def test_metrics_lines_are_strict_json(tmp_path: Path):
    run = RunDir(tmp_path, "r")
    row = {"step": 0, "rollout/reward": float("nan"), "x": [float("inf"), 1.0], "ok": 2.5}
    run.append_jsonl("metrics.jsonl", [json.dumps(row)])

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in metrics.jsonl")

    line = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0]
    assert json.loads(line, parse_constant=refuse) == {
        "step": 0,
        "rollout/reward": None,
        "x": [None, 1.0],
        "ok": 2.5,
    }
