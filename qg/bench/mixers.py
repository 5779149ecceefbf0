"""The generator's sequence mixers, timed and weighed: the chunked SSD scan against the plain
recurrence, one generator block per backbone, and (CUDA with mamba-ssm) qg's PyTorch Mamba-2
against mamba-ssm's kernels. 06_ablate_backbone runs `bench_backbones` on the profile's sizes."""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.checkpoint import checkpoint

from ..generator.mamba2 import Mamba2, ssd_scan, ssd_sequential
from ..generator.memory import saved_activation_mb
from ..generator.model import Block, GeneratorConfig
from ..targets.runtime import median_seconds


def scan_inputs(batch, length, d_model, device, d_state=128, headdim=64):
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
        inputs = scan_inputs(batch, length, d_model, device)
        for name, fn in (
            ("chunked SSD (chunk 64)", lambda: ssd_scan(*inputs, chunk_size=64)),
            ("sequential recurrence", lambda: ssd_sequential(*inputs)),
        ):
            seconds = median_seconds(lambda: fn().sum().backward(), repeats, device)
            rows.append({"bench": "scan", "case": name, "length": length, "seconds": seconds})
    return rows


def _block(backbone: str, d_model: int) -> Block:
    cfg = GeneratorConfig(token_size=d_model, n_tokens=1, backbone=backbone, chunk_size=64)
    return Block(cfg)


def _block_step(backbone, batch, length, d_model, repeats, device, recompute=False) -> dict:
    """Time and memory of one forward + backward of a generator block (with `recompute`: its
    input kept, the block run again in the backward pass, as `train.recompute` does)."""
    torch.manual_seed(0)
    block = _block(backbone, d_model).to(device)
    x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
    run = (lambda: checkpoint(block, x, use_reentrant=False)) if recompute else (lambda: block(x))
    step = lambda: run().sum().backward()  # noqa: E731
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = median_seconds(step, repeats, device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak, out = saved_activation_mb(run)
        out.sum().backward()
        seconds = median_seconds(step, repeats, device)
    return {
        "bench": "backbone",
        "case": backbone + (" recompute" if recompute else ""),
        "length": length,
        "seconds": seconds,
        "peak_mb": peak,
        "params": sum(p.numel() for p in block.parameters()),
    }


def bench_backbones(lengths, batch, d_model, repeats, device, recompute=False) -> list[dict]:
    """Each backbone's block at each length; with `recompute`, Mamba-2's recomputed too."""
    cases = [(b, False) for b in ("mamba2", "lstm", "transformer")] + [("mamba2", True)] * recompute
    return [
        _block_step(b, batch, n, d_model, repeats, device, r) for n in lengths for b, r in cases
    ]


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
                seconds = median_seconds(lambda: m(xi).float().sum().backward(), repeats, device)
                rows.append(
                    {
                        "bench": "kernels",
                        "case": name,
                        "length": length,
                        "dtype": str(dtype),
                        "seconds": seconds,
                    }
                )
            (ya, ga), (yb, gb) = outs.values()
            rows[-1].update(
                max_abs_out_diff=(ya - yb).abs().max().item(),
                max_abs_grad_diff=(ga - gb).abs().max().item(),
            )
    return rows


def report(df: pd.DataFrame) -> None:
    """Print the scan's and the blocks' tables, each backbone as a ratio to Mamba-2."""
    if (df.bench == "scan").any():
        scan = df[df.bench == "scan"].pivot(index="length", columns="case", values="seconds")
        scan["sequential / chunked"] = (
            scan["sequential recurrence"] / scan["chunked SSD (chunk 64)"]
        )
        print("SSD scan, forward + backward seconds\n", scan.round(4), "\n")
    bb = df[df.bench == "backbone"]
    for value in ("seconds", "peak_mb") if len(bb) else ():
        t = bb.pivot(index="length", columns="case", values=value)
        for other in ("lstm", "transformer", "mamba2 recompute"):
            if other in t:
                t[f"{other} / mamba2"] = t[other] / t["mamba2"]
        print(f"Generator block ({value}), forward + backward\n", t.round(3), "\n")
    if len(bb):
        print("parameters per block:", bb.groupby("case")["params"].first().to_dict())
    if (df.bench == "kernels").any():
        print(
            "\nPyTorch path vs mamba-ssm kernels\n",
            df[df.bench == "kernels"].dropna(axis=1, how="all").to_string(index=False),
        )
