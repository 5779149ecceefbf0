"""Which token holds what: the layout of a checkpoint's quantizable layers as fixed-width tokens (a
segment per layer and kind: weights, S, Z), and the 2D sinusoidal position embedding of its tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant.quantizer import (
    QTensor,
    QuantSpec,
    is_quantized_weight,
)

KINDS = ("weight", "scale", "zero")


@dataclass(frozen=True)
class Segment:
    """A run of tokens holding one kind of value of one layer."""

    layer: str
    layer_index: int
    kind: str  # "weight", "scale" or "zero"
    start: int  # index of the first token in the sequence
    n_tokens: int
    offset: int  # index of the first token within its layer (position embedding)


class Layout:
    """Which token holds what, for a list of quantized weight shapes, token size and specs."""

    def __init__(
        self, shapes: list[tuple[str, tuple[int, ...]]], specs: list[QuantSpec], token_size: int
    ):
        if token_size < 1:
            raise ValueError(f"token_size must be positive, got {token_size}")
        if not shapes:
            raise ValueError(
                "no quantizable weights: the checkpoint has no `*.weight` tensor with 2+ dims"
            )
        if not specs:
            raise ValueError("a layout needs at least one QuantSpec")
        self.shapes = [(name, tuple(int(s) for s in shape)) for name, shape in shapes]
        self.specs = list(specs)
        self.token_size = token_size
        self.segments: list[Segment] = []
        start = 0
        for li, (name, shape) in enumerate(self.shapes):
            offset = 0
            n_params = max(math.prod(spec.param_shape(shape)) for spec in self.specs)
            for kind, numel in (
                ("weight", math.prod(shape)),
                ("scale", n_params),
                ("zero", n_params),
            ):
                n = math.ceil(numel / token_size)
                self.segments.append(Segment(name, li, kind, start, n, offset))
                start += n
                offset += n
        self.n_tokens = start

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], specs: list[QuantSpec], token_size: int
    ) -> "Layout":
        shapes = [(k, tuple(v.shape)) for k, v in sd.items() if is_quantized_weight(k, v)]
        return cls(shapes, specs, token_size)

    def numel(self, seg: Segment, spec: QuantSpec) -> int:
        """How many real values `seg` holds under `spec` (the rest of its tokens is padding)."""
        shape = self.shapes[seg.layer_index][1]
        return math.prod(shape) if seg.kind == "weight" else math.prod(spec.param_shape(shape))

    def positions(self) -> torch.Tensor:
        """(n_tokens, 2) long tensor of (layer index, token index within layer)."""
        pos = torch.empty(self.n_tokens, 2, dtype=torch.long)
        for seg in self.segments:
            pos[seg.start : seg.start + seg.n_tokens, 0] = seg.layer_index
            pos[seg.start : seg.start + seg.n_tokens, 1] = torch.arange(
                seg.offset, seg.offset + seg.n_tokens
            )
        return pos

    def value_mask(self, spec: QuantSpec, side: str = "quantized") -> torch.Tensor:
        """(n_tokens, token_size) bool: True where a real value sits (False = padding).

        On the `"fp"` side only weights are real; on the `"quantized"` side S and Z are real too.
        """
        mask = torch.zeros(self.n_tokens * self.token_size, dtype=torch.bool)
        for seg in self.segments:
            if side == "fp" and seg.kind != "weight":
                continue
            begin = seg.start * self.token_size
            mask[begin : begin + self.numel(seg, spec)] = True
        return mask.view(self.n_tokens, self.token_size)

    def check(self, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
        """Raise a clear error if `sd`'s quantizable weights are not the ones this layout was built
        for."""
        got = [
            (k, tuple(v.shape))
            for k, v in sd.items()
            if isinstance(v, QTensor) or is_quantized_weight(k, v)
        ]
        want, have = dict(self.shapes), dict(got)
        if want != have:  # by name: files (safetensors) and models list tensors in different orders
            diff = [
                f"{k}: {have.get(k)} vs expected {want.get(k)}"
                for k in {**want, **have}
                if want.get(k) != have.get(k)
            ]
            raise ValueError(
                f"{what} does not match the tokenizer layout ({len(diff)} layers differ, e.g. "
                f"{'; '.join(diff[:3])}). It was built for another architecture: train a generator "
                "on checkpoints of this model, or pass a checkpoint of the model the generator was "
                "trained on."
            )

    def to_dict(self) -> dict:
        return {
            "shapes": [[n, list(s)] for n, s in self.shapes],
            "specs": [s.to_dict() for s in self.specs],
            "token_size": self.token_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(
            [(n, tuple(s)) for n, s in d["shapes"]],
            [QuantSpec.from_dict(s) for s in d["specs"]],
            d["token_size"],
        )


def sinusoidal_2d(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Transformer sin/cos embedding of (layer index, token index): each index takes half of
    `dim`."""
    half = dim // 2
    out = torch.zeros(positions.shape[0], dim)
    for axis, begin in ((0, 0), (1, half)):
        n_freq = half // 2
        freqs = base ** (-torch.arange(n_freq, dtype=torch.float32) / max(n_freq, 1))
        angles = positions[:, axis, None].float() * freqs
        out[:, begin : begin + n_freq] = torch.sin(angles)
        out[:, begin + n_freq : begin + 2 * n_freq] = torch.cos(angles)
    return out
