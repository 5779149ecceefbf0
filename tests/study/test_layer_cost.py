"""The `cost` loss weighting: layer costs from the Fisher, and the weights they give the MSE."""

import pytest
import torch
from fakes import TINY_VIT, write_fashion_mnist

from qg.generator.loss import loss_weights
from qg.generator.tokenizer import Tokenizer
from qg.quant.quantizer import QuantSpec, quant_params, quantize_state_dict
from qg.study.layer_cost import fisher_diagonal, layer_cost
from qg.targets.models import ModelSpec, build_model, save_checkpoint, state_dict_of

SPEC = QuantSpec(4, "group", group_size=16)


def test_fisher_diagonal_is_the_mean_squared_gradient_of_each_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])) for _ in range(2)]
    grads = []
    for x, y in data:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append(model.weight.grad.clone())
    expected = (grads[0].pow(2) + grads[1].pow(2)) / 2
    assert torch.allclose(fisher_diagonal(model, data)["weight"], expected)
    with pytest.raises(ValueError, match="at least one batch"):
        fisher_diagonal(model, [])


def test_layer_costs_are_half_the_mean_fisher_times_the_mean_squared_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("QG_DATA", str(tmp_path / "data"))
    write_fashion_mnist(tmp_path / "data", n_train=64, n_test=8)
    spec = ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "fashion_mnist")
    torch.manual_seed(0)
    sd = state_dict_of(build_model(spec))
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, sd, spec)
    costs = layer_cost([path], SPEC, seed=0, images=32)
    quantized = quantize_state_dict(sd, SPEC)
    assert set(costs) == set(quantized) - {k for k, v in quantized.items() if torch.is_tensor(v)}
    assert all(c > 0 for c in costs.values())
    # the head's cost, by hand: the same 32 images in batches of 16
    model = build_model(spec)
    model.load_state_dict(sd)
    from qg.targets.data import batches

    fisher = fisher_diagonal(model, batches("fashion_mnist", "train", 28, 16, subset=32, seed=0))
    scale = quant_params(sd["head.weight"], SPEC)[0]
    expected = 0.5 * fisher["head.weight"].mean() * scale.pow(2).mean()
    assert costs["head.weight"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="at least one checkpoint"):
        layer_cost([], SPEC, seed=0)


def test_cost_weights_follow_the_layer_costs_and_refuse_missing_ones():
    g = torch.Generator().manual_seed(0)
    sds = [
        {"a.weight": torch.randn(16, 24, generator=g), "b.weight": torch.randn(8, 16, generator=g)}
        for _ in range(2)
    ]
    qs = {SPEC: [quantize_state_dict(sd, SPEC) for sd in sds]}
    tok = Tokenizer.fit(sds, qs, 32)
    mask = tok.loss_mask(SPEC)
    w = loss_weights(tok, SPEC, "cost", {"a.weight": 1.0, "b.weight": 3.0})
    assert torch.equal(w > 0, mask) and w[mask].mean().item() == pytest.approx(1)
    std = tok.stats(SPEC)[:, 0, 1]
    per_value = {}
    for seg in tok.layout.segments:
        values = w.view(-1)[seg.start * 32 : seg.start * 32 + tok.layout.numel(seg, SPEC)]
        assert torch.all(values == values[0])  # one weight per layer, its S and Z included
        per_value[seg.layer] = values[0].item()
    ratio = per_value["b.weight"] / per_value["a.weight"]
    assert ratio == pytest.approx(3.0 * (std[1] / std[0]).item() ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="missing \\['b.weight'\\]"):
        loss_weights(tok, SPEC, "cost", {"a.weight": 1.0})
    with pytest.raises(ValueError, match="finite and positive"):
        loss_weights(tok, SPEC, "cost", {"a.weight": 1.0, "b.weight": 0.0})
