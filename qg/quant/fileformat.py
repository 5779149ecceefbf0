"""The quantized-model file format: safetensors holding bit-packed codes, S and (asymmetric only) Z
per quantized weight, the float tensors as they are, and a header with the spec, the format version,
each weight's shape and the model description; read back with every part checked against the spec.

Format version 2 (`save_quantized`): codes bit-packed at N bits each (`qg.quant.packing`),
S float32 per row or group, Z float32 only for the asymmetric scheme (symmetric Z is 0 by
definition), so a quantized weight costs N + 32 * (1 + asymmetric) * groups / numel bits per
weight (plus at most one byte of padding per tensor). Version-1 files (int8 codes, Z always
stored) are still read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..core.io import CorruptFileError, metadata_json, read_safetensors, save_safetensors
from .packing import pack_codes, unpack_codes
from .quantizer import QTensor, QuantSpec, dequantize_state_dict
from .qwt import PREFIX as QWT_PREFIX

FORMAT_NAME = "qg-quantized"
FORMAT_VERSION = "2"  # 2: bit-packed codes, Z only when asymmetric (1: int8 codes, read still)
READABLE_VERSIONS = ("1", "2")


def save_quantized(
    path, qsd: dict[str, QTensor | torch.Tensor], spec: QuantSpec, meta: dict | None = None
) -> None:
    """Write a quantized model (format version 2): per quantized weight W, `W.qweight` its codes
    bit-packed (`qg.quant.packing`: N bits per code, uint8), `W.scale` and, for the asymmetric
    scheme only, `W.zero` (float32, shape (rows, groups)); the weights' shapes in the metadata;
    every other tensor as it is."""
    tensors, shapes = {}, {}
    for name, v in qsd.items():
        if isinstance(v, QTensor):
            if v.spec != spec:
                raise ValueError(
                    f"{name} was quantized with {v.spec}, but the file is declared as {spec}"
                )
            tensors[f"{name}.qweight"] = pack_codes(v.codes, spec.bits)
            tensors[f"{name}.scale"] = v.scale.float()
            if spec.scheme == "asymmetric":
                tensors[f"{name}.zero"] = v.zero.float()
            shapes[name] = list(v.codes.shape)
        else:
            tensors[name] = v
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": json.dumps(spec.to_dict()),
        "shapes": json.dumps(shapes, sort_keys=True),
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    save_safetensors(tensors, path, metadata)


def _checked_header(path, metadata: dict) -> QuantSpec:
    if metadata.get("format") != FORMAT_NAME:
        raise CorruptFileError(
            f"{path} is not a {FORMAT_NAME} file (format={metadata.get('format')!r}); "
            "write it with qg.quant.fileformat.save_quantized"
        )
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CorruptFileError(
            f"{path} has format version {metadata.get('format_version')!r}; "
            f"this qg reads versions {', '.join(READABLE_VERSIONS)}: update qg"
        )
    return QuantSpec.from_dict(metadata_json(path, metadata, "spec"))


def read_quantized_meta(path) -> tuple[QuantSpec, dict]:
    """The spec and metadata of a quantized model file (its wall time, source, method), read from
    the header without loading a tensor."""
    metadata = read_safetensors(path, tensors=False)[1]
    return _checked_header(path, metadata), metadata_json(path, metadata, "meta", "{}")


def format_version(path) -> str:
    """The format version a quantized file was written in ("1": int8 codes, "2": bit-packed)."""
    metadata = read_safetensors(path, tensors=False)[1]
    _checked_header(path, metadata)
    return metadata["format_version"]


def read_quantized(path) -> tuple[dict[str, QTensor | torch.Tensor], QuantSpec, dict]:
    """Read a quantized model file (either format version) as QTensors (codes, S, Z) plus float
    tensors, its spec and metadata."""
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
            raise CorruptFileError(
                f"{path}: {name} has scale {tuple(scale.shape)} / zero {tuple(zero.shape)}, "
                f"expected {spec.param_shape(codes.shape)} for {spec.name}"
            )
        qsd[name] = _checked_values(path, name, QTensor(codes, scale, zero, spec))
    return qsd, spec, metadata_json(path, metadata, "meta", "{}")


def _part(path, tensors: dict, name: str, part: str) -> torch.Tensor:
    if f"{name}.{part}" not in tensors:
        raise CorruptFileError(f"{path}: {name}.qweight has no matching {name}.{part}")
    return tensors[f"{name}.{part}"]


def _shape(path, name: str, shapes: dict) -> list[int]:
    """A quantized weight's shape from the metadata: two or more non-negative integers, else the
    file is damaged."""
    shape = shapes.get(name)
    if shape is None:
        raise CorruptFileError(
            f"{path}: {name}.qweight has no shape in the metadata's `shapes`; the file is damaged"
        )
    if not (
        isinstance(shape, list)
        and len(shape) >= 2
        and all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise CorruptFileError(
            f"{path}: the shape of {name} in the metadata is {shape!r}, not a weight's shape "
            "(two or more non-negative integers); the file is damaged"
        )
    return shape


def _unpacked(path, name: str, packed: torch.Tensor, spec: QuantSpec, shapes: dict) -> torch.Tensor:
    shape = _shape(path, name, shapes)
    try:
        return unpack_codes(packed, spec.bits, shape)
    except ValueError as e:
        raise CorruptFileError(
            f"{path}: {name}.qweight is truncated or damaged ({e}); quantize the checkpoint again"
        ) from e


def storage(path) -> dict:
    """What a quantized file costs: its bytes on disk, the float32 bytes of the model it holds, its
    number of (S, Z) groups, the bits per quantized weight its codes, S and Z take (the ideal is
    `bits`; S and Z add 32 bits each per group), and the bytes of QwT compensations it carries on
    top (`qg.quant.qwt`)."""
    tensors, metadata = read_safetensors(path)
    _checked_header(path, metadata)
    names = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    if metadata["format_version"] == "1":
        weights = sum(tensors[f"{n}.qweight"].numel() for n in names)
    else:
        shapes = metadata_json(path, metadata, "shapes")
        weights = sum(math.prod(_shape(path, n, shapes)) for n in names)
    quantized = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[0] in names
    )
    extra = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(QWT_PREFIX + ".")
    )
    floats = sum(
        t.numel()
        for k, t in tensors.items()
        if k.rpartition(".")[0] not in names and not k.startswith(QWT_PREFIX + ".")
    )
    return {
        "file_bytes": Path(path).stat().st_size,
        "fp32_bytes": 4 * (weights + floats),
        "quantized_weights": weights,
        "quantized_tensors": len(names),
        "groups": sum(tensors[f"{n}.scale"].numel() for n in names),
        "bits_per_weight": 8 * quantized / max(weights, 1),
        "compensation_bytes": extra,
        "format_version": metadata["format_version"],
    }


def _checked_values(path, name: str, qt: QTensor) -> QTensor:
    """Refuse what the scheme cannot hold: codes outside its range, scales that are not finite and
    positive, a zero point that is not finite (asymmetric: HQQ's is a float) or not 0 (symmetric,
    which has none)."""
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
        raise CorruptFileError(
            f"{path}: {name} has {' and '.join(problems)} for {spec.name}; the file is damaged or "
            "was not written by qg: quantize the checkpoint again"
        )
    return qt


def _within(t: torch.Tensor, spec: QuantSpec) -> bool:
    return t.numel() == 0 or spec.qmin <= float(t.min()) and float(t.max()) <= spec.qmax


def load_quantized(path) -> tuple[dict[str, torch.Tensor], QuantSpec, dict]:
    """Read a quantized model file and return (float state_dict for timm, spec, metadata)."""
    qsd, spec, meta = read_quantized(path)
    return dequantize_state_dict(qsd), spec, meta
