"""Memory of a training step, measured: the process's (or CUDA allocator's) peak, and the tensors
autograd saves for the backward pass (`qg.generator.train` records both; `qg.bench` compares
backbones and sizes the paper's generators with the second).
"""

from __future__ import annotations

import resource

import torch


def peak_memory_mb(device: str) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's peak resident set on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_activation_mb(fn) -> tuple[float, object]:
    """Megabytes of tensors autograd keeps for the backward pass of `fn()` (each storage counted
    once), and `fn()`'s result.

    A deterministic CPU stand-in for peak training memory: it is the part that grows with sequence
    length, and unlike the process's resident set it does not depend on the allocator's history.
    """
    storages = {}

    def pack(t):
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()  # meta: no data_ptr
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()) / 2**20, out
