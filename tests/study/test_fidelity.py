"""The fidelity and memorisation metrics on cases whose answer is known."""

import math

import pytest
import torch

from qg.quant.quantizer import QTensor, QuantSpec, dequantize, quantize, quantize_state_dict
from qg.study.fidelity import error_iou, layer_fidelity, nearest_distances, sensitivity

SPEC = QuantSpec(8, "group", group_size=16)


def models(n, seed=0, frozen=False):
    g = torch.Generator().manual_seed(seed)
    base = {
        "a.weight": torch.randn(8, 32, generator=g),
        "b.weight": torch.randn(4, 8, generator=g),
        "a.bias": torch.zeros(8),
    }
    out = []
    for _ in range(n):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if frozen:
            sd["b.weight"] = base["b.weight"]
        out.append(quantize_state_dict(sd, SPEC))
    return out


def test_layer_fidelity_of_a_copy_and_of_a_shifted_copy():
    (t,) = models(1)
    exact = layer_fidelity(t, t)
    assert list(exact.layer) == ["a.weight", "b.weight"]
    assert (
        (exact.codes_equal == 1).all()
        and (exact.code_mae == 0).all()
        and (exact.weight_rel_err == 0).all()
    )
    shifted = {
        k: QTensor(
            (v.codes.short() + 1).clamp(SPEC.qmin, SPEC.qmax).to(torch.int8),
            v.scale * 1.1,
            v.zero,
            v.spec,
        )
        if isinstance(v, QTensor)
        else v
        for k, v in t.items()
    }
    f = layer_fidelity(shifted, t)
    assert (f.codes_equal < 0.05).all() and f.code_mae.between(0.9, 1.0).all()
    assert f.scale_rel_err.sub(0.1).abs().max() < 1e-5


def test_code_error_splits_into_a_wrong_group_range_and_per_element_noise():
    (t,) = models(1)
    g = torch.Generator().manual_seed(3)

    def remade(fn):
        return {
            k: QTensor(
                fn(v.codes.float()).round().clamp(SPEC.qmin, SPEC.qmax).to(torch.int8),
                v.scale,
                v.zero,
                v.spec,
            )
            if isinstance(v, QTensor)
            else v
            for k, v in t.items()
        }

    # every code 10 % too small: all of the error is the group's gain, nothing is left per element
    gain = layer_fidelity(remade(lambda c: 0.9 * c), t)
    assert gain.group_gain_err.sub(0.1).abs().max() < 0.01 and (gain.code_mae_local < 0.35).all()
    assert (gain.code_mae > 2).all()
    # independent noise of +-3 steps: the gain is right, the error is all per element
    noise = layer_fidelity(
        remade(lambda c: c + torch.randint(-3, 4, c.shape, generator=g).float()), t
    )
    assert (noise.group_gain_err < 0.05).all() and (
        noise.code_mae_local > 0.8 * noise.code_mae
    ).all()
    exact = layer_fidelity(t, t)
    assert (exact.group_gain_err < 1e-6).all() and (exact.code_mae_local < 1e-6).all()


def test_sensitivity_is_one_for_a_copier_and_zero_for_a_constant():
    a, b = models(2)
    copy = sensitivity(a, b, a, b)
    assert copy.sensitivity.sub(1).abs().max() < 1e-6 and copy.alignment.sub(1).abs().max() < 1e-6
    constant = sensitivity(a, a, a, b)  # returns model a whatever it is given
    assert (constant.sensitivity == 0).all() and (constant.alignment == 0).all()
    swapped = sensitivity(b, a, a, b)  # moves as much, the wrong way
    assert (
        swapped.sensitivity.sub(1).abs().max() < 1e-6
        and swapped.alignment.add(1).abs().max() < 1e-6
    )
    half = {
        k: QTensor(v.codes, v.scale, v.zero, v.spec) for k, v in a.items() if isinstance(v, QTensor)
    }
    assert (sensitivity(half, half, a, b).target_moves > 0).all()


def test_sensitivity_of_a_frozen_layer_is_undefined():
    a, b = models(2, frozen=True)
    s = sensitivity(a, b, a, b).set_index("layer")
    assert s.loc["b.weight", "target_moves"] == 0 and math.isnan(s.loc["b.weight", "sensitivity"])
    assert math.isnan(s.loc["b.weight", "alignment"])
    assert s.loc["a.weight", "sensitivity"] == pytest.approx(1)


def test_nearest_distances_tell_a_replica_from_a_faithful_quantizer():
    train, new = models(5, seed=1), models(3, seed=2)
    faithful = nearest_distances(new, new, train)
    assert (faithful.to_own == 0).all() and (faithful.to_nearest_train > 0).all()
    # returns training model 3 whatever it is given
    replica = nearest_distances([train[3]] * 3, new, train)
    assert (replica.to_nearest_train == 0).all() and (replica.nearest_train == 3).all()
    assert (replica.to_own > 0).all()
    assert faithful.train_spacing.iloc[0] > 0


def test_nearest_distances_are_euclidean_distances_of_the_dequantized_weights():
    (a,), train = models(1, seed=3), models(4, seed=4)

    def flat(q):
        return torch.cat(
            [
                dequantize(q[k]).double().reshape(-1)
                for k in sorted(k for k in q if k.endswith("weight"))
            ]
        )

    scale = torch.stack([flat(t).norm() for t in train]).mean()
    d = nearest_distances([a], [train[0]], train).iloc[0]
    direct = torch.stack([(flat(a) - flat(t)).norm() for t in train]) / scale
    assert d.to_nearest_train == pytest.approx(float(direct.min()))
    assert d.nearest_train == int(direct.argmin())
    assert d.to_own == pytest.approx(float(direct[0]))
    with pytest.raises(ValueError, match="one target per model"):
        nearest_distances([a], [], train)


def test_error_iou():
    labels = torch.tensor([0, 1, 2, 3])
    a = torch.tensor([1, 1, 0, 3])  # wrong on 0, 2
    assert error_iou(a, a, labels) == 1
    assert error_iou(a, torch.tensor([0, 0, 2, 3]), labels) == 0  # wrong on 1 only
    assert error_iou(a, torch.tensor([1, 0, 2, 3]), labels) == pytest.approx(1 / 3)
    assert math.isnan(error_iou(labels, labels, labels))
    with pytest.raises(ValueError, match="one shape"):
        error_iou(a, a[:2], labels)


def test_different_architectures_are_refused():
    (a,) = models(1)
    with pytest.raises(ValueError, match="different layers"):
        layer_fidelity({"x.weight": a["a.weight"]}, a)


def test_a_zero_point_that_moves_with_its_codes_is_no_code_error():
    """On an asymmetric grid (q + 1, Z + 1) is the same weight as (q, Z): the code error is taken on
    q - Z, so such a group counts as equal; a code moved alone counts one step."""
    spec = QuantSpec(4, "group", 8, "asymmetric")
    t = quantize(torch.randn(2, 8), spec)
    inside = t.codes.clamp(max=spec.qmax - 1)
    flip = torch.zeros_like(inside)
    flip[0] = 1
    target = QTensor(inside, t.scale, t.zero, spec)
    moved = QTensor(inside + flip, t.scale, t.zero + flip[:, :1].float(), spec)
    row = layer_fidelity({"w.weight": moved}, {"w.weight": target}).iloc[0]
    assert row.code_mae == 0.0 and row.codes_equal == 1.0 and row.zero_mae == 0.5
    one = QTensor(inside + flip, t.scale, t.zero, spec)  # the codes moved, Z kept
    assert layer_fidelity({"w.weight": one}, {"w.weight": target}).iloc[0].code_mae == 0.5
