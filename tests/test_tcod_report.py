"""benchmarks/tcod_report.py on a hand-made runs directory whose answers are known."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tcod_report", ROOT / "benchmarks" / "tcod_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def _run(root: Path, name: str, rows: list[dict], episodes_per_step: int = 4) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"env: lookup-chain\nepisodes_per_step: {episodes_per_step}\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval(success: dict[str, float], **extra) -> dict:
    return {
        "phase": "eval",
        "tag": "after training",
        "eval/success_by_difficulty": success,
        **extra,
    }


def test_summary_tables_and_plots(tmp_path):
    on_policy = {"phase": "train", "batch": "on-policy", "rollout/tokens": 100.0}
    _run(tmp_path, "uniform-s0", [
        {**on_policy, "diag/kl_turn/0": 1.0, "diag/kl_turn/1": 3.0, "teacher_tokens": 50},
        {**on_policy, "diag/kl_turn/0": 2.0, "rollout/guide_tokens": 7, "teacher_tokens": 90},
        _eval({"1": 1.0, "2": 0.5}, **{"eval/pass@4": 0.75}),
    ])  # fmt: skip
    _run(tmp_path, "uniform-s1", [
        {**on_policy, "diag/kl_turn/0": 4.0, "teacher_tokens": 80},
        _eval({"1": 0.0, "2": 0.5}, **{"eval/pass@4": 0.25}),
    ])  # fmt: skip
    _run(tmp_path, "sft-only-s0", [
        {"phase": "train", "batch": "demonstration", "demo/sampled_tokens": 10.0, "teacher_tokens": 40},
        _eval({"1": 1.0}),
    ])  # fmt: skip
    _run(tmp_path, "cold-s0", [_eval({"1": 0.0})])  # a cold start is not an arm
    s = report.summarise(tmp_path)
    assert set(s) == {"uniform", "sft-only"} and s["uniform"]["seeds"] == 2
    # turn 0: seed 0 averages 1.5 over its steps, seed 1 has 4.0 -> 2.75; turn 1 only in seed 0
    assert s["uniform"]["kl_per_turn"] == {0: 2.75, 1: 3.0}
    assert s["uniform"]["success_by_length"] == {"1": 0.5, "2": 0.5}
    assert s["uniform"]["pass@k"] == {"eval/pass@4": 0.5}
    # prefill: seed 0 = 2 steps x 100 mean tokens x 4 episodes, seed 1 = 400 -> mean 600
    assert s["uniform"]["prefill_positions"] == 600 and s["uniform"]["decode_steps"] == 3.5
    assert s["uniform"]["teacher_tokens"] == 85
    assert s["sft-only"]["decode_steps"] == 40 and s["sft-only"]["prefill_positions"] == 0
    text = report.tables(s)
    assert "| uniform | 85 | 600 | 4 |" in text and "| sft-only | - |" in text and "pass@4" in text
    paths = report.plots(s, tmp_path / "fig")
    assert [p.name for p in paths] == ["kl_per_turn.png", "success_by_length.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
