"""Datasets for the target models: Fashion-MNIST, digits, CIFAR-10/100 and an ImageNet folder.

Every dataset yields `(image, label)` with `image` a normalised float tensor `C x H x W` and `label`
an int. The small sets (Fashion-MNIST, digits, CIFAR) are decoded once into uint8 tensors held in
memory and normalised per item; ImageNet is a torchvision `ImageFolder` read from disk. `batches` is
what training and evaluation use: mini-batches at a model's input size, from one in-memory tensor
when the split fits, else streamed from disk by a DataLoader (ImageNet, CIFAR at 224 px).

Nothing is downloaded unless asked for and possible: the CPU profile runs on Fashion-MNIST (the
Debian package `dataset-fashion-mnist`) and digits (shipped inside scikit-learn), both available
offline; the paper profile reads CIFAR and ImageNet from the standard on-disk layouts.

Where the files are looked for, for every dataset read from disk: the `root` argument, when given;
else the folder named by the environment variable `QG_DATA`, when set (only there: a named folder
that lacks the files is an error, not a reason to read another copy); else, for Fashion-MNIST, the
Debian package's folder `DEBIAN_FASHION_MNIST`, then the default cache `~/.cache/qg` (where a
download goes when `QG_DATA` is unset). Each dataset's own folder may sit directly in one of these
or in its usual sub-folder (`fashion-mnist/` or torchvision's `FashionMNIST/raw/`,
`cifar-10-batches-py/`, `cifar-100-python/`, `imagenet/`).

A binary task (RPG Sec. 4) is a dataset relabelled by an embedding of one 0/1 character per class,
named `relabelled("fashion_mnist", "0110001011")` = `fashion_mnist~0110001011`: the same images, two
classes.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qg.core.io import CorruptFileError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2 (and the 1.26 compatibility alias)
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE = Path("~/.cache/qg")
SPLITS = ("train", "test")

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


IN_MEMORY = ("fashion_mnist", "digits", "cifar10", "cifar100")  # decoded into an ImageTensorDataset
RELABEL = "~"  # dataset name ~ embedding: a binary task


def relabelled(name: str, embedding: str) -> str:
    """The name of dataset `name` relabelled by `embedding`: class c becomes class int(embedding[c])
    (RPG's binary tasks; the embedding must hold both labels, one character per class)."""
    full = f"{name}{RELABEL}{embedding}"
    _check_name(full)
    return full


def split_name(name: str) -> tuple[str, str | None]:
    """(base dataset, embedding or None) of a dataset name."""
    base, _, embedding = name.partition(RELABEL)
    return base, embedding or None


def dataset_info(name: str) -> dict:
    """`num_classes`, `in_chans`, `img_size`, `mean` and `std` of a dataset, enough to build its
    model."""
    _check_name(name)
    base, embedding = split_name(name)
    return {**DATASET_INFO[base], **({"num_classes": 2} if embedding else {})}


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> Dataset:
    """The `split` ("train" or "test"; ImageNet also takes "val", same as "test") of dataset `name`.

    `root`, when given, is the only folder searched for the files (else see the module docstring).
    """
    _check_name(name)
    valid = SPLITS + ("val",) if name == "imagenet" else SPLITS
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {name}; valid splits: {', '.join(valid)}")
    base, embedding = split_name(name)
    dataset = _LOADERS[base](split, root)
    return dataset if embedding is None else _relabel(dataset, embedding)


def _relabel(dataset: "ImageTensorDataset", embedding: str) -> "ImageTensorDataset":
    """The same images (shared, not copied) with class c labelled int(embedding[c])."""
    out = copy.copy(dataset)
    out.labels = torch.tensor([int(c) for c in embedding])[dataset.labels]
    return out


def fingerprint(name: str, split: str, root: str | os.PathLike | None = None) -> str:
    """A content digest of one split of a dataset, for caches to know what data they were computed
    from: the bytes of the images and labels of an in-memory set; the file list (relative names,
    sizes, labels) of an image folder, which is too large to hash for every run. Computed once per
    process, folder and state of the split's files (`source_stamp`)."""
    return _fingerprint(
        name,
        split,
        str(root) if root is not None else None,
        os.environ.get("QG_DATA"),
        source_stamp(name, split, root),
    )


def source_stamp(name: str, split: str, root=None) -> tuple:
    """(path, size, modification time) of the files a split is read from: what the in-process memos
    of decoded data and digests are keyed by, so that other files under the same names are read
    again in the same process (a notebook kernel that outlives a rerun of the data). Empty for
    digits (bundled with scikit-learn) and for an image folder (whose fingerprint is its
    listing)."""
    name = split_name(name)[0]  # a binary task reads its base dataset's files
    if split not in SPLITS:  # not a split these files hold: load_dataset says so
        files = []
    elif name == "fashion_mnist":
        folder = _find_fashion_mnist(root)
        files = [folder / f for f in FASHION_MNIST_FILES[split]]
    elif name in CIFAR_LAYOUT:
        folder_name, train_files, test_files, _ = CIFAR_LAYOUT[name]
        folder = _find_folder(folder_name, root, name)
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


def _check_name(name: str) -> None:
    base, embedding = split_name(name)
    if base not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_INFO)}")
    if embedding is None:
        return
    classes = DATASET_INFO[base]["num_classes"]
    if base not in IN_MEMORY or len(embedding) != classes or set(embedding) != {"0", "1"}:
        raise ValueError(
            f"{name!r} is not a binary task: relabel one of {sorted(IN_MEMORY)} "
            f"by a string of one 0 or 1 per class ({classes} for {base}), holding both"
        )


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


def _in_memory(name: str, pixels: np.ndarray, labels, max_value: float) -> ImageTensorDataset:
    """An in-memory dataset, refusing images of another size or labels outside the dataset's
    classes."""
    info, labels = DATASET_INFO[name], np.asarray(labels)
    side = info["img_size"]
    if tuple(pixels.shape[-2:]) != (side, side):
        raise CorruptFileError(
            f"{name} images are {pixels.shape[-2]}x{pixels.shape[-1]}, expected {side}x{side}: "
            "the files are not this dataset; point QG_DATA at the real files"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= info["num_classes"]):
        raise CorruptFileError(
            f"{name} labels span {labels.min()}..{labels.max()}, outside its classes "
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


# ------------------------------------------------------------------------------------ Fashion-MNIST

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SUBDIRS = (".", "fashion-mnist", "FashionMNIST/raw")
IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of unsigned-byte IDX files (images, labels)


def _fashion_mnist(split: str, root) -> ImageTensorDataset:
    """Fashion-MNIST from the IDX gz files; downloaded with torchvision only if found nowhere."""
    images_file, labels_file = FASHION_MNIST_FILES[split]
    folder = _find_fashion_mnist(root)
    images = _read_idx_cached(folder / images_file, ndim=3)
    labels = _read_idx_cached(folder / labels_file, ndim=1)
    if len(images) != len(labels):
        raise CorruptFileError(
            f"{folder} holds {len(images)} {split} images but {len(labels)} labels; "
            f"replace the folder's files with a matching set"
        )
    return _in_memory("fashion_mnist", images[:, None], labels, 255.0)


def _find_fashion_mnist(root) -> Path:
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
    array = read_idx(Path(path), ndim)
    array.flags.writeable = False  # shared by every caller through the cache
    return array


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped unsigned-byte IDX file (the MNIST format) with `ndim` dimensions, as a uint8 array.

    Raises `CorruptFileError` naming the file if it is not valid gzip, has the wrong magic number or
    holds fewer or more bytes than its header declares.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise _idx_error(path, f"cannot be decompressed ({type(e).__name__}: {e})") from e
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise _idx_error(path, f"is {len(raw)} bytes long, shorter than its {header}-byte header")
    magic, *shape = np.frombuffer(raw, dtype=">i4", count=1 + ndim)
    if magic != IDX_MAGIC[ndim]:
        raise _idx_error(
            path,
            f"has magic number {magic}, expected {IDX_MAGIC[ndim]} "
            f"(unsigned-byte IDX with {ndim} dimension(s))",
        )
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise _idx_error(
            path, f"holds {len(raw) - header} data bytes, its header declares {tuple(shape)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_error(path: Path, problem: str) -> CorruptFileError:
    fix = (
        "reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`"
        if path.parent == DEBIAN_FASHION_MNIST
        else "delete it and download or copy it again"
    )
    return CorruptFileError(f"{path} {problem}: the file is truncated or corrupt; {fix}")


# ------------------------------------------------------------------------------------------- digits

DIGITS_TEST_SIZE = 450


def _digits(split: str, root) -> ImageTensorDataset:
    """scikit-learn's 8x8 digits (1797 images, pixel values 0..16), split 1347 train / 450 test.

    The split is stratified by class and fixed (`train_test_split(..., test_size=450,
    stratify=labels, random_state=0)`), so every run and every machine sees the same two sets.
    `root` is unused: the data ships inside scikit-learn.
    """
    pixels, labels = _digits_split()[split]
    return _in_memory("digits", pixels[:, None], labels, 16.0)


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


# -------------------------------------------------------------------------------------------- CIFAR

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
    folder = _find_folder(folder_name, root, name)
    batches = [
        _load_cifar_batch(folder / f, label_key)
        for f in (train_files if split == "train" else test_files)
    ]
    pixels = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return _in_memory(name, pixels, labels, 255.0)


def _find_folder(folder_name: str, root, name: str) -> Path:
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


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain Python containers and the numpy arrays of CIFAR batches.

    The project never unpickles files it is handed, because unpickling can run arbitrary code. The
    official CIFAR batches are pickles, though (a dict of labels and a uint8 `data` array, written
    by Python 2 with numpy), so they are read with this restricted unpickler: every global the
    stream asks for is refused except the three needed to rebuild a numpy array
    (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`, under their numpy 1 and
    numpy 2 module names). These construct arrays and nothing else, so a crafted file can at worst
    produce wrong data, which the caller then checks.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}': a CIFAR batch only "
                f"needs numpy's array constructors"
            )
        return _reconstruct if name == "_reconstruct" else getattr(np, name)


def _load_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 N x 3072, labels int N) of one CIFAR batch, read with `CifarUnpickler`.

    `encoding="latin1"` is what the Python 2 batches need (as in torchvision): their byte strings,
    the array data included, come back as str that numpy turns back into bytes, and the dict keys
    are str.
    """
    fix = (
        "delete the folder and download the dataset again "
        "(see torchvision.datasets.CIFAR10/CIFAR100)"
    )
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch {path} is missing; {fix}")
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CorruptFileError(f"{path} is not a valid CIFAR batch ({e}); {fix}") from e
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise CorruptFileError(
            f"{path} lacks the 'data' and '{label_key}' entries of a CIFAR batch; {fix}"
        )
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
        and labels.shape == (len(data),)
    ):
        raise CorruptFileError(
            f"{path} is not a CIFAR batch: expected uint8 data N x 3072 and N labels, got "
            f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')} and "
            f"{labels.shape} labels; {fix}"
        )
    return data, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------- ImageNet


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


_LOADERS = {
    "fashion_mnist": _fashion_mnist,
    "digits": _digits,
    "cifar10": functools.partial(_cifar, "cifar10"),
    "cifar100": functools.partial(_cifar, "cifar100"),
    "imagenet": _imagenet,
}


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
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive number of examples or None, got {subset}")
    _check_name(name)
    channels = dataset_info(name)["in_chans"]
    if norm is not None and any(len(v) != channels for v in norm):
        raise ValueError(
            f"normalisation {norm} does not have one mean and std per channel of {name} "
            f"({channels}): the model's `norm` was made for other data; "
            f"fix or remove it in the profile"
        )
    subset_seed = seed if subset_seed is None else subset_seed
    dataset = _subset(load_dataset(name, split, root), subset, subset_seed)
    limit = (
        float(os.environ.get("QG_IN_MEMORY_MB", IN_MEMORY_MB))
        if in_memory_mb is None
        else in_memory_mb
    )
    if _float_mb(dataset, img_size) <= limit:
        # the whole split is the same for every seed
        key_seed = subset_seed if subset is not None else 0
        data = _cached_tensors(
            name,
            split,
            img_size,
            subset,
            key_seed,
            root,
            norm,
            os.environ.get("QG_DATA"),
            source_stamp(name, split, root),
        )
        return TensorLoader(*data, batch_size, shuffle, seed)
    info = dataset_info(name)
    return DataLoader(
        Resized(dataset, img_size, (info["mean"], info["std"]), norm),
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
