"""Real quantized files (09_real_files): their sizes against FP32, the packed runtime, and the
runtime bench's rows (`results/bench/runtime.csv`: timm's ViTs at the paper's sizes)."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from .. import methods
from ..config.schema import Profile
from ..core.io import ROOT
from ..core.report import markdown
from .common import spec_label

# written by `python -m qg.bench --sections runtime` and committed: the same for every profile
BENCH_RUNTIME = ROOT / "results" / "bench" / "runtime.csv"
# the specs the bench times timm's ViTs at, as a deployment would pick them, and their labels
DEPLOYED = {"w4-group64-sym": "4-bit group-64", "w8-channel-sym": "8-bit channels"}
PATH_LABELS = {
    "dequantize": "ours: dequantize per call",
    "kernel": "ours: int4 / int8 kernel",
    "hqq": "hqq HQQLinear",
    "torchao": "torchao Int8Tensor",
}
LATENCY_TARGET, MEMORY_TARGET = 0.8, 0.2  # issue 33's targets: time and resident bytes / FP32
TIMM_VIT = r"vit_([a-z]+)_patch\d+_\d+"  # the bench's real-size models, e.g. vit_small_patch16_224


def size_table(costs: pd.DataFrame, profile: Profile, commit: str) -> tuple[pd.DataFrame, str]:
    """How much smaller each method's file is than the FP32 checkpoint, at every spec, against the
    ideal: 32 / bits for the codes alone, less the S (and asymmetric Z) per group and the tensors
    kept in float."""
    tidy = costs.assign(
        fp32_over_file=costs.fp32_file_bytes / costs.file_bytes,
        ideal_codes_only=32 / costs.bits,
        sz_overhead_bits=costs.bits_per_weight - costs.bits,
        float_share=1 - costs.quantized_weights * 4 / costs.fp32_bytes,
        profile=profile.name,
        commit=commit,
    )
    shown = _first_task(tidy).assign(
        method=lambda d: d.method.map(methods.label) + " (" + d.scheme.str[:3] + ")",
        spec=spec_label,
        cell=lambda d: [
            f"1/{r:.1f} · {b:.2f} b/w" for r, b in zip(d.fp32_over_file, d.bits_per_weight)
        ],
    )
    wide = shown.pivot_table(
        index=["arch", "method"], columns="spec", values="cell", aggfunc="first", sort=False
    )
    wide = wide[sorted(wide.columns, key=lambda c: (-int(c.split()[0][1:]), c))].reset_index()
    fp = tidy.groupby("arch").fp32_file_bytes.first()
    share = tidy.groupby("arch").float_share.first()
    tasks = _first_task(tidy).groupby("arch").task.first()
    notes = [
        "Each cell: FP32 checkpoint file / quantized file, and bits per quantized weight (codes + "
        "S + Z); one task per architecture shown "
        f"({', '.join(f'{a}: {t}' for a, t in tasks.items())}; the tasks' models differ only in "
        "their head's classes; every task is in the CSV).",
        "FP32 files: "
        + "; ".join(f"{a} {b / 1024:.1f} KiB" for a, b in fp.items())
        + ". Tensors kept in float "
        "(biases, norms, position embeddings, class token): "
        + "; ".join(f"{a} {100 * s:.1f} %" for a, s in share.items())
        + " of the FP32 bytes, which bounds the ratio at small widths.",
        "S is float32 per group (a row, or group_size values of a row; shorter at a row's end and "
        "in rows shorter than a group): 32 / values per group bits per weight, 0.5 at 64; Z is "
        "stored only for the asymmetric scheme (HQQ), as much again.",
        f"Profile `{profile.name}`.",
    ]
    return tidy, markdown(wide, "Quantized file sizes (format version 2: bit-packed codes)", notes)


def size_figure(costs: pd.DataFrame):
    """FP32 file / quantized file against bits, per method and granularity, under the codes-only
    ideal 32/bits. Methods that write the same format come out the same size: each is drawn
    thinner than the one before it, so that a line on top of another leaves it visible."""
    sel = _first_task(costs).assign(
        method=lambda d: d.method.map(methods.label),
        ratio=lambda d: d.fp32_file_bytes / d.file_bytes,
    )
    shown = list(dict.fromkeys(sel.method))
    grid = sns.relplot(
        data=sel,
        x="bits",
        y="ratio",
        hue="method",
        size="method",
        sizes={m: max(0.8, 5.0 - 1.5 * i) for i, m in enumerate(shown)},
        style="granularity",
        col="arch",
        kind="line",
        markers=True,
        height=3.2,
        aspect=1.1,
    )
    bits = np.arange(costs.bits.min(), costs.bits.max() + 1)
    for ax in grid.axes.flat:
        ax.plot(bits, 32 / bits, "k:")
        ax.annotate(
            "ideal: 32 / bits (codes only)",
            (bits[0], 32 / bits[0]),
            xytext=(6, -2),
            textcoords="offset points",
            fontsize=7,
            va="top",
        )
        ax.set(
            xlabel="bits",
            ylabel="FP32 file / quantized file (× smaller)",
            ylim=(0, None),
            xticks=bits,
        )
        ax.grid(alpha=0.3)
    grid.figure.suptitle(
        "File size against FP32 (one task per architecture; the gap to the ideal: S, Z and float "
        "tensors)",
        y=1.04,
    )
    return grid.figure


def _first_task(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each architecture's first task (sizes hardly depend on the task)."""
    return df[df.task == df.groupby("arch").task.transform("first")]


def runtime_table(rows: pd.DataFrame, profile: Profile, commit: str) -> tuple[pd.DataFrame, str]:
    """The packed runtime against the simulated model (accuracy, logits) and against FP32 (memory,
    time)."""
    tidy = rows.assign(
        memory_vs_fp32=rows.weight_bytes_runtime / rows.weight_bytes_fp32,
        time_vs_fp32=rows.seconds_runtime / rows.seconds_fp32,
        profile=profile.name,
        commit=commit,
    )
    shown = pd.DataFrame(
        {
            "arch": tidy.arch,
            "task": tidy.task,
            "spec": spec_label(tidy),
            "top-1 simulated": tidy.accuracy_simulated.round(2),
            "top-1 packed": tidy.accuracy_runtime.round(2),
            "max |Δ logit|": tidy.max_logit_diff.map(lambda v: f"{v:.1e}"),
            "weights KiB (FP32)": [
                f"{r / 1024:.1f} ({f / 1024:.1f})"
                for r, f in zip(tidy.weight_bytes_runtime, tidy.weight_bytes_fp32)
            ],
            "memory vs FP32": tidy.memory_vs_fp32.round(3),
            "time vs FP32": tidy.time_vs_fp32.round(2),
        }
    )
    notes = [
        "Gen files of the first held-out-run checkpoint, loaded with "
        "`qg.targets.runtime.load_runtime`: every quantized Linear and Conv2d keeps its packed "
        "codes, S and Z and dequantizes its weight per call. Memory: bytes of the parameters and "
        "buffers the model holds; time: median forward seconds of a batch of "
        f"{int(tidy.batch.iloc[0])} test images on this machine ({tidy.device.iloc[0]}).",
        "Simulated: the file dequantized to float32 (every accuracy in the other tables); both are "
        "scored on the same test subset.",
        f"Profile `{profile.name}`.",
    ]
    return tidy, markdown(shown, "The packed runtime against the simulated model and FP32", notes)


def runtime_figure(rows: pd.DataFrame):
    """Resident weight memory and forward time of the packed runtime relative to FP32, against bits
    (the spread over tasks as error bars: the models of both tasks have the same layers)."""
    sel = rows.assign(
        memory=rows.weight_bytes_runtime / rows.weight_bytes_fp32,
        time=rows.seconds_runtime / rows.seconds_fp32,
    )
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, value, label in (
        (axes[0], "memory", "resident weight bytes / FP32"),
        (axes[1], "time", "forward seconds / FP32"),
    ):
        sns.lineplot(
            data=sel,
            x="bits",
            y=value,
            hue="arch",
            style="granularity",
            markers=True,
            errorbar=("pi", 100),
            err_style="bars",
            ax=ax,
        )
        ax.axhline(1, color="k", lw=0.8, ls=":")
        ax.set(
            xlabel="bits",
            ylabel=label,
            ylim=(0, max(1.1, sel[value].max() * 1.1)),
            xticks=sorted(sel.bits.unique()),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("memory: packed codes + S/Z + float tensors")
    axes[1].set_title("speed: dequantize per layer, then float matmul")
    fig.tight_layout()
    return fig


def bench_model(arch: str, profile: str) -> str:
    """`ViT-Small` for timm's `vit_small_patch16_224`; a profile's own model as `vit (cpu)`."""
    timm = re.fullmatch(TIMM_VIT, arch)
    return f"ViT-{timm[1].title()}" if timm else f"{arch} ({profile})"


def bench_runtime_table(bench: pd.DataFrame) -> pd.DataFrame:
    """The runtime bench's rows (`BENCH_RUNTIME`) as ratios to FP32 of the same model and batch:
    one row per model, batch, path (`fp32` for the float model) and spec, with the time and the
    resident weight bytes over FP32's; `real_size`: timm's ViTs at 224 px (the others are the
    bench profile's own target models)."""
    rt = bench[bench.bench == "runtime"].drop(columns=["batch"], errors="ignore")
    rt = rt.rename(columns={"runtime_batch": "batch"}).reset_index(drop=True)
    fp = rt[rt.case == "fp32"].set_index(["arch", "batch"])
    key = pd.MultiIndex.from_frame(rt[["arch", "batch"]])
    tidy = rt.assign(
        model=[bench_model(a, p) for a, p in zip(rt.arch, rt.profile)],
        real_size=rt.arch.str.fullmatch(TIMM_VIT),
        path=rt.path.fillna("fp32"),
        spec=rt.case.str.split().str[-1],
        time_vs_fp32=rt.seconds.to_numpy() / fp.seconds.reindex(key).to_numpy(),
        memory_vs_fp32=rt.weight_bytes.to_numpy() / fp.weight_bytes.reindex(key).to_numpy(),
    )
    columns = "model arch profile real_size batch path spec bits granularity layers_on_path"
    columns = columns.split() + ["seconds", "time_vs_fp32", "weight_bytes", "memory_vs_fp32"]
    return tidy[columns + ["device", "commit"]]


def _bench_series(ratios: pd.DataFrame) -> list[tuple[str, str, tuple, str]]:
    """(path, spec, colour, marker) of each path and deployed spec the table holds, in order."""
    colours = dict(zip(PATH_LABELS, sns.color_palette("colorblind", len(PATH_LABELS))))
    markers = dict(zip(DEPLOYED, "os"))
    held = set(zip(ratios.path, ratios.spec))
    return [(p, s, colours[p], markers[s]) for p in PATH_LABELS for s in DEPLOYED if (p, s) in held]


def _bench_panel(ax, sel: pd.DataFrame, keys: list[str], value: str, series) -> int:
    """One marker per (path, spec) beside each other at every category (`keys` of `sel`), the
    categories in table order; returns the number of markers drawn."""
    cats = list(dict.fromkeys(zip(*(sel[k] for k in keys))))
    width, drawn = 0.8 / len(series), 0
    for j, (path, spec, colour, marker) in enumerate(series):
        rows = sel[(sel.path == path) & (sel.spec == spec)]
        at = {tuple(r): v for r, v in zip(rows[keys].itertuples(index=False), rows[value])}
        x = [i - 0.4 + width * (j + 0.5) for i, c in enumerate(cats) if c in at]
        ax.plot(x, [at[c] for c in cats if c in at], marker, color=colour, ms=6, ls="none")
        drawn += len(x)
    for i in range(1, len(cats)):
        ax.axvline(i - 0.5, color="0.85", lw=0.6)
    ax.set_xticks(range(len(cats)))
    label = "{}\nbatch {}" if len(keys) == 2 else "{}"
    ax.set_xticklabels([label.format(*c) for c in cats], fontsize=7)
    ax.set_xlim(-0.5, len(cats) - 0.5)
    return drawn


def bench_runtime_figure(bench: pd.DataFrame):
    """The runtime bench against FP32 at the deployed specs (4-bit group-64, 8-bit channels): time
    per batch of every path at each model and batch (log axis), and the resident weight bytes
    (batch 1's rows: bytes do not depend on the batch), with issue 33's targets."""
    ratios = bench_runtime_table(bench)
    sel = ratios[ratios.spec.isin(list(DEPLOYED))]
    series = _bench_series(sel)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    n = _bench_panel(axes[0], sel, ["model", "batch"], "time_vs_fp32", series)
    fast = int((sel.time_vs_fp32 <= LATENCY_TARGET).sum())
    own = ", ".join(sel.arch[~sel.real_size].unique())
    own = f"{own}: the {sel.profile.iloc[0]} profile's models; " if own else ""
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].set(
        xlabel=f"model and batch ({own}ViT-*: timm, 224 px)",
        ylabel="forward seconds per batch / FP32 (log)",
        title=f"latency: {fast} of {n} markers at or under the {LATENCY_TARGET} target",
    )
    one = sel[sel.batch == sel.batch.min()]
    m = _bench_panel(axes[1], one, ["model"], "memory_vs_fp32", series)
    small = int((one.memory_vs_fp32 <= MEMORY_TARGET).sum())
    axes[1].set(
        xlabel="model (weight bytes do not depend on the batch)",
        ylabel="resident weight bytes / FP32",
        ylim=(0, max(1.15 * one.memory_vs_fp32.max(), 1.2 * MEMORY_TARGET)),
        title=f"resident weights: {small} of {m} markers at or under the {MEMORY_TARGET} target",
    )
    for ax, target in ((axes[0], LATENCY_TARGET), (axes[1], MEMORY_TARGET)):
        if ax is axes[0]:
            ax.axhline(1, color="k", lw=0.9, ls="--")
        ax.axhline(target, color="tab:red", lw=0.9, ls="--")
        ax.grid(alpha=0.3, axis="y", which="both")
    _bench_legend(fig, series)
    fig.suptitle(
        f"Packed runtime / FP32 of the same model and batch: {sel.model.nunique()} models, "
        f"batches {', '.join(map(str, sorted(sel.batch.unique())))}; one bench run on "
        f"{sel.device.iloc[0]}, commit {sel.commit.iloc[0]} (random weights)",
        y=1.02,
    )
    fig.tight_layout()
    return fig


def _bench_legend(fig, series) -> None:
    """One legend under both panels: colour is the path, marker the spec, and the two lines."""
    handles = [
        Line2D([], [], marker=m, color=c, ls="none", label=f"{PATH_LABELS[p]}, {DEPLOYED[s]}")
        for p, s, c, m in series
    ]
    for colour, label in (
        ("k", "FP32 (1.0)"),
        ("tab:red", f"targets: time {LATENCY_TARGET}, resident bytes {MEMORY_TARGET}"),
    ):
        handles.append(Line2D([], [], color=colour, ls="--", lw=0.9, label=label))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=8)


def bench_runtime_findings(ratios: pd.DataFrame) -> list[str]:
    """What the runtime bench says (`bench_runtime_table`'s rows), every number from its CSV: time
    / FP32 of each path on timm's ViTs per batch at the deployed specs, their resident bytes,
    whether issue 33's targets hold, and the bench profile's own models at 4-bit group-64."""
    real = ratios[ratios.real_size & ratios.spec.isin(list(DEPLOYED))]
    lines = [f"one bench run on {real.device.iloc[0]}, commit {real.commit.iloc[0]}"]
    for (batch, spec), g in real.groupby(["batch", "spec"]):
        per = g.pivot_table(index="model", columns="path", values="time_vs_fp32", sort=False)
        cells = [
            f"{m} "
            + " / ".join(f"{r[p]:.2f} ({_path_word(p, spec)})" for p in PATH_LABELS if p in r)
            for m, r in per.iterrows()
        ]
        lines.append(f"batch {batch}, {DEPLOYED[spec]}, time / FP32: " + "; ".join(cells))
    for spec, g in real[real.batch == real.batch.min()].groupby("spec"):
        spread = g.groupby("path", sort=False).memory_vs_fp32.agg(["min", "max"])
        lines.append(
            f"resident weights / FP32, {DEPLOYED[spec]}: "
            + ", ".join(
                f"{_path_word(p, spec)} {r['min']:.3f}-{r['max']:.3f}" for p, r in spread.iterrows()
            )
        )
    own = ratios[~ratios.real_size & (ratios.spec == "w4-group64-sym")]
    lines.append(
        f"the {own.profile.iloc[0]} profile's own models ({', '.join(own.arch.unique())}), "
        "4-bit group-64, time / FP32 over their paths: "
        + "; ".join(
            f"batch {b} {g.time_vs_fp32.min():.2f}-{g.time_vs_fp32.max():.2f}"
            for b, g in own.groupby("batch")
        )
    )
    return lines + _bench_targets(real)


def _path_word(path: str, spec: str) -> str:
    """`int4 kernel` or `int8 kernel` for our kernel path at that spec, else the path."""
    return f"int{4 if spec.startswith('w4') else 8} kernel" if path == "kernel" else path


def _bench_targets(real: pd.DataFrame) -> list[str]:
    """Whether issue 33's targets hold on timm's ViTs: time at most 0.8 of FP32 (on how many rows;
    the fastest) and resident bytes at most 0.2 (per spec, over every path and model)."""
    fast, best = real[real.time_vs_fp32 <= LATENCY_TARGET], real.loc[real.time_vs_fp32.idxmin()]
    met = "holds" if len(fast) == len(real) else "holds in part" if len(fast) else "does not hold"
    memory = [
        f"{DEPLOYED[s]}: {'holds' if r['max'] <= MEMORY_TARGET else 'does not hold'} "
        f"({r['min']:.3f}-{r['max']:.3f})"
        for s, r in real.groupby("spec").memory_vs_fp32.agg(["min", "max"]).iterrows()
    ]
    return [
        f"target time ≤ {LATENCY_TARGET}x FP32 {met}: met "
        f"on {len(fast)} of {len(real)} (model, batch, path, spec); the fastest is {best.model} at "
        f"batch {best.batch}, {_path_word(best.path, best.spec)} {DEPLOYED[best.spec]}, "
        f"{best.time_vs_fp32:.2f}x; both targets at once on "
        f"{int((fast.memory_vs_fp32 <= MEMORY_TARGET).sum())}",
        f"target resident bytes ≤ {MEMORY_TARGET}x FP32 on every path and model: "
        + "; ".join(memory),
    ]
