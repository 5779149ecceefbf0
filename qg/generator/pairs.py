"""The generator's training set: token pairs (fp tokens in, target tokens out) with their bases,
conditions, loss weights and dead zones, built from checkpoints and their targets, saved and loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.io import read_safetensors, save_safetensors
from ..quant.quantizer import QuantSpec
from .loss import loss_tolerance, loss_weights
from .tokenizer import Tokenizer


@dataclass
class TokenPairs:
    """Training pairs: fp tokens `x` (one row per fp checkpoint), target tokens `y`, the base tokens
    the head's skip starts from (`base`, one row per target: `Tokenizer.base_tokens`), which fp row
    each target comes from (`src`), its condition index (`cond`), the loss weights of each condition
    (`masks`: 0 on padding; see `loss.loss_weights`) and, for the residual target, each target's
    dead zone (`tolerance`: `loss.loss_tolerance`; None for the paper's plain MSE)."""

    x: torch.Tensor
    y: torch.Tensor
    base: torch.Tensor
    src: torch.Tensor
    cond: torch.Tensor
    masks: torch.Tensor
    conditions: list[str]
    loss_weighting: str = "element"
    tolerance: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        fp_checkpoints: list[dict],
        quantized: dict[QuantSpec, list[dict]],
        conditional: bool = False,
        loss_weighting: str = "element",
        layer_costs: dict[QuantSpec, dict[str, float]] | None = None,
    ) -> "TokenPairs":
        """Encode aligned (fp checkpoint, quantized checkpoint) pairs for every spec in
        `quantized`; `layer_costs` (per spec, per layer) are the `cost` weighting's
        (`loss.loss_weights`)."""
        specs = list(quantized)
        if len(specs) > 1 and not conditional:
            raise ValueError(
                "several specs need a conditional generator (conditional=True), "
                "or one generator each"
            )
        x = torch.stack([tokenizer.encode_fp(sd) for sd in fp_checkpoints])
        ys, bases, tols, src, cond = [], [], [], [], []
        for c, spec in enumerate(specs):
            if len(quantized[spec]) != len(fp_checkpoints):
                raise ValueError(
                    f"{spec.name}: {len(quantized[spec])} quantized checkpoints for "
                    f"{len(fp_checkpoints)} fp ones; they must be aligned pairs"
                )
            for i, (sd, qsd) in enumerate(zip(fp_checkpoints, quantized[spec])):
                ys.append(tokenizer.encode_quantized(qsd, spec, sd))
                bases.append(tokenizer.base_tokens(sd, spec))
                tols.append(loss_tolerance(tokenizer, ys[-1], spec, bases[-1]))
                src.append(i)
                cond.append(c)
        costs = layer_costs or {}
        masks = torch.stack(
            [loss_weights(tokenizer, s, loss_weighting, costs.get(s)) for s in specs]
        )
        names = [s.name for s in specs] if conditional else []
        return cls(
            x,
            torch.stack(ys),
            torch.stack(bases),
            torch.tensor(src),
            torch.tensor(cond),
            masks,
            names,
            loss_weighting,
            None if tols[0] is None else torch.stack(tols),
        )

    def __len__(self) -> int:
        return len(self.y)

    def batch(
        self, idx: torch.Tensor, conditions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """The `Generator.forward` arguments for sample indices `idx`: fp tokens, target tokens,
        condition vector (row `cond` of `conditions`, `Generator.condition_matrix`; None if
        unconditional), loss weights, base tokens and dead zone (or None)."""
        onehot = None if conditions is None else conditions[self.cond[idx]]
        return {
            "tokens": self.x[self.src[idx]],
            "target": self.y[idx],
            "onehot": onehot,
            "mask": self.masks[self.cond[idx]],
            "base": self.base[idx],
            "tolerance": None if self.tolerance is None else self.tolerance[idx],
        }

    def save(self, path) -> None:
        tensors = {
            "x": self.x,
            "y": self.y,
            "base": self.base,
            "src": self.src,
            "cond": self.cond,
            "masks": self.masks,
        }
        if self.tolerance is not None:
            tensors["tolerance"] = self.tolerance
        save_safetensors(
            tensors,
            path,
            {"conditions": ",".join(self.conditions), "loss_weighting": self.loss_weighting},
        )

    @classmethod
    def load(cls, path) -> "TokenPairs":
        t, meta = read_safetensors(path)
        if "base" not in t:
            raise ValueError(
                f"{path} was written before training pairs carried base tokens; rebuild it with "
                "TokenPairs.build(...).save(path)"
            )
        names = meta.get("conditions", "")
        return cls(
            t["x"],
            t["y"],
            t["base"],
            t["src"],
            t["cond"],
            t["masks"],
            names.split(",") if names else [],
            meta.get("loss_weighting", "element"),
            t.get("tolerance"),
        )
