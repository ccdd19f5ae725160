"""Named seed streams: every random choice of a run derives from the run's one seed.

A run seeded ``s`` draws each kind of randomness from its own stream,
``numpy.random.SeedSequence([s, STREAMS[name], *keys])``: streams are independent of each other
and of other run seeds, and adding a stream never shifts another. Task seeds are
``task_base(s, name) + i``: a stream's tasks form one contiguous range starting at a base drawn
from the stream, below 2**31 - 2**24, so envs that take 32-bit seeds accept every task of a
range up to 16.7 M long. Two ranges of n tasks overlap only by chance, with probability about
2n / 2**31 (1e-4 for 100 k tasks).

Streams:

* ``eval``: held-out evaluation tasks (training's evaluations, ``agentopd eval`` and the
  teacher's evaluation use the same range, so their numbers are comparable);
* ``cold_start``: the tasks of the cold start's demonstrations, and the order it draws them in;
* ``demos``: the tasks of demonstration batches during training (``gkd_lambda`` < 1);
* ``gkd``: the coin that decides, per step, between a demonstration and an on-policy batch;
* ``curriculum``: the training tasks a curriculum hands out;
* ``sampling``: the sampler's random numbers, one sub-stream per step (and per rank).

The process-wide generators (Python's ``random``, NumPy's and torch's) are seeded with the run
seed once (:func:`seed_everything`); their state is part of a checkpoint (:func:`rng_state`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

STREAMS: dict[str, int] = {
    "eval": 1,
    "cold_start": 2,
    "demos": 3,
    "gkd": 4,
    "curriculum": 5,
    "sampling": 6,
}
"""Stream names and their fixed ids (an id never changes once released: runs depend on it)."""

_TASK_SPAN = 2**31 - 2**24


def seed_of(seed: int, name: str, *keys: int) -> int:
    """A 63-bit seed for stream ``name`` of run ``seed``, optionally keyed further (a step, a
    rank). Deterministic across machines and Python versions."""
    if name not in STREAMS:
        raise KeyError(f"unknown seed stream {name!r}; streams: {', '.join(STREAMS)}")
    words = [int(seed) & 0xFFFF_FFFF_FFFF_FFFF, STREAMS[name], *(int(k) for k in keys)]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def task_base(seed: int, name: str) -> int:
    """The first task seed of stream ``name`` for run ``seed``; its tasks are ``base + i``."""
    return seed_of(seed, name) % _TASK_SPAN


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's process-wide generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The process-wide generators' state, for a checkpoint (:func:`set_rng_state`)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the state :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
