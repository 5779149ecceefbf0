"""How faithful a generated quantized model is, and whether the generator follows its input at all.

Three questions a reviewer of a weight generator asks first (Zeng et al., arXiv 2506.07998, ask them
of p-diff and its kin), as functions of quantized state_dicts, so each can be checked on a case
whose answer is known:

* **Per-layer fidelity** (`layer_fidelity`): against the target quantizer's output for the same
  checkpoint, the fraction of integer codes that are equal, the mean code error in quantization
  steps, the relative error of S, the error of Z and the relative error of the dequantized weight;
  and the code error split in two: the part a per-group gain and offset explains (the generator got
  the group's range wrong, e.g. its max|w|, and every code of the group is off by the same factor)
  and the per-element rest.
* **Input sensitivity** (`sensitivity`): for two checkpoints a and b,

      s = ||G(a) - G(b)|| / ||T(a) - T(b)||      (dequantized weights of one layer)

  0 means the generator ignores its input (it returns one model whatever it is given), 1 means its
  output moves as much as the target does. Moving as much is not moving the same way: `alignment`,
  the cosine between G(a) - G(b) and T(a) - T(b), is 1 for a faithful quantizer and near 0 for an
  output that moves by noise. A layer whose target is the same for a and b (a frozen layer) has
  nothing to follow: there the exact-copy rate of `layer_fidelity` is the measure.
* **Memorisation** (`nearest_distances`, `error_iou`): is a generated model closer to its own target
  than to the nearest *training* target, compared with how far apart training targets are; and do
  its mistakes on the test set coincide with those of the nearest training model (IoU of the sets of
  misclassified samples; 1 = a replica). Both work on full-precision models too (RPG's samples,
  `qg.generator.rpg`).
"""

from __future__ import annotations

import pandas as pd
import torch

from ..quant.quantizer import QTensor, centered_codes, dequantize, grouped


def _quantized(qsd: dict) -> dict[str, QTensor]:
    return {k: v for k, v in qsd.items() if isinstance(v, QTensor)}


def _common(generated: dict, target: dict) -> list[str]:
    gen, tgt = _quantized(generated), _quantized(target)
    if set(gen) != set(tgt):
        raise ValueError(
            f"the two models quantize different layers ({sorted(set(gen) ^ set(tgt))[:3]} ...); "
            "compare models of one architecture"
        )
    return list(tgt)


def _group_fit(generated: QTensor, target: QTensor) -> tuple[float, float]:
    """Fit each group's generated codes as a * target + b (codes taken from their zero points, least
    squares); return the mean |a - 1| and the mean |code error| left after the fit."""
    u = grouped(centered_codes(target), target.spec)[0]
    v = grouped(centered_codes(generated), target.spec)[0]
    du, dv = u - u.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    var = du.pow(2).sum(-1, keepdim=True)
    a = torch.where(
        var > 0, (du * dv).sum(-1, keepdim=True) / var.clamp_min(1e-12), torch.ones_like(var)
    )
    rest = dv - a * du
    return float((a - 1).abs().mean()), float(rest.abs().mean())


def layer_fidelity(generated: dict, target: dict) -> pd.DataFrame:
    """One row per quantized layer: how the generated layer differs from the target's.

    `codes_equal` fraction of equal codes; `code_mae` mean |code difference| in steps (codes as
    q - Z, `qg.quant.quantizer.centered_codes`);
    `scale_rel_err` mean |S_gen - S_tgt| / S_tgt; `zero_mae` mean |Z difference|; `weight_rel_err`
    ||W_gen - W_tgt|| / ||W_tgt|| of the dequantized weights (what the network computes with).
    `group_gain_err` and `code_mae_local` split the code error: fitting each group's codes as gain x
    target + offset, the mean |gain - 1| and the mean |code error| the fit leaves (the per-element
    part; equal to `code_mae` when the error is all per element, near 0 when it is all a wrong range
    per group).
    """
    rows = []
    for i, name in enumerate(_common(generated, target)):
        g, t = generated[name], target[name]
        wg, wt = dequantize(g), dequantize(t)
        cg, ct = centered_codes(g), centered_codes(t)
        gain_err, local = _group_fit(g, t)
        rows.append(
            {
                "layer": name,
                "layer_index": i,
                "numel": t.codes.numel(),
                "codes_equal": float((cg == ct).float().mean()),
                "code_mae": float((cg - ct).abs().mean()),
                "scale_rel_err": float(((g.scale - t.scale).abs() / t.scale).mean()),
                "zero_mae": float((g.zero - t.zero).abs().mean()),
                "weight_rel_err": float((wg - wt).norm() / wt.norm().clamp_min(1e-12)),
                "group_gain_err": gain_err,
                "code_mae_local": local,
            }
        )
    return pd.DataFrame(rows)


def sensitivity(gen_a: dict, gen_b: dict, target_a: dict, target_b: dict) -> pd.DataFrame:
    """Per layer: ||G(a) - G(b)|| / ||T(a) - T(b)|| of dequantized weights and the cosine between
    the two differences (both NaN where the target does not move).

    `target_moves` is ||T(a) - T(b)|| / ||T(a)||, so a reader can tell a frozen layer (0) from one
    that changes between checkpoints.
    """
    rows = []
    for name in _common(gen_a, target_a):
        dg = (dequantize(gen_a[name]) - dequantize(gen_b[name])).reshape(-1)
        ta = dequantize(target_a[name])
        dt = (ta - dequantize(target_b[name])).reshape(-1)
        moves = dt.norm() > 0
        rows.append(
            {
                "layer": name,
                "target_moves": float(dt.norm() / ta.norm().clamp_min(1e-12)),
                "sensitivity": float(dg.norm() / dt.norm()) if moves else float("nan"),
                "alignment": float(torch.dot(dg, dt) / (dg.norm() * dt.norm()).clamp_min(1e-30))
                if moves
                else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def _compared(sd: dict) -> list[str]:
    """The tensors distances compare: a quantized model's quantized layers (its other tensors are
    copies of its input), every floating tensor of a full-precision one."""
    names = list(_quantized(sd)) or [k for k, v in sd.items() if v.is_floating_point()]
    return sorted(names)


def _value(sd: dict, name: str) -> torch.Tensor:
    v = sd[name]
    return (dequantize(v) if isinstance(v, QTensor) else v).double().reshape(-1)


def _squared_distances(models: list[dict], refs: list[dict]) -> torch.Tensor:
    """(len(models), len(refs)) squared distances of (dequantized) weights, summed layer by layer in
    float64.

    One layer of every reference is held at a time, so 40 training targets of a ViT-Base cost a few
    of its layers in memory, not 40 copies of the model.
    """
    names = _compared(refs[0])
    for m in models:
        if _compared(m) != names:
            raise ValueError(
                "the models compared hold different tensors (quantized and full-precision ones "
                "mixed, or two architectures); compare models of one kind and architecture"
            )
    out = torch.zeros(len(models), len(refs), dtype=torch.float64)
    for name in names:
        R = torch.stack([_value(r, name) for r in refs])
        for i, m in enumerate(models):
            out[i] += (R - _value(m, name)).pow(2).sum(1)
    return out


def _norm(sd: dict) -> float:
    return sum(float(_value(sd, n).pow(2).sum()) for n in _compared(sd)) ** 0.5


def distances(models: list[dict], refs: list[dict]) -> torch.Tensor:
    """(len(models), len(refs)) Euclidean distances of the (dequantized) weights, relative to the
    mean norm of `refs`: the matrix `nearest_distances` reads its nearest neighbours from."""
    if not refs:
        raise ValueError("distances needs at least one reference model")
    scale = max(sum(_norm(r) for r in refs) / len(refs), 1e-12)
    return _squared_distances(models, refs).sqrt() / scale


def nearest_distances(
    generated: list[dict], own: list[dict] | None, train: list[dict]
) -> pd.DataFrame:
    """For each generated model: distance to its own target and to the nearest training target.

    All arguments are state_dicts of one architecture, all quantized (distances of the dequantized
    quantized layers) or all full-precision (of every floating tensor: RPG's samples, which have no
    own target, `own=None`). Distances are relative to the mean norm of the training models. A
    replica of the training set has `to_nearest_train` ~ 0 and `to_own` > `to_nearest_train`; a
    faithful quantizer of new checkpoints has `to_own` far below `to_nearest_train`. `train_spacing`
    (one number, repeated) is the median distance of a training model to its nearest other training
    model: how far apart genuinely different models are (a sample much closer to a training model
    than that is a replica of it).
    """
    if not train:
        raise ValueError("nearest_distances needs at least one training target")
    if own is not None and len(generated) != len(own):
        raise ValueError(
            f"{len(generated)} generated models for {len(own)} own targets; pass one target per "
            "model"
        )
    scale = max(sum(_norm(t) for t in train) / len(train), 1e-12)
    spacing = float("nan")
    if len(train) > 1:
        d = _squared_distances(train, train).sqrt()
        d.fill_diagonal_(float("inf"))
        spacing = float(d.min(1).values.median()) / scale
    to_train = _squared_distances(generated, train).sqrt()
    rows = []
    for i, g in enumerate(generated):
        j = int(to_train[i].argmin())
        to_own = (
            float("nan")
            if own is None
            else float(_squared_distances([g], [own[i]])[0, 0].sqrt()) / scale
        )
        rows.append(
            {
                "model": i,
                "to_own": to_own,
                "to_nearest_train": float(to_train[i, j]) / scale,
                "nearest_train": j,
                "train_spacing": spacing,
            }
        )
    return pd.DataFrame(rows)


def error_iou(pred_a: torch.Tensor, pred_b: torch.Tensor, labels: torch.Tensor) -> float:
    """IoU of the sets of test samples two models misclassify (1: the same mistakes; NaN: neither
    errs)."""
    if not pred_a.shape == pred_b.shape == labels.shape:
        raise ValueError(
            f"predictions and labels must have one shape, got {pred_a.shape}, {pred_b.shape}, "
            f"{labels.shape}"
        )
    ea, eb = pred_a != labels, pred_b != labels
    union = (ea | eb).sum()
    return float((ea & eb).sum() / union) if union else float("nan")
