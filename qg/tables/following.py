"""Does a generator follow its input? (03_generate, 08_residual_qat): on every split, whether Gen's
accuracy moves with its target's from checkpoint to checkpoint, as a table and a figure.
"""

from __future__ import annotations

import pandas as pd
import seaborn as sns

from .. import methods
from ..config.schema import Profile
from ..core.report import SPLIT_LABELS
from ..study.agreement import TARGET_METHOD
from .common import profile_markdown
from .fidelity import generator_columns

_CELL = ["split", "arch", "task", "bits", "granularity"]


def _following_frame(runs: pd.DataFrame, agreement: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (split, cell, generator): n, corr(Gen, target), corr(target, FP32), constant,
    and the image-by-image agreement of `qg.study.agreement` when given."""
    runs = runs.assign(variant=runs.variant.fillna(""), condition=runs.condition.fillna(""))
    base = runs[runs.method.isin(["fp", *TARGET_METHOD.values()])].pivot_table(
        index=[*_CELL, "checkpoint"], columns="method", values="accuracy", aggfunc="first"
    )
    gens = runs[runs.method.isin(methods.names("generator")) & (runs.condition == "")]
    rows = []
    for key, g in gens.groupby([*_CELL, "source", "method", "variant"]):
        cell, (source, method, variant) = key[:5], key[5:]
        acc = g.groupby("checkpoint").accuracy.first()
        here = base.loc[cell].reindex(acc.index)
        target = here[TARGET_METHOD[source]]
        rows.append(
            dict(zip(_CELL, cell))
            | {
                "source": source,
                "variant": variant or methods.get(method).variant,
                "n": len(acc),
                "corr_target": acc.corr(target),
                "target_corr_fp": target.corr(here["fp"]),
                "constant": int(acc.nunique() == 1 and target.nunique() > 1),
            }
        )
    out = pd.DataFrame(rows)
    if agreement is None:
        return out
    keys = [*_CELL, "source", "variant", "n"]
    return out.merge(agreement, on=keys, how="left", validate="one_to_one")


_COLUMNS = {
    "granularity": "gran.",
    "corr_target": "corr(Gen, target)",
    "target_corr_fp": "corr(target, FP32)",
    "constant": "Gen constant",
    "agree_own": "agree own (%)",
    "agree_others": "agree others (%)",
    "targets_agree": "targets agree (%)",
    "closest_target": "Gen: own target",
    "closest_input": "Gen: own input",
    "target_closest_input": "target: own input",
}
_NOTE = (
    "Across the n checkpoints of a split: `corr(Gen, target)` the correlation of Gen's top-1 with "
    "its target's (PTQ, or QAT for `source` qat) on the same checkpoints; `corr(target, FP32)` the "
    "target's own with the input's FP32 top-1 (a quantizer that follows its input). `Gen "
    "constant`: Gen's top-1 is the same on every checkpoint while the target's is not. Empty: the "
    "target's top-1 does not vary."
)
_AGREEMENT_NOTE = (
    "Image by image (`qg.study.agreement`): `agree own` the share of test images on which Gen's "
    "model of a checkpoint predicts what that checkpoint's target does, `agree others` what the "
    "other checkpoints' targets do, `targets agree` the targets with each other (means over "
    "pairs). `Gen: own target`, `Gen: own input`, `target: own input`: on how many of the n "
    "checkpoints Gen's (or the target's) model agrees with that checkpoint's target (or FP32 "
    "input) at least as much as with any other checkpoint's (chance: about 1). Where the target "
    "does not find its own input, the test images cannot tell whether Gen follows it."
)


def following_table(
    runs: pd.DataFrame,
    profile: Profile,
    commit: str,
    generators: str = "the Table 1 generators",
    agreement: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, str]:
    """Does each generator follow its input, on every split? One row per (split, cell, generator):
    across the split's checkpoints, the correlation of Gen's accuracy with its target's (PTQ or QAT
    of the same checkpoint, by `source`), the target's own correlation with the input's FP32
    accuracy (what following the input looks like), and whether Gen's accuracy is the same on every
    checkpoint while the target's is not (a generator that returns one model whatever it is
    given); with `agreement` (`qg.study.agreement`), the same question image by image."""
    out = _following_frame(runs, agreement)
    tidy = out.melt(id_vars=[*_CELL, "source", "variant", "n"], var_name="metric").assign(
        table="following", method="gen", profile=profile.name, commit=commit
    )
    shown = out.assign(
        split=out.split.map(SPLIT_LABELS), constant=out.constant.map({0: "", 1: "yes"})
    )
    md = generator_columns(shown.rename(columns=_COLUMNS).round(2))
    notes = [_NOTE] if agreement is None else [_NOTE, _AGREEMENT_NOTE]
    title = f"Does Gen follow its input? {generators}, every split"
    return tidy, profile_markdown(md, title, profile, notes)


def following_figure(runs: pd.DataFrame, split: str = "heldout_run"):
    """Each checkpoint of `split` as a point: its target's accuracy against Gen's, each taken from
    its cell's mean (so every cell sits on one scale), one panel per (arch, task). A generator that
    follows its input lies on the diagonal; one that ignores it, on the horizontal line."""
    runs = runs[(runs.split == split) & (runs.condition.fillna("") == "")]
    keys = ["arch", "task", "bits", "granularity", "checkpoint"]
    base = runs[runs.method.isin(TARGET_METHOD.values())].pivot_table(
        index=keys, columns="method", values="accuracy", aggfunc="first"
    )
    gen = runs[runs.method.isin(methods.names("generator"))]
    gen = gen.groupby([*keys, "source"]).accuracy.first().reset_index()
    gen["target"] = [
        base.loc[tuple(r[k] for k in keys), TARGET_METHOD[r.source]] for _, r in gen.iterrows()
    ]
    cell = gen.groupby(["arch", "task", "bits", "granularity", "source"])
    gen = gen.assign(
        gen_c=gen.accuracy - cell.accuracy.transform("mean"),
        target_c=gen.target - cell.target.transform("mean"),
        pair=gen.arch + "/" + gen.task,
        spec=gen.bits.astype(str) + "-bit " + gen.granularity,
    )
    grid = sns.relplot(
        data=gen,
        x="target_c",
        y="gen_c",
        hue="spec",
        style="source" if gen.source.nunique() > 1 else None,
        col="pair",
        height=3.2,
        facet_kws={"sharex": False, "sharey": False},
    )
    for ax in grid.axes.flat:
        lo, hi = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.6)
        ax.grid(alpha=0.3)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("target − its cell's mean (points)", "Gen − its cell's mean (points)")
    grid.figure.suptitle(
        f"Does Gen follow its input? One point per checkpoint of the {SPLIT_LABELS[split]} "
        "(diagonal: moves as its target does; flat: ignores its input)",
        y=1.05,
    )
    return grid.figure
