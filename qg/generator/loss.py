"""What a generator's MSE counts at each target position: its weight (`loss_weights`: the paper's
plain MSE, or every segment alike) and, relative to round-to-nearest, its dead zone
(`loss_tolerance`: an integer is right when the prediction rounds to it). `qg.generator.pairs`
builds both into the training set; `qg.generator.model` applies them.
"""

from __future__ import annotations

import torch

from ..quant.quantizer import QuantSpec
from .layout import KINDS
from .tokenizer import Tokenizer

LOSS_WEIGHTINGS = ("element", "segment", "cost")
# code units: how far past a rounding boundary a departing residual offset must be predicted
ROUNDING_MARGIN = 0.1
# code units: an offset from RTN this close to 0.5 is a rounding tie (float error), not a departure
TIE = 1e-3


def loss_weights(
    tokenizer: Tokenizer,
    spec: QuantSpec,
    weighting: str = "element",
    layer_cost: dict[str, float] | None = None,
) -> torch.Tensor:
    """(n_tokens, token_size) float weights of each target value in the MSE, 0 on padding,
    mean 1.

    `element` is the paper's plain MSE: every real value counts once, so a layer's few S and Z
    values and the small layers weigh almost nothing. `segment` (ours) gives every (layer, kind)
    segment the same total weight, so the S of a group, which scales all of its codes, is not
    drowned by them. `cost` (ours) weighs every value of a layer by what a one-step code error
    there costs the task's loss (`layer_cost`, from `qg.study.layer_cost`) times the squared code
    steps one unit of its normalised token stands for (the code segment's std), so the MSE counts
    loss, not codes; S and Z keep their per-value share within their layer.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    mask = tokenizer.loss_mask(spec)
    if weighting == "element":
        return mask.float()
    if weighting == "cost":
        per_layer = _layer_weights(tokenizer, spec, layer_cost)
        return _by_segment(tokenizer, mask, lambda seg: per_layer[seg.layer_index])
    return _by_segment(tokenizer, mask, lambda seg: 1.0 / tokenizer.layout.numel(seg, spec))


def _by_segment(tokenizer: Tokenizer, mask: torch.Tensor, weight_of) -> torch.Tensor:
    """Every real value of a segment weighs `weight_of(segment)`, padding 0, scaled to mean 1."""
    weights = torch.zeros(mask.numel())
    ts = tokenizer.layout.token_size
    for seg in tokenizer.layout.segments:
        weights[seg.start * ts : (seg.start + seg.n_tokens) * ts] = weight_of(seg)
    weights = weights.view_as(mask) * mask
    return weights * mask.sum() / weights.sum()


def _layer_weights(
    tokenizer: Tokenizer, spec: QuantSpec, layer_cost: dict[str, float] | None
) -> torch.Tensor:
    """The `cost` weighting's weight of each layer's values: cost_l x (its code tokens' std)^2."""
    names = [name for name, _ in tokenizer.layout.shapes]
    missing = sorted(set(names) - set(layer_cost or {}))
    if missing:
        raise ValueError(
            f"loss weighting 'cost' needs a cost for every quantized layer; missing {missing[:3]}: "
            "pass layer_cost=qg.study.layer_cost.layer_cost(checkpoints, spec, seed)"
        )
    std = tokenizer.stats(spec)[:, KINDS.index("weight"), 1]
    per_layer = torch.tensor([layer_cost[n] for n in names]) * std.pow(2)
    if not (torch.isfinite(per_layer).all() and (per_layer > 0).all()):
        raise ValueError(f"layer costs must be finite and positive, got {per_layer.tolist()}")
    return per_layer


def loss_tolerance(
    tokenizer: Tokenizer, target: torch.Tensor, spec: QuantSpec, base: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Half-width of the loss's dead zone at each position of a target sequence (None for the
    direct target relative to the weights, the paper's plain MSE).

    Relative to RTN (the residual target, or the direct one with `base: rtn`, whose `base`
    tokens are needed here), an integer (code or Z) is right when the prediction rounds to it,
    so the loss counts only the distance beyond the rounding boundary: 0.5 (in code units) where
    the target keeps RTN's value, and 0.5 - ROUNDING_MARGIN where it departs, so a prediction
    has to cross the boundary, not stop on it. A departure moves a code by a whole step, so its
    offset from RTN's unrounded code is over 0.5; one within TIE of 0.5 is a tie that float
    error put a hair past the boundary, and keeps RTN's value. Where the target keeps it, the
    half-width also covers the `base` (what the untrained generator outputs), so RTN itself
    costs exactly nothing, every gradient is zero and PTQ targets train nothing away.
    S is continuous: no dead zone.
    """
    if tokenizer.target == "direct" and tokenizer.base == "weights":
        return None
    if tokenizer.base == "rtn" and base is None:
        raise ValueError(
            "the dead zone of the RTN base is relative to RTN of the checkpoint: "
            "pass its base tokens"
        )
    stats, ts = tokenizer.stats(spec), tokenizer.layout.token_size
    flat, tol = target.reshape(-1), torch.zeros(target.numel())
    # from RTN, normalised
    offset = flat if tokenizer.target == "residual" else flat - base.reshape(-1)
    # what the untrained generator (its base) misses by
    gap = offset if base is None else flat - base.reshape(-1)
    for seg in tokenizer.layout.segments:
        if seg.kind == "scale":
            continue
        std = float(stats[seg.layer_index, KINDS.index(seg.kind), 1])
        at = slice(seg.start * ts, seg.start * ts + tokenizer.layout.numel(seg, spec))
        # covers the base: RTN's loss is exactly 0
        keeps = torch.maximum(gap[at].abs(), torch.tensor(0.5 / std))
        tol[at] = torch.where(
            offset[at].abs() * std > 0.5 + TIE, (0.5 - ROUNDING_MARGIN) / std, keeps
        )
    return tol.view_as(target)
