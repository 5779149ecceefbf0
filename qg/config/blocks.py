"""The sections of a profile, one pydantic model each: every key's type, range, default and meaning.
Unknown keys are errors; values are validated on assignment too. The whole profile, its checking and
the README's reference are `qg.config.schema`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import methods
from ..generator.diffusion import PREDICTIONS, SAMPLERS
from ..generator.loss import LOSS_WEIGHTINGS
from ..generator.model import HEADS, MIXERS, SKIPS, GeneratorConfig
from ..generator.parallel import STRATEGIES
from ..generator.tokenizer import BASES, CODES, PADDING_MODES, TARGETS
from ..generator.train import TrainConfig
from ..quant import qwt
from ..quant.quantizer import SCHEMES, QuantSpec
from .fields import DATASET_NAMES, Bits, Count, Dataset, Granularity, Positive, Rate

ABLATION_FACTORS = ("padding", "head", "backbone", "token_size")  # notebooks 04-07, in order


class Block(BaseModel):
    """A profile section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainRun(Block):
    """One training run of a target model (pretraining or a task's fine-tuning;
    `qg.study.training.TrainSpec`)."""

    dataset: Dataset = Field(description=f"dataset the run trains on: {DATASET_NAMES}")
    epochs: float = Field(gt=0, description="epochs (fractions allowed)")
    lr: Rate = Field(description="AdamW learning rate")
    batch_size: Positive = Field(128, description="batch size")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    head_only: bool = Field(
        False, description="train only the classifier head (the paper's CIFAR setting)"
    )
    train_subset: Positive | None = Field(
        None, description="seeded subset of the training set (all when unset)"
    )


class TokenizerBlock(Block):
    """`Tokenizer.fit`: how checkpoints become token sequences."""

    token_size: Positive | None = Field(
        None, description="values per token (required at the top level)"
    )
    padding: Literal[PADDING_MODES] = Field("gaussian", description="what fills blank positions")
    log_scale: bool = Field(False, description="scales as log S (ours; the paper: false)")
    target: Literal[TARGETS] = Field(
        "direct", description="direct (the paper's) or residual (offsets from RTN, ours)"
    )
    base: Literal[BASES] = Field(
        "weights",
        description="what a skip adds to: the weights, or RTN of them (ours, direct only)",
    )
    codes: Literal[CODES] = Field("raw", description="code tokens: q (the paper's) or q - Z (ours)")


_G = GeneratorConfig


class DiffusionBlock(Block):
    """`qg.generator.diffusion.DiffusionHead` settings (the diffusion-head ablation)."""

    n_steps: Positive = Field(1000, description="diffusion steps in training")
    beta_start: Rate = Field(1e-4, description="first noise level")
    beta_end: Rate = Field(0.02, description="last noise level")
    diffusion_batch: Positive | None = Field(None, description="noise draws per token in training")
    sampler: Literal[SAMPLERS] = Field("ddpm", description="sampler at generation")
    sample_steps: Positive | None = Field(None, description="DDIM steps at generation")
    channels: list[Positive] | None = Field(None, description="denoiser conv channels")
    kernel_size: Positive | None = Field(None, description="denoiser conv kernel")
    time_dim: Positive | None = Field(None, description="timestep embedding width")
    prediction: Literal[PREDICTIONS] = Field(
        "eps", description="denoiser output: the noise (RPG's) or the clean token"
    )


class GeneratorBlock(Block):
    """`GeneratorConfig`: the generator's architecture (token_size, n_tokens and conditions come
    from data)."""

    d_model: Positive | None = Field(
        _G.d_model, description="width (default: the token size, as in RPG)"
    )
    n_layers: Positive = Field(_G.n_layers, description="mixer blocks")
    backbone: Literal[tuple(MIXERS)] = Field(_G.backbone, description="sequence mixer")
    d_state: Positive = Field(_G.d_state, description="Mamba-2 state size")
    d_conv: Positive = Field(_G.d_conv, description="Mamba-2 causal conv width")
    expand: Positive = Field(_G.expand, description="Mamba-2 inner width / d_model")
    headdim: Positive = Field(
        _G.headdim, description="Mamba-2 head width (divides expand x d_model)"
    )
    chunk_size: Positive = Field(_G.chunk_size, description="Mamba-2 SSD chunk length")
    n_heads: Positive = Field(_G.n_heads, description="Transformer heads")
    head: Literal[HEADS] = Field(_G.head, description="output head")
    diffusion: DiffusionBlock = Field(
        default_factory=DiffusionBlock, description="diffusion head settings"
    )
    skip: Literal[SKIPS] = Field(
        _G.skip, description="output relative to the input (ours; the paper: none)"
    )

    @model_validator(mode="after")
    def _head_and_skip(self):
        if self.skip != "none" and self.head != "mse":
            raise ValueError(
                f"skip={self.skip!r} needs the MSE head: set skip: none beside head: diffusion"
            )
        return self


_T = TrainConfig


class TrainBlock(Block):
    """`TrainConfig`: the generator's training loop (its seed is the profile's)."""

    steps: Positive = Field(_T.steps, description="optimizer steps")
    batch_size: Positive = Field(_T.batch_size, description="checkpoints per step")
    lr: Rate = Field(_T.lr, description="AdamW peak learning rate (cosine decay)")
    weight_decay: float = Field(_T.weight_decay, ge=0, description="AdamW weight decay")
    warmup: Annotated[int, Count] = Field(_T.warmup, ge=0, description="linear warm-up steps")
    grad_clip: Rate = Field(_T.grad_clip, description="gradient-norm clip")
    mask_padding: bool = Field(_T.mask_padding, description="no loss on padding")
    ckpt_every: Positive = Field(
        _T.ckpt_every, description="steps between resumable training states"
    )
    loss_weighting: Literal[LOSS_WEIGHTINGS] = Field(
        _T.loss_weighting, description="plain MSE, per segment, or by a code error's cost"
    )
    strategy: Literal[STRATEGIES] = Field(
        _T.strategy,
        description="under torchrun: ddp (a full copy per process) or fsdp (parameters, gradients "
        "and AdamW state sharded over the processes, for a generator that does not fit one device)",
    )
    recompute: bool = Field(
        _T.recompute,
        description="keep only each block's input and recompute the block in the backward pass "
        "(activation checkpointing): less memory, more time, the same result",
    )


class Arch(Block):
    """One target architecture: a timm class or model name, its kwargs and pretraining data."""

    arch: str = Field(description="timm class (VisionTransformer, MlpMixer) or timm model name")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor arguments")
    dataset: Dataset = Field("fashion_mnist", description=f"pretraining dataset: {DATASET_NAMES}")
    norm: list[list[float]] | None = Field(
        None, description="input (mean, std); default the dataset's"
    )
    pretrained_file: str | None = Field(
        None, description="weights file for offline use (paper profile)"
    )
    tasks: list[str] | None = Field(None, description="tasks it takes part in (default all)")
    tokenizer: TokenizerBlock | None = Field(
        None, description="tokenizer settings for this architecture"
    )
    generator: GeneratorBlock | None = Field(
        None, description="generator settings for this architecture"
    )
    train: TrainBlock | None = Field(None, description="training settings for this architecture")


class Checkpoints(Block):
    """The checkpoints 01_collect saves per (arch, task) and how they are split."""

    n: Positive = Field(description="checkpoints of run A (the last epoch)")
    heldout_every: Annotated[int, Count, Field(ge=2)] = Field(
        description="every k-th checkpoint of run A is held out"
    )
    heldout_run: Positive = Field(description="checkpoints of run B (another seed), all held out")
    validation_run: Positive = Field(
        description="checkpoints of run C (a third seed), all held out: where 08 chooses among "
        "variants, so that the held-out run only reports"
    )
    runs: Positive = Field(1, description="fine-tunings (seeds) run A's n checkpoints come from")

    @model_validator(mode="after")
    def _whole_runs(self):
        if self.n % self.runs:
            raise ValueError(f"checkpoints.n ({self.n}) must be a multiple of checkpoints.runs")
        return self


class Quant(Block):
    """The quantizer every spec shares."""

    group_size: Positive = Field(64, description="values per group (group-wise)")
    scheme: Literal[SCHEMES] = Field("symmetric", description="symmetric (Eq. 1) or asymmetric")

    def spec(self, bits: int, granularity: str) -> QuantSpec:
        """The spec of `bits` and `granularity` with this group size and scheme."""
        return QuantSpec(bits, granularity, self.group_size, self.scheme)


class Selection(Block):
    """Which (arch, task) pairs a block covers."""

    archs: list[str] | None = Field(None, description="architectures covered (default all)")
    tasks: list[str] | None = Field(None, description="tasks covered (default all)")


class Qat(Selection):
    """QAT targets (Table 2, amortized QAT): QAT fine-tuning from every checkpoint
    (`qg.study.collect.QATSpec`)."""

    bits: list[Bits] = Field(description="bit-widths with QAT targets")
    granularity: Granularity = Field(description="their granularity")
    scheme: Literal[SCHEMES] | None = Field(None, description="QAT's grid (null: quant.scheme)")
    steps: Positive | dict[str, Positive] = Field(
        description="QAT fine-tuning steps per checkpoint: one number, or one per task ({full: "
        "40, head: 20})"
    )
    lr: Rate = Field(description="QAT learning rate")
    batch_size: Positive = Field(128, description="QAT batch size")
    weight_decay: float = Field(0.0, ge=0, description="QAT weight decay")

    def spec(self, quant: Quant, bits: int) -> QuantSpec:
        """The spec of QAT's targets at `bits`: the quant block's, on QAT's own grid if it has one
        (HQQ, the data-free method QAT is compared with, is asymmetric whatever the quant block
        says)."""
        spec = quant.spec(bits, self.granularity)
        return spec if self.scheme is None else dataclasses.replace(spec, scheme=self.scheme)

    def steps_for(self, task: str) -> int:
        """QAT's fine-tuning steps on `task`'s checkpoints."""
        return self.steps if isinstance(self.steps, int) else self.steps[task]

    def steps_text(self) -> str:
        """What a caption says of QAT's steps: `20 steps`, or `40 steps on full, 20 on head`."""
        if isinstance(self.steps, int):
            return f"{self.steps} steps"
        first, *rest = [f"{n} on {task}" for task, n in self.steps.items()]
        return ", ".join([first.replace(" on ", " steps on ", 1), *rest])

    def grid(self) -> str:
        """What a table's caption says of QAT's grid: its granularity, and its scheme when QAT has
        its own."""
        return self.granularity + "-wise" + (f", {self.scheme} grid" if self.scheme else "")


class Amortized(Block):
    """08_residual_qat: direct vs residual target on PTQ and QAT targets."""

    bits: list[Bits] = Field(
        default_factory=list, description="08_residual_qat's bit-widths (each in qat.bits)"
    )


class Overrides(Block):
    """Overrides of the tokenizer, generator and train settings (a convergence variant)."""

    tokenizer: TokenizerBlock | None = None
    generator: GeneratorBlock | None = None
    train: TrainBlock | None = None


class Convergence(Block):
    """02_train's convergence study: one generator per (arch, task) per variant."""

    bits: Bits | None = Field(None, description="the study's bit-width")
    granularity: Granularity | None = Field(None, description="its granularity")
    variants: dict[str, Overrides | None] = Field(
        default_factory=dict, description="label -> overrides"
    )


class Table1(Block):
    """Table 1's specs."""

    bits: list[Bits] = Field(description="group-wise bit-widths")
    granularity_bits: Bits = Field(description="the bit-width with channel- and group-wise")
    generators: list[Literal[methods.names("generator")]] = Field(
        ["gen"],
        description="the generators of each setting (qg.methods; gen: ours)",
    )


class Pair(Block):
    """One (arch, task)."""

    arch: str = Field(description="architecture")
    task: str = Field(description="task")


class Eval(Block):
    """How every model file is scored."""

    test_subset: Positive | None = Field(None, description="seeded test subset (all when unset)")
    per_split: Positive | None = Field(
        None, description="checkpoints scored per split (all when unset)"
    )
    batch_size: Positive = Field(1000, description="evaluation batch size")
    hold_mb: Positive = Field(8192, description="test sets up to this size are held in memory")


class AblationSetup(Block):
    """Another (arch, task, bits, granularity) for one factor."""

    arch: str | None = None
    task: str | None = None
    bits: list[Bits] | None = None
    granularity: Granularity | None = None


class Ablation(Block):
    """Notebooks 04-07: one factor changed at a time, variants by label."""

    arch: str = Field(description="architecture the ablations run on")
    task: str = Field(description="task")
    bits: list[Bits] = Field(description="bit-widths")
    granularity: Granularity = Field(description="granularity")
    per_factor: dict[Literal[ABLATION_FACTORS], AblationSetup] = Field(
        default_factory=dict,
        description="factor -> another setup (the paper: token size on ViT-Base)",
    )
    padding: dict[str, Literal[PADDING_MODES]] | None = Field(
        None, description="Table 6: label -> padding"
    )
    head: dict[str, GeneratorBlock] | None = Field(
        None, description="Table 5: label -> generator settings"
    )
    backbone: dict[str, Literal[tuple(MIXERS)]] | None = Field(
        None, description="Table 10: label -> backbone"
    )
    token_size: dict[str, Positive] | None = Field(None, description="Table 4: label -> token size")


class Controls(Block):
    """03_generate's controls."""

    noise: float = Field(
        ge=0, description="noise control: Gaussian noise of this fraction of each layer's std"
    )


class Qwt(Block):
    """QwT (`qg.quant.qwt`) on top of PTQ, HQQ and Gen in 03_generate."""

    images: Positive = Field(
        qwt.IMAGES, description="calibration images from the task's training split (the paper: 512)"
    )
    batch_size: Positive = Field(qwt.BATCH_SIZE, description="calibration batch size")
    splits: list[Literal["trained", "heldout_ckpt", "heldout_run"]] = Field(
        ["trained", "heldout_ckpt", "heldout_run"],
        min_length=1,
        description="the splits whose checkpoints get QwT rows (each fit costs about as much as "
        "scoring the model)",
    )
