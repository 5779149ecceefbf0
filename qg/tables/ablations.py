"""The ablations (04-07): one factor's variants against PTQ, their cost, and the computed findings
beside the paper's own ablation tables.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..config.profiles import ablation_setup
from ..config.schema import Profile
from ..core.report import SPLIT_LABELS, cell, summarize
from ..study.settings import SPLITS
from . import paper
from .common import paired_difference, profile_markdown


def _pairs(table: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in table.items())


def paper_ablation_note(factor: str) -> str:
    """The paper's own numbers for one ablation (`qg.tables.paper`), as the note under our table."""
    if factor == "token_size":
        rows = "; ".join(f"{k}: {' '.join(f'{x:.2f}' for x in v)}" for k, v in paper.TABLE4.items())
        return f"Paper, Table 4 (ImageNet-1K ViT-Base, group-wise, 8..3 bits): {rows}."
    if factor == "backbone":
        rows = "; ".join(
            f"{k} {a:.2f} / {h} h / {gb} GB" for k, (a, h, gb) in paper.TABLE10.items()
        )
        return (
            "Paper, Table 10 (ImageNet-1K ViT-Tiny; accuracy %, training hours, GB on a GPU): "
            f"{rows}."
        )
    table, number = {"padding": (paper.TABLE6, 6), "head": (paper.TABLE5, 5)}[factor]
    return f"Paper, Table {number} (ImageNet-1K ViT-Tiny, 8-bit): {_pairs(table)}."


def _bit_cells(sel: pd.DataFrame, suffix: str = "") -> dict:
    """`<b>-bit<suffix>` -> mean ± std of each bit-width's summary row in `sel`: one table row's
    accuracy cells."""
    return {f"{b}-bit{suffix}": cell(v, s) for b, v, s in zip(sel.bits, sel.value, sel["std"])}


def _split_rows(acc: pd.DataFrame, split: str, variants: list) -> list[dict]:
    """One split's rows: PTQ as the reference, then each variant's Gen and its Gen − PTQ."""
    acc = acc[acc.split == split]
    ref = acc[acc.method == "ptq"].drop_duplicates("bits")
    rows = [{"variant": "PTQ (reference)", "split": SPLIT_LABELS[split], **_bit_cells(ref)}]
    for variant in variants:
        r = {"variant": variant, "split": SPLIT_LABELS[split]}
        for method, suffix in (("gen", ""), ("gen-ptq", " Gen − PTQ")):
            r.update(_bit_cells(acc[(acc.variant == variant) & (acc.method == method)], suffix))
        rows.append(r)
    return rows


def _cost_rows(runs: pd.DataFrame, costs: pd.DataFrame) -> list[dict]:
    """One row per variant: what its generators cost to train (time, memory, size, final loss) and
    Gen's time per generated model."""
    gen_seconds = runs[runs.method == "gen"].groupby("variant").seconds.mean()
    return [
        {
            "variant": variant,
            "split": "cost (per generator)",
            "train (s)": f"{g.train_seconds.mean():.1f}",
            "generate (s/model)": f"{gen_seconds.get(variant, float('nan')):.3f}",
            "activation (MB)": f"{g.activation_mb.mean():.1f}",
            "params": f"{int(g.n_params.mean()):,}",
            "final loss": f"{g.final_loss.mean():.4g}",
        }
        for variant, g in costs.groupby("variant", sort=False)
    ]


def _ablation_tidy(
    runs: pd.DataFrame, costs: pd.DataFrame, factor: str, profile: Profile, commit: str
) -> pd.DataFrame:
    """The ablation's tidy rows: accuracy summaries of `runs`, then one row per cost metric of each
    generator (std 0, n 1: measured once)."""
    tidy = summarize(runs, f"ablation_{factor}", profile, commit)
    cost_tidy = costs.melt(id_vars=["variant", "bits"], var_name="metric", value_name="value")
    cost_tidy = cost_tidy.assign(
        table=f"ablation_{factor}", std=0.0, n=1, profile=profile.name, commit=commit
    )
    return pd.concat([tidy, cost_tidy], ignore_index=True)


def _ablation_title(profile: Profile, factor: str) -> str:
    """The table's title: the factor and the (arch, task, granularity) it is ablated on."""
    a = ablation_setup(profile, factor)
    return (
        f"Ablation of the {factor.replace('_', ' ')} ({a.arch}, {a.task}, "
        f"{a.granularity}-wise; top-1 %, mean ± std over checkpoints)"
    )


def ablation_table(
    runs: pd.DataFrame, costs: pd.DataFrame, factor: str, profile: Profile, commit: str
) -> tuple[pd.DataFrame, str]:
    """One factor's variants: accuracy of Gen (and the paired Gen − PTQ) per split and bit-width,
    plus cost.

    `costs` has one row per (variant, bits) generator: train_seconds, activation_mb, n_params,
    final_loss.
    """
    runs = pd.concat([runs, paired_difference(runs)], ignore_index=True)
    tidy = _ablation_tidy(runs, costs, factor, profile, commit)
    acc = tidy[tidy.metric == "top1_accuracy"]
    variants = list(dict.fromkeys(runs.variant))
    rows = [
        r
        for split in [s for s in SPLITS if s in set(acc.split)]
        for r in _split_rows(acc, split, variants)
    ]
    md = pd.DataFrame(rows + _cost_rows(runs, costs)).fillna("")
    return tidy, profile_markdown(
        md,
        _ablation_title(profile, factor),
        profile,
        [
            paper_ablation_note(factor),
            "activation (MB): tensors autograd saves for one training step (batch of the profile), "
            "a deterministic stand-in for peak training memory; times are wall-clock on the "
            "machine in the provenance file.",
        ],
    )


def ablation_figure(runs: pd.DataFrame, factor: str):
    """Gen − PTQ (paired, same checkpoint) of every variant, per split and bit-width, mean ± std
    over checkpoints.

    The difference, not the accuracy: the effects the ablations are about are tenths of a point on
    an 85 % scale, which bars starting at 0 hide. A variant far below the others (a failed
    generator) still shows, its points on the same axis.
    """
    diff = paired_difference(runs).assign(split=lambda d: d.split.map(SPLIT_LABELS))
    order = list(dict.fromkeys(runs.variant))
    bits = sorted(diff.bits.unique())
    fig, axes = plt.subplots(
        1, len(bits), figsize=(5.2 * len(bits), 3.6), squeeze=False, sharey=True
    )
    for ax, b in zip(axes[0], bits):
        sns.pointplot(
            data=diff[diff.bits == b],
            x="variant",
            y="accuracy",
            hue="split",
            order=order,
            hue_order=[SPLIT_LABELS[s] for s in SPLITS],
            errorbar="sd",
            dodge=0.4,
            linestyle="none",
            markersize=5,
            capsize=0.1,
            ax=ax,
        )
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set(title=f"{b}-bit", xlabel=factor.replace("_", " "), ylabel="Gen − PTQ (points)")
        if diff.accuracy.abs().max() > 10:  # a failed variant: keep tenths near 0 readable
            ax.set_yscale("symlog", linthresh=1)
            ax.set_ylabel("Gen − PTQ (points; log beyond ±1)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, title=None)
    fig.suptitle(
        f"Ablation of the {factor.replace('_', ' ')}: Gen − PTQ on the same checkpoints "
        "(0: as good as PTQ)"
    )
    fig.tight_layout()
    return fig
