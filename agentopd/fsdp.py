"""FSDP2 for the torchrun learner (``distributed.strategy=fsdp2``): the model sharded over ranks.

Under ``torchrun`` with ``distributed.strategy=fsdp2`` every decoder layer of the student is a
``torch.distributed.fsdp.fully_shard`` unit and a :class:`Passes` wrapper around the whole
model is the root unit (embeddings, final norm, output projection: tied or not). Each rank
holds one shard of every parameter, of its gradient and of the optimizer state; a forward
all-gathers a unit's parameters just before it runs and frees them after, a backward
reduce-scatters its gradients.

FSDP2 arms those hooks on module forwards, while the learner's passes call the decoder and the
output projection's weight directly (the chunked log-prob pass). :class:`Passes` puts such a
pass behind a module forward: ``passes(fn, *args)`` runs ``fn(model, *args)`` as its own
``forward``, so the root's parameters are gathered for the whole pass. The learner and
:func:`agentopd.sft.backward` run every pass that way, whatever the strategy (in one process
and under ``ddp`` the wrapper is a plain call), so there is one implementation of each pass.

What the strategy changes elsewhere (see :mod:`agentopd.distributed`):

- every forward and backward is a collective, so every rank runs the same number of passes:
  a rank with fewer micro-batches runs dummy passes whose loss is multiplied by 0;
- gradients are summed over ranks (``set_gradient_divide_factor(1.0)``: the learner already
  normalises by global counts), by FSDP's reduce-scatter rather than
  :func:`agentopd.distributed.sum_gradients`;
- the rollout engine and checkpoints read a full, plain copy of the weights
  (:func:`full_state_dict`, a collective every rank calls at the same point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn


class Passes(nn.Module):
    """A causal LM whose forward runs a given function of it: ``passes(fn, *args)`` returns
    ``fn(passes.model, *args)``.

    The output must be tensors in a tuple, list or dict (no dataclass): FSDP2 finds the tensors
    it hooks for the backward pass with ``torch.utils._pytree``.

    Example::

        passes = Passes(model)
        loss = passes(lambda m, ids: m(input_ids=ids).logits.sum(), ids)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def passes_of(model: nn.Module | Passes) -> Passes:
    """``model`` itself when it is a :class:`Passes`, else a new one around it."""
    return model if isinstance(model, Passes) else Passes(model)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (a :class:`Passes` or the model in it) is sharded by :func:`shard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (``base_model.layers``).

    Raises:
        ValueError: The model has no such list.
    """
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(
            f"distributed.strategy=fsdp2: {type(model).__name__} has no base_model.layers "
            "to shard; use distributed.strategy=ddp"
        )
    return list(layers)


def shard(model: nn.Module) -> Passes:
    """Shard ``model`` in place over the process group's ranks: every decoder layer a
    ``fully_shard`` unit, a :class:`Passes` around the model the root unit. Gradients are
    summed over ranks, not averaged. Build the optimizer afterwards, on ``model.parameters()``
    (now shards). Returns the root."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    root = Passes(model)
    fully_shard(root)  # in place: returns ``root`` itself, now also an FSDPModule
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # A plain SUM reduce-scatter (gloo has no PREMUL_SUM), then a scale by 1.
            m.set_force_sum_reduction_for_comms(True)
    return root


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s full (unsharded) state dict on every rank, on the model's device: a
    collective when ``model`` is sharded (every rank must call it at the same point); else
    ``state_dict()``."""
    if not is_sharded(model):
        return _inner(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # (cpu_offload would leave the whole dict on rank 0 alone.)
    state = get_model_state_dict(_inner(model), options=StateDictOptions(full_state_dict=True))
    return cast(dict[str, torch.Tensor], state)  # full_state_dict: every value a tensor


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into ``model`` (sharded: every rank passes the whole dict)."""
    if not is_sharded(model):
        _inner(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # A copy: set_model_state_dict puts the shards it made into the dict it is given.
    set_model_state_dict(_inner(model), dict(state), options=StateDictOptions(full_state_dict=True))


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, Passes) else model


def _param_names(model: nn.Module) -> list[str]:
    """Names of ``model.parameters()`` in order (shared parameters once, as the optimizer
    saw them)."""
    return [n for n, _ in _inner(model).named_parameters()]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as one process would hold it (parameters by index, full
    tensors on the CPU): a collective when ``model`` is sharded, after which rank 0 alone holds
    it (the others get ``{}``). A checkpoint written from it loads under any strategy and
    number of ranks."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(
        _inner(model),
        optimizer,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    if not by_name:  # not rank 0
        return {}
    index = {n: i for i, n in enumerate(_param_names(model))}
    # The one-process layout: state per parameter name, a list of param-group dicts.
    states = cast(dict[str, Any], by_name["state"])
    groups = cast(list[dict[str, Any]], by_name["param_groups"])
    return {
        "state": {index[n]: s for n, s in states.items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    }


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a state dict of :func:`full_optimizer_state_dict`'s (one process's) format; under
    sharding every rank passes the whole dict and keeps its shard."""
    tensors = [v for s in state["state"].values() for v in s.values() if torch.is_tensor(v)]
    if not is_sharded(model) or not any(t.dim() for t in tensors):
        # No per-parameter tensors to shard (plain SGD keeps none, which
        # set_optimizer_state_dict refuses): the hyper-parameters load as in one process.
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model)
    by_name: dict[str, Any] = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        _inner(model),
        optimizer,
        by_name,  # a new dict (set_optimizer_state_dict changes the one it is given)
        options=StateDictOptions(full_state_dict=True),
    )
