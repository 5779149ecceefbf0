"""Fidelity and memorisation of generated models (03_generate, 08_residual_qat): is the generated
model its target, does it follow its input, or does it replay a training target?
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..config.schema import Profile
from ..core.report import SPLIT_LABELS
from .common import profile_markdown

# what identifies one generator's rows in `Experiment.diagnose` frames
_GENERATOR_KEYS = ["arch", "task", "source", "variant", "bits", "granularity"]


def _per_layer(layers: pd.DataFrame, sens: pd.DataFrame) -> pd.DataFrame:
    """Each generator's layers, their measures averaged over checkpoints, with how much each
    layer's target moves between checkpoints (0: never)."""
    keys = _GENERATOR_KEYS
    per_layer = layers.groupby(keys + ["layer"]).mean(numeric_only=True).reset_index()
    moves = sens.groupby(keys + ["layer"]).target_moves.mean().reset_index()
    return per_layer.merge(moves, on=keys + ["layer"], how="left")


def _code_errors(per_layer: pd.DataFrame) -> pd.DataFrame:
    """Per generator, over its layers: equal codes, code error (mean, and the worst layer's: which,
    and its groups' gain error) and S error."""
    keys = _GENERATOR_KEYS
    out = per_layer.groupby(keys).agg(
        codes_equal=("codes_equal", "mean"),
        code_mae=("code_mae", "mean"),
        code_mae_worst=("code_mae", "max"),
        scale_rel_err=("scale_rel_err", "mean"),
    )
    worst = per_layer.loc[per_layer.groupby(keys).code_mae.idxmax()].set_index(keys)
    return out.join(worst.layer.rename("worst_layer")).join(
        worst.group_gain_err.rename("worst_gain_err")
    )


def _moving_layers(sens: pd.DataFrame) -> pd.DataFrame:
    """Per generator: the smallest input sensitivity and alignment over the layers whose target
    moves (each layer's averaged over checkpoint pairs)."""
    keys = _GENERATOR_KEYS
    moving = (
        sens[sens.target_moves > 0]
        .groupby(keys + ["layer"])[["sensitivity", "alignment"]]
        .mean()
        .reset_index()
    )
    return moving.groupby(keys).agg(
        sensitivity_min=("sensitivity", "min"), alignment_min=("alignment", "min")
    )


def _memorisation(near: pd.DataFrame) -> pd.DataFrame:
    """Per generator: distances and error IoUs of the generated models to their own and to the
    nearest training target, beside the targets' own distance and IoU to the nearest one."""
    gen, tgt = (
        near[near.model == m].groupby(_GENERATOR_KEYS).mean(numeric_only=True)
        for m in ("gen", "target")
    )
    return pd.DataFrame(
        {
            "to_own": gen.to_own,
            "to_nearest_train": gen.to_nearest_train,
            "target_to_nearest_train": tgt.to_nearest_train,
            "iou_nearest_train": gen.iou_nearest_train,
            "target_iou_nearest_train": tgt.iou_nearest_train,
            "iou_own": gen.iou_own,
        }
    )


def fidelity_table(
    diag: dict[str, pd.DataFrame],
    diff: pd.DataFrame,
    profile: Profile,
    commit: str,
    generators: str = "the Table 1 generators",
) -> tuple[pd.DataFrame, str]:
    """One row per generator (arch, task, source, variant, spec) of `Experiment.diagnose` frames: is
    the generated model its target?

    Beside Gen − PTQ on the same checkpoints: codes equal to the target's, mean code error (the
    worst layer's too) in steps, S error, input sensitivity and alignment on the layers whose target
    moves between checkpoints, the exact-copy rate of the layers whose target never moves, and the
    memorisation test.
    """
    keys = _GENERATOR_KEYS
    layers, sens, near = diag["layers"], diag["sensitivity"], diag["nearest"]
    per_layer = _per_layer(layers, sens)
    frozen = per_layer[per_layer.target_moves == 0]
    split = near.split.iloc[0]
    d = diff[(diff.split == split) & (diff.condition == "")]
    out = (
        _code_errors(per_layer)
        .join(_moving_layers(sens))
        .join(frozen.groupby(keys).agg(frozen_copy=("codes_equal", "mean")))
        .join(_memorisation(near))
        .join(d.groupby(keys).accuracy.mean().rename("gen_minus_ptq"))
        .reset_index()
    )
    tidy = out.melt(id_vars=keys + ["worst_layer"], var_name="metric").assign(
        table="fidelity", split=split, method="gen", profile=profile.name, commit=commit
    )
    return tidy, _fidelity_markdown(out, split, profile, generators)


# `fidelity_table`'s columns as its Markdown names them, and the decimals each is rounded to
_FIDELITY_NAMES = {
    "granularity": "gran.",
    "gen_minus_ptq": "Gen − PTQ",
    "codes_equal": "codes =",
    "code_mae": "code err",
    "code_mae_worst": "worst layer err",
    "worst_layer": "worst layer",
    "scale_rel_err": "S err",
    "worst_gain_err": "its gain err",
    "sensitivity_min": "sens. (min)",
    "alignment_min": "align. (min)",
    "frozen_copy": "frozen copy",
    "to_own": "d(own)",
    "to_nearest_train": "d(train)",
    "target_to_nearest_train": "d(train) of target",
    "iou_nearest_train": "IoU train",
    "target_iou_nearest_train": "IoU train of target",
    "iou_own": "IoU own",
}
_FIDELITY_DIGITS = {
    "Gen − PTQ": 2,
    "codes =": 3,
    "code err": 2,
    "worst layer err": 2,
    "its gain err": 3,
    "S err": 4,
    "sens. (min)": 2,
    "align. (min)": 2,
    "frozen copy": 3,
    "d(own)": 4,
    "d(train)": 4,
    "d(train) of target": 4,
    "IoU train": 2,
    "IoU train of target": 2,
    "IoU own": 2,
}


def generator_columns(md: pd.DataFrame) -> pd.DataFrame:
    """`source` and `variant` dropped where they say nothing (PTQ targets only, our generator only);
    a variant kept is the `generator` column, ours named Gen."""
    md = md.drop(
        columns=[
            c
            for c in ("source", "variant")
            if md[c].nunique() == 1 and md[c].iloc[0] in ("ptq", "")
        ]
    )
    if "variant" in md:  # several generators: ours (no label) and variants
        md = md.assign(variant=md.variant.replace("", "Gen")).rename(
            columns={"variant": "generator"}
        )
    return md


def _fidelity_markdown(out: pd.DataFrame, split: str, profile: Profile, generators: str) -> str:
    """`fidelity_table`'s Markdown: short column names, rounded, with the notes that define each
    measure."""
    md = generator_columns(out.rename(columns=_FIDELITY_NAMES).round(_FIDELITY_DIGITS))
    return profile_markdown(
        md,
        f"Fidelity and memorisation of {generators} ({SPLIT_LABELS[split]})",
        profile,
        [
            "Against the generator's target (PTQ, or QAT for `source` qat) of the same checkpoint: "
            "`codes =` fraction of equal integer codes; `code err` mean |code difference| in "
            "quantization steps over layers (`worst layer`: the largest, and which; "
            "`its gain err`: mean |a - 1| of its groups' fit a x target + b, a wrong range per "
            "group); `S err` mean relative error of S.",
            "`sens.`: ||G(a) − G(b)|| / ||T(a) − T(b)|| and `align.`: cosine between the two, "
            "per layer whose target moves between consecutive held-out checkpoints, the smallest "
            "over layers (1 = follows its input, 0 = ignores it); `frozen copy`: codes equal on "
            "layers whose target never moves (nothing to follow: a copy is the answer).",
            "`d(own)` / `d(train)`: distance of the generated weights to their own target / to the "
            "nearest training target (relative to the targets' norm); `of target` is the same for "
            "the target itself, what a faithful quantizer would show. `IoU`: of the sets of "
            "misclassified test images, with the nearest training target's model and with the own "
            "target's model. A replica of the training set has d(train) < d(own) and IoU train > "
            "IoU own.",
        ],
    )


def _code_error_panel(ax, layers: pd.DataFrame) -> None:
    """Code error against bits, group-wise: the mean over layers and the worst layer of each
    (arch, task), against one quantization step."""
    group = layers[layers.granularity == "group"]
    per_bits = group.groupby(["pair", "bits"]).code_mae.agg(["mean", "max"]).reset_index()
    for (pair, g), color in zip(per_bits.groupby("pair"), sns.color_palette("tab10")):
        ax.plot(g.bits, g["mean"], "o-", color=color, label=f"{pair}: mean over layers")
        ax.plot(g.bits, g["max"], "v:", color=color, label=f"{pair}: worst layer")
    ax.axhline(1, color="k", lw=0.8, ls="--", label="1 step")
    ax.set(
        title="code error against the target",
        xlabel="bits (group-wise)",
        ylabel="mean |code − target code| (steps)",
        yscale="log",
    )
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)


def _following_panel(ax, sens: pd.DataFrame) -> None:
    """Input sensitivity against alignment per moving layer: does the output follow the input (both
    1 when it does faithfully)?"""
    moving = (
        sens[sens.target_moves > 0]
        .groupby(["pair", "bits", "layer"])[["sensitivity", "alignment"]]
        .mean()
        .reset_index()
    )
    # a constant generator (0) at the bottom edge
    moving["sensitivity"] = moving.sensitivity.clip(lower=1e-3)
    sns.scatterplot(
        data=moving,
        x="alignment",
        y="sensitivity",
        hue="pair",
        style="pair",
        size="bits",
        sizes=(15, 80),
        ax=ax,
    )
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.axvline(1, color="k", lw=0.8, ls="--")
    ax.annotate(
        "faithful",
        (1, 1),
        xytext=(-40, 12),
        textcoords="offset points",
        fontsize=7,
        arrowprops={"arrowstyle": "->"},
    )
    ax.set(
        title="does the output follow the input? (moving layers)",
        xlabel="alignment cos(G(a) − G(b), T(a) − T(b))",
        ylabel="sensitivity ||G(a) − G(b)|| / ||T(a) − T(b)||",
        yscale="log",
        xlim=(min(-0.05, moving.alignment.min() - 0.05), 1.05),
    )
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def _memorisation_panel(ax, near: pd.DataFrame) -> None:
    """Distance to the own target against distance to the nearest training target, beside each
    target's own distance to the nearest training target: own target, or a training one?"""
    gen = (
        near[near.model == "gen"]
        .groupby(["pair", "bits"])[["to_own", "to_nearest_train"]]
        .mean()
        .reset_index()
    )
    # hardly depends on bits
    tgt = near[near.model == "target"].groupby(["pair"])[["to_nearest_train"]].mean()
    sns.scatterplot(
        data=gen,
        x="to_nearest_train",
        y="to_own",
        hue="pair",
        style="pair",
        size="bits",
        sizes=(15, 80),
        ax=ax,
    )
    top = max(gen.to_own.max(), gen.to_nearest_train.max(), tgt.to_nearest_train.max()) * 1.1
    ax.plot([0, top], [0, top], color="k", lw=0.8, ls="--")
    ax.text(
        top * 0.55, top * 0.6, "replica side:\ncloser to a training target", fontsize=7, rotation=0
    )
    for i, (pair, row) in enumerate(tgt.iterrows()):
        ax.axvline(
            row.to_nearest_train,
            lw=0.6,
            ls=":",
            color="grey",
            label="the target's own distance to the nearest training target" if i == 0 else None,
        )
    ax.set(
        title="memorisation: own target or a training one?",
        xlabel="distance to the nearest training target",
        ylabel="distance to its own target",
        xlim=(0, top),
        ylim=(0, top),
    )
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def fidelity_figure(diag: dict[str, pd.DataFrame]):
    """Three panels: code error against bits (mean over layers and the worst layer, group-wise),
    input sensitivity against alignment per moving layer, and distance to the own target against
    distance to the nearest training target (beside each target's own distance to the nearest
    training target)."""
    layers, sens, near = (
        diag[k].assign(pair=lambda d: d.arch + "/" + d.task)
        for k in ("layers", "sensitivity", "nearest")
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    _code_error_panel(axes[0], layers)
    _following_panel(axes[1], sens)
    _memorisation_panel(axes[2], near)
    fig.tight_layout()
    return fig
