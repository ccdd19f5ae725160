"""``teacher_backend=server`` against a real vLLM server, and its HTTP client against a stub.

The module starts one ``vllm`` OpenAI-compatible server (from the vLLM venv, ``.venv-vllm``) on
127.0.0.1 serving the zoo's ``tiny-teacher-code-sandbox`` with ``--max-logprobs 16``, and:

- compares its scores with the in-process ``hf`` teacher of the same weights (plain and with
  the teacher's own system prompt, i.e. realigned positions);
- trains two steps of ``agentopd train env=lookup-chain`` against it;
- checks that ``teacher_cfg.topk=32`` fails at start-up naming ``--max-logprobs``;
- runs ``agentopd train env=code-sandbox engine=vllm teacher_backend=server`` end to end in the
  vLLM venv.

Without the vLLM venv the server tests skip, unless ``AGENTOPD_REQUIRE_VLLM=1`` (CI), where they
fail. The client tests (retries, backoff, API key, errors) use a stub server and always run.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, vllm_python, vllm_server

from agentopd import cli, zoo
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.schema import ConfigError
from agentopd.teachers import ServerConfig, TeacherConfig
from agentopd.teachers import hf as hf_teacher
from agentopd.teachers import server as server_teacher
from agentopd.teachers.vllm import model_dir

REPO = Path(__file__).resolve().parents[1]
TEACHER = "tiny-teacher-code-sandbox"
MAX_LOGPROBS = 16
LOGPROB_ATOL = 1e-3
"""|server - hf| teacher log-prob allowed (same fp32 weights, different kernels; seen ~1e-5)."""


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The teacher saved with its tokenizer, in float32 (what both sides load)."""
    return model_dir(TEACHER)


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    """Base URL of a running vLLM server; stopped (its process group) at the end."""
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    yield from vllm_server(teacher_dir, ["--max-logprobs", str(MAX_LOGPROBS)], log)


@pytest.fixture(scope="module")
def episodes():
    renderer = Renderer(zoo.load_tokenizer())
    jobs = [EpisodeJob("lookup-chain", seed, {"split": "train"}, {"hops": 2}) for seed in range(3)]
    return expert_episodes(jobs, renderer)


def _compare(a, b) -> tuple[float, int]:
    """Worst |logprob| difference over sampled and top-k log-probs; number of positions."""
    worst, n = 0.0, 0
    for ea, eb in zip(a, b, strict=True):
        for sa, sb in zip(ea, eb, strict=True):
            assert sa.positions_M.tolist() == sb.positions_M.tolist() and sa.k == sb.k
            n += len(sa)
            for x, y in zip(sa.logprobs_M.tolist(), sb.logprobs_M.tolist(), strict=True):
                worst = max(worst, abs(x - y))
            for ia, ib, la, lb in zip(
                sa.topk_ids_M_K.tolist(),
                sb.topk_ids_M_K.tolist(),
                sa.topk_logprobs_M_K.tolist(),
                sb.topk_logprobs_M_K.tolist(),
            ):
                assert ia[0] == ib[0], "top-1 id differs"
                worst = max(worst, max(abs(x - y) for x, y in zip(la, lb, strict=True)))
            # The server's entropy is the top-k + tail estimate: a lower bound of the full one.
            for ha, hb in zip(sa.entropy_M.tolist(), sb.entropy_M.tolist(), strict=True):
                assert ha <= hb + 1e-3
    return worst, n


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("system_prompt", [None, "You are the teacher. Check every lookup."])
def test_server_scores_equal_in_process_teacher(server, teacher_dir, episodes, system_prompt):
    tok = zoo.load_tokenizer()
    cfg = TeacherConfig(topk=8, system_prompt=system_prompt, server=ServerConfig(url=server))
    remote = server_teacher.build(str(teacher_dir), tokenizer=tok, config=cfg, device="cpu")
    local = hf_teacher.build(str(teacher_dir), tokenizer=tok, config=cfg, device="cpu")
    worst, n = _compare(remote.score(episodes), local.score(episodes))
    print(f"system_prompt={system_prompt!r}: {n} positions, max |server - hf| = {worst:.2e}")
    assert n > 20 and worst < LOGPROB_ATOL


def _train(args: list[str], runs: Path, capsys) -> tuple[int, str]:
    rc = cli.main(["train", "env=lookup-chain", "cold_start.steps=0", "eval.episodes=0",
                   "device=cpu", f"runs_dir={runs}", *args])  # fmt: skip
    return rc, " ".join(capsys.readouterr().err.split())


@pytest.mark.vllm
@pytest.mark.slow
def test_train_two_steps_against_the_server(server, teacher_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    rc, err = _train(
        [
            "teacher_backend=server",
            f"teacher={teacher_dir}",
            f"teacher_cfg.server.url={server}",
            "teacher_cfg.topk=16",
            "steps=2",
            "episodes_per_step=4",
            "rollout.max_new_tokens=32",
            "run_name=s",
        ],  # fmt: skip
        runs,
        capsys,
    )
    assert rc == 0, err
    rows = [json.loads(x) for x in (runs / "s" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("phase") == "train"]
    assert len(train) == 2 and all(r["throughput/teacher_tok_s"] > 0 for r in train)
    assert json.loads((runs / "s" / "choices.json").read_text())["teacher_backend"] == "server"


@pytest.mark.vllm
@pytest.mark.slow
def test_topk_above_max_logprobs_fails_at_start_up(server, teacher_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    rc, err = _train(
        [
            "teacher_backend=server",
            f"teacher={teacher_dir}",
            f"teacher_cfg.server.url={server}",
            "teacher_cfg.topk=32",
        ],  # fmt: skip
        runs,
        capsys,
    )
    assert rc == 2 and "--max-logprobs 32" in err, err
    assert not runs.exists() or not any(runs.iterdir())


CODE_SANDBOX_DRIVER = r"""
import sys
from agentopd import cli
sys.exit(cli.main(["train", "env=code-sandbox", "engine=vllm", "teacher_backend=server",
    f"teacher={sys.argv[1]}", f"teacher_cfg.server.url={sys.argv[2]}", f"runs_dir={sys.argv[3]}",
    "run_name=cs", "steps=2", "episodes_per_step=2", "cold_start.steps=0", "eval.episodes=0",
    "student=tiny-base", "loss=rkl-sampled",
    "rollout.max_new_tokens=48", "device=cpu"]))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_code_sandbox_with_vllm_engine_and_server_teacher(server, teacher_dir, tmp_path):
    runs = tmp_path / "runs"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [vllm_python(), "-c", CODE_SANDBOX_DRIVER, str(teacher_dir), server, str(runs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    choices = json.loads((runs / "cs" / "choices.json").read_text())
    assert (choices["engine"], choices["teacher_backend"]) == ("vllm", "server")
    rows = [json.loads(x) for x in (runs / "cs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [0, 1]


# ----------------------------------------------------------------------------- the client, stubbed
class _Stub(http.server.BaseHTTPRequestHandler):
    """Fails with 503 ``fail`` times, then answers; records the headers it saw."""

    fail = 0
    seen: list[dict[str, str]] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(dict(self.headers))
        if type(self).fail > 0:
            type(self).fail -= 1
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Stub.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_client_retries_with_backoff_and_sends_the_key(stub, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sekrit")
    _Stub.fail = 2
    client = server_teacher.Client(
        ServerConfig(url=stub + "/v1", api_key_env="MY_TEACHER_KEY", retries=2, backoff_s=0.2)
    )
    start = time.perf_counter()
    assert client.request("/x", {"a": 1}) == {"ok": True}
    assert time.perf_counter() - start >= 0.2 + 0.4 - 0.05, "backoff doubles: 0.2 s, then 0.4 s"
    assert len(_Stub.seen) == 3
    assert all(h.get("Authorization") == "Bearer sekrit" for h in _Stub.seen)


def test_client_gives_up_with_a_clear_message(stub):
    _Stub.fail = 5
    client = server_teacher.Client(ServerConfig(url=stub, retries=1, backoff_s=0.0))
    with pytest.raises(server_teacher.TeacherServerError, match="failed 2 times.*resume=true"):
        client.request("/x", {})
    dead = server_teacher.Client(ServerConfig(url=f"http://127.0.0.1:{free_port()}", retries=0))
    with pytest.raises(server_teacher.TeacherServerError, match="ConnectionRefused|refused"):
        dead.request("/x", {})


def test_unreachable_server_is_a_config_error():
    tok = zoo.load_tokenizer()
    cfg = TeacherConfig(server=ServerConfig(url=f"http://127.0.0.1:{free_port()}", retries=0))
    with pytest.raises(ConfigError, match="not reachable"):
        server_teacher.build(TEACHER, tokenizer=tok, config=cfg, device="cpu")


# ------------------------------------------------------- the server dies mid-run, then resume
class _FakeVLLM(http.server.BaseHTTPRequestHandler):
    """The three endpoints the server teacher uses, answered from an in-process hf teacher in
    vLLM's format. After ``die_after`` scoring requests the server shuts itself down."""

    teacher = None
    tokenizer = None
    name = "fake-teacher"
    count = 0
    die_after = 10**9
    httpd = None

    def _reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._reply({"data": [{"id": type(self).name}]})

    def do_POST(self):  # noqa: N802
        cls = type(self)
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self._reply({"tokens": cls.tokenizer.encode(req["prompt"], add_special_tokens=False)})
            return
        cls.count += 1
        if cls.count > cls.die_after:
            threading.Thread(
                target=lambda: (cls.httpd.shutdown(), cls.httpd.server_close())
            ).start()
            self.close_connection = True
            return
        tokens, k = req["prompt"], req["prompt_logprobs"]
        with torch.no_grad():  # row t: the teacher's distribution over token t + 1
            logits = cls.teacher.model(torch.tensor([tokens])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        rows = [None]
        for t in range(1, len(tokens)):
            lp = logp[t - 1]
            top = lp.topk(k)
            row = {str(int(i)): {"logprob": float(v), "rank": r + 1}
                   for r, (v, i) in enumerate(zip(top.values, top.indices))}  # fmt: skip
            target = tokens[t]
            if str(target) not in row:
                rank = int((lp > lp[target]).sum()) + 1
                row[str(target)] = {"logprob": float(lp[target]), "rank": rank}
            rows.append(row)
        self._reply({"choices": [{"prompt_logprobs": rows}]})

    def log_message(self, *args):
        pass


def _start_fake(port: int = 0) -> tuple[http.server.ThreadingHTTPServer, int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _FakeVLLM)
    _FakeVLLM.httpd, _FakeVLLM.count = httpd, 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


@pytest.mark.slow
def test_server_dies_mid_run_then_resume_loses_and_repeats_nothing(tmp_path, capsys):
    tok = zoo.load_tokenizer()
    cfg = TeacherConfig(topk=4)
    _FakeVLLM.teacher = hf_teacher.build(
        "tiny-teacher-lookup-chain", tokenizer=tok, config=cfg, device="cpu"
    )
    _FakeVLLM.tokenizer = tok
    # 1 start-up request, then one per segment: 2 lookup-chain episodes (1 segment each) a step.
    _FakeVLLM.die_after = 1 + 2 * 2
    httpd, port = _start_fake()
    runs = tmp_path / "runs"
    args = ["teacher_backend=server", f"teacher_cfg.server.url=http://127.0.0.1:{port}",
            "teacher_cfg.topk=4", "teacher_cfg.server.retries=2", "teacher_cfg.server.backoff_s=0.1",
            "steps=4", "episodes_per_step=2", "checkpoint_every=1", "rollout.max_new_tokens=16",
            "run_name=d"]  # fmt: skip
    rc, err = _train(args, runs, capsys)  # the run stops with the reason, no traceback
    assert rc == 1 and re.search("failed 3 times.*resume=true", err), (rc, err[-2000:])
    metrics = runs / "d" / "metrics.jsonl"
    steps = [json.loads(x).get("step") for x in metrics.read_text().splitlines()]
    assert steps == [0, 1], "steps 0 and 1 completed before the server died"
    _FakeVLLM.die_after = 10**9
    httpd, _ = _start_fake(port)  # the server is back on the same address
    try:
        rc, err = _train([*args, "resume=true"], runs, capsys)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert rc == 0, err
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [0, 1, 2, 3]
