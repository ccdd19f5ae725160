"""Environment tests: every registered env through Gymnasium's checker and the conformance
report, then the behaviour specific to ``lookup-chain`` and ``sql``."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import agentopd
from agentopd.conformance import check_env_conformance
from agentopd.envs.lookup_chain import LookupChainEnv
from agentopd.envs.sql import SqlEnv
from agentopd.registry import registry

REGISTERED_ENVS = agentopd.list_registered("envs")


def play_expert(
    env: agentopd.Env, seed: int, options: dict | None = None
) -> tuple[float, bool, bool, dict]:
    """Run the expert to the end; return the last (reward, terminated, truncated, info)."""
    env.reset(seed=seed, options=options)
    while True:
        _, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
        if terminated or truncated:
            return reward, terminated, truncated, info


def tool_result(env: agentopd.Env, name: str, **arguments: object) -> str:
    messages, *_ = env.step(agentopd.format_tool_call(name, arguments))
    assert len(messages) == 1
    return messages[0].content


# ------------------------------------------------------------------ every registered env
def test_builtin_envs_are_registered() -> None:
    assert {"lookup-chain", "sql"} <= set(REGISTERED_ENVS)


@pytest.mark.parametrize("name", REGISTERED_ENVS)
def test_registered_env_passes_gymnasium_check_env(name: str) -> None:
    # No skip on import errors: a registered env that cannot be built is a failure.
    env = agentopd.make(name)
    try:
        check_env(env.unwrapped, skip_render_check=True)
    finally:
        env.close()


@pytest.mark.parametrize("name", REGISTERED_ENVS)
def test_registered_env_conformance(name: str) -> None:
    report = check_env_conformance(name, n_episodes=3)
    assert report.ok, str(report)
    assert {r.name for r in report.rows} >= {
        "build",
        "gymnasium check_env",
        "tool schemas",
        "expert (train)",
        "expert (eval)",
        "random actions",
        "malformed actions",
    }


def test_conformance_unknown_env_suggests_nearest_name() -> None:
    report = check_env_conformance("lookup-chian")
    assert not report.ok
    assert report.rows[0].name == "build"
    assert "Did you mean 'lookup-chain'?" in report.rows[0].detail


def test_conformance_reports_a_failing_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenExpert(LookupChainEnv):
        def expert_action(self, messages: list[agentopd.Message]) -> str:
            return self.submit_call("wrong")

    # The registry has no unregister: keep the entry out of other tests' list_registered().
    envs = registry("envs")
    envs.names()
    monkeypatch.setattr(envs, "_specs", dict(envs._specs))
    agentopd.register("test-broken-expert", BrokenExpert)
    report = check_env_conformance("test-broken-expert", n_episodes=2)
    failed = {r.name for r in report.failures}
    assert failed == {"expert (train)", "expert (eval)"}, str(report)
    assert "expert failed" in report.failures[0].detail


def test_conformance_report_renders_a_rich_table() -> None:
    from rich.console import Console
    from rich.table import Table

    report = check_env_conformance("lookup-chain", n_episodes=1, hops=1)
    table = report.render()
    assert isinstance(table, Table)
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    assert "expert (train)" in text and "passed" in text


# ------------------------------------------------------------------ lookup-chain
@pytest.mark.parametrize("hops", [1, 2, 3, 5])
def test_lookup_chain_hops_set_episode_length_exactly(hops: int) -> None:
    env = agentopd.make("lookup-chain", hops=hops)
    for seed in range(10):
        reward, terminated, truncated, info = play_expert(env, seed)
        assert (reward, terminated, truncated) == (1.0, True, False)
        assert env.turn == hops + 1
        lookups = [m for m in env.messages if m.role == "tool" and m.name == "lookup"]
        assert len(lookups) == hops
        assert env.task.difficulty == hops


def test_lookup_chain_hops_range_and_per_reset_override() -> None:
    env = agentopd.make("lookup-chain", min_hops=1, max_hops=4)
    seen = set()
    for seed in range(40):
        play_expert(env, seed)
        seen.add(env.task.difficulty)
        assert env.turn == env.task.difficulty + 1
    assert seen == {1, 2, 3, 4}
    reward, *_ = play_expert(env, 0, {"hops": 7})
    assert reward == 1.0 and env.turn == 8 and env.task.difficulty == 7


def test_lookup_chain_is_deterministic_per_seed() -> None:
    a, b = agentopd.make("lookup-chain", hops=3), agentopd.make("lookup-chain", hops=3)
    for seed in range(5):
        obs_a, info_a = a.reset(seed=seed)
        obs_b, info_b = b.reset(seed=seed)
        assert obs_a == obs_b and info_a["task_id"] == info_b["task_id"]
        assert a.task.data["store"] == b.task.data["store"]
    ids = {a.reset(seed=s)[1]["task_id"] for s in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize("name", ["lookup-chain", "sql"])
def test_eval_split_is_disjoint_from_train(name: str) -> None:
    env = agentopd.make(name)
    # Through reset: seeds, task indices, and unseeded resets (which share one random stream).
    train = {env.reset(seed=s)[1]["task_id"] for s in range(20)}
    train |= {env.reset(options={"task_index": i})[1]["task_id"] for i in range(20, 30)}
    train |= {env.reset()[1]["task_id"] for _ in range(10)}
    evals = {env.reset(seed=s, options={"split": "eval"})[1]["task_id"] for s in range(20)}
    evals |= {
        env.reset(options={"task_index": i, "split": "eval"})[1]["task_id"] for i in range(10)
    }
    evals |= {env.reset(options={"split": "eval"})[1]["task_id"] for _ in range(10)}
    # Many more straight from new_task, with the same random streams for both splits.
    for s in range(1500):
        train.add(env.new_task(np.random.default_rng(s), {}).id)
        evals.add(env.new_task(np.random.default_rng(s), {"split": "eval"}).id)
    assert len(train) > 1500 and len(evals) > 1500
    assert not train & evals
    env.close()


def test_lookup_chain_keys_are_short_and_episodes_small() -> None:
    env = agentopd.make("lookup-chain", hops=3)
    play_expert(env, 0)
    for key, value in env.task.data["store"].items():
        assert 2 <= len(key) <= 3 and 2 <= len(value) <= 3
    assert sum(len(m.content) for m in env.messages) < 700


def test_lookup_chain_missing_key_is_data_not_an_exception() -> None:
    env = agentopd.make("lookup-chain")
    env.reset(seed=0)
    text = tool_result(env, "lookup", key="zz999")
    assert text.startswith("no key")
    reward, terminated, truncated, _ = play_expert_from_here(env)
    assert (reward, terminated, truncated) == (1.0, True, False)


def play_expert_from_here(env: agentopd.Env) -> tuple[float, bool, bool, dict]:
    while True:
        _, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
        if terminated or truncated:
            return reward, terminated, truncated, info


def test_lookup_chain_expert_continues_after_replayed_turns() -> None:
    env = agentopd.make("lookup-chain", hops=4)
    play_expert(env, 3)
    actions = [m.content for m in env.messages if m.role == "assistant"]
    for k in range(len(actions)):
        _, info = env.reset(seed=3, options={"replay": actions[:k]})
        assert info["replayed_turns"] == k
        reward, *_ = play_expert_from_here(env)
        assert reward == 1.0 and env.turn == len(actions)


@pytest.mark.parametrize("name", ["lookup-chain", "sql"])
def test_terminated_and_truncated_semantics(name: str) -> None:
    env = agentopd.make(name)
    # The turn limit cuts the episode: truncated, not terminated, no reward.
    env.reset(seed=1, options={"max_turns": 1})
    _, reward, terminated, truncated, info = env.step(env.expert_action(env.messages))
    assert (reward, terminated, truncated) == (0.0, False, True)
    with pytest.raises(RuntimeError):
        env.step(env.expert_action(env.messages))
    # A wrong answer ends the episode: terminated, not truncated, no reward.
    env.reset(seed=1)
    _, reward, terminated, truncated, info = env.step(env.submit_call("definitely-wrong"))
    assert (reward, terminated, truncated, info["success"]) == (0.0, True, False, False)
    # The right answer: terminated with reward 1, even on the very last allowed turn.
    reward, terminated, truncated, info = play_expert(env, 1)
    n = env.turn
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    reward, terminated, truncated, _ = play_expert(env, 1, {"max_turns": n})
    assert (reward, terminated, truncated) == (1.0, True, False)
    env.close()


MALFORMED = [
    '<tool_call>{"name": "lookup", "arguments": {',
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "lookup", "arguments": {"key": ["a", 1]}}</tool_call>',
    '<tool_call>{"name": "sql", "arguments": {"query": 42}}</tool_call>',
    '<tool_call>{"name": "submit", "arguments": {"wrong": 1}}</tool_call>',
    "</tool_call>",
]


@pytest.mark.parametrize("name", ["lookup-chain", "sql"])
@pytest.mark.parametrize("action", MALFORMED)
def test_malformed_calls_get_a_message_and_the_episode_goes_on(name: str, action: str) -> None:
    env = agentopd.make(name)
    env.reset(seed=2)
    messages, reward, terminated, truncated, info = env.step(action)
    assert messages and messages[0].role == "tool" and "Error" in messages[0].content
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["tool_errors"] or info["parse_error"]
    reward, terminated, *_ = play_expert_from_here(env)
    assert (reward, terminated) == (1.0, True)
    env.close()


def test_lookup_chain_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        LookupChainEnv(min_hops=3, max_hops=2)
    with pytest.raises(ValueError):
        LookupChainEnv(hops=5, store_size=4)


# ------------------------------------------------------------------ sql
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_sql_expert_solves_every_difficulty(difficulty: int) -> None:
    env = agentopd.make("sql", min_difficulty=difficulty, max_difficulty=difficulty)
    for seed in range(25):
        for split in ("train", "eval"):
            reward, terminated, truncated, _ = play_expert(env, seed, {"split": split})
            assert (reward, terminated, truncated) == (1.0, True, False), env.render()
            assert env.turn == difficulty + 1
            assert env.task.difficulty == difficulty
    env.close()


def test_sql_is_deterministic_per_seed() -> None:
    a, b = agentopd.make("sql"), agentopd.make("sql")
    for seed in range(5):
        obs_a, info_a = a.reset(seed=seed)
        obs_b, info_b = b.reset(seed=seed)
        assert obs_a == obs_b and info_a["task_id"] == info_b["task_id"]
        assert a.db_path != b.db_path
        for table in ("customers", "products", "orders"):
            q = f"SELECT * FROM {table}"
            assert a.run_query(q) == b.run_query(q)
    a.close()
    b.close()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO customers VALUES (99, 'zed', 'oslo')",
        "UPDATE products SET price = 0",
        "DELETE FROM orders",
        "DROP TABLE orders",
        "CREATE TABLE t (x)",
        "PRAGMA query_only = OFF",
        "ATTACH DATABASE 'other.db' AS other",
        "VACUUM",
    ],
)
def test_sql_database_is_read_only(query: str) -> None:
    env = agentopd.make("sql")
    env.reset(seed=0)
    before = file_digest(env.db_path)
    counts = [env.run_query(f"SELECT COUNT(*), SUM(id) FROM {t}") for t in ("customers", "orders")]
    text = tool_result(env, "sql", query=query)
    assert text.startswith("Error") and "read-only" in text
    assert file_digest(env.db_path) == before
    assert counts == [
        env.run_query(f"SELECT COUNT(*), SUM(id) FROM {t}") for t in ("customers", "orders")
    ]
    assert list(env.db_path.parent.iterdir()) == [env.db_path]
    env.close()


def test_sql_timeout_aborts_a_pathological_query() -> None:
    env = agentopd.make("sql", query_timeout_s=0.3)
    env.reset(seed=0)
    query = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    start = time.monotonic()
    messages, reward, terminated, truncated, _ = env.step(
        agentopd.format_tool_call("sql", {"query": query})
    )
    elapsed = time.monotonic() - start
    assert elapsed < 1.5
    assert "time limit" in messages[0].content and messages[0].content.startswith("Error")
    assert (terminated, truncated) == (False, False)
    assert env.error_counts["sql_timeout"] == 1
    # The connection still works after the abort.
    assert env.run_query("SELECT COUNT(*) FROM orders") == "COUNT(*)\n12"
    env.close()


def test_sql_row_limit_and_compact_format() -> None:
    env = agentopd.make("sql", max_rows=5)
    env.reset(seed=0)
    lines = env.run_query("SELECT id, qty FROM orders ORDER BY id").split("\n")
    assert lines[0] == "id|qty"
    assert len(lines) == 1 + 5 + 1 and lines[1].startswith("1|")
    assert "first 5 rows" in lines[-1]
    assert env.run_query("SELECT id FROM orders LIMIT 3").split("\n") == ["id", "1", "2", "3"]
    assert env.run_query("SELECT id FROM orders WHERE id < 0") == "id\n(no rows)"
    assert env.run_query("SELECT NULL AS a, 1.0 / 3 AS b") == "a|b\nNULL|0.333333"
    env.close()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELEC * FROM orders", "syntax error"),
        ("SELECT * FROM nowhere", "no such table"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("SELECT zeroblob(1000000000)", "too big"),
    ],
)
def test_sql_errors_come_back_as_text(query: str, expected: str) -> None:
    env = agentopd.make("sql")
    env.reset(seed=0)
    text = tool_result(env, "sql", query=query)
    assert text.startswith("Error") and expected in text
    assert env.answer is None and env.turn == 1
    env.close()


def test_sql_temp_files_are_removed() -> None:
    env = agentopd.make("sql")
    env.reset(seed=0)
    first = env.db_path
    assert first.exists()
    env.reset(seed=1)
    second = env.db_path
    assert not first.parent.exists() and second.exists()
    env.close()
    assert not second.parent.exists() and env.conn is None
    env.close()
    # An env dropped without close() cleans up when collected.
    env = agentopd.make("sql")
    env.reset(seed=2)
    third = env.db_path.parent
    del env
    import gc

    gc.collect()
    assert not third.exists()


def test_sql_reward_comes_from_the_submitted_answer_only() -> None:
    env = agentopd.make("sql", min_difficulty=1, max_difficulty=1)
    env.reset(seed=4)
    answer = env.task.answer
    _, reward, terminated, _, _ = env.step(env.submit_call(f"  {str(answer).upper()}. "))
    assert (reward, terminated) == (1.0, True)
    env.reset(seed=4)
    _, reward, *_ = env.step(env.submit_call(str(answer) + "x"))
    assert reward == 0.0
    env.close()


def test_sql_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        SqlEnv(min_difficulty=0)
    with pytest.raises(ValueError):
        SqlEnv(n_customers=100)


def test_sql_names_tokenize_as_the_query_writes_them():
    """What the expert copies from the question must be the same tokens in its query."""
    from agentopd.zoo.tokenizer import load_tokenizer

    tok = load_tokenizer()
    env = SqlEnv()
    for seed in range(40):
        messages, _ = env.reset(seed=seed, options={"split": "train"})
        question = messages[-1].content
        query = json.loads(env.expert_action(list(env.messages)).split("<tool_call>")[1].split(
            "</tool_call>")[0])["arguments"]["query"]  # fmt: skip
        for literal in query.split("'")[1::2]:  # the quoted names in the first query
            quoted = tok.encode(f" '{literal}'", add_special_tokens=False)
            q_ids = tok.encode(question, add_special_tokens=False)
            assert any(q_ids[i : i + len(quoted)] == quoted for i in range(len(q_ids))), (
                question,
                literal,
            )
    env.close()


def test_rollout_env_accepts_every_env_and_names_what_a_stranger_lacks() -> None:
    from agentopd.env import rollout_env

    env = agentopd.make("lookup-chain")
    assert rollout_env(env) is env
    env.observe_sampled([1, 2], [-0.1, -0.2])  # Env's default: ignored

    class Bare:
        messages: list = []

    with pytest.raises(TypeError, match="tool_parser, observe_sampled"):
        rollout_env(Bare())
