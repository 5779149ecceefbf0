"""QwT fitted on a target model's own training images: the one fit that the cache
(`qg.study.experiments`) and the command line (`python -m qg quantize --qwt N`) share."""

from __future__ import annotations

import time

from ..quant import qwt
from ..quant.quantizer import dequantize_state_dict
from .data import batches
from .models import ModelSpec, build_from


def with_qwt(
    qsd: dict,
    fp_sd: dict,
    spec_model: ModelSpec,
    images: int = qwt.IMAGES,
    batch_size: int = qwt.BATCH_SIZE,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[dict, dict]:
    """A quantized state_dict with QwT compensations (`qg.quant.qwt`) added, fitted on `device`
    against the full-precision weights `fp_sd` on `images` seeded images of the model's training
    split (never its test split; ImageNet's come with its training augmentation), and the record of
    the fit (images, tokens, seconds, R^2 and whether each block was compensated)."""
    fp = build_from(spec_model, fp_sd).to(device)
    quantized = build_from(spec_model, dequantize_state_dict(qsd)).to(device)
    calibration = [
        x.to(device)
        for x, _ in batches(
            spec_model.dataset,
            "train",
            spec_model.img_size,
            batch_size,
            subset=images,
            seed=seed,
            norm=spec_model.norm,
        )
    ]
    start = time.perf_counter()
    fits = qwt.compensate(fp, quantized, calibration)
    record = {
        "images": sum(len(x) for x in calibration),
        "split": "train",
        "tokens": fits[0].tokens if fits else 0,
        "seconds": time.perf_counter() - start,
        "r2": [f.r2 for f in fits],
        "applied": [f.applied for f in fits],
        "ridge": [f.ridge for f in fits],
    }
    return {**qsd, **qwt.tensors(fits)}, record
