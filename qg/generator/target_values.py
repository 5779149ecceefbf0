"""What the target side of a token sequence holds for one quantized layer, before normalisation, and
back: the values `qg.generator.tokenizer` cuts into tokens and the QTensor generated ones decode to.

The `target` says what the values are:

    direct    (the paper's) codes, S (or log S) and Z themselves
    residual  (ours) their departure from round-to-nearest (RTN) of the same checkpoint's fp
              weights: code offsets, log(S / S_rtn) and Z - Z_rtn, so that all-zero values decode
              to RTN itself: an untrained generator *is* PTQ, and what it learns is where a better
              quantizer (QAT) departs from rounding.

With `log_scale` (ours) S is held as log S: an error in a token is then a relative error of S, the
same for a layer's small and large scales, and the decoded S is always positive.

With `codes: centered` (ours) the codes are held as q - Z, which fixes the weight S (q - Z), instead
of q (`raw`, the paper's). On an asymmetric grid Z = qmin - round(min / S) flips by one with a tiny
move of a group's minimum, and every code of the group with it while the weights stay put: raw, two
such targets differ by a step at every value of the group, a move a generator cannot predict from
its input and hedges into a group shifted part-way (measured on QAT targets, CHANGELOG, issue 31);
centered, they differ in Z alone. On a symmetric grid (Z = 0) both are the same values.
"""

from __future__ import annotations

import torch

from ..quant.quantizer import MIN_SCALE, QTensor, QuantSpec, centered_codes, spread

TARGETS = ("direct", "residual")
CODES = ("raw", "centered")
MAX_LOG_SCALE = 80.0  # a diverged generated log S decodes to a huge but finite S, never inf


def _log(scale: torch.Tensor) -> torch.Tensor:
    return scale.float().clamp_min(MIN_SCALE).log()


def _codes(qt: QTensor, centered: bool) -> torch.Tensor:
    """A layer's codes as the target holds them: q, or q - Z (`centered`)."""
    return centered_codes(qt) if centered else qt.codes.float()


def layer_values(
    qt: QTensor, log_scale: bool, rtn: QTensor | None = None, centered: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A quantized layer's codes (q, or q - Z), S (or log S) and Z as floats, or, given `rtn` (the
    residual target), their departures from RTN's: code offsets, log(S / S_rtn), Z - Z_rtn."""
    codes = _codes(qt, centered)
    if rtn is not None:
        return (
            codes - _codes(rtn, centered),
            _log(qt.scale) - _log(rtn.scale),
            qt.zero.float() - rtn.zero.float(),
        )
    return codes, _log(qt.scale) if log_scale else qt.scale.float(), qt.zero.float()


def quantized_layer(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    rtn: QTensor | None = None,
    log_scale: bool = False,
    centered: bool = False,
) -> QTensor:
    """The inverse of `layer_values` for generated (unrounded) values: codes and Z rounded, Z 0 on
    a symmetric grid (Eq. 1 has no zero point), S positive, codes (q = (q - Z) + Z if `centered`)
    clamped to the bit range."""
    codes, zero = torch.round(codes), torch.round(zero)
    if spec.scheme == "symmetric":
        zero = torch.zeros_like(zero)
    if rtn is not None:  # offsets from RTN, S a log ratio to RTN's (a zero ratio keeps S exact)
        codes, zero = codes + _codes(rtn, centered), zero + rtn.zero
        scale = rtn.scale * scale.clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE).exp()
    elif log_scale:
        scale = scale.clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE).exp()
    zero = zero.clamp(spec.qmin, spec.qmax)
    if centered:
        codes = codes + spread(zero, spec, codes.shape)
    return QTensor(
        codes.clamp(spec.qmin, spec.qmax).to(torch.int8), scale.clamp_min(MIN_SCALE), zero, spec
    )
