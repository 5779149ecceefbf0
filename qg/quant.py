"""Uniform weight quantization and the quantized-model file format.

Conventions (one place for all of them):

* Which tensors are quantized: `is_quantized_weight` - a tensor named `*.weight` with two or more
  dimensions, which in timm's ViT and MLP-Mixer is exactly the Linear and Conv kernels. Biases, norms,
  position embeddings and class tokens stay float.
* A weight is viewed as rows: `w.reshape(out_features, -1)` (a Conv kernel's row is its flattened
  in_channels x kh x kw). Per-channel = one (S, Z) per row. Group-wise = contiguous groups of
  `group_size` along each row; groups never cross rows, and when the row length is not a multiple of
  `group_size` the last group of each row is shorter (it holds the remainder).
* `scheme="symmetric"` is the paper's Eq. 1: S = max|r| / (2^(N-1) - 1), Z = 0, codes in
  [-(2^(N-1) - 1), 2^(N-1) - 1] (the restricted range, not torchao's 2^(N-1) - 0.5 divisor).
* `scheme="asymmetric"` is min-max with an integer zero point: S = (max - min) / (2^N - 1), codes on the
  full N-bit grid; as in PyTorch's MinMaxObserver the range is widened to include 0, so Z is in range and
  zero is exactly representable. Codes are stored signed, in [-2^(N-1), 2^(N-1) - 1], with Z shifted the same way, so
  that every scheme's codes fit int8 and r_hat = S * (q - Z) holds unchanged.
* Files (`save_quantized`, format version 2): codes bit-packed at N bits each (`qg.packing`), S float32
  per row or group, Z float32 only for the asymmetric scheme (symmetric Z is 0 by definition), so a
  quantized weight costs N + 32 * (1 + asymmetric) * groups / numel bits per weight (plus at most one byte of
  padding per tensor). Version-1 files (int8 codes, Z always stored) are still read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .io import CorruptFileError, metadata_json, read_safetensors, save_safetensors
from .packing import pack_codes, unpack_codes
from .qwt import PREFIX as QWT_PREFIX

GRANULARITIES = ("channel", "group")
SCHEMES = ("symmetric", "asymmetric")
FORMAT_NAME = "qg-quantized"
FORMAT_VERSION = "2"  # 2: bit-packed codes, Z only when asymmetric (1: int8 codes, read still)
READABLE_VERSIONS = ("1", "2")
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
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
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
        return cls(int(d["bits"]), d["granularity"], int(d.get("group_size", 64)), d.get("scheme", "symmetric"))


@dataclass
class QTensor:
    """A quantized weight: int8 codes of the weight's shape, float32 scale and zero of shape (rows, groups)."""

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
        raise ValueError(f"tensor {name!r} has {bad} NaN/inf values; fix or re-export the checkpoint before quantizing")


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


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Codes of `w` under given (S, Z): round(w / S) + Z, clamped to the spec's code range."""
    g, length = grouped(w, spec)
    codes = torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    codes = codes.clamp(spec.qmin, spec.qmax).to(torch.int8)
    return QTensor(ungrouped(codes, length, w.shape), scale.float(), zero.float(), spec)


def remainder(w: torch.Tensor, rtn: QTensor) -> torch.Tensor:
    """Where each weight sits between codes: w / S + Z - q_rtn, in [-0.5, 0.5] unless clamped (code units)."""
    g, length = grouped(w, rtn.spec)
    exact = g / rtn.scale.unsqueeze(-1) + rtn.zero.unsqueeze(-1)
    return ungrouped(exact, length, w.shape) - rtn.codes.float()


def quantize(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Round-to-nearest (RTN) quantization of one weight tensor (the PTQ baseline)."""
    if w.ndim < 2:
        raise ValueError(f"quantize expects a weight with 2+ dims (rows, ...), got shape {tuple(w.shape)}")
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


def quantize_state_dict(sd: dict[str, torch.Tensor], spec: QuantSpec, quantizer=quantize) -> dict[str, QTensor | torch.Tensor]:
    """Quantize every weight `is_quantized_weight` selects with `quantizer(w, spec)` (round-to-nearest by
    default; `qg.baselines` passes its own); copy the other tensors unchanged. NaN or inf weights are refused."""
    out = {}
    for name, t in sd.items():
        check_finite(name, t)
        out[name] = quantizer(t, spec) if is_quantized_weight(name, t) else t
    return out


def dequantize_state_dict(qsd: dict[str, QTensor | torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float state_dict a timm model loads: quantized weights replaced by their dequantized values."""
    return {k: dequantize(v) if isinstance(v, QTensor) else v for k, v in qsd.items()}


def save_quantized(path, qsd: dict[str, QTensor | torch.Tensor], spec: QuantSpec, meta: dict | None = None) -> None:
    """Write a quantized model (format version 2): per quantized weight W, `W.qweight` its codes bit-packed
    (`qg.packing`: N bits per code, uint8), `W.scale` and, for the asymmetric scheme only, `W.zero`
    (float32, shape (rows, groups)); the weights' shapes in the metadata; every other tensor as it is."""
    tensors, shapes = {}, {}
    for name, v in qsd.items():
        if isinstance(v, QTensor):
            if v.spec != spec:
                raise ValueError(f"{name} was quantized with {v.spec}, but the file is declared as {spec}")
            tensors[f"{name}.qweight"] = pack_codes(v.codes, spec.bits)
            tensors[f"{name}.scale"] = v.scale.float()
            if spec.scheme == "asymmetric":
                tensors[f"{name}.zero"] = v.zero.float()
            shapes[name] = list(v.codes.shape)
        else:
            tensors[name] = v
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "spec": json.dumps(spec.to_dict()),
                "shapes": json.dumps(shapes, sort_keys=True), "meta": json.dumps(meta or {}, sort_keys=True)}
    save_safetensors(tensors, path, metadata)


def _checked_header(path, metadata: dict) -> QuantSpec:
    if metadata.get("format") != FORMAT_NAME:
        raise CorruptFileError(f"{path} is not a {FORMAT_NAME} file (format={metadata.get('format')!r}); "
                               "write it with qg.quant.save_quantized")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CorruptFileError(f"{path} has format version {metadata.get('format_version')!r}; "
                               f"this qg reads versions {', '.join(READABLE_VERSIONS)}: update qg")
    return QuantSpec.from_dict(metadata_json(path, metadata, "spec"))


def read_quantized_meta(path) -> tuple[QuantSpec, dict]:
    """The spec and metadata of a quantized model file (its wall time, source, method), read from the header
    without loading a tensor."""
    metadata = read_safetensors(path, tensors=False)[1]
    return _checked_header(path, metadata), metadata_json(path, metadata, "meta", "{}")


def format_version(path) -> str:
    """The format version a quantized file was written in ("1": int8 codes, "2": bit-packed)."""
    metadata = read_safetensors(path, tensors=False)[1]
    _checked_header(path, metadata)
    return metadata["format_version"]


def read_current(path) -> None:
    """`read_quantized`, refusing a file of an older format version: the pipeline's cache check, so that a
    cached file written by an older qg is remade in today's format (its codes, S and Z are the same)."""
    version = format_version(path)
    if version != FORMAT_VERSION:
        raise CorruptFileError(f"{path} is in format version {version}, not {FORMAT_VERSION}")
    read_quantized(path)


def read_quantized(path) -> tuple[dict[str, QTensor | torch.Tensor], QuantSpec, dict]:
    """Read a quantized model file (either format version) as QTensors (codes, S, Z) plus float tensors, its
    spec and metadata."""
    tensors, metadata = read_safetensors(path)
    spec = _checked_header(path, metadata)
    packed = metadata["format_version"] != "1"
    shapes = metadata_json(path, metadata, "shapes") if packed else {}
    qsd: dict[str, QTensor | torch.Tensor] = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        if part in ("scale", "zero") and f"{name}.qweight" in tensors:
            continue
        if part != "qweight":
            qsd[key] = t
            continue
        codes = _unpacked(path, name, t, spec, shapes) if packed else t
        scale = _part(path, tensors, name, "scale")
        implied_zero = packed and spec.scheme == "symmetric" and f"{name}.zero" not in tensors
        zero = torch.zeros_like(scale) if implied_zero else _part(path, tensors, name, "zero")
        if tuple(scale.shape) != spec.param_shape(codes.shape) or scale.shape != zero.shape:
            raise CorruptFileError(f"{path}: {name} has scale {tuple(scale.shape)} / zero {tuple(zero.shape)}, "
                                   f"expected {spec.param_shape(codes.shape)} for {spec.name}")
        qsd[name] = _checked_values(path, name, QTensor(codes, scale, zero, spec))
    return qsd, spec, metadata_json(path, metadata, "meta", "{}")


def _part(path, tensors: dict, name: str, part: str) -> torch.Tensor:
    if f"{name}.{part}" not in tensors:
        raise CorruptFileError(f"{path}: {name}.qweight has no matching {name}.{part}")
    return tensors[f"{name}.{part}"]


def _shape(path, name: str, shapes: dict) -> list[int]:
    """A quantized weight's shape from the metadata: two or more non-negative integers, else the file is damaged."""
    shape = shapes.get(name)
    if shape is None:
        raise CorruptFileError(f"{path}: {name}.qweight has no shape in the metadata's `shapes`; the file is damaged")
    if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CorruptFileError(f"{path}: the shape of {name} in the metadata is {shape!r}, not a weight's shape "
                               "(two or more non-negative integers); the file is damaged")
    return shape


def _unpacked(path, name: str, packed: torch.Tensor, spec: QuantSpec, shapes: dict) -> torch.Tensor:
    shape = _shape(path, name, shapes)
    try:
        return unpack_codes(packed, spec.bits, shape)
    except ValueError as e:
        raise CorruptFileError(f"{path}: {name}.qweight is truncated or damaged ({e}); quantize the checkpoint again") from e


def storage(path) -> dict:
    """What a quantized file costs: its bytes on disk, the float32 bytes of the model it holds, its number of
    (S, Z) groups, the bits per quantized weight its codes, S and Z take (the ideal is `bits`; S and Z add 32
    bits each per group), and the bytes of QwT compensations it carries on top (`qg.qwt`)."""
    tensors, metadata = read_safetensors(path)
    _checked_header(path, metadata)
    names = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    if metadata["format_version"] == "1":
        weights = sum(tensors[f"{n}.qweight"].numel() for n in names)
    else:
        shapes = metadata_json(path, metadata, "shapes")
        weights = sum(math.prod(_shape(path, n, shapes)) for n in names)
    quantized = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[0] in names)
    extra = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(QWT_PREFIX + "."))
    floats = sum(t.numel() for k, t in tensors.items() if k.rpartition(".")[0] not in names
                 and not k.startswith(QWT_PREFIX + "."))
    return {"file_bytes": Path(path).stat().st_size, "fp32_bytes": 4 * (weights + floats), "quantized_weights": weights,
            "quantized_tensors": len(names), "groups": sum(tensors[f"{n}.scale"].numel() for n in names),
            "bits_per_weight": 8 * quantized / max(weights, 1), "compensation_bytes": extra,
            "format_version": metadata["format_version"]}


def _checked_values(path, name: str, qt: QTensor) -> QTensor:
    """Refuse what the scheme cannot hold: codes outside its range, scales that are not finite and positive,
    a zero point that is not finite (asymmetric: HQQ's is a float) or not 0 (symmetric, which has none)."""
    spec, problems = qt.spec, []
    if qt.codes.dtype != torch.int8 or not _within(qt.codes, spec):
        problems.append(f"codes outside {spec.qmin}..{spec.qmax}")
    if not (torch.isfinite(qt.scale).all() and (qt.scale > 0).all()):
        problems.append("scales that are not finite and positive")
    if not torch.isfinite(qt.zero).all():
        problems.append("zero points that are not finite")
    elif spec.scheme == "symmetric" and bool((qt.zero != 0).any()):
        problems.append("a non-zero zero point (the symmetric scheme has none)")
    if problems:
        raise CorruptFileError(f"{path}: {name} has {' and '.join(problems)} for {spec.name}; the file is damaged or "
                               "was not written by qg: quantize the checkpoint again")
    return qt


def _within(t: torch.Tensor, spec: QuantSpec) -> bool:
    return t.numel() == 0 or spec.qmin <= float(t.min()) and float(t.max()) <= spec.qmax


def load_quantized(path) -> tuple[dict[str, torch.Tensor], QuantSpec, dict]:
    """Read a quantized model file and return (float state_dict for timm, spec, metadata)."""
    qsd, spec, meta = read_quantized(path)
    return dequantize_state_dict(qsd), spec, meta
