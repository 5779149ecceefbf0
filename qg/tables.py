"""The paper's tables and figures, rebuilt from per-checkpoint evaluations (`qg.evaluation.evaluate` rows).

Each `tableN` returns (tidy DataFrame, Markdown) for `report.write_table`; each `figureN` returns a
matplotlib figure for `report.save_figure`. Markdown tables are shaped like the paper's, with our three
splits as rows and the paper's own numbers (for the counterpart setting) in rows marked "paper".
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import paper, qwt, rpg_study
from .experiments import GENERATORS
from .profiles import ablation_setup
from .report import SPLIT_LABELS, cell, markdown, summarize

METHOD_LABELS = {"fp": "FP32", "ptq": "PTQ", "rtn-asym": "RTN asym", "mse-clip": "RTN + MSE clip", "hqq": "HQQ",
                 "noise": "PTQ of ckpt + noise", "soup": "PTQ of the soup", "qat": "QAT", "gen": "Gen",
                 "gen-rtn": "Gen (RTN base)",
                 "ptq+qwt": "PTQ + QwT", "hqq+qwt": "HQQ + QwT", "gen+qwt": "Gen + QwT"}


def paired_difference(runs: pd.DataFrame, a: str = "gen", b: str = "ptq") -> pd.DataFrame:
    """Per-checkpoint accuracy of method `a` minus method `b` (same checkpoint, same spec) as method `a-b`."""
    keys = ["arch", "task", "dataset", "source", "condition", "variant", "bits", "granularity", "split", "checkpoint"]
    wide = runs.pivot_table(index=keys, columns="method", values="accuracy").reset_index()
    wide = wide.dropna(subset=[a, b])
    out = wide[keys].copy()
    out["method"], out["accuracy"] = f"{a}-{b}", wide[a] - wide[b]
    return out


def generator_differences(runs: pd.DataFrame) -> pd.DataFrame:
    """`paired_difference` against PTQ of every generator method in `runs` (`GENERATORS`), each labelled with
    its generator's `variant` as `Setting.generator_for` sets it (what `Experiment.diagnose` tags its rows with)."""
    return pd.concat([paired_difference(runs, m).assign(**({"variant": label} if label else {}))
                      for m, (_, label) in GENERATORS.items() if m in set(runs.method)], ignore_index=True)


def _with_columns(tidy: pd.DataFrame, group_bits: int) -> pd.DataFrame:
    """One row per Table 1 column each measurement fills (8-bit group fills both '8-bit' and 'Group')."""
    rows = []
    for r in tidy.to_dict("records"):
        for col in paper.table1_column(int(r["bits"]), r["granularity"], group_bits):
            rows.append({**r, "column": col})
    return pd.DataFrame(rows)


def _pivot(tidy: pd.DataFrame, index: list[str], group_bits: int) -> pd.DataFrame:
    df = _with_columns(tidy, group_bits)
    df["cell"] = [cell(m, s) for m, s in zip(df["value"], df["std"])]
    columns = [c for c in paper.TABLE1_COLUMNS if c in set(df["column"])]
    wide = df.pivot_table(index=index, columns="column", values="cell", aggfunc="first").reindex(columns=columns)
    return wide.fillna("NA").reset_index()


ORDER = {k: i for i, k in enumerate(["trained", "heldout_ckpt", "heldout_run", "fp", "ptq", "ptq+qwt", "rtn-asym",
                                     "mse-clip", "hqq", "hqq+qwt", "noise", "soup", "qat", "gen", "gen+qwt", "gen-rtn",
                                     "gen-ptq", "gen-rtn-ptq"])}


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by task, architecture, split (trained-on first) and method (FP32, PTQ, QAT, Gen, Gen − PTQ)."""
    keys = [k for k in ("task", "arch", "split", "condition", "method") if k in df]
    return df.sort_values(keys, key=lambda s: s.map(lambda v: ORDER.get(v, v)) if s.name in ("split", "method") else s,
                          kind="stable")


def method_label(method: str) -> str:
    """A method's label in tables; a paired difference `a-b` (`paired_difference`) reads `A − B`."""
    if method in METHOD_LABELS:
        return METHOD_LABELS[method]
    for i in (i for i, ch in enumerate(method) if ch == "-"):  # names hold "-" too (rtn-asym): split where both are known
        if method[:i] in METHOD_LABELS and method[i + 1:] in METHOD_LABELS:
            return f"{METHOD_LABELS[method[:i]]} − {METHOD_LABELS[method[i + 1:]]}"
    return method


def _spec_label(df: pd.DataFrame) -> pd.Series:
    """`w4 group`, `w8 channel`: a spec as the size, QwT and runtime tables name their columns or rows."""
    return "w" + df.bits.astype(str) + " " + df.granularity


def _label(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "method" in df:
        df["method"] = df["method"].map(method_label)
    if "split" in df:
        df["split"] = df["split"].map(lambda s: SPLIT_LABELS.get(s, s))
    return df


def _paper_rows(tasks_archs, methods, columns, value) -> pd.DataFrame:
    rows = []
    for task, arch in tasks_archs:
        for method in methods:
            vals = {c: value(task, arch, method, c) for c in columns}
            if any(v is not None for v in vals.values()):
                counterpart = f"{paper.COUNTERPART.get(task)} {paper.MODEL.get(arch)}"
                rows.append({"task": task, "arch": arch, "method": f"{method} (paper, {counterpart})",
                             "split": "paper", **{c: cell(v) for c, v in vals.items()}})
    return pd.DataFrame(rows)


def table1(runs: pd.DataFrame, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """Gen vs PTQ at every precision (group-wise) and granularity (8-bit), per split, beside the paper's."""
    gbits = profile["table1"]["granularity_bits"]
    runs = pd.concat([runs] + [paired_difference(runs, m) for m in GENERATORS if m in set(runs.method)], ignore_index=True)
    tidy = summarize(runs, "table1", profile, commit)
    index = ["task", "arch", "method", "split"]
    ours = _pivot(tidy, index, gbits)
    columns = [c for c in paper.TABLE1_COLUMNS if c in ours.columns]
    ours = _ordered(ours)
    ref = _paper_rows(ours[["task", "arch"]].drop_duplicates().itertuples(index=False), ("PTQ", "Gen"), columns,
                      paper.table1_value)
    md = _label(pd.concat([ours, ref], ignore_index=True)).sort_values(["task", "arch"], kind="stable")
    return tidy, _markdown(md, "Table 1: Gen vs PTQ (top-1 %, mean ± std over checkpoints)", profile, [
        "Columns: group-wise at each bit-width; Channel/Group at "
        f"{gbits} bits. `Gen − PTQ` is the paired difference on the same checkpoints. `Gen (RTN base)`: the same "
        "generator whose skip adds to round-to-nearest of its input (the group ranges given, qg.tokenizer), where "
        "PTQ is its starting point.",
        "Paper rows are the paper's counterpart setting (full fine-tuning ↔ ImageNet-1K, head-only ↔ CIFAR-10) at "
        "its scale; compare trends, not absolute numbers."])


def table2(runs: pd.DataFrame, records: dict, profile: dict, commit: str, n_models: int = 50) -> tuple[pd.DataFrame, str]:
    """QAT vs Gen (QAT targets) at each bit-width: accuracy per split and the time to quantize `n_models`.

    `records[setting name]` holds the generator's `train_seconds`. Gen's time is counted two ways: as the
    paper does (generator training + n generations) and all-in (+ the QAT runs that made its training targets).
    """
    tidy = summarize(runs, "table2", profile, commit)
    time_rows = []
    for (arch, task, bits, setting), g in runs.groupby(["arch", "task", "bits", "setting"]):
        t_qat = g.loc[g.method == "qat", "seconds"].mean()
        t_gen = g.loc[g.method == "gen", "seconds"].mean()
        train_s, n_targets = records[setting]["train_seconds"], records[setting]["n_train_checkpoints"]
        for method, minutes in (("qat", n_models * t_qat / 60),
                                ("gen", (train_s + n_models * t_gen) / 60),
                                ("gen+targets", (train_s + n_models * t_gen + n_targets * t_qat) / 60)):
            time_rows.append({"table": "table2", "arch": arch, "task": task, "dataset": g.dataset.iloc[0],
                              "source": "qat", "condition": "", "variant": "", "method": method, "bits": bits,
                              "granularity": profile["qat"]["granularity"], "split": "", "value": minutes, "std": 0.0,
                              "n": n_models, "metric": f"minutes_for_{n_models}_models", "profile": profile["name"],
                              "commit": commit})
    tidy = pd.concat([tidy, pd.DataFrame(time_rows)], ignore_index=True)
    acc = tidy[tidy.metric == "top1_accuracy"]
    mins = tidy[tidy.metric != "top1_accuracy"]
    rows = []
    for (task, arch), g in acc.groupby(["task", "arch"]):
        for split in g.split.unique():
            for method in ("fp", "ptq", "qat", "gen"):
                r = {"task": task, "arch": arch, "method": METHOD_LABELS[method], "split": SPLIT_LABELS[split]}
                for bits in sorted(g.bits.unique(), reverse=True):
                    sel = g[(g.split == split) & (g.method == method) & (g.bits == bits)]
                    r[f"{bits}-bit acc (%)"] = cell(sel.value.iloc[0], sel["std"].iloc[0]) if len(sel) else "NA"
                rows.append(r)
        for method, label in (("qat", "QAT"), ("gen", "Gen (as the paper counts)"), ("gen+targets", "Gen + its QAT targets")):
            r = {"task": task, "arch": arch, "method": label, "split": f"time for {n_models} models"}
            for bits in sorted(g.bits.unique(), reverse=True):
                sel = mins[(mins.task == task) & (mins.arch == arch) & (mins.bits == bits) & (mins.method == method)]
                r[f"{bits}-bit acc (%)"] = f"{sel.value.iloc[0]:.2f} min" if len(sel) else "NA"
            rows.append(r)
    for method, vals in paper.TABLE2.items():
        rows.append({"task": "full", "arch": "vit", "method": f"{method} (paper, ImageNet-1K ViT-Tiny)", "split": "paper",
                     **{f"{b}-bit acc (%)": f"{a:.2f} / {t} min" for b, (a, t) in sorted(vals.items(), reverse=True)}})
    md = pd.DataFrame(rows).sort_values(["task", "arch"], kind="stable").fillna("NA")  # the paper has no 3-bit QAT
    return tidy, _markdown(md, f"Table 2: QAT vs Gen trained on QAT targets ({profile['qat']['granularity']}-wise)", profile, [
        f"Time rows: minutes to quantize {n_models} models. QAT = {n_models} x the measured QAT run per model. "
        "'Gen (as the paper counts)' = generator training + one forward pass per model; "
        "'Gen + its QAT targets' adds the QAT runs that made the generator's training targets.",
        f"Our QAT is {profile['qat']['steps']} fine-tuning steps per model on a 2-core CPU; the paper's is GPU hours."])


def table3(runs: pd.DataFrame, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """Conditional generators (one-hot over precision or granularity) vs PTQ, per split."""
    gbits = profile["table1"]["granularity_bits"]
    tidy = summarize(runs, "table3", profile, commit)
    view = tidy[tidy.method != "fp"].copy()
    view.loc[view.method == "ptq", "condition"] = "NA"  # PTQ does not depend on the generator's condition
    ours = _ordered(_pivot(view, ["task", "arch", "method", "condition", "split"], gbits))
    ours["condition"] = ours["condition"].map({"precision": "P", "granularity": "G", "NA": "NA"})
    columns = [c for c in paper.TABLE1_COLUMNS if c in ours.columns]

    def value(task, arch, method, column):
        d = paper.COUNTERPART.get(task)
        if method == "PTQ":
            return paper.table1_value(task, arch, "PTQ", column)
        if paper.MODEL.get(arch) != "ViT-Tiny":  # the paper's Table 3 is ViT-Tiny only
            return None
        return paper.TABLE3.get(d, {}).get(method[-1], (None,) * 8)[paper.TABLE1_COLUMNS.index(column)]

    ref = _paper_rows(ours[["task", "arch"]].drop_duplicates().itertuples(index=False), ("PTQ", "Gen P", "Gen G"),
                      columns, value)
    md = _label(pd.concat([ours, ref], ignore_index=True)).sort_values(["task", "arch"], kind="stable")
    return tidy, _markdown(md, "Table 3: controllable generation (top-1 %, mean ± std over checkpoints)", profile, [
        "Condition P: one generator for every bit-width (group-wise), one-hot over precision; "
        f"G: one generator for channel and group at {gbits} bits."])


def generator_note(profile: dict) -> str:
    """Which generator `Gen` is in a profile's tables: the paper's head, or ours (skip / log-S tokens)."""
    skip, log_scale = profile["generator"].get("skip", "none"), profile["tokenizer"].get("log_scale", False)
    rtn = (" Gen (RTN base): the same with `skip: add` on round-to-nearest of the input (`tokenizer.base: rtn`)."
           if "gen-rtn" in profile["table1"].get("generators", []) else "")
    if skip == "none" and not log_scale:
        return "Gen: the paper's generator (MSE head, linear S tokens)." + rtn
    return (f"Gen: our generator (head `skip: {skip}`{', log-S tokens' if log_scale else ''}; the paper's is `skip: none` "
            "with linear S tokens, compared in 02_train's convergence study); the paper's rows are its own generator." + rtn)


def _markdown(df: pd.DataFrame, title: str, profile: dict, notes: list[str]) -> str:
    return markdown(df, title, [*notes, generator_note(profile), f"Profile `{profile['name']}`; splits: "
                                + "; ".join(f"{v}" for v in SPLIT_LABELS.values()) + "."])


def figure1(runs: pd.DataFrame, records: dict, arch: str, task: str, max_models: int = 1000):
    """Total time to quantize n models: QAT grows linearly; Gen pays training once, then ~nothing per model.
    Colour by method, line style by bit-width, log axes (the quantities span decades)."""
    n = np.unique(np.geomspace(1, max_models, 200).round())
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sel = runs[(runs.arch == arch) & (runs.task == task)]
    colors = dict(zip(("QAT", "Gen (training + one pass per model)", "Gen + the QAT runs of its targets"),
                      sns.color_palette("tab10")))
    for (bits, setting), g in sel.groupby(["bits", "setting"]):
        t_qat, t_gen = g.loc[g.method == "qat", "seconds"].mean(), g.loc[g.method == "gen", "seconds"].mean()
        rec, style = records[setting], {8: "-", 4: "--", 3: ":"}.get(int(bits), "-.")
        for label, minutes in (("QAT", n * t_qat / 60),
                               ("Gen (training + one pass per model)", (rec["train_seconds"] + n * t_gen) / 60),
                               ("Gen + the QAT runs of its targets",
                                (rec["train_seconds"] + rec["n_train_checkpoints"] * t_qat + n * t_gen) / 60)):
            ax.plot(n, minutes, style, color=colors[label], label=f"{label}, {bits}-bit")
    ax.set(xscale="log", yscale="log", xlabel="number of target models", ylabel="total time (min)",
           title=f"Figure 1: QAT vs Gen ({arch}, {task})")
    ax.legend(fontsize=6.5, ncol=1)
    ax.grid(alpha=0.3, which="both")
    return fig


def figure3(runs: pd.DataFrame, arch: str, task: str):
    """Accuracy at every (bits, granularity) for Gen and the data-free quantizers, one panel per split."""
    shown = ["ptq", "rtn-asym", "mse-clip", "hqq", "gen", "ptq+qwt", "hqq+qwt", "gen+qwt"]
    sel = runs[(runs.arch == arch) & (runs.task == task) & runs.method.isin(shown)].copy()
    sel["method"] = sel.method.map(METHOD_LABELS)
    sel["split"] = sel.split.map(SPLIT_LABELS)
    grid = sns.relplot(data=sel, x="bits", y="accuracy", hue="method", style="granularity", col="split", kind="line",
                       markers=True, errorbar="sd", height=3.2, aspect=1.0, facet_kws={"sharey": True})
    grid.set_titles("{col_name}")
    grid.figure.suptitle(f"Figure 3: bits x granularity ({arch}, {task})", y=1.03)
    return grid.figure


def _pairs(table: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in table.items())


def paper_ablation_note(factor: str) -> str:
    """The paper's own numbers for one ablation (from `qg.paper`), as the note under our table."""
    if factor == "token_size":
        rows = "; ".join(f"{k}: {' '.join(f'{x:.2f}' for x in v)}" for k, v in paper.TABLE4.items())
        return f"Paper, Table 4 (ImageNet-1K ViT-Base, group-wise, 8..3 bits): {rows}."
    if factor == "backbone":
        rows = "; ".join(f"{k} {a:.2f} / {h} h / {gb} GB" for k, (a, h, gb) in paper.TABLE10.items())
        return f"Paper, Table 10 (ImageNet-1K ViT-Tiny; accuracy %, training hours, GB on a GPU): {rows}."
    table, number = {"padding": (paper.TABLE6, 6), "head": (paper.TABLE5, 5)}[factor]
    return f"Paper, Table {number} (ImageNet-1K ViT-Tiny, 8-bit): {_pairs(table)}."


def ablation_table(runs: pd.DataFrame, costs: pd.DataFrame, factor: str, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """One factor's variants: accuracy of Gen (and the paired Gen − PTQ) per split and bit-width, plus cost.

    `costs` has one row per (variant, bits) generator: train_seconds, activation_mb, n_params, final_loss.
    """
    runs = pd.concat([runs, paired_difference(runs)], ignore_index=True)
    tidy = summarize(runs, f"ablation_{factor}", profile, commit)
    cost_tidy = costs.melt(id_vars=["variant", "bits"], var_name="metric", value_name="value")
    cost_tidy = cost_tidy.assign(table=f"ablation_{factor}", std=0.0, n=1, profile=profile["name"], commit=commit)
    tidy = pd.concat([tidy, cost_tidy], ignore_index=True)
    acc = tidy[tidy.metric == "top1_accuracy"]
    variants = list(dict.fromkeys(runs.variant))
    rows = []
    for split in ORDER:
        if split not in set(acc.split):
            continue
        ref = acc[(acc.split == split) & (acc.method == "ptq")].drop_duplicates("bits")
        rows.append({"variant": "PTQ (reference)", "split": SPLIT_LABELS[split],
                     **{f"{b}-bit": cell(v, s) for b, v, s in zip(ref.bits, ref.value, ref["std"])}})
        for variant in variants:
            r = {"variant": variant, "split": SPLIT_LABELS[split]}
            for method, suffix in (("gen", ""), ("gen-ptq", " Gen − PTQ")):
                sel = acc[(acc.split == split) & (acc.variant == variant) & (acc.method == method)]
                r.update({f"{b}-bit{suffix}": cell(v, s) for b, v, s in zip(sel.bits, sel.value, sel["std"])})
            rows.append(r)
    gen_seconds = runs[runs.method == "gen"].groupby("variant").seconds.mean()
    for variant, g in costs.groupby("variant", sort=False):
        rows.append({"variant": variant, "split": "cost (per generator)",
                     "train (s)": f"{g.train_seconds.mean():.1f}",
                     "generate (s/model)": f"{gen_seconds.get(variant, float('nan')):.3f}",
                     "activation (MB)": f"{g.activation_mb.mean():.1f}", "params": f"{int(g.n_params.mean()):,}",
                     "final loss": f"{g.final_loss.mean():.4g}"})
    md = pd.DataFrame(rows).fillna("")
    a = ablation_setup(profile, factor)
    return tidy, _markdown(md, f"Ablation of the {factor.replace('_', ' ')} ({a['arch']}, {a['task']}, {a['granularity']}-wise; "
                           "top-1 %, mean ± std over checkpoints)", profile, [
        paper_ablation_note(factor),
        "activation (MB): tensors autograd saves for one training step (batch of the profile), a deterministic "
        "stand-in for peak training memory; times are wall-clock on the machine in the provenance file."])


def ablation_figure(runs: pd.DataFrame, factor: str):
    """Gen − PTQ (paired, same checkpoint) of every variant, per split and bit-width, mean ± std over checkpoints.

    The difference, not the accuracy: the effects the ablations are about are tenths of a point on an 85 %
    scale, which bars starting at 0 hide. A variant far below the others (a failed generator) still shows,
    its points on the same axis.
    """
    diff = paired_difference(runs).assign(split=lambda d: d.split.map(SPLIT_LABELS))
    order = list(dict.fromkeys(runs.variant))
    bits = sorted(diff.bits.unique())
    fig, axes = plt.subplots(1, len(bits), figsize=(5.2 * len(bits), 3.6), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], bits):
        sns.pointplot(data=diff[diff.bits == b], x="variant", y="accuracy", hue="split", order=order,
                      hue_order=list(SPLIT_LABELS.values()), errorbar="sd", dodge=0.4, linestyle="none",
                      markersize=5, capsize=0.1, ax=ax)
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set(title=f"{b}-bit", xlabel=factor.replace("_", " "), ylabel="Gen − PTQ (points)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, title=None)
    fig.suptitle(f"Ablation of the {factor.replace('_', ' ')}: Gen − PTQ on the same checkpoints (0: as good as PTQ)")
    fig.tight_layout()
    return fig


def loss_curves(curves: dict[str, pd.DataFrame], title: str, ax=None, legend_max: int = 12):
    """Smoothed training loss of each generator (label -> loss.csv frame), log scale, on `ax` or a new
    figure; the legend is left out beyond `legend_max` lines. Returns the figure."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for label, curve in curves.items():
        ax.plot(curve.step, curve.loss.rolling(10, min_periods=1).mean(), lw=1.2, label=label)
    ax.set(title=title, xlabel="step", ylabel="training loss (smoothed)", yscale="log")
    ax.grid(alpha=0.3)
    if len(curves) <= legend_max:
        ax.legend(fontsize=7)
    return ax.figure


def fidelity_table(diag: dict[str, pd.DataFrame], diff: pd.DataFrame, profile: dict, commit: str,
                   generators: str = "the Table 1 generators") -> tuple[pd.DataFrame, str]:
    """One row per generator (arch, task, source, variant, spec) of `Experiment.diagnose` frames: is the
    generated model its target?

    Beside Gen − PTQ on the same checkpoints: codes equal to the target's, mean code error (the worst
    layer's too) in steps, S error, input sensitivity and alignment on the layers whose target moves between
    checkpoints, the exact-copy rate of the layers whose target never moves, and the memorisation test.
    """
    keys = ["arch", "task", "source", "variant", "bits", "granularity"]
    layers, sens, near = diag["layers"], diag["sensitivity"], diag["nearest"]
    per_layer = layers.groupby(keys + ["layer"]).mean(numeric_only=True).reset_index()
    moves = sens.groupby(keys + ["layer"]).target_moves.mean().reset_index()
    per_layer = per_layer.merge(moves, on=keys + ["layer"], how="left")
    moving = sens[sens.target_moves > 0].groupby(keys + ["layer"])[["sensitivity", "alignment"]].mean().reset_index()
    frozen = per_layer[per_layer.target_moves == 0]
    gen, tgt = (near[near.model == m].groupby(keys).mean(numeric_only=True) for m in ("gen", "target"))
    out = per_layer.groupby(keys).agg(codes_equal=("codes_equal", "mean"), code_mae=("code_mae", "mean"),
                                      code_mae_worst=("code_mae", "max"), scale_rel_err=("scale_rel_err", "mean"))
    worst = per_layer.loc[per_layer.groupby(keys).code_mae.idxmax()].set_index(keys)
    out = out.join(worst.layer.rename("worst_layer")).join(worst.group_gain_err.rename("worst_gain_err"))
    out = out.join(moving.groupby(keys).agg(sensitivity_min=("sensitivity", "min"), alignment_min=("alignment", "min")))
    out = out.join(frozen.groupby(keys).agg(frozen_copy=("codes_equal", "mean")))
    out = out.join(pd.DataFrame({"to_own": gen.to_own, "to_nearest_train": gen.to_nearest_train,
                                 "target_to_nearest_train": tgt.to_nearest_train, "iou_nearest_train": gen.iou_nearest_train,
                                 "target_iou_nearest_train": tgt.iou_nearest_train, "iou_own": gen.iou_own}))
    split = near.split.iloc[0]
    d = diff[(diff.split == split) & (diff.condition == "")]
    out = out.join(d.groupby(keys).accuracy.mean().rename("gen_minus_ptq")).reset_index()
    tidy = out.melt(id_vars=keys + ["worst_layer"], var_name="metric").assign(table="fidelity", split=split, method="gen",
                                                           profile=profile["name"], commit=commit)
    return tidy, _fidelity_markdown(out, split, profile, generators)


def _fidelity_markdown(out: pd.DataFrame, split: str, profile: dict, generators: str) -> str:
    """`fidelity_table`'s Markdown: short column names, rounded, with the notes that define each measure."""
    md = out.rename(columns={"granularity": "gran.", "gen_minus_ptq": "Gen − PTQ", "codes_equal": "codes =",
                             "code_mae": "code err", "code_mae_worst": "worst layer err", "worst_layer": "worst layer",
                             "scale_rel_err": "S err", "worst_gain_err": "its gain err", "sensitivity_min": "sens. (min)",
                             "alignment_min": "align. (min)", "frozen_copy": "frozen copy",
                             "to_own": "d(own)", "to_nearest_train": "d(train)", "target_to_nearest_train": "d(train) of target",
                             "iou_nearest_train": "IoU train", "target_iou_nearest_train": "IoU train of target",
                             "iou_own": "IoU own"})
    md = md.round({"Gen − PTQ": 2, "codes =": 3, "code err": 2, "worst layer err": 2, "its gain err": 3, "S err": 4,
                   "sens. (min)": 2, "align. (min)": 2, "frozen copy": 3, "d(own)": 4, "d(train)": 4, "d(train) of target": 4,
                   "IoU train": 2, "IoU train of target": 2, "IoU own": 2})
    md = md.drop(columns=[c for c in ("source", "variant") if md[c].nunique() == 1 and md[c].iloc[0] in ("ptq", "")])
    if "variant" in md:  # Table 1's two generators: ours (no label) and on the RTN base
        md = md.assign(variant=md.variant.replace("", "Gen")).rename(columns={"variant": "generator"})
    return _markdown(md, f"Fidelity and memorisation of {generators} ({SPLIT_LABELS[split]})", profile, [
        "Against the generator's target (PTQ, or QAT for `source` qat) of the same checkpoint: `codes =` fraction of "
        "equal integer codes; "
        "`code err` mean |code difference| in quantization steps over layers (`worst layer`: the largest, and which; `its gain "
        "err`: mean |a - 1| of its groups' fit a x target + b, a wrong range per group); `S err` mean relative error of S.",
        "`sens.`: ||G(a) − G(b)|| / ||T(a) − T(b)|| and `align.`: cosine between the two, per layer whose target moves "
        "between consecutive held-out checkpoints, the smallest over layers (1 = follows its input, 0 = ignores it); "
        "`frozen copy`: codes equal on layers whose target never moves (nothing to follow: a copy is the answer).",
        "`d(own)` / `d(train)`: distance of the generated weights to their own target / to the nearest training target "
        "(relative to the targets' norm); `of target` is the same for the target itself, what a faithful quantizer "
        "would show. `IoU`: of the sets of misclassified test images, with the nearest training target's model and "
        "with the own target's model. A replica of the training set has d(train) < d(own) and IoU train > IoU own."])


def fidelity_figure(diag: dict[str, pd.DataFrame]):
    """Three panels: code error against bits (mean over layers and the worst layer, group-wise), input
    sensitivity against alignment per moving layer, and distance to the own target against distance to the
    nearest training target (beside each target's own distance to the nearest training target)."""
    layers, sens, near = (diag[k].assign(pair=lambda d: d.arch + "/" + d.task) for k in ("layers", "sensitivity", "nearest"))
    group = layers[layers.granularity == "group"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    per_bits = group.groupby(["pair", "bits"]).code_mae.agg(["mean", "max"]).reset_index()
    for (pair, g), color in zip(per_bits.groupby("pair"), sns.color_palette("tab10")):
        ax.plot(g.bits, g["mean"], "o-", color=color, label=f"{pair}: mean over layers")
        ax.plot(g.bits, g["max"], "v:", color=color, label=f"{pair}: worst layer")
    ax.axhline(1, color="k", lw=0.8, ls="--", label="1 step")
    ax.set(title="code error against the target", xlabel="bits (group-wise)", ylabel="mean |code − target code| (steps)",
           yscale="log")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[1]
    moving = sens[sens.target_moves > 0].groupby(["pair", "bits", "layer"])[["sensitivity", "alignment"]].mean().reset_index()
    moving["sensitivity"] = moving.sensitivity.clip(lower=1e-3)  # a constant generator (0) at the bottom edge
    sns.scatterplot(data=moving, x="alignment", y="sensitivity", hue="pair", style="pair", size="bits", sizes=(15, 80), ax=ax)
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.axvline(1, color="k", lw=0.8, ls="--")
    ax.annotate("faithful", (1, 1), xytext=(-40, 12), textcoords="offset points", fontsize=7, arrowprops={"arrowstyle": "->"})
    ax.set(title="does the output follow the input? (moving layers)", xlabel="alignment cos(G(a) − G(b), T(a) − T(b))",
           ylabel="sensitivity ||G(a) − G(b)|| / ||T(a) − T(b)||", yscale="log",
           xlim=(min(-0.05, moving.alignment.min() - 0.05), 1.05))
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    ax = axes[2]
    gen = near[near.model == "gen"].groupby(["pair", "bits"])[["to_own", "to_nearest_train"]].mean().reset_index()
    tgt = near[near.model == "target"].groupby(["pair"])[["to_nearest_train"]].mean()  # hardly depends on bits
    sns.scatterplot(data=gen, x="to_nearest_train", y="to_own", hue="pair", style="pair", size="bits", sizes=(15, 80), ax=ax)
    top = max(gen.to_own.max(), gen.to_nearest_train.max(), tgt.to_nearest_train.max()) * 1.1
    ax.plot([0, top], [0, top], color="k", lw=0.8, ls="--")
    ax.text(top * 0.55, top * 0.6, "replica side:\ncloser to a training target", fontsize=7, rotation=0)
    for i, (pair, row) in enumerate(tgt.iterrows()):
        ax.axvline(row.to_nearest_train, lw=0.6, ls=":", color="grey",
                   label="the target's own distance to the nearest training target" if i == 0 else None)
    ax.set(title="memorisation: own target or a training one?", xlabel="distance to the nearest training target",
           ylabel="distance to its own target", xlim=(0, top), ylim=(0, top))
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def convergence_table(rows: pd.DataFrame, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """The convergence study (`evaluation.convergence_row` rows): tidy rows and a Markdown table per pair."""
    keys = ["arch", "task", "variant", "bits", "granularity", "split", "skip", "base", "d_model", "steps", "worst_layer"]
    tidy = rows.melt(id_vars=keys, var_name="metric").assign(table="convergence", profile=profile["name"], commit=commit)
    md = rows.drop(columns=["split", "bits", "granularity"]).rename(columns={
        "gen_minus_ptq": "Gen − PTQ", "codes_equal": "codes =", "code_mae": "code err", "code_mae_worst": "worst layer err",
        "worst_layer": "worst layer", "worst_gain_err": "its gain err", "worst_local_err": "its local err",
        "worst_scale_err": "its S err", "scale_rel_err": "S err", "train_seconds": "train (s)", "final_loss": "final loss",
        "n_params": "params"})
    md = md.round({"Gen − PTQ": 2, "codes =": 3, "code err": 2, "worst layer err": 2, "its gain err": 3, "its local err": 2,
                   "its S err": 3, "S err": 4, "train (s)": 0, "final loss": 5, "gen": 2, "ptq": 2})
    c = profile["convergence"]
    return tidy, _markdown(md, f"Convergence: the generator against its training budget and head ({c['bits']}-bit "
                           f"{c['granularity']}-wise, {SPLIT_LABELS[rows.split.iloc[0]]})", profile, [
        "Fidelity against the generator's PTQ target of the same checkpoint, mean over checkpoints: `codes =` equal "
        "codes, `code err` mean |code difference| in steps over layers (`worst layer` the largest, and which), `S err` relative "
        "error of S. For the worst layer, its code error split in two (qg.fidelity.layer_fidelity): `its gain err` "
        "mean |a - 1| when each group's generated codes are fitted as a x target + b (a wrong range of the group), "
        "`its local err` the code error the fit leaves (per element); `its S err` its relative S error. "
        "`skip`: the head (`none` is the paper's, see qg.generator); `base`: what the skip adds to, the weights or "
        "RTN of them (the group ranges given, with the rounding dead zone: qg.tokenizer). Train time on the machine "
        "in the provenance file."])


def convergence_figure(rows: pd.DataFrame):
    """Code error (mean and worst layer), the worst layer's per-group gain error, and Gen − PTQ for every
    variant, one colour per (arch, task)."""
    rows = rows.assign(pair=rows.arch + "/" + rows.task, worst_gain_pct=100 * rows.worst_gain_err)
    panels = (("code_mae", "code error against the target (steps)", 1),
              ("worst_gain_pct", "worst layer: per-group gain error (%)", None),
              ("gen_minus_ptq", "Gen − PTQ (points, held-out run)", 0))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for (metric, title, ref), ax in zip(panels, axes):
        for (pair, g), color in zip(rows.groupby("pair", sort=False), sns.color_palette("tab10")):
            ax.plot(g.variant, g[metric], "o-", color=color, label=pair)
            if metric == "code_mae":
                ax.plot(g.variant, g.code_mae_worst, "v:", color=color, label=f"{pair} (worst layer)")
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


def _amortized_column(method: str, source: str, variant: str) -> str:
    """The column of an amortized-QAT row: a baseline, or Gen by target (direct / residual) and source."""
    return f"Gen {variant} ({source.upper()})" if method == "gen" else METHOD_LABELS[method]


AMORTIZED_DIFFS = (("Gen residual (PTQ)", "PTQ"), ("Gen direct (QAT)", "HQQ"), ("Gen residual (QAT)", "HQQ"),
                   ("Gen direct (QAT)", "QAT"), ("Gen residual (QAT)", "QAT"))


def amortized_wide(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (arch, task, bits, split, checkpoint), one column per method (baselines once, Gen by target
    and source) and the paired differences of `AMORTIZED_DIFFS` as `A − B`."""
    keys = ["arch", "task", "bits", "granularity", "split", "checkpoint"]
    runs = runs.assign(column=[_amortized_column(m, s, v) for m, s, v in zip(runs.method, runs.source, runs.variant)])
    wide = runs.pivot_table(index=keys, columns="column", values="accuracy", aggfunc="first").reset_index()
    for a, b in AMORTIZED_DIFFS:
        if {a, b} <= set(wide.columns):
            wide[f"{a} − {b}"] = wide[a] - wide[b]
    return wide


def amortized_table(runs: pd.DataFrame, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """Amortized QAT: FP32, PTQ, HQQ, QAT and the generators of both targets and both sources, per pair, bit-width
    and split, with the paired differences that answer the questions (is residual-on-PTQ PTQ? does Gen-on-QAT
    beat HQQ, and how close does it come to QAT itself?)."""
    wide = amortized_wide(runs)
    keys = ["arch", "task", "bits", "granularity", "split"]
    columns = [c for c in wide.columns if c not in keys + ["checkpoint"]]
    tidy = wide.melt(id_vars=keys + ["checkpoint"], value_vars=columns, var_name="method", value_name="accuracy")
    tidy = tidy.groupby(keys + ["method"], dropna=False).accuracy.agg(value="mean", std="std", n="count").reset_index()
    tidy = tidy.assign(table="amortized_qat", std=tidy["std"].fillna(0.0), profile=profile["name"], commit=commit,
                       metric=["paired_difference" if " − " in m else "top1_accuracy" for m in tidy.method])
    order = ["FP32", "PTQ", "HQQ", "QAT", "Gen direct (PTQ)", "Gen residual (PTQ)", "Gen direct (QAT)", "Gen residual (QAT)"]
    shown = [c for c in order if c in columns] + [f"{a} − {b}" for a, b in AMORTIZED_DIFFS if f"{a} − {b}" in columns]
    rows = []
    for (task, arch, bits, split), g in _ordered(tidy).groupby(["task", "arch", "bits", "split"], sort=False):
        by = g.set_index("method")
        rows.append({"task": task, "arch": arch, "bits": bits, "split": SPLIT_LABELS[split],
                     **{c: cell(by.value.get(c), by["std"].get(c) if " − " in c else None) for c in shown}})
    md = pd.DataFrame(rows).sort_values(["task", "arch", "bits"], ascending=[True, True, False], kind="stable")
    return tidy, _markdown(md, f"Amortized QAT: one data-free forward pass against QAT and HQQ "
                           f"({profile['qat']['granularity']}-wise; top-1 %, mean over checkpoints)", profile, [
        "Gen direct: the paper's target (codes, S, Z); Gen residual: offsets from round-to-nearest of the same checkpoint "
        "(ours, qg.tokenizer); (PTQ) / (QAT): trained on PTQ or QAT targets. Gen residual (PTQ) − PTQ is a correctness "
        "check: an untrained residual generator is PTQ, and trained on PTQ targets it should stay there.",
        "Differences are paired over the same checkpoints (mean ± std). HQQ needs no data; QAT fine-tunes each model "
        f"on data ({profile['qat']['steps']} steps); Gen needs neither at inference."])


def amortized_figure(runs: pd.DataFrame, split: str = "heldout_run"):
    """Each method's accuracy minus PTQ's on the same checkpoints against bits, one panel per (arch, task)."""
    wide = amortized_wide(runs)
    wide = wide[wide.split == split]
    methods = [c for c in ("HQQ", "QAT", "Gen direct (QAT)", "Gen residual (QAT)", "Gen residual (PTQ)") if c in wide]
    wide = wide.assign(**{m: wide[m] - wide.PTQ for m in methods})  # paired: the same checkpoint's PTQ
    long = wide.melt(id_vars=["arch", "task", "bits", "checkpoint"], value_vars=methods, var_name="method")
    long["pair"] = long.arch + "/" + long.task
    grid = sns.relplot(data=long, x="bits", y="value", hue="method", style="method", col="pair", kind="line",
                       markers=True, dashes=False, errorbar="sd", height=3.0, aspect=1.05, facet_kws={"sharey": False})
    for ax in grid.axes.flat:
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_xticks(sorted(long.bits.unique()))
        ax.grid(alpha=0.3)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("bits (group-wise)", "accuracy − PTQ (points)")
    grid.figure.suptitle(f"Amortized QAT on the {SPLIT_LABELS[split]}: gain over PTQ on the same checkpoints (0 = PTQ)",
                         y=1.04)
    return grid.figure


def ablation_findings(runs: pd.DataFrame, factor: str, split: str = "heldout_run") -> list[str]:
    """The computed conclusion of one ablation, per bit-width: each variant's Gen − PTQ on `split` (mean ± std
    over checkpoints), the best and the worst, and whether their gap is larger than twice the largest spread
    between checkpoints (a difference one would bet on) or not; then the paper's own numbers."""
    diff = paired_difference(runs)
    lines = []
    for bits, g in diff[diff.split == split].groupby("bits"):
        stats = g.groupby("variant", sort=False).accuracy.agg(["mean", "std"]).fillna(0.0)
        best, worst = stats["mean"].idxmax(), stats["mean"].idxmin()
        gap, spread = stats.loc[best, "mean"] - stats.loc[worst, "mean"], stats["std"].max()
        verdict = "larger than the spread between checkpoints" if gap > 2 * spread else \
            "within the spread between checkpoints: no measurable effect"
        each = ", ".join(f"{v} {r['mean']:+.2f} ± {r['std']:.2f}" for v, r in stats.iterrows())
        lines.append(f"{bits}-bit, Gen − PTQ on the {SPLIT_LABELS[split]}: {each}; best {best}, worst {worst}, "
                     f"gap {gap:.2f} points ({verdict})")
    return lines + [paper_ablation_note(factor)]


def gen_minus_ptq_figure(diff: pd.DataFrame):
    """Paired Gen − PTQ per checkpoint (`paired_difference` rows) against bits, one panel per granularity,
    the three splits side by side in their protocol order."""
    diff = diff.assign(split=diff.split.map(SPLIT_LABELS))
    grans = [g for g in ("group", "channel") if g in set(diff.granularity)]
    fig, axes = plt.subplots(1, len(grans), figsize=(6.5 * len(grans), 3.6), squeeze=False, sharey=True)
    for ax, gran in zip(axes[0], grans):
        sel = diff[diff.granularity == gran]
        sns.boxplot(data=sel, x="bits", y="accuracy", hue="split", hue_order=list(SPLIT_LABELS.values()),
                    order=sorted(sel.bits.unique()), fliersize=2, ax=ax)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=f"{gran}-wise", xlabel="bits", ylabel="Gen − PTQ, same checkpoint (points)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, title=None)
    fig.suptitle("Where Gen wins (> 0) and loses (< 0) against PTQ, every generator of Tables 1-3 and Figure 3")
    fig.tight_layout()
    return fig


QWT_METHODS = ("ptq", "ptq+qwt", "hqq", "hqq+qwt", "gen", "gen+qwt")


def qwt_table(runs: pd.DataFrame, profile: dict, commit: str, split: str = "heldout_run") -> tuple[pd.DataFrame, str]:
    """PTQ, HQQ and Gen with and without QwT on `split` (all splits in the CSV), with the paired gains of QwT and
    the fair comparisons: Gen against PTQ (both data-free), Gen + QwT against PTQ + QwT (both calibrated)."""
    sel = runs[runs.method.isin(QWT_METHODS)]
    pairs = [("ptq+qwt", "ptq"), ("hqq+qwt", "hqq"), ("gen+qwt", "gen"), ("gen+qwt", "ptq+qwt")]
    diffs = pd.concat([paired_difference(sel, a, b) for a, b in pairs], ignore_index=True)
    tidy = summarize(pd.concat([sel, diffs], ignore_index=True), "qwt", profile, commit)
    seconds = sel.groupby("method").seconds.mean()
    shown = tidy[tidy.split == split].assign(
        spec=_spec_label, column=lambda d: d.method.map(method_label),
        cell=lambda d: [cell(v, s) for v, s in zip(d.value, d["std"])])
    wide = shown.pivot_table(index=["task", "arch", "spec"], columns="column", values="cell", aggfunc="first", sort=False)
    order = [method_label(m) for m in [*QWT_METHODS, *(f"{a}-{b}" for a, b in pairs)]]
    wide = wide[[c for c in order if c in wide.columns]].reset_index()
    images = (profile.get("qwt") or {}).get("images", qwt.IMAGES)
    notes = [f"{SPLIT_LABELS[split]}; top-1 %, mean ± std over checkpoints; differences paired on the same checkpoints.",
             f"QwT fits one linear layer per block in closed form on {images} training images of the task (never its test "
             "images), on top of each method's file, with its fp32 checkpoint as the reference: it needs data and the "
             "full-precision weights, which PTQ, HQQ and Gen do not. The fair comparisons: Gen against PTQ / HQQ, "
             "Gen + QwT against PTQ + QwT.",
             "Seconds per model (this machine, mean): " + ", ".join(f"{METHOD_LABELS[m]} {seconds[m]:.3f}" for m in QWT_METHODS
                                                                  if m in seconds) + ".", generator_note(profile)]
    return tidy, markdown(wide, "QwT on top of PTQ, HQQ and Gen", notes)


def size_table(costs: pd.DataFrame, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """How much smaller each method's file is than the FP32 checkpoint, at every spec, against the ideal:
    32 / bits for the codes alone, less the S (and asymmetric Z) per group and the tensors kept in float."""
    tidy = costs.assign(fp32_over_file=costs.fp32_file_bytes / costs.file_bytes, ideal_codes_only=32 / costs.bits,
                        sz_overhead_bits=costs.bits_per_weight - costs.bits,
                        float_share=1 - costs.quantized_weights * 4 / costs.fp32_bytes,
                        profile=profile["name"], commit=commit)
    shown = _first_task(tidy).assign(
        method=lambda d: d.method.map(METHOD_LABELS) + " (" + d.scheme.str[:3] + ")", spec=_spec_label,
        cell=lambda d: [f"1/{r:.1f} · {b:.2f} b/w" for r, b in zip(d.fp32_over_file, d.bits_per_weight)])
    wide = shown.pivot_table(index=["arch", "method"], columns="spec", values="cell", aggfunc="first", sort=False)
    wide = wide[sorted(wide.columns, key=lambda c: (-int(c.split()[0][1:]), c))].reset_index()
    fp = tidy.groupby("arch").fp32_file_bytes.first()
    share = tidy.groupby("arch").float_share.first()
    tasks = _first_task(tidy).groupby("arch").task.first()
    notes = [f"Each cell: FP32 checkpoint file / quantized file, and bits per quantized weight (codes + S + Z); one task "
             f"per architecture shown ({', '.join(f'{a}: {t}' for a, t in tasks.items())}; the tasks' models differ only "
             "in their head's classes; every task is in the CSV).",
             "FP32 files: " + "; ".join(f"{a} {b / 1024:.1f} KiB" for a, b in fp.items()) + ". Tensors kept in float "
             "(biases, norms, position embeddings, class token): " + "; ".join(f"{a} {100 * s:.1f} %" for a, s in share.items())
             + " of the FP32 bytes, which bounds the ratio at small widths.",
             "S is float32 per group (a row, or group_size values of a row; shorter at a row's end and in rows shorter "
             "than a group): 32 / values per group bits per weight, 0.5 at 64; Z is stored only for the asymmetric scheme "
             "(HQQ), as much again.", f"Profile `{profile['name']}`."]
    return tidy, markdown(wide, "Quantized file sizes (format version 2: bit-packed codes)", notes)


def size_figure(costs: pd.DataFrame):
    """FP32 file / quantized file against bits, per method and granularity, under the codes-only ideal 32/bits."""
    sel = _first_task(costs).assign(method=lambda d: d.method.map(METHOD_LABELS),
                                    ratio=lambda d: d.fp32_file_bytes / d.file_bytes)
    grid = sns.relplot(data=sel, x="bits", y="ratio", hue="method", style="granularity", col="arch", kind="line",
                       markers=True, height=3.2, aspect=1.1)
    bits = np.arange(costs.bits.min(), costs.bits.max() + 1)
    for ax in grid.axes.flat:
        ax.plot(bits, 32 / bits, "k:")
        ax.annotate("ideal: 32 / bits (codes only)", (bits[0], 32 / bits[0]), xytext=(6, -2), textcoords="offset points",
                    fontsize=7, va="top")
        ax.set(xlabel="bits", ylabel="FP32 file / quantized file (× smaller)", ylim=(0, None), xticks=bits)
        ax.grid(alpha=0.3)
    grid.figure.suptitle("File size against FP32 (one task per architecture; the gap to the ideal: S, Z and float "
                         "tensors)", y=1.04)
    return grid.figure


def _first_task(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each architecture's first task (sizes hardly depend on the task)."""
    return df[df.task == df.groupby("arch").task.transform("first")]


def runtime_table(rows: pd.DataFrame, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """The packed runtime against the simulated model (accuracy, logits) and against FP32 (memory, time)."""
    tidy = rows.assign(memory_vs_fp32=rows.weight_bytes_runtime / rows.weight_bytes_fp32,
                       time_vs_fp32=rows.seconds_runtime / rows.seconds_fp32, profile=profile["name"], commit=commit)
    shown = pd.DataFrame({
        "arch": tidy.arch, "task": tidy.task, "spec": _spec_label(tidy),
        "top-1 simulated": tidy.accuracy_simulated.round(2), "top-1 packed": tidy.accuracy_runtime.round(2),
        "max |Δ logit|": tidy.max_logit_diff.map(lambda v: f"{v:.1e}"),
        "weights KiB (FP32)": [f"{r / 1024:.1f} ({f / 1024:.1f})"
                               for r, f in zip(tidy.weight_bytes_runtime, tidy.weight_bytes_fp32)],
        "memory vs FP32": tidy.memory_vs_fp32.round(3), "time vs FP32": tidy.time_vs_fp32.round(2)})
    notes = [f"Gen files of the first held-out-run checkpoint, loaded with `qg.runtime.load_runtime`: every quantized "
             f"Linear and Conv2d keeps its packed codes, S and Z and dequantizes its weight per call. Memory: bytes of "
             f"the parameters and buffers the model holds; time: median forward seconds of a batch of "
             f"{int(tidy.batch.iloc[0])} test images on this machine ({tidy.device.iloc[0]}).",
             "Simulated: the file dequantized to float32 (every accuracy in the other tables); both are scored on "
             "the same test subset.", f"Profile `{profile['name']}`."]
    return tidy, markdown(shown, "The packed runtime against the simulated model and FP32", notes)


def runtime_figure(rows: pd.DataFrame):
    """Resident weight memory and forward time of the packed runtime relative to FP32, against bits (the
    spread over tasks as error bars: the models of both tasks have the same layers)."""
    sel = rows.assign(memory=rows.weight_bytes_runtime / rows.weight_bytes_fp32,
                      time=rows.seconds_runtime / rows.seconds_fp32)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, value, label in ((axes[0], "memory", "resident weight bytes / FP32"), (axes[1], "time", "forward seconds / FP32")):
        sns.lineplot(data=sel, x="bits", y=value, hue="arch", style="granularity", markers=True, errorbar=("pi", 100),
                     err_style="bars", ax=ax)
        ax.axhline(1, color="k", lw=0.8, ls=":")
        ax.set(xlabel="bits", ylabel=label, ylim=(0, max(1.1, sel[value].max() * 1.1)),
               xticks=sorted(sel.bits.unique()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("memory: packed codes + S/Z + float tensors")
    axes[1].set_title("speed: dequantize per layer, then float matmul")
    fig.tight_layout()
    return fig


RPG_KIND_LABELS = {"original": "original (RPG's training ckpts)", "heldout": "held-out run (new ckpts, other seed)",
                   "generated": "RPG samples", "noise": "training ckpt + noise", "average": "average of training ckpts"}


def rpg_table(rows: pd.DataFrame, records: dict, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """RPG's Table 1 at our scale (`rpg_study.rpg_rows`): accuracy statistics per kind of model, as RPG reports
    them (best / mean / median / min / std), beside the memorisation tests; `records[arch]` is RPG's training
    record (train seconds, steps)."""
    stats = rows.groupby(["arch", "task", "kind"], sort=False).agg(
        n=("accuracy", "size"), best=("accuracy", "max"), mean=("accuracy", "mean"), median=("accuracy", "median"),
        min=("accuracy", "min"), std=("accuracy", "std"), to_nearest_train=("to_nearest_train", "median"),
        error_iou=("error_iou", "median"), seconds_per_model=("seconds", "mean")).reset_index()
    tidy = stats.melt(id_vars=["arch", "task", "kind"], var_name="metric").assign(table="rpg", profile=profile["name"],
                                                                                 commit=commit)
    shown = stats.assign(kind=stats.kind.map(RPG_KIND_LABELS)).round(
        {"best": 2, "mean": 2, "median": 2, "min": 2, "std": 2, "to_nearest_train": 4, "error_iou": 3,
         "seconds_per_model": 2}).rename(columns={"to_nearest_train": "dist. to nearest train (median)",
                                                 "error_iou": "error IoU with it (median)", "seconds_per_model": "s / model"})
    paper_rows = pd.DataFrame([{"arch": f"{model} (RPG paper, ImageNet-1K)", "task": "", "kind": RPG_KIND_LABELS[kind],
                                **({"n": 50, "mean": v["original"]} if kind == "original" else
                                   {k: v[k] for k in ("best", "mean", "median", "min", "std")})}
                               for model, v in paper.RPG_TABLE1.items() for kind in ("original", "generated")])
    shown = pd.concat([shown, paper_rows], ignore_index=True).fillna("")
    conf = rpg_study.rpg_config(profile)
    train = "; ".join(f"{a}: {r['steps']} steps, {r['train_seconds']:.0f} s, {r['n_params']:,} parameters"
                      for a, r in records.items())
    return tidy, markdown(shown, "RPG at our scale: whole models sampled from noise (top-1 %)", [
        "Original: the run-A checkpoints RPG is trained on (its 'original' models, as in RPG's Table 1); held-out run: "
        "checkpoints of the same recipe with another seed, which RPG never sees, i.e. what genuinely new models of this "
        "recipe look like. Noise: a training checkpoint plus Gaussian noise of "
        f"{conf['noise']} x each tensor's std; average: the mean of "
        f"{conf['average_of']} randomly drawn training checkpoints (Zeng et al.'s two baselines).",
        "Distance to nearest train: Euclidean distance over every tensor to the nearest training checkpoint other than "
        "the model itself, relative to the training checkpoints' mean norm (for the originals it is the training set's "
        "own spacing); error IoU: overlap of the test samples the model and that checkpoint misclassify (1: the same "
        "mistakes). A replica sits at distance ~0 with IoU ~1; a new model where the held-out run does.",
        f"RPG training: {train}; s / model is the time to make one model (sampling, for RPG).",
        f"Profile `{profile['name']}`."])


def rpg_figure(rows: pd.DataFrame):
    """Per kind of model: accuracy, distance to the nearest training checkpoint, and the IoU of its mistakes with
    that checkpoint's, one colour per architecture: is RPG generating new models or replaying its training set?"""
    order = [k for k in RPG_KIND_LABELS if k in set(rows.kind)]
    data = rows.assign(kind=rows.kind.map(lambda k: RPG_KIND_LABELS[k].split(" (")[0]))
    labels = [RPG_KIND_LABELS[k].split(" (")[0] for k in order]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = (("accuracy", "top-1 accuracy (%)"), ("to_nearest_train", "distance to nearest training ckpt (relative)"),
              ("error_iou", "IoU of errors with that ckpt"))
    for ax, (metric, title) in zip(axes, panels):
        sns.stripplot(data=data, y="kind", x=metric, hue="arch", order=labels, dodge=True, alpha=0.7, size=4, ax=ax)
        ax.set(title=title, xlabel="", ylabel="")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, title="arch")
    axes[1].set_xscale("symlog", linthresh=1e-3)  # from the training set's own spacing (~1e-3) to a stranger (~1)
    axes[1].set_xlim(left=0)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("RPG at our scale: new models, or replays of its training checkpoints?", y=1.02)
    fig.tight_layout()
    return fig


def binary_table(rows: pd.DataFrame, record: dict, profile: dict, commit: str) -> tuple[pd.DataFrame, str]:
    """RPG's Tables 9 and 14 at our scale (`rpg_study.binary_rows`): per unseen binary task, its own classifiers,
    RPG's samples (best, mean ± std) and the nearest seen task's classifiers, beside the paper's averages."""
    by = rows.groupby(["arch", "embedding", "kind"], sort=False)
    stats = by.agg(mean=("accuracy", "mean"), std=("accuracy", "std"), best=("accuracy", "max"), n=("accuracy", "size"),
                   to_nearest_train=("to_nearest_train", "median")).reset_index()
    tidy = stats.melt(id_vars=["arch", "embedding", "kind"], var_name="metric").assign(
        table="rpg_binary", profile=profile["name"], commit=commit)
    wide = stats.pivot_table(index=["arch", "embedding"], columns="kind", values=["mean", "std", "best"], sort=False,
                             dropna=False)  # one sample per task has no std
    hamming = rows.groupby(["arch", "embedding"], sort=False)[["nearest_seen", "hamming"]].first()
    shown = pd.DataFrame({
        "original": [cell(m, s) for m, s in zip(wide["mean"]["original"], wide["std"]["original"])],
        "RPG best": wide["best"]["generated"].round(2),
        "RPG mean": [cell(m, s) for m, s in zip(wide["mean"]["generated"], wide["std"]["generated"])],
        "nearest seen task": [f"{cell(m)} ({n}, d = {h})" for m, n, h in
                              zip(wide["mean"]["nearest seen"], hamming.nearest_seen, hamming.hamming)],
    }, index=wide.index).reset_index()
    means = stats.groupby("kind").agg(mean=("mean", "mean"), best=("best", "mean"))
    summary = {"arch": "mean over unseen tasks", "embedding": "", "original": cell(means["mean"]["original"]),
               "RPG best": round(means["best"]["generated"], 2), "RPG mean": cell(means["mean"]["generated"]),
               "nearest seen task": cell(means["mean"]["nearest seen"])}
    ref = np.array(list(paper.RPG_TABLE14.values()))
    paper_row = {"arch": "RPG paper (ViT-Tiny, CIFAR-10, 20 unseen tasks)", "embedding": "", "original": cell(ref[:, 0].mean()),
                 "RPG best": round(ref[:, 1].mean(), 2), "RPG mean": cell(ref[:, 2].mean()), "nearest seen task": "NA"}
    shown = pd.concat([shown, pd.DataFrame([summary, paper_row])], ignore_index=True)
    b = rpg_study.binary_config(profile)
    return tidy, markdown(shown, "RPG on binary tasks it never saw (top-1 %, RPG Tables 9 and 14 at our scale)", [
        f"Each task relabels the {b['dataset']} classes 0/1 by its embedding; classifiers are the "
        f"pretrained model's head retrained on frozen features ({b['checkpoints']} per task). RPG is trained on "
        f"{record.get('seen_tasks')} seen tasks ({record.get('n_train_checkpoints')} classifiers, {record.get('steps')} "
        f"steps, {record.get('train_seconds', float('nan')):.0f} s), conditioned on the embedding, and generates "
        f"{b['samples']} heads per unseen task (the frozen rest is copied).",
        "Original: the unseen task's own classifiers, which RPG never saw. Nearest seen task: the classifiers of the seen "
        "task whose embedding differs in the fewest classes (d), used as they are: the baseline that needs no generator.",
        f"Profile `{profile['name']}`."])


def binary_figure(rows: pd.DataFrame):
    """Accuracy on each unseen task of its own classifiers, RPG's samples and the nearest seen task's, and each
    kind's distance to the nearest of RPG's training classifiers."""
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    sns.stripplot(data=rows, x="embedding", y="accuracy", hue="kind", dodge=True, size=5, alpha=0.8, ax=axes[0])
    axes[0].set(title="unseen binary tasks: accuracy (%)", xlabel="task embedding (class 0..9 -> label)", ylabel="top-1 (%)")
    axes[0].tick_params(axis="x", rotation=30)
    axes[0].grid(alpha=0.3, axis="y")
    sns.boxplot(data=rows, x="kind", y="to_nearest_train", ax=axes[1])
    axes[1].set(title="distance to nearest training classifier", xlabel="", ylabel="relative distance")
    axes[1].tick_params(axis="x", rotation=20)
    axes[1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
