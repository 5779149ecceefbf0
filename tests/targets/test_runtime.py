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
    assert all(m.layer.weight is None and m.packed.dtype == torch.uint8 for m in layers)
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
