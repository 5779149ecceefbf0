"""The file formats datasets come in, read without trusting them: gzipped IDX (Fashion-MNIST) and
CIFAR's pickled batches, the one pickle the project opens, through an unpickler that builds numpy
arrays and nothing else. A damaged file is a `CorruptFileError` naming it and the fix.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

from qg.core.io import CorruptFileError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2 (and the 1.26 compatibility alias)
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct

IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of unsigned-byte IDX files (images, labels)


def read_idx(
    path: Path, ndim: int, fix: str = "delete it and download or copy it again"
) -> np.ndarray:
    """A gzipped unsigned-byte IDX file (the MNIST format) with `ndim` dimensions, as a uint8 array.

    Raises `CorruptFileError` naming the file if it is not valid gzip, has the wrong magic number or
    holds fewer or more bytes than its header declares; `fix` says how to replace it.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise _idx_error(path, fix, f"cannot be decompressed ({type(e).__name__}: {e})") from e
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise _idx_error(
            path, fix, f"is {len(raw)} bytes long, shorter than its {header}-byte header"
        )
    magic, *shape = np.frombuffer(raw, dtype=">i4", count=1 + ndim)
    if magic != IDX_MAGIC[ndim]:
        raise _idx_error(
            path,
            fix,
            f"has magic number {magic}, expected {IDX_MAGIC[ndim]} "
            f"(unsigned-byte IDX with {ndim} dimension(s))",
        )
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise _idx_error(
            path, fix, f"holds {len(raw) - header} data bytes, its header declares {tuple(shape)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_error(path: Path, fix: str, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{path} {problem}: the file is truncated or corrupt; {fix}")


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


def load_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
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
