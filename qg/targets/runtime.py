"""A quantized model that stays quantized in memory: each layer holds its packed codes, S and Z, and
dequantizes its weight only for the call that needs it.

Every accuracy in the tables is *simulated* (dequantize the file to float32, run the float model),
as in the paper. This module is the real thing on CPU: `load_runtime(file)` builds the timm model a
quantized file describes with every quantized Linear and Conv2d replaced by a `QuantizedLayer`, so
the resident weights are N-bit codes plus S/Z per group; a forward pass unpacks and dequantizes one
layer at a time, W = S (q - Z), then runs the layer's own operation. Its outputs equal the simulated
model's up to float summation order (`max_logit_difference`).

Why not a library runtime (checked on this CPU, torch 2.14, hqq 0.2.8): hqq's HQQLinear runs on CPU
but packs only 1, 2, 3, 4 and 8 bits (5 and 6 are stored as 8, 7 is refused), groups the flattened
weight (so it needs numel % group_size == 0 and has no per-row remainder groups, which our format
allows) and replaces Linear layers only (the patch embedding is a Conv2d); torchao is not among our
locked packages, and its CPU weight-only paths for 2-7 bits also dequantize per layer. The per-layer
dequantization here is the same computation, for every bit-width and layout our files hold.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import qwt
from ..quant.fileformat import read_quantized
from ..quant.packing import pack_codes, unpack_codes
from ..quant.quantizer import QTensor, QuantSpec, dequantize, dequantize_state_dict
from .models import build_model, load_weights


class QuantizedLayer(nn.Module):
    """A Linear or Conv2d whose weight is kept as packed `spec.bits`-bit codes, S and (asymmetric)
    Z."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, q: QTensor):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"QuantizedLayer wraps a Linear or Conv2d, got {type(layer).__name__}")
        # the float weight is dropped: the layer keeps its bias and its hyperparameters
        layer.weight = None
        self.layer, self.spec, self.shape = layer, q.spec, tuple(q.shape)
        self.register_buffer("packed", pack_codes(q.codes, q.spec.bits))
        self.register_buffer("scale", q.scale.float())
        self.register_buffer("zero", q.zero.float() if q.spec.scheme == "asymmetric" else None)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight S (q - Z), made for one call and then freed."""
        zero = self.zero if self.zero is not None else torch.zeros_like(self.scale)
        return dequantize(
            QTensor(
                unpack_codes(self.packed, self.spec.bits, self.shape), self.scale, zero, self.spec
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    def extra_repr(self) -> str:
        return f"{self.spec.name}, weight {self.shape}, {self.packed.numel()} bytes of codes"


def quantized_model(model: nn.Module, qsd: dict[str, QTensor | torch.Tensor]) -> nn.Module:
    """Replace, in place, every layer whose weight `qsd` holds quantized by a `QuantizedLayer` of
    it."""
    for name, q in qsd.items():
        if isinstance(q, QTensor):
            parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, QuantizedLayer(getattr(parent, attr), q))
    return model


def load_runtime(path) -> tuple[nn.Module, QuantSpec, dict]:
    """The model a quantized file describes, its weights kept quantized (either format version),
    with its QwT compensations if it has any. The float tensors and the architecture are checked as
    for the simulated model (`qg.targets.models.load_weights`): loading passes through the float32
    model once (its peak memory), then keeps only the packed form."""
    qsd, spec, meta = read_quantized(path)
    own, compensation = qwt.split(qsd)
    model = load_weights(build_model(meta["model"]), dequantize_state_dict(own), source=str(path))
    return qwt.attach(quantized_model(model, own), compensation, str(path)).eval(), spec, meta


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer a model keeps resident (what loading it costs in
    memory)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def max_logit_difference(runtime: nn.Module, simulated: nn.Module, x: torch.Tensor) -> float:
    """Largest |logit| difference between the runtime and the simulated (dequantized float) model on
    x."""
    return (runtime.eval()(x) - simulated.eval()(x)).abs().max().item()


def median_seconds(fn, repeats: int, device: str = "cpu") -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up (CUDA synchronised around each
    run)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def latency(model: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one forward pass of batch x (CPU), after a warm-up pass."""
    model.eval()
    return median_seconds(lambda: model(x), repeats)
