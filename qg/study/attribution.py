"""Where in the model a generator loses its accuracy (08_residual_qat).

Its quantized model of a checkpoint with one layer taken from its target instead (that layer's
codes, S and Z), one layer at a time, and once with every float parameter taken from the target
(biases and norms: the generator copies the input's, QAT fine-tunes them), each scored on the
profile's test subset. The swap that gives back the points names the layer that holds the loss;
beside it, the share of that layer's codes and zero points that differ from the target's.
"""

from __future__ import annotations

import pandas as pd

from ..quant.fileformat import read_quantized
from ..quant.quantizer import QTensor, QuantSpec, centered_codes, dequantize_state_dict
from ..targets.models import ModelSpec, build_from, evaluate, load_model_description
from .agreement import TARGET_METHOD
from .experiments import Experiment, evenly_spaced
from .settings import Setting

FLOATS = "(float parameters)"


def _accuracy(exp: Experiment, spec: ModelSpec, qsd: dict) -> float:
    """Top-1 (%) of a quantized state_dict on the profile's test subset."""
    model = build_from(spec, dequantize_state_dict(qsd), "a layer swap")
    return evaluate(model, exp.scorer.test_set(spec), exp.device)


def _swaps(gen: dict, target: dict) -> dict[str, dict]:
    """Gen's state_dict with each quantized layer, and then all float parameters, from `target`."""
    out = {name: {**gen, name: target[name]} for name, v in gen.items() if isinstance(v, QTensor)}
    out[FLOATS] = {k: v if isinstance(v, QTensor) else target[k] for k, v in gen.items()}
    return out


def _differs(gen, target) -> dict:
    """The share (%) of a layer's codes (as q - Z: the weights in steps) and of its zero points that
    differ from the target's."""
    if not isinstance(gen, QTensor):
        return {}
    return {
        "codes_off": 100 * (centered_codes(gen) != centered_codes(target)).float().mean().item(),
        "zero_off": 100 * (gen.zero != target.zero).float().mean().item(),
    }


def layer_swaps(
    exp: Experiment, setting: Setting, spec: QuantSpec, split: str, n: int = 3
) -> pd.DataFrame:
    """One row per (checkpoint, swapped layer) on `n` evenly spaced checkpoints of `split`: Gen's
    accuracy, the target's, Gen's with the swap (`gain`: what the swap gives back), and how much of
    the layer differs."""
    rows = []
    (ckpts,) = exp.collected.splits(setting.arch, setting.task, (split,)).values()
    for ckpt in evenly_spaced(ckpts, n):
        model = load_model_description(ckpt)
        gen = read_quantized(exp.model_file(setting, spec, ckpt, "gen"))[0]
        target = read_quantized(exp.target(setting, spec, ckpt))[0]
        base, goal = _accuracy(exp, model, gen), _accuracy(exp, model, target)
        for layer, swapped in _swaps(gen, target).items():
            acc = _accuracy(exp, model, swapped)
            rows.append(
                {
                    "arch": setting.arch,
                    "task": setting.task,
                    "source": setting.source,
                    "variant": setting.label,
                    "bits": spec.bits,
                    "split": split,
                    "checkpoint": f"{ckpt.parent.name}/{ckpt.stem}",
                    "layer": layer,
                    "gen": base,
                    "target": goal,
                    "swapped": acc,
                    "gain": acc - base,
                    **_differs(gen.get(layer), target.get(layer)),
                }
            )
    return pd.DataFrame(rows)


def largest_loss(runs: pd.DataFrame, settings: list[Setting], split: str) -> Setting:
    """The setting whose generator is furthest below its target on `split` (mean over the
    checkpoints of `evaluate`'s rows; settings that differ only by target, direct or residual,
    share a name, so rows are told apart by `variant` too)."""

    def gap(s: Setting) -> float:
        rows = runs[(runs.setting == s.name) & (runs.variant == s.label) & (runs.split == split)]
        acc = rows.groupby("method").accuracy.mean()
        return acc["gen"] - acc[TARGET_METHOD[s.source]]

    return min(settings, key=gap)


def swap_summary(swaps: pd.DataFrame) -> pd.DataFrame:
    """Per split and layer, means over the checkpoints (`gen_loss`: the target's accuracy minus
    Gen's), the layers that give back most first."""
    keys = ["split", "layer"]
    out = swaps.groupby(keys)[["gain", "codes_off", "zero_off"]].mean()
    gap = (swaps.target - swaps.gen).groupby(swaps.split).mean().rename("gen_loss")
    return out.join(gap, on="split").sort_values(["split", "gain"], ascending=[True, False])
