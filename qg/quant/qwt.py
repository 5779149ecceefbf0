"""QwT, Quantization without Tears (Fu et al., CVPR 2025): a closed-form linear compensation per
block.

After any quantization, block i of the quantized network computes l_i^Z(x^Z) + c_i(x^Z) with
c_i(x) = W x + b applied to each token. With X^Z the block's inputs in the quantized network
(earlier compensations already in place) on a few calibration images, Y = l_i(X^Z) the
full-precision block's outputs and Y^Z = l_i^Z(X^Z) the quantized block's, W and b are the
least-squares fit of the residual Y - Y^Z (the paper's Eq. 6, the bias absorbed by a row of ones):

    [W b] = (Y - Y^Z) [X^Z; 1]^T ([X^Z; 1] [X^Z; 1]^T)^-1.

The normal equations are accumulated over batches in float64 (memory independent of the number of
tokens) and solved once; a ridge term is added only when they are singular (reported). W and b are
stored in float16, as in the paper; a block whose fit has R^2 <= 0 on the calibration tokens gets no
compensation, so QwT never makes a block's output worse there. R^2 is that of the float16
coefficients actually stored (the paper's code gates on the unrounded fit: ours is the stricter
test). No back-propagation, no hyperparameter beyond the number of calibration images. The blocks
are timm's `model.blocks` (an nn.Sequential of token-wise blocks: ViT, Mixer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.io import CorruptFileError

PREFIX = "qwt.blocks"  # file tensors: qwt.blocks.<i>.weight / .bias (float16)
# calibration images (the paper's number) and their batch size, when not given
IMAGES, BATCH_SIZE = 512, 128


class Compensated(nn.Module):
    """A block plus its QwT compensation: block(x) + x W^T + b over the last (feature) dimension. W
    and b are kept in float16, as stored, and cast to the input's dtype per call."""

    def __init__(self, block: nn.Module, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.block = block
        self.register_buffer("weight", weight.to(torch.float16))
        self.register_buffer("bias", bias.to(torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


@dataclass
class BlockFit:
    """One block's fit: its float16 weight and bias (zero when gated off), R^2 on the calibration
    tokens, whether the normal equations needed a ridge term, and how many tokens (rows) it was
    fitted on."""

    weight: torch.Tensor
    bias: torch.Tensor
    r2: float
    ridge: bool
    tokens: int

    @property
    def applied(self) -> bool:
        return self.r2 > 0  # False for a NaN R^2 (float16 overflow) too


def solve(xtx: torch.Tensor, xty: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Least-squares coefficients from the normal equations (float64, positive semi-definite), by
    Cholesky; a ridge of 1e-8 x the mean diagonal only when the factorisation fails (a singular
    system)."""
    chol, info = torch.linalg.cholesky_ex(xtx)
    if info == 0:
        return torch.cholesky_solve(xty, chol), False
    eye = torch.eye(len(xtx), dtype=xtx.dtype, device=xtx.device)
    chol = torch.linalg.cholesky(xtx + 1e-8 * xtx.diagonal().mean().clamp_min(1e-12) * eye)
    return torch.cholesky_solve(xty, chol), True


def r_squared(
    coef: torch.Tensor,
    xtx: torch.Tensor,
    xty: torch.Tensor,
    d_sq: float,
    d_sum: torch.Tensor,
    n: int,
) -> float:
    """R^2 of the fit d ~ [x 1] coef over all output dimensions, from the accumulated sums alone:
    residual = sum|d|^2 - 2 tr(coef^T X^T D) + tr(coef^T X^T X coef),
    total = sum|d|^2 - n |mean d|^2."""
    residual = d_sq - 2 * float((coef * xty).sum()) + float((coef * (xtx @ coef)).sum())
    total = d_sq - float(d_sum.pow(2).sum()) / n
    return 1 - residual / total if total > 0 else 0.0


def fit_block(inputs: list[torch.Tensor], fp_block: nn.Module, q_block: nn.Module) -> BlockFit:
    """Fit one block's compensation on its quantized-network inputs (a list of
    (batch, tokens, dim) tensors)."""
    dim, device = inputs[0].shape[-1], inputs[0].device
    xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)  # sum of [x 1]^T [x 1]
    # sum of [x 1]^T d, d = y - y^Z
    xty = torch.zeros(dim + 1, dim, dtype=torch.float64, device=device)
    d_sum, d_sq, n = torch.zeros(dim, dtype=torch.float64, device=device), 0.0, 0
    with torch.no_grad():
        for x in inputs:
            d = (fp_block(x) - q_block(x)).reshape(-1, dim).double()
            xo = x.reshape(-1, dim).double()
            xo = torch.cat([xo, torch.ones(len(xo), 1, dtype=xo.dtype, device=device)], 1)
            xtx += xo.T @ xo
            xty += xo.T @ d
            d_sum, d_sq, n = d_sum + d.sum(0), d_sq + float(d.pow(2).sum()), n + len(d)
    coef, ridge = solve(xtx, xty)
    stored = coef.T.to(torch.float16)  # (dim, dim + 1) = [W b], as the file holds it
    fit = BlockFit(
        stored[:, :dim].cpu(),
        stored[:, dim].cpu(),
        r_squared(stored.double().T, xtx, xty, d_sq, d_sum, n),
        ridge,
        n,
    )
    if not fit.applied:
        fit.weight, fit.bias = torch.zeros_like(fit.weight), torch.zeros_like(fit.bias)
    return fit


def _first_block_inputs(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """What block 0 of `model` receives for each batch of images (the embeddings)."""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        hook.remove()
    return seen


def compensate(
    fp_model: nn.Module, q_model: nn.Module, images: list[torch.Tensor]
) -> list[BlockFit]:
    """QwT on `q_model` in place, block by block in order, each fit on the inputs the block receives
    with the earlier compensations in place (block i's inputs are block i-1's compensated outputs:
    `blocks` is sequential). Returns every block's fit. `images` are batches of calibration images
    (training split)."""
    fp_model.eval()
    q_model.eval()
    inputs, fits = _first_block_inputs(q_model, images), []
    for i in range(len(q_model.blocks)):
        block = q_model.blocks[i]
        fit = fit_block(inputs, fp_model.blocks[i], block)
        if fit.applied:
            q_model.blocks[i] = Compensated(
                block, fit.weight.to(inputs[0].device), fit.bias.to(inputs[0].device)
            )
        with torch.no_grad():
            inputs = [q_model.blocks[i](x) for x in inputs]
        fits.append(fit)
    return fits


def tensors(fits: list[BlockFit]) -> dict[str, torch.Tensor]:
    """The file tensors of the applied compensations (float16)."""
    out = {}
    for i, fit in enumerate(fits):
        if fit.applied:
            out[f"{PREFIX}.{i}.weight"], out[f"{PREFIX}.{i}.bias"] = fit.weight, fit.bias
    return out


def split(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's own tensors, the QwT tensors) of a state_dict read from a file."""
    own = {k: v for k, v in state_dict.items() if not k.startswith(PREFIX + ".")}
    return own, {k: v for k, v in state_dict.items() if k.startswith(PREFIX + ".")}


def attach(model: nn.Module, qwt: dict[str, torch.Tensor], source: str = "the file") -> nn.Module:
    """Rebuild the compensated model from a file's QwT tensors (none: the model unchanged), refusing
    tensors that do not fit the model's blocks."""
    blocks = {}
    for key, t in qwt.items():
        index, _, part = key.removeprefix(PREFIX + ".").partition(".")
        if not index.isdigit() or part not in ("weight", "bias"):
            raise CorruptFileError(
                f"{source}: unexpected QwT tensor {key!r} (expected {PREFIX}.<block>.weight/.bias)"
            )
        blocks.setdefault(int(index), {})[part] = t
    for i, parts in sorted(blocks.items()):
        dim = model.num_features  # timm's token width (ViT, Mixer)
        ok = (
            i < len(model.blocks)
            and parts.keys() == {"weight", "bias"}
            and parts["weight"].shape == (dim, dim)
            and parts["bias"].shape == (dim,)
            and all(bool(torch.isfinite(t).all()) for t in parts.values())
        )
        if not ok:
            shapes = {k: tuple(v.shape) for k, v in parts.items()}
            raise CorruptFileError(
                f"{source}: the QwT compensation of block {i} {shapes} does not fit a model of "
                f"{len(model.blocks)} blocks of width {dim}, or is not finite; the file is damaged "
                "or was made for another model"
            )
        model.blocks[i] = Compensated(model.blocks[i], parts["weight"], parts["bias"])
    return model
