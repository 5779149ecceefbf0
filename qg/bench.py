"""Speed and memory of the generator's sequence mixers, printed as figures from one run.

    python -m qg.bench [--lengths 256 1024 4096] [--d-model 128] [--device cpu|cuda] [--out FILE.csv]

Three comparisons, each at every sequence length:
  scan      the chunked SSD scan (what Mamba-2 runs) against the plain sequential recurrence of the same
            math, forward + backward, on the same inputs;
  backbone  one generator block (pre-norm residual mixer) with Mamba-2, LSTM or causal self-attention at
            the same width: forward + backward time, peak memory and parameter count;
  kernels   (CUDA with mamba-ssm only) qg's PyTorch Mamba-2 path against mamba-ssm's kernels on the same
            weights: time and the largest output / gradient differences, float32 and bf16.
Ratios are taken within one run on one machine; absolute times depend on the machine and its load.
Memory: on CUDA the allocator's peak during a step; on CPU the bytes autograd saves for the backward pass
(the part of training memory that grows with sequence length).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch

from .generator import Block, GeneratorConfig
from .mamba2 import Mamba2, kernels_available, ssd_scan, ssd_sequential
from .train import saved_activation_mb


def _timed(fn, repeats: int, device: str) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _scan_inputs(batch, length, d_model, device, d_state=128, headdim=64):
    nheads = 2 * d_model // headdim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, nheads, headdim, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, nheads, generator=g) - 2)
    A = -torch.rand(nheads, generator=g) * 4 - 1
    B, C = (torch.randn(batch, length, 1, d_state, generator=g) for _ in range(2))
    return [t.to(device).requires_grad_() for t in (x, dt, A, B, C)]


def bench_scan(lengths, batch, d_model, repeats, device) -> list[dict]:
    rows = []
    for length in lengths:
        inputs = _scan_inputs(batch, length, d_model, device)
        for name, fn in (("chunked SSD (chunk 64)", lambda: ssd_scan(*inputs, chunk_size=64)),
                         ("sequential recurrence", lambda: ssd_sequential(*inputs))):
            seconds = _timed(lambda: fn().sum().backward(), repeats, device)
            rows.append({"bench": "scan", "case": name, "length": length, "seconds": seconds})
    return rows


def _block(backbone: str, d_model: int) -> Block:
    cfg = GeneratorConfig(token_size=d_model, n_tokens=1, backbone=backbone, chunk_size=64)
    return Block(cfg)


def _block_step(backbone, batch, length, d_model, repeats, device) -> dict:
    """Time and memory of one forward + backward of a generator block."""
    torch.manual_seed(0)
    block = _block(backbone, d_model).to(device)
    x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
    step = lambda: block(x).sum().backward()  # noqa: E731
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = _timed(step, repeats, device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak, out = saved_activation_mb(lambda: block(x))
        out.sum().backward()
        seconds = _timed(step, repeats, device)
    return {"bench": "backbone", "case": backbone, "length": length, "seconds": seconds, "peak_mb": peak,
            "params": sum(p.numel() for p in block.parameters())}


def bench_backbones(lengths, batch, d_model, repeats, device) -> list[dict]:
    return [_block_step(b, batch, n, d_model, repeats, device) for n in lengths for b in ("mamba2", "lstm", "transformer")]


def bench_kernels(lengths, batch, d_model, repeats, device) -> list[dict]:
    """qg's PyTorch path against mamba-ssm's kernels on the same weights (CUDA + mamba-ssm only)."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for length in lengths:
            torch.manual_seed(0)
            ref = Mamba2(d_model, chunk_size=64, use_kernels=True).to(device)
            torch_path = Mamba2(d_model, chunk_size=64, use_kernels=False).to(device)
            torch_path.load_state_dict(ref.state_dict())
            x = torch.randn(batch, length, d_model, device=device, dtype=dtype)
            outs = {}
            for name, m in (("mamba-ssm kernels", ref), ("qg PyTorch", torch_path)):
                m = m.to(dtype)
                xi = x.clone().requires_grad_()
                y = m(xi)
                y.float().pow(2).mean().backward()
                outs[name] = (y.detach().float(), xi.grad.float())
                seconds = _timed(lambda: m(xi).float().sum().backward(), repeats, device)
                rows.append({"bench": "kernels", "case": name, "length": length, "dtype": str(dtype), "seconds": seconds})
            (ya, ga), (yb, gb) = outs.values()
            rows[-1].update(max_abs_out_diff=(ya - yb).abs().max().item(), max_abs_grad_diff=(ga - gb).abs().max().item())
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="CSV file to write the rows to")
    args = p.parse_args(argv)
    common = (args.lengths, args.batch, args.d_model, args.repeats, args.device)
    rows = bench_scan(*common) + bench_backbones(*common)
    if args.device.startswith("cuda") and kernels_available():
        rows += bench_kernels(*common)
    df = pd.DataFrame(rows).assign(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else
                                   f"cpu ({os.cpu_count()} cores)", commit=_commit(), d_model=args.d_model, batch=args.batch)
    _report(df)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
    return df


def _report(df: pd.DataFrame) -> None:
    pd.set_option("display.width", 160)
    scan = df[df.bench == "scan"].pivot(index="length", columns="case", values="seconds")
    scan["sequential / chunked"] = scan["sequential recurrence"] / scan["chunked SSD (chunk 64)"]
    print("SSD scan, forward + backward seconds\n", scan.round(4), "\n")
    bb = df[df.bench == "backbone"]
    for value in ("seconds", "peak_mb"):
        t = bb.pivot(index="length", columns="case", values=value)
        for other in ("lstm", "transformer"):
            t[f"{other} / mamba2"] = t[other] / t["mamba2"]
        print(f"Generator block ({value}), forward + backward\n", t.round(3), "\n")
    print("parameters per block:", bb.groupby("case")["params"].first().to_dict())
    if (df.bench == "kernels").any():
        print("\nPyTorch path vs mamba-ssm kernels\n", df[df.bench == "kernels"].dropna(axis=1, how="all").to_string(index=False))


if __name__ == "__main__":
    main()
