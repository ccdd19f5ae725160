"""Data-parallel learner set-up under ``torchrun``; a no-op in one process.

``torchrun --nproc_per_node=N script.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; :func:`setup` then joins the process group (``gloo`` on CPU, ``nccl`` on
CUDA) and pins the local GPU. Each rank runs the learner on its own shard of the batch
(:func:`shard`), and :class:`~agentopd.learner.Learner` makes the update equal to one process
on the whole batch:

- the loss normalisers (selected tokens, or sequences) are summed over ranks
  (:func:`all_sum`), so every rank weights its micro-batches by the *global* count;
- after backward the gradients are summed over ranks (:func:`sum_gradients`) before clipping
  and the optimizer step, so every rank applies the same update to the same weights.

This is DDP's gradient all-reduce done at the learner's own seam: the learner's chunked
log-prob pass calls the model's decoder and output projection directly rather than the
module's ``forward``, which torch's ``DistributedDataParallel`` wrapper needs to arm its hooks.
One bucketed all-reduce per step (:func:`sum_gradients` flattens all gradients) keeps it cheap.

Limits: only the OPD step (``Learner.step``) reduces across ranks; the SFT step (cold start,
demonstration batches) does not yet. Batch-wide token selection (``loss_cfg.entropy_top_frac``,
``overlap_only``) is decided per rank over that rank's shard; logged learner metrics are the
rank's own; a rank whose shard is empty must still call the step (it would otherwise leave the
others waiting in the all-reduce). ``agentopd train`` does not run under torchrun yet (rollout
sharding and a rank-0 run directory are not wired), and FSDP2 is not wired.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands."""

    rank: int = 0
    """Global rank (0 in one process)."""
    size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (selects the GPU)."""

    @property
    def is_main(self) -> bool:
        """True on the rank that writes the run directory and logs."""
        return self.rank == 0


def world() -> World:
    """The current world: from the process group when joined, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def setup(backend: str | None = None) -> World:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1``; else do nothing.

    Args:
        backend: ``gloo`` or ``nccl`` (default: ``nccl`` when CUDA is available, else ``gloo``).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_initialized()):
        return world()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return world()


def teardown() -> None:
    """Leave the process group (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list[T], w: World | None = None) -> list[T]:
    """This rank's share of ``items`` (every ``size``-th item from ``rank``)."""
    w = w or world()
    return items[w.rank :: w.size]


def all_sum(value: int | float) -> float:
    """``value`` summed over ranks (the value itself in one process)."""
    w = world()
    if w.size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(model: Any) -> None:
    """Sum every parameter's gradient over ranks, in place, in one flat all-reduce.

    Parameters without a gradient on this rank take part as zeros, so all ranks reduce the
    same flat buffer. No-op in one process.
    """
    if world().size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
