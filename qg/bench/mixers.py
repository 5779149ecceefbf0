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


def _mixer_parts(mixer: Mamba2, u: torch.Tensor) -> dict:
    """Each stage of the Mamba-2 mixer's PyTorch path as a function of fresh leaf inputs of the
    shapes it sees inside the block (so each stage's backward stops at its own inputs)."""
    b, length, _ = u.shape
    z0, x0, z, xBC, dt = (t.detach().requires_grad_() for t in mixer._in_proj(u))
    x, B, C = (t.detach().requires_grad_() for t in mixer._heads(mixer._conv(xBC)))
    y = torch.randn(b, length, mixer.d_ssm, requires_grad=True)
    return {
        "in_proj": lambda: mixer._in_proj(u),
        "causal conv + silu": lambda: mixer._conv(xBC),
        "SSD scan": lambda: mixer._torch_scan(
            x, dt, -torch.exp(mixer.A_log.float()), B, C, mixer._D(), None
        ),
        "gated RMSNorm": lambda: mixer.norm(y, z),
        "out_proj": lambda: mixer._out(z0, x0, y),
    }


def _backward(out) -> None:
    outs = out if isinstance(out, (list, tuple)) else [out]
    torch.autograd.backward([o.sum() for o in outs])


def bench_parts(lengths, batch, d_model, repeats, device, top_ops: int = 8) -> list[dict]:
    """Where the Mamba-2 block's time and saved memory go (CPU): forward + backward seconds and
    saved MB of each stage of its mixer, and torch.profiler's top operators (self time per step)
    over the whole block."""
    if not device.startswith("cpu"):
        return []
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        block = _block("mamba2", d_model)
        u = torch.randn(batch, length, d_model, requires_grad=True)
        parts = _mixer_parts(block.mixer, u)
        parts["whole block"] = lambda: block(u)  # noqa: B023
        for name, fn in parts.items():
            mb, out = saved_activation_mb(fn)
            _backward(out)
            seconds = median_seconds(lambda: _backward(fn()), repeats)  # noqa: B023
            rows.append(_part_row("parts", name, length, seconds, mb))
        with torch.profiler.profile() as prof:
            for _ in range(repeats):
                _backward(block(u))
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top_ops]
        rows += [
            _part_row("ops", e.key, length, e.self_cpu_time_total / 1e6 / repeats, float("nan"))
            for e in ops
        ]
    return rows


def _part_row(bench: str, case: str, length: int, seconds: float, mb: float) -> dict:
    return {"bench": bench, "case": case, "length": length, "seconds": seconds, "peak_mb": mb}


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


PARTS_TITLES = {
    "parts": "Mamba-2 block by stage, forward + backward",
    "ops": "Mamba-2 block's top operators, self time per forward + backward",
}


def _parts_table(df: pd.DataFrame, bench: str) -> pd.DataFrame:
    """Seconds of each stage (or operator) per length, each as a share of the whole block's, and
    (stages) the MB each saves for its backward."""
    part = df[df.bench == bench]
    whole = df[(df.bench == "parts") & (df.case == "whole block")].set_index("length").seconds
    seconds = part.pivot_table(index="case", columns="length", values="seconds", sort=False)
    tables = {"seconds": seconds, "share of block": seconds / whole}
    if bench == "parts":
        tables["saved MB"] = part.pivot_table(
            index="case", columns="length", values="peak_mb", sort=False
        )
    return pd.concat(tables, axis=1)


def backbone_summary(df: pd.DataFrame) -> str:
    """The README's backbone block, from a bench CSV's `backbone` (and `parts`) rows: each block's
    forward + backward seconds and saved MB per length, as a ratio to Mamba-2's, and where
    Mamba-2's time goes."""
    bb = df[df.bench == "backbone"]
    t = bb.pivot_table(index="case", columns="length", values=["seconds", "peak_mb"], sort=False)
    rows = []
    for case in t.index:
        row = {"block": case, "params": int(bb[bb.case == case].params.iloc[0])}
        for n in t.columns.levels[1]:
            s, mb = t.loc[case, ("seconds", n)], t.loc[case, ("peak_mb", n)]
            row[f"s @{n}"] = f"{s:.3f} ({s / t.loc['mamba2', ('seconds', n)]:.2f}x)"
            row[f"saved MB @{n}"] = f"{mb:.1f} ({mb / t.loc['mamba2', ('peak_mb', n)]:.2f}x)"
        rows.append(row)
    first = bb.iloc[0]
    mamba, attention = t.loc["mamba2", "seconds"], t.loc["transformer", "seconds"]
    versus = "; ".join(
        f"at {n} tokens Mamba-2 takes {mamba[n] / attention[n]:.2f}x attention's time"
        for n in mamba.index
    )
    text = (
        f"One generator block, forward + backward (d_model {int(first.d_model)}, batch "
        f"{int(first.batch)}, {first.device}, commit {first.commit}): {versus}. In brackets, the "
        "ratio to Mamba-2's.\n\n" + pd.DataFrame(rows).to_markdown(index=False)
    )
    parts = df[df.bench == "parts"]
    if len(parts):
        shares = _parts_table(df, "parts")["share of block"].drop("whole block")
        text += (
            "\n\nShare of Mamba-2's time by stage, each stage timed alone on its own inputs: "
            + (
                "; ".join(
                    f"at {n} tokens "
                    + ", ".join(
                        f"{k} {v:.0%}" for k, v in shares[n].sort_values(ascending=False).items()
                    )
                    for n in shares.columns
                )
                + "."
            )
        )
    return text


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
    for bench, title in PARTS_TITLES.items():
        if (df.bench == bench).any():
            print(f"{title}\n", _parts_table(df, bench).round(3).to_string(), "\n")
    if (df.bench == "kernels").any():
        print(
            "\nPyTorch path vs mamba-ssm kernels\n",
            df[df.bench == "kernels"].dropna(axis=1, how="all").to_string(index=False),
        )
