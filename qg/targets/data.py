"""Datasets for the target models: Fashion-MNIST, digits, CIFAR-10/100 and an ImageNet folder.

Every dataset yields `(image, label)` with `image` a normalised float tensor `C x H x W` and `label`
an int. The small sets (Fashion-MNIST, digits, CIFAR) are decoded once into uint8 tensors held in
memory and normalised per item; ImageNet is a torchvision `ImageFolder` read from disk. `batches` is
what training and evaluation use: mini-batches at a model's input size, from one in-memory tensor
when the split fits, else streamed from disk by a DataLoader (ImageNet, CIFAR at 224 px).

Nothing is downloaded unless asked for and possible: the CPU profile runs on Fashion-MNIST (the
Debian package `dataset-fashion-mnist`) and digits (shipped inside scikit-learn), both available
offline; the paper profile reads CIFAR and ImageNet from the standard on-disk layouts.

Where each dataset's files are looked for, and how they are decoded: `qg.targets.sources`.

A dataset may be one relabelled (a binary task, a class split): `qg.targets.names`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .names import DROP, check_name, dataset_info, split_name
from .sources import (
    CIFAR_LAYOUT,
    FASHION_MNIST_FILES,
    LOADERS,
    ImageTensorDataset,
    find_fashion_mnist,
    find_folder,
)

SPLITS = ("train", "test")


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> Dataset:
    """The `split` ("train" or "test"; ImageNet also takes "val", same as "test") of dataset `name`.

    `root`, when given, is the only folder searched for the files (else see the module docstring).
    """
    check_name(name)
    valid = SPLITS + ("val",) if name == "imagenet" else SPLITS
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {name}; valid splits: {', '.join(valid)}")
    base, embedding = split_name(name)
    dataset = LOADERS[base](split, root)
    return dataset if embedding is None else _relabel(dataset, embedding)


def _relabel(dataset: "ImageTensorDataset", embedding: str) -> "ImageTensorDataset":
    """The images of the classes kept (shared, not copied, when all are), class c labelled
    int(embedding[c])."""
    table = torch.tensor([-1 if c == DROP else int(c) for c in embedding])
    labels = table[dataset.labels]
    out, kept = copy.copy(dataset), labels >= 0
    if not kept.all():
        out.pixels = dataset.pixels[kept]
    out.labels = labels[kept]
    return out


def fingerprint(name: str, split: str, root: str | os.PathLike | None = None) -> str:
    """A content digest of one split of a dataset, for caches to know what data they were computed
    from: the bytes of the images and labels of an in-memory set; the file list (relative names,
    sizes, labels) of an image folder, which is too large to hash for every run. Computed once per
    process, folder and state of the split's files (`source_stamp`)."""
    return _fingerprint(
        name, split, str(root) if root is not None else None, *_memo_state(name, split, root)
    )


def _memo_state(name: str, split: str, root) -> tuple[str | None, tuple]:
    """($QG_DATA, `source_stamp`): what the in-process memos of a split are keyed by besides their
    arguments, so that other files under the same names are read again."""
    return os.environ.get("QG_DATA"), source_stamp(name, split, root)


def source_stamp(name: str, split: str, root=None) -> tuple:
    """(path, size, modification time) of the files a split is read from: what the in-process memos
    of decoded data and digests are keyed by, so that other files under the same names are read
    again in the same process (a notebook kernel that outlives a rerun of the data). Empty for
    digits (bundled with scikit-learn) and for an image folder (whose fingerprint is its
    listing)."""
    name = split_name(name)[0]  # a relabelled dataset reads its base dataset's files
    if split not in SPLITS:  # not a split these files hold: load_dataset says so
        files = []
    elif name == "fashion_mnist":
        folder = find_fashion_mnist(root)
        files = [folder / f for f in FASHION_MNIST_FILES[split]]
    elif name in CIFAR_LAYOUT:
        folder_name, train_files, test_files, _ = CIFAR_LAYOUT[name]
        folder = find_folder(folder_name, root, name)
        files = [folder / f for f in (train_files if split == "train" else test_files)]
    else:
        files = []
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=16)
def _fingerprint(name: str, split: str, root: str | None, qg_data: str | None, stamp: tuple) -> str:
    dataset, h = load_dataset(name, split, root), hashlib.sha256(f"{name}/{split}".encode())
    if isinstance(dataset, ImageTensorDataset):
        h.update(dataset.pixels.numpy().tobytes())
        h.update(dataset.labels.numpy().tobytes())
    else:
        base = Path(dataset.root)
        for file, label in dataset.samples:
            h.update(
                f"{Path(file).relative_to(base)}:{Path(file).stat().st_size}:{label}\n".encode()
            )
    return h.hexdigest()


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """`size` examples of `dataset` drawn without replacement by a generator seeded with `seed`."""
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].sort().values.tolist())


def as_tensors(
    dataset: Dataset, img_size: int | None = None, norm: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (in-memory or subset of in-memory) dataset as one normalised image tensor and its
    labels.

    Evaluating and fine-tuning the small target models batch-wise from these tensors is several
    times faster than a per-item DataLoader. `img_size` resizes (bilinear) to a model's input size,
    which is how 8x8 digits feed a model built for 28x28 inputs. `norm` = (mean, std) normalises
    with a model's own statistics instead of the dataset's.
    """
    base, index = (
        (dataset.dataset, torch.tensor(dataset.indices))
        if isinstance(dataset, Subset)
        else (dataset, None)
    )
    if not isinstance(base, ImageTensorDataset):
        raise TypeError(
            "as_tensors needs an in-memory dataset (Fashion-MNIST, digits, CIFAR), "
            f"got {type(base).__name__}"
        )
    pixels, labels = (
        (base.pixels, base.labels) if index is None else (base.pixels[index], base.labels[index])
    )
    mean, std = (
        (base.mean, base.std) if norm is None else (torch.tensor(v).view(-1, 1, 1) for v in norm)
    )
    images = (pixels.float() * base.scale - mean) / std
    if img_size is not None and images.shape[-1] != img_size:
        images = torch.nn.functional.interpolate(
            images, size=(img_size, img_size), mode="bilinear", align_corners=False
        )
    return images, labels


class TensorLoader:
    """Mini-batches of in-memory tensors, reshuffled each epoch by a generator seeded with `seed`.

    A drop-in for a DataLoader over `as_tensors` output (len() is batches per epoch), without
    per-item Python overhead.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
    ):
        self.images, self.labels, self.batch_size, self.shuffle = (
            images,
            labels,
            batch_size,
            shuffle,
        )
        self.dataset = torch.utils.data.TensorDataset(images, labels)  # as DataLoader.dataset
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        order = (
            torch.randperm(len(self.labels), generator=self.generator)
            if self.shuffle
            else torch.arange(len(self.labels))
        )
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.images[idx], self.labels[idx]


# A split larger than this (MB, as float tensors at the model's input size) is streamed from disk;
# the environment variable QG_IN_MEMORY_MB changes it (0 streams everything: how the tests exercise
# the paper profile's path).
IN_MEMORY_MB = 2048


def _check_request(name: str, subset: int | None, norm: tuple | None) -> None:
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive number of examples or None, got {subset}")
    check_name(name)
    channels = dataset_info(name)["in_chans"]
    if norm is not None and any(len(v) != channels for v in norm):
        raise ValueError(
            f"normalisation {norm} does not have one mean and std per channel of {name} "
            f"({channels}): the model's `norm` was made for other data; "
            f"fix or remove it in the profile"
        )


def batches(
    name: str,
    split: str,
    img_size: int,
    batch_size: int,
    shuffle: bool = False,
    subset: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    num_workers: int = 8,
    in_memory_mb: float | None = None,
    norm: tuple | None = None,
    subset_seed: int | None = None,
):
    """Mini-batches `(images, labels)` of a split at a model's input size, optionally a seeded
    `subset`.

    A split that fits in `in_memory_mb` (default `IN_MEMORY_MB`, or $QG_IN_MEMORY_MB) as floats
    (Fashion-MNIST, digits, CIFAR at small input sizes) is decoded once into one tensor and batched
    from memory by a `TensorLoader`, several times faster than per-item loading. Anything else
    (ImageNet's folders, CIFAR resized to 224 px: 30 GB as floats) is streamed from disk by a
    DataLoader with `num_workers` processes (a fixed number, since ImageNet's random crops are drawn
    per worker). Both paths draw the same images (`subset` examples chosen by `subset_seed`, default
    `seed`) and reshuffle every epoch deterministically from `seed`, each in its own order. `norm` =
    (mean, std) normalises with the model's statistics (a pretrained timm model's own) instead of
    the dataset's.
    """
    _check_request(name, subset, norm)
    subset_seed = seed if subset_seed is None else subset_seed
    dataset = _subset(load_dataset(name, split, root), subset, subset_seed)
    if _fits_in_memory(dataset, img_size, in_memory_mb):
        # the whole split is the same for every seed
        key_seed = subset_seed if subset is not None else 0
        data = _cached_tensors(
            name, split, img_size, subset, key_seed, root, norm, *_memo_state(name, split, root)
        )
        return TensorLoader(*data, batch_size, shuffle, seed)
    info = dataset_info(name)
    return _streamed(
        Resized(dataset, img_size, (info["mean"], info["std"]), norm),
        batch_size,
        shuffle,
        num_workers,
        seed,
    )


def _streamed(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader reading `dataset` from disk in `num_workers` processes, shuffled from `seed`."""
    return DataLoader(
        dataset,
        batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def held(loader, limit_mb: float = 8192):
    """`loader` with a streamed split decoded once and held in memory, when it fits in `limit_mb` as
    floats.

    For unshuffled evaluation sets scored thousands of times: ImageNet's validation JPEGs are then
    decoded once, not once per model, and the batches are the same (the eval transform is
    deterministic).
    """
    if (
        isinstance(loader, TensorLoader)
        or len(loader.dataset) * loader.dataset[0][0].numel() * 4 / 2**20 > limit_mb
    ):
        return loader
    images, labels = (torch.cat(t) for t in zip(*loader))
    return TensorLoader(images, labels, loader.batch_size, shuffle=False)


def _fits_in_memory(dataset: Dataset, img_size: int, limit_mb: float | None) -> bool:
    """Whether `batches` holds `dataset` in memory: its size as floats at `img_size` is within
    `limit_mb` (None: $QG_IN_MEMORY_MB, else `IN_MEMORY_MB`)."""
    if limit_mb is None:
        limit_mb = float(os.environ.get("QG_IN_MEMORY_MB", IN_MEMORY_MB))
    return _float_mb(dataset, img_size) <= limit_mb


def _float_mb(dataset: Dataset, img_size: int) -> float:
    """Size in MB of a dataset as one float32 tensor at `img_size`; infinite when it is not held in
    memory."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if not isinstance(base, ImageTensorDataset):
        return float("inf")
    return len(dataset) * base.pixels.shape[1] * img_size**2 * 4 / 2**20


@functools.lru_cache(maxsize=4)
def _cached_tensors(
    name, split, img_size, subset, seed, root, norm, qg_data, stamp
) -> tuple[torch.Tensor, torch.Tensor]:
    """`as_tensors` of a split's seeded subset, memoised on its arguments, $QG_DATA (`qg_data`) and
    the state of its files (`source_stamp`): notebooks evaluate thousands of models on one test set
    and QAT-tune hundreds of checkpoints on one training set."""
    return as_tensors(_subset(load_dataset(name, split, root), subset, seed), img_size, norm)


class Resized(Dataset):
    """A dataset's images resized (bilinear, as `as_tensors`) to `img_size` when they differ, and
    moved from the normalisation `source` = (mean, std) they come with to `norm` when it is
    given."""

    def __init__(
        self,
        dataset: Dataset,
        img_size: int,
        source: tuple | None = None,
        norm: tuple | None = None,
    ):
        self.dataset, self.img_size = dataset, img_size
        self.scale = self.shift = None
        # x_norm = (x_source * std_s + mean_s - mean_n) / std_n, exact since both are affine
        if norm is not None:
            (mean_s, std_s), (mean_n, std_n) = (
                (torch.tensor(v).view(-1, 1, 1) for v in pair) for pair in (source, norm)
            )
            self.scale, self.shift = std_s / std_n, (mean_s - mean_n) / std_n

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[i]
        if image.shape[-1] != self.img_size or image.shape[-2] != self.img_size:
            image = torch.nn.functional.interpolate(
                image[None],
                size=(self.img_size, self.img_size),
                mode="bilinear",
                align_corners=False,
            )[0]
        if self.scale is not None:
            image = image * self.scale + self.shift
        return image, label
