"""The data-free baselines: valid codes in the shared file format, and the error ordering they exist
for."""

import pytest
import torch

from qg.quant.baselines import QUANTIZERS, quantize_model
from qg.quant.fileformat import load_quantized, save_quantized
from qg.quant.quantizer import QuantSpec, dequantize


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 100, generator=g) * 0.05
    w[0, 0] = 0.6  # an outlier, where clipping and zero points matter
    return {"layer.weight": w, "layer.bias": torch.zeros(32)}


@pytest.mark.parametrize("bits", [3, 4, 7, 8])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_every_method_gives_valid_codes_and_round_trips_through_a_file(bits, granularity, tmp_path):
    sd = weights()
    for method in QUANTIZERS:
        qsd, spec = quantize_model(sd, QuantSpec(bits, granularity, 16), method)
        q = qsd["layer.weight"]
        assert (
            q.codes.dtype == torch.int8
            and spec.qmin <= q.codes.min()
            and q.codes.max() <= spec.qmax
        )
        assert (q.scale > 0).all() and torch.equal(qsd["layer.bias"], sd["layer.bias"])
        save_quantized(tmp_path / f"{method}.safetensors", qsd, spec)
        back, spec_back, _ = load_quantized(tmp_path / f"{method}.safetensors")
        assert spec_back == spec and torch.allclose(back["layer.weight"], dequantize(q))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_stronger_baselines_have_lower_weight_error_than_plain_rtn(bits):
    w = weights()["layer.weight"]

    def error(m):
        q = quantize_model({"w.weight": w}, QuantSpec(bits, "channel"), m)[0]["w.weight"]
        return float(((dequantize(q) - w) ** 2).mean())

    err = {m: error(m) for m in QUANTIZERS}
    assert err["mse-clip"] <= err["ptq"] + 1e-12  # ratio 1.0 is among the candidates
    assert err["hqq"] < err["ptq"] and err["rtn-asym"] < err["ptq"]


def test_unknown_method_and_nan_weights_are_refused():
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_model(weights(), QuantSpec(4, "group"), "gptq")
    bad = weights()
    bad["layer.weight"][3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(bad, QuantSpec(4, "group"), "hqq")
