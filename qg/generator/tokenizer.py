"""Checkpoints <-> fixed-width token sequences, the way QuantGen (Sec. 3.1) and RPG describe.

For each quantized layer (in state_dict order) the sequence holds:

    [weight tokens ...] [scale (S) tokens ...] [zero point (Z) tokens ...]

Weights (full-precision values on the input side, integer codes on the target side) are flattened
and normalised per layer with statistics averaged over the training checkpoints, then cut into
tokens of `token_size`. On the target side the S and Z tokens hold the layer's (normalised) scales
and zero points; on the input side they are placeholders ("fictitious S and Z"). Every position that
holds no real value - the tail of a layer's last token, the input side's placeholders - is filled by
the padding mode: `gaussian` (seeded N(0, 1), the paper's default), `zero` or `one`.

What the target side holds (codes or q - Z, S or log S, Z, or their departures from RTN) is
`qg.generator.target_values`.

`base_tokens` is what a generator's head is relative to (`skip`): the fp weight tokens (direct) or,
for residual, the RTN rounding remainders w / S + Z - q_rtn in the code offsets' units, the input a
rounding decision needs and the one thing the body cannot compute for itself (a group's max|w|).
With `base: rtn` (ours, direct target only) the skip adds to RTN of the input written as target
tokens before rounding (w / S_rtn + Z_rtn, S_rtn, Z_rtn in the target's normalisation), which a PTQ
target is within half a step of, instead of the weights (a code up to its group's 1 / S, a max the
body must infer); the MSE gets the residual target's dead zone (`loss.loss_tolerance`), without
which it fits the training checkpoints' rounding and moves new ones' codes (-2.7 points at 3 bits,
ViT head-only). 02_train's convergence study measures what the change buys.

A layout serves one or several quantization specs (a conditional generator covers several): S/Z
segments are sized for the spec with the most groups, and each spec has its own statistics. The
position of a token is (layer index, token index within its layer), embedded by `sinusoidal_2d`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.io import read_json, read_safetensors, save_safetensors, write_json
from ..quant.quantizer import (
    QTensor,
    QuantSpec,
    quantize,
    remainder,
)
from .layout import KINDS, Layout, Segment
from .target_values import CODES, TARGETS, layer_values, quantized_layer

PADDING_MODES = ("gaussian", "zero", "one")
BASES = ("weights", "rtn")


def _mean_std(values: list[torch.Tensor]) -> tuple[float, float]:
    """Per-checkpoint mean and std averaged over checkpoints; a constant feature keeps std 1."""
    means = torch.stack([v.double().mean() for v in values]).mean()
    stds = torch.stack([v.double().std(unbiased=False) for v in values]).mean()
    return float(means), float(stds) if stds > 1e-8 else 1.0


def _rms(values: list[torch.Tensor]) -> tuple[float, float]:
    """(0, root mean square over checkpoints): a residual's scale, with no mean shift so that 0
    stays 0."""
    rms = float(torch.stack([v.double().pow(2).mean() for v in values]).mean().sqrt())
    return 0.0, rms if rms > 1e-8 else 1.0


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _rtn(fp_sd: dict, names: list[str], spec: QuantSpec) -> dict[str, QTensor]:
    """Round-to-nearest of the named layers of a full-precision checkpoint: the residual target's
    origin."""
    return {n: quantize(fp_sd[n].float(), spec) for n in names}


class Tokenizer:
    """Encodes fp checkpoints and quantized checkpoints into token sequences and decodes generated
    tokens."""

    def __init__(
        self,
        layout: Layout,
        fp_stats: torch.Tensor,
        q_stats: dict[str, torch.Tensor],
        padding: str = "gaussian",
        seed: int = 0,
        log_scale: bool = False,
        target: str = "direct",
        base: str = "weights",
        codes: str = "raw",
    ):
        for name, value, choices in (
            ("padding", padding, PADDING_MODES),
            ("target", target, TARGETS),
            ("base", base, BASES),
            ("codes", codes, CODES),
        ):
            _choice(name, value, choices)
        if base == "rtn" and target != "direct":
            raise ValueError(
                "base: rtn is for the direct target; the residual target's base is already "
                "relative to RTN (its rounding remainders): leave base: weights"
            )
        self.layout, self.fp_stats, self.q_stats = layout, fp_stats, q_stats
        self.padding, self.seed, self.log_scale = padding, seed, log_scale
        self.target, self.base, self.codes = target, base, codes
        self._canvas = {
            side: self._fill(self.seed + i) for i, side in enumerate(("fp", "quantized"))
        }

    @classmethod
    def fit(
        cls,
        fp_checkpoints: list[dict],
        quantized: dict[QuantSpec, list[dict]],
        token_size: int,
        padding: str = "gaussian",
        seed: int = 0,
        log_scale: bool = False,
        target: str = "direct",
        base: str = "weights",
        codes: str = "raw",
    ) -> "Tokenizer":
        """Build the layout and fit normalisation statistics on training checkpoints only.

        `quantized` maps each spec the tokenizer serves to quantized state_dicts
        (`quantize_state_dict`), aligned with `fp_checkpoints` (the residual target is taken
        relative to RTN of each one).
        """
        _choice("target", target, TARGETS)
        if not fp_checkpoints:
            raise ValueError("Tokenizer.fit needs at least one full-precision checkpoint")
        layout = Layout.from_state_dict(fp_checkpoints[0], list(quantized), token_size)
        for sd in fp_checkpoints:
            layout.check(sd, "a training checkpoint")
        names = [n for n, _ in layout.shapes]
        fp_stats = torch.tensor([_mean_std([sd[n] for sd in fp_checkpoints]) for n in names])
        q_stats = {}
        for spec, qsds in quantized.items():
            if not qsds:
                raise ValueError(f"no quantized checkpoints for {spec.name}")
            if len(qsds) != len(fp_checkpoints):
                raise ValueError(
                    f"{spec.name}: {len(qsds)} quantized checkpoints for {len(fp_checkpoints)} fp "
                    "ones; they must be aligned pairs"
                )
            rtns = [
                _rtn(sd, names, spec) if target == "residual" else dict.fromkeys(names)
                for sd in fp_checkpoints
            ]
            stat = _rms if target == "residual" else _mean_std
            rows = []
            for n in names:
                parts = [
                    layer_values(q[n], log_scale, r[n], codes == "centered")
                    for q, r in zip(qsds, rtns)
                ]
                rows.append([stat([p[k] for p in parts]) for k in range(len(KINDS))])
            q_stats[spec.name] = torch.tensor(rows)  # (layers, 3 kinds, [mean, std])
        return cls(layout, fp_stats, q_stats, padding, seed, log_scale, target, base, codes)

    @property
    def specs(self) -> list[QuantSpec]:
        return self.layout.specs

    @property
    def shape(self) -> tuple[int, int]:
        """(n_tokens, token_size) of every sequence this tokenizer makes."""
        return self.layout.n_tokens, self.layout.token_size

    def _fill(self, seed: int) -> torch.Tensor:
        shape = (self.layout.n_tokens, self.layout.token_size)
        if self.padding == "gaussian":
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        return torch.full(shape, 0.0 if self.padding == "zero" else 1.0)

    def _spec(self, spec: QuantSpec) -> QuantSpec:
        if spec.name not in self.q_stats:
            raise ValueError(
                f"this tokenizer serves {[s.name for s in self.specs]}, not {spec.name}"
            )
        return spec

    def stats(self, spec: QuantSpec) -> torch.Tensor:
        """(layers, 3 kinds, [mean, std]) of the target side under `spec`: what a target value is
        normalised by."""
        return self.q_stats[self._spec(spec).name]

    def _write(self, side: str, values: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
        """Place flat value vectors at their segments on top of the side's padding canvas."""
        flat = self._canvas[side].clone().view(-1)
        ts = self.layout.token_size
        for seg in self.layout.segments:
            v = values.get((seg.layer_index, seg.kind))
            if v is not None:
                flat[seg.start * ts : seg.start * ts + v.numel()] = v
        return flat.view(self.shape)

    def _read(self, tokens: torch.Tensor, seg: Segment, numel: int) -> torch.Tensor:
        ts = self.layout.token_size
        return tokens.reshape(-1)[seg.start * ts : seg.start * ts + numel]

    def encode_fp(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens of a full-precision checkpoint: normalised weights, padding elsewhere."""
        self.layout.check(sd)
        values = {}
        for li, (name, _) in enumerate(self.layout.shapes):
            mean, std = self.fp_stats[li].tolist()
            values[(li, "weight")] = (sd[name].float().reshape(-1) - mean) / std
        return self._write("fp", values)

    def _rtn(self, fp_sd: dict | None, spec: QuantSpec) -> dict[str, QTensor | None]:
        """RTN of each quantized layer of `fp_sd` under `spec` (the residual target's origin; None
        if direct)."""
        names = [n for n, _ in self.layout.shapes]
        if self.target == "direct":
            return dict.fromkeys(names)
        if fp_sd is None:
            raise ValueError(
                "this tokenizer's target is residual, relative to round-to-nearest of the "
                "full-precision checkpoint: pass its state_dict as fp_sd"
            )
        self.layout.check(fp_sd, "the full-precision checkpoint")
        return _rtn(fp_sd, names, spec)

    def encode_quantized(
        self, qsd: dict, spec: QuantSpec, fp_sd: dict | None = None
    ) -> torch.Tensor:
        """Tokens of a quantized checkpoint: normalised codes, then S and Z of each layer (with the
        residual target, their departures from RTN of `fp_sd`, the checkpoint it quantizes)."""
        stats = self.q_stats[self._spec(spec).name]
        self.layout.check(qsd, "quantized checkpoint")
        rtn = self._rtn(fp_sd, spec)
        values = {}
        for li, (name, _) in enumerate(self.layout.shapes):
            qt = qsd[name]
            if qt.spec != spec:
                raise ValueError(f"{name} is quantized as {qt.spec.name}, expected {spec.name}")
            parts = layer_values(qt, self.log_scale, rtn[name], self.codes == "centered")
            for k, (kind, t) in enumerate(zip(KINDS, parts)):
                mean, std = stats[li, k].tolist()
                values[(li, kind)] = (t.float().reshape(-1) - mean) / std
        return self._write("quantized", values)

    def decode_quantized(
        self, tokens: torch.Tensor, spec: QuantSpec, fp_sd: dict | None = None
    ) -> dict[str, QTensor]:
        """Generated tokens -> QTensors (`target_values.quantized_layer`; with the residual target,
        relative to RTN of `fp_sd`, the checkpoint being quantized)."""
        stats = self.q_stats[self._spec(spec).name]
        if tuple(tokens.shape) != self.shape:
            raise ValueError(f"expected tokens of shape {self.shape}, got {tuple(tokens.shape)}")
        tokens = tokens.detach().float().cpu()
        rtn = self._rtn(fp_sd, spec)
        parts: dict[tuple[int, str], torch.Tensor] = {}
        for seg in self.layout.segments:
            mean, std = stats[seg.layer_index, KINDS.index(seg.kind)].tolist()
            parts[(seg.layer_index, seg.kind)] = (
                self._read(tokens, seg, self.layout.numel(seg, spec)) * std + mean
            )
        out = {}
        for li, (name, shape) in enumerate(self.layout.shapes):
            pshape = spec.param_shape(shape)
            codes, scale, zero = (
                parts[(li, kind)].reshape(shape if kind == "weight" else pshape) for kind in KINDS
            )
            centered = self.codes == "centered"
            out[name] = quantized_layer(
                codes, scale, zero, spec, rtn[name], self.log_scale, centered
            )
        return out

    def base_tokens(self, fp_sd: dict, spec: QuantSpec) -> torch.Tensor:
        """What a generator's output is relative to (its `skip`), zero where no weight sits: the fp
        weight tokens (direct target) or the RTN remainders in the code offsets' units (residual
        target), so that copying them decodes to the input's own RTN codes; with `base: rtn`, RTN of
        the input as target tokens."""
        if self.base == "rtn":
            return self._rtn_tokens(fp_sd, spec)
        if self.target == "direct":
            return self.encode_fp(fp_sd) * self.layout.value_mask(spec, "fp")
        stats = self.q_stats[self._spec(spec).name]
        rtn = self._rtn(fp_sd, spec)
        values = {
            (li, "weight"): remainder(fp_sd[name].float(), rtn[name]).reshape(-1) / stats[li, 0, 1]
            for li, (name, _) in enumerate(self.layout.shapes)
        }
        return self._write("quantized", values) * self.layout.value_mask(spec, "fp")

    def _rtn_tokens(self, fp_sd: dict, spec: QuantSpec) -> torch.Tensor:
        """RTN of `fp_sd` under `spec` in the target's normalisation, codes before rounding
        (w / S + Z), zero where no value sits: a PTQ target's tokens are within half a step of it,
        and decode to it exactly."""
        self.layout.check(fp_sd, "the full-precision checkpoint")
        rtn = _rtn(fp_sd, [n for n, _ in self.layout.shapes], spec)
        unrounded = {
            n: QTensor(q.codes.float() + remainder(fp_sd[n].float(), q), q.scale, q.zero, spec)
            for n, q in rtn.items()
        }
        return self.encode_quantized(unrounded, spec) * self.loss_mask(spec)

    def decode_fp(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-precision tokens -> the quantizable weights they hold (inverse of `encode_fp`)."""
        out = {}
        for seg in self.layout.segments:
            if seg.kind == "weight":
                name, shape = self.layout.shapes[seg.layer_index]
                mean, std = self.fp_stats[seg.layer_index].tolist()
                out[name] = (self._read(tokens, seg, math.prod(shape)) * std + mean).reshape(shape)
        return out

    def loss_mask(self, spec: QuantSpec) -> torch.Tensor:
        """Target positions that hold real values under `spec` (padding excluded from the loss)."""
        return self.layout.value_mask(self._spec(spec), "quantized")

    def save(self, directory) -> None:
        """Write `tokenizer.json` (layout, padding, seed) and `tokenizer.safetensors`
        (statistics)."""
        directory = Path(directory)
        tensors = {
            "fp_stats": self.fp_stats,
            **{f"q_stats/{k}": v for k, v in self.q_stats.items()},
        }
        save_safetensors(tensors, directory / "tokenizer.safetensors")
        write_json(
            directory / "tokenizer.json",
            {
                "layout": self.layout.to_dict(),
                "padding": self.padding,
                "seed": self.seed,
                "log_scale": self.log_scale,
                "target": self.target,
                "base": self.base,
                "codes": self.codes,
            },
        )

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        directory = Path(directory)
        config = read_json(directory / "tokenizer.json")
        tensors, _ = read_safetensors(directory / "tokenizer.safetensors")
        q_stats = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("q_stats/")}
        return cls(
            Layout.from_dict(config["layout"]),
            tensors["fp_stats"],
            q_stats,
            config["padding"],
            config["seed"],
            config.get("log_scale", False),
            config.get("target", "direct"),
            config.get("base", "weights"),
            config.get("codes", "raw"),
        )
