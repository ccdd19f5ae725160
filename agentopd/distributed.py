"""``agentopd train`` under ``torchrun``: data-parallel ranks, one run; a no-op in one process.

Run it with::

    torchrun --standalone --nproc_per_node=N -m agentopd train env=lookup-chain ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
:func:`setup` joins the process group (``gloo`` on CPU, ``nccl`` on CUDA, or
``distributed.backend``) and pins the local GPU. What each rank does in a training step:

- **Rollouts are sharded.** Every rank builds the same list of the step's jobs (the curriculum is
  deterministic in the step) and plays its share (:func:`shard`: every ``size``-th job from
  ``rank``), so each task seed is played once. Demonstrations (cold start, GKD batches) are
  played the same way and gathered (:func:`all_gather_list`), so every rank holds the same pool.
- **The teacher scores each rank's own episodes.**
- **The learner makes one update over the union.** :class:`~agentopd.learner.Learner` sums its
  loss normalisers over ranks (:func:`all_sum`), so each rank weights its tokens by the *global*
  count, and sums the gradients over ranks (:func:`sum_gradients`) before clipping and the
  optimizer step; every rank then applies the same update to the same weights. The SFT step
  (:func:`agentopd.sft.backward`) does the same.
- **Rank 0 owns the run directory.** It picks the run name and sends it to the others
  (:func:`broadcast_object`); it alone writes the config, metrics, episodes (gathered to it with
  :func:`gather_list`), checkpoints and choices, prints, and evaluates (the other ranks wait).
- **Counters agree.** Token counts are summed over ranks before they enter the teacher-token
  budget, so every rank takes the same stop decision and none is left waiting in a collective.

``distributed.strategy`` says how the ranks hold the student:

- **ddp** (the default): a full replica on every rank; DDP's gradient all-reduce done at the
  learner's own seam (one flat all-reduce per step, :func:`sum_gradients`), so no
  ``DistributedDataParallel`` wrapper is needed around the learner's passes.
- **fsdp2**: parameters, gradients and optimizer state sharded over the ranks with torch's
  ``fully_shard`` (:mod:`agentopd.fsdp`): every decoder layer a unit, the model's passes run as
  the forward of a root unit. Every forward and backward is then a collective, so ranks run
  the same number of passes (dummy passes with loss times 0 where a rank has fewer); FSDP's
  reduce-scatter sums the gradients. The rollout engine samples from a full, plain replica on
  each rank, refreshed from the gathered weights after every update (a collective all ranks
  call at the same point); checkpoints hold the full model and optimizer state in one
  process's format, so a run resumes under either strategy or in one process. Not with LoRA
  or ``engine=vllm`` (refused before anything is built). In one process the key does nothing.

Limits: with ``ddp`` the model is replicated on every rank; with ``fsdp2`` each rank still
holds the engine's full replica (the saving is in gradients and optimizer state), and the
packed SFT pass shares no prompt prefix (see :func:`agentopd.sft._nll`). Batch-wide
token selection (``loss_cfg.entropy_top_frac``, ``overlap_only``) is decided per rank over
that rank's shard.
With a sampling temperature above 0 a sharded rollout draws different (equally valid) samples
than one process would, because generation is batched and seeded per call. Resume reads the
checkpoint on every rank, so all ranks need the run directory's file system.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from agentopd.schema import knob

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")
STRATEGIES = ("ddp", "fsdp2")


@dataclass
class DistributedConfig:
    """Process-group settings under ``torchrun`` (the ``distributed.*`` keys; unused in one
    process)."""

    backend: str = knob(
        "auto",
        "collective backend (auto: nccl when CUDA is available, else gloo)",
        choices=BACKENDS,
    )
    strategy: str = knob(
        "ddp",
        "how ranks hold the student: ddp (a full replica each, gradients all-reduced) or fsdp2 "
        "(parameters, gradients and optimizer state sharded; see agentopd.fsdp)",
        choices=STRATEGIES,
    )
    timeout_s: float = knob(
        1800.0,
        "how long a rank waits in a collective (e.g. while rank 0 evaluates) before failing",
        gt=0,
    )


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


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it (``RANK``; 0 without torchrun), whether or not
    the process group is joined yet."""
    return int(os.environ.get("RANK", "0"))


def launched_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(backend: str | None = None, timeout_s: float | None = None) -> World:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1``; else do nothing.

    Args:
        backend: ``gloo`` or ``nccl`` (None or ``auto``: ``nccl`` when CUDA is available, else
            ``gloo``).
        timeout_s: Collective timeout in seconds (None: torch's default).
    """
    if launched_size() <= 1 or dist.is_initialized():
        return world()
    if backend in (None, "auto"):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, **kwargs)
    return world()


def exit_together(code: int, grace_s: float = 60.0) -> NoReturn:
    """End this ``torchrun`` rank with ``code`` once every rank has come here (or after
    ``grace_s`` seconds), so that a failure all ranks share (a bad config) ends each of them
    with ``code`` rather than with the SIGTERM torchrun sends the others when the first exits.

    Ranks meet in torchrun's own key-value store (``MASTER_ADDR``/``MASTER_PORT``), which needs
    no process group. When all ranks fail alike they leave as soon as the last one arrives;
    ``grace_s`` only bounds the wait for a rank that did not fail (torchrun then stops it as
    usual) and must cover how far apart ranks start (imports on a loaded machine).
    """
    handler = lambda *_: os._exit(code)  # noqa: E731 - torchrun's SIGTERM after we decided
    signal.signal(signal.SIGTERM, handler)
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=grace_s),
        )
        key = f"agentopd/exit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        arrived, deadline = store.add(key, 1), time.monotonic() + grace_s
        while arrived < launched_size() and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = store.add(key, 0)
    except (KeyError, ValueError, RuntimeError):
        pass  # no store to meet in: exit now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def teardown() -> None:
    """Leave the process group (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list[T], w: World | None = None) -> list[T]:
    """This rank's share of ``items`` (every ``size``-th item from ``rank``)."""
    w = w or world()
    return items[w.rank :: w.size]


def rank_seed(seed: int) -> int:
    """``seed`` on rank 0, and a distinct seed derived from it on every other rank (so ranks
    that sample in parallel do not draw the same random numbers)."""
    return seed + 1_000_003 * world().rank


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(value: int | float) -> float:
    """``value`` summed over ranks (the value itself in one process)."""
    if world().size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item())


def all_max(value: int | float) -> float:
    """The largest ``value`` over ranks (the value itself in one process)."""
    if world().size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_sum_dict(values: dict[str, float]) -> dict[str, float]:
    """Per key, the sum over ranks of ``values`` (a key missing on a rank counts as 0)."""
    if world().size == 1:
        return values
    parts: list[Any] = [None] * world().size
    dist.all_gather_object(parts, values)
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if world().size > 1:
        dist.barrier()


def _interleave(parts: list[list[T]]) -> list[T]:
    """Undo :func:`shard`: rank r's i-th item was item ``i * size + r``."""
    out: list[T] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def all_gather_list(items: list[T]) -> list[T]:
    """Every rank's :func:`shard` of a list, put back together in the original order, on every
    rank (``items`` itself in one process)."""
    if world().size == 1:
        return items
    parts: list[Any] = [None] * world().size
    dist.all_gather_object(parts, items)
    return _interleave(parts)


def gather_list(items: list[T]) -> list[T]:
    """Like :func:`all_gather_list`, but only rank 0 gets the whole list; others get ``[]``."""
    w = world()
    if w.size == 1:
        return items
    parts: list[Any] | None = [None] * w.size if w.is_main else None
    dist.gather_object(items, parts, dst=0)
    return _interleave(parts) if parts is not None else []


def broadcast_parameters(model: Any) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``model``, in place (no-op in one
    process): all ranks start from the same weights even when initialisation is not seeded."""
    if world().size == 1:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


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
