"""Named seed streams (agentopd.seeds): one run seed, independent streams."""

from __future__ import annotations

import pytest

from agentopd import seeds


def test_streams_are_deterministic_distinct_and_keyed():
    assert seeds.seed_of(3, "sampling", 7) == seeds.seed_of(3, "sampling", 7)
    values = {seeds.seed_of(3, name) for name in seeds.STREAMS}
    assert len(values) == len(seeds.STREAMS)  # no two streams of a run share a seed
    assert seeds.seed_of(3, "sampling", 7) != seeds.seed_of(3, "sampling", 8)
    assert seeds.seed_of(3, "sampling", 7, 0) != seeds.seed_of(3, "sampling", 7, 1)  # ranks
    assert seeds.seed_of(3, "eval") != seeds.seed_of(4, "eval")
    assert all(0 <= seeds.seed_of(s, "gkd") < 2**63 for s in range(50))


def test_task_ranges_of_run_seeds_do_not_overlap():
    """Seeds 0-19 of each stream: ranges of 100 k tasks never meet, and every task seed fits in
    32 bits (envs built on numpy or gymnasium accept it)."""
    for name in seeds.STREAMS:
        bases = sorted(seeds.task_base(s, name) for s in range(20))
        assert all(b + 100_000 < 2**31 for b in bases)
        assert all(b - a > 100_000 for a, b in zip(bases, bases[1:], strict=False)), name
    # The training tasks of a run are not its held-out or demonstration tasks.
    firsts = sorted(seeds.task_base(0, n) for n in ("eval", "cold_start", "demos", "curriculum"))
    assert all(b - a > 100_000 for a, b in zip(firsts, firsts[1:], strict=False))


def test_unknown_stream_is_refused_with_the_streams_listed():
    with pytest.raises(KeyError, match="unknown seed stream 'evals'.*eval"):
        seeds.seed_of(0, "evals")
