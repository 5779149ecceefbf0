"""Test helpers: tiny timm target models and their checkpoints, and tiny fake datasets in the real
on-disk formats, for tests of the data paths (no download anywhere)."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qg.targets import sources
from qg.targets.models import ModelSpec, build_model, state_dict_of

TINY_VIT = ModelSpec(
    "VisionTransformer",
    dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2),
)
TINY_MIXER = ModelSpec(
    "MlpMixer",
    dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, num_blocks=2),
)


def checkpoints(spec: ModelSpec, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` distinct checkpoints of one model: a random init plus small seeded perturbations."""
    torch.manual_seed(seed)
    base = state_dict_of(build_model(spec))
    gen = torch.Generator().manual_seed(seed + 1)
    return [
        {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(n)
    ]


def write_idx(path, array):
    """`array` (uint8) as a gzipped IDX file, the MNIST on-disk format."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    with gzip.open(path, "wb") as f:
        f.write(
            struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
            + array.astype(np.uint8).tobytes()
        )


def write_fashion_mnist(folder, n_train=20, n_test=10, seed=0):
    """Fake Fashion-MNIST files; returns the train images and labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images_file, labels_file = sources.FASHION_MNIST_FILES[split]
        write_idx(folder / images_file, images)
        write_idx(folder / labels_file, labels)
        arrays[split] = images, labels
    return arrays["train"]


def cifar_batch(n, label_key, seed):
    rng = np.random.default_rng(seed)
    return {
        "batch_label": "fake",
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, 10, n).tolist(),
        "filenames": [f"{i}.png" for i in range(n)],
    }


def write_cifar(root, name="cifar10", n=4):
    """Fake CIFAR-10 or CIFAR-100 batches (`n` images per batch file) in torchvision's folder
    layout."""
    folder_name, train_files, test_files, label_key = sources.CIFAR_LAYOUT[name]
    folder = root / folder_name
    folder.mkdir(parents=True)
    for seed, file in enumerate(train_files + test_files):
        with open(folder / file, "wb") as f:
            pickle.dump(cifar_batch(n, label_key, seed), f)
    return folder


def write_cifar10(root, n=4):
    return write_cifar(root, "cifar10", n)


def write_imagenet(root, classes=("n01440764", "n01443537"), per_class=2, size=(40, 60), seed=0):
    """A fake ImageNet: `root`/imagenet/{train,val}/<class>/<i>.png, random pixels."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls in classes:
            (root / "imagenet" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "imagenet" / split / cls / f"{i}.png")
    return root / "imagenet"


def fake_collect(
    collect_dir,
    n_a: int = 5,
    n_b: int = 1,
    spec: ModelSpec | None = None,
    seed: int = 0,
    n_c: int = 1,
) -> dict:
    """A collect folder as 01_collect leaves it, for one (vit, full) pair on digits: the
    checkpoints of runs A, B and C (seeded random weights) and the manifest naming them
    (`write_manifest`). Returns the manifest's runs."""
    from qg.targets.models import save_checkpoint

    spec = spec or ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "digits")
    runs = {
        run: [f"vit/full/{run}-k/ckpt_{i:03d}.safetensors" for i in range(n)]
        for run, n in (("runA", n_a), ("runB", n_b), ("runC", n_c))
    }
    torch.manual_seed(seed)
    for name in runs["runA"] + runs["runB"] + runs["runC"]:
        save_checkpoint(collect_dir / name, state_dict_of(build_model(spec)), spec)
    write_manifest(
        collect_dir,
        {"archs": {"vit": {"tasks": {"full": {**runs, "task": {"dataset": "digits"}}}}}},
    )
    return runs


def write_manifest(collect_dir, manifest: dict) -> None:
    """A collect folder's manifest, its cache (`collect_dir`'s parent) marked as this qg's format
    as the pipeline marks it, so that an `Experiment` over it does not set it aside as an older
    cache."""
    from qg.core.io import CACHE_FORMAT, FORMAT_FILE, write_json

    write_json(Path(collect_dir) / "manifest.json", manifest)
    (Path(collect_dir).parent / FORMAT_FILE).write_text(f"{CACHE_FORMAT}\n")
