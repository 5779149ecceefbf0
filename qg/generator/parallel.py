"""How several processes share a generator's training (`qg.generator.train` under torchrun): DDP,
a full copy per process, or FSDP2, parameters, gradients and AdamW state sharded; and the full
(unsharded) model and optimizer state a checkpoint holds either way, so a run resumes under any
strategy or in one process.
"""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..core.io import atomic_write
from .model import Generator

# how several processes share the work: a full copy each, or parameters and AdamW state sharded
STRATEGIES = ("ddp", "fsdp")


def wrap(model: Generator, strategy: str, world: int, device) -> torch.nn.Module:
    """The module the loop trains: `model` on `device` in one process or wrapped by DDP, or under
    fsdp a copy of it sharded over the processes (FSDP2: each block, then the rest at the root),
    leaving `model` whole for the trained weights `train` gathers into it at the end."""
    if world == 1 or strategy == "ddp":
        model.to(device)
        return DistributedDataParallel(model) if world > 1 else model
    mesh = init_device_mesh(torch.device(device).type, (world,))
    sharded = copy.deepcopy(model)
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(sharded, mesh=mesh)  # moves each shard to the mesh's device


def unwrapped(net: torch.nn.Module) -> torch.nn.Module:
    """The generator inside a DDP wrapper (a sharded generator is one itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def bytes_per_rank(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Bytes of parameters and of optimizer state that this process holds, measured from its
    tensors after training (AdamW's state exists from the first step on): the local shards under
    fsdp, whole tensors otherwise."""

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    return {
        "param_bytes_per_rank": sum(nbytes(p) for p in net.parameters()),
        "optimizer_bytes_per_rank": sum(
            nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }


def full_state(net, opt) -> tuple[dict, dict]:
    """Model and optimizer state as one process holds them: whole tensors, the optimizer's keyed by
    parameter index as `opt.state_dict()`, so that a checkpoint resumes under any strategy. Under
    fsdp every rank must call it (it gathers the shards) and only rank 0 receives them (empty
    dicts elsewhere)."""
    if not isinstance(net, FSDPModule):
        return unwrapped(net).state_dict(), opt.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(net, options=options)
    opt_state = get_optimizer_state_dict(net, opt, options=options)
    if not opt_state:  # a rank other than 0
        return model_state, opt_state
    names = _param_names(net, opt)
    return model_state, _rekeyed(opt_state, names, range(len(names)))


def load_full_state(net, opt, model_state: dict, opt_state: dict) -> None:
    """Load what `full_state` returns into `net` and `opt` (under fsdp each rank its shards)."""
    if not isinstance(net, FSDPModule):
        unwrapped(net).load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        return
    options = StateDictOptions(full_state_dict=True)
    names = _param_names(net, opt)
    set_model_state_dict(net, model_state, options=options)
    set_optimizer_state_dict(
        net, opt, _rekeyed(opt_state, range(len(names)), names), options=options
    )


def _param_names(net, opt) -> list[str]:
    """The parameters' names in the optimizer's index order (the keys of `opt.state_dict()`)."""
    name = {p: n for n, p in net.named_parameters()}
    return [name[p] for group in opt.param_groups for p in group["params"]]


def _rekeyed(opt_state: dict, old, new) -> dict:
    """`opt_state` with each parameter key of `old` replaced by the one of `new` at its place:
    indices to names (what torch.distributed.checkpoint reads and writes) or back."""
    key = dict(zip(old, new, strict=True))
    return {
        "state": {key[k]: v for k, v in opt_state["state"].items()},
        "param_groups": [
            {**g, "params": [key[k] for k in g["params"]]} for g in opt_state["param_groups"]
        ],
    }


def gather_into(model: Generator, net: torch.nn.Module) -> None:
    """After training under fsdp, load the sharded copy's full weights into `model` (every rank);
    under DDP or in one process `net` trained `model` itself and there is nothing to do."""
    if isinstance(net, FSDPModule):
        model.load_state_dict(
            get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
        )


def write_checkpoint(
    path: Path, run: dict, net, optimizer, step: int, losses, elapsed: float, activation_mb: float
) -> None:
    """Write `train_state.pt`: the run's settings, full model and optimizer state (`full_state`),
    schedule, step, losses, seconds so far and the activation MB of the first step, atomically.
    Every process must call it (under fsdp the gathering is collective); process 0 writes."""
    opt, sched = optimizer
    model_state, opt_state = full_state(net, opt)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    state = {
        "run": run,
        "model": model_state,
        "opt": opt_state,
        "sched": sched.state_dict(),
        "step": step,
        "losses": losses,
        "elapsed": elapsed,
        "activation_mb": activation_mb,
    }
    with atomic_write(path) as f:
        torch.save(state, f)


def read_checkpoint(path: Path, device) -> dict | None:
    """A `write_checkpoint` file's contents (tensors only: a pickle is refused), or None when there
    is none or it is unreadable (it is only a resume point: training starts from step 0, warned)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        what = (
            "holds more than tensors (a pickle that could run code: not loaded)"
            if isinstance(e, pickle.UnpicklingError)
            else f"is unreadable ({type(e).__name__})"
        )
        print(f"[qg] warning: {path} {what}; training from step 0", file=sys.stderr, flush=True)
        return None
