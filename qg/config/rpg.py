"""The `rpg` section of a profile (10_rpg: RPG's own job at our scale), one pydantic model per
block, beside the sections of `qg.config.blocks` whose generator and training blocks it reuses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..targets.names import IN_MEMORY
from .blocks import Block, GeneratorBlock, TrainBlock
from .fields import Positive, Rate


class BinaryRun(Block):
    """Each binary classifier's head-only training (`qg.study.training.TrainSpec`; the task sets
    dataset and head_only)."""

    epochs: float = Field(3, gt=0, description="epochs over the training subset")
    lr: Rate = Field(0.01, description="AdamW learning rate")
    batch_size: Positive = Field(128, description="batch size")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    train_subset: Positive | None = Field(2000, description="seeded training subset (null: all)")


class RpgBinary(Block):
    """10_rpg's unseen tasks (RPG Sec. 4): binary tasks of one dataset, head-only classifiers of a
    frozen model."""

    arch: str | None = Field(None, description="architecture (default: the first of rpg.archs)")
    dataset: Literal[IN_MEMORY] = Field("fashion_mnist", description="dataset relabelled 0/1")
    seen: Positive = Field(50, description="binary tasks RPG is trained on")
    unseen: Positive = Field(10, description="binary tasks RPG is asked for, never trained on")
    checkpoints: Positive = Field(3, description="classifiers per task (one run's last epoch)")
    samples: Positive = Field(3, description="RPG samples per unseen task")
    token_size: Positive = Field(16, description="values per token")
    train: BinaryRun | None = Field(None, description="each classifier's head-only training")
    generator: GeneratorBlock | None = Field(None, description="overrides of rpg.generator")
    rpg_train: TrainBlock | None = Field(None, description="RPG's training (default: rpg.train)")


class Rpg(Block):
    """10_rpg: RPG's own job at our scale (`qg.generator.rpg`): whole models sampled from noise,
    after RPG's Table 1."""

    archs: list[str] = Field(min_length=1, description="architectures RPG generates")
    task: str = Field("full", description="the task whose run-A training checkpoints RPG learns")
    samples: Positive = Field(10, description="models sampled per architecture (and per baseline)")
    token_size: Positive = Field(128, description="values per token")
    generator: GeneratorBlock | None = Field(None, description="RPG's generator (diffusion head)")
    train: TrainBlock | None = Field(None, description="RPG's training (default: train block)")
    noise: float = Field(
        0.05,
        ge=0,
        description="noise baseline: a training checkpoint plus Gaussian noise of this "
        "fraction of each tensor's std",
    )
    average_of: Positive = Field(16, description="average baseline: mean of this many checkpoints")
    binary: RpgBinary | None = Field(None, description="the unseen-task study (unset: not run)")

    @model_validator(mode="after")
    def _diffusion(self):
        gen = self.generator
        if gen is not None and "head" in gen.model_fields_set and gen.head != "diffusion":
            raise ValueError(
                "RPG samples with the diffusion head: set generator.head: diffusion (or leave it "
                "unset)"
            )
        return self
