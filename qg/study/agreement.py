"""Does a generator follow its input, image by image? (03_generate, 08_residual_qat)

From checkpoint to checkpoint of a split the targets' accuracies move by a few test images (one of
5,000 is 0.02 points), too little for a correlation of accuracies over 10 checkpoints to resolve.
Their predictions differ on more images than that, and say more. For checkpoints i and j, the share
of test images on which Gen's model of i predicts the class that the model of j by another method
predicts: its target (PTQ or QAT), or the full-precision input itself. A generator that follows its
input is closest to its own checkpoint (`closest`: on how many of the n it agrees with checkpoint
i's model at least as much as with any other's; ties count, so chance is 1 in n or more), as its
target is; one that returns the same model whatever it is given is closest to one checkpoint or to
none in particular. QAT's targets are noisy in their own right (each is fine-tuned with its own
seed): `targets_agree` says how alike they are.
"""

from __future__ import annotations

import pandas as pd
import torch

from .. import methods
from .experiments import Experiment, evenly_spaced
from .settings import SPLITS, Setting

# the method whose files a generator's are compared with, by the generator's targets
TARGET_METHOD = {"ptq": "ptq", "qat": "qat"}


def agreement_matrix(gen: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """(n, n): entry (i, j) the share of test images on which `gen[i]` predicts what `target[j]`
    does (predicted classes, one tensor per checkpoint, the same images in each)."""
    return torch.stack([torch.stack([(g == t).float().mean() for t in target]) for g in gen])


def closest(a: torch.Tensor) -> int:
    """How many rows i of an agreement matrix have their largest entry at (i, i), ties included."""
    return int((a.diagonal() >= a.amax(1)).sum())


def summary(gen: list, target: list, fp: list) -> dict:
    """Predicted classes per checkpoint of Gen, its target and the fp input -> the agreement of
    Gen with its own target and with the other checkpoints' (%, means), the targets' with each
    other, and on how many checkpoints Gen's model is closest to its own target, Gen's to its own
    input, the target's to its own input."""
    a, between = agreement_matrix(gen, target), agreement_matrix(target, target)
    n = a.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    return {
        "n": n,
        "agree_own": 100 * a.diagonal().mean().item(),
        "agree_others": 100 * a[off].mean().item(),
        "targets_agree": 100 * between[off].mean().item(),
        "closest_target": closest(a),
        "closest_input": closest(agreement_matrix(gen, fp)),
        "target_closest_input": closest(agreement_matrix(target, fp)),
    }


def agreement_rows(
    exp: Experiment, setting: Setting, method: str = "gen", splits: tuple[str, ...] | None = None
) -> list[dict]:
    """One row per (spec, split) of a generator's setting: `summary` of its predictions against
    its targets' on the split's checkpoints (the ones `evaluate` scores); every reported split, or
    `splits`."""
    rows = []
    for split, ckpts in exp.collected.splits(
        setting.arch, setting.task, SPLITS if splits is None else splits
    ).items():
        ckpts = evenly_spaced(ckpts, exp.profile.eval.per_split)
        for spec in setting.specs:
            gen, tgt, fp = (
                [exp.scorer.predictions(exp.model_file(setting, spec, c, m))[0] for c in ckpts]
                for m in (method, TARGET_METHOD[setting.source], "fp")
            )
            rows.append(
                {
                    "split": split,
                    "arch": setting.arch,
                    "task": setting.task,
                    "bits": spec.bits,
                    "granularity": spec.granularity,
                    "source": setting.source,
                    "variant": setting.label or methods.get(method).variant,
                    **summary(gen, tgt, fp),
                }
            )
    return rows


def agreement(exp: Experiment, settings: list[Setting], method: str = "gen") -> pd.DataFrame:
    """`agreement_rows` of every setting, as one frame (`qg.tables.following` merges it)."""
    return pd.DataFrame([r for s in settings for r in agreement_rows(exp, s, method)])
