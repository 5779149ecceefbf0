"""The results READMEs are generated from their CSVs: the committed ones are current, and the
statistics they state (paired 95 % intervals, wins / ties / losses) are what they say."""

import io
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from qg import results
from qg.config.profiles import load_profile
from qg.tables import common, findings
from qg.tables.following import following_table

ROOT = Path(__file__).resolve().parents[1]
# the committed ones (results/smoke/ is git-ignored: the tests' own smoke run rewrites it)
COMMITTED = [
    ROOT / p
    for p in subprocess.run(
        ["git", "ls-files", "results/*/README.md"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
]


@pytest.mark.parametrize("path", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_a_committed_results_readme_is_what_its_tables_say(path):
    assert path.read_text() == results.readme(path.parent, path.parent.name), (
        f"{path} is stale: python -m qg.results --profile {path.parent.name}"
    )


def test_the_cpu_results_have_their_readme():
    assert ROOT / "results" / "cpu" / "README.md" in COMMITTED


def test_a_paired_interval_and_its_verdict():
    # t(0.975, 9) = 2.262: half-width 2.262 * 1 / sqrt(10) = 0.715
    lo, hi = common.interval(1.0, 1.0, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.285, 1.715)
    assert common.verdict(1.0, 1.0, 10) == "win"
    assert common.verdict(-1.0, 1.0, 10) == "loss"
    assert common.verdict(0.5, 1.0, 10) == "tie"  # the interval covers 0
    assert common.verdict(3.0, 0.0, 1) == "tie"  # one checkpoint: no interval
    assert common.claim(1.0, 1.0, 10) == "+1.00 (95 % CI +0.28 to +1.72, n = 10; win)"


def test_table1_findings_count_every_cell_once_by_its_interval():
    cells = pd.DataFrame(
        {
            "method": ["gen-ptq"] * 3 + ["gen"],
            "split": ["heldout_run"] * 4,
            "arch": ["vit"] * 4,
            "task": ["full", "full", "head", "full"],
            "bits": [8, 6, 8, 8],
            "granularity": ["group"] * 4,
            "value": [0.5, -1.0, 0.05, 85.0],
            "std": [0.1, 0.2, 0.5, 0.2],
            "n": [10] * 4,
        }
    )
    lines = findings.table1_findings(cells)
    assert lines[0].startswith("Gen − PTQ, held-out run, 6-8 bits: 1 win, 1 tie, 1 loss of 3 cells")
    assert "lowest vit/full 6-bit group -1.00" in lines[0]
    assert lines[-1].startswith("Losses on the held-out run: vit/full 6-bit group -1.00")


def test_the_project_readme_headline_is_generated_from_the_cpu_table1():
    start, end = results.HEADLINE
    readme = (ROOT / "README.md").read_text()
    assert start in readme and end in readme, "README.md lacks the generated headline block"
    block = readme.split(start)[1].split(end)[0].strip()
    assert block == results.headline(ROOT / "results" / "cpu").strip(), (
        "README.md's headline is stale: paste `python -m qg.results --headline`"
    )


def test_following_table_correlates_gen_with_its_targets_accuracy():
    """Gen tracks its target exactly on one cell and is constant on the other: the correlation, the
    cells below 0.9 and the constant count say so, from the table and from its CSV alike."""
    rows = [
        {"arch": "vit", "task": task, "bits": 8, "granularity": "group", "split": "heldout_run",
         "checkpoint": f"c{i}", "source": "ptq", "variant": "", "condition": "", "method": m,
         "accuracy": acc}
        for task, gen in (("full", [80.0, 81.0, 82.0]), ("head", [70.0, 70.0, 70.0]))
        for i, fp in enumerate([80.0, 81.0, 82.5])
        for m, acc in (("fp", fp), ("ptq", fp - 0.5), ("gen", gen[i]))
    ]  # fmt: skip
    tidy, md = following_table(pd.DataFrame(rows), load_profile("smoke"), "abc")
    by = tidy.set_index(["task", "metric"]).value
    assert by["full", "corr_target"] == pytest.approx(0.9934, abs=1e-4)
    assert by["head", "constant"] == 1 and by["full", "constant"] == 0
    assert "corr(Gen, target)" in md
    full, head = findings.following_findings(tidy)
    assert full.startswith("held-out run, full, Gen on PTQ targets: correlation with the target's")
    assert "below 0.9 in 0 of 1 cells" in full
    assert head.endswith("while the target's varies in 1")
    assert findings.following_findings(tidy) == findings.following_findings(
        pd.read_csv(io.StringIO(tidy.to_csv(index=False)))
    )
    # image by image (qg.study.agreement): the constant generator finds its input once of 3
    agree = pd.DataFrame(
        {"split": "heldout_run", "arch": "vit", "task": task, "bits": 8, "granularity": "group",
         "source": "ptq", "variant": "", "n": 3, "agree_own": 99.0, "agree_others": 97.0,
         "targets_agree": 97.5, "closest_target": found, "closest_input": found,
         "target_closest_input": 3}
        for task, found in (("full", 3), ("head", 1))
    )  # fmt: skip
    tidy, md = following_table(pd.DataFrame(rows), load_profile("smoke"), "abc", agreement=agree)
    assert "Gen: own input" in md and "target: own input" in md
    full, head = findings.following_findings(tidy)
    assert "closest to its own FP32 input on 1 of 3 checkpoints, the target's on 3" in head
    assert "closest to its own FP32 input on 3 of 3 checkpoints" in full
    assert head.endswith("in the 1 cell where the target finds its own input on more than half "
                         "the checkpoints (3 of 3), Gen finds its own on 1, and as often as the "
                         "target in 0")  # fmt: skip
    assert full.endswith("Gen finds its own on 3, and as often as the target in 1")
    untold = agree.assign(target_closest_input=1)  # no target finds its input: nothing to judge
    assert findings._image_by_image(untold).endswith("cannot tell whether Gen follows it)")


def test_the_readme_paper_cost_table_is_the_dry_runs_output():
    """The README's paper-shapes table is generated (meta device: a second), never typed."""
    from qg.bench.shapes import bench_paper_shapes, paper_shapes_table

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- paper-shapes: python -m qg.bench --sections paper-shapes -->")[1]
    block = block.split("<!-- end of paper-shapes -->")[0].strip()
    assert block == paper_shapes_table(pd.DataFrame(bench_paper_shapes())), (
        "README.md's paper-shapes table is stale: paste the table of "
        "`python -m qg.bench --sections paper-shapes`"
    )


def test_the_readme_backbone_block_is_the_committed_bench_summarised():
    """The README's backbone costs are `python -m qg.bench --readme results/bench/backbone.csv`,
    never typed."""
    from qg.bench.mixers import backbone_summary

    readme = (ROOT / "README.md").read_text()
    marker = "<!-- backbone: python -m qg.bench --readme results/bench/backbone.csv -->"
    block = readme.split(marker)[1].split("<!-- end of backbone -->")[0].strip()
    assert block == backbone_summary(pd.read_csv(ROOT / "results/bench/backbone.csv")), (
        "README.md's backbone block is stale: paste the output of "
        "`python -m qg.bench --readme results/bench/backbone.csv`"
    )


def test_the_bench_runtime_rows_become_ratios_a_figure_and_findings():
    """09's section on the committed runtime bench: FP32 is 1 against itself, every other ratio is
    its row over FP32's of the same model and batch, four paths at 8-bit channels and three at
    4-bit groups, a figure of two panels, and findings that name each path's ratio."""
    import matplotlib.pyplot as plt

    from qg.tables.files import (
        BENCH_RUNTIME,
        bench_runtime_figure,
        bench_runtime_findings,
        bench_runtime_table,
    )

    bench = pd.read_csv(BENCH_RUNTIME)
    bench = bench[
        bench.arch.isin(["vit", "vit_small_patch16_224"])
        & bench.case.str.fullmatch(r"fp32|\w+ (w4-group64|w8-channel)-sym")
    ]
    ratios = bench_runtime_table(bench)
    fp32 = ratios[ratios.path == "fp32"]
    assert len(fp32) == 4 and (fp32.time_vs_fp32 == 1).all() and (fp32.memory_vs_fp32 == 1).all()
    small = ratios[ratios.model == "ViT-Small"].set_index(["batch", "path", "spec"])
    assert small.real_size.all() and not ratios[ratios.arch == "vit"].real_size.any()
    paths = small.reset_index().groupby("spec").path.nunique()
    assert paths.to_dict() == {"fp32": 1, "w4-group64-sym": 3, "w8-channel-sym": 4}
    row = small.loc[(1, "kernel", "w4-group64-sym")]
    assert row.time_vs_fp32 == pytest.approx(row.seconds / small.loc[(1, "fp32", "fp32")].seconds)
    assert 0.1 < row.memory_vs_fp32 < 0.2  # 4-bit codes + a float32 S per 64: about 4.5 / 32

    fig = bench_runtime_figure(bench)
    try:
        latency, memory = fig.axes
        assert latency.get_yscale() == "log" and memory.get_yscale() == "linear"
        levels = {float(line.get_ydata()[0]) for line in latency.lines if line.get_ls() == "--"}
        assert levels == {1.0, 0.8} and latency.get_title().startswith("latency: 0 of 20 markers")
        drawn = sum(len(line.get_xdata()) for line in memory.lines if line.get_marker() != "None")
        assert drawn == 3 + 3 + 4  # batch 1: vit at 4 bits, ViT-Small at 4 and 8 bits
    finally:
        plt.close(fig)

    found = bench_runtime_findings(ratios)
    line = next(f for f in found if f.startswith("batch 1, 4-bit group-64, time / FP32"))
    assert line.endswith(
        "ViT-Small {:.2f} (dequantize) / {:.2f} (int4 kernel) / {:.2f} (hqq)".format(
            *(
                small.loc[(1, p, "w4-group64-sym")].time_vs_fp32
                for p in ("dequantize", "kernel", "hqq")
            )
        )
    )
    assert any(f.startswith("target time ≤ 0.8x FP32 does not hold: met on 0 of 14") for f in found)
    assert any("4-bit group-64: holds" in f and "8-bit channels: does not hold" in f for f in found)


def test_the_chosen_target_says_how_firmly_the_choice_split_picks_it():
    """Amortized QAT's chosen generator (08): the target with the higher mean on the validation run
    (run C), whatever the held-out run says, and the findings give direct − residual there with
    its interval, so a choice that run does not resolve reads as a tie."""
    from qg.tables.amortized import amortized_table

    def accuracy(i, split, variant, margin):  # direct: `margin` on run C, 1 point worse on run B
        direct = margin if split == "validation_run" else -1.0
        return 80.0 + i % 2 + (direct if variant == "direct" else 0.0)

    rows = [
        {"arch": "vit", "task": task, "bits": 4, "granularity": "group", "split": split,
         "checkpoint": f"c{i}", "method": "gen", "source": "qat", "variant": variant,
         "accuracy": accuracy(i, split, variant, margin)}
        for task, margin in (("full", 1.0), ("head", -0.01))
        for split in ("heldout_run", "validation_run")
        for i in range(4)
        for variant in ("direct", "residual")
    ]  # fmt: skip
    noisy = [r for r in rows if r["task"] == "head" and r["split"] == "validation_run"]
    for i, r in enumerate(noisy):  # the head's margin: -0.01 with a spread across checkpoints
        r["accuracy"] += 0.3 * (-1) ** (i // 2) if r["variant"] == "direct" else 0.0
    tidy, md = amortized_table(pd.DataFrame(rows), load_profile("smoke"), "abc")
    assert "Gen direct (QAT) − Gen residual (QAT)" in md
    assert md.index("| validation run ") < md.index("| held-out run ")  # reading order
    line = findings.amortized_findings(tidy)[-1]
    assert line.startswith("Chosen on the validation run, run C (never on the held-out run): ")
    assert "vit/full 4-bit Gen direct (QAT) (direct − residual +1.00 (" in line
    assert "vit/head 4-bit Gen residual (QAT) (direct − residual -0.01 (" in line
    assert line.endswith("; 1 of 2 choices are ties there, not resolved")


def test_the_held_out_runs_verdicts_are_set_beside_the_validation_runs():
    """The chosen generator's differences on the two new runs (B, where claims are made, and C,
    where the target is chosen): a verdict that changes between them is named with both claims."""

    def row(split, bits, value):
        return {"arch": "vit", "task": "full", "bits": bits, "granularity": "group",
                "split": split, "method": "Gen chosen (QAT) − HQQ", "chosen": "Gen direct (QAT)",
                "metric": "paired_difference", "value": value, "std": 0.1, "n": 10}  # fmt: skip

    tidy = pd.DataFrame(
        [row("heldout_run", 3, 0.5), row("validation_run", 3, 0.4)]
        + [row("heldout_run", 4, -0.5), row("validation_run", 4, 0.0)]
    )
    lines = findings.amortized_findings(tidy)
    (line,) = [x for x in lines if "held-out run against the validation run" in x]
    assert line.startswith("Gen chosen (QAT) − HQQ, the held-out run against the validation run")
    assert "the same verdict in 1 of 2 cells; vit/full 4-bit -0.50 (95 % CI" in line
    assert "loss) on the held-out run, +0.00 (95 % CI" in line and line.endswith("tie) on run C")
