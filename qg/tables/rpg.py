"""RPG at our scale (10_rpg): whole models sampled from noise, and binary tasks it never saw."""

from __future__ import annotations

from contextlib import contextmanager

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..config.schema import Profile
from ..core.report import cell, markdown
from ..study import rpg_binary, rpg_study
from . import paper

RPG_KIND_LABELS = {
    "original": "original (RPG's training ckpts)",
    "heldout": "held-out run (new ckpts, other seed)",
    "generated": "RPG samples",
    "noise": "training ckpt + noise",
    "average": "average of training ckpts",
}


def _rpg_stats(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, task, kind of model): accuracy as RPG reports it (n, best, mean, median, min,
    std), the median memorisation measures and the mean seconds to make one model."""
    return (
        rows.groupby(["arch", "task", "kind"], sort=False)
        .agg(
            n=("accuracy", "size"),
            best=("accuracy", "max"),
            mean=("accuracy", "mean"),
            median=("accuracy", "median"),
            min=("accuracy", "min"),
            std=("accuracy", "std"),
            to_nearest_train=("to_nearest_train", "median"),
            error_iou=("error_iou", "median"),
            seconds_per_model=("seconds", "mean"),
        )
        .reset_index()
    )


def _rpg_shown(stats: pd.DataFrame) -> pd.DataFrame:
    """`_rpg_stats` as the Markdown shows it: kinds labelled, rounded, the memorisation columns
    named."""
    return (
        stats.assign(kind=stats.kind.map(RPG_KIND_LABELS))
        .round(
            {
                "best": 2,
                "mean": 2,
                "median": 2,
                "min": 2,
                "std": 2,
                "to_nearest_train": 4,
                "error_iou": 3,
                "seconds_per_model": 2,
            }
        )
        .rename(
            columns={
                "to_nearest_train": "dist. to nearest train (median)",
                "error_iou": "error IoU with it (median)",
                "seconds_per_model": "s / model",
            }
        )
    )


def _rpg_paper_rows() -> pd.DataFrame:
    """RPG's own Table 1 (ImageNet-1K), its original and generated models, as rows of ours."""
    return pd.DataFrame(
        [
            {
                "arch": f"{model} (RPG paper, ImageNet-1K)",
                "task": "",
                "kind": RPG_KIND_LABELS[kind],
                **(
                    {"n": 50, "mean": v["original"]}
                    if kind == "original"
                    else {k: v[k] for k in ("best", "mean", "median", "min", "std")}
                ),
            }
            for model, v in paper.RPG_TABLE1.items()
            for kind in ("original", "generated")
        ]
    )


def rpg_table(
    rows: pd.DataFrame, records: dict, profile: Profile, commit: str
) -> tuple[pd.DataFrame, str]:
    """RPG's Table 1 at our scale (`rpg_study.rpg_rows`): accuracy statistics per kind of model, as
    RPG reports them (best / mean / median / min / std), beside the memorisation tests;
    `records[arch]` is RPG's training record (train seconds, steps)."""
    stats = _rpg_stats(rows)
    tidy = stats.melt(id_vars=["arch", "task", "kind"], var_name="metric").assign(
        table="rpg", profile=profile.name, commit=commit
    )
    shown = pd.concat([_rpg_shown(stats), _rpg_paper_rows()], ignore_index=True).fillna("")
    conf = rpg_study.rpg_config(profile)
    train = "; ".join(
        f"{a}: {r['steps']} steps, {r['train_seconds']:.0f} s, {r['n_params']:,} parameters"
        for a, r in records.items()
    )
    return tidy, markdown(
        shown,
        "RPG at our scale: whole models sampled from noise (top-1 %)",
        [
            "Original: the run-A checkpoints RPG is trained on (its 'original' models, as in RPG's "
            "Table 1); held-out run: checkpoints of the same recipe with another seed, which RPG "
            "never sees, i.e. what genuinely new models of this recipe look like. Noise: a "
            f"training checkpoint plus Gaussian noise of {conf['noise']} x each tensor's std; "
            f"average: the mean of {conf['average_of']} randomly drawn training checkpoints (Zeng "
            "et al.'s two baselines).",
            "Distance to nearest train: Euclidean distance over every tensor to the nearest "
            "training checkpoint other than the model itself, relative to the training "
            "checkpoints' mean norm (for the originals it is the training set's own spacing); "
            "error IoU: overlap of the test samples the model and that checkpoint misclassify (1: "
            "the same mistakes). A replica sits at distance ~0 with IoU ~1; a new model where the "
            "held-out run does.",
            f"RPG training: {train}; s / model is the time to make one model (sampling, for RPG).",
            f"Profile `{profile.name}`.",
        ],
    )


@contextmanager
def _seeded_jitter(seed: int = 0):
    """numpy's global random state seeded inside the block and restored after it: seaborn's
    stripplot draws its jitter from np.random, so the figures come out the same on every run,
    and the caller's random stream is left as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def rpg_figure(rows: pd.DataFrame):
    """Per kind of model: accuracy, distance to the nearest training checkpoint, and the IoU of its
    mistakes with that checkpoint's, one colour per architecture: is RPG generating new models or
    replaying its training set?"""
    order = [k for k in RPG_KIND_LABELS if k in set(rows.kind)]
    data = rows.assign(kind=rows.kind.map(lambda k: RPG_KIND_LABELS[k].split(" (")[0]))
    labels = [RPG_KIND_LABELS[k].split(" (")[0] for k in order]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = (
        ("accuracy", "top-1 accuracy (%)"),
        ("to_nearest_train", "distance to nearest training ckpt (relative)"),
        ("error_iou", "IoU of errors with that ckpt"),
    )
    for ax, (metric, title) in zip(axes, panels):
        with _seeded_jitter():
            sns.stripplot(
                data=data,
                y="kind",
                x=metric,
                hue="arch",
                order=labels,
                dodge=True,
                alpha=0.7,
                size=4,
                ax=ax,
            )
        ax.set(title=title, xlabel="", ylabel="")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, title="arch")
    # from the training set's own spacing (~1e-3) to a stranger (~1)
    axes[1].set_xscale("symlog", linthresh=1e-3)
    axes[1].set_xlim(left=0)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("RPG at our scale: new models, or replays of its training checkpoints?", y=1.02)
    fig.tight_layout()
    return fig


def _binary_per_task(stats: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """One Markdown row per unseen task: its own classifiers, RPG's best and mean sample, and the
    nearest seen task's classifiers (which task, how many classes apart)."""
    # one sample per task has no std
    wide = stats.pivot_table(
        index=["arch", "embedding"],
        columns="kind",
        values=["mean", "std", "best"],
        sort=False,
        dropna=False,
    )
    hamming = rows.groupby(["arch", "embedding"], sort=False)[["nearest_seen", "hamming"]].first()
    return pd.DataFrame(
        {
            "original": [
                cell(m, s) for m, s in zip(wide["mean"]["original"], wide["std"]["original"])
            ],
            "RPG best": wide["best"]["generated"].round(2),
            "RPG mean": [
                cell(m, s) for m, s in zip(wide["mean"]["generated"], wide["std"]["generated"])
            ],
            "nearest seen task": [
                f"{cell(m)} ({n}, d = {h})"
                for m, n, h in zip(
                    wide["mean"]["nearest seen"], hamming.nearest_seen, hamming.hamming
                )
            ],
            "majority class": wide["mean"]["majority class"].round(2),
        },
        index=wide.index,
    ).reset_index()


def _binary_means(stats: pd.DataFrame) -> list[dict]:
    """The two summary rows: our mean over unseen tasks, and the paper's over its 20 (RPG Table
    14)."""
    means = stats.groupby("kind").agg(mean=("mean", "mean"), best=("best", "mean"))
    ref = np.array(list(paper.RPG_TABLE14.values()))
    return [
        {
            "arch": "mean over unseen tasks",
            "embedding": "",
            "original": cell(means["mean"]["original"]),
            "RPG best": round(means["best"]["generated"], 2),
            "RPG mean": cell(means["mean"]["generated"]),
            "nearest seen task": cell(means["mean"]["nearest seen"]),
            "majority class": round(means["mean"]["majority class"], 2),
        },
        {
            "arch": "RPG paper (ViT-Tiny, CIFAR-10, 20 unseen tasks)",
            "embedding": "",
            "original": cell(ref[:, 0].mean()),
            "RPG best": round(ref[:, 1].mean(), 2),
            "RPG mean": cell(ref[:, 2].mean()),
            "nearest seen task": "NA",
            "majority class": "NA",
        },
    ]


def binary_table(
    rows: pd.DataFrame, record: dict, profile: Profile, commit: str
) -> tuple[pd.DataFrame, str]:
    """RPG's Tables 9 and 14 at our scale (`rpg_binary.binary_rows`): per unseen binary task,
    its own classifiers, RPG's samples (best, mean ± std) and the nearest seen task's
    classifiers, beside the paper's averages."""
    by = rows.groupby(["arch", "embedding", "kind"], sort=False)
    stats = by.agg(
        mean=("accuracy", "mean"),
        std=("accuracy", "std"),
        best=("accuracy", "max"),
        n=("accuracy", "size"),
        to_nearest_train=("to_nearest_train", "median"),
    ).reset_index()
    tidy = stats.melt(id_vars=["arch", "embedding", "kind"], var_name="metric").assign(
        table="rpg_binary", profile=profile.name, commit=commit
    )
    shown = pd.concat(
        [_binary_per_task(stats, rows), pd.DataFrame(_binary_means(stats))], ignore_index=True
    )
    b = rpg_binary.binary_config(profile)
    return tidy, markdown(
        shown,
        "RPG on binary tasks it never saw (top-1 %, RPG Tables 9 and 14 at our scale)",
        [
            f"Each task relabels the {b['dataset']} classes 0/1 by its embedding; classifiers are "
            f"the pretrained model's head retrained on frozen features ({b['checkpoints']} per "
            f"task). RPG is trained on {record.get('seen_tasks')} seen tasks "
            f"({record.get('n_train_checkpoints')} classifiers, {record.get('steps')} steps, "
            f"{record.get('train_seconds', float('nan')):.0f} s), conditioned on the embedding, "
            f"and generates {b['samples']} heads per unseen task (the frozen rest is copied).",
            "Original: the unseen task's own classifiers, which RPG never saw. Nearest seen task: "
            "the classifiers of the seen task whose embedding differs in the fewest classes (d), "
            "used as they are: the baseline that needs no generator. Majority class: always "
            "answering the task's more frequent test label, the floor (chance, 50 %, is below it "
            "wherever the two labels cover unequal numbers of classes).",
            f"Profile `{profile.name}`.",
        ],
    )


def binary_figure(rows: pd.DataFrame):
    """Accuracy on each unseen task of its own classifiers, RPG's samples and the nearest seen
    task's, and each kind's distance to the nearest of RPG's training classifiers."""
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    with _seeded_jitter():
        sns.stripplot(
            data=rows,
            x="embedding",
            y="accuracy",
            hue="kind",
            dodge=True,
            size=5,
            alpha=0.8,
            ax=axes[0],
        )
    axes[0].set(
        title="unseen binary tasks: accuracy (%)",
        xlabel="task embedding (class 0..9 -> label)",
        ylabel="top-1 (%)",
    )
    axes[0].tick_params(axis="x", rotation=30)
    axes[0].grid(alpha=0.3, axis="y")
    sns.boxplot(data=rows, x="kind", y="to_nearest_train", ax=axes[1])
    axes[1].set(
        title="distance to nearest training classifier", xlabel="", ylabel="relative distance"
    )
    axes[1].tick_params(axis="x", rotation=20)
    axes[1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def tensor_stats_figure(stats: pd.DataFrame):
    """Each tensor's std and mean in RPG's samples against the training checkpoints' (medians over
    the models of each kind): on the diagonal where the samples have the checkpoints' scale."""
    per = stats.groupby(["tensor", "kind"])[["mean", "std"]].median().unstack("kind")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, what in zip(axes, ("std", "mean")):
        x, y = per[what]["original"], per[what]["generated"]
        ax.scatter(x, y, s=14, alpha=0.7)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="samples = checkpoints")
        if what == "std":
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"{what} of a tensor, training checkpoints")
        ax.set_ylabel(f"{what} of the tensor, RPG samples")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("RPG's samples against its training checkpoints, tensor by tensor")
    fig.tight_layout()
    return fig
