"""Shared test fixtures (the helpers they are made of live in fakes.py)."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
from fakes import TINY_MIXER, TINY_VIT


@pytest.fixture(params=[TINY_VIT, TINY_MIXER], ids=["vit", "mixer"])
def model_spec(request):
    return request.param
