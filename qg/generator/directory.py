"""A trained generator on disk: its directory (weights, config, tokenizer, training record, each
file's hash beside it), loaded with its checks, and QuantGen, the generator + tokenizer that
quantizes a new checkpoint in one forward pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.io import (
    read_json,
    read_safetensors,
    record_hash,
    save_safetensors,
    verified,
    write_json,
)
from ..quant.quantizer import QTensor, QuantSpec, check_finite
from .model import Generator, GeneratorConfig
from .tokenizer import Tokenizer


class GeneratorDirectory:
    """A trained generator with its tokenizer, kept in a directory: the tokenizer's files,
    `generator.safetensors` (weights) and `generator.json` (config, conditions, training record),
    written last since it marks the directory complete, each file's hash beside it. `QuantGen` and
    `qg.generator.rpg.RPG` are its two kinds."""

    # after the tokenizer's own
    FILES: tuple[str, ...] = ("generator.safetensors", "generator.json")
    TOKENIZER = Tokenizer  # what reads the tokenizer's files: `.load(directory)`, `.shape`
    # for a missing directory
    KIND, MARKER, HOW = (
        "a generator",
        "generator.json",
        "notebooks/02_train.ipynb or qg.generator.train",
    )

    def __init__(self, model: Generator, tokenizer, record: dict | None = None):
        self.model, self.tokenizer, self.record = model, tokenizer, record or {}

    @classmethod
    def build(cls, cfg: GeneratorConfig, tokenizer) -> Generator:
        """The untrained generator `cfg` describes, laid out for `tokenizer`."""
        return Generator.for_tokenizer(cfg, tokenizer)

    def save(self, directory) -> None:
        """Write the directory (`FILES`; generator.json last), each file's hash beside it."""
        directory = Path(directory)
        self.tokenizer.save(directory)
        save_safetensors(self.model.state_dict(), directory / "generator.safetensors")
        write_json(
            directory / "generator.json",
            {"config": self.model.cfg.to_dict(), "record": self.record},
        )
        for name in self.FILES:
            record_hash(directory / name)

    @classmethod
    def complete(cls, directory) -> bool:
        """Whether a generator directory is whole: every file there and holding what was written
        (`verified`)."""
        # a list: check (and warn on) each
        return all([verified(Path(directory) / name) for name in cls.FILES])

    @classmethod
    def load(cls, directory, device: str = "cpu"):
        """Load a generator directory, checking that weights, config and tokenizer agree."""
        directory = Path(directory)
        if not (directory / cls.MARKER).is_file():
            raise FileNotFoundError(
                f"{directory} is not {cls.KIND} directory (no {cls.MARKER}); "
                f"train one with {cls.HOW}"
            )
        info = read_json(directory / "generator.json")
        tokenizer = cls.TOKENIZER.load(directory)
        try:
            cfg = GeneratorConfig(**info["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{directory}/generator.json does not describe a generator this version of qg "
                f"builds: {e}"
            ) from e
        if (cfg.n_tokens, cfg.token_size) != tokenizer.shape:
            raise ValueError(
                f"{directory}: generator expects {cfg.n_tokens} tokens of {cfg.token_size}, "
                f"its tokenizer makes {tokenizer.shape}; the directory mixes files of two runs"
            )
        model = cls.build(cfg, tokenizer)
        weights, _ = read_safetensors(directory / "generator.safetensors")
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"{directory}/generator.safetensors does not match generator.json's architecture "
                f"({cfg.backbone}, {cfg.n_layers} layers, d_model {cfg.d_model}):\n{e}"
            ) from e
        return cls(model.to(device), tokenizer, info.get("record", {}))


class QuantGen(GeneratorDirectory):
    """A trained generator with its tokenizer: quantizes full-precision checkpoints of one
    architecture."""

    FILES = ("tokenizer.json", "tokenizer.safetensors", *GeneratorDirectory.FILES)

    @property
    def specs(self) -> list[QuantSpec]:
        return self.tokenizer.specs

    def spec_condition(self, spec: QuantSpec) -> str | None:
        """The condition name that asks for `spec` (None for an unconditional generator)."""
        if spec.name not in self.tokenizer.q_stats:
            raise ValueError(
                f"this generator was trained for {[s.name for s in self.specs]}, not {spec.name}; "
                "train one for that setting or pick a supported one"
            )
        return spec.name if self.model.cfg.conditions else None

    @torch.no_grad()
    def quantize(
        self, fp_sd: dict[str, torch.Tensor], spec: QuantSpec, seed: int = 0
    ) -> tuple[dict, float]:
        """Generate the quantized model for a full-precision state_dict; returns (qsd, seconds).

        Quantized weights come back as QTensors (codes rounded and clamped, S positive, Z rounded);
        every other tensor is copied from the input, since the generator only produces quantized
        layers.
        """
        for name, t in fp_sd.items():
            check_finite(name, t)
        start = time.perf_counter()
        self.model.eval()
        device = self.model.pos_emb.device
        tokens = self.tokenizer.encode_fp(fp_sd).unsqueeze(0).to(device)
        onehot = self.model.condition_vector(self.spec_condition(spec))
        base = (
            self.tokenizer.base_tokens(fp_sd, spec).unsqueeze(0).to(device)
            if self.model.cfg.skip != "none"
            else None
        )
        out = self.model.generate(
            tokens, onehot, base, rng=torch.Generator(device).manual_seed(seed)
        )
        # .cpu() waits for a GPU to finish
        generated = self.tokenizer.decode_quantized(out[0].cpu(), spec, fp_sd)
        qsd: dict[str, QTensor | torch.Tensor] = {k: generated.get(k, v) for k, v in fp_sd.items()}
        return qsd, time.perf_counter() - start
