"""Episode metrics: success, pass@k, turns, tokens, tool errors, stop reasons, per-length success.

Pure functions over :class:`~agentopd.types.Episode` lists, plus :func:`evaluate`, which plays
held-out tasks at the full horizon (evaluation never goes through a curriculum).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from math import comb
from typing import TYPE_CHECKING, Any

import numpy as np

from agentopd.types import Episode, StopReason

if TYPE_CHECKING:
    from agentopd.renderer import Renderer
    from agentopd.rollout import RolloutConfig


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` successes (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def episode_summary(episodes: list[Episode], prefix: str = "rollout/") -> dict[str, float]:
    """Success, reward, turns, tokens, tool-error kinds and stop reasons of a batch."""
    if not episodes:
        return {}
    n = len(episodes)
    out: dict[str, float] = {
        f"{prefix}success": sum(e.success for e in episodes) / n,
        f"{prefix}reward": sum(e.reward for e in episodes) / n,
        f"{prefix}turns": sum(e.num_turns for e in episodes) / n,
        f"{prefix}sampled_tokens": sum(e.num_sampled_tokens for e in episodes) / n,
        f"{prefix}tokens": sum(len(s.tokens) for e in episodes for s in e.segments) / n,
    }
    errors: Counter[str] = Counter()
    for e in episodes:
        errors.update(e.info.get("tool_errors", {}))
    for kind, count in sorted(errors.items()):
        out[f"tool_error/{kind}"] = count / n
    stops = Counter(e.stop_reason.value for e in episodes)
    for reason, count in sorted(stops.items()):
        out[f"stop/{reason}"] = count / n
    # Episodes an env, tool or rendering exception ended (the batch went on): a count, not a rate.
    out[f"{prefix}env_errors"] = float(stops.get(StopReason.ENV_ERROR.value, 0))
    return out


def sampled_kl(episodes: list[Episode]) -> float:
    """``E_t (log p_old(y_t) - log q(y_t))`` over the scored tokens of ``episodes``: the
    one-sample reverse-KL estimate from the log-probs the student sampled with (``p_old``)
    and its teacher's (``q``); NaN when nothing is scored."""
    total, n = 0.0, 0
    for e in episodes:
        for seg, sc in zip(e.segments, e.teacher or [], strict=False):
            if sc is None:
                continue
            p = np.asarray(seg.logprobs, dtype=np.float64)[sc.positions_M]
            total += float((p - sc.logprobs_M).sum())
            n += len(sc.positions_M)
    return total / n if n else float("nan")


def by_env(episodes: list[Episode], prefix: str = "rollout/") -> dict[str, float]:
    """:func:`episode_summary` per env, as ``<prefix><env>/<metric>`` (``rollout/sql/success``),
    and, for scored episodes, each env's teacher KL (``diag/<env>/sampled_kl``,
    :func:`sampled_kl`). Only when the episodes come from more than one env (a mixture):
    otherwise the plain summary says it all and this returns nothing."""
    groups: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        groups[e.env].append(e)
    if len(groups) < 2:
        return {}
    out: dict[str, float] = {}
    for env, group in groups.items():
        summary = episode_summary(group, prefix=prefix)
        out.update(
            {
                f"{prefix}{env}/{k[len(prefix) :]}": v
                for k, v in summary.items()
                if k.startswith(prefix)
            }
        )
        if any(e.teacher for e in group):
            out[f"diag/{env}/sampled_kl"] = sampled_kl(group)
    return out


def success_by_difficulty(episodes: list[Episode]) -> dict[int, float]:
    """Success rate per task difficulty (episode length class)."""
    groups: dict[int, list[bool]] = defaultdict(list)
    for e in episodes:
        groups[int(e.info.get("difficulty", 1))].append(e.success)
    return {d: sum(v) / len(v) for d, v in sorted(groups.items())}


def served_report(episodes: list[Episode]) -> dict[str, float]:
    """How the episodes' tool calls would fare behind vLLM's OpenAI server (Hermes tool parser).

    Every turn is read again with ``parse_assistant(mode="vllm-hermes", near_miss="answer")``,
    exactly what that server extracts, and compared with what the env ran:

    - ``tool_calls``: calls the env ran (turns without a parse error);
    - ``served_valid_calls``: those the served parser extracts too, with the same name and the
      same arguments, a JSON object;
    - ``served_parse_errors``: turns holding ``<tool_call>`` that the served parser rejects
      (its client would get the turn as plain text);
    - ``served_success``: the success rate counting an episode only if the served parser reads
      every one of its turns as the env did (same calls, or the same plain answer); a turn with
      a parse error never counts, since behind the server it would have been the final answer.
    """
    from agentopd.parsing import parse_assistant

    calls = valid = rejected = 0
    same_episodes: list[bool] = []
    for e in episodes:
        same = True
        for t in e.turns:
            served = parse_assistant(t.text, near_miss="answer", mode="vllm-hermes")
            ran = t.tool_calls if t.parse_error is None else []
            rejected += served.error is not None
            calls += len(ran)
            got = [] if served.error is not None else served.tool_calls
            valid += sum(
                a.name == b.name and isinstance(b.arguments, dict) and a.arguments == b.arguments
                for a, b in zip(ran, got)
            )
            # Behind the server a rejected turn is plain text, i.e. the final answer.
            kind = "error" if t.parse_error is not None else "calls" if ran else "answer"
            same &= kind == ("calls" if got else "answer") and [
                (c.name, c.arguments) for c in ran
            ] == [(c.name, c.arguments) for c in got]
        same_episodes.append(same)
    n = max(1, len(episodes))
    return {
        "tool_calls": float(calls),
        "served_valid_calls": float(valid),
        "served_parse_errors": float(rejected),
        "served_success": sum(e.success and s for e, s in zip(episodes, same_episodes)) / n,
    }


def eval_report(episodes: list[Episode], samples: int = 1) -> dict[str, Any]:
    """Success, pass@k for k in 1..samples, mean turns, success by episode length, and how the
    tool calls would fare behind a vLLM server (:func:`served_report`).

    ``episodes`` holds ``samples`` consecutive attempts per task.
    """
    by_task: dict[tuple[str, int | None], list[Episode]] = defaultdict(list)
    for e in episodes:
        by_task[(e.task_id, e.seed)].append(e)
    report: dict[str, Any] = {
        "episodes": len(episodes),
        "tasks": len(by_task),
        "success": sum(e.success for e in episodes) / max(1, len(episodes)),
        "mean_turns": sum(e.num_turns for e in episodes) / max(1, len(episodes)),
        "success_by_difficulty": success_by_difficulty(episodes),
        "stop_reasons": dict(Counter(e.stop_reason.value for e in episodes)),
    }
    for k in range(1, samples + 1):
        vals = [
            pass_at_k(len(v), sum(x.success for x in v), k) for v in by_task.values() if len(v) >= k
        ]
        report[f"pass@{k}"] = sum(vals) / max(1, len(vals))
    report.update(served_report(episodes))
    return report


def evaluate(
    env: str,
    env_kwargs: dict[str, Any],
    engine: Any,
    renderer: Renderer,
    *,
    episodes: int = 50,
    samples: int = 1,
    temperature: float = 0.0,
    rollout_config: RolloutConfig | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], list[Episode]]:
    """Play ``episodes`` held-out tasks (``split="eval"``) ``samples`` times each at full horizon."""
    from dataclasses import replace

    from agentopd.rollout import EpisodeJob, RolloutConfig, run_episodes

    cfg = replace(rollout_config or RolloutConfig(), temperature=temperature)
    jobs = [
        EpisodeJob(env, seed=seed + i, options={"split": "eval"}, env_kwargs=dict(env_kwargs))
        for i in range(episodes)
        for _ in range(samples)
    ]
    eps = run_episodes(jobs, engine, renderer, cfg, seed=seed)
    return eval_report(eps, samples), eps
