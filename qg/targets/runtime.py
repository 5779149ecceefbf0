"""A quantized model that stays quantized in memory, computing on its packed weights where a fused
CPU kernel exists.

Every accuracy in the tables is *simulated* (dequantize the file to float32, run the float model),
as in the paper. This module is the real thing on CPU: `load_runtime(file)` builds the timm model a
quantized file describes with every quantized Linear and Conv2d replaced by a `QuantizedLayer`, so
the resident weights are N-bit codes plus S/Z per group. By default each layer unpacks and
dequantizes its weight for the call, W = S (q - Z), then runs its own operation: the simulated
model's outputs up to float summation order (`max_logit_difference`), for every bit-width and
layout.

`load_runtime(file, kernels=True)` computes instead on the packed codes where PyTorch has a fused
weight-only CPU kernel (`kernel_for` decides, once, at load):

* ``int4``: group-wise codes of at most 4 bits, groups of 32, 64, 128 or 256 that tile the row,
  in a Linear of a multiple of 16 outputs: `aten._weight_int4pack_mm_for_cpu`. Codes are shifted
  to 0..15 (q + 8) and S, Z become its per-group (scale, offset) = (S, -S Z), since
  S (q - Z) = (q + 8 - 8) S - S Z.
* ``int8``: channel-wise codes of at most 8 bits in a Linear: `aten._weight_int8pack_mm` (int8
  codes, one scale per output row); an asymmetric layer subtracts (sum of x) S Z per row after.
* every other layer (5-8-bit groups, short or ragged groups, the Conv2d patch embedding) stays on
  the dequantize path.

Both kernels are fast only with bfloat16 activations (their float32 path is a reference loop,
40-70x slower than float32 GEMM), so a kernel layer rounds its input to bfloat16 and returns
float32: outputs differ from the simulated model's by bfloat16 rounding (about 1e-2 relative). And
they are weight-only kernels, made for calls of a few tokens: measured on a 2-core Xeon (pinned
AVX2, one thread, ViT-Base's 768 x 3072 layers), the int4 kernel takes 0.3x the float32 time at 1
token per call, 0.8x at 8, 1.6x at 16 and 2x at 64. A ViT call is 197 tokens per image, where
they lose; `python -m qg.bench --sections runtime` measures whole models.

Why not a library runtime (checked on this CPU, torch 2.14, hqq 0.2.8): hqq's HQQLinear runs on CPU
but packs only 1, 2, 3, 4 and 8 bits (5 and 6 are stored as 8, 7 is refused), groups the flattened
weight (so it needs numel % group_size == 0 and has no per-row remainder groups, which our format
allows) and replaces Linear layers only (the patch embedding is a Conv2d); torchao is not among our
locked packages, and the kernels it wraps on CPU are the two above.
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

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes aten's int4 CPU kernel takes


def kernel_for(layer: nn.Module, q: QTensor) -> str:
    """The computation a quantized layer runs with kernels on: `int4`, `int8` (fused kernels on the
    packed codes) or `dequantize` (see the module docstring)."""
    if not isinstance(layer, nn.Linear):
        return "dequantize"
    rows, length = q.shape
    glen = min(q.spec.group_size, length)
    if q.spec.granularity == "channel":
        return "int8"
    if q.spec.bits <= 4 and glen in INT4_GROUPS and length % glen == 0 and rows % 16 == 0:
        return "int4"
    return "dequantize"


class QuantizedLayer(nn.Module):
    """A Linear or Conv2d whose weight is kept quantized: `spec.bits`-bit codes, S and
    (asymmetric) Z, as our packed codes dequantized per call, or (`kernels`) in the layout of the
    fused kernel `kernel_for` picks."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, q: QTensor, kernels: bool = False):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"QuantizedLayer wraps a Linear or Conv2d, got {type(layer).__name__}")
        # the float weight is dropped: the layer keeps its bias and its hyperparameters
        layer.weight = None
        self.layer, self.spec, self.shape = layer, q.spec, tuple(q.shape)
        self.kernel = kernel_for(layer, q) if kernels else "dequantize"
        scale, zero = q.scale.float(), q.zero.float()
        asymmetric = q.spec.scheme == "asymmetric"
        if self.kernel == "int4":
            self.group = min(q.spec.group_size, self.shape[1])
            codes = (q.codes.to(torch.int32) + 8).contiguous()
            self.register_buffer(
                "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            )
            # (groups, rows, 2): per group the scale and the offset -S Z, in the kernel's bfloat16
            offset = torch.stack([scale, -scale * zero], -1).transpose(0, 1)
            self.register_buffer("scale_offset", offset.contiguous().to(torch.bfloat16))
        elif self.kernel == "int8":
            self.register_buffer("codes", q.codes.to(torch.int8).contiguous())
            self.register_buffer("scale", scale[:, 0].contiguous().to(torch.bfloat16))
            self.register_buffer("offset", (scale * zero)[:, 0] if asymmetric else None)
        else:
            self.register_buffer("packed", pack_codes(q.codes, q.spec.bits))
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero if asymmetric else None)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight S (q - Z), made for one call and then freed (a kernel layer's with
        its S in bfloat16, as the kernel computes)."""
        if self.kernel == "int4":  # the kernel applied to the identity reads the weight back
            return self._matmul(torch.eye(self.shape[1])).T.contiguous()
        if self.kernel == "int8":
            w = self.scale.float()[:, None] * self.codes.float()
            return w if self.offset is None else w - self.offset[:, None]
        zero = self.zero if self.zero is not None else torch.zeros_like(self.scale)
        return dequantize(
            QTensor(
                unpack_codes(self.packed, self.spec.bits, self.shape), self.scale, zero, self.spec
            )
        )

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T by the fused kernel: x (tokens, in_features) rounded to bfloat16, the result
        in float32."""
        xb = x.to(torch.bfloat16).contiguous()
        if self.kernel == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, self.packed, self.group, self.scale_offset
            ).float()
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.codes, self.scale).float()
            if self.offset is not None:
                y = y - xb.float().sum(-1, keepdim=True) * self.offset
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "dequantize" and x.device.type == "cpu":
            y = self._matmul(x.reshape(-1, self.shape[1]))
            if self.layer.bias is not None:
                y = y + self.layer.bias
            return y.reshape(*x.shape[:-1], self.shape[0]).to(x.dtype)
        w = self.dequantized_weight().to(x.dtype)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    def extra_repr(self) -> str:
        return f"{self.spec.name}, weight {self.shape}, {self.kernel}"


def quantized_model(
    model: nn.Module, qsd: dict[str, QTensor | torch.Tensor], kernels: bool = False
) -> nn.Module:
    """Replace, in place, every layer whose weight `qsd` holds quantized by a `QuantizedLayer` of
    it (`kernels`: on a fused kernel where one exists)."""
    for name, q in qsd.items():
        if isinstance(q, QTensor):
            parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, QuantizedLayer(getattr(parent, attr), q, kernels))
    return model


def load_runtime(path, kernels: bool = False) -> tuple[nn.Module, QuantSpec, dict]:
    """The model a quantized file describes, its weights kept quantized (either format version;
    `kernels`: computed on by fused kernels where one exists), with its QwT compensations if it
    has any. The float tensors and the architecture are checked as
    for the simulated model (`qg.targets.models.load_weights`): loading passes through the float32
    model once (its peak memory), then keeps only the packed form."""
    qsd, spec, meta = read_quantized(path)
    own, compensation = qwt.split(qsd)
    model = load_weights(build_model(meta["model"]), dequantize_state_dict(own), source=str(path))
    return (
        qwt.attach(quantized_model(model, own, kernels), compensation, str(path)).eval(),
        spec,
        meta,
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer a model keeps resident (what loading it costs in
    memory); also the tensors another library's layers keep beside them (hqq's `HQQLinear` holds
    its scale and zero in a `meta` dict), and a tensor subclass's (torchao's) by its inner
    tensors."""
    meta = [m.meta for m in model.modules() if isinstance(getattr(m, "meta", None), dict)]
    held = [t for d in meta for t in d.values() if isinstance(t, torch.Tensor)]
    return sum(_tensor_bytes(t) for t in [*model.parameters(), *model.buffers(), *held])


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass's are those of the tensors inside it."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


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
