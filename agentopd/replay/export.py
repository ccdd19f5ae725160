"""``agentopd export``: a run's episodes as JSON lines, or as an Inspect AI log.

* ``--jsonl OUT``: one ``{"id": .., "step": .., **Episode.to_json()}`` per line, the format of
  older run directories' ``episodes.jsonl`` (``Episode.from_json`` reads each line back).
* ``--inspect OUT.eval``: every episode as an Inspect AI sample (``inspect view`` opens the
  file): the conversation with tool calls and their results, a ``success`` score (1/0) and a
  ``reward`` score, and the agentopd fields (step, task, seed, stop reason, tool errors, teacher
  KL) as sample metadata. A task attempted several times (pass@k) is one sample id with one
  epoch per attempt. Needs the ``inspect`` extra (``pip install 'agentopd[inspect]'``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from agentopd.replay.store import EpisodeStore, Filter, IndexRow
from agentopd.replay.view import pair_calls, read_config


def write_jsonl(store: EpisodeStore, out: str | Path, flt: Filter | None = None) -> int:
    """Write the episodes passing ``flt`` as JSON lines (``"-"``: stdout); returns the count."""
    n = 0
    f = sys.stdout if str(out) == "-" else open(out, "w", encoding="utf-8")  # noqa: SIM115
    # On a terminal every non-ASCII character is a \u escape: no C1 control or bidi control
    # the model wrote reaches the terminal (the JSON is the same data).
    ascii_only = f is sys.stdout and sys.stdout.isatty()
    try:
        for row, d in store.readable(store.rows_at(store.matching(flt))):
            d = dict(d)
            d.pop("step", None)
            line = json.dumps({"id": row.id, "step": row.step, **d}, ensure_ascii=ascii_only)
            f.write(line + "\n")
            n += 1
    finally:
        if f is not sys.stdout:
            f.close()
    return n


def _tool_error(content: str) -> Any:
    from inspect_ai.tool import ToolCallError

    if not content.startswith("Error ("):
        return None
    kind = content[len("Error (") :].split(")", 1)[0]
    mapped: dict[str, Literal["parsing", "timeout", "limit"]] = {
        "parse": "parsing",
        "timeout": "timeout",
        "oversized": "limit",
    }
    return ToolCallError(type=mapped.get(kind, "unknown"), message=content)


def sample_messages(d: dict[str, Any]) -> list[Any]:
    """The episode's conversation as Inspect chat messages, tool calls paired with results."""
    from inspect_ai.model import (
        ChatMessageAssistant,
        ChatMessageSystem,
        ChatMessageTool,
        ChatMessageUser,
    )
    from inspect_ai.tool import ToolCall

    out: list[Any] = []
    for m in d.get("messages", []):
        if m.get("role") == "assistant":
            break
        cls = ChatMessageSystem if m.get("role") == "system" else ChatMessageUser
        out.append(cls(content=str(m.get("content") or "")))
    for t in d.get("turns", []):
        calls, results = t.get("tool_calls", []), t.get("tool_results", [])
        pairs = pair_calls(calls, results)
        inspect_calls, answers = [], []
        for ci, ri in pairs:
            call_id = None
            if ci is not None:
                c = calls[ci]
                call_id = c.get("id") or f"call-{t.get('index', 0)}-{ci}"
                args = c.get("arguments")
                inspect_calls.append(
                    ToolCall(
                        id=call_id,
                        function=str(c.get("name")),
                        arguments=args if isinstance(args, dict) else {"value": args},
                        parse_error=t.get("parse_error"),
                    )
                )
            if ri is not None:
                r = results[ri]
                content = str(r.get("content") or "")
                answers.append(
                    ChatMessageTool(
                        content=content,
                        tool_call_id=call_id or r.get("tool_call_id"),
                        function=r.get("name") or (None if ci is None else calls[ci].get("name")),
                        error=_tool_error(content),
                    )
                )
        out.append(
            ChatMessageAssistant(content=str(t.get("text", "")), tool_calls=inspect_calls or None)
        )
        out += answers
    return out


def _sample(row: IndexRow, d: dict[str, Any], epoch: int, model: str) -> Any:
    from inspect_ai.log import EvalSample
    from inspect_ai.model import ModelOutput
    from inspect_ai.scorer import Score

    messages = sample_messages(d)
    first = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    last = next((m for m in reversed(messages) if m.role == "assistant"), None)
    return EvalSample(
        id=f"{row.task_id}@{row.seed}",
        epoch=epoch,
        input=messages[:first],
        target="",
        messages=messages,
        output=ModelOutput.from_content(model=model, content=last.text if last else ""),
        scores={
            "success": Score(value=1.0 if row.success else 0.0, explanation=row.stop_reason),
            "reward": Score(value=row.reward),
        },
        metadata={
            "agentopd_id": row.id,
            "step": row.step,
            "env": row.env,
            "task_id": row.task_id,
            "seed": row.seed,
            "turns": row.turns,
            "stop_reason": row.stop_reason,
            "tool_errors": row.tool_errors,
            "teacher_kl": row.teacher_kl,
            "sampled_tokens": row.sampled_tokens,
        },
    )


def write_inspect(store: EpisodeStore, out: Path, flt: Filter | None = None) -> int:
    """Write the episodes passing ``flt`` as an Inspect AI ``.eval`` log; returns the count.

    Raises:
        ImportError: inspect-ai is not installed (the message says how to install it).
    """
    try:
        from inspect_ai.log import (
            EvalConfig,
            EvalDataset,
            EvalLog,
            EvalMetric,
            EvalResults,
            EvalScore,
            EvalSpec,
            write_eval_log,
        )
    except ImportError as e:
        raise ImportError(
            f"--inspect needs inspect-ai ({e}); install it with: pip install 'agentopd[inspect]'"
        ) from None
    cfg = read_config(store.path)
    model = f"agentopd/{cfg.get('model') or cfg.get('student') or 'student'}"
    epochs: dict[tuple[str, Any], int] = defaultdict(int)
    samples, envs = [], set()
    for row, d in store.readable(store.rows_at(store.matching(flt))):
        epochs[(row.task_id, row.seed)] += 1
        samples.append(_sample(row, d, epochs[(row.task_id, row.seed)], model))
        envs.add(row.env)
    n = len(samples)
    solved = sum(s.scores["success"].value for s in samples)
    env = ",".join(sorted(envs)) or "none"
    log = EvalLog(
        status="success",
        eval=EvalSpec(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            task=f"agentopd/{env}",
            dataset=EvalDataset(name=env, samples=len(epochs)),
            model=model,
            config=EvalConfig(epochs=max(epochs.values(), default=1)),
            metadata={"run_dir": str(store.path), "format": store.format},
        ),
        samples=samples,
        results=EvalResults(
            total_samples=n,
            completed_samples=n,
            scores=[
                EvalScore(
                    name="success",
                    scorer="agentopd",
                    metrics={"accuracy": EvalMetric(name="accuracy", value=solved / max(1, n))},
                )
            ],
        ),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_eval_log(log, str(out), format="eval")
    return n
