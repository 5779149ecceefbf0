"""The paper's main results (03_generate): Tables 1-3 and Figures 1 and 3 beside the paper's
numbers, Gen − PTQ per checkpoint, and QwT on top of PTQ, HQQ and Gen.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .. import methods
from ..config.schema import Profile
from ..core.report import SPLIT_LABELS, cell, summarize
from ..study.settings import SPLITS
from . import paper
from .common import (
    labelled,
    ordered,
    paired_difference,
    profile_markdown,
)


def _with_columns(tidy: pd.DataFrame, group_bits: int) -> pd.DataFrame:
    """One row per Table 1 column each measurement fills (8-bit group fills both '8-bit' and
    'Group')."""
    rows = []
    for r in tidy.to_dict("records"):
        for col in paper.table1_column(int(r["bits"]), r["granularity"], group_bits):
            rows.append({**r, "column": col})
    return pd.DataFrame(rows)


def _pivot(tidy: pd.DataFrame, index: list[str], group_bits: int) -> pd.DataFrame:
    df = _with_columns(tidy, group_bits)
    df["cell"] = [cell(m, s) for m, s in zip(df["value"], df["std"])]
    columns = [c for c in paper.TABLE1_COLUMNS if c in set(df["column"])]
    wide = df.pivot_table(index=index, columns="column", values="cell", aggfunc="first").reindex(
        columns=columns
    )
    return wide.fillna("NA").reset_index()


def _paper_rows(tasks_archs, methods, columns, value) -> pd.DataFrame:
    rows = []
    for task, arch in tasks_archs:
        for method in methods:
            vals = {c: value(task, arch, method, c) for c in columns}
            if any(v is not None for v in vals.values()):
                counterpart = f"{paper.COUNTERPART.get(task)} {paper.MODEL.get(arch)}"
                rows.append(
                    {
                        "task": task,
                        "arch": arch,
                        "method": f"{method} (paper, {counterpart})",
                        "split": "paper",
                        **{c: cell(v) for c, v in vals.items()},
                    }
                )
    return pd.DataFrame(rows)


def table1(runs: pd.DataFrame, profile: Profile, commit: str) -> tuple[pd.DataFrame, str]:
    """Gen vs PTQ at every precision (group-wise) and granularity (8-bit), per split, beside the
    paper's."""
    gbits = profile.table1.granularity_bits
    generators = [m for m in methods.names("generator") if m in set(runs.method)]
    runs = pd.concat([runs] + [paired_difference(runs, m) for m in generators], ignore_index=True)
    tidy = summarize(runs, "table1", profile, commit)
    index = ["task", "arch", "method", "split"]
    ours = _pivot(tidy, index, gbits)
    columns = [c for c in paper.TABLE1_COLUMNS if c in ours.columns]
    ours = ordered(ours)
    ref = _paper_rows(
        ours[["task", "arch"]].drop_duplicates().itertuples(index=False),
        ("PTQ", "Gen"),
        columns,
        paper.table1_value,
    )
    md = labelled(pd.concat([ours, ref], ignore_index=True)).sort_values(
        ["task", "arch"], kind="stable"
    )
    return tidy, profile_markdown(
        md,
        "Table 1: Gen vs PTQ (top-1 %, mean ± std over checkpoints)",
        profile,
        [
            f"Columns: group-wise at each bit-width; Channel/Group at {gbits} bits. `Gen − PTQ` "
            "is the paired difference on the same checkpoints.",
            "Paper rows are the paper's counterpart setting (full fine-tuning ↔ ImageNet-1K, "
            "head-only ↔ CIFAR-10) at its scale; compare trends, not absolute numbers.",
        ],
    )


def _table2_times(
    runs: pd.DataFrame, records: dict, profile: Profile, commit: str, n_models: int
) -> pd.DataFrame:
    """Tidy rows of the minutes to quantize `n_models` models, per (arch, task, bits): QAT, Gen as
    the paper counts (training + one pass per model) and Gen + the QAT runs of its targets."""
    time_rows = []
    for (arch, task, bits, setting), g in runs.groupby(["arch", "task", "bits", "setting"]):
        t_qat = g.loc[g.method == "qat", "seconds"].mean()
        t_gen = g.loc[g.method == "gen", "seconds"].mean()
        rec = records[setting]
        train_s, n_targets = rec["train_seconds"], rec["n_train_checkpoints"]
        for method, minutes in (
            ("qat", n_models * t_qat / 60),
            ("gen", (train_s + n_models * t_gen) / 60),
            ("gen+targets", (train_s + n_models * t_gen + n_targets * t_qat) / 60),
        ):
            time_rows.append(
                {
                    "table": "table2",
                    "arch": arch,
                    "task": task,
                    "dataset": g.dataset.iloc[0],
                    "source": "qat",
                    "condition": "",
                    "variant": "",
                    "method": method,
                    "bits": bits,
                    "granularity": profile.qat.granularity,
                    "split": "",
                    "value": minutes,
                    "std": 0.0,
                    "n": n_models,
                    "metric": f"minutes_for_{n_models}_models",
                    "profile": profile.name,
                    "commit": commit,
                }
            )
    return pd.DataFrame(time_rows)


def _table2_pair_rows(
    g: pd.DataFrame, mins: pd.DataFrame, task: str, arch: str, n_models: int
) -> list[dict]:
    """One (task, arch)'s Markdown rows, a column per bit-width (widest first): the accuracy of
    FP32, PTQ, QAT and Gen per split (`g`), then the minutes of each way of counting (`mins`)."""
    rows = []
    for split in g.split.unique():
        for method in ("fp", "ptq", "qat", "gen"):
            r = {
                "task": task,
                "arch": arch,
                "method": methods.label(method),
                "split": SPLIT_LABELS[split],
            }
            for bits in sorted(g.bits.unique(), reverse=True):
                sel = g[(g.split == split) & (g.method == method) & (g.bits == bits)]
                r[f"{bits}-bit acc (%)"] = (
                    cell(sel.value.iloc[0], sel["std"].iloc[0]) if len(sel) else "NA"
                )
            rows.append(r)
    mins = mins[(mins.task == task) & (mins.arch == arch)]
    for method, label in (
        ("qat", "QAT"),
        ("gen", "Gen (as the paper counts)"),
        ("gen+targets", "Gen + its QAT targets"),
    ):
        r = {"task": task, "arch": arch, "method": label, "split": f"time for {n_models} models"}
        for bits in sorted(g.bits.unique(), reverse=True):
            sel = mins[(mins.bits == bits) & (mins.method == method)]
            r[f"{bits}-bit acc (%)"] = f"{sel.value.iloc[0]:.2f} min" if len(sel) else "NA"
        rows.append(r)
    return rows


def table2(
    runs: pd.DataFrame, records: dict, profile: Profile, commit: str, n_models: int = 50
) -> tuple[pd.DataFrame, str]:
    """QAT vs Gen (QAT targets) at each bit-width: accuracy per split and the time to quantize
    `n_models`.

    `records[setting name]` holds the generator's `train_seconds`. Gen's time is counted two ways:
    as the paper does (generator training + n generations) and all-in (+ the QAT runs that made its
    training targets).
    """
    tidy = summarize(runs, "table2", profile, commit)
    times = _table2_times(runs, records, profile, commit, n_models)
    tidy = pd.concat([tidy, times], ignore_index=True)
    acc = tidy[tidy.metric == "top1_accuracy"]
    mins = tidy[tidy.metric != "top1_accuracy"]
    rows = []
    for (task, arch), g in acc.groupby(["task", "arch"]):
        rows += _table2_pair_rows(g, mins, task, arch, n_models)
    for method, vals in paper.TABLE2.items():
        rows.append(
            {
                "task": "full",
                "arch": "vit",
                "method": f"{method} (paper, ImageNet-1K ViT-Tiny)",
                "split": "paper",
                **{
                    f"{b}-bit acc (%)": f"{a:.2f} / {t} min"
                    for b, (a, t) in sorted(vals.items(), reverse=True)
                },
            }
        )
    # the paper has no 3-bit QAT
    md = pd.DataFrame(rows).sort_values(["task", "arch"], kind="stable").fillna("NA")
    title = f"Table 2: QAT vs Gen trained on QAT targets ({profile.qat.grid()})"
    return tidy, profile_markdown(
        md,
        title,
        profile,
        [
            f"Time rows: minutes to quantize {n_models} models. QAT = {n_models} x the measured "
            "QAT run per model. 'Gen (as the paper counts)' = generator training + one forward "
            "pass per model; 'Gen + its QAT targets' adds the QAT runs that made the generator's "
            "training targets.",
            f"Our QAT fine-tunes each model for {profile.qat.steps_text()} on a 2-core CPU; "
            "the paper's is GPU hours.",
        ],
    )


def table3(runs: pd.DataFrame, profile: Profile, commit: str) -> tuple[pd.DataFrame, str]:
    """Conditional generators (one-hot over precision or granularity) vs PTQ, per split."""
    gbits = profile.table1.granularity_bits
    tidy = summarize(runs, "table3", profile, commit)
    view = tidy[tidy.method != "fp"].copy()
    # PTQ does not depend on the generator's condition
    view.loc[view.method == "ptq", "condition"] = "NA"
    ours = ordered(_pivot(view, ["task", "arch", "method", "condition", "split"], gbits))
    ours["condition"] = ours["condition"].map({"precision": "P", "granularity": "G", "NA": "NA"})
    columns = [c for c in paper.TABLE1_COLUMNS if c in ours.columns]

    def value(task, arch, method, column):
        d = paper.COUNTERPART.get(task)
        if method == "PTQ":
            return paper.table1_value(task, arch, "PTQ", column)
        if paper.MODEL.get(arch) != "ViT-Tiny":  # the paper's Table 3 is ViT-Tiny only
            return None
        return paper.TABLE3.get(d, {}).get(method[-1], (None,) * 8)[
            paper.TABLE1_COLUMNS.index(column)
        ]

    ref = _paper_rows(
        ours[["task", "arch"]].drop_duplicates().itertuples(index=False),
        ("PTQ", "Gen P", "Gen G"),
        columns,
        value,
    )
    md = labelled(pd.concat([ours, ref], ignore_index=True)).sort_values(
        ["task", "arch"], kind="stable"
    )
    return tidy, profile_markdown(
        md,
        "Table 3: controllable generation (top-1 %, mean ± std over checkpoints)",
        profile,
        [
            "Condition P: one generator for every bit-width (group-wise), one-hot over precision; "
            f"G: one generator for channel and group at {gbits} bits."
        ],
    )


def figure1(runs: pd.DataFrame, records: dict, arch: str, task: str, max_models: int = 1000):
    """Total time to quantize n models: QAT grows linearly; Gen pays training once, then ~nothing
    per model. Colour by method, line style by bit-width, log axes (the quantities span decades)."""
    n = np.unique(np.geomspace(1, max_models, 200).round())
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sel = runs[(runs.arch == arch) & (runs.task == task)]
    colors = dict(
        zip(
            ("QAT", "Gen (training + one pass per model)", "Gen + the QAT runs of its targets"),
            sns.color_palette("tab10"),
        )
    )
    for (bits, setting), g in sel.groupby(["bits", "setting"]):
        t_qat, t_gen = (
            g.loc[g.method == "qat", "seconds"].mean(),
            g.loc[g.method == "gen", "seconds"].mean(),
        )
        rec, style = records[setting], {8: "-", 4: "--", 3: ":"}.get(int(bits), "-.")
        for label, minutes in (
            ("QAT", n * t_qat / 60),
            ("Gen (training + one pass per model)", (rec["train_seconds"] + n * t_gen) / 60),
            (
                "Gen + the QAT runs of its targets",
                (rec["train_seconds"] + rec["n_train_checkpoints"] * t_qat + n * t_gen) / 60,
            ),
        ):
            ax.plot(n, minutes, style, color=colors[label], label=f"{label}, {bits}-bit")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="number of target models",
        ylabel="total time (min)",
        title=f"Figure 1: QAT vs Gen ({arch}, {task})",
    )
    ax.legend(fontsize=6.5, ncol=1)
    ax.grid(alpha=0.3, which="both")
    return fig


# Figure 3's lines: Gen black and thick, each quantizer in its colour, QwT on top paler and dashed
FIGURE3_COLOURS = {
    "gen": "black",
    "ptq": "tab:blue",
    "hqq": "tab:red",
    "rtn-asym": "tab:orange",
    "mse-clip": "tab:green",
    "gen+qwt": "dimgray",
    "ptq+qwt": "lightsteelblue",
    "hqq+qwt": "lightsalmon",
}


def figure3(runs: pd.DataFrame, arch: str, task: str):
    """Accuracy at every (bits, granularity) for Gen and the data-free quantizers (and QwT on top
    of PTQ, HQQ and Gen): one row per granularity, one column per split."""
    sel = runs[(runs.arch == arch) & (runs.task == task) & runs.method.isin(FIGURE3_COLOURS)]
    sel = sel.assign(
        QwT=sel.method.str.endswith(methods.QWT_SUFFIX).map({True: "with QwT", False: "without"}),
        method=sel.method.map(methods.label),
        split=sel.split.map(SPLIT_LABELS),
    )
    labels = {methods.label(m): c for m, c in FIGURE3_COLOURS.items()}
    grid = sns.relplot(
        data=sel,
        x="bits",
        y="accuracy",
        hue="method",
        palette={k: v for k, v in labels.items() if k in set(sel.method)},
        size="method",
        sizes={k: 2.8 if k.startswith("Gen") else 1.3 for k in labels if k in set(sel.method)},
        style="QwT",
        dashes={"without": "", "with QwT": (4, 2)},
        row="granularity",
        col="split",
        kind="line",
        markers=False,
        errorbar=None,
        height=2.9,
        aspect=1.25,
        facet_kws={"sharey": True},
    )
    grid.set_titles("{row_name}-wise, {col_name}")
    grid.set_axis_labels("bits", "top-1 (%), mean of ckpts")
    for ax in grid.axes.flat:
        ax.grid(alpha=0.3)
    grid.figure.suptitle(f"Figure 3: bits x granularity ({arch}, {task}); Gen in black", y=1.02)
    return grid.figure


def gen_minus_ptq_figure(diff: pd.DataFrame):
    """Paired Gen − PTQ per checkpoint (`paired_difference` rows) against bits, the three splits
    side by side in their protocol order: one panel per granularity for the generators trained on
    PTQ targets (Tables 1 and 3, Figure 3), one for those trained on QAT targets (Table 2), whose
    difference holds QAT's own gain over PTQ."""
    diff = diff.assign(split=diff.split.map(SPLIT_LABELS))
    ptq, qat = diff[diff.source != "qat"], diff[diff.source == "qat"]
    panels = [
        (f"{g}-wise, trained on PTQ targets", ptq[ptq.granularity == g])
        for g in ("group", "channel")
        if g in set(ptq.granularity)
    ] + ([("trained on QAT targets: QAT's gain included", qat)] if len(qat) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, sel) in zip(axes[0], panels):
        sns.boxplot(
            data=sel,
            x="bits",
            y="accuracy",
            hue="split",
            hue_order=[SPLIT_LABELS[s] for s in SPLITS],
            order=sorted(sel.bits.unique()),
            fliersize=2,
            ax=ax,
        )
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=title, xlabel="bits", ylabel="Gen − PTQ, same checkpoint (points)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, title=None)
    fig.suptitle("Where Gen wins (> 0) and loses (< 0) against PTQ of the same checkpoint")
    fig.tight_layout()
    return fig
