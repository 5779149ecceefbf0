"""What the results say, computed from the results CSVs, never typed: one function per results
table, each returning its sentences with their numbers. `qg.results` writes them to
`results/<profile>/README.md`; the notebooks print the same functions under "What we found".

Every comparison is a paired difference over the checkpoints of one split (the tidy tables' mean,
std and n), stated with its 95 % confidence interval (Student's t over those checkpoints) and
called a win, a loss, or a tie when the interval covers 0. The checkpoints of a split come from one
or two fine-tuning runs and are not independent draws of a run: the interval is of these
checkpoints' mean, not a promise about a new run. Where a table has a second new run (amortized
QAT's validation run), its verdicts are set beside the held-out run's, to show which survive one.
"""

from __future__ import annotations

import pandas as pd

from .. import methods
from ..core.report import SPLIT_LABELS
from ..study.settings import CHOICE_SPLIT
from .common import claim, extremes, said, tally, verdict, verdicts, where

HELD = "heldout_run"  # the split every claim is made on; the paper's protocol is `trained`
MARGIN = "Gen direct (QAT) − Gen residual (QAT)"  # amortized QAT: how firm the chosen target is
CHOSEN = "Gen chosen (QAT)"


def table1_findings(tidy: pd.DataFrame) -> list[str]:
    """Gen − PTQ over Table 1's cells: wins, ties and losses on the held-out run and on the
    paper's protocol, at 6-8 bits and at 3-5, with the extreme cells and every loss."""
    diffs = tidy[tidy.method == "gen-ptq"]
    lines = []
    for split in (HELD, "trained"):
        s = diffs[diffs.split == split]
        for name, part in (("6-8 bits", s[s.bits >= 6]), ("3-5 bits", s[s.bits <= 5])):
            if len(part):
                lines.append(
                    f"Gen − PTQ, {SPLIT_LABELS[split]}, {name}: {tally(part)} of {len(part)} "
                    f"cells; {extremes(part)}"
                )
    held = diffs[diffs.split == HELD]
    losses = held[verdicts(held) == "loss"]
    if len(losses):
        lines.append(
            f"Losses on the {SPLIT_LABELS[HELD]}: "
            + "; ".join(f"{where(r)} {said(r)}" for _, r in losses.iterrows())
        )
    return lines


def following_findings(tidy: pd.DataFrame, floor: float = 0.9) -> list[str]:
    """Does Gen follow its input? From `following_table`, per split, task and generator: the
    correlation across checkpoints of Gen's accuracy with its target's (median and range, the
    target's own with FP32 beside it), the cells below `floor`, and the cells where Gen's accuracy
    is the same on every checkpoint while the target's is not."""
    wide = tidy.pivot_table(
        index=["split", "task", "source", "variant", "arch", "bits", "granularity", "n"],
        columns="metric",
        values="value",
        aggfunc="first",
        dropna=False,
    ).reset_index()
    wide["variant"] = ["" if pd.isna(v) else v for v in wide.variant]
    lines = []
    for split in [s for s in (HELD, "heldout_ckpt", "trained") if s in set(wide.split)]:
        for (task, source, variant), c in wide[wide.split == split].groupby(
            ["task", "source", "variant"], sort=False
        ):
            gen, ref = c.corr_target.astype(float), c.target_corr_fp.astype(float)
            lines.append(
                f"{SPLIT_LABELS[split]}, {task}, {variant or 'Gen'} on {source.upper()} targets: "
                f"correlation with the target's accuracy median {gen.median():.2f} "
                f"({gen.min():.2f} to {gen.max():.2f}; the target's with FP32 median "
                f"{ref.median():.2f}); below {floor} in {int((gen < floor).sum())} of "
                f"{int(gen.notna().sum())} cells; Gen's accuracy the same on every checkpoint "
                f"while the target's varies in {int(c.constant.sum())}"
                + (_image_by_image(c) if "closest_input" in c else "")
            )
    return lines


def _image_by_image(cells: pd.DataFrame) -> str:
    """`following_findings`' clause from `qg.study.agreement`: on how many checkpoints Gen's model
    is closest to its own input, and its target's (chance: about one per cell), how often Gen
    predicts what its own target does, and, in the cells where the test images can tell (the target
    finds its own input on more than half the checkpoints), on how many checkpoints Gen finds its
    own there and in how many of those cells as often as the target."""
    c = cells[["n", "closest_input", "target_closest_input", "agree_own", "targets_agree"]]
    c = c.astype(float)
    told = c[c.target_closest_input > c.n / 2]
    verdict = (
        f"in the {len(told)} cell{'s' * (len(told) > 1)} where the target finds its own input on "
        f"more than half the checkpoints ({int(told.target_closest_input.sum())} of "
        f"{int(told.n.sum())}), Gen finds its own on {int(told.closest_input.sum())}, and as "
        f"often as the target in {int((told.closest_input >= told.target_closest_input).sum())}"
        if len(told)
        else "in no cell does the target find its own input on more than half the checkpoints "
        "(these test images cannot tell whether Gen follows it)"
    )
    return (
        f"; image by image, Gen's model is closest to its own FP32 input on "
        f"{int(c.closest_input.sum())} of {int(c.n.sum())} checkpoints, the target's on "
        f"{int(c.target_closest_input.sum())} (by chance about {len(c)}), and Gen agrees with its "
        f"own target on {c.agree_own.median():.2f} % of test images (median; the targets with "
        f"each other: {c.targets_agree.median():.2f} %); {verdict}"
    )


def fidelity_findings(tidy: pd.DataFrame) -> list[str]:
    """How close our generator's codes are to its target's on the held-out run, per bit-width
    (mean and worst layer, in quantization steps), and whether it follows its input (the smallest
    sensitivity and alignment over the moving layers)."""
    ours = tidy[tidy.variant.isna() | (tidy.variant == "")] if "variant" in tidy else tidy
    by_bits = ours.groupby(["bits", "metric"]).value
    lo, hi = by_bits.min().unstack(), by_bits.max().unstack()
    return [
        f"{int(b)}-bit (over the pairs and granularities): codes equal to the target's "
        f"{lo.codes_equal[b]:.1%} to {hi.codes_equal[b]:.1%}; mean code error up to "
        f"{hi.code_mae[b]:.3f} steps, worst layer up to {hi.code_mae_worst[b]:.2f}; input "
        f"sensitivity at least {lo.sensitivity_min[b]:.2f}, alignment at least "
        f"{lo.alignment_min[b]:.2f}"
        for b in lo.index
    ]


def convergence_findings(tidy: pd.DataFrame) -> list[str]:
    """02_train's variants on the held-out run: each one's Gen − PTQ, worst-layer code error and
    on how many checkpoints it finds its own input (PTQ's count beside it), per (arch, task)."""
    wide = tidy.pivot_table(
        index=["arch", "task", "variant"], columns="metric", values="value", sort=False
    )
    return [
        f"{arch}/{task}, held-out run means: "
        + "; ".join(
            f"{v} Gen − PTQ {r['gen_minus_ptq']:+.2f}, worst layer {r['code_mae_worst']:.2f} steps"
            + (
                f", closest to its own input on {r['closest_input']:.0f} of {r['n']:.0f} "
                f"checkpoints (PTQ {r['ptq_closest_input']:.0f})"
                if "closest_input" in r
                else ""
            )
            for v, r in g.droplevel(["arch", "task"]).iterrows()
        )
        for (arch, task), g in wide.groupby(level=["arch", "task"], sort=False)
    ]


def qwt_findings(tidy: pd.DataFrame) -> list[str]:
    """QwT on the held-out run: what it adds to PTQ, HQQ and Gen, and Gen + QwT against PTQ + QwT
    (both calibrated), over the cells where it was fitted."""
    held = tidy[tidy.split == HELD]
    return [
        f"{methods.label(m)}: {tally(d)} of {len(d)} cells; {extremes(d)}"
        for m in ("ptq+qwt-ptq", "hqq+qwt-hqq", "gen+qwt-gen", "gen+qwt-ptq+qwt")
        for d in [held[held.method == m]]
        if len(d)
    ]


def rpg_findings(tidy: pd.DataFrame) -> list[str]:
    """RPG's whole-model samples against its training checkpoints, the held-out run and the two
    cheap baselines: mean and best accuracy, and distance to the nearest training checkpoint."""
    stats = tidy.pivot_table(index=["arch", "kind"], columns="metric", values="value")
    return [
        f"{arch}: "
        + "; ".join(
            f"{kind} mean {r['mean']:.2f} % (best {r['best']:.2f}), "
            f"{r['to_nearest_train']:.4f} from the nearest training ckpt"
            for kind, r in g.droplevel("arch").iterrows()
        )
        for arch, g in stats.groupby(level="arch", sort=False)
    ]


def amortized_findings(tidy: pd.DataFrame) -> list[str]:
    """Amortized QAT on the held-out run, per bit-width: the chosen generator against HQQ and QAT
    over the pairs, and what QAT's steps gain without quantizing and what quantizing costs."""
    held = tidy[(tidy.split == HELD) & (tidy.metric == "paired_difference")]
    lines = []
    for bits, g in held.groupby("bits"):
        for m in (
            "Gen direct (QAT) − HQQ",
            "Gen residual (QAT) − HQQ",
            "Gen chosen (QAT) − HQQ",
            "Gen chosen (QAT) − QAT",
            "FP32 + QAT's steps − FP32",
            "QAT − FP32 + QAT's steps",
        ):
            rows = g[g.method == m]
            if len(rows):
                lines.append(
                    f"{bits}-bit, {m}: {tally(rows)} of {len(rows)} pairs; "
                    + "; ".join(f"{r.arch}/{r.task} {said(r)}" for _, r in rows.iterrows())
                )
    if "chosen" in tidy:
        lines += [_choices(tidy), *_replicated(tidy)]
    return lines


def _replicated(tidy: pd.DataFrame) -> list[str]:
    """The chosen generator's held-out-run verdicts beside the same differences on the validation
    run, a second new run (where the target was chosen, so Gen's side is optimistic there): a
    verdict that changes from one new run to the other is not a finding about new runs."""
    diffs = tidy[tidy.metric == "paired_difference"]
    on = ["arch", "task", "bits", "method"]
    both = diffs[diffs.split == HELD].merge(
        diffs[diffs.split == CHOICE_SPLIT], on=on, suffixes=("", "_c")
    )
    lines = []
    for m, g in both[both.method.isin([f"{CHOSEN} − HQQ", f"{CHOSEN} − QAT"])].groupby("method"):
        stats = [list(zip(g[f"value{x}"], g[f"std{x}"], g[f"n{x}"])) for x in ("", "_c")]
        differ = [
            (r, b, c) for r, b, c in zip(g.itertuples(), *stats) if verdict(*b) != verdict(*c)
        ]
        lines.append(
            f"{m}, the held-out run against the validation run (run C): the same verdict in "
            f"{len(g) - len(differ)} of {len(g)} cells"
            + "".join(
                f"; {r.arch}/{r.task} {r.bits}-bit {claim(*b)} on the held-out run, "
                f"{claim(*c)} on run C"
                for r, b, c in differ
            )
        )
    return lines


def _choices(tidy: pd.DataFrame) -> str:
    """The target chosen per (pair, bits) on the validation run (`CHOICE_SPLIT`), with direct −
    residual there when the table has it: a tie is a choice that run does not resolve."""
    keys = ["arch", "task", "bits"]
    chosen = tidy.dropna(subset=["chosen"]).groupby(keys).chosen.first()
    margins = tidy[(tidy.split == CHOICE_SPLIT) & (tidy.method == MARGIN)]
    margin = {k: f" (direct − residual {said(r)})" for k, r in margins.set_index(keys).iterrows()}
    ties = (verdicts(margins) == "tie").sum()
    return (
        "Chosen on the validation run, run C (never on the held-out run): "
        + ", ".join(
            f"{a}/{t} {b}-bit {c}{margin.get((a, t, b), '')}" for (a, t, b), c in chosen.items()
        )
        + (
            f"; {ties} of {len(margins)} choices are ties there, not resolved"
            if len(margins)
            else ""
        )
    )


def gap_findings(tidy: pd.DataFrame, shown: int = 3, fits: float = -0.2) -> list[str]:
    """Why the QAT-trained generators lose on a new run (`gap_table`): the `shown` largest falls of
    Gen − target from the trained-on checkpoints to the held-out run, each with its code error and
    worst layer on both splits and how far the new run's inputs lie; then what the numbers point
    to, decided by them: a generator that fits its training split (Gen − target above `fits`) and
    loses on inputs farther than run A's held-out ones is short of training inputs like the new
    run's."""
    splits = _qat_gap_splits(tidy)
    if splits is None:
        return []
    a, b, ckpt = splits
    fall = (a.gen_minus_target - b.gen_minus_target).sort_values(ascending=False)
    lines = []
    for key in fall.index[:shown]:
        arch, task, variant, bits = key
        lines.append(
            f"{arch}/{task} {bits}-bit {variant} on QAT targets: Gen − QAT "
            f"{a.gen_minus_target[key]:+.2f} on its trained-on checkpoints, "
            f"{b.gen_minus_target[key]:+.2f} on the held-out run; code error "
            f"{a.code_err[key]:.3f} -> {b.code_err[key]:.3f} steps (worst layer "
            f"{a.worst_layer[key]} {a.worst_layer_err[key]:.2f} -> {b.worst_layer[key]} "
            f"{b.worst_layer_err[key]:.2f}); the held-out run's inputs "
            f"{b.input_shift[key]:.1f} training spacings from the nearest training checkpoint, "
            f"run A's held-out ones {ckpt[key]:.1f}"
        )
    rise = (b.code_err - a.code_err).corr(fall)
    lines.append(
        f"Across the {len(fall)} QAT-trained generators, the fall in Gen − QAT correlates "
        f"{rise:.2f} with the rise in code error from the trained-on checkpoints to the held-out "
        "run"
    )
    return lines + [_gap_verdict(a, b, ckpt, fall.index[0], fits)]


def _qat_gap_splits(tidy: pd.DataFrame):
    """`gap_table`'s QAT-trained generators on the trained-on checkpoints, on the held-out run,
    and run A's held-out checkpoints' input shift; None when there are none."""
    wide = tidy.pivot_table(
        index=["arch", "task", "source", "variant", "bits", "split"],
        columns="metric",
        values="value",
        aggfunc="first",
    )
    worst = tidy.groupby(["arch", "task", "source", "variant", "bits", "split"]).worst_layer.first()
    wide = wide.join(worst).reset_index()
    qat = wide[wide.source == "qat"].set_index(["arch", "task", "variant", "bits", "split"])
    if qat.empty:
        return None
    trained, held = qat.xs("trained", level="split"), qat.xs(HELD, level="split")
    return trained, held, qat.xs("heldout_ckpt", level="split").input_shift


def _gap_verdict(a, b, ckpt, key, fits: float) -> str:
    """What the largest fall (`key`) points to, decided by its numbers: short of training inputs,
    short of capacity or steps, or not explained by input shift."""
    far = b.input_shift[key] > 2 * ckpt[key]
    fitted = a.gen_minus_target[key] > fits
    grew = b.code_err[key] > a.code_err[key]
    if fitted and far and grew:
        return (
            "What the numbers point to, for the largest fall: the generator fits its trained-on "
            "checkpoints, its codes move away from the target on the new run, and that run's "
            "inputs lie farther from the training checkpoints than run A's held-out ones: it is "
            "short of training inputs like the new run's (two remedies measured against it, more "
            "runs in run A and more steps: CHANGELOG, issue 31)"
        )
    if not fitted:
        return (
            "What the numbers point to, for the largest fall: the generator does not fit its "
            f"trained-on checkpoints either (Gen − QAT below {fits}): capacity or steps first"
        )
    return (
        "What the numbers point to, for the largest fall: the new run's inputs are no "
        "farther than run A's held-out ones (or the codes do not move away): the fall is "
        "not explained by input shift; the per-layer errors below say where it is"
    )


def ablation_findings(tidy: pd.DataFrame, factor: str) -> list[str]:
    """One ablation on the held-out run, per bit-width: each variant's Gen − PTQ with its claim."""
    diffs = tidy[(tidy.method == "gen-ptq") & (tidy.split == HELD)]
    return [
        f"{factor.replace('_', ' ')}, {int(bits)}-bit, Gen − PTQ: "
        + "; ".join(f"{r.variant} {said(r)}" for _, r in g.iterrows())
        for bits, g in diffs.groupby("bits", sort=False)
    ]


def binary_findings(tidy: pd.DataFrame) -> list[str]:
    """RPG's unseen binary tasks: mean accuracy of each kind of model over the tasks, and on how
    many tasks RPG's samples beat the floor and the nearest seen task."""
    means = tidy[tidy.metric == "mean"].pivot_table(
        index=["arch", "embedding"], columns="kind", values="value"
    )
    lines = [
        f"Unseen binary tasks ({len(means)}), mean accuracy: "
        + ", ".join(f"{k} {v:.2f} %" for k, v in means.mean().items())
    ]
    for other in ("majority class", "nearest seen"):
        if other in means:
            above = int((means.generated > means[other]).sum())
            lines.append(f"RPG's samples above {other} on {above} of {len(means)} tasks")
    return lines


def size_findings(sizes: pd.DataFrame) -> list[str]:
    """How much smaller each bit-width's group-wise PTQ file is than FP32, per architecture."""
    ptq = sizes[(sizes.method == "ptq") & (sizes.granularity == "group")]
    ratio = ptq.groupby(["bits", "arch"]).fp32_over_file.mean().unstack()
    return [
        f"{int(b)}-bit group-wise files: "
        + ", ".join(f"{a} 1/{r:.2f}" for a, r in row.items())
        + " of FP32"
        for b, row in ratio.iterrows()
    ]


def runtime_findings(rows: pd.DataFrame) -> list[str]:
    """The packed runtime against the simulated model (equal top-1, largest logit difference) and
    against FP32 (resident weight memory and forward time, range over the models and specs)."""
    same = (rows.accuracy_runtime == rows.accuracy_simulated).sum()
    return [
        f"Top-1 of the packed runtime equals the simulated model's on {same} of {len(rows)} files; "
        f"largest logit difference {rows.max_logit_diff.max():.1e}",
        f"Resident weights {rows.memory_vs_fp32.min():.2f} to {rows.memory_vs_fp32.max():.2f} of "
        f"FP32; forward time {rows.time_vs_fp32.min():.2f} to {rows.time_vs_fp32.max():.2f} of "
        f"FP32 (median {rows.time_vs_fp32.median():.2f}; batch {int(rows.batch.iloc[0])}, "
        f"{rows.device.iloc[0]}; {int((rows.time_vs_fp32 > 1).sum())} of {len(rows)} slower "
        "than FP32: each layer is dequantized for every call)",
    ]


def headline(tidy: pd.DataFrame) -> pd.DataFrame:
    """Table 1's Gen − PTQ on the held-out run, one row per (arch, task), one column per group-wise
    bit-width: mean and verdict, e.g. `+0.06 (tie)`."""
    d = tidy[(tidy.method == "gen-ptq") & (tidy.split == HELD) & (tidy.granularity == "group")]
    d = d.assign(
        cell=[f"{v:+.2f} ({w})" for v, w in zip(d.value, verdicts(d))],
        model=d.arch + " / " + d.task,
    )
    wide = d.pivot_table(index="model", columns="bits", values="cell", aggfunc="first")
    wide = wide[sorted(wide.columns, reverse=True)]
    return wide.rename(columns=lambda b: f"{b}-bit").reset_index()
