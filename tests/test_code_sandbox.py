"""``code-sandbox``: the task generator, the expert on every available backend, persistence,
restarts, truncation and ``tasks_file`` validation."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentopd
from agentopd.envs.code_sandbox import (
    CodeSandboxEnv,
    TaskFileError,
    answers_match,
    chain_values,
    load_tasks_file,
    step_code,
)
from agentopd.sandbox import availability
from agentopd.sandbox.pool import close_pools
from agentopd.sandbox.testing import (
    backend_params,
    leftovers,
    process_snapshot,
    require_backend,
)

pytestmark = pytest.mark.timeout(180)


def play_expert(env: CodeSandboxEnv, seed: int, options: dict | None = None) -> dict:
    env.reset(seed=seed, options=options)
    while True:
        _, _, terminated, truncated, info = env.step(env.expert_action(env.messages))
        if terminated or truncated:
            return info


def python(env: CodeSandboxEnv, code: str) -> str:
    messages, _, terminated, _, _ = env.step(agentopd.format_tool_call("python", {"code": code}))
    assert len(messages) == 1 and not terminated
    return messages[0].content


def first_available_backend() -> str:
    return next(b for b in ("bwrap", "local", "docker") if availability(b).available)


@pytest.fixture(params=backend_params())
def env(request: pytest.FixtureRequest) -> Iterator[CodeSandboxEnv]:
    require_backend(request.param)
    close_pools()
    before = process_snapshot()
    e = CodeSandboxEnv(backend=request.param, timeout_s=2.0)
    yield e
    e.close()
    close_pools()  # the env hands its sandbox back to the process's pool; close stops them
    assert not leftovers(before), "close() left sandbox processes or containers behind"


@pytest.fixture
def fast_env() -> Iterator[CodeSandboxEnv]:
    e = CodeSandboxEnv(backend=first_available_backend(), timeout_s=1.0, max_output_chars=500)
    yield e
    e.close()


# ------------------------------------------------------------------ task generator (no sandbox)
def test_generated_tasks_are_seeded_and_graded() -> None:
    e = CodeSandboxEnv(backend="local", min_steps=1, max_steps=3)
    seen = set()
    for seed in range(30):
        _, info_a = e.reset(seed=seed)
        _, info_b = e.reset(seed=seed)
        assert info_a["task_id"] == info_b["task_id"]
        assert e.task.difficulty == len(e.task.data["chain"]) == info_a["difficulty"]
        assert e._horizon == e.task.difficulty + 2
        seen.add(e.task.difficulty)
    assert seen == {1, 2, 3}
    for steps in (1, 2, 4):
        e.reset(seed=0, options={"steps": steps})
        assert e.task.difficulty == steps and e.task.prompt.count("x =") == steps
    assert e._sandbox is None, "the worker must start lazily"


def test_train_and_eval_tasks_are_disjoint() -> None:
    e = CodeSandboxEnv(backend="local")
    train = {e.reset(seed=s)[1]["task_id"] for s in range(60)}
    evals = {e.reset(seed=s, options={"split": "eval"})[1]["task_id"] for s in range(60)}
    assert train and evals and not train & evals


def test_expert_code_prints_the_reference_values() -> None:
    # Runs the expert's cells in-process (trusted, generated code) to pin the templates.
    e = CodeSandboxEnv(backend="local", min_steps=1, max_steps=4)
    for seed in range(40):
        e.reset(seed=seed)
        chain, x = e.task.data["chain"], None
        for (op, a, b), ref in zip(chain, chain_values(chain)):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(step_code(op, a, b, x), {})
            assert out.getvalue() == f"{ref}\n", (op.name, a, b, x)
            assert len(step_code(op, a, b, x)) < 90  # short enough for a tiny model
            x = ref
        assert str(x) == e.task.answer
        assert len(e.task.prompt) < 200


def test_answers_match() -> None:
    assert (
        answers_match(" 42 ", "42") and answers_match('"42"', "42") and answers_match("42.0", "42")
    )
    assert not answers_match("41", "42") and not answers_match("nan", "nan")
    assert answers_match("abc", "abc") and not answers_match("abd", "abc")


# ------------------------------------------------------------------ on every backend
def test_expert_solves_builtin_tasks(env: CodeSandboxEnv) -> None:
    for seed in range(4):
        for split in ("train", "eval"):
            info = play_expert(env, seed, {"split": split})
            assert info["success"], env.render() or env.messages
            assert env.turn == env.task.difficulty + 1


def test_variables_persist_across_calls(env: CodeSandboxEnv) -> None:
    env.reset(seed=0)
    assert python(env, "x = 41\ndef f(v):\n    return v + 1") == "(no output)"
    assert python(env, "print(f(x))") == "42"
    assert python(env, "f(x) * 2") == "84"  # a cell's last expression is shown, like a notebook


def expert_call(env: CodeSandboxEnv) -> tuple[str, dict]:
    (call,) = agentopd.parse_assistant(env.expert_action(env.messages)).tool_calls
    return call.name, call.arguments


def test_expert_keeps_x_in_the_session_and_restates_it_when_untrusted(env: CodeSandboxEnv) -> None:
    env.reset(seed=5, options={"steps": 3, "max_turns": 8})
    chain, values = env.task.data["chain"], env.task.data["values"]
    assert expert_call(env) == ("python", {"code": step_code(*chain[0])})
    python(env, step_code(*chain[0]))
    assert expert_call(env) == ("python", {"code": step_code(*chain[1])})  # trusted
    python(env, "x = 0")  # a student's cell clobbers x
    assert expert_call(env) == ("python", {"code": step_code(*chain[1], values[0])})
    python(env, step_code(*chain[1], values[0]))
    assert expert_call(env) == ("python", {"code": step_code(*chain[2])})  # trusted
    python(env, "import os\nos._exit(3)")  # the worker dies and restarts: x is gone
    assert expert_call(env) == ("python", {"code": step_code(*chain[2], values[1])})
    while True:
        _, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
        if terminated or truncated:
            break
    assert (reward, info["success"], env.turn) == (1.0, True, 6)


def test_restart_after_crash_is_reported(env: CodeSandboxEnv) -> None:
    env.reset(seed=0)
    python(env, "x = 1")
    text = python(env, "import os\nos._exit(3)")
    assert "died" in text and "restarted" in text and "lost" in text
    assert "NameError" in python(env, "print(x)")
    assert python(env, "print(2 + 2)") == "4"


def test_timeout_is_reported(env: CodeSandboxEnv) -> None:
    env.reset(seed=0)
    assert "time limit" in python(env, "while True:\n    pass")
    assert python(env, "print('alive')") == "alive"


def test_close_episode_releases_the_sandbox(env: CodeSandboxEnv) -> None:
    env.reset(seed=0)
    python(env, "y = 1\nopen('mine.txt', 'w').write('1')")
    box = env._sandbox
    assert box is not None and box.running
    env.reset(seed=1)  # reset ends the previous episode: its sandbox goes back to the pool
    assert env._sandbox is None
    assert "NameError" in python(env, "print(y)")  # a fresh Python executor per episode
    assert python(env, "import os\nprint(os.listdir('.'))") == "[]"  # and an empty work dir
    assert env._sandbox is box and env._pool is not None and env._pool.stats.resets >= 1


# ------------------------------------------------------------------ env details
def test_exception_and_stderr_are_shown(fast_env: CodeSandboxEnv) -> None:
    fast_env.reset(seed=0)
    text = python(fast_env, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n1/0")
    assert text.startswith("out\n[stderr]\nerr\n") and "ZeroDivisionError: division by zero" in text
    assert "code_sandbox" not in text and "worker" not in text  # only the cell's frames


def test_long_output_is_truncated_with_a_marker(fast_env: CodeSandboxEnv) -> None:
    fast_env.reset(seed=0)
    text = python(fast_env, "print('y' * 100000)")
    assert "truncated" in text and len(text) < 700


def test_submit_is_checked_in_the_trainer(fast_env: CodeSandboxEnv) -> None:
    fast_env.reset(seed=0)
    python(fast_env, "import builtins\nbuiltins.reward = 1.0")  # nothing in the sandbox counts
    _, reward, terminated, _, info = fast_env.step(fast_env.submit_call("not the answer"))
    assert terminated and reward == 0.0 and not info["success"]


# ------------------------------------------------------------------ task files
def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tasks_file_is_used_and_solved(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        [
            json.dumps(
                {
                    "id": "pow",
                    "prompt": "What is 2**100 mod 7?",
                    "answer": 2,
                    "solution": ["print(2**100 % 7)"],
                }
            ),
            "",
            json.dumps(
                {
                    "prompt": "data.txt holds numbers, one per line. Submit their sum.",
                    "answer": "60",
                    "setup": "open('data.txt', 'w').write('10\\n20\\n30\\n')",
                    "solution": ["print(sum(int(v) for v in open('data.txt')))"],
                }
            ),
            json.dumps({"prompt": "Say hi.", "answer": "hi", "split": "eval"}),
        ],
    )
    env = CodeSandboxEnv(tasks_file=path, backend=first_available_backend())
    try:
        ids = set()
        for seed in range(12):
            info = play_expert(env, seed)
            assert info["success"], env.messages
            ids.add(env.task.id)
        assert ids == {"pow", "line3"}
        assert play_expert(env, 0, {"split": "eval"})["success"] and env.task.id == "line4"
    finally:
        env.close()


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            ['{"prompt": "a", "answer": 1}', '{"prompt": "b"}'],
            ":2: 'answer' is a required property",
        ),
        (['{"prompt": "a", "answer": 1}', "", '{"prompt": "b", "answer": 2'], ":3: invalid JSON"),
        (['{"prompt": "", "answer": 1}'], ":1: prompt: '' should be non-empty"),
        (['{"prompt": "a", "answer": [1]}'], ":1: answer: [1] is not of type 'string', 'number'"),
        (
            ['{"prompt": "a", "answer": 1, "solutoin": []}'],
            ":1: Additional properties are not allowed",
        ),
        (
            ['{"prompt": "a", "answer": 1, "difficulty": 0}'],
            ":1: difficulty: 0 is less than the minimum of 1",
        ),
        (
            ['{"id": "x", "prompt": "a", "answer": 1}', '{"id": "x", "prompt": "b", "answer": 2}'],
            ":2: duplicate id 'x'",
        ),
        (["[1, 2]"], ":1: [1, 2] is not of type 'object'"),
        ([""], "no tasks"),
    ],
)
def test_tasks_file_errors_name_the_line(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = write_lines(tmp_path, lines)
    with pytest.raises(TaskFileError) as e:
        load_tasks_file(path)
    assert expected in str(e.value) and str(path) in str(e.value)
    with pytest.raises(TaskFileError):
        agentopd.make("code-sandbox", tasks_file=str(path), backend="local")


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(
        Exception,
        match="unknown sandbox backend 'dokcer'; expected one of auto, docker, bwrap, local.* Did you mean 'docker'",
    ):
        CodeSandboxEnv(backend="dokcer")
