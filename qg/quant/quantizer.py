"""Uniform weight quantization: specs, grouping, round-to-nearest, dequantization and its
straight-through estimator for QAT (the file format is `qg.quant.fileformat`).

Conventions (one place for all of them):

* Which tensors are quantized: `is_quantized_weight` - a tensor named `*.weight` with two or more
  dimensions, which in timm's ViT and MLP-Mixer is exactly the Linear and Conv kernels. Biases,
  norms, position embeddings and class tokens stay float.
* A weight is viewed as rows: `w.reshape(out_features, -1)` (a Conv kernel's row is its flattened
  in_channels x kh x kw). Per-channel = one (S, Z) per row. Group-wise = contiguous groups of
  `group_size` along each row; groups never cross rows, and when the row length is not a multiple of
  `group_size` the last group of each row is shorter (it holds the remainder).
* `scheme="symmetric"` is the paper's Eq. 1: S = max|r| / (2^(N-1) - 1), Z = 0, codes in
  [-(2^(N-1) - 1), 2^(N-1) - 1] (the restricted range, not torchao's 2^(N-1) - 0.5 divisor).
* `scheme="asymmetric"` is min-max with an integer zero point: S = (max - min) / (2^N - 1), codes
  on the full N-bit grid; as in PyTorch's MinMaxObserver the range is widened to include 0, so Z is
  in range and zero is exactly representable. Codes are stored signed, in [-2^(N-1), 2^(N-1) - 1],
  with Z shifted the same way, so that every scheme's codes fit int8 and r_hat = S * (q - Z) holds
  unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

GRANULARITIES = ("channel", "group")
SCHEMES = ("symmetric", "asymmetric")
MIN_SCALE = 1e-8  # a row or group of zeros still gets a positive scale


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer produces: bit-width, granularity, group size and scheme."""

    bits: int
    granularity: str
    group_size: int = 64
    scheme: str = "symmetric"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8 (int8 storage), got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (1 if self.scheme == "symmetric" else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        """A short label such as `w4-group64-sym`, used in file names and tables."""
        gran = f"group{self.group_size}" if self.granularity == "group" else "channel"
        return f"w{self.bits}-{gran}-{self.scheme[:3]}"

    def groups_per_row(self, row_length: int) -> int:
        return 1 if self.granularity == "channel" else math.ceil(row_length / self.group_size)

    def param_shape(self, weight_shape) -> tuple[int, int]:
        """Shape of S and Z for a weight of `weight_shape`: (rows, groups per row)."""
        rows, row_length = weight_shape[0], math.prod(weight_shape[1:])
        return rows, self.groups_per_row(row_length)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(
            int(d["bits"]),
            d["granularity"],
            int(d.get("group_size", 64)),
            d.get("scheme", "symmetric"),
        )


@dataclass
class QTensor:
    """A quantized weight: int8 codes of the weight's shape, float32 scale and zero of shape
    (rows, groups)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def is_quantized_weight(name: str, tensor: torch.Tensor) -> bool:
    """The one rule for what gets quantized: Linear/Conv kernels (`*.weight` with ndim >= 2)."""
    return name.endswith(".weight") and tensor.ndim >= 2


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN or inf weights: quantizing them would silently produce garbage codes."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"tensor {name!r} has {bad} NaN/inf values; "
            "fix or re-export the checkpoint before quantizing"
        )


def grouped(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """View w as (rows, groups, group_len), edge-padding the short last group of each row.

    Edge padding repeats a row's last value, so it changes neither max|r| nor min/max of that group.
    Returns the grouped tensor and the row length before padding.
    """
    rows = w.reshape(w.shape[0], -1).float()
    length = rows.shape[1]
    glen = length if spec.granularity == "channel" else min(spec.group_size, length)
    groups = math.ceil(length / glen)
    pad = groups * glen - length
    if pad:
        rows = F.pad(rows.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return rows.reshape(rows.shape[0], groups, glen), length


def ungrouped(g: torch.Tensor, length: int, shape) -> torch.Tensor:
    return g.reshape(g.shape[0], -1)[:, :length].reshape(shape)


def spread(param: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    """A (rows, groups) parameter (S or Z) repeated over the values of each group, in the weight's
    `shape`."""
    length = math.prod(shape[1:])
    glen = length if spec.granularity == "channel" else min(spec.group_size, length)
    return ungrouped(param.unsqueeze(-1).expand(*param.shape, glen), length, shape)


def centered_codes(q: QTensor) -> torch.Tensor:
    """A layer's codes taken from their zero points, q - Z: the weight in steps of S (q itself on a
    symmetric grid). On an asymmetric grid a zero point and every code of its group can move
    together and leave the weights as they were; as q - Z they do not move."""
    return q.codes.float() - spread(q.zero.float(), q.spec, q.shape)


def quant_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero point of `w` for `spec`, each of shape (rows, groups)."""
    g, _ = grouped(w, spec)
    if spec.scheme == "symmetric":
        scale = g.abs().amax(-1).clamp_min(MIN_SCALE) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
        scale = (hi - lo).clamp_min(MIN_SCALE) / (2**spec.bits - 1)
        zero = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale.float(), zero.float()


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> QTensor:
    """Codes of `w` under given (S, Z): round(w / S) + Z, clamped to the spec's code range."""
    g, length = grouped(w, spec)
    codes = torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    codes = codes.clamp(spec.qmin, spec.qmax).to(torch.int8)
    return QTensor(ungrouped(codes, length, w.shape), scale.float(), zero.float(), spec)


def remainder(w: torch.Tensor, rtn: QTensor) -> torch.Tensor:
    """Where each weight sits between codes: w / S + Z - q_rtn, in [-0.5, 0.5] unless clamped (code
    units)."""
    g, length = grouped(w, rtn.spec)
    exact = g / rtn.scale.unsqueeze(-1) + rtn.zero.unsqueeze(-1)
    return ungrouped(exact, length, w.shape) - rtn.codes.float()


def quantize(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Round-to-nearest (RTN) quantization of one weight tensor (the PTQ baseline)."""
    if w.ndim < 2:
        raise ValueError(
            f"quantize expects a weight with 2+ dims (rows, ...), got shape {tuple(w.shape)}"
        )
    check_finite("weight", w)
    scale, zero = quant_params(w, spec)
    return quantize_with(w, scale, zero, spec)


def dequantize(q: QTensor) -> torch.Tensor:
    """Float32 weight S * (codes - Z), each group's (S, Z) broadcast over its values."""
    g, length = grouped(q.codes, q.spec)
    w = q.scale.unsqueeze(-1) * (g - q.zero.unsqueeze(-1))
    return ungrouped(w, length, q.codes.shape)


class _RoundSTE(torch.autograd.Function):
    """Fake quantization with a straight-through gradient (for quantization-aware training)."""

    @staticmethod
    def forward(ctx, w, spec):
        return dequantize(quantize(w.detach(), spec)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(w)) in the forward pass, identity gradient in the backward pass."""
    return _RoundSTE.apply(w, spec)


def quantize_state_dict(
    sd: dict[str, torch.Tensor], spec: QuantSpec, quantizer=quantize
) -> dict[str, QTensor | torch.Tensor]:
    """Quantize every weight `is_quantized_weight` selects with `quantizer(w, spec)`
    (round-to-nearest by default; `qg.quant.baselines` passes its own); copy the other tensors
    unchanged. NaN or inf weights are refused."""
    out = {}
    for name, t in sd.items():
        check_finite(name, t)
        out[name] = quantizer(t, spec) if is_quantized_weight(name, t) else t
    return out


def dequantize_state_dict(qsd: dict[str, QTensor | torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float state_dict a timm model loads: quantized weights replaced by their dequantized
    values."""
    return {k: dequantize(v) if isinstance(v, QTensor) else v for k, v in qsd.items()}
