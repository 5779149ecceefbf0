"""Data-free weight-only quantizers beside the paper's PTQ, all written in the same quantized file
format.

    ptq        round-to-nearest with the spec's scheme: the paper's PTQ (Eq. 1 when symmetric)
    rtn-asym   round-to-nearest, asymmetric min-max with an integer zero point
    mse-clip   symmetric round-to-nearest whose clipping range is searched per row / group (ratios
               1.0 down to 0.5 of max|w|) to minimise the squared weight error: the usual strong
               per-channel baseline
    hqq        Half-Quadratic Quantization (Badri & Shaji, 2023): asymmetric, its float zero point
               refined by the `hqq` package's proximal solver (lp-norm 0.7, 20 iterations), no data
               needed

A method returns the quantized state_dict and the spec its file declares (the scheme may differ from
the requested one: HQQ and rtn-asym are asymmetric by construction, as their entries in `qg.methods`
say).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import methods
from .quantizer import (
    MIN_SCALE,
    QTensor,
    QuantSpec,
    grouped,
    quantize,
    quantize_state_dict,
    quantize_with,
    ungrouped,
)

CLIP_RATIOS = torch.linspace(1.0, 0.5, 11)


def mse_clip(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Symmetric RTN with, per row or group, the clipping ratio of `CLIP_RATIOS` that minimises
    ||w - w_hat||^2."""
    g, _ = grouped(w, spec)
    amax = g.abs().amax(-1).clamp_min(MIN_SCALE)
    best_err = best_scale = None
    for ratio in CLIP_RATIOS:
        scale = amax * ratio / spec.qmax
        q = torch.round(g / scale[..., None]).clamp(spec.qmin, spec.qmax)
        err = ((q * scale[..., None] - g) ** 2).sum(-1)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = (
                torch.where(better, err, best_err),
                torch.where(better, scale, best_scale),
            )
    return quantize_with(w, best_scale, torch.zeros_like(best_scale), spec)


def hqq(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """HQQ with the `hqq` package's solver on our groups; codes and zero stored shifted by 2^(N-1)
    (int8)."""
    from hqq.core.optimize import optimize_weights_proximal_legacy

    g, length = grouped(w, spec)
    rows, groups, glen = g.shape
    flat = g.reshape(-1, glen)
    top = 2**spec.bits - 1
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    inv_scale = top / (hi - lo).clamp_min(MIN_SCALE)
    # hqq works with the inverse scale: r_hat = (q - zero) / inv_scale
    codes, inv_scale, zero = optimize_weights_proximal_legacy(
        flat, inv_scale, -lo * inv_scale, [0, top], axis=1, device="cpu"
    )
    shift = 2 ** (spec.bits - 1)
    codes = (codes - shift).round().to(torch.int8).reshape(rows, groups, glen)
    return QTensor(
        ungrouped(codes, length, w.shape),
        (1.0 / inv_scale).float().reshape(rows, groups),
        (zero.float() - shift).reshape(rows, groups),
        spec,
    )


# The maker of each `quantizer` method of `qg.methods` (which says the scheme its files declare).
QUANTIZERS = {"ptq": quantize, "rtn-asym": quantize, "mse-clip": mse_clip, "hqq": hqq}


def quantize_model(
    sd: dict[str, torch.Tensor], spec: QuantSpec, method: str = "ptq"
) -> tuple[dict, QuantSpec]:
    """Quantize every weight `is_quantized_weight` selects with `method`; returns
    (state_dict, file spec)."""
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; one of {sorted(QUANTIZERS)}")
    scheme = methods.get(method).scheme
    spec = dataclasses.replace(spec, scheme=scheme) if scheme else spec
    return quantize_state_dict(sd, spec, QUANTIZERS[method]), spec
