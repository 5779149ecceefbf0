"""02_train's convergence study: the generator against its training budget and head."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..config.schema import Profile
from ..core.report import SPLIT_LABELS
from .common import profile_markdown


def _convergence_markdown(rows: pd.DataFrame) -> pd.DataFrame:
    """The Markdown's frame: `rows` less the split and spec (the title names them), short column
    names, rounded."""
    md = rows.drop(columns=["split", "bits", "granularity"]).rename(
        columns={
            "gen_minus_ptq": "Gen − PTQ",
            "codes_equal": "codes =",
            "code_mae": "code err",
            "code_mae_worst": "worst layer err",
            "worst_layer": "worst layer",
            "worst_gain_err": "its gain err",
            "worst_local_err": "its local err",
            "worst_scale_err": "its S err",
            "scale_rel_err": "S err",
            "train_seconds": "train (s)",
            "final_loss": "final loss",
            "n_params": "params",
            "closest_input": "own input",
            "ptq_closest_input": "PTQ: own input",
        }
    )
    return md.round(
        {
            "Gen − PTQ": 2,
            "codes =": 3,
            "code err": 2,
            "worst layer err": 2,
            "its gain err": 3,
            "its local err": 2,
            "its S err": 3,
            "S err": 4,
            "train (s)": 0,
            "final loss": 5,
            "gen": 2,
            "ptq": 2,
        }
    )


def convergence_table(
    rows: pd.DataFrame, profile: Profile, commit: str
) -> tuple[pd.DataFrame, str]:
    """The convergence study (`evaluation.convergence_row` rows): tidy rows and a Markdown table per
    pair."""
    keys = [
        "arch",
        "task",
        "variant",
        "bits",
        "granularity",
        "split",
        "skip",
        "base",
        "d_model",
        "steps",
        "worst_layer",
    ]
    tidy = rows.melt(id_vars=keys, var_name="metric").assign(
        table="convergence", profile=profile.name, commit=commit
    )
    c = profile.convergence
    return tidy, profile_markdown(
        _convergence_markdown(rows),
        f"Convergence: the generator against its training budget and head ({c.bits}-bit "
        f"{c.granularity}-wise, {SPLIT_LABELS[rows.split.iloc[0]]})",
        profile,
        [
            "Fidelity against the generator's PTQ target of the same checkpoint, mean over "
            "checkpoints: `codes =` equal codes, `code err` mean |code difference| in steps over "
            "layers (`worst layer` the largest, and which), `S err` relative error of S. For the "
            "worst layer, its code error split in two (qg.study.fidelity.layer_fidelity): "
            "`its gain err` mean |a - 1| when each group's generated codes are fitted as a x "
            "target + b (a wrong range of the group), `its local err` the code error the fit "
            "leaves (per element); `its S err` its relative S error. `skip`: the head (`none` is "
            "the paper's, see qg.generator); `base`: what the skip adds to, the weights or RTN of "
            "them (the group ranges given, with the rounding dead zone: qg.generator.tokenizer). "
            "Train time on the machine in the provenance file. `own input`: on how many of the "
            "n checkpoints Gen's model predicts, image by image, what its own FP32 input does at "
            "least as often as what any other checkpoint does (qg.study.agreement; chance about "
            "1); `PTQ: own input` the same for PTQ."
        ],
    )


def convergence_figure(rows: pd.DataFrame):
    """Code error (mean and worst layer), the worst layer's per-group gain error, and Gen − PTQ
    for every variant, one colour per (arch, task)."""
    rows = rows.assign(pair=rows.arch + "/" + rows.task, worst_gain_pct=100 * rows.worst_gain_err)
    panels = (
        ("code_mae", "code error against the target (steps)", 1),
        ("worst_gain_pct", "worst layer: per-group gain error (%)", None),
        ("gen_minus_ptq", "Gen − PTQ (points, held-out run)", 0),
    )
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for (metric, title, ref), ax in zip(panels, axes):
        for (pair, g), color in zip(rows.groupby("pair", sort=False), sns.color_palette("tab10")):
            ax.plot(g.variant, g[metric], "o-", color=color, label=pair)
            if metric == "code_mae":
                ax.plot(
                    g.variant, g.code_mae_worst, "v:", color=color, label=f"{pair} (worst layer)"
                )
        if ref is not None:
            ax.axhline(ref, color="k", lw=0.8, ls="--")
        ax.set(title=title, xlabel="")
        ax.tick_params(axis="x", rotation=25)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_yscale("symlog", linthresh=0.01)  # an exact copy of its target has error 0
    axes[0].set_ylim(bottom=0)
    fig.tight_layout()
    return fig
