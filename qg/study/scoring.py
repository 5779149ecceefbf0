"""Scoring model files: top-1 accuracy on a profile's seeded test subset, from the file alone.

Every checkpoint and quantized file is evaluated once; its predicted classes (and the labels) are
cached beside it, so accuracies and the memorisation tests' error overlaps
(`qg.study.fidelity.error_iou`) share one evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.blocks import Eval
from ..core.io import (
    cached,
    content_digest,
    params_key,
    read_safetensors,
    save_safetensors,
)
from ..targets.data import batches, fingerprint, held
from ..targets.models import (
    ModelSpec,
    build_from,
    load_model_description,
    load_model_file,
    predict,
    resolve_device,
    top1,
)


class Scorer:
    """Predictions and accuracy of model files on one profile's test subset (`eval` block,
    `seed`)."""

    def __init__(self, block: Eval, seed: int, device: str | None = None):
        self.eval, self.seed, self.device = block, seed, resolve_device(device)
        self._test_sets: dict = {}

    def test_set(self, spec: ModelSpec):
        """Batches of the seeded test subset every model of this profile is scored on: held in
        memory when it fits in `eval.hold_mb`, else streamed from disk for each model."""
        key = (spec.dataset, spec.img_size, spec.norm)
        if key not in self._test_sets:
            ev = self.eval
            loader = batches(
                spec.dataset,
                "test",
                spec.img_size,
                ev.batch_size,
                subset=ev.test_subset,
                seed=self.seed,
                norm=spec.norm,
            )
            self._test_sets[key] = held(loader, ev.hold_mb)
        return self._test_sets[key]

    def score(self, path: Path) -> float:
        """Top-1 accuracy (%) of a checkpoint or quantized file on the profile's test subset."""
        return top1(*self.predictions(path))

    def predictions(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted classes, labels) of a checkpoint or quantized file on the profile's test
        subset.

        Evaluated from the file once and cached beside it (`<file>.pred-<key>.safetensors`, keyed by
        the test subset and seed, and made from the file's content and the test set's:
        `qg.core.io.cached`), so accuracies and the memorisation tests' error overlaps share one
        evaluation. A cache that is damaged, or was computed from another file or other test data
        under the same names, is evaluated again.
        """
        test_key = params_key({"test_subset": self.eval.test_subset, "seed": self.seed})
        cache = path.with_name(path.name + f".pred-{test_key}.safetensors")
        spec = load_model_description(path)
        inputs = {
            "model file": content_digest(path),
            "test data": fingerprint(spec.dataset, "test"),
        }
        t = read_safetensors(cached(cache, lambda out: self._evaluate(path, out), inputs))[0]
        return t["pred"].long(), t["labels"].long()

    def _evaluate(self, path: Path, out: Path) -> None:
        sd, spec, _ = load_model_file(path)
        pred, labels = predict(build_from(spec, sd, str(path)), self.test_set(spec), self.device)
        save_safetensors(
            {"pred": pred.to(torch.int16), "labels": labels.to(torch.int16)},
            out,
            {"file": path.name},
        )
