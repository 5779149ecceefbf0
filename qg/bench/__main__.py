"""Speed and memory of the generator and of the quantized models, printed as figures from one run.

    python -m qg.bench [--sections scan backbone parts kernels runtime paper-shapes]
                       [--lengths 256 1024 4096]
                       [--d-model 128] [--profile cpu] [--device cpu|cuda] [--out FILE.csv]

  scan      the chunked SSD scan (what Mamba-2 runs) against the plain sequential recurrence of the
            same math, forward + backward, on the same inputs, at every `--lengths`;
  backbone  one generator block (pre-norm residual mixer) with Mamba-2, LSTM or causal
            self-attention at the same width: forward + backward time, peak memory and parameter
            count;
  parts     (CPU) where the Mamba-2 block's time and memory go: forward + backward seconds and
            saved MB of each stage of its mixer (in_proj, causal conv, SSD scan, gated RMSNorm,
            out_proj) on the shapes it sees in the block, and torch.profiler's top operators;
  kernels   (CUDA with mamba-ssm only) qg's PyTorch Mamba-2 path against mamba-ssm's kernels on the
            same weights: time and the largest output / gradient differences, float32 and bf16;
  runtime   each target model of `--profile` (seeded random weights: size and speed do not depend on
            training), PTQ group-wise at every bit-width 2..8, and timm's ViT-Tiny/Small/Base at
            224 px (`--real-sizes`) at 4-bit groups of 64 and 8-bit channels, loaded packed
            (`qg.targets.runtime`) with every layer dequantized per call and with fused kernels
            where one exists: resident weight bytes and seconds per batch of each
            `--runtime-batch` against FP32, and the seconds PTQ and HQQ take to quantize our
            models (09_real_files measures the trained models, Gen included);
  paper-shapes  each generator of the `paper` profile built on the meta device: parameters,
            training state, saved activations per sample and memory per GPU under DDP and FSDP
            at 1 and 8 GPUs (estimates from shapes; the README's table is this output).
Ratios are taken within one run on one machine; absolute times depend on the machine and its load.
Memory: on CUDA the allocator's peak during a step; on CPU the bytes autograd saves for the backward
pass (the part of training memory that grows with sequence length).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pandas as pd
import torch

from ..generator.mamba2 import kernels_available
from . import mixers, runtime, shapes

SECTIONS = ("scan", "backbone", "parts", "kernels", "runtime", "paper-shapes")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qg.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument(
        "--profile",
        default="cpu",
        help="the runtime section's target models (params/<profile>.yaml)",
    )
    p.add_argument(
        "--runtime-batch",
        type=int,
        nargs="+",
        default=[1, 32],
        help="images per forward pass in the runtime section (each)",
    )
    p.add_argument(
        "--real-sizes",
        nargs="*",
        default=list(runtime.REAL_SIZES),
        help="timm models timed beside the profile's in the runtime section (none: only ours)",
    )
    p.add_argument("--out", help="CSV file to write the rows to")
    p.add_argument(
        "--readme",
        metavar="CSV",
        help="run nothing: print the README's backbone block from a bench CSV's rows",
    )
    return p


def _rows(args) -> pd.DataFrame:
    """Every chosen section's rows, the generator's labelled with their device, width and batch."""
    common = (args.lengths, args.batch, args.d_model, args.repeats, args.device)
    rows = []
    if "scan" in args.sections:
        rows += mixers.bench_scan(*common)
    if "backbone" in args.sections:
        rows += mixers.bench_backbones(*common, recompute=True)
    if "parts" in args.sections:
        rows += mixers.bench_parts(*common)
    if "kernels" in args.sections and args.device.startswith("cuda") and kernels_available():
        rows += mixers.bench_kernels(*common)
    if "paper-shapes" in args.sections:
        rows += shapes.bench_paper_shapes()
    if "runtime" in args.sections:
        rows += runtime.bench_runtime(
            args.profile, args.runtime_batch, args.repeats, args.real_sizes
        )
    df = pd.DataFrame(rows).assign(commit=_commit())
    # the runtime section has its own device (CPU) and batch; paper-shapes none
    generator_rows = df.bench.isin(["scan", "backbone", "parts", "ops", "kernels"])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else runtime.cpu_name()
    df.loc[generator_rows, ["device", "d_model", "batch"]] = [device, args.d_model, args.batch]
    return df


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = _parser().parse_args(argv)
    if args.readme:
        df = pd.read_csv(args.readme)
        print(mixers.backbone_summary(df))
        return df
    df = _rows(args)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", None)
    mixers.report(df)
    runtime.report(df)
    if (df.bench == "paper-shapes").any():
        print(shapes.paper_shapes_table(df[df.bench == "paper-shapes"]), "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
    return df


if __name__ == "__main__":
    main()
