"""Where each dataset's files are found and how each is read: Fashion-MNIST's IDX files, sklearn's
digits, CIFAR's batches, an ImageNet folder (the file formats themselves: `qg.targets.formats`); and
what each dataset is (`DATASET_INFO`: classes, image size, normalisation).

Where the files are looked for, for every dataset read from disk: the `root` argument, when given;
else the folder named by the environment variable `QG_DATA`, when set (only there: a named folder
that lacks the files is an error, not a reason to read another copy); else, for Fashion-MNIST, the
Debian package's folder `DEBIAN_FASHION_MNIST`, then the default cache `~/.cache/qg` (where a
download goes when `QG_DATA` is unset). Each dataset's own folder may sit directly in one of these
or in its usual sub-folder (`fashion-mnist/` or torchvision's `FashionMNIST/raw/`,
`cifar-10-batches-py/`, `cifar-100-python/`, `imagenet/`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from qg.core.io import CorruptFileError

from .formats import load_cifar_batch, read_idx

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE = Path("~/.cache/qg")
DATASET_INFO = {
    # mean/std: per-channel statistics of the training split, in [0, 1] pixel units.
    "fashion_mnist": dict(num_classes=10, in_chans=1, img_size=28, mean=(0.2860,), std=(0.3530,)),
    "digits": dict(num_classes=10, in_chans=1, img_size=8, mean=(0.3052,), std=(0.3760,)),
    "cifar10": dict(
        num_classes=10,
        in_chans=3,
        img_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        num_classes=100,
        in_chans=3,
        img_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "imagenet": dict(
        num_classes=1000,
        in_chans=3,
        img_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
}


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 `N x C x H x W` with integer pixel values in [0, `max_value`].

    Items are scaled to [0, 1] and normalised with the dataset's mean and std when read, which keeps
    memory at one byte per pixel (CIFAR's training set would take 600 MB as floats).
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, max_value: float, mean, std):
        if len(pixels) != len(labels):
            raise ValueError(f"{len(pixels)} images but {len(labels)} labels")
        self.pixels, self.labels = pixels, labels.long()
        self.scale = 1.0 / max_value
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = (self.pixels[i].float() * self.scale - self.mean) / self.std
        return image, int(self.labels[i])


def _in_memory(
    name: str, pixels: np.ndarray, labels, max_value: float, source: str
) -> ImageTensorDataset:
    """An in-memory dataset, refusing images of another size or labels outside the dataset's
    classes, naming `source` (the files they came from)."""
    info, labels = DATASET_INFO[name], np.asarray(labels)
    side = info["img_size"]
    if tuple(pixels.shape[-2:]) != (side, side):
        raise CorruptFileError(
            f"{name} images in {source} are {pixels.shape[-2]}x{pixels.shape[-1]}, expected "
            f"{side}x{side}: the files are not this dataset; point QG_DATA at the real files"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= info["num_classes"]):
        raise CorruptFileError(
            f"{name} labels in {source} span {labels.min()}..{labels.max()}, outside its classes "
            f"0..{info['num_classes'] - 1}: the label file is damaged or of another dataset"
        )
    return ImageTensorDataset(
        torch.tensor(pixels), torch.tensor(labels), max_value, info["mean"], info["std"]
    )


def _search_roots(root, extra: tuple[Path, ...] = ()) -> list[Path]:
    """Folders to search: `root` when given, else $QG_DATA when set, else `extra` and the default
    cache.

    A folder the user named is the only one searched: one that lacks the files is an error, never a
    reason to evaluate on another copy of the data found elsewhere."""
    named = root if root is not None else os.environ.get("QG_DATA") or None
    roots = [Path(named)] if named else [*extra, DEFAULT_CACHE]
    return list(dict.fromkeys(p.expanduser() for p in roots))


FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


FASHION_MNIST_SUBDIRS = (".", "fashion-mnist", "FashionMNIST/raw")


def _fashion_mnist(split: str, root) -> ImageTensorDataset:
    """Fashion-MNIST from the IDX gz files; downloaded with torchvision only if found nowhere."""
    images_file, labels_file = FASHION_MNIST_FILES[split]
    folder = find_fashion_mnist(root)
    images = _read_idx_cached(folder / images_file, ndim=3)
    labels = _read_idx_cached(folder / labels_file, ndim=1)
    if len(images) != len(labels):
        raise CorruptFileError(
            f"{folder} holds {len(images)} {split} images but {len(labels)} labels; "
            f"replace the folder's files with a matching set"
        )
    source = f"{folder / images_file} and {labels_file}"
    return _in_memory("fashion_mnist", images[:, None], labels, 255.0, source)


def find_fashion_mnist(root) -> Path:
    """The first folder holding all four IDX files; else try a download; else explain where to get
    them."""
    roots = _search_roots(root, extra=(DEBIAN_FASHION_MNIST,))
    candidates = [r / sub for r in roots for sub in FASHION_MNIST_SUBDIRS]
    names = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
    for folder in candidates:
        if all((folder / f).is_file() for f in names):
            return folder.resolve()
    target = Path(root or os.environ.get("QG_DATA") or DEFAULT_CACHE).expanduser()
    downloaded = target / "FashionMNIST/raw"
    failure = _download_fashion_mnist(target)
    if failure is None and all((downloaded / f).is_file() for f in names):
        return downloaded.resolve()
    searched = "\n".join(f"  {c}" for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST files ({', '.join(names)}) not found in any of:\n{searched}\n"
        f"and the download into {target} failed: {failure or f'it left no files in {downloaded}'}\n"
        f"Fix one of: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts them in "
        f"{DEBIAN_FASHION_MNIST}); set QG_DATA to a folder holding train-images-idx3-ubyte.gz "
        f"and the other three files; or run once on a machine with internet access."
    )


def _download_fashion_mnist(target: Path) -> str | None:
    """Download with torchvision into `target`/FashionMNIST/raw; None on success, else why it
    failed."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(target), download=True)
    except Exception as e:  # no network, proxy refusal, disk full...: all reported to the user
        return f"{type(e).__name__}: {e}"
    return None


def _read_idx_cached(path: Path, ndim: int) -> np.ndarray:
    """`read_idx` memoised on the file's path, size and modification time (notebooks reload
    often)."""
    stat = path.stat()
    return _read_idx_memo(str(path), stat.st_size, stat.st_mtime_ns, ndim)


@functools.lru_cache(maxsize=8)
def _read_idx_memo(path: str, size: int, mtime_ns: int, ndim: int) -> np.ndarray:
    array = read_idx(Path(path), ndim, _idx_fix(Path(path)))
    array.flags.writeable = False  # shared by every caller through the cache
    return array


def _idx_fix(path: Path) -> str:
    """How to replace a damaged IDX file: reinstall the Debian package's, re-fetch any other."""
    if path.parent == DEBIAN_FASHION_MNIST:
        return "reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`"
    return "delete it and download or copy it again"


DIGITS_TEST_SIZE = 450


def _digits(split: str, root) -> ImageTensorDataset:
    """scikit-learn's 8x8 digits (1797 images, pixel values 0..16), split 1347 train / 450 test.

    The split is stratified by class and fixed (`train_test_split(..., test_size=450,
    stratify=labels, random_state=0)`), so every run and every machine sees the same two sets.
    `root` is unused: the data ships inside scikit-learn.
    """
    pixels, labels = _digits_split()[split]
    return _in_memory("digits", pixels[:, None], labels, 16.0, "scikit-learn's load_digits()")


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.images.astype(np.uint8)  # integer grey levels 0..16 stored as floats by sklearn
    train, test = train_test_split(
        np.arange(len(pixels)), test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0
    )
    return {
        "train": (pixels[train], digits.target[train]),
        "test": (pixels[test], digits.target[test]),
    }


CIFAR_LAYOUT = {
    # name: (folder, train batches, test batches, label key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _cifar(name: str, split: str, root) -> ImageTensorDataset:
    """CIFAR-10 or CIFAR-100 from torchvision's on-disk layout (the official "python version"
    batches)."""
    folder_name, train_files, test_files, label_key = CIFAR_LAYOUT[name]
    folder = find_folder(folder_name, root, name)
    batches = [
        load_cifar_batch(folder / f, label_key)
        for f in (train_files if split == "train" else test_files)
    ]
    pixels = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return _in_memory(name, pixels, labels, 255.0, str(folder))


def find_folder(folder_name: str, root, name: str) -> Path:
    """The first `<search root>/<folder_name>` that exists, else a FileNotFoundError saying how to
    get it."""
    candidates = [r / folder_name for r in _search_roots(root)]
    for folder in candidates:
        if folder.is_dir():
            return folder
    searched = "\n".join(f"  {c}" for c in candidates)
    torchvision_class = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name]
    raise FileNotFoundError(
        f"{name} folder {folder_name!r} not found; looked for:\n{searched}\n"
        f"Get it on a machine with internet access with "
        f"`torchvision.datasets.{torchvision_class}(ROOT, download=True)`, copy ROOT/{folder_name} "
        f"here, and pass root=ROOT or set QG_DATA=ROOT."
    )


def imagenet_transform(train: bool):
    """timm's default 224-pixel transforms with ImageNet mean/std.

    Eval: resize the short side to 256 (crop_pct 0.875, bilinear) then center-crop 224. Train:
    random resized crop to 224 and horizontal flip. Pretrained timm models may declare other
    crop_pct or interpolation in their config; these are the generic defaults.
    """
    from torchvision import transforms as T

    info = DATASET_INFO["imagenet"]
    size = info["img_size"]
    crop = (
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        if train
        else [T.Resize(256), T.CenterCrop(size)]
    )
    return T.Compose([*crop, T.ToTensor(), T.Normalize(info["mean"], info["std"])])


def _imagenet(split: str, root) -> Dataset:
    """ImageNet as a torchvision ImageFolder over `<folder>/train` or `<folder>/val` (one folder per
    class).

    `<folder>` is the first search root that has both `train/` and `val/`, or its `imagenet/`
    sub-folder. The folder scan (1.3M files) is done once per folder and reused.
    """
    candidates = [r / sub for r in _search_roots(root) for sub in (".", "imagenet")]
    for folder in candidates:
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            sub = "train" if split == "train" else "val"
            return _image_folder(str((folder / sub).resolve()), train=split == "train")
    searched = "\n".join(f"  {c}" for c in candidates)
    raise FileNotFoundError(
        "ImageNet not found: none of these folders has both train/ and val/ sub-folders:\n"
        f"{searched}\n"
        "Download ILSVRC-2012 from image-net.org, arrange train/ and val/ as one sub-folder per "
        "class (the layout torchvision's ImageFolder reads), and pass root=FOLDER or set "
        "QG_DATA=FOLDER."
    )


@functools.lru_cache(maxsize=4)
def _image_folder(path: str, train: bool) -> Dataset:
    from torchvision.datasets import ImageFolder

    return ImageFolder(path, transform=imagenet_transform(train))


LOADERS = {
    "fashion_mnist": _fashion_mnist,
    "digits": _digits,
    "cifar10": functools.partial(_cifar, "cifar10"),
    "cifar100": functools.partial(_cifar, "cifar100"),
    "imagenet": _imagenet,
}
