"""QwT on top of PTQ, HQQ and Gen (03_generate): the table of each with and without the
compensation, with the paired gains and the fair comparisons."""

from __future__ import annotations

import pandas as pd

from .. import methods
from ..config.blocks import Qwt
from ..config.schema import Profile
from ..core.report import SPLIT_LABELS, cell, markdown, summarize
from .common import generator_note, paired_difference, spec_label

QWT_METHODS = methods.shown_with_qwt()


def qwt_table(
    runs: pd.DataFrame, profile: Profile, commit: str, split: str = "heldout_run"
) -> tuple[pd.DataFrame, str]:
    """PTQ, HQQ and Gen with and without QwT on `split` (all splits in the CSV), with the paired
    gains of QwT and the fair comparisons: Gen against PTQ (both data-free), Gen + QwT against PTQ +
    QwT (both calibrated)."""
    sel = runs[runs.method.isin(QWT_METHODS)]
    pairs = [("ptq+qwt", "ptq"), ("hqq+qwt", "hqq"), ("gen+qwt", "gen"), ("gen+qwt", "ptq+qwt")]
    diffs = pd.concat([paired_difference(sel, a, b) for a, b in pairs], ignore_index=True)
    tidy = summarize(pd.concat([sel, diffs], ignore_index=True), "qwt", profile, commit)
    seconds = sel.groupby("method").seconds.mean()
    shown = tidy[tidy.split == split].assign(
        spec=spec_label,
        column=lambda d: d.method.map(methods.label),
        cell=lambda d: [cell(v, s) for v, s in zip(d.value, d["std"])],
    )
    wide = shown.pivot_table(
        index=["task", "arch", "spec"], columns="column", values="cell", aggfunc="first", sort=False
    )
    order = [methods.label(m) for m in [*QWT_METHODS, *(f"{a}-{b}" for a, b in pairs)]]
    wide = wide[[c for c in order if c in wide.columns]].reset_index()
    images = (profile.qwt or Qwt()).images
    notes = [
        f"{SPLIT_LABELS[split]}; top-1 %, mean ± std over checkpoints; differences paired on the "
        "same checkpoints.",
        f"QwT fits one linear layer per block in closed form on {images} training images of the "
        "task (never its test images), on top of each method's file, with its fp32 checkpoint as "
        "the reference: it needs data and the full-precision weights, which PTQ, HQQ and Gen do "
        "not. The fair comparisons: Gen against PTQ / HQQ, Gen + QwT against PTQ + QwT.",
        "Seconds per model (this machine, mean): "
        + ", ".join(f"{methods.label(m)} {seconds[m]:.3f}" for m in QWT_METHODS if m in seconds)
        + ".",
        generator_note(profile),
    ]
    return tidy, markdown(wide, "QwT on top of PTQ, HQQ and Gen", notes)
