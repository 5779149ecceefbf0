"""The QuantGen generator: full-precision tokens in, quantized tokens out, in one forward pass.

    input  = fp tokens + 2D sinusoidal position embedding + Linear(one-hot condition)
             (zero if unconditional)
    body   = n_layers pre-norm residual blocks around a sequence mixer: Mamba-2 (the paper's), LSTM
             or causal self-attention (the Table 10 ablation), as in mamba_ssm's MixerModel
    head   = final norm + Linear back to the token width, trained with MSE on the target tokens (the
             paper's), or RPG's diffusion head conditioned on the body's output (the Table 5
             ablation)
    skip   = ours, optional: the MSE head's output is taken relative to the tokenizer's base
             tokens b (`Tokenizer.base_tokens`, zero where no weight sits):
                 `add`   y = Linear(h) + b
                 `gain`  y = Linear(h) + b * (1 + Linear'(h))   (Linear' starts at zero)
             With the direct target b is the fp weight tokens: a normalised code is the normalised
             weight times a factor of its group (1 / S, up to the layer's statistics), so `gain`
             lets the body predict that factor instead of rebuilding every code value; `none` is the
             paper's head.
             With the tokenizer's `base: rtn`, b is RTN of the input as target tokens (codes before
             rounding, S, Z) and `add` starts from it: the factor of each group is given, not
             inferred.
    target = `direct` (the paper's) or `residual` (ours, `qg.generator.tokenizer`): the output is
             each code's offset from round-to-nearest, b the rounding remainder, and the output
             layer starts at zero, so an untrained generator decodes to RTN (PTQ) exactly and learns
             only where to depart from it.
    RPG mode (`fp_input: false`, `qg.generator.rpg`): no fp tokens in; the body reads the position
             (and condition) embeddings only and the diffusion head samples whole full-precision
             models, as RPG does.
             A condition is then a class name (one-hot, `conditions`) or, with `cond_bits`, any
             string of that many 0/1 characters (RPG Sec. 4's task embedding, which reaches tasks
             never trained on).

d_model defaults to the token size as in RPG; a narrower width adds input/output projections.
A trained generator lives in a directory: `generator.safetensors` (weights), `generator.json`
(config, conditions, training record) and the tokenizer's files, so the directory alone quantizes
new checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .diffusion import DiffusionHead
from .layout import sinusoidal_2d
from .mamba2 import Mamba2
from .target_values import TARGETS
from .tokenizer import Tokenizer

HEADS = ("mse", "diffusion")
SKIPS = ("none", "add", "gain")


@dataclass
class GeneratorConfig:
    """Architecture of a generator. `conditions` names the one-hot classes
    (empty = unconditional)."""

    token_size: int
    n_tokens: int
    d_model: int | None = None
    n_layers: int = 2
    backbone: str = "mamba2"
    conditions: list[str] = field(default_factory=list)
    # Mamba-2 (RPG's values; headdim must divide expand * d_model)
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    chunk_size: int = 64
    # Transformer
    n_heads: int = 4
    # Head
    head: str = "mse"
    diffusion: dict = field(default_factory=dict)  # DiffusionHead kwargs, e.g. {"n_steps": 1000}
    # "none" (the paper's head), "add" or "gain": the output relative to the input (ours)
    skip: str = "none"
    # the tokenizer's: "direct" (the paper's) or "residual" (offsets from RTN, ours)
    target: str = "direct"
    fp_input: bool = True  # False: RPG mode, no full-precision tokens in (`qg.generator.rpg`)
    # > 0: a condition is a string of this many 0/1 characters, its vector those bits
    cond_bits: int = 0

    def __post_init__(self):
        if self.backbone not in MIXERS:
            raise ValueError(f"backbone must be one of {list(MIXERS)}, got {self.backbone!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.d_model is None:
            self.d_model = self.token_size
        if self.skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {self.skip!r}")
        if self.skip != "none" and self.head != "mse":
            raise ValueError(
                f"skip={self.skip!r} relates the MSE head's output to its input; the diffusion "
                "head has none: set skip: none beside head: diffusion"
            )
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "residual" and self.head != "mse":
            raise ValueError(
                "the residual target starts from RTN through a zeroed MSE head; the diffusion head "
                "samples from noise: use head: mse with target: residual"
            )
        if not self.fp_input and self.head != "diffusion":
            raise ValueError(
                "without fp input (RPG mode) an MSE head would return one model for every sample: "
                "set head: diffusion beside fp_input: false"
            )
        if self.cond_bits < 0:
            raise ValueError(f"cond_bits must be >= 0, got {self.cond_bits}")
        bad = [c for c in self.conditions if self.cond_bits and not _is_bits(c, self.cond_bits)]
        if bad:
            raise ValueError(
                f"with cond_bits={self.cond_bits} every condition is a string of {self.cond_bits} "
                f"0/1 characters; got {bad[:3]}"
            )

    @property
    def cond_width(self) -> int:
        """Width of the condition vector: the bits of a bit-string condition, or one per condition
        class."""
        return self.cond_bits or len(self.conditions)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_bits(condition: str, n: int) -> bool:
    return isinstance(condition, str) and len(condition) == n and set(condition) <= {"0", "1"}


class LSTMMixer(nn.LSTM):
    """A one-layer LSTM over the token sequence, as a mixer: (b, l, d) -> (b, l, d)."""

    def __init__(self, d_model: int):
        super().__init__(d_model, d_model, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]  # the outputs, not the final (h, c)


class CausalSelfAttention(nn.MultiheadAttention):
    """Multi-head self-attention in which token t sees tokens <= t, as a mixer:
    (b, l, d) -> (b, l, d)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__(d_model, n_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(
            x.shape[1], device=x.device, dtype=x.dtype
        )
        return super().forward(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)[0]


MIXERS = {  # backbone -> its sequence mixer; every one maps (b, l, d_model) -> (b, l, d_model)
    "mamba2": lambda cfg: Mamba2(
        cfg.d_model,
        d_state=cfg.d_state,
        d_conv=cfg.d_conv,
        expand=cfg.expand,
        headdim=cfg.headdim,
        chunk_size=cfg.chunk_size,
    ),
    "lstm": lambda cfg: LSTMMixer(cfg.d_model),
    "transformer": lambda cfg: CausalSelfAttention(cfg.d_model, cfg.n_heads),
}


class Block(nn.Module):
    """Pre-norm residual block around one sequence mixer."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.mixer = MIXERS[cfg.backbone](cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class Generator(nn.Module):
    """Maps (batch, n_tokens, token_size) fp tokens to predicted quantized tokens of the same
    shape."""

    def __init__(self, cfg: GeneratorConfig, positions: torch.Tensor):
        super().__init__()
        if positions.shape != (cfg.n_tokens, 2):
            raise ValueError(
                f"positions must be ({cfg.n_tokens}, 2) for this config, "
                f"got {tuple(positions.shape)}"
            )
        self.cfg = cfg
        # training memory, not architecture (`TrainConfig.recompute` sets it): the same outputs and
        # gradients whether the blocks' activations are kept or recomputed
        self.recompute = False
        self.register_buffer("pos_emb", sinusoidal_2d(positions, cfg.token_size), persistent=False)
        self.cond_proj = (
            nn.Linear(cfg.cond_width, cfg.token_size, bias=False) if cfg.cond_width else None
        )
        narrow = cfg.d_model != cfg.token_size
        self.proj_in = nn.Linear(cfg.token_size, cfg.d_model) if narrow else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model)
        if cfg.head == "mse":
            self.proj_out = nn.Linear(cfg.d_model, cfg.token_size)
            if cfg.target == "residual":  # offsets start at zero: the untrained generator is RTN
                nn.init.zeros_(self.proj_out.weight)
                nn.init.zeros_(self.proj_out.bias)
            if cfg.skip == "gain":
                self.proj_gain = nn.Linear(cfg.d_model, cfg.token_size)
                nn.init.zeros_(self.proj_gain.weight)
                nn.init.zeros_(self.proj_gain.bias)
        else:
            self.diffusion = DiffusionHead(cfg.token_size, cfg.d_model, **cfg.diffusion)

    @classmethod
    def for_tokenizer(cls, cfg: GeneratorConfig, tokenizer: Tokenizer) -> "Generator":
        """A generator laid out for `tokenizer`'s sequences, refused if their targets differ. With
        the tokenizer's `base: rtn` the output layer starts at zero, so the untrained generator
        decodes to RTN."""
        if cfg.target != tokenizer.target:
            raise ValueError(
                f"the generator is configured for the {cfg.target!r} target, its tokenizer encodes "
                f"{tokenizer.target!r}: set GeneratorConfig(target=tokenizer.target)"
            )
        if tokenizer.base == "rtn" and cfg.skip != "add":
            raise ValueError(
                f"the tokenizer's base is RTN of the input, which the head adds to: set skip: add "
                f"(got skip: {cfg.skip!r})"
            )
        model = cls(cfg, tokenizer.layout.positions())
        if tokenizer.base == "rtn":
            nn.init.zeros_(model.proj_out.weight)
            nn.init.zeros_(model.proj_out.bias)
        return model

    def condition_vector(self, condition: str | None, batch: int = 1) -> torch.Tensor | None:
        """The condition's row, repeated `batch` times: one-hot for a condition name, the bits of a
        bit-string condition (`cond_bits`; seen in training or not); None for an unconditional
        generator."""
        if not self.cfg.cond_width:
            if condition is not None:
                raise ValueError(f"this generator is unconditional; got condition {condition!r}")
            return None
        if self.cfg.cond_bits:
            if not _is_bits(condition, self.cfg.cond_bits):
                raise ValueError(
                    f"this generator's conditions are strings of {self.cfg.cond_bits} 0/1 "
                    "characters (e.g. "
                    f"{'01' * (self.cfg.cond_bits // 2) + '0' * (self.cfg.cond_bits % 2)!r}), "
                    f"got {condition!r}"
                )
            row = torch.tensor([float(c) for c in condition], device=self.pos_emb.device)
            return row.expand(batch, -1).clone()
        if condition not in self.cfg.conditions:
            raise ValueError(f"condition must be one of {self.cfg.conditions}, got {condition!r}")
        onehot = torch.zeros(batch, len(self.cfg.conditions), device=self.pos_emb.device)
        onehot[:, self.cfg.conditions.index(condition)] = 1
        return onehot

    def condition_matrix(self) -> torch.Tensor | None:
        """(len(conditions), cond_width) rows of the training conditions, in order (None if
        unconditional): what `TokenPairs.batch` indexes with each example's condition."""
        if not self.cfg.conditions:
            return None
        return torch.cat([self.condition_vector(c) for c in self.cfg.conditions]).cpu()

    def features(self, tokens: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """The body's output (batch, n_tokens, d_model) for fp tokens and an optional condition
        vector. In RPG mode (`fp_input` false) the tokens' values are not read, only their batch
        size."""
        if tokens.shape[1:] != (self.cfg.n_tokens, self.cfg.token_size):
            raise ValueError(
                f"expected tokens of shape (batch, {self.cfg.n_tokens}, {self.cfg.token_size}), "
                f"got {tuple(tokens.shape)}: the checkpoint's tokenizer layout differs from the "
                "generator's"
            )
        if self.cond_proj is not None and onehot is None:
            raise ValueError(
                "this generator is conditional "
                f"({self.cfg.conditions or f'{self.cfg.cond_bits} bits'}); pass a condition"
            )
        if not self.cfg.fp_input:  # RPG mode: the body's output depends on the condition alone
            return self._rpg_features(tokens.shape[0], onehot)
        return self._body(tokens + self.pos_emb, onehot)

    def _rpg_features(self, batch: int, onehot: torch.Tensor | None) -> torch.Tensor:
        """RPG mode's body output: one pass per distinct condition (the input is only the position
        embedding), shared by every example that has it."""
        if onehot is None:
            return self._body(self.pos_emb[None], None).expand(batch, -1, -1)
        rows, which = torch.unique(onehot, dim=0, return_inverse=True)
        return self._body(self.pos_emb[None].expand(len(rows), -1, -1), rows)[which]

    def _body(self, x: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        """Condition embedding, sequence blocks and final norm over input x (batch, n_tokens,
        token_size)."""
        if self.cond_proj is not None:
            x = x + self.cond_proj(onehot)[:, None, :]
        x = self.proj_in(x)
        for block in self.blocks:
            # recompute: keep only each block's input, run the block again in the backward pass
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        return self.norm_out(x)

    def forward(
        self,
        tokens,
        target,
        onehot=None,
        mask=None,
        base=None,
        tolerance=None,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training loss: MSE to the target tokens, weighted by `mask` (False or 0 on padding, which
        is excluded), or the diffusion loss. `base`: the tokenizer's base tokens, needed with a
        skip; `tolerance`: a dead zone per position (`loss.loss_tolerance`), inside which an
        error costs nothing.
        (Inference is `generate`; the loss is the forward so DDP can wrap it.)"""
        feats = self.features(tokens, onehot)
        if self.cfg.head == "diffusion":
            return self.diffusion.loss(target, feats, mask=mask, rng=rng)
        err = self.head_out(feats, base) - target
        if tolerance is not None:
            err = torch.relu(err.abs() - tolerance)
        err = err**2
        if mask is None:
            return err.mean()
        mask = mask.to(err.dtype).expand_as(err)
        return (err * mask).sum() / mask.sum().clamp_min(1)

    @torch.no_grad()
    def generate(
        self, tokens, onehot=None, base=None, rng: torch.Generator | None = None
    ) -> torch.Tensor:
        """Predicted quantized tokens: one forward pass (MSE head) or the diffusion head's
        sampler."""
        feats = self.features(tokens, onehot)
        if self.cfg.head == "diffusion":
            return self.diffusion.sample(feats, rng=rng)
        return self.head_out(feats, base)

    def head_out(self, feats: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The MSE head: Linear(features), relative to the base tokens as `skip` says."""
        out = self.proj_out(feats)
        if self.cfg.skip == "none":
            return out
        if base is None or base.shape[1:] != out.shape[1:]:
            raise ValueError(
                f"skip={self.cfg.skip!r} needs the tokenizer's base tokens "
                f"(batch, {self.cfg.n_tokens}, {self.cfg.token_size}) (Tokenizer.base_tokens), got "
                f"{None if base is None else tuple(base.shape)}"
            )
        return out + (base * (1 + self.proj_gain(feats)) if self.cfg.skip == "gain" else base)
