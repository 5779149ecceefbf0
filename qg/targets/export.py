"""Our quantized files in other libraries' layouts: hqq's `HQQLinear`, loaded by hqq itself, and
torchao's `Int8Tensor`.

A layer of ours is signed codes q, S and Z per group of a row, W = S (q - Z). hqq stores unsigned
codes u in [0, 2^N - 1] per group of `group_size` consecutive values of the flattened weight (its
axis 1), W = (u - z) s. With u = q + 2^(N-1) the two are the same numbers:

    s = S,    z = Z + 2^(N-1)

so an exported layer dequantizes to exactly our weight. `export_hqq(src, dst)` writes every
quantized Linear of a file as `HQQLinear.state_dict()` entries (`<layer>.W_q`, `<layer>.scale`, ...,
hqq's own safetensors encoding) beside the file's other tensors; `load_hqq(dst)` builds the timm
model and loads those entries into `HQQLinear` modules with hqq's `load_state_dict`, so the check
that hqq reads our numbers is hqq's own code.

What hqq 0.2.8 takes: Linear layers only; 1-6 and 8 bits (7 is not among its bit-widths; 5 and 6
are stored one code per byte); groups that tile each row (no short last group, which our format
allows); at 4, 2 and 1 bits a number of groups divisible by 2, 4 and 8 (it packs along the group
axis). A layer it cannot hold (the Conv2d patch embedding always) is written dequantized, as
float32, and `export_hqq` says which and why.

torchao (0.18) holds 8-bit per-row weights on a CPU as `Int8Tensor` (int8 codes, one float scale per
row, W = s q): our 8-bit channel-wise symmetric codes are those numbers as they are, so
`torchao_int8(model, qsd)` puts them in torchao's tensors and its int8 weight-only kernel computes
the layer. Its int4 weight-only tensors have no CPU layout in 0.18 (the plain one asks for the mslk
library, the CPU "opaque" packing is gone), so no other spec goes to torchao. torchao saves models
as pickles, which we never load from files a user hands us: the conversion is in memory, from our
safetensors file.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..core.io import read_safetensors, save_safetensors
from ..quant.fileformat import read_quantized
from ..quant.quantizer import QTensor, QuantSpec, dequantize
from .models import build_model

HQQ_FORMAT = "hqq-0.2"


def _hqq():
    from hqq.core.quantize import HQQLinear, Quantizer

    return HQQLinear, Quantizer


def _empty_hqq_linear():
    HQQLinear, _ = _hqq()
    return HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)


def hqq_state(name: str, q: QTensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One quantized Linear weight as `HQQLinear.state_dict()` (safetensors-encoded), built by
    loading our codes, S and Z into an `HQQLinear` (a ValueError names what hqq cannot hold)."""
    _, Quantizer = _hqq()
    spec, (rows, length) = q.spec, q.shape
    group = length if spec.granularity == "channel" else min(spec.group_size, length)
    if spec.bits not in Quantizer.bit_to_packing:
        raise ValueError(f"{name}: hqq stores 1-6 and 8 bits, not {spec.bits}")
    if length % group:
        raise ValueError(
            f"{name}: rows of {length} values do not divide into hqq's groups of {group} (hqq "
            "has no short last group); quantize with a group size that divides the row"
        )
    groups, per_byte = rows * length // group, {4: 2, 2: 4, 1: 8}.get(spec.bits, 1)
    if groups % per_byte:
        raise ValueError(
            f"{name}: hqq packs {per_byte} groups of {spec.bits}-bit codes into one byte, and this "
            f"layer has {groups} groups"
        )
    half, packing = 2 ** (spec.bits - 1), Quantizer.bit_to_packing[spec.bits]
    codes = (q.codes.to(torch.int32) + half).reshape(-1, group)
    config = {"channel_wise": True, "optimize": False, "round_zero": False, "offload_meta": False}
    layer = _empty_hqq_linear()
    layer.load_state_dict(
        {
            "W_q": Quantizer.pack[packing](codes if spec.bits == 3 else codes.to(torch.uint8)),
            "nbits": spec.bits,
            "group_size": group,
            "shape": torch.Size([rows, length]),
            "scale": q.scale.reshape(-1, 1).float(),
            "zero": (q.zero.reshape(-1, 1) + half).float(),
            "axis": 1,
            "packing": packing,
            "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
            "view_as_float": False,
            "quant_scale": False,
            "quant_zero": False,
            "compute_dtype": torch.float32,
            "stores_quant_config": True,
            **config,
            **({"bias": bias.float()} if bias is not None else {}),
        }
    )
    return {k: v for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


def export_hqq(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, str]:
    """Write the quantized model file `src` in hqq's layout at `dst`: every quantized Linear hqq
    can hold as an `HQQLinear` (with its bias inside), every other tensor as it is, a quantized
    weight hqq cannot hold dequantized to float32. Returns {layer: how it was written} for the
    quantized layers ("HQQLinear", or "float32, " and the reason)."""
    qsd, spec, meta = read_quantized(src)
    linear = {n for n, m in build_model(meta["model"]).named_modules() if isinstance(m, nn.Linear)}
    out, written = {}, {}
    for name, value in qsd.items():
        if not isinstance(value, QTensor):
            continue
        module = name.removesuffix(".weight")
        try:
            if module not in linear:
                raise ValueError(f"{module}: hqq quantizes Linear layers only")
            state = hqq_state(module, value, qsd.get(f"{module}.bias"))
        except ValueError as why:
            written[module] = f"float32, {str(why).removeprefix(f'{module}: ')}"
            continue
        out |= {f"{module}.{k}": v for k, v in state.items()}
        written[module] = "HQQLinear"
    layers = [m for m, how in written.items() if how == "HQQLinear"]
    for name, value in qsd.items():
        if name.rpartition(".")[0] not in layers:
            out[name] = dequantize(value) if isinstance(value, QTensor) else value
    metadata = {
        "format": HQQ_FORMAT,
        "model": json.dumps(meta["model"]),
        "hqq_layers": json.dumps(layers),
    }
    save_safetensors(out, dst, metadata)
    return written


def load_hqq(path: str | os.PathLike) -> nn.Module:
    """The timm model of an `export_hqq` file, its Linear layers `HQQLinear` modules loaded by hqq
    from the file's entries, the other tensors loaded strictly."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != HQQ_FORMAT:
        raise ValueError(f"{path} is not an hqq export of qg (format {metadata.get('format')!r})")
    model, layers = build_model(json.loads(metadata["model"])), json.loads(metadata["hqq_layers"])
    for module in layers:
        layer = _empty_hqq_linear()
        prefix = f"{module}."
        layer.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        parent, _, attr = module.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(f"{m}.") for m in layers)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected or [k for k in missing if k.rpartition(".")[0] not in layers]:
        raise ValueError(f"{path} does not match its model: missing {missing}, extra {unexpected}")
    return model.eval()


TORCHAO_SPEC = QuantSpec(8, "channel")  # what torchao's Int8Tensor holds on a CPU


def torchao_int8(model: nn.Module, qsd: dict) -> nn.Module:
    """Replace, in place, the weight of every Linear layer `qsd` holds quantized by torchao's
    `Int8Tensor` of its codes and scales; `model` is `qsd`'s simulated model (its other weights
    the dequantized codes). Only 8-bit channel-wise symmetric codes are torchao's layout on a CPU;
    any other spec is refused."""
    from torchao.quantization import Int8Tensor

    for name, q in qsd.items():
        if not isinstance(q, QTensor):
            continue
        if q.spec != TORCHAO_SPEC:
            raise ValueError(
                f"{name}: torchao's CPU int8 tensors hold {TORCHAO_SPEC.name} codes, not "
                f"{q.spec.name}; quantize with --bits 8 --granularity channel"
            )
        layer = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(layer, nn.Linear):
            continue  # the patch embedding: torchao's tensors are Linear weights
        rows, cols = q.codes.reshape(layer.weight.shape).shape
        weight = Int8Tensor(
            q.codes.reshape(rows, cols).to(torch.int8),
            q.scale.reshape(rows, 1).float(),
            [1, cols],
            torch.float32,
        )
        layer.weight = nn.Parameter(weight, requires_grad=False)
    return model
