"""Results as files: tidy tables (CSV), Markdown pivots beside the paper's numbers, figures,
provenance.

Every table is written three ways under `results/<profile>/`: `<name>.csv` (tidy: one row per
measurement, with mean, std, n, profile and commit), `<name>.md` (shaped like the paper's table) and
`<name>.json` (provenance: profile, its full parameters, commit, and hashes of the inputs). Figures
are saved with fixed metadata so the same data gives the same bytes.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import matplotlib
import pandas as pd
import torch

from . import kernels
from .io import ROOT, atomic_write, file_sha256, write_json

GROUP_KEYS = [
    "arch",
    "task",
    "dataset",
    "source",
    "condition",
    "variant",
    "method",
    "bits",
    "granularity",
    "split",
]
SPLIT_LABELS = {
    "trained": "trained-on ckpts (paper's protocol)",
    "heldout_ckpt": "held-out ckpts",
    "validation_run": "validation run",
    "heldout_run": "held-out run",
}


def summarize(
    runs: pd.DataFrame, table: str, profile, commit: str, metric: str = "accuracy"
) -> pd.DataFrame:
    """Per-checkpoint rows -> one tidy row per group: mean, std (over checkpoints) and n (`profile`:
    a loaded `qg.config.schema.Profile`, whose name the rows carry)."""
    keys = [k for k in GROUP_KEYS if k in runs.columns]
    out = (
        runs.groupby(keys, dropna=False)[metric]
        .agg(value="mean", std="std", n="count")
        .reset_index()
    )
    out["std"] = out["std"].fillna(0.0)
    out.insert(0, "table", table)
    out["metric"] = "top1_accuracy" if metric == "accuracy" else metric
    out["profile"], out["commit"] = profile.name, commit
    return out


def cell(mean: float, std: float | None = None, digits: int = 2) -> str:
    """`mean ± std` for Markdown cells."""
    if mean is None or pd.isna(mean):
        return "NA"
    return (
        f"{mean:.{digits}f}"
        if std is None or pd.isna(std)
        else f"{mean:.{digits}f} ± {std:.{digits}f}"
    )


def portable(path) -> str:
    """`path` relative to $QG_OUTPUT or the repository (where results live), so no machine's folders
    are recorded."""
    path = Path(path).resolve()
    for root in (os.environ.get("QG_OUTPUT"), ROOT):
        if root and path.is_relative_to(Path(root).resolve()):
            return str(path.relative_to(Path(root).resolve()))
    return path.name


def git_commit() -> str:
    """The code's commit, with `-dirty` when tracked files under qg/, notebooks/ or params/ have
    changes."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + (
        "-dirty" if git("status", "--porcelain", "--", "qg", "notebooks", "params") else ""
    )


def _portable_values(value):
    """`value` with every absolute path string in it made `portable` (a profile may name a weights
    file)."""
    if isinstance(value, dict):
        return {k: _portable_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable_values(v) for v in value]
    return portable(value) if isinstance(value, str) and os.path.isabs(value) else value


def provenance(profile, commit: str, inputs: list[Path] = (), extra: dict | None = None) -> dict:
    """What produced a results file: profile (a loaded `qg.config.schema.Profile`) and its
    parameters as written, code commit, input hashes, software, and the CPU kernels and threads its
    floats depend on (`qg.core.kernels`)."""
    return {
        "profile": profile.name,
        "parameters": _portable_values(profile.written),
        "commit": commit,
        "inputs": {
            portable(p): file_sha256(p) for p in sorted(map(Path, inputs)) if Path(p).is_file()
        },
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pandas": pd.__version__,
            "matplotlib": matplotlib.__version__,
        },
        "device": (
            "cuda: " + torch.cuda.get_device_name(0)
            if torch.cuda.is_available()
            else f"cpu ({platform.machine()})"
        ),
        "kernels": kernels.describe(),
        **(extra or {}),
    }


def write_table(
    results_dir: Path, name: str, tidy: pd.DataFrame, markdown: str, prov: dict
) -> Path:
    """Write `<name>.csv`, `<name>.md` and `<name>.json` atomically; returns the CSV path."""
    results_dir = Path(results_dir)
    with atomic_write(results_dir / f"{name}.csv", "w") as f:
        tidy.to_csv(f, index=False, float_format="%.4f")
    with atomic_write(results_dir / f"{name}.md", "w") as f:
        f.write(markdown.rstrip() + "\n")
    write_json(results_dir / f"{name}.json", prov)
    return results_dir / f"{name}.csv"


def markdown(df: pd.DataFrame, title: str, notes: list[str] = ()) -> str:
    """A titled Markdown table with notes underneath."""
    lines = [f"### {title}", "", df.to_markdown(index=False), ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> Path:
    """Save a figure deterministically (no timestamps or software versions in the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Software": None} if path.suffix == ".png" else {"Creator": None, "CreationDate": None}
    with atomic_write(path) as f:
        fig.savefig(f, format=path.suffix[1:], dpi=150, bbox_inches="tight", metadata=meta)
    return path
