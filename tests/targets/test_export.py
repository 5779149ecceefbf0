"""Our quantized files in hqq's and torchao's layouts (`qg.targets.export`): hqq's own HQQLinear
and torchao's Int8Tensor hold them and compute what our simulated model computes."""

import pytest
import torch
from fakes import TINY_MIXER, TINY_VIT, checkpoints

from qg.quant.fileformat import save_quantized
from qg.quant.quantizer import QuantSpec, dequantize_state_dict, quantize, quantize_state_dict
from qg.targets.export import TORCHAO_SPEC, export_hqq, hqq_state, load_hqq, torchao_int8
from qg.targets.models import build_model, load_weights
from qg.targets.runtime import max_logit_difference


@pytest.mark.parametrize("model_spec", [TINY_VIT, TINY_MIXER], ids=lambda m: m.arch)
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, "group", 16),
        QuantSpec(3, "group", 16, "asymmetric"),
        QuantSpec(2, "group", 32),
        QuantSpec(8, "channel"),
        QuantSpec(5, "channel", scheme="asymmetric"),
    ],
    ids=lambda s: s.name,
)
def test_hqq_loads_the_export_and_computes_our_model(tmp_path, model_spec, spec):
    from hqq.core.quantize import HQQLinear

    qsd = quantize_state_dict(checkpoints(model_spec, 1)[0], spec)
    save_quantized(tmp_path / "m.safetensors", qsd, spec, {"model": model_spec.to_dict()})
    written = export_hqq(tmp_path / "m.safetensors", tmp_path / "hqq.safetensors")
    model = load_hqq(tmp_path / "hqq.safetensors")
    hqq_layers = [m for m in model.modules() if isinstance(m, HQQLinear)]
    assert len(hqq_layers) == list(written.values()).count("HQQLinear") > 0
    conv = [m for m, how in written.items() if how.endswith("hqq quantizes Linear layers only")]
    assert conv == [next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))]
    simulated = load_weights(build_model(model_spec), dequantize_state_dict(qsd))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert max_logit_difference(model, simulated, x) < 1e-4


def test_what_hqq_cannot_hold_is_refused_by_name():
    w = torch.randn(16, 40)
    with pytest.raises(ValueError, match="fc: hqq stores 1-6 and 8 bits, not 7"):
        hqq_state("fc", quantize(w, QuantSpec(7, "group", 8)), None)
    with pytest.raises(ValueError, match="fc: rows of 40 values do not divide into hqq's groups"):
        hqq_state("fc", quantize(w, QuantSpec(4, "group", 16)), None)
    with pytest.raises(ValueError, match="fc: hqq packs 4 groups of 2-bit codes into one byte"):
        hqq_state("fc", quantize(torch.randn(10, 32), QuantSpec(2, "group", 32)), None)


@pytest.mark.parametrize("model_spec", [TINY_VIT, TINY_MIXER], ids=lambda m: m.arch)
def test_torchao_holds_our_8_bit_codes_and_computes_our_model(model_spec):
    """Our 8-bit channel-wise codes and scales, as they are, in torchao's Int8Tensor: its int8
    weight-only kernel computes what our simulated model computes."""
    from torchao.quantization import Int8Tensor

    qsd = quantize_state_dict(checkpoints(model_spec, 1)[0], TORCHAO_SPEC)
    simulated = load_weights(build_model(model_spec), dequantize_state_dict(qsd))
    model = torchao_int8(load_weights(build_model(model_spec), dequantize_state_dict(qsd)), qsd)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(isinstance(m.weight, Int8Tensor) for m in linear)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert max_logit_difference(model, simulated, x) < 1e-4


def test_torchao_is_given_only_its_layout():
    qsd = quantize_state_dict(checkpoints(TINY_VIT, 1)[0], QuantSpec(4, "group", 16))
    with pytest.raises(ValueError, match="torchao's CPU int8 tensors hold w8-channel-sym codes"):
        torchao_int8(build_model(TINY_VIT), qsd)
