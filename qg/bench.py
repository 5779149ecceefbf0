"""Speed and memory of the generator's sequence mixers, printed as figures from one run.

    python -m qg.bench [--sections scan backbone kernels runtime paper-shapes]
                       [--lengths 256 1024 4096]
                       [--d-model 128] [--profile cpu] [--device cpu|cuda] [--out FILE.csv]

Three comparisons of the generator, each at every sequence length, one of the quantized models,
and what the paper profile's generators would cost:
  scan      the chunked SSD scan (what Mamba-2 runs) against the plain sequential recurrence of the
            same math, forward + backward, on the same inputs;
  backbone  one generator block (pre-norm residual mixer) with Mamba-2, LSTM or causal
            self-attention at the same width: forward + backward time, peak memory and parameter
            count;
  kernels   (CUDA with mamba-ssm only) qg's PyTorch Mamba-2 path against mamba-ssm's kernels on the
            same weights: time and the largest output / gradient differences, float32 and bf16;
  runtime   each target model of `--profile` (seeded random weights: size and speed do not depend on
            training), PTQ group-wise at every bit-width 2..8, and timm's ViT-Tiny/Small/Base at
            224 px (`--real-sizes`) at 4-bit groups of 64 and 8-bit channels, loaded packed
            (`qg.targets.runtime`) with every layer dequantized per call and with fused kernels
            where one exists: resident weight bytes and seconds per batch of each
            `--runtime-batch` against FP32, and the seconds PTQ and HQQ take to quantize our
            models (09_real_files measures the trained models, Gen included).
  paper-shapes  each generator of the `paper` profile built on the meta device: parameters,
            training state, saved activations per sample and memory per GPU under DDP and FSDP
            at 1 and 8 GPUs (estimates from shapes; the README's table is this output).
Ratios are taken within one run on one machine; absolute times depend on the machine and its load.
Memory: on CUDA the allocator's peak during a step; on CPU the bytes autograd saves for the backward
pass (the part of training memory that grows with sequence length).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch

from .config.profiles import load_profile
from .generator.mamba2 import Mamba2, kernels_available, ssd_scan, ssd_sequential
from .generator.memory import saved_activation_mb
from .generator.model import Block, Generator, GeneratorConfig
from .quant.baselines import quantize_model
from .quant.quantizer import QuantSpec
from .targets.models import ModelSpec, build_model, state_dict_of
from .targets.runtime import (
    QuantizedLayer,
    latency,
    median_seconds,
    quantized_model,
    weight_bytes,
)

SECTIONS = ("scan", "backbone", "kernels", "runtime", "paper-shapes")


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


def _block_step(backbone, batch, length, d_model, repeats, device) -> dict:
    """Time and memory of one forward + backward of a generator block."""
    torch.manual_seed(0)
    block = _block(backbone, d_model).to(device)
    x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
    step = lambda: block(x).sum().backward()  # noqa: E731
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = median_seconds(step, repeats, device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak, out = saved_activation_mb(lambda: block(x))
        out.sum().backward()
        seconds = median_seconds(step, repeats, device)
    return {
        "bench": "backbone",
        "case": backbone,
        "length": length,
        "seconds": seconds,
        "peak_mb": peak,
        "params": sum(p.numel() for p in block.parameters()),
    }


def bench_backbones(lengths, batch, d_model, repeats, device) -> list[dict]:
    return [
        _block_step(b, batch, n, d_model, repeats, device)
        for n in lengths
        for b in ("mamba2", "lstm", "transformer")
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


# timm's ViTs at the paper's sizes (random weights: latency and memory depend on the shapes only)
REAL_SIZES = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
PATHS = {False: "dequantize", True: "kernel"}  # `quantized_model(kernels=...)`


def _runtime_targets(profile_name: str, real_sizes) -> list[tuple[str, ModelSpec, list, bool]]:
    """(name, model, specs, time the quantizers?) for the runtime section: each target model of
    the profile at every group-wise bit-width 2..8, and each of `real_sizes` at the specs a
    deployment would pick (4-bit groups of 64 and 8-bit channels), where timing HQQ is skipped."""
    profile = load_profile(profile_name)
    ours = [
        (
            name,
            ModelSpec.from_dict(profile.set_in("archs", name)),
            [profile.quant.spec(b, "group") for b in range(2, 9)],
            True,
        )
        for name in profile.archs
    ]
    deployed = [QuantSpec(4, "group", 64), QuantSpec(8, "channel")]
    return ours + [(n, ModelSpec(n), deployed, False) for n in real_sizes]


def bench_runtime(profile_name: str, batches, repeats: int, real_sizes=REAL_SIZES) -> list[dict]:
    """Quantized models kept packed against FP32, each layer either dequantized per call or on a
    fused kernel (`qg.targets.runtime.kernel_for`): forward seconds per batch and resident weight
    bytes, per model, spec and batch size (CPU)."""
    rows = []
    for name, model_spec, specs, time_quantizers in _runtime_targets(profile_name, real_sizes):
        torch.manual_seed(0)
        fp = build_model(model_spec).eval()
        sd = state_dict_of(fp)
        inputs = {
            b: torch.randn(
                b, model_spec.kwargs.get("in_chans", 3), model_spec.img_size, model_spec.img_size
            )
            for b in batches
        }
        base = {"bench": "runtime", "arch": name, "profile": profile_name, "device": _cpu()}
        rows += [
            {
                **base,
                "runtime_batch": b,
                "case": "fp32",
                "bits": 32,
                "seconds": latency(fp, x, repeats),
                "weight_bytes": weight_bytes(fp),
            }
            for b, x in inputs.items()
        ]
        for spec in specs:
            made, seconds = {}, {}
            for method in ("ptq", "hqq") if time_quantizers else ("ptq",):
                start = time.perf_counter()
                made[method] = quantize_model(sd, spec, method)[0]
                seconds[f"{method}_seconds"] = time.perf_counter() - start
            for kernels, path in PATHS.items():
                packed = quantized_model(copy.deepcopy(fp), made["ptq"], kernels)
                layers = [m for m in packed.modules() if isinstance(m, QuantizedLayer)]
                on_kernel = sum(m.kernel != "dequantize" for m in layers) / len(layers)
                rows += [
                    {
                        **base,
                        "runtime_batch": b,
                        "case": f"{path} {spec.name}",
                        "path": path,
                        "bits": spec.bits,
                        "granularity": spec.granularity,
                        "layers_on_kernel": on_kernel,
                        "seconds": latency(packed, x, repeats),
                        "weight_bytes": weight_bytes(packed),
                        **seconds,
                    }
                    for b, x in inputs.items()
                ]
    return rows


def _meta_generator(profile, arch: str):
    """The generator the profile trains for `arch` (its tokens laid out over the timm model's
    quantized weights), built on PyTorch's meta device: shapes without memory or compute."""
    from .generator.layout import Layout
    from .quant.quantizer import is_quantized_weight

    token_size = {**profile.set_in("tokenizer"), **profile.set_in("archs", arch, "tokenizer")}
    token_size = token_size.get("token_size", profile.tokenizer.token_size)
    generator = {**profile.set_in("generator"), **profile.set_in("archs", arch, "generator")}
    with torch.device("meta"):
        target = build_model(ModelSpec.from_dict(profile.set_in("archs", arch)))
    shapes = [
        (n, tuple(p.shape)) for n, p in target.state_dict().items() if is_quantized_weight(n, p)
    ]
    layout = Layout(shapes, [profile.quant.spec(8, "group")], token_size)
    cfg = GeneratorConfig(token_size=token_size, n_tokens=layout.n_tokens, **generator)
    with torch.device("meta"):
        return Generator(cfg, layout.positions().to("meta")), layout


def bench_paper_shapes(profile_name: str = "paper", gpus=(1, 8)) -> list[dict]:
    """What training the profile's generators costs, from their shapes alone (meta device, nothing
    allocated): parameters, the bytes of weights + gradients + AdamW's two moments (float32), the
    activations autograd saves for one training sample (counted by `saved_activation_mb` on a meta
    forward), and the memory per GPU with the profile's batch split over `gpus` under DDP (every
    rank holds the whole state) and FSDP (the state sharded, plus one block gathered at a time).
    Estimates from shapes, not measurements: allocator overhead, temporary buffers and the
    backward pass's own peaks come on top."""
    profile = load_profile(profile_name)
    rows = []
    for arch in profile.archs:
        model, layout = _meta_generator(profile, arch)
        params = sum(p.numel() for p in model.parameters())
        block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        sample = torch.zeros(1, layout.n_tokens, layout.token_size, device="meta")
        activation = saved_activation_mb(lambda: model(sample, sample, base=sample))[0] * 2**20
        state = 16 * params  # float32 weights, gradients, AdamW's exp_avg and exp_avg_sq
        for n in gpus:
            per_gpu = -(-profile.train.batch_size // n)
            gathered = 4 * block if n > 1 else 0  # FSDP: one block's float32 weights at a time
            for strategy, held in (("ddp", state), ("fsdp", state / n + gathered)):
                rows.append(
                    {
                        "bench": "paper-shapes",
                        "profile": profile.name,
                        "arch": profile.set_in("archs", arch)["arch"],
                        "token_size": layout.token_size,
                        "n_tokens": layout.n_tokens,
                        "params": params,
                        "state_gb": state / 2**30,
                        "activation_gb_per_sample": activation / 2**30,
                        "gpus": n,
                        "strategy": strategy,
                        "samples_per_gpu": per_gpu,
                        "memory_gb_per_gpu": (held + per_gpu * activation) / 2**30,
                    }
                )
    return rows


def paper_shapes_table(rows: pd.DataFrame) -> str:
    """`bench_paper_shapes`'s rows as the README's Markdown table: one row per generator, the
    memory per GPU by strategy and GPU count."""
    wide = rows.pivot_table(
        index=["arch", "token_size", "n_tokens", "params", "state_gb", "activation_gb_per_sample"],
        columns=["strategy", "gpus"],
        values="memory_gb_per_gpu",
    )
    wide.columns = [f"GiB/GPU, {s.upper()} x{n}" for s, n in wide.columns]
    wide = wide.reset_index().assign(params=lambda d: (d.params / 1e6).round(0).astype(int))
    wide = wide.rename(
        columns={
            "arch": "target model",
            "token_size": "token",
            "n_tokens": "tokens",
            "params": "generator params (M)",
            "state_gb": "weights+grads+AdamW (GiB)",
            "activation_gb_per_sample": "activations per sample (GiB)",
        }
    )
    return wide.round(1).to_markdown(index=False)


def _cpu() -> str:
    return f"cpu ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


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


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        default=list(REAL_SIZES),
        help="timm models timed beside the profile's in the runtime section (none: only ours)",
    )
    p.add_argument("--out", help="CSV file to write the rows to")
    args = p.parse_args(argv)
    common = (args.lengths, args.batch, args.d_model, args.repeats, args.device)
    rows = []
    if "scan" in args.sections:
        rows += bench_scan(*common)
    if "backbone" in args.sections:
        rows += bench_backbones(*common)
    if "kernels" in args.sections and args.device.startswith("cuda") and kernels_available():
        rows += bench_kernels(*common)
    if "paper-shapes" in args.sections:
        rows += bench_paper_shapes()
    if "runtime" in args.sections:
        rows += bench_runtime(args.profile, args.runtime_batch, args.repeats, args.real_sizes)
    df = pd.DataFrame(rows).assign(commit=_commit())
    # the runtime section has its own device (CPU) and batch; paper-shapes none
    generator_rows = df.bench.isin(["scan", "backbone", "kernels"])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu()
    df.loc[generator_rows, ["device", "d_model", "batch"]] = [device, args.d_model, args.batch]
    _report(df)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
    return df


def _report(df: pd.DataFrame) -> None:
    pd.set_option("display.width", 160)
    if (df.bench == "scan").any():
        scan = df[df.bench == "scan"].pivot(index="length", columns="case", values="seconds")
        scan["sequential / chunked"] = (
            scan["sequential recurrence"] / scan["chunked SSD (chunk 64)"]
        )
        print("SSD scan, forward + backward seconds\n", scan.round(4), "\n")
    bb = df[df.bench == "backbone"]
    for value in ("seconds", "peak_mb") if len(bb) else ():
        t = bb.pivot(index="length", columns="case", values=value)
        for other in ("lstm", "transformer"):
            t[f"{other} / mamba2"] = t[other] / t["mamba2"]
        print(f"Generator block ({value}), forward + backward\n", t.round(3), "\n")
    if len(bb):
        print("parameters per block:", bb.groupby("case")["params"].first().to_dict())
    if (df.bench == "runtime").any():
        rt = df[df.bench == "runtime"].copy()
        fp = rt[rt.case == "fp32"].set_index(["arch", "runtime_batch"])
        key = pd.MultiIndex.from_frame(rt[["arch", "runtime_batch"]])
        rt["memory vs fp32"] = rt.weight_bytes.to_numpy() / fp.weight_bytes.reindex(key).to_numpy()
        rt["time vs fp32"] = rt.seconds.to_numpy() / fp.seconds.reindex(key).to_numpy()
        columns = [
            "arch",
            "runtime_batch",
            "case",
            "layers_on_kernel",
            "weight_bytes",
            "memory vs fp32",
            "seconds",
            "time vs fp32",
            "ptq_seconds",
            "hqq_seconds",
        ]
        print(
            "Packed runtime vs FP32 (forward seconds per batch, each layer dequantized per call or "
            "on a fused kernel; quantization seconds)\n",
            rt[[c for c in columns if c in rt]].round(4).to_string(index=False),
            "\n",
        )
    if (df.bench == "paper-shapes").any():
        print(paper_shapes_table(df[df.bench == "paper-shapes"]), "\n")
    if (df.bench == "kernels").any():
        print(
            "\nPyTorch path vs mamba-ssm kernels\n",
            df[df.bench == "kernels"].dropna(axis=1, how="all").to_string(index=False),
        )


if __name__ == "__main__":
    main()
