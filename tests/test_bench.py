"""The benchmark's command line runs every CPU section at toy sizes and prints its ratios."""

import json

import pandas as pd
import pytest
import torch

from qg.bench import gpu
from qg.bench.__main__ import main


def test_the_mixer_sections_time_every_backbone_and_both_scans(capsys):
    df = main(
        ["--sections", "scan", "backbone", "--lengths", "64", "--d-model", "64"]
        + ["--repeats", "1"]
    )
    assert set(df[df.bench == "scan"].case) == {"chunked SSD (chunk 64)", "sequential recurrence"}
    blocks = df[df.bench == "backbone"]
    assert set(blocks.case) == {"mamba2", "lstm", "transformer", "mamba2 recompute"}
    assert (blocks.seconds > 0).all() and (blocks.peak_mb > 0).all() and (blocks.params > 0).all()
    assert (df.d_model == 64).all() and df.device.str.startswith("cpu").all()
    printed = capsys.readouterr().out
    assert "sequential / chunked" in printed and "lstm / mamba2" in printed


def test_the_parts_section_splits_the_mamba2_block_into_stages_and_operators(capsys):
    df = main(["--sections", "parts", "--lengths", "64", "--d-model", "64", "--repeats", "1"])
    parts = df[df.bench == "parts"].set_index("case")
    stages = ["in_proj", "causal conv + silu", "SSD scan", "gated RMSNorm", "out_proj"]
    assert list(parts.index) == stages + ["whole block"]
    assert (parts.seconds > 0).all() and (parts.peak_mb > 0).all()
    # the block saves what its stages save, the pre-norm's input and output aside
    assert parts.peak_mb[stages].sum() <= parts.peak_mb["whole block"] * 1.5
    ops = df[df.bench == "ops"]
    assert len(ops) == 8 and ops.case.str.startswith("aten::").all() and (ops.seconds > 0).all()
    printed = capsys.readouterr().out
    assert (
        "Mamba-2 block by stage" in printed
        and "share of block" in printed
        and "SSD scan" in printed
    )


def test_the_runtime_section_packs_every_bit_width_of_the_profile(tmp_path, capsys):
    out = tmp_path / "runtime.csv"
    args = ["--sections", "runtime", "--profile", "smoke", "--real-sizes", "--runtime-batch", "1"]
    main(args + ["--repeats", "1", "--out", str(out)])
    rows = pd.read_csv(out)
    packed = rows[rows.case != "fp32"]
    assert set(packed.bits) == set(range(2, 9)) and set(packed.path) == {
        "dequantize",
        "kernel",
        "hqq",
    }
    assert set(packed[packed.path == "hqq"].bits) == {2, 3, 4, 5, 6, 8}  # hqq 0.2.8 has no 7 bits
    fp = rows[rows.case == "fp32"].set_index("arch").weight_bytes
    assert (packed.weight_bytes < packed.arch.map(fp)).all()  # packed codes are smaller
    assert packed.ptq_seconds.notna().all() and packed.hqq_seconds.notna().all()
    assert "memory vs fp32" in capsys.readouterr().out


def test_the_gpu_check_runs_its_parts_on_the_cpu(tmp_path):
    """`make gpu-check`'s code at toy sizes: the references are the sequential recurrence and qg's
    Mamba2 at another chunk size; the generator trains on fake checkpoints of the smoke profile."""
    found = gpu.main(
        ["--device", "cpu", "--profile", "smoke", "--arch", "vit", "--steps", "4"]
        + ["--speed-steps", "1", "--lengths", "64", "--out", str(tmp_path)]
    )
    assert len(found["agreement"]) == 4 and all(r["ok"] for r in found["agreement"])
    assert {r["backbone"] for r in found["speed"]} == {"mamba2", "lstm", "transformer"}
    assert all(r["steps_per_second"] > 0 for r in found["speed"])
    paper = found["paper"]
    assert paper["steps"] == 4 and paper["last_loss"] < paper["first_loss"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["paper"] == paper
    assert (
        "Agreement with the reference: all within tolerance"
        in (tmp_path / "gpu_check.md").read_text()
    )


def test_the_gpu_check_says_what_it_needs_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu.main(["--out", str(tmp_path)])
