"""Shared test fixtures: tiny timm target models and their checkpoints."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

from qg.models import ModelSpec, build_model, state_dict_of

TINY_VIT = ModelSpec("VisionTransformer", dict(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                               embed_dim=32, depth=2, num_heads=2))
TINY_MIXER = ModelSpec("MlpMixer", dict(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                        embed_dim=32, num_blocks=2))


@pytest.fixture(params=[TINY_VIT, TINY_MIXER], ids=["vit", "mixer"])
def model_spec(request):
    return request.param


def checkpoints(spec: ModelSpec, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` distinct checkpoints of one model: a random init plus small seeded perturbations."""
    torch.manual_seed(seed)
    base = state_dict_of(build_model(spec))
    gen = torch.Generator().manual_seed(seed + 1)
    return [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(n)]
