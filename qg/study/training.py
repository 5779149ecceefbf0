"""One cached training run of a target model (pretraining or a fine-tuning, `TrainSpec`), named by
its parameters, and the starting points a task fine-tunes from: what 01_collect and the RPG binary
tasks both train with.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.io import params_key, read_json, record_hash, verified, write_json
from ..targets.data import batches, fingerprint
from ..targets.models import (
    ModelSpec,
    build_model,
    fit,
    load_weights,
    save_checkpoint,
    state_dict_of,
)


@dataclass(frozen=True)
class TrainSpec:
    """One training run of a target model on a dataset."""

    dataset: str
    epochs: float
    lr: float
    batch_size: int = 128
    weight_decay: float = 0.05
    head_only: bool = False
    train_subset: int | None = None


def _run_dir(root: Path, kind: str, params: dict) -> Path:
    return Path(root) / f"{kind}-{params_key(params)}"


def train_model(
    spec: ModelSpec,
    run: TrainSpec,
    start: dict | None,
    seed: int,
    root,
    n_checkpoints: int = 0,
    label: str = "run",
    device: str = "cpu",
) -> tuple[list[Path], dict]:
    """Train `spec` from `start` (random init if None); save `n_checkpoints` from the final epoch.

    Returns the checkpoint paths (the final weights when n_checkpoints is 0) and the run record.
    Cached: a finished run with the same parameters is read back instead of retrained (on any
    device).
    """
    params = _run_params(spec, run, start, seed, n_checkpoints)
    out = _run_dir(root, label, params)
    # content, not name: other files under the same name retrain the run
    data = fingerprint(run.dataset, "train")
    finished = _finished(out, data, run.dataset)
    if finished is not None:
        return finished
    model, trainable = _start_model(spec, start, seed, run.head_only)
    loader = _training_batches(spec, run, seed)
    save_at = _checkpoint_steps(max(1, round(run.epochs * len(loader))), len(loader), n_checkpoints)
    on_step, saved = _checkpoint_saver(out, spec, save_at, seed, label)
    start_time = time.perf_counter()
    losses = fit(
        model,
        loader,
        run.epochs,
        run.lr,
        run.weight_decay,
        params=trainable,
        on_step=on_step,
        desc=label,
        device=device,
    )
    record = {
        "params": params,
        "checkpoints": saved,
        "data": data,
        "seconds": time.perf_counter() - start_time,
        "final_loss": losses[-1],
        "steps": len(losses),
        "device": device,
    }
    write_json(out / "run.json", record)
    return [out / name for name in saved], record


def _run_params(
    spec: ModelSpec, run: TrainSpec, start: dict | None, seed: int, n_checkpoints: int
) -> dict:
    """Everything that determines the run, which names its folder: the start weights by a key of
    their tensors' sums."""
    return {
        "model": spec.to_dict(),
        "run": asdict(run),
        "seed": seed,
        "n_checkpoints": n_checkpoints,
        "start": params_key({k: v.sum().item() for k, v in start.items()}) if start else None,
    }


def _start_model(spec: ModelSpec, start: dict | None, seed: int, head_only: bool):
    """The model before training (seeded init, then `start` when given) and the parameters it
    trains: the classifier alone, the rest frozen, when `head_only`."""
    torch.manual_seed(seed)
    model = build_model(spec)
    if start is not None:
        load_weights(model, start, "start weights")
    trainable = model.get_classifier().parameters() if head_only else model.parameters()
    if head_only:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model, trainable


def _training_batches(spec: ModelSpec, run: TrainSpec, seed: int):
    """The run's training set at the model's input size and normalisation, shuffled from `seed`."""
    return batches(
        run.dataset,
        "train",
        spec.img_size,
        run.batch_size,
        shuffle=True,
        subset=run.train_subset,
        seed=seed,
        norm=spec.norm,
    )


def _checkpoint_saver(out: Path, spec: ModelSpec, save_at: set[int], seed: int, label: str):
    """`fit`'s on_step callback saving (and hashing) a checkpoint after each step in `save_at`,
    and the list of file names it fills."""
    saved: list[str] = []

    def on_step(step: int, m) -> None:
        if step in save_at:
            name = f"ckpt_{len(saved):03d}.safetensors"
            save_checkpoint(
                out / name, state_dict_of(m), spec, {"step": step, "seed": seed, "label": label}
            )
            record_hash(out / name)
            saved.append(name)

    return on_step, saved


def _finished(out: Path, data: str, dataset: str) -> tuple[list[Path], dict] | None:
    """The checkpoints and record of the run in `out` if it finished on this `data` and kept every
    checkpoint; otherwise None, its record removed with one warning line (the run is trained
    again)."""
    if not (out / "run.json").is_file():
        return None
    record = read_json(out / "run.json")
    paths = [out / name for name in record["checkpoints"]]
    same_data = record.get("data") == data
    # a list: check (and warn on) every checkpoint
    if same_data and all([verified(p) for p in paths]):
        return paths, record
    print(
        f"[qg] warning: {out.name} "
        + ("lost a checkpoint" if same_data else f"was trained on other {dataset} data")
        + "; training the run again",
        file=sys.stderr,
        flush=True,
    )
    (out / "run.json").unlink()
    return None


def _checkpoint_steps(total: int, epoch: int, n_checkpoints: int) -> set[int]:
    """The steps (of `total`, `epoch` per epoch) after which a checkpoint is saved: `n_checkpoints`
    spread evenly over the last epoch, or the final step alone."""
    last_epoch = max(1, min(epoch, total))
    return {
        total - last_epoch + round((i + 1) * last_epoch / n_checkpoints)
        for i in range(n_checkpoints)
    } or {total}


def new_head(sd: dict[str, torch.Tensor], spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """`sd` with the classification head re-initialised (seeded): the start of the transfer task."""
    torch.manual_seed(seed)
    fresh = build_model(spec)
    head = {f"{n}" for n, _ in fresh.named_parameters() if n.startswith(_head_prefix(fresh))}
    return {k: (fresh.state_dict()[k].clone() if k in head else v) for k, v in sd.items()}


def _head_prefix(model) -> str:
    return next(n for n, m in model.named_modules() if m is model.get_classifier())


def task_start(pretrained: dict, spec: ModelSpec, task: TrainSpec, seed: int) -> dict:
    """The weights a task starts from: the pretrained ones, with a new head for a head-only task or
    for a dataset with another number of classes (ImageNet weights fine-tuned on CIFAR)."""
    shapes = build_model(spec).state_dict()
    fits = all(shapes[k].shape == v.shape for k, v in pretrained.items() if k in shapes)
    return new_head(pretrained, spec, seed) if task.head_only or not fits else pretrained
