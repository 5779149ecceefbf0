"""Real quantized files (09_real_files): their sizes against FP32 and the packed runtime."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .. import methods
from ..config.schema import Profile
from ..core.report import markdown
from .common import spec_label


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
