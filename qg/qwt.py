"""QwT, Quantization without Tears (Fu et al., CVPR 2025): a closed-form linear compensation per block.

After any quantization, block i of the quantized network computes l_i^Z(x^Z) + c_i(x^Z) with c_i(x) = W x + b
applied to each token. With X^Z the block's inputs in the quantized network (earlier compensations already in
place) on a few calibration images, Y = l_i(X^Z) the full-precision block's outputs and Y^Z = l_i^Z(X^Z) the
quantized block's, W and b are the least-squares fit of the residual Y - Y^Z (the paper's Eq. 6, the bias
absorbed by a row of ones):

    [W b] = (Y - Y^Z) [X^Z; 1]^T ([X^Z; 1] [X^Z; 1]^T)^-1.

The normal equations are accumulated over batches in float64 (memory independent of the number of tokens) and
solved once; a ridge term is added only when the system is singular (reported). W and b are stored in float16
(as the paper); a block whose fit, with the float16 values, has R^2 <= 0 on the calibration tokens gets no
compensation, so QwT never makes a block's output worse on the calibration set. It needs no back-propagation
and no hyperparameter beyond the number of calibration images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PREFIX = "qwt.blocks"  # file tensors: qwt.blocks.<i>.weight / .bias (float16)


class Compensated(nn.Module):
    """A block plus its QwT compensation: block(x) + x W^T + b over the last (feature) dimension."""

    def __init__(self, block: nn.Module, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.block = block
        self.compensation = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.compensation.weight.copy_(weight.float())
            self.compensation.bias.copy_(bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.compensation(x)


@dataclass
class BlockFit:
    """One block's fit: its float16 weight and bias (zero when gated off), R^2 on the calibration tokens, and
    whether the normal equations needed a ridge term."""

    weight: torch.Tensor
    bias: torch.Tensor
    r2: float
    ridge: bool
    tokens: int

    @property
    def applied(self) -> bool:
        return self.r2 > 0


def solve(xtx: torch.Tensor, xty: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The least-squares coefficients from the normal equations (float64), with a small ridge only if singular."""
    try:
        return torch.linalg.solve(xtx, xty), False
    except torch.linalg.LinAlgError:
        eye = torch.eye(len(xtx), dtype=xtx.dtype)
        return torch.linalg.solve(xtx + 1e-8 * xtx.diagonal().mean().clamp_min(1e-12) * eye, xty), True


def fit_block(inputs: list[torch.Tensor], fp_block: nn.Module, q_block: nn.Module) -> BlockFit:
    """Fit one block's compensation on its quantized-network inputs (a list of (batch, tokens, dim) tensors)."""
    dim = inputs[0].shape[-1]
    xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)  # sum of [x 1]^T [x 1]
    xty = torch.zeros(dim + 1, dim, dtype=torch.float64)  # sum of [x 1]^T d, d = y - y^Z
    d_sum, d_sq, n = torch.zeros(dim, dtype=torch.float64), 0.0, 0
    with torch.no_grad():
        for x in inputs:
            d = (fp_block(x) - q_block(x)).reshape(-1, dim).double()
            xo = _with_ones(x.reshape(-1, dim).double())
            xtx += xo.T @ xo
            xty += xo.T @ d
            d_sum, d_sq, n = d_sum + d.sum(0), d_sq + float(d.pow(2).sum()), n + len(d)
    coef, ridge = solve(xtx, xty)
    stored = coef.T.to(torch.float16)  # (dim, dim + 1) = [W b], as the file holds it
    c = stored.double().T
    residual = d_sq - 2 * float((c * xty).sum()) + float((c * (xtx @ c)).sum())  # sum |d - [x 1] c|^2
    total = d_sq - float(d_sum.pow(2).sum()) / n
    r2 = 1 - residual / total if total > 0 else 0.0
    weight, bias = stored[:, :dim], stored[:, dim]
    if r2 <= 0:
        weight, bias = torch.zeros_like(weight), torch.zeros_like(bias)
    return BlockFit(weight, bias, r2, ridge, n)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def _block_inputs(model: nn.Module, index: int, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs block `index` of `model` receives for each batch of images."""
    seen = []
    hook = model.blocks[index].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        hook.remove()
    return seen


def compensate(fp_model: nn.Module, q_model: nn.Module, images: list[torch.Tensor]) -> list[BlockFit]:
    """QwT on `q_model` in place, block by block in order (each fit sees the earlier compensations): returns
    every block's fit. `images` are batches of calibration images from the task's training split."""
    fp_model.eval(), q_model.eval()
    fits = []
    for i in range(len(q_model.blocks)):
        block = q_model.blocks[i]
        fit = fit_block(_block_inputs(q_model, i, images), fp_model.blocks[i], block)
        if fit.applied:
            q_model.blocks[i] = Compensated(block, fit.weight, fit.bias)
        fits.append(fit)
    return fits


def tensors(fits: list[BlockFit]) -> dict[str, torch.Tensor]:
    """The file tensors of the applied compensations (float16)."""
    out = {}
    for i, fit in enumerate(fits):
        if fit.applied:
            out[f"{PREFIX}.{i}.weight"], out[f"{PREFIX}.{i}.bias"] = fit.weight, fit.bias
    return out


def split(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's own tensors, the QwT tensors) of a state_dict read from a file."""
    own = {k: v for k, v in state_dict.items() if not k.startswith(PREFIX + ".")}
    return own, {k: v for k, v in state_dict.items() if k.startswith(PREFIX + ".")}


def attach(model: nn.Module, qwt: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the compensated model from a file's QwT tensors (none: the model unchanged)."""
    blocks = sorted({int(k.split(".")[2]) for k in qwt})
    for i in blocks:
        if i >= len(model.blocks):
            raise ValueError(f"the file compensates block {i}, but the model has {len(model.blocks)} blocks")
        model.blocks[i] = Compensated(model.blocks[i], qwt[f"{PREFIX}.{i}.weight"], qwt[f"{PREFIX}.{i}.bias"])
    return model
