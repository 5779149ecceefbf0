"""What a one-step code error costs, layer by layer: the weights of `loss_weighting: cost`.

A code error of d steps in a weight of layer l moves that weight by d S (S: its group's scale), and
raises the task's loss by about 1/2 F d^2 S^2 to second order, F the diagonal of the loss's Fisher
information at that weight (the gradient's mean square over the data; the Hessian's usual
stand-in, as in HAWQ). Per layer, with F and S^2 averaged over its weights and groups:

    cost_l = 1/2 mean(F_l) mean(S_l^2)        (loss per squared code step, per weight)

The generator's plain MSE weighs every code alike, so most of its error budget goes to the large
layers; `qg.generator.loss.loss_weights` turns these costs into weights that follow what an error
does to the network instead. Costs are measured on the generator's own training checkpoints and
their task's training images: training data, as QAT's targets already need; the trained generator
still quantizes from weights alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant.quantizer import QuantSpec, is_quantized_weight, quant_params
from ..targets.data import batches
from ..targets.models import build_model, load_checkpoint, load_weights

IMAGES = 512  # training images per checkpoint
BATCH = 16  # the Fisher of mini-batch gradients: small batches, so per-image noise is kept
CHECKPOINTS = 8  # at most this many of the training checkpoints, evenly spaced


def fisher_diagonal(model: torch.nn.Module, loader) -> dict[str, torch.Tensor]:
    """The mean square of the cross-entropy's gradient at every parameter, over `loader`'s
    batches (the empirical Fisher's diagonal)."""
    model.eval()
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    n = 0
    for images, labels in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        for k, p in params.items():
            if p.grad is not None:
                total[k] += p.grad.pow(2)
        n += 1
    if not n:
        raise ValueError("the Fisher needs at least one batch of images; the loader was empty")
    return {k: v / n for k, v in total.items()}


def layer_cost(
    checkpoints: list[Path], spec: QuantSpec, seed: int, images: int = IMAGES
) -> dict[str, float]:
    """cost_l (module docstring) of every quantized weight, averaged over up to `CHECKPOINTS` of
    `checkpoints` (evenly spaced); each checkpoint's images are `images` of its own task's training
    split, drawn by `seed`."""
    if not checkpoints:
        raise ValueError("layer costs need at least one checkpoint")
    step = max(1, -(-len(checkpoints) // CHECKPOINTS))
    chosen = checkpoints[::step]
    total: dict[str, float] = {}
    for path in chosen:
        sd, model_spec, _ = load_checkpoint(path)
        model = load_weights(build_model(model_spec), sd, str(path))
        loader = batches(
            model_spec.dataset,
            "train",
            model_spec.img_size,
            BATCH,
            subset=images,
            seed=seed,
            norm=model_spec.norm,
        )
        fisher = fisher_diagonal(model, loader)
        for name, w in sd.items():
            if is_quantized_weight(name, w):
                scale = quant_params(w.float(), spec)[0]
                cost = 0.5 * fisher[name].mean() * scale.pow(2).mean()
                total[name] = total.get(name, 0.0) + float(cost) / len(chosen)
    return total
