import pytest
import torch
from fakes import TINY_MIXER, TINY_VIT, checkpoints

from qg.quant.fileformat import save_quantized
from qg.quant.quantizer import QuantSpec, dequantize_state_dict, quantize_state_dict
from qg.targets.models import build_model, load_weights
from qg.targets.runtime import (
    QuantizedLayer,
    latency,
    load_runtime,
    max_logit_difference,
    weight_bytes,
)


@pytest.mark.parametrize("model_spec", [TINY_VIT, TINY_MIXER], ids=lambda m: m.arch)
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(3, "group", 16),
        QuantSpec(4, "channel", scheme="asymmetric"),
        QuantSpec(7, "group", 64, "asymmetric"),
    ],
    ids=lambda s: s.name,
)
def test_runtime_matches_the_simulated_model_and_keeps_weights_packed(tmp_path, model_spec, spec):
    sd = checkpoints(model_spec, 1)[0]
    qsd = quantize_state_dict(sd, spec)
    save_quantized(tmp_path / "m.safetensors", qsd, spec, {"model": model_spec.to_dict()})
    runtime, spec2, _ = load_runtime(tmp_path / "m.safetensors")
    simulated = load_weights(build_model(model_spec), dequantize_state_dict(qsd))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert spec2 == spec and max_logit_difference(runtime, simulated, x) < 1e-4
    layers = [m for m in runtime.modules() if isinstance(m, QuantizedLayer)]
    # every Linear and the Conv2d patch embedding
    assert len(layers) == sum(1 for v in qsd.values() if hasattr(v, "codes"))
    assert all(m.layer.weight is None for m in layers)
    assert all(m.packed.dtype == torch.uint8 for m in layers if m.kernel != "int8")
    assert weight_bytes(runtime) < weight_bytes(simulated) * (spec.bits + 16) / 32 + 4 * sum(
        v.numel() for v in qsd.values() if not hasattr(v, "codes")
    )
    assert latency(runtime, x, repeats=1) > 0


def test_packed_layers_run_version_1_files():
    from pathlib import Path

    from qg.quant.fileformat import read_quantized
    from qg.targets.runtime import quantized_model

    fixture = Path(__file__).parents[1] / "fixtures" / "v1_w5-channel-asy.safetensors"
    qsd = read_quantized(fixture)[0]
    linear = torch.nn.Linear(49, 6)
    model = torch.nn.Sequential()
    model.add_module("fc", linear)
    with torch.no_grad():
        linear.bias.copy_(qsd["fc.bias"])
    quantized_model(model, qsd)
    x = torch.randn(3, 49)
    expected = x @ dequantize_state_dict(qsd)["fc.weight"].T + qsd["fc.bias"]
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    "spec, kernel",
    [
        (QuantSpec(4, "group", 64), "int4"),
        (QuantSpec(4, "group", 32, "asymmetric"), "int4"),
        (QuantSpec(3, "group", 128), "int4"),
        (QuantSpec(2, "group", 256, "asymmetric"), "int4"),
        (QuantSpec(8, "channel"), "int8"),
        (QuantSpec(5, "channel", scheme="asymmetric"), "int8"),
        (QuantSpec(4, "group", 16), "dequantize"),  # a group size the int4 kernel lacks
        (QuantSpec(4, "group", 96), "dequantize"),  # 96 is not one of its sizes
        (QuantSpec(6, "group", 64), "dequantize"),  # more than 4 bits in groups
    ],
    ids=lambda v: v.name if isinstance(v, QuantSpec) else v,
)
def test_each_kernel_path_computes_the_dequantized_layer(spec, kernel):
    """A Linear of 256 inputs and 32 outputs (every int4 group size tiles it) on each
    computation `kernel_for` picks: the float layer's outputs on the dequantized weight, in any
    batch shape, up to the kernels' bfloat16 rounding of inputs and scales (the dequantize path:
    up to float summation order), and the same weight read back."""
    from qg.quant.quantizer import dequantize, quantize
    from qg.targets.runtime import kernel_for

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 256, generator=g) * 0.1)
        linear.bias.copy_(torch.randn(32, generator=g))
    q = quantize(linear.weight.detach(), spec)
    expected_w, bias = dequantize(q), linear.bias.detach().clone()
    assert kernel_for(linear, q) == kernel
    layer = QuantizedLayer(linear, q, kernels=True)
    assert layer.kernel == kernel
    x = torch.randn(2, 5, 256, generator=g)
    expected = x @ expected_w.T + bias
    tol = 1e-5 if kernel == "dequantize" else 1e-2  # bfloat16: 8 bits of mantissa
    scale = float(expected.abs().max())
    torch.testing.assert_close(layer(x), expected, rtol=tol, atol=tol * scale)
    w_scale = float(expected_w.abs().max())
    torch.testing.assert_close(layer.dequantized_weight(), expected_w, rtol=tol, atol=tol * w_scale)


def test_kernels_are_opt_in_and_agree_with_the_dequantize_path(tmp_path):
    """`load_runtime` dequantizes per call unless asked for kernels; with them, a model whose
    Linear layers take the int4 kernel gives the same logits up to bfloat16 rounding."""
    spec = QuantSpec(4, "group", 32)
    sd = checkpoints(TINY_VIT, 1)[0]
    qsd = quantize_state_dict(sd, spec)
    save_quantized(tmp_path / "m.safetensors", qsd, spec, {"model": TINY_VIT.to_dict()})
    plain = load_runtime(tmp_path / "m.safetensors")[0]
    fused = load_runtime(tmp_path / "m.safetensors", kernels=True)[0]
    assert {m.kernel for m in plain.modules() if isinstance(m, QuantizedLayer)} == {"dequantize"}
    kinds = [m.kernel for m in fused.modules() if isinstance(m, QuantizedLayer)]
    assert "int4" in kinds, kinds
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scale = float(plain(x).abs().max())
    assert max_logit_difference(fused, plain, x) < 3e-2 * scale


def test_a_layer_the_int4_kernel_cannot_take_is_dequantized():
    """aten's int4 CPU kernel needs a multiple of 16 output rows: a 10-class head stays on the
    dequantize path."""
    from qg.quant.quantizer import quantize
    from qg.targets.runtime import kernel_for

    head = torch.nn.Linear(64, 10)
    assert (
        kernel_for(head, quantize(head.weight.detach(), QuantSpec(4, "group", 64))) == "dequantize"
    )
