"""What every notebook does first, in one line under its `parameters` cell, and its findings.

    from qg.notebook import findings, setup
    P, paths = setup(profile, overrides, In)

`setup` silences UserWarnings (they carry temporary paths that change between runs), refuses a
papermill parameter the `parameters` cell does not declare (before the profile is read, so the
misspelt name is the error reported, not what a run without it would do), loads the profile with
its overrides, makes its output folders and widens pandas' display.

Autoreload: kept for people in JupyterLab, and only there. In an interactive session (an IPython
kernel whose history has no papermill `# Parameters` cell) `setup` runs `%autoreload 2`, so edits
to `qg` apply without restarting the kernel; a headless papermill run never reloads a module
midway. nbval injects no parameters, so it counts as interactive, as every run did before.

`findings(lines)` renders computed conclusions as the Markdown under a `## What we found` heading.

What the ablation notebooks (04-07) share: `run_and_report(exp, factor)` trains or reads back every
variant of one factor, writes its table and figures
(`results/<profile>/ablation_<factor>.{csv,md,json}`, `figures/<profile>/ablation_<factor>_loss.png`
and `ablation_<factor>.png`) and computes what was found; each notebook keeps on screen only its
factor's own story. IPython is imported only when a function needs it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from .config.profiles import Paths, load_profile, refuse_undeclared
from .config.schema import Profile
from .core import report
from .study.evaluation import run_ablation
from .study.experiments import Experiment
from .tables.ablations import ablation_figure, ablation_table, paper_ablation_note
from .tables.common import loss_curves
from .tables.findings import ablation_findings


def setup(
    profile: str, overrides: dict | None = None, history: Sequence[str] = ()
) -> tuple[Profile, Paths]:
    """A notebook's set-up: `P, paths = setup(profile, overrides, In)` (`In`: IPython's history).

    Returns the loaded profile (`P.train.steps`; `P.written`: as its file wrote it) and its
    `Paths`, folders made."""
    warnings.filterwarnings("ignore", category=UserWarning)
    refuse_undeclared(list(history))  # first: an unknown parameter is the error reported
    P = load_profile(profile, overrides)
    paths = Paths.for_profile(P).make()
    pd.set_option("display.width", 200, "display.max_columns", 30)
    if not _papermill(history):
        _autoreload()
    return P, paths


def findings(lines: Iterable[str]):
    """Computed conclusions as a Markdown list, for the cell under `## What we found`: one item per
    line; a line that starts with spaces is an item under the one before it."""
    from IPython.display import Markdown

    return Markdown(
        "\n".join(f"  - {line.strip()}" if line[:1].isspace() else f"- {line}" for line in lines)
    )


def _papermill(history: Sequence[str]) -> bool:
    """Whether papermill ran this kernel: its injected cell starts with `# Parameters` (the same
    test as `refuse_undeclared`'s)."""
    return any(c.lstrip().startswith("# Parameters") for c in history)


def _autoreload() -> None:
    """`%load_ext autoreload` and `%autoreload 2` in the running IPython kernel, if there is one."""
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: nothing to reload
        return
    shell = get_ipython()
    if shell is not None:
        shell.run_line_magic("load_ext", "autoreload")
        shell.run_line_magic("autoreload", "2")


@dataclass(frozen=True, eq=False)
class AblationReport:
    """One ablation as written to its files: per-checkpoint scores (PTQ and Gen), one cost row per
    generator, the table (tidy rows and Markdown), its two figures and the computed findings.

    Displayed in a notebook: the Markdown table, the loss curves, the Gen − PTQ figure."""

    runs: pd.DataFrame
    costs: pd.DataFrame
    tidy: pd.DataFrame
    table: str
    loss_figure: Figure
    figure: Figure
    findings: list[str]

    def _ipython_display_(self) -> None:
        from IPython.display import Markdown, display

        display(Markdown(self.table), self.loss_figure, self.figure)


def run_and_report(exp: Experiment, factor: str) -> AblationReport:
    """Run the ablation of `factor` (the variants of `ablation.<factor>`) and write its
    table, with provenance, and its two figures under `exp.paths`.

    The figures are closed once saved, so a notebook shows each once, where it displays the
    result."""
    P, paths = exp.profile, exp.paths
    runs, costs, curves = run_ablation(exp, factor)
    tidy, md = ablation_table(runs, costs, factor, P, exp.commit)
    prov = report.provenance(P, exp.commit, [paths.artifacts / "collect" / "manifest.json"])
    report.write_table(paths.results, f"ablation_{factor}", tidy, md, prov)
    loss = loss_curves(curves, f"Ablation of the {factor.replace('_', ' ')}: training loss")
    report.save_figure(loss, paths.figures / f"ablation_{factor}_loss.png")
    plt.close(loss)
    fig = ablation_figure(runs, factor)
    report.save_figure(fig, paths.figures / f"ablation_{factor}.png")
    plt.close(fig)
    # the findings from the CSV just written, as the results README reads them
    written = pd.read_csv(paths.results / f"ablation_{factor}.csv")
    found = [*ablation_findings(written, factor), paper_ablation_note(factor)]
    return AblationReport(runs, costs, tidy, md, loss, fig, found)
