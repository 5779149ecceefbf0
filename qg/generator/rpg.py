"""RPG (Wang et al., "Recurrent diffusion for large-scale parameter generation"):
whole models from noise.

QuantGen is built from RPG's parts; this module runs them for RPG's own job. There is no
full-precision input: the recurrent body reads only the position embedding of each token (plus an
embedding of the condition, when there is one), and its output at each position conditions the
diffusion head, which samples that position's token of full-precision weights (RPG Sec. 2):

    tokens   every floating tensor of a checkpoint, in state_dict order, normalised per tensor by
             its mean and std over the training checkpoints (RPG's layer-wise normalisation), cut
             into tokens of `token_size`; a tensor's last token is padded with zeros, which the loss
             ignores. A tensor equal in every training checkpoint (a frozen backbone's, when only
             the head is trained, as in RPG Sec. 4) is kept by the tokenizer, not generated
    body     `qg.generator.model.Generator` in RPG mode (`fp_input: false`): Mamba-2 blocks over
             position embedding (+ Linear(condition vector))
    head     `qg.generator.diffusion.DiffusionHead`: a 1D conv denoiser per token, DDPM-trained
             (predicting the noise, RPG's, or the clean token), sampled by DDPM/DDIM

    ParamTokenizer   checkpoints <-> token sequences (every tensor, not only the quantized layers)
    RPG              a trained RPG with its tokenizer: `fit`, `sample`, `save`, `load`

A sample is a whole state_dict that loads strictly into the timm architecture it was trained on.
Whether it is new or a replay of a training checkpoint is what `qg.study.fidelity.nearest_distances`
and `error_iou` ask.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.io import read_json, read_safetensors, save_safetensors, write_json
from ..quant.quantizer import check_finite
from .directory import GeneratorDirectory
from .model import Generator, GeneratorConfig
from .pairs import TokenPairs
from .train import TrainConfig, train


class ParamTokenizer:
    """The floating tensors of one architecture's checkpoints as a (n_tokens, token_size) sequence;
    `constants` are the tensors every training checkpoint shares, returned as they are by
    `decode`."""

    def __init__(
        self,
        shapes: list[tuple[str, tuple[int, ...]]],
        stats: torch.Tensor,
        token_size: int,
        constants: dict[str, torch.Tensor] | None = None,
    ):
        if token_size < 1:
            raise ValueError(f"token_size must be positive, got {token_size}")
        if not shapes:
            raise ValueError(
                "no tensor to generate: every floating tensor is equal in all training checkpoints"
            )
        if stats.shape != (len(shapes), 2):
            raise ValueError(
                f"stats must be ({len(shapes)}, 2) [mean, std] rows, got {tuple(stats.shape)}"
            )
        self.shapes = [(name, tuple(int(s) for s in shape)) for name, shape in shapes]
        self.stats, self.token_size = stats.float(), token_size
        self.constants = dict(constants or {})
        self.counts = [math.ceil(math.prod(shape) / token_size) for _, shape in self.shapes]
        self.starts = [sum(self.counts[:i]) for i in range(len(self.counts))]

    @classmethod
    def fit(cls, checkpoints: list[dict[str, torch.Tensor]], token_size: int) -> "ParamTokenizer":
        """Layout from the first checkpoint (the tensors that differ between checkpoints; with one
        checkpoint, all of them); each tensor's mean and std over all the training checkpoints."""
        if not checkpoints:
            raise ValueError("ParamTokenizer.fit needs at least one checkpoint")
        first = {k: v for k, v in checkpoints[0].items() if v.is_floating_point()}
        whole = cls(
            [(k, tuple(v.shape)) for k, v in first.items()], torch.zeros(len(first), 2), token_size
        )
        for sd in checkpoints:
            whole.check(sd)
        constants = {
            k: v.clone()
            for k, v in first.items()
            if len(checkpoints) > 1 and all(torch.equal(sd[k], v) for sd in checkpoints[1:])
        }
        shapes = [(k, tuple(v.shape)) for k, v in first.items() if k not in constants]
        tok = cls(shapes, torch.zeros(len(shapes), 2), token_size, constants)
        rows = []
        for name, _ in shapes:
            values = torch.cat([sd[name].double().reshape(-1) for sd in checkpoints])
            std = float(values.std()) if values.numel() > 1 else 0.0
            # a constant tensor: any scale decodes it
            rows.append([float(values.mean()), max(std, 1e-8)])
        tok.stats = torch.tensor(rows, dtype=torch.float32)
        return tok

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self.counts), self.token_size

    def check(self, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
        """Raise a clear error if `sd`'s floating tensors are not the ones this tokenizer was fitted
        on."""
        have = {k: tuple(v.shape) for k, v in sd.items() if v.is_floating_point()}
        want = {**dict(self.shapes), **{k: tuple(v.shape) for k, v in self.constants.items()}}
        if have != want:
            diff = [
                f"{k}: {have.get(k)} vs expected {want.get(k)}"
                for k in {**want, **have}
                if want.get(k) != have.get(k)
            ]
            raise ValueError(
                f"{what} does not match the RPG tokenizer ({len(diff)} tensors differ, e.g. "
                f"{'; '.join(diff[:3])}): train RPG on checkpoints of this architecture"
            )
        for k, v in sd.items():
            check_finite(k, v)

    def positions(self) -> torch.Tensor:
        """(n_tokens, 2) long: (tensor index, token index within the tensor), for the position
        embedding."""
        return torch.cat(
            [
                torch.stack([torch.full((n,), i), torch.arange(n)], 1)
                for i, n in enumerate(self.counts)
            ]
        )

    def mask(self) -> torch.Tensor:
        """(n_tokens, token_size) bool: True where a real value sits (False: a tensor's last-token
        padding)."""
        mask = torch.zeros(self.shape).view(-1).bool()
        for (_, shape), start in zip(self.shapes, self.starts):
            mask[start * self.token_size : start * self.token_size + math.prod(shape)] = True
        return mask.view(self.shape)

    def encode(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        """A checkpoint's tokens: each tensor normalised, flattened and cut into tokens."""
        self.check(sd)
        flat = torch.zeros(self.shape).view(-1)
        for i, ((name, shape), start) in enumerate(zip(self.shapes, self.starts)):
            mean, std = self.stats[i].tolist()
            begin = start * self.token_size
            flat[begin : begin + math.prod(shape)] = (sd[name].float().reshape(-1) - mean) / std
        return flat.view(self.shape)

    def decode(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens -> a state_dict of every tensor, the constants included (the inverse of
        `encode`)."""
        if tuple(tokens.shape) != self.shape:
            raise ValueError(f"expected tokens of shape {self.shape}, got {tuple(tokens.shape)}")
        flat, out = tokens.reshape(-1).float(), {k: v.clone() for k, v in self.constants.items()}
        for i, ((name, shape), start) in enumerate(zip(self.shapes, self.starts)):
            mean, std = self.stats[i].tolist()
            begin = start * self.token_size
            out[name] = (flat[begin : begin + math.prod(shape)] * std + mean).reshape(shape).clone()
        return out

    def save(self, directory) -> None:
        directory = Path(directory)
        save_safetensors(
            {"stats": self.stats, **{f"constant/{k}": v for k, v in self.constants.items()}},
            directory / "rpg_tokenizer.safetensors",
        )
        write_json(
            directory / "rpg_tokenizer.json",
            {"shapes": [[n, list(s)] for n, s in self.shapes], "token_size": self.token_size},
        )

    @classmethod
    def load(cls, directory) -> "ParamTokenizer":
        directory = Path(directory)
        config = read_json(directory / "rpg_tokenizer.json")
        tensors, _ = read_safetensors(directory / "rpg_tokenizer.safetensors")
        constants = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("constant/")}
        return cls(
            [(n, tuple(s)) for n, s in config["shapes"]],
            tensors["stats"],
            config["token_size"],
            constants,
        )


def training_data(
    tokenizer: ParamTokenizer, checkpoints: list[dict], conditions: list[str | None]
) -> TokenPairs:
    """RPG's training set as the training loop's pairs: no input (one all-zero row, which RPG mode
    does not read), each checkpoint's tokens as a target, its condition's index, the padding
    mask."""
    if len(conditions) != len(checkpoints):
        raise ValueError(
            f"{len(conditions)} conditions for {len(checkpoints)} checkpoints; "
            "pass one per checkpoint"
        )
    names = sorted({c for c in conditions if c is not None})
    if names and None in conditions:
        raise ValueError("either every checkpoint has a condition or none has")
    y = torch.stack([tokenizer.encode(sd) for sd in checkpoints])
    n = len(checkpoints)
    mask = tokenizer.mask().float()[None].expand(max(1, len(names)), -1, -1)
    cond = torch.tensor([names.index(c) if names else 0 for c in conditions])
    return TokenPairs(
        x=torch.zeros(1, *tokenizer.shape),
        y=y,
        base=torch.zeros(1, *tokenizer.shape).expand(n, -1, -1),
        src=torch.zeros(n, dtype=torch.long),
        cond=cond,
        masks=mask,
        conditions=names,
    )


class RPG(GeneratorDirectory):
    """A trained RPG: its generator (RPG mode) and tokenizer, to sample whole models of one
    architecture."""

    FILES = ("rpg_tokenizer.json", "rpg_tokenizer.safetensors", *GeneratorDirectory.FILES)
    TOKENIZER = ParamTokenizer
    KIND, MARKER, HOW = "an RPG", "rpg_tokenizer.json", "RPG.fit"

    def __init__(self, model: Generator, tokenizer: ParamTokenizer, record: dict | None = None):
        if model.cfg.fp_input or model.cfg.head != "diffusion":
            raise ValueError(
                "RPG samples with a generator in RPG mode: "
                "GeneratorConfig(fp_input=False, head='diffusion')"
            )
        super().__init__(model, tokenizer, record)

    @classmethod
    def build(cls, cfg: GeneratorConfig, tokenizer: ParamTokenizer) -> Generator:
        return Generator(cfg, tokenizer.positions())

    @classmethod
    def fit(
        cls,
        checkpoints: list[dict],
        out_dir,
        generator: dict | None = None,
        train_cfg: TrainConfig | None = None,
        conditions: list[str] | None = None,
        token_size: int = 128,
        device: str = "cpu",
    ) -> "RPG":
        """Fit the tokenizer on `checkpoints`, train RPG on them (resumable in `out_dir`) and save
        it there.

        `generator`: GeneratorConfig overrides (d_model, n_layers, diffusion, cond_bits, ...);
        `conditions`: one per checkpoint (a class name, or a bit string with `cond_bits`), None for
        unconditional RPG.
        """
        tokenizer = ParamTokenizer.fit(checkpoints, token_size)
        data = training_data(tokenizer, checkpoints, conditions or [None] * len(checkpoints))
        n_tokens, size = tokenizer.shape
        cfg = GeneratorConfig(
            **{
                **(generator or {}),
                "token_size": size,
                "n_tokens": n_tokens,
                "fp_input": False,
                "head": "diffusion",
                "skip": "none",
                "conditions": data.conditions,
            }
        )
        train_cfg = train_cfg or TrainConfig()
        torch.manual_seed(train_cfg.seed)
        model = cls.build(cfg, tokenizer)
        record = train(model, data, train_cfg, out_dir, device=device)
        rpg = cls(model.cpu(), tokenizer, record)
        rpg.save(out_dir)
        return rpg

    def sample(
        self, n: int, condition: str | None = None, seed: int = 0
    ) -> list[dict[str, torch.Tensor]]:
        """`n` whole state_dicts (`sample_one` with indices 0..n-1), for `condition` (None if
        unconditional)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return [self.sample_one(i, condition, seed) for i in range(n)]

    @torch.no_grad()
    def denoising_error(
        self,
        sd: dict,
        timesteps: list[int] | None = None,
        condition: str | None = None,
        seed: int = 0,
    ) -> list[dict]:
        """How well the head recovers checkpoint `sd` from its noised tokens at each timestep
        (default: 0, 1 %, 5 %, 20 %, 50 % and the last of the head's steps): the mean squared error
        of the predicted clean token (x0) and of the predicted noise, in normalised units over real
        values, with the body's condition and with it zeroed (does the recurrent body's output
        reach the head?). One seeded noise draw per timestep."""
        n_steps = self.model.diffusion.n_steps
        if timesteps is None:
            timesteps = sorted({int(f * (n_steps - 1)) for f in (0, 0.01, 0.05, 0.2, 0.5, 1)})
        if not all(0 <= t < n_steps for t in timesteps):
            raise ValueError(f"timesteps must lie in [0, {n_steps}), got {timesteps}")
        self.model.eval()
        device = self.model.pos_emb.device
        x0 = self.tokenizer.encode(sd).to(device)
        mask = self.tokenizer.mask().to(device)
        feats = self.model.features(x0[None], self.model.condition_vector(condition))[0]
        head, rng, rows = self.model.diffusion, torch.Generator().manual_seed(seed), []
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=rng).to(device)
            tt = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
            x_t = head.q_sample(x0, tt, noise)
            for body, cond in (("condition", feats), ("zeroed", torch.zeros_like(feats))):
                x0_hat, eps_hat = head.predict(x_t, tt, cond)
                rows.append(
                    {
                        "t": int(t),
                        "body": body,
                        "x0_mse": float(((x0_hat - x0) ** 2)[mask].mean()),
                        "eps_mse": float(((eps_hat - noise) ** 2)[mask].mean()),
                    }
                )
        return rows

    @torch.no_grad()
    def sample_one(
        self, index: int, condition: str | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Sample `index` of a seeded series: its own noise, seeded by (seed, index), so any one of
        a series is reproducible alone."""
        self.model.eval()
        device = self.model.pos_emb.device
        blank = torch.zeros(1, *self.tokenizer.shape, device=device)
        rng = torch.Generator(device).manual_seed(seed * 1_000_003 + index)
        onehot = self.model.condition_vector(condition)
        tokens = self.model.generate(blank, onehot, rng=rng)[0].cpu()
        return self.tokenizer.decode(tokens)
