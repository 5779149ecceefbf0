"""qg.targets.data on tiny fake files in each on-disk format, plus the real Fashion-MNIST when it is
installed."""

import gzip
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from fakes import (
    cifar_batch,
    write_cifar,
    write_cifar10,
    write_fashion_mnist,
    write_idx,
    write_imagenet,
)

from qg.core.io import CorruptFileError
from qg.targets import data, names, sources

REAL_DEBIAN_FASHION_MNIST = sources.DEBIAN_FASHION_MNIST


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test sees the real QG_DATA, the user's cache, the Debian files or the network."""
    monkeypatch.delenv("QG_DATA", raising=False)
    monkeypatch.setattr(sources, "DEFAULT_CACHE", tmp_path / "cache")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    monkeypatch.setattr(
        sources, "_download_fashion_mnist", lambda target: "URLError: no network in tests"
    )


# ------------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_from_root(tmp_path):
    images, labels = write_fashion_mnist(tmp_path / "fm")
    train = data.load_dataset("fashion_mnist", "train", root=tmp_path / "fm")
    assert (
        len(train) == 20
        and len(data.load_dataset("fashion_mnist", "test", root=tmp_path / "fm")) == 10
    )
    image, label = train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and label == labels[3]
    expected = (torch.tensor(images[3], dtype=torch.float32) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(image[0], expected)


def test_a_binary_task_relabels_the_classes_of_the_same_images(tmp_path, monkeypatch):
    images, labels = write_fashion_mnist(tmp_path / "fm", n_train=30)
    monkeypatch.setenv("QG_DATA", str(tmp_path / "fm"))
    name = names.relabelled("fashion_mnist", "0110001011")
    assert name == "fashion_mnist~0110001011" and names.split_name(name) == (
        "fashion_mnist",
        "0110001011",
    )
    assert (
        names.dataset_info(name)["num_classes"] == 2
        and names.dataset_info("fashion_mnist")["num_classes"] == 10
    )
    task, base = data.load_dataset(name, "train"), data.load_dataset("fashion_mnist", "train")
    assert torch.equal(task.pixels, base.pixels)  # the same images
    assert task.labels.tolist() == [int("0110001011"[c]) for c in labels]
    assert base.labels.tolist() == labels.tolist()  # the base dataset is untouched
    x, y = next(iter(data.batches(name, "train", 28, 8)))
    assert set(y.tolist()) <= {0, 1} and x.shape == (8, 1, 28, 28)
    assert data.fingerprint(name, "train") != data.fingerprint("fashion_mnist", "train")
    # one label, too short, not a label, a label skipped
    for bad in ("0000000000", "011", "01100010x1", "0220002022"):
        with pytest.raises(ValueError, match="not a relabelling.*fashion_mnist~01234-----"):
            names.relabelled("fashion_mnist", bad)
    with pytest.raises(ValueError, match="not a relabelling"):
        names.relabelled("imagenet", "01")  # streamed from folders: not relabelled


def test_a_class_split_keeps_only_its_classes_relabelled_from_0(tmp_path, monkeypatch):
    """The cpu profile's tasks: classes 0-4 for pretraining and the full task, 5-9 (labelled 0-4)
    for the head-only task; the two splits share no image."""
    images, labels = write_fashion_mnist(tmp_path / "fm", n_train=40)
    monkeypatch.setenv("QG_DATA", str(tmp_path / "fm"))
    first, other = "fashion_mnist~01234-----", "fashion_mnist~-----01234"
    a, b = (data.load_dataset(n, "train") for n in (first, other))
    assert names.dataset_info(first)["num_classes"] == names.dataset_info(other)["num_classes"] == 5
    assert len(a) + len(b) == 40 and len(a) == int((labels < 5).sum())
    assert torch.equal(a.pixels, torch.as_tensor(images[labels < 5]).unsqueeze(1))
    assert a.labels.tolist() == labels[labels < 5].tolist()
    assert b.labels.tolist() == (labels[labels >= 5] - 5).tolist()
    x, y = next(iter(data.batches(other, "train", 28, 4)))
    assert x.shape == (4, 1, 28, 28) and set(y.tolist()) <= set(range(5))
    assert data.fingerprint(first, "train") != data.fingerprint(other, "train")


@pytest.mark.parametrize("subdir", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_from_qg_data(tmp_path, monkeypatch, subdir):
    write_fashion_mnist(tmp_path / "store" / subdir, n_train=7)
    monkeypatch.setenv("QG_DATA", str(tmp_path / "store"))
    assert len(data.load_dataset("fashion_mnist", "train")) == 7


def test_fashion_mnist_truncated_file_is_named(tmp_path):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CorruptFileError, match="train-images-idx3-ubyte.gz.*(truncated|corrupt)"):
        data.load_dataset("fashion_mnist", "train", root=tmp_path)


def test_fashion_mnist_wrong_size_or_magic(tmp_path):
    write_fashion_mnist(tmp_path)
    labels_file = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels_file, "wb") as f:  # header says 10 labels, 9 follow
        f.write(struct.pack(">2i", 2049, 10) + bytes(9))
    with pytest.raises(CorruptFileError, match="t10k-labels-idx1-ubyte.gz holds 9 data bytes"):
        data.load_dataset("fashion_mnist", "test", root=tmp_path)
    write_idx(labels_file, np.zeros((10, 28, 28), np.uint8))  # an images file where labels belong
    with pytest.raises(CorruptFileError, match="magic number 2051"):
        data.load_dataset("fashion_mnist", "test", root=tmp_path)


def test_fashion_mnist_missing_explains_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load_dataset("fashion_mnist", "train", root=tmp_path / "empty")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "QG_DATA" in message
    assert str(tmp_path / "empty") in message and "no network in tests" in message


def test_fashion_mnist_uses_a_successful_download(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sources,
        "_download_fashion_mnist",
        lambda target: write_fashion_mnist(target / "FashionMNIST" / "raw", n_train=5) and None,
    )
    monkeypatch.setenv("QG_DATA", str(tmp_path / "downloads"))
    assert len(data.load_dataset("fashion_mnist", "train")) == 5


@pytest.mark.skipif(
    not (REAL_DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", REAL_DEBIAN_FASHION_MNIST)
    train, test = (
        data.load_dataset("fashion_mnist", "train"),
        data.load_dataset("fashion_mnist", "test"),
    )
    assert (len(train), len(test)) == (60000, 10000)
    assert train.pixels.shape == (60000, 1, 28, 28)
    assert sorted(set(test.labels.tolist())) == list(range(10))


# ------------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_determinism():
    train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert torch.bincount(test.labels).min() >= 43  # stratified: about 45 per class
    image, label = train[0]
    assert image.shape == (1, 8, 8) and isinstance(label, int)
    sources._digits_split.cache_clear()
    again = data.load_dataset("digits", "train")
    assert torch.equal(again.pixels, train.pixels) and torch.equal(again.labels, train.labels)


# -------------------------------------------------------------------------------------------- CIFAR


def python2_cifar_pickle(data_array, labels):
    """A batch pickled the way the official (Python 2) CIFAR files are: protocol 2, byte strings as
    BINSTRING, `numpy.core.multiarray._reconstruct`, and a version-3 dtype state."""

    def string(s):
        return b"U" + bytes([len(s)]) + s  # SHORT_BINSTRING

    def int4(i):
        return b"J" + struct.pack("<i", i)  # BININT

    dtype = (
        b"cnumpy\ndtype\n"
        + string(b"u1")
        + b"K\x00K\x01\x87R"
        + b"(K\x03"
        + string(b"|")
        + b"NNN"
        + int4(-1)
        + int4(-1)
        + b"K\x00tb"
    )
    raw = data_array.tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + string(b"b")
        + b"\x87R"
        + b"(K\x01"
        + int4(data_array.shape[0])
        + int4(data_array.shape[1])
        + b"\x86"
        + dtype
        + b"\x89T"
        + struct.pack("<I", len(raw))
        + raw
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"fine_labels") + label_list + b"u."


def test_cifar10(tmp_path):
    write_cifar10(tmp_path)
    train = data.load_dataset("cifar10", "train", root=tmp_path)
    test = data.load_dataset("cifar10", "test", root=tmp_path)
    assert (len(train), len(test)) == (20, 4)
    image, label = test[1]
    batch = cifar_batch(4, "labels", seed=5)
    assert image.shape == (3, 32, 32) and label == batch["labels"][1]
    red = (
        torch.tensor(batch["data"][1, :1024], dtype=torch.float32).view(32, 32) / 255 - 0.4914
    ) / 0.2470
    torch.testing.assert_close(image[0], red)


def test_cifar100_in_the_python2_format(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 3)):
        pixels, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), [99, 0, 42, 7, 1, 2][:n]
        (folder / name).write_bytes(python2_cifar_pickle(pixels, labels))
    monkeypatch.setenv("QG_DATA", str(tmp_path))
    test = data.load_dataset("cifar100", "test")
    assert len(test) == 3 and [test[i][1] for i in range(3)] == [99, 0, 42]
    assert torch.equal(test.pixels.reshape(3, -1), torch.from_numpy(pixels))
    assert names.dataset_info("cifar100")["num_classes"] == 100


def test_cifar_refuses_a_malicious_pickle(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Exploit(), "labels": []}, f)
    with pytest.raises(
        CorruptFileError, match=r"test_batch.*refused to load global '(posix|os)\.system'"
    ):
        data.load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


def test_cifar_wrong_content_and_missing_folder(tmp_path):
    folder = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(CorruptFileError, match="expected uint8 data N x 3072"):
        data.load_dataset("cifar10", "test", root=tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)cifar-100-python.*CIFAR100\(ROOT, download=True\)"
    ):
        data.load_dataset("cifar100", "train", root=tmp_path)


# ----------------------------------------------------------------------------------------- ImageNet


def test_imagenet_folder(tmp_path):
    write_imagenet(tmp_path)
    for split in ("train", "val", "test"):
        dataset = data.load_dataset("imagenet", split, root=tmp_path)
        image, label = dataset[3]
        assert len(dataset) == 4 and image.shape == (3, 224, 224) and label == 1
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        data.load_dataset("imagenet", "val", root=tmp_path / "imagenet" / "train")


# ---------------------------------------------------------------------------------------------- API


def test_batches_subset_is_deterministic(tmp_path):
    write_fashion_mnist(tmp_path, n_train=20, n_test=10)

    def first_epoch(seed):
        train = data.batches(
            "fashion_mnist", "train", 28, 4, shuffle=True, subset=8, seed=seed, root=tmp_path
        )
        test = data.batches("fashion_mnist", "test", 28, 4, subset=8, seed=seed, root=tmp_path)
        assert isinstance(train, data.TensorLoader) and (len(train.dataset), len(test.dataset)) == (
            8,
            8,
        )
        return torch.cat([y for _, y in train]), torch.cat([x for x, _ in test])

    (labels_a, test_a), (labels_b, test_b) = first_epoch(0), first_epoch(0)
    assert torch.equal(labels_a, labels_b) and torch.equal(test_a, test_b)
    assert not torch.equal(first_epoch(1)[1], test_a)
    assert (
        len(data.batches("fashion_mnist", "train", 28, 4, subset=1000, root=tmp_path).dataset) == 20
    )
    with pytest.raises(ValueError, match="subset must be a positive number"):
        data.batches("fashion_mnist", "train", 28, 4, subset=0, root=tmp_path)


def test_batches_stream_what_does_not_fit_with_the_same_images(tmp_path):
    """CIFAR at a large input size is streamed by a DataLoader; it yields the images the in-memory
    path does."""
    write_cifar(tmp_path, "cifar100", n=6)
    kw = dict(subset=5, seed=3, root=tmp_path)
    in_memory = data.batches("cifar100", "train", 48, 2, **kw)
    streamed = data.batches("cifar100", "train", 48, 2, in_memory_mb=0, num_workers=0, **kw)
    assert isinstance(in_memory, data.TensorLoader) and isinstance(
        streamed, torch.utils.data.DataLoader
    )
    (x_mem, y_mem), (x_str, y_str) = (
        [torch.cat(t) for t in zip(*loader)] for loader in (in_memory, streamed)
    )
    assert x_str.shape == (5, 3, 48, 48) and torch.equal(y_mem, y_str)
    torch.testing.assert_close(x_str, x_mem)
    # a pretrained timm ViT's normalisation instead of CIFAR's statistics
    half = ((0.5,) * 3, (0.5,) * 3)
    x_mem = next(iter(data.batches("cifar100", "train", 32, 5, norm=half, **kw)))[0]
    x_str = next(
        iter(
            data.batches("cifar100", "train", 32, 5, norm=half, in_memory_mb=0, num_workers=0, **kw)
        )
    )[0]
    dataset = data.load_dataset("cifar100", "train", root=tmp_path)
    index = (
        torch.randperm(len(dataset), generator=torch.Generator().manual_seed(3))[:5].sort().values
    )
    torch.testing.assert_close(x_mem, dataset.pixels[index].float() / 127.5 - 1)
    torch.testing.assert_close(x_str, x_mem)
    shuffled = [
        torch.cat(
            [
                y
                for _, y in data.batches(
                    "cifar100", "train", 48, 2, shuffle=True, in_memory_mb=0, num_workers=2, **kw
                )
            ]
        )
        for _ in range(2)
    ]
    assert torch.equal(*shuffled) and sorted(shuffled[0].tolist()) == sorted(y_mem.tolist())


def test_a_streamed_evaluation_set_is_held_in_memory_when_it_fits(tmp_path):
    write_cifar(tmp_path, "cifar10", n=4)
    streamed = data.batches("cifar10", "test", 40, 3, in_memory_mb=0, num_workers=0, root=tmp_path)
    held = data.held(streamed)
    assert isinstance(held, data.TensorLoader) and data.held(streamed, limit_mb=0) is streamed
    for (x_s, y_s), (x_h, y_h) in zip(streamed, held, strict=True):
        assert torch.equal(x_s, x_h) and torch.equal(y_s, y_h)
    with pytest.raises(ValueError, match="one mean and std per channel of fashion_mnist"):
        data.batches("fashion_mnist", "test", 28, 3, norm=((0.5,) * 3, (0.5,) * 3), root=tmp_path)


def test_batches_stream_imagenet_at_the_model_input_size(tmp_path):
    write_imagenet(tmp_path)
    loader = data.batches("imagenet", "train", 32, 3, shuffle=True, root=tmp_path, num_workers=0)
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in loader]
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert shapes == [((3, 3, 32, 32), (3,)), ((1, 3, 32, 32), (1,))]


def test_bad_names_and_splits_list_the_valid_ones():
    with pytest.raises(ValueError, match="fashion_mnist, digits, cifar10, cifar100, imagenet"):
        data.load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="train, test"):
        data.load_dataset("digits", "val")
    info = names.dataset_info("fashion_mnist")
    assert info == dict(num_classes=10, in_chans=1, img_size=28, mean=(0.2860,), std=(0.3530,))
    info["num_classes"] = 3
    assert names.dataset_info("fashion_mnist")["num_classes"] == 10


def test_qg_data_is_the_only_folder_searched_when_set(tmp_path, monkeypatch):
    """An empty or incomplete QG_DATA is an error, even when another copy (here: the Debian folder)
    exists."""
    write_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    assert len(data.load_dataset("fashion_mnist", "test")) == 10  # unset: the Debian copy is found
    (tmp_path / "mine").mkdir()
    monkeypatch.setenv("QG_DATA", str(tmp_path / "mine"))
    with pytest.raises(FileNotFoundError, match="mine"):
        data.load_dataset("fashion_mnist", "test")
    write_fashion_mnist(tmp_path / "mine")
    (tmp_path / "mine" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError):
        data.load_dataset("fashion_mnist", "test")


def test_images_of_another_size_and_labels_outside_the_classes_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    write_fashion_mnist(tmp_path)
    write_idx(
        tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 32, 32), dtype=np.uint8)
    )
    named = f"in {tmp_path / 't10k-images-idx3-ubyte.gz'} and t10k-labels-idx1-ubyte.gz"
    with pytest.raises(CorruptFileError, match=f"images {re.escape(named)} are 32x32, expected 28"):
        data.load_dataset("fashion_mnist", "test", root=tmp_path)
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, dtype=np.uint8))
    with pytest.raises(CorruptFileError, match=rf"labels {re.escape(named)} span 12..12, outside"):
        data.load_dataset("fashion_mnist", "test", root=tmp_path)
