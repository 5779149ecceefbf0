"""The one GPU check, `make gpu-check`: what a CUDA machine can tell us in a few minutes.

    python -m qg.bench.gpu --out results/gpu [--profile paper] [--arch vit_tiny] [--steps 50]

  agreement  qg's SSD scan against mamba-ssm's `mamba_chunk_scan_combined`, and qg's `Mamba2` module
             against mamba-ssm's `Mamba2` on the same weights (forward and input gradients), in
             float32 and bf16: the largest difference relative to the reference's largest value must
             stay within 1e-4 (float32) and 1e-2 (bf16);
  speed      training steps per second (forward, backward, AdamW) of the profile's generator for
             `--arch` with each backbone (Mamba-2, LSTM, attention) at the profile's token count;
  paper      `--steps` training steps of that generator on fake data: seeded perturbations of a
             random-init timm model of `--arch` as the checkpoints, their 8-bit PTQ as the targets,
             tokenized as the profile says: seconds per step, peak memory, first and last loss.
It writes `gpu_check.json` (every number, the machine, the versions) and `gpu_check.md` (the
report). mamba-ssm's Triton path is enough (a wheel built with MAMBA_SKIP_CUDA_BUILD=TRUE; see the
Makefile's `gpu-wheels`). Without CUDA the same code runs at small sizes in the tests, with the
sequential recurrence and a second chunk size as the references.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import types
from pathlib import Path

import pandas as pd
import torch

from ..config.blocks import TokenizerBlock
from ..config.profiles import load_profile
from ..core.io import write_json
from ..generator.mamba2 import Mamba2, ssd_scan, ssd_sequential
from ..generator.model import GeneratorConfig
from ..generator.pairs import TokenPairs
from ..generator.tokenizer import Tokenizer
from ..generator.train import TrainConfig, fit_generator
from ..quant.baselines import quantize_model
from ..targets.models import ModelSpec, build_model, state_dict_of
from .mixers import scan_inputs
from .shapes import arch_config, arch_generator

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # max |ours - ref| / max |ref|
BACKBONES = ("mamba2", "lstm", "transformer")


def mamba_ssm():
    """mamba-ssm's Mamba2 module and chunked scan, and why not when it does not import. Its package
    imports Mamba-1's compiled `selective_scan_cuda` unguarded; a Triton-only build
    (MAMBA_SKIP_CUDA_BUILD=TRUE) lacks it, and Mamba-2 never calls it, so an empty module stands
    in for it."""
    try:
        importlib.import_module("mamba_ssm")
    except ImportError as err:
        if "selective_scan_cuda" not in str(err):
            return None, f"{type(err).__name__}: {err}"
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        try:
            importlib.import_module("mamba_ssm")
        except ImportError as again:
            return None, f"{type(again).__name__}: {again}"
    from mamba_ssm.modules.mamba2 import Mamba2 as Reference
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return types.SimpleNamespace(Mamba2=Reference, scan=mamba_chunk_scan_combined), None


def _compare(ours: list[torch.Tensor], ref: list[torch.Tensor], dtype) -> dict:
    """The largest difference of each pair relative to the reference's largest magnitude."""
    rel = max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        for a, b in zip(ours, ref)
    )
    return {"max_rel_diff": rel, "tolerance": TOLERANCE[dtype], "ok": rel <= TOLERANCE[dtype]}


def _run(fn, inputs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """`fn`'s output and the gradients of its inputs (of a fixed random projection of it)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    (out.float() * weight).sum().backward()
    return [out.detach(), *(t.grad for t in inputs)]


def _in_float32(scan):
    """`scan` computed in float32 whatever its inputs' dtype, as qg's `Mamba2` runs it."""
    return lambda *inputs: scan(*(t.float() for t in inputs))


def scan_agreement(length: int, dtype, device: str, reference=None, d_model: int = 128) -> dict:
    """qg's chunked scan (in float32, as its `Mamba2` runs it) against `reference` (mamba-ssm's
    kernel on the `dtype` inputs; the sequential recurrence when None) on the same inputs: output
    and the gradients of x, dt, B and C."""
    x, dt, A, B, C = scan_inputs(1, length, d_model, device)
    x, dt, B, C = (t.detach().to(dtype) for t in (x, dt, B, C))
    A, reference = A.detach(), reference or _in_float32(ssd_sequential)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    scan = _in_float32(lambda *t: ssd_scan(*t, chunk_size=64))
    ours = _run(lambda x, dt, B, C: scan(x, dt, A, B, C), [x, dt, B, C], weight)
    ref = _run(lambda x, dt, B, C: reference(x, dt, A, B, C), [x, dt, B, C], weight)
    return {
        "check": "ssd scan",
        "length": length,
        "dtype": str(dtype),
        **_compare(ours, ref, dtype),
    }


def module_agreement(length: int, dtype, device: str, reference=None, d_model: int = 128) -> dict:
    """qg's `Mamba2` (PyTorch path) against `reference` (mamba-ssm's `Mamba2`; qg's own at another
    chunk size when None) with the reference's weights loaded strictly: output and input
    gradient."""
    torch.manual_seed(0)
    if reference is None:
        ref = Mamba2(d_model, chunk_size=16, use_kernels=False)
    else:  # no causal-conv1d needed: the module's unfused path
        ref = reference(d_model, chunk_size=64, use_mem_eff_path=False)
    ref = ref.to(device, dtype)
    ours = Mamba2(d_model, chunk_size=64, use_kernels=False).to(device, dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, length, d_model, generator=torch.Generator().manual_seed(2))
    x = x.to(device, dtype)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    got = _compare(_run(ours, [x], weight), _run(ref, [x], weight), dtype)
    return {"check": "Mamba2 module", "length": length, "dtype": str(dtype), **got}


def agreement(lengths, device: str) -> list[dict]:
    """Both checks at every length in float32 and bf16, against mamba-ssm where it imports."""
    kernels, why = mamba_ssm() if device.startswith("cuda") else (None, "no CUDA device")
    if device.startswith("cuda") and kernels is None:
        print(
            f"[qg] warning: mamba-ssm did not import ({why}); Mamba-2 is checked against qg's own "
            "references only. Make its wheels with `make gpu-wheels`",
            file=sys.stderr,
        )
    scan = kernels and (lambda x, dt, A, B, C: kernels.scan(x, dt, A, B, C, chunk_size=64))
    rows = []
    for dtype in TOLERANCE:
        for n in lengths:
            rows.append(
                scan_agreement(n, dtype, device, scan)
                | {"reference": "mamba-ssm" if kernels else "sequential recurrence"}
            )
            rows.append(
                module_agreement(n, dtype, device, kernels and kernels.Mamba2)
                | {"reference": "mamba-ssm" if kernels else "qg, chunk 16"}
            )
    return rows


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _seconds_per_step(model, x: torch.Tensor, device: str, steps: int) -> float:
    """Mean seconds of a training step (forward, backward, AdamW) after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model(x, x, base=x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel choice
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def generator_speed(profile, arch: str, device: str, steps: int = 5) -> list[dict]:
    """Training steps per second of `arch`'s generator with each backbone, batch 1, random tokens
    (speed does not depend on their values)."""
    rows = []
    for backbone in BACKBONES:
        torch.manual_seed(0)
        model, layout = arch_generator(profile, arch, device="cpu", backbone=backbone)
        x = torch.randn(1, layout.n_tokens, layout.token_size, device=device)
        seconds = _seconds_per_step(model.to(device), x, device, steps)
        rows.append(
            {
                "arch": arch,
                "backbone": backbone,
                "n_tokens": layout.n_tokens,
                "token_size": layout.token_size,
                "params": sum(p.numel() for p in model.parameters()),
                "steps_per_second": 1 / seconds,
            }
        )
    return rows


def fake_checkpoints(spec: ModelSpec, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`n` checkpoints of one model: a seeded random init plus small seeded perturbations."""
    torch.manual_seed(seed)
    base = state_dict_of(build_model(spec))
    g = torch.Generator().manual_seed(seed + 1)
    return [
        {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)
    ]


def paper_steps(profile, arch: str, device: str, steps: int = 50, n: int = 4) -> dict:
    """`steps` training steps of the profile's generator for `arch` on fake checkpoints and their
    8-bit PTQ targets, through the same tokenizer, pairs and training loop as 02_train."""
    fps = fake_checkpoints(ModelSpec.from_dict(profile.set_in("archs", arch)), n, profile.seed)
    spec = profile.quant.spec(8, "group")
    targets = {spec: [quantize_model(sd, spec, "ptq")[0] for sd in fps]}
    tok = TokenizerBlock(**arch_config(profile, arch, "tokenizer"))
    tokenizer = Tokenizer.fit(
        fps, targets, tok.token_size, tok.padding, profile.seed, tok.log_scale, tok.target, tok.base
    )
    train = arch_config(profile, arch, "train")
    warmup = min(train.get("warmup", 0), steps // 10)
    cfg = TrainConfig(seed=profile.seed, **{**train, "steps": steps, "warmup": warmup})
    data = TokenPairs.build(tokenizer, fps, targets, loss_weighting=cfg.loss_weighting)
    gen_cfg = GeneratorConfig(
        token_size=tokenizer.shape[1],
        n_tokens=tokenizer.shape[0],
        conditions=data.conditions,
        target=tokenizer.target,
        **arch_config(profile, arch, "generator"),
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as out:
        record = fit_generator(tokenizer, data, gen_cfg, cfg, out, device=device).record
        losses = pd.read_csv(Path(out) / "loss.csv").loss
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return {
        "arch": arch,
        "steps": steps,
        "checkpoints": n,
        "n_tokens": tokenizer.shape[0],
        "token_size": tokenizer.shape[1],
        "params": record["n_params"],
        "seconds_per_step": record["train_seconds"] / steps,
        # one device, the profile's batch: what its whole training would take at this speed
        "hours_at_profile_steps": record["train_seconds"] / steps * profile.train.steps / 3600,
        "peak_gib": peak,
        "first_loss": float(losses.iloc[0]),
        "last_loss": float(losses.iloc[-1]),
    }


def _machine(device: str) -> dict:
    """What ran the check: the device, torch, triton and mamba-ssm versions."""
    versions = {"torch": torch.__version__}
    for name in ("triton", "mamba_ssm"):
        module = sys.modules.get(name)
        versions[name] = getattr(module, "__version__", None)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"device": name, **versions}


def report(found: dict) -> str:
    """The JSON's numbers as a short Markdown report."""
    ok = all(r["ok"] for r in found["agreement"])
    parts = [
        f"# GPU check ({found['machine']['device']}, profile `{found['profile']}`)",
        f"Versions: {found['machine']}",
        f"## Agreement with the reference: {'all within tolerance' if ok else 'FAILED'}",
        pd.DataFrame(found["agreement"]).to_markdown(index=False),
        "## Generator training steps per second, by backbone (batch 1)",
        pd.DataFrame(found["speed"]).to_markdown(index=False),
        f"## {found['paper']['steps']} steps of the profile's generator on fake checkpoints",
        pd.DataFrame([found["paper"]]).to_markdown(index=False),
    ]
    return "\n\n".join(parts) + "\n"


def run(profile_name: str, arch: str, device: str, lengths, steps: int, speed_steps: int) -> dict:
    """Every part of the check; the dictionary `gpu_check.json` holds."""
    profile = load_profile(profile_name)
    found = {"profile": profile.name, "agreement": agreement(lengths, device)}
    found["speed"] = generator_speed(profile, arch, device, speed_steps)
    found["paper"] = paper_steps(profile, arch, device, steps)
    found["machine"] = _machine(device)
    return found


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m qg.bench.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/gpu", help="folder for gpu_check.json and .md")
    p.add_argument("--profile", default="paper")
    p.add_argument("--arch", default="vit_tiny", help="an entry of the profile's archs")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--speed-steps", type=int, default=5)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "qg.bench.gpu: no CUDA device here. make gpu-check needs one; its parts run on the "
            "CPU in the tests (tests/test_bench.py), or pass --device cpu --profile smoke"
        )
    found = run(args.profile, args.arch, args.device, args.lengths, args.steps, args.speed_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", found)
    (out / "gpu_check.md").write_text(report(found))
    print(report(found))
    if not all(r["ok"] for r in found["agreement"]):
        sys.exit("qg.bench.gpu: qg's Mamba-2 disagrees with the reference (see the table above)")
    return found


if __name__ == "__main__":
    main()
