"""Quantized models kept packed (`qg.targets.runtime`) against FP32 on the CPU: resident weight
bytes and forward seconds per batch, every layer dequantized per call or on a fused kernel, for
the profile's target models and timm's ViTs at the paper's sizes; and the seconds PTQ and HQQ
take to quantize. 09_real_files measures the trained models, Gen included."""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ..config.profiles import load_profile
from ..quant.baselines import quantize_model
from ..quant.fileformat import save_quantized
from ..quant.quantizer import QTensor, QuantSpec, dequantize_state_dict
from ..targets.export import TORCHAO_SPEC, export_hqq, load_hqq, torchao_int8
from ..targets.models import ModelSpec, build_model, state_dict_of
from ..targets.runtime import QuantizedLayer, latency, quantized_model, weight_bytes

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


def cpu_name() -> str:
    """The machine the CPU rows ran on, as the CSV's `device` column."""
    return f"cpu ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


def _inputs(model_spec: ModelSpec, batches) -> dict[int, torch.Tensor]:
    """One random batch of images per batch size."""
    channels = model_spec.kwargs.get("in_chans", 3)
    return {b: torch.randn(b, channels, model_spec.img_size, model_spec.img_size) for b in batches}


def hqq_model(model_spec: ModelSpec, qsd: dict, spec: QuantSpec):
    """The quantized model in hqq's own `HQQLinear` layers (through `export_hqq`, so hqq's code
    runs the forward pass), and the share of quantized layers it holds (others are float32)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "ours.safetensors", Path(tmp) / "hqq.safetensors"
        save_quantized(src, qsd, spec, {"model": model_spec.to_dict()})
        written = export_hqq(src, dst)
        return load_hqq(dst), sum(w == "HQQLinear" for w in written.values()) / len(written)


def _packed_models(fp, model_spec, qsd, spec) -> dict[str, tuple]:
    """PTQ's codes as each runtime holds them: ours with every layer dequantized per call, ours on
    fused kernels where one exists, hqq's `HQQLinear` where hqq takes the bits, and torchao's
    `Int8Tensor` at 8-bit channels; each with the share of quantized layers on that path (on a
    kernel, in an `HQQLinear`, in an `Int8Tensor`)."""
    models = {}
    for kernels, path in PATHS.items():
        packed = quantized_model(copy.deepcopy(fp), qsd, kernels)
        layers = [m for m in packed.modules() if isinstance(m, QuantizedLayer)]
        models[path] = packed, sum(m.kernel != "dequantize" for m in layers) / len(layers)
    model, share = hqq_model(model_spec, qsd, spec)
    if share:  # else every layer is float32: hqq does not take these bits
        models["hqq"] = model, share
    if spec == TORCHAO_SPEC:
        simulated = copy.deepcopy(fp)
        simulated.load_state_dict(dequantize_state_dict(qsd))
        model = torchao_int8(simulated, qsd)
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        models["torchao"] = model, len(linear) / sum(isinstance(q, QTensor) for q in qsd.values())
    return models


def _quantized_rows(fp, model_spec, spec, inputs, time_quantizers, repeats) -> list[dict]:
    """One spec: PTQ's codes (and HQQ's, to time it), packed once per path, timed per batch."""
    made, seconds = {}, {}
    for method in ("ptq", "hqq") if time_quantizers else ("ptq",):
        start = time.perf_counter()
        made[method] = quantize_model(state_dict_of(fp), spec, method)[0]
        seconds[f"{method}_seconds"] = time.perf_counter() - start
    rows = []
    for path, (packed, share) in _packed_models(fp, model_spec, made["ptq"], spec).items():
        rows += [
            {
                "runtime_batch": b,
                "case": f"{path} {spec.name}",
                "path": path,
                "bits": spec.bits,
                "granularity": spec.granularity,
                "layers_on_path": share,
                "seconds": latency(packed, x, repeats),
                "weight_bytes": weight_bytes(packed),
                **seconds,
            }
            for b, x in inputs.items()
        ]
    return rows


def bench_runtime(profile_name: str, batches, repeats: int, real_sizes=REAL_SIZES) -> list[dict]:
    """Quantized models kept packed against FP32, each layer either dequantized per call or on a
    fused kernel (`qg.targets.runtime.kernel_for`), and the same codes in hqq's `HQQLinear`:
    forward seconds per batch and resident weight bytes, per model, spec and batch size (CPU)."""
    rows = []
    for name, model_spec, specs, time_quantizers in _runtime_targets(profile_name, real_sizes):
        torch.manual_seed(0)
        fp = build_model(model_spec).eval()
        inputs = _inputs(model_spec, batches)
        base = {"bench": "runtime", "arch": name, "profile": profile_name, "device": cpu_name()}
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
            rows += [
                {**base, **row}
                for row in _quantized_rows(fp, model_spec, spec, inputs, time_quantizers, repeats)
            ]
    return rows


def report(df: pd.DataFrame) -> None:
    """Print each packed model's bytes and seconds as ratios to its FP32 at the same batch."""
    rt = df[df.bench == "runtime"].copy()
    if rt.empty:
        return
    fp = rt[rt.case == "fp32"].set_index(["arch", "runtime_batch"])
    key = pd.MultiIndex.from_frame(rt[["arch", "runtime_batch"]])
    rt["memory vs fp32"] = rt.weight_bytes.to_numpy() / fp.weight_bytes.reindex(key).to_numpy()
    rt["time vs fp32"] = rt.seconds.to_numpy() / fp.seconds.reindex(key).to_numpy()
    columns = [
        "arch",
        "runtime_batch",
        "case",
        "layers_on_path",
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
