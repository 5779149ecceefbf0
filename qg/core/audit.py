"""What `python -m qg.pipeline --verify` reports about a cache without changing it: artifacts whose
bytes no longer match their recorded hash, files no hash vouches for, and artifacts made from
checkpoints that are gone or changed."""

from __future__ import annotations

import os
from pathlib import Path

from .io import FORMAT_FILE, HASH_SUFFIX, _recorded, _sidecar, content_digest


def damaged(root: str | os.PathLike) -> list[Path]:
    """Every artifact under `root` whose content no longer matches its recorded hash, or that is
    gone beside its hash: what `cached` would rebuild, found without changing anything."""
    bad = []
    for sidecar in sorted(Path(root).rglob(f"*{HASH_SUFFIX}")):
        path = sidecar.with_name(sidecar.name[: -len(HASH_SUFFIX)])
        recorded = _recorded(path) if path.is_file() else None
        if not recorded or recorded[0] != content_digest(path):
            bad.append(path)
    return bad


# files the cache writes without a hash: markers written last and atomically (a run is complete when
# its marker is there), a training run's own state and curve, the cache's format and locks
BOOKKEEPING = frozenset(
    {FORMAT_FILE, "run.json", "manifest.json", "inputs.json", "loss.csv", "train_state.pt"}
)


def unverified(root: str | os.PathLike) -> list[Path]:
    """Every file under `root` that no recorded hash vouches for, bookkeeping aside: a file another
    tool put there, or one whose hash was lost. `cached` rebuilds it before any use."""
    return [
        p
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
        and not p.name.endswith(HASH_SUFFIX)
        and not p.name.startswith(".")
        and p.name not in BOOKKEEPING
        and not _sidecar(p).is_file()
    ]


def orphaned(root: str | os.PathLike, inputs_root: str | os.PathLike) -> dict[Path, str]:
    """The artifacts under `root` made from a file of `inputs_root` (their recorded input names are
    relative to it) that is gone or holds other content now, each with why: no run reads them as
    they are (a changed input's artifact is rebuilt when asked for; a gone one's is never asked
    for), so they only take space."""
    found = {}
    for sidecar in sorted(Path(root).rglob(f"*{HASH_SUFFIX}")):
        lines = sidecar.read_text(errors="replace").splitlines()[1:]
        for digest, _, name in (line.partition("  ") for line in lines):
            source = Path(inputs_root) / name
            if "/" not in name:  # a dataset or a model named, not a file
                continue
            if not source.is_file():
                why = f"made from {name}, which is gone"
            elif content_digest(source) != digest:
                why = f"made from {name}, which has changed since"
            else:
                continue
            found[sidecar.with_name(sidecar.name[: -len(HASH_SUFFIX)])] = why
            break
    return found
