"""File helpers shared by every stage: atomic writes, checked safetensors reads, content hashes.

Every artifact the pipeline writes goes through `atomic_write` so an interrupted run never leaves a
half-written file that a later run would trust; every safetensors read goes through
`read_safetensors` so a corrupt or truncated file is reported by name with what to do about it.
`cached` is the one rule for derived artifacts: named by their parameters, made once, their SHA-256
recorded beside them and checked on every later use, so a damaged artifact is rebuilt from its
inputs instead of trusted.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

STALE_TMP_SECONDS = 600
# the checkout: params/, notebooks/, and results/ unless QG_OUTPUT
ROOT = Path(__file__).resolve().parents[2]


class CorruptFileError(ValueError):
    """A file exists but cannot be read as what it claims to be."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(folder: Path, error: Exception) -> bool:
    """Whether a failed write ran out of disk: its errno says so, or (torch.save's writer reports
    only "file write failed") the disk has no room left."""
    if getattr(error, "errno", None) == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


@contextmanager
def _replacing(path: Path):
    """Yield a temporary path beside `path`; move it over `path` only if the block succeeds."""
    if path.is_dir():
        raise IsADirectoryError(
            f"cannot write {path}: it is a directory; remove it or choose another path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and _disk_full(path.parent, e)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk holding {path.parent} while writing {path.name}: "
                "free some, or set QG_OUTPUT to a folder on another disk",
            ) from e
        raise
    # left by a write that was killed
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            # not another process's write in flight
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                stale.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: the write itself succeeded
            pass


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    with _replacing(Path(path)) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _require_file(path: Path) -> None:
    """Refuse a path that is not a file, saying whether it is missing or a folder."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file: give the file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")


def update_json(path: str | os.PathLike, obj) -> None:
    """`write_json`, unless the file already holds `obj`: a rerun that changes nothing writes
    nothing (a read-only cache stays usable)."""
    try:
        if read_json(path) == json.loads(json.dumps(obj)):  # as JSON holds it: tuples are lists
            return
    except (OSError, ValueError):  # missing or unreadable: write it
        pass
    write_json(path, obj)


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file, naming the file in the error if it is missing or malformed."""
    path = Path(path)
    _require_file(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{path} is not valid JSON ({e}); delete it and rerun the step that wrote it"
        ) from e


def metadata_json(path, metadata: dict[str, str], key: str, default: str | None = None):
    """A JSON entry of a safetensors file's metadata (model description, spec, run metadata), naming
    the file and the entry when it is missing or not JSON."""
    if key not in metadata and default is None:
        raise CorruptFileError(
            f"{path} has no `{key}` entry in its metadata; write it with qg's save functions"
        )
    try:
        return json.loads(metadata.get(key, default))
    except (json.JSONDecodeError, TypeError) as e:
        raise CorruptFileError(
            f"{path}: metadata entry `{key}` is not valid JSON ({e}); the file is damaged: "
            "rewrite it with qg (or delete it and rerun the step that made it)"
        ) from e


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Save tensors (made contiguous, detached, on CPU) to a safetensors file, atomically; the same
    tensors and metadata always give the same bytes (`canonical`)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_write(path) as f:
        f.write(canonical(save(tensors, metadata=metadata)))


def canonical(blob: bytes) -> bytes:
    """A safetensors file's bytes with its metadata in sorted key order. safetensors writes the
    metadata in hash-map order, different on every call, so the same tensors would give new bytes
    (and a new content hash, and every artifact keyed by it redone) each time they are written."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    metadata = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def check_recorded(path: str | os.PathLike) -> None:
    """For a file handed to the command line: when a `.sha256` sidecar sits beside it (every file
    qg's cache writes has one), refuse the file if its bytes no longer match. A file without one is
    left to its reader's checks."""
    path = Path(path)
    recorded = _recorded(path) if path.is_file() else []
    if recorded == []:
        return
    if recorded is None or recorded[0] != content_digest(path):
        raise CorruptFileError(
            f"{path} does not match the hash recorded in {_sidecar(path).name} beside it: the "
            "file is damaged or was changed; remake it (or delete the .sha256 if you changed it "
            "on purpose)"
        )


def read_safetensors(
    path: str | os.PathLike, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor (none with `tensors=False`: the header alone) and the metadata of a
    safetensors file, with clear errors for bad files."""
    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    # safetensors raises its own error types for truncated or garbled headers
    except Exception as e:
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). "
            "It may be truncated or written by another tool; regenerate it or restore a good copy."
        ) from e
    return loaded, metadata


def cached(path: str | os.PathLike, make, inputs: dict[str, str] | None = None, check=None) -> Path:
    """The cache rule every artifact follows: a file named by the parameters that determine it is
    made once. Returns `path`, first calling `make(path)` to write it when it does not exist, no
    longer holds what was written, was made from other `inputs` (name -> content digest of what it
    was computed from: a checkpoint, a dataset) than today's, or fails `check(path)` (`verified`).
    `make` writes through `atomic_write` / `save_safetensors`, so an interrupted run leaves no file;
    the made file's hash and its inputs' are recorded beside it."""
    path = Path(path)
    if not verified(path, inputs, check):
        make(path)
        record_hash(path, inputs)
    return path


HASH_SUFFIX = ".sha256"

CACHE_FORMAT = 3
"""The cache's rules: format 2 records every file's hash and inputs beside it and trusts nothing
else. Format 1 (before 2026-12) adopted unhashed files; such a cache is set aside, not mixed in.
Format 3 (issue 30): the diffusion denoiser's timestep embedding changed shape, so a diffusion-head
generator or RPG of format 2 does not load; its cache is set aside like format 1's."""

FORMAT_FILE = "cache-format"


@contextmanager
def exclusive(path: str | os.PathLike, what: str):
    """Hold an exclusive lock on the file `path` (created if missing) for the block. A second
    process asking for it waits until the first is done, saying once that it waits: two runs into
    one output folder take turns instead of judging each other's half-written files damaged (the
    second then finds the first's artifacts cached). Released when the process ends, however."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"[qg] {what}: another run is writing there ({path} is locked); waiting for it",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim_cache(root: str | os.PathLike) -> Path:
    """Make `root` a cache of this `CACHE_FORMAT`: create it, or mark an empty one. A folder an
    older qg filled is renamed `<root>.format-<n>` (kept, for its owner to delete) with one line
    saying so, and rebuilt from nothing; one a newer qg wrote is refused."""
    root = Path(root)
    marker = root / FORMAT_FILE
    found = marker.read_text().strip() if marker.is_file() else None
    if found == str(CACHE_FORMAT):
        return root
    if found is not None and (not found.isdigit() or int(found) > CACHE_FORMAT):
        raise ValueError(
            f"{root} is a cache of format {found!r}, newer than this qg's {CACHE_FORMAT}: "
            "update qg (git pull) or point QG_OUTPUT at another folder"
        )
    if root.is_dir() and any(p.name != FORMAT_FILE for p in root.iterdir()):
        old = root.with_name(f"{root.name}.format-{found or 1}")
        for i in itertools.count(2):
            if not old.exists():
                break
            old = root.with_name(f"{root.name}.format-{found or 1}.{i}")
        try:
            root.rename(old)
        except FileNotFoundError:  # another process of this run set it aside first
            pass
        else:
            print(
                f"[qg] {root} was written by an older qg (cache format {found or 1}, now "
                f"{CACHE_FORMAT}); it is kept as {old} and rebuilt: delete that folder when done",
                file=sys.stderr,
                flush=True,
            )
    root.mkdir(parents=True, exist_ok=True)
    with atomic_write(marker, "w") as f:
        f.write(f"{CACHE_FORMAT}\n")
    return root


def record_hash(path: str | os.PathLike, inputs: dict[str, str] | None = None) -> None:
    """Record the SHA-256 of a derived artifact in `<file>.sha256` (first line), then the digests of
    the inputs it was made from (`<digest>  <name>` per line), for `verified` to check on every
    use."""
    path = Path(path)
    lines = [content_digest(path)] + [f"{d}  {name}" for name, d in sorted((inputs or {}).items())]
    with atomic_write(_sidecar(path), "w") as f:
        f.write("\n".join(lines) + "\n")


def verified(path: str | os.PathLike, inputs: dict[str, str] | None = None, check=None) -> bool:
    """Whether a cached artifact is there, holds the bytes that were written, (given `inputs`) was
    made from these inputs and (given `check`, which raises CorruptFileError otherwise) is what its
    reader accepts. Otherwise it is removed with one warning line, for the caller to rebuild it: a
    file with no recorded hash is not trusted (every file of this cache format has one). Not for
    files another process is writing at the same moment (between its write and its hash, the two
    disagree)."""
    path = Path(path)
    if not path.is_file():
        return False
    recorded = _recorded(path)
    if recorded == []:
        problem = "has no recorded hash (written by another tool, or damaged)"
    elif recorded is None or recorded[0] != content_digest(path):
        problem = "does not match its recorded hash (damaged or changed)"
    elif inputs is not None and recorded[1:] != [f"{d}  {n}" for n, d in sorted(inputs.items())]:
        problem = "was made from inputs that have changed since"
    else:
        problem = _check(path, check)
    if problem is None:
        return True
    print(f"[qg] warning: {path} {problem}; rebuilding it", file=sys.stderr, flush=True)
    path.unlink()
    _sidecar(path).unlink(missing_ok=True)
    return False


def _recorded(path: Path) -> list[str] | None:
    """The sidecar's lines ([] when there is none); None when it is unreadable."""
    if not _sidecar(path).is_file():
        return []
    try:
        lines = _sidecar(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return lines if lines and len(lines[0]) == 64 else None


_CHECKED: set[tuple] = set()


def _check(path: Path, check) -> str | None:
    """Why `check` refuses the file (None when it accepts it); each content is checked once per
    process."""
    key = (str(path.resolve()), content_digest(path), getattr(check, "__qualname__", repr(check)))
    if check is None or key in _CHECKED:
        return None
    try:
        check(path)
    except CorruptFileError as e:
        return f"is not what its reader accepts ({e})"
    _CHECKED.add(key)
    return None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + HASH_SUFFIX)


_DIGESTS: dict[tuple, str] = {}


def content_digest(path: str | os.PathLike) -> str:
    """The full SHA-256 of a file (to check it, or to key what is made from it), memoised on (path,
    size, modification time): a process reads each file's bytes once, however often it uses it (a
    rewrite changes the modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path, length=64)
    return _DIGESTS[key]


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """A short content hash of a file, recorded in results for provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def params_key(params: dict, length: int = 12) -> str:
    """A stable short hash of JSON-able parameters, used to name cached artifacts."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
