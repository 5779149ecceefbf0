import math

import pytest
import torch
from fakes import TINY_VIT, checkpoints

from qg.core.io import CorruptFileError
from qg.quant.fileformat import load_quantized, read_quantized, save_quantized
from qg.quant.quantizer import (
    QuantSpec,
    dequantize,
    fake_quantize,
    is_quantized_weight,
    quantize,
    quantize_state_dict,
)
from qg.targets.models import build_model, load_weights

ALL_SPECS = [
    QuantSpec(b, g, 64, s)
    for b in range(2, 9)
    for g in ("channel", "group")
    for s in ("symmetric", "asymmetric")
]


def weight(rows=12, cols=100, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_codes_in_range_and_error_bounded(spec):
    w = weight()
    q = quantize(w, spec)
    assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape
    assert q.codes.min() >= spec.qmin and q.codes.max() <= spec.qmax
    assert q.scale.shape == q.zero.shape == spec.param_shape(w.shape)
    # Inside the clamp range every value is within half a step of its reconstruction.
    err = (w - dequantize(q)).abs()
    step = q.scale.repeat_interleave(
        spec.group_size if spec.granularity == "group" else w.shape[1], 1
    )[:, : w.shape[1]]
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_matches_eq1_per_channel(bits):
    w = weight(seed=bits)
    q = quantize(w, QuantSpec(bits, "channel"))
    # Eq. 1, written independently
    s = w.abs().max(dim=1, keepdim=True).values / (2 ** (bits - 1) - 1)
    codes = torch.clamp(torch.round(w / s), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    torch.testing.assert_close(q.scale, s)
    assert torch.equal(q.codes.float(), codes) and torch.all(q.zero == 0)
    torch.testing.assert_close(dequantize(q), s * codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_matches_min_max(bits):
    w = weight(seed=bits) + 0.05
    q = quantize(w, QuantSpec(bits, "channel", scheme="asymmetric"))
    lo = w.min(1, keepdim=True).values.clamp(max=0)
    hi = w.max(1, keepdim=True).values.clamp(min=0)
    s = (hi - lo) / (2**bits - 1)
    z_unsigned = torch.round(-lo / s)  # the textbook zero point on [0, 2^N - 1]
    q_unsigned = torch.clamp(torch.round(w / s) + z_unsigned, 0, 2**bits - 1)
    torch.testing.assert_close(q.scale, s)
    # Stored signed: shifted by 2^(N-1) on both codes and zero, so S * (q - Z) is unchanged.
    assert torch.equal(q.codes.float() + 2 ** (bits - 1), q_unsigned)
    assert torch.equal(q.zero + 2 ** (bits - 1), z_unsigned)
    torch.testing.assert_close(dequantize(q), s * (q_unsigned - z_unsigned))


@pytest.mark.parametrize("cols,group,groups", [(128, 64, 2), (100, 64, 2), (16, 64, 1), (49, 7, 7)])
def test_group_shapes_and_policy(cols, group, groups):
    w = weight(cols=cols)
    spec = QuantSpec(4, "group", group)
    q = quantize(w, spec)
    assert q.scale.shape == (12, groups)
    # The last group holds the remainder of its row only: its scale is that slice's max|r|.
    tail = w[:, (groups - 1) * group :]
    torch.testing.assert_close(q.scale[:, -1], tail.abs().amax(1) / spec.qmax)


def test_conv_weight_rows_are_output_channels():
    w = torch.randn(8, 3, 5, 5)
    q = quantize(w, QuantSpec(8, "channel"))
    assert q.codes.shape == w.shape and q.scale.shape == (8, 1)
    torch.testing.assert_close(q.scale[:, 0], w.reshape(8, -1).abs().amax(1) / 127)


def test_fake_quantize_is_straight_through():
    w = weight().requires_grad_()
    spec = QuantSpec(4, "group")
    out = fake_quantize(w, spec)
    torch.testing.assert_close(out, dequantize(quantize(w.detach(), spec)))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=1, granularity="group"), "bits"),
        (dict(bits=9, granularity="group"), "bits"),
        (dict(bits=4.0, granularity="group"), "bits"),
        (dict(bits=4, granularity="tensor"), "granularity"),
        (dict(bits=4, granularity="group", scheme="nf4"), "scheme"),
        (dict(bits=4, granularity="group", group_size=0), "group_size"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_nan_and_inf_weights_are_refused():
    sd = checkpoints(TINY_VIT, 1)[0]
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight.*NaN/inf"):
        quantize_state_dict(sd, QuantSpec(8, "group"))
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize(torch.tensor([[1.0, float("inf")]]), QuantSpec(8, "channel"))


def test_quantization_rule_selects_linear_and_conv_kernels():
    model = build_model(TINY_VIT)
    kernels = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    selected = {k for k, v in model.state_dict().items() if is_quantized_weight(k, v)}
    assert selected == kernels


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(4, "group"), QuantSpec(8, "channel", scheme="asymmetric")],
    ids=lambda s: s.name,
)
def test_file_round_trip_rebuilds_model(tmp_path, spec):
    sd = checkpoints(TINY_VIT, 1)[0]
    qsd = quantize_state_dict(sd, spec)
    path = tmp_path / "m.safetensors"
    save_quantized(path, qsd, spec, {"model": TINY_VIT.to_dict()})
    loaded, spec2, meta = load_quantized(path)
    assert spec2 == spec
    assert loaded.keys() == sd.keys()
    for k, v in qsd.items():
        expected = dequantize(v) if hasattr(v, "codes") else v
        assert torch.equal(loaded[k], expected), k
    model = load_weights(build_model(meta["model"]), loaded)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    raw, _, _ = read_quantized(path)
    assert raw["head.weight"].codes.dtype == torch.int8


def test_corrupt_truncated_and_foreign_files(tmp_path):
    spec = QuantSpec(8, "group")
    path = tmp_path / "m.safetensors"
    save_quantized(path, quantize_state_dict(checkpoints(TINY_VIT, 1)[0], spec), spec)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="trunc.safetensors.*truncated"):
        load_quantized(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptFileError, match="garbage.safetensors"):
        load_quantized(tmp_path / "garbage.safetensors")
    from qg.core.io import save_safetensors

    save_safetensors({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CorruptFileError, match="not a qg-quantized file"):
        load_quantized(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_quantized(tmp_path / "missing.safetensors")


def test_checkpoint_for_another_architecture_is_refused():
    from fakes import TINY_MIXER

    with pytest.raises(
        ValueError, match="(?s)does not match the VisionTransformer architecture.*missing"
    ):
        load_weights(build_model(TINY_VIT), checkpoints(TINY_MIXER, 1)[0])


def test_param_shape_counts():
    spec = QuantSpec(4, "group", 64)
    assert spec.param_shape((192, 64)) == (192, 1)
    assert spec.param_shape((64, 1, 7, 7)) == (64, 1)
    assert spec.param_shape((10, 200)) == (10, math.ceil(200 / 64))


PACKED_SPECS = [
    QuantSpec(b, g, 16, s)
    for b in range(2, 9)
    for g in ("channel", "group")
    for s in ("symmetric", "asymmetric")
]


@pytest.mark.parametrize("row_length", [16, 49, 96])
@pytest.mark.parametrize("spec", PACKED_SPECS, ids=lambda s: s.name)
def test_packed_file_round_trip_is_exact(tmp_path, spec, row_length):
    """Codes, S and Z come back bit for bit, remainder groups (49 = 3 x 16 + 1) and a partial last
    byte included, and the codes take ceil(numel * bits / 8) bytes in the file."""
    w = weight(rows=5, cols=row_length, seed=row_length)
    qsd = {"fc.weight": quantize(w, spec), "fc.bias": torch.ones(5)}
    save_quantized(tmp_path / "m.safetensors", qsd, spec)
    back, spec2, _ = read_quantized(tmp_path / "m.safetensors")
    assert spec2 == spec and torch.equal(back["fc.bias"], qsd["fc.bias"])
    for part in ("codes", "scale", "zero"):
        assert torch.equal(getattr(back["fc.weight"], part), getattr(qsd["fc.weight"], part)), part
    from qg.core.io import read_safetensors

    stored = read_safetensors(tmp_path / "m.safetensors")[0]
    assert stored["fc.weight.qweight"].numel() == math.ceil(5 * row_length * spec.bits / 8)
    assert ("fc.weight.zero" in stored) == (spec.scheme == "asymmetric")


@pytest.mark.parametrize("name", ["v1_w3-group16-sym", "v1_w5-channel-asy"])
def test_version_1_files_still_load(name):
    """Files written by qg before bit-packing (tests/fixtures, made at commit db052fe) read as the
    same model."""
    from pathlib import Path

    from qg.quant.fileformat import format_version

    path = Path(__file__).parents[1] / "fixtures" / f"{name}.safetensors"
    qsd, spec, meta = read_quantized(path)
    g = torch.Generator().manual_seed(16)  # how the fixture's weights were drawn
    w, bias = torch.randn(6, 49, generator=g) * 0.1, torch.randn(6, generator=g)
    expected = quantize(w, spec)
    assert format_version(path) == "1" and "db052fe" in meta["made_by"]
    assert torch.equal(qsd["fc.weight"].codes, expected.codes) and torch.equal(qsd["fc.bias"], bias)
    torch.testing.assert_close(
        load_quantized(path)[0]["fc.weight"], dequantize(expected), rtol=0, atol=0
    )


def test_damaged_packed_tensor_is_a_clear_error(tmp_path):
    from qg.core.io import read_safetensors, save_safetensors

    spec = QuantSpec(3, "group", 16)
    save_quantized(tmp_path / "m.safetensors", {"fc.weight": quantize(weight(5, 49), spec)}, spec)
    tensors, metadata = read_safetensors(tmp_path / "m.safetensors")
    save_safetensors(
        {**tensors, "fc.weight.qweight": tensors["fc.weight.qweight"][:-2]},
        tmp_path / "short.safetensors",
        metadata,
    )
    with pytest.raises(
        CorruptFileError,
        match="fc.weight.qweight is truncated or damaged.*is 92 uint8 bytes, got 90",
    ):
        read_quantized(tmp_path / "short.safetensors")
    save_safetensors(tensors, tmp_path / "noshape.safetensors", {**metadata, "shapes": "{}"})
    with pytest.raises(CorruptFileError, match="fc.weight.qweight has no shape"):
        read_quantized(tmp_path / "noshape.safetensors")
    save_safetensors(tensors, tmp_path / "v9.safetensors", {**metadata, "format_version": "9"})
    with pytest.raises(
        CorruptFileError, match="format version '9'.*reads versions 1, 2: update qg"
    ):
        read_quantized(tmp_path / "v9.safetensors")


def test_packing_is_what_makes_low_bit_files_small(tmp_path):
    """On a real (tiny) model: a 4-bit group file is well under half an 8-bit one's codes, and the
    codes of every bit-width take exactly bits/8 bytes per weight."""
    from qg.core.io import read_safetensors

    sd = checkpoints(TINY_VIT, 1)[0]
    code_bytes = {}
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits, "group", 16)
        save_quantized(tmp_path / f"{bits}.safetensors", quantize_state_dict(sd, spec), spec)
        stored = read_safetensors(tmp_path / f"{bits}.safetensors")[0]
        code_bytes[bits] = sum(t.numel() for k, t in stored.items() if k.endswith(".qweight"))
    n = sum(v.numel() for k, v in sd.items() if is_quantized_weight(k, v))
    assert all(abs(code_bytes[b] - n * b / 8) < len(sd) for b in code_bytes)


def test_packed_byte_layout_is_pinned():
    """The on-disk layout (a little-endian bit stream of unsigned codes), written out by hand."""
    from qg.quant.packing import pack_codes, unpack_codes

    assert pack_codes(torch.tensor([-8, 7], dtype=torch.int8), 4).tolist() == [0 | 15 << 4]
    assert pack_codes(torch.tensor([-2, -1, 0, 1], dtype=torch.int8), 2).tolist() == [
        0 | 1 << 2 | 2 << 4 | 3 << 6
    ]
    # u = 0..7: 24 bits in 3 bytes
    three = torch.tensor([-4, -3, -2, -1, 0, 1, 2, 3], dtype=torch.int8)
    assert pack_codes(three, 3).tolist() == [
        0 | 1 << 3 | (2 & 0b11) << 6,
        2 >> 2 | 3 << 1 | 4 << 4 | (5 & 1) << 7,
        5 >> 1 | 6 << 2 | 7 << 5,
    ]
    assert pack_codes(torch.tensor([-128, 127], dtype=torch.int8), 8).tolist() == [0, 255]
    assert pack_codes(torch.zeros(0, dtype=torch.int8), 3).numel() == 0
    assert unpack_codes(torch.zeros(0, dtype=torch.uint8), 5, (0, 7)).shape == (0, 7)
    with pytest.raises(ValueError, match="codes outside the 3-bit range -4..3"):
        pack_codes(torch.tensor([4], dtype=torch.int8), 3)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_storage_counts_codes_scales_and_zeros(tmp_path, scheme):
    from qg.quant.fileformat import storage

    spec = QuantSpec(3, "group", 16, scheme)
    save_quantized(
        tmp_path / "m.safetensors",
        {"fc.weight": quantize(weight(5, 49), spec), "fc.bias": torch.ones(5)},
        spec,
    )
    s = storage(tmp_path / "m.safetensors")
    groups = 5 * 4  # 49 = 16 + 16 + 16 + 1 per row
    stored_bits = 8 * math.ceil(245 * 3 / 8) + 32 * groups * (2 if scheme == "asymmetric" else 1)
    assert s["groups"] == groups and s["quantized_weights"] == 245 and s["quantized_tensors"] == 1
    assert s["bits_per_weight"] == pytest.approx(stored_bits / 245)
    assert s["fp32_bytes"] == 4 * (245 + 5)
    assert s["format_version"] == "2" and s["compensation_bytes"] == 0
    assert s["file_bytes"] == (tmp_path / "m.safetensors").stat().st_size
