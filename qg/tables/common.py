"""What every table shares: method labels and order, paired differences and their 95 % intervals,
the Markdown notes that name the profile and its generator, training-loss curves.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from scipy import stats

from .. import methods
from ..config.schema import Profile
from ..core.report import GROUP_KEYS, SPLIT_LABELS, markdown
from ..study.settings import SPLITS, VALIDATION


def paired_difference(runs: pd.DataFrame, a: str = "gen", b: str = "ptq") -> pd.DataFrame:
    """Per-checkpoint accuracy of method `a` minus method `b` (same checkpoint, same spec) as method
    `a-b`."""
    keys = [k for k in GROUP_KEYS if k != "method"] + ["checkpoint"]
    wide = runs.pivot_table(index=keys, columns="method", values="accuracy").reset_index()
    wide = wide.dropna(subset=[a, b])
    out = wide[keys].copy()
    out["method"], out["accuracy"] = f"{a}-{b}", wide[a] - wide[b]
    return out


def interval(mean: float, std: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The `level` confidence interval of a mean of `n` paired differences with this std."""
    if n < 2 or not math.isfinite(std):
        return (math.nan, math.nan)
    half = stats.t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return (mean - half, mean + half)


def verdict(mean: float, std: float, n: int) -> str:
    """`win` (the interval above 0), `loss` (below) or `tie` (it covers 0, or n < 2)."""
    lo, hi = interval(mean, std, n)
    return "win" if lo > 0 else "loss" if hi < 0 else "tie"


def claim(mean: float, std: float, n: int) -> str:
    """A paired difference as the README states it: `+0.06 (95 % CI −0.10 to +0.22, n = 10;
    tie)`."""
    lo, hi = interval(mean, std, n)
    ci = f"95 % CI {lo:+.2f} to {hi:+.2f}, " if math.isfinite(lo) else ""
    return f"{mean:+.2f} ({ci}n = {int(n)}; {verdict(mean, std, n)})"


def verdicts(diffs: pd.DataFrame) -> pd.Series:
    """`verdict` of each row with value, std and n."""
    return pd.Series(
        [verdict(*r) for r in zip(diffs.value, diffs["std"], diffs.n)], index=diffs.index
    )


def tally(diffs: pd.DataFrame) -> str:
    """`3 wins, 10 ties, 3 losses` over rows with value, std and n."""
    counts = verdicts(diffs)
    plural = {"win": "wins", "tie": "ties", "loss": "losses"}
    return ", ".join(
        f"{k} {v if k == 1 else plural[v]}" for v in plural for k in [int((counts == v).sum())]
    )


def said(r: pd.Series) -> str:
    """The claim of one tidy row."""
    return claim(r.value, r["std"], r.n)


def where(r) -> str:
    """A table cell's name: `vit/head 3-bit group`."""
    return f"{r.arch}/{r.task} {int(r.bits)}-bit {r.granularity}"


def extremes(diffs: pd.DataFrame) -> str:
    """The lowest and the highest cell, each with its claim."""
    lo, hi = diffs.loc[diffs.value.idxmin()], diffs.loc[diffs.value.idxmax()]
    return f"lowest {where(lo)} {said(lo)}, highest {where(hi)} {said(hi)}"


def generator_differences(runs: pd.DataFrame) -> pd.DataFrame:
    """`paired_difference` against PTQ of every generator method in `runs` (`qg.methods`), each
    labelled with its generator's `variant` as `Setting.generator_for` sets it (what
    `Experiment.diagnose` tags its rows with)."""
    generators = [methods.get(m) for m in methods.names("generator") if m in set(runs.method)]
    return pd.concat(
        [
            paired_difference(runs, g.name).assign(**({"variant": g.variant} if g.variant else {}))
            for g in generators
        ],
        ignore_index=True,
    )


# splits (reading order: the validation run before the held-out run), then methods, as rows run
ORDER = {k: i for i, k in enumerate([*SPLIT_LABELS, *methods.order()])}


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by task, architecture, split (trained-on first) and method (FP32, PTQ, QAT, Gen,
    Gen − PTQ)."""
    keys = [k for k in ("task", "arch", "split", "condition", "method") if k in df]
    return df.sort_values(
        keys,
        key=lambda s: s.map(lambda v: ORDER.get(v, v)) if s.name in ("split", "method") else s,
        kind="stable",
    )


def spec_label(df: pd.DataFrame) -> pd.Series:
    """`w4 group`, `w8 channel`: a spec as the size, QwT and runtime tables name their columns or
    rows."""
    return "w" + df.bits.astype(str) + " " + df.granularity


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "method" in df:
        df["method"] = df["method"].map(methods.label)
    if "split" in df:
        df["split"] = df["split"].map(lambda s: SPLIT_LABELS.get(s, s))
    return df


def generator_note(profile: Profile) -> str:
    """Which generator `Gen` is in a profile's tables: the paper's head, or ours (skip / log-S
    tokens)."""
    skip, log_scale = profile.generator.skip, profile.tokenizer.log_scale
    if skip == "none" and not log_scale:
        return "Gen: the paper's generator (MSE head, linear S tokens)."
    return (
        f"Gen: our generator (head `skip: {skip}`{', log-S tokens' if log_scale else ''}; "
        "the paper's is `skip: none` with linear S tokens, compared in 02_train's convergence "
        "study); the paper's rows are its own generator."
    )


def profile_markdown(df: pd.DataFrame, title: str, profile: Profile, notes: list[str]) -> str:
    """A results table as Markdown, its notes, which generator it shows, the profile and the
    splits (the reported ones, and the validation run where the table has it)."""
    with_validation = SPLIT_LABELS[VALIDATION] in set(df.get("split", []))
    splits = [*SPLITS, VALIDATION] if with_validation else SPLITS
    return markdown(
        df,
        title,
        [
            *notes,
            generator_note(profile),
            f"Profile `{profile.name}`; splits: "
            + "; ".join(SPLIT_LABELS[s] for s in splits)
            + ".",
        ],
    )


def loss_curves(
    curves: dict[str, pd.DataFrame],
    title: str,
    ax=None,
    legend_max: int = 12,
    groups: dict[str, str] | None = None,
):
    """Smoothed training loss of each generator (label -> loss.csv frame), log scale, on `ax` or a
    new figure, one legend entry per line; beyond `legend_max` lines, each line takes the colour
    of its group (`groups`: label -> e.g. "vit/head") and the legend names the groups. Returns the
    figure."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    by_group = len(curves) > legend_max and groups is not None
    names = sorted({groups[label] for label in curves}) if by_group else []
    colour = dict(zip(names, sns.color_palette(n_colors=len(names))))
    for label, curve in curves.items():
        style = {"color": colour[groups[label]], "alpha": 0.6} if by_group else {"label": label}
        ax.plot(curve.step, curve.loss.rolling(10, min_periods=1).mean(), lw=1.2, **style)
    ax.set(title=title, xlabel="step", ylabel="training loss (smoothed)", yscale="log")
    ax.grid(alpha=0.3)
    if by_group:
        handles = [Line2D([], [], color=colour[n], label=n) for n in names]
        ax.legend(handles=handles, fontsize=7, title=f"{len(curves)} generators")
    elif len(curves) <= legend_max:
        ax.legend(fontsize=7)
    return ax.figure
