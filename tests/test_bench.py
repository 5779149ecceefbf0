"""The benchmark's command line runs every CPU section at toy sizes and prints its ratios."""

import pandas as pd

from qg.bench.__main__ import main


def test_the_mixer_sections_time_every_backbone_and_both_scans(capsys):
    df = main(
        ["--sections", "scan", "backbone", "--lengths", "64", "--d-model", "64"]
        + ["--repeats", "1"]
    )
    assert set(df[df.bench == "scan"].case) == {"chunked SSD (chunk 64)", "sequential recurrence"}
    blocks = df[df.bench == "backbone"]
    assert set(blocks.case) == {"mamba2", "lstm", "transformer"}
    assert (blocks.seconds > 0).all() and (blocks.peak_mb > 0).all() and (blocks.params > 0).all()
    assert (df.d_model == 64).all() and df.device.str.startswith("cpu").all()
    printed = capsys.readouterr().out
    assert "sequential / chunked" in printed and "lstm / mamba2" in printed


def test_the_runtime_section_packs_every_bit_width_of_the_profile(tmp_path, capsys):
    out = tmp_path / "runtime.csv"
    args = ["--sections", "runtime", "--profile", "smoke", "--real-sizes", "--runtime-batch", "1"]
    main(args + ["--repeats", "1", "--out", str(out)])
    rows = pd.read_csv(out)
    packed = rows[rows.case != "fp32"]
    assert set(packed.bits) == set(range(2, 9)) and set(packed.path) == {"dequantize", "kernel"}
    fp = rows[rows.case == "fp32"].set_index("arch").weight_bytes
    assert (packed.weight_bytes < packed.arch.map(fp)).all()  # packed codes are smaller
    assert packed.ptq_seconds.notna().all() and packed.hqq_seconds.notna().all()
    assert "memory vs fp32" in capsys.readouterr().out
