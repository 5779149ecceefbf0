"""Amortized QAT (08_residual_qat): one data-free forward pass against QAT and HQQ."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .. import methods
from ..config.schema import Profile
from ..core.report import SPLIT_LABELS, cell
from ..study.settings import CHOICE_SPLIT, SPLITS
from .common import ordered, profile_markdown


def _amortized_column(method: str, source: str, variant: str) -> str:
    """The column of an amortized-QAT row: a baseline, or Gen by target (direct / residual) and
    source."""
    return f"Gen {variant} ({source.upper()})" if method == "gen" else methods.label(method)


# The generator a reader should use, one per (pair, bits): of the targets trained on QAT, the one
# with the higher mean accuracy on the validation run (`CHOICE_SPLIT`, run C; a tie: direct).
# Chosen there, never on the held-out run that the table reports.
CANDIDATES = ("Gen direct (QAT)", "Gen residual (QAT)")
CHOSEN = "Gen chosen (QAT)"
SETTING = ["arch", "task", "bits", "granularity"]

STEPS = "FP32 + QAT's steps"  # QAT's control: its fine-tuning without quantization

AMORTIZED_DIFFS = (
    (STEPS, "FP32"),
    ("QAT", STEPS),
    ("Gen residual (PTQ)", "PTQ"),
    ("Gen direct (QAT)", "HQQ"),
    ("Gen residual (QAT)", "HQQ"),
    (CHOSEN, "HQQ"),
    ("Gen direct (QAT)", "QAT"),
    ("Gen residual (QAT)", "QAT"),
    (CHOSEN, "QAT"),
    CANDIDATES,  # how firmly the choice split picks one of them
)


def chosen_targets(wide: pd.DataFrame) -> pd.Series:
    """Per (arch, task, bits, granularity): the column of `CANDIDATES` chosen by `CHOICE_SPLIT`'s
    mean accuracy (empty when the split or a candidate is missing)."""
    candidates = [c for c in CANDIDATES if c in wide]
    held = wide[wide.split == CHOICE_SPLIT]
    if len(candidates) < len(CANDIDATES) or held.empty:
        return pd.Series(dtype=str)
    return held.groupby(SETTING)[candidates].mean().idxmax(axis=1).rename("chosen")


def amortized_wide(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (arch, task, bits, split, checkpoint), one column per method (baselines once, Gen
    by target and source, and `CHOSEN`, the target `chosen_targets` picks, with its name in
    `chosen`) and the paired differences of `AMORTIZED_DIFFS` as `A − B`."""
    keys = [*SETTING, "split", "checkpoint"]
    # the data-free baselines of the PTQ-target settings: on the quant block's grid whatever QAT's
    runs = runs[~(runs.method.isin(["ptq", "hqq"]) & (runs.source == "qat"))]
    runs = runs.assign(
        column=[
            _amortized_column(m, s, v) for m, s, v in zip(runs.method, runs.source, runs.variant)
        ]
    )
    wide = runs.pivot_table(
        index=keys, columns="column", values="accuracy", aggfunc="first"
    ).reset_index()
    choice = chosen_targets(wide)
    if len(choice):
        wide = wide.join(choice, on=SETTING)
        wide[CHOSEN] = wide[CANDIDATES[0]].where(wide.chosen == CANDIDATES[0], wide[CANDIDATES[1]])
    for a, b in AMORTIZED_DIFFS:
        if {a, b} <= set(wide.columns):
            wide[f"{a} − {b}"] = wide[a] - wide[b]
    return wide


# the Markdown's method columns, in this order, before the differences (`AMORTIZED_DIFFS` order)
_AMORTIZED_ORDER = (
    "FP32",
    "PTQ",
    "HQQ",
    "QAT",
    STEPS,
    "Gen direct (PTQ)",
    "Gen residual (PTQ)",
    "Gen direct (QAT)",
    "Gen residual (QAT)",
    CHOSEN,
)


def _amortized_tidy(
    wide: pd.DataFrame, keys: list[str], columns: list[str], profile: Profile, commit: str
) -> pd.DataFrame:
    """Tidy rows of `amortized_wide`'s `columns` per `keys`: mean, std and count over checkpoints,
    each an accuracy or a paired difference."""
    tidy = wide.melt(
        id_vars=keys + ["checkpoint"], value_vars=columns, var_name="method", value_name="accuracy"
    )
    tidy = (
        tidy.groupby(keys + ["method"], dropna=False)
        .accuracy.agg(value="mean", std="std", n="count")
        .reset_index()
    )
    return tidy.assign(
        table="amortized_qat",
        std=tidy["std"].fillna(0.0),
        profile=profile.name,
        commit=commit,
        metric=["paired_difference" if " − " in m else "top1_accuracy" for m in tidy.method],
    )


def _amortized_rows(tidy: pd.DataFrame, shown: list[str]) -> list[dict]:
    """One Markdown row per (task, arch, bits, split): each `shown` column's mean, with ± std for
    the differences only."""
    rows = []
    for (task, arch, bits, split), g in ordered(tidy).groupby(
        ["task", "arch", "bits", "split"], sort=False
    ):
        by = g.set_index("method")
        rows.append(
            {
                "task": task,
                "arch": arch,
                "bits": bits,
                "split": SPLIT_LABELS[split],
                **({"chosen": g.chosen.iloc[0].split()[1]} if "chosen" in g else {}),
                **{
                    c: cell(by.value.get(c), by["std"].get(c) if " − " in c else None)
                    for c in shown
                },
            }
        )
    return rows


def amortized_table(runs: pd.DataFrame, profile: Profile, commit: str) -> tuple[pd.DataFrame, str]:
    """Amortized QAT: FP32, PTQ, HQQ, QAT and the generators of both targets and both sources, per
    pair, bit-width and split, with the paired differences that answer the questions (is
    residual-on-PTQ PTQ? does Gen-on-QAT beat HQQ, and how close does it come to QAT itself?)."""
    wide = amortized_wide(runs)
    keys = [*SETTING, "split"]
    columns = [c for c in wide.columns if c not in keys + ["checkpoint", "chosen"]]
    tidy = _amortized_tidy(wide, keys, columns, profile, commit)
    if "chosen" in wide:  # which target `CHOSEN` is, beside its rows
        tidy = tidy.join(wide.groupby(SETTING).chosen.first(), on=SETTING)
    shown = [c for c in _AMORTIZED_ORDER if c in columns] + [
        f"{a} − {b}" for a, b in AMORTIZED_DIFFS if f"{a} − {b}" in columns
    ]
    md = pd.DataFrame(_amortized_rows(tidy, shown)).sort_values(
        ["task", "arch", "bits"], ascending=[True, True, False], kind="stable"
    )
    return tidy, profile_markdown(
        md,
        f"Amortized QAT: one data-free forward pass against QAT and HQQ "
        f"({profile.qat.grid()}; top-1 %, mean over checkpoints)",
        profile,
        [
            "Gen direct: the paper's target (codes, S, Z); Gen residual: offsets from "
            "round-to-nearest of the same checkpoint (ours, qg.generator.tokenizer); (PTQ) / "
            "(QAT): trained on PTQ or QAT targets. Gen residual (PTQ) − PTQ is a correctness "
            "check: an untrained residual generator is PTQ, and trained on PTQ targets it should "
            "stay there.",
            f"{CHOSEN}: per pair and bit-width, the QAT-trained target with the higher mean "
            "accuracy on the validation run (run C: a third fine-tuning, which no generator "
            "trained on and no claim is made on); chosen there, shown on every split: the "
            "held-out run is the one that measures it.",
            f"{STEPS}: each checkpoint fine-tuned exactly as QAT is (steps, data, order) with no "
            f"quantization: {STEPS} − FP32 is what the extra steps gain, QAT − {STEPS} what "
            "quantizing costs under QAT.",
            "Differences are paired over the same checkpoints (mean ± std). HQQ needs no data; "
            f"QAT fine-tunes each model on data ({profile.qat.steps_text()}); Gen needs neither "
            "at inference.",
        ],
    )


def amortized_figure(runs: pd.DataFrame, split: str = "heldout_run"):
    """Each method's accuracy minus PTQ's on the same checkpoints against bits, one panel per (arch,
    task)."""
    wide = amortized_wide(runs)
    wide = wide[wide.split == split]
    methods = [
        c
        for c in (
            "HQQ",
            "QAT",
            STEPS,
            "Gen direct (QAT)",
            "Gen residual (QAT)",
            "Gen residual (PTQ)",
        )
        if c in wide
    ]
    # paired: the same checkpoint's PTQ
    wide = wide.assign(**{m: wide[m] - wide.PTQ for m in methods})
    long = wide.melt(
        id_vars=["arch", "task", "bits", "checkpoint"], value_vars=methods, var_name="method"
    )
    long["pair"] = long.arch + "/" + long.task
    grid = sns.relplot(
        data=long,
        x="bits",
        y="value",
        hue="method",
        style="method",
        col="pair",
        kind="line",
        markers=True,
        dashes=False,
        errorbar="sd",
        height=3.0,
        aspect=1.05,
        facet_kws={"sharey": False},
    )
    for ax in grid.axes.flat:
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_xticks(sorted(long.bits.unique()))
        ax.grid(alpha=0.3)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("bits (group-wise)", "accuracy − PTQ (points)")
    grid.figure.suptitle(
        f"Amortized QAT on the {SPLIT_LABELS[split]}: gain over PTQ on the same checkpoints "
        "(0 = PTQ)",
        y=1.04,
    )
    return grid.figure


_GAP_KEYS = ["arch", "task", "source", "variant", "bits"]


def gap_table(
    layers: pd.DataFrame, shift: pd.DataFrame, wide: pd.DataFrame, profile: Profile, commit: str
) -> tuple[pd.DataFrame, str]:
    """Why a generator loses on a new run what it keeps on its training checkpoints: per generator
    and split, its accuracy against its target (`amortized_wide`'s paired difference), its code
    error against that target (`qg.study.evaluation.split_gap`: mean over layers, and the worst
    layer's) and how far the split's inputs lie from the training checkpoints
    (`split_distances`, in training spacings)."""
    out = _gap_frame(layers, shift, wide)
    tidy = out.melt(id_vars=[*_GAP_KEYS, "split", "worst_layer"], var_name="metric").assign(
        table="amortized_gap", method="gen", profile=profile.name, commit=commit
    )
    return tidy, _gap_markdown(out, profile)


def _gap_frame(layers: pd.DataFrame, shift: pd.DataFrame, wide: pd.DataFrame) -> pd.DataFrame:
    """One row per generator and split: code errors (mean, worst layer), Gen − target, input
    shift."""
    per_layer = layers.groupby([*_GAP_KEYS, "split", "layer"]).code_mae.mean().reset_index()
    codes = per_layer.groupby([*_GAP_KEYS, "split"]).code_mae.agg(
        code_err="mean", worst_layer_err="max"
    )
    worst = per_layer.loc[per_layer.groupby([*_GAP_KEYS, "split"]).code_mae.idxmax()]
    codes = codes.join(worst.set_index([*_GAP_KEYS, "split"]).layer.rename("worst_layer"))
    out = codes.reset_index()
    keys = ["arch", "task", "bits", "split"]
    diffs = pd.concat(
        [
            (wide[f"Gen {v} ({src.upper()})"] - wide[src.upper()])
            .groupby([wide[k] for k in keys])
            .mean()
            .rename("gen_minus_target")
            .reset_index()
            .assign(source=src, variant=v)
            for src, v in out[["source", "variant"]].drop_duplicates().itertuples(index=False)
        ]
    )
    inputs = shift.groupby(["arch", "task", "split"]).in_spacings.median().rename("input_shift")
    out = out.merge(diffs, on=[*keys, "source", "variant"], how="left")
    return out.join(inputs, on=["arch", "task", "split"])


def _gap_markdown(out: pd.DataFrame, profile: Profile) -> str:
    """`_gap_frame` as the results' Markdown table, splits in reading order."""
    order = {k: i for i, k in enumerate(SPLIT_LABELS)}
    md = out.sort_values(
        ["task", "arch", "source", "variant", "bits", "split"],
        key=lambda c: c.map(order) if c.name == "split" else c,
        ascending=[True, True, True, True, False, True],
    ).assign(split=lambda d: d.split.map(SPLIT_LABELS))
    md = md.rename(
        columns={
            "gen_minus_target": "Gen − target",
            "code_err": "code err",
            "worst_layer_err": "worst layer err",
            "worst_layer": "worst layer",
            "input_shift": "inputs (spacings)",
        }
    ).round(3)
    return profile_markdown(
        md[
            [
                *_GAP_KEYS,
                "split",
                "Gen − target",
                "code err",
                "worst layer err",
                "worst layer",
                "inputs (spacings)",
            ]
        ],
        "Where amortized QAT loses on a new run: accuracy, codes and inputs by split",
        profile,
        [
            "Per generator trained on QAT or PTQ targets (`source`) and split: `Gen − target` its "
            "paired top-1 difference from its own target on the same checkpoints (mean); `code "
            "err` mean |code difference| from the target in quantization steps over layers, "
            "`worst layer err` the largest layer's (and which); `inputs (spacings)` the median "
            "distance of the split's FP32 checkpoints to the nearest training checkpoint, in "
            "units of the median spacing between neighbouring training checkpoints (a training "
            "checkpoint's own neighbour: about 1).",
        ],
    )


def gap_figure(layers: pd.DataFrame, tidy: pd.DataFrame):
    """The QAT-trained generator whose Gen − QAT falls most from its trained-on checkpoints to the
    held-out run: its code error per layer on each split (mean over checkpoints), beside the same
    for the generator that falls least, so a reader sees where the new run's errors appear."""
    diff = tidy[(tidy.metric == "gen_minus_target") & (tidy.source == "qat")].pivot_table(
        index=_GAP_KEYS, columns="split", values="value"
    )
    fall = (diff.trained - diff.heldout_run).sort_values()
    picked = {"largest fall": fall.index[-1], "smallest fall": fall.index[0]}
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 + 0.28 * layers.layer.nunique()), sharey=False)
    for ax, (what, key) in zip(axes, picked.items()):
        mine = layers.set_index(_GAP_KEYS).loc[key].reset_index()
        per = mine.groupby(["layer", "split"], sort=False).code_mae.mean().reset_index()
        sns.barplot(data=per, y="layer", x="code_mae", hue="split", hue_order=list(SPLITS), ax=ax)
        arch, task, source, variant, bits = key
        ax.set_title(
            f"{what}: {arch}/{task} {bits}-bit {variant} ({source.upper()} targets)\n"
            f"Gen − QAT {diff.trained[key]:+.2f} on its trained-on checkpoints, "
            f"{diff.heldout_run[key]:+.2f} on the held-out run",
            fontsize=10,
        )
        ax.set(xlabel="mean |code error| (quantization steps)", ylabel="")
        ax.grid(alpha=0.3, axis="x")
        handles, labels = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    # one legend, under both panels, where it hides no bar
    fig.legend(handles, [SPLIT_LABELS[s] for s in labels], loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
