import math

import pytest
import torch
from fakes import TINY_MIXER, TINY_VIT, checkpoints

from qg.generator.layout import Layout, sinusoidal_2d
from qg.generator.tokenizer import Tokenizer
from qg.quant.quantizer import QuantSpec, quantize_state_dict


def fitted(spec_m, specs, token_size, padding="gaussian", n=3):
    sds = checkpoints(spec_m, n)
    qs = {s: [quantize_state_dict(sd, s) for sd in sds] for s in specs}
    return Tokenizer.fit(sds, qs, token_size, padding=padding), sds, qs


# Token sizes: 16 (every layer spans many tokens), 100 (not a divisor of any width), 4096 (every
# layer smaller than one token).
@pytest.mark.parametrize("token_size", [16, 100, 4096])
@pytest.mark.parametrize("padding", ["gaussian", "zero", "one"])
def test_round_trip_exact(model_spec, token_size, padding):
    specs = [QuantSpec(b, "group") for b in (3, 8)] + [
        QuantSpec(8, "channel"),
        QuantSpec(4, "group", scheme="asymmetric"),
    ]
    tok, sds, qs = fitted(model_spec, specs, token_size, padding)
    for s in specs:
        for sd, qsd in zip(sds, qs[s]):
            tokens = tok.encode_quantized(qsd, s)
            assert tokens.shape == tok.shape
            for name, qt in tok.decode_quantized(tokens, s).items():
                assert torch.equal(qt.codes, qsd[name].codes), name
                torch.testing.assert_close(qt.scale, qsd[name].scale, rtol=1e-5, atol=0)
                assert torch.equal(qt.zero, qsd[name].zero), name
    fp = tok.decode_fp(tok.encode_fp(sds[0]))
    for name, w in fp.items():
        torch.testing.assert_close(w, sds[0][name], rtol=1e-5, atol=1e-6)


def test_layout_counts_and_positions():
    shapes = [("a.weight", (10, 30)), ("b.weight", (4, 3, 2, 2))]
    layout = Layout(
        shapes, [QuantSpec(8, "channel"), QuantSpec(8, "group", group_size=8)], token_size=16
    )
    kinds = [(s.layer, s.kind, s.n_tokens) for s in layout.segments]
    # a: 300 weights -> 19 tokens; S/Z sized for the finer spec: 10 rows x 4 groups = 40 -> 3 tokens
    # each.
    # b: 48 weights -> 3 tokens; 4 rows x 2 groups = 8 -> 1 token each.
    assert kinds == [
        ("a.weight", "weight", 19),
        ("a.weight", "scale", 3),
        ("a.weight", "zero", 3),
        ("b.weight", "weight", 3),
        ("b.weight", "scale", 1),
        ("b.weight", "zero", 1),
    ]
    assert layout.n_tokens == 30
    pos = layout.positions()
    assert pos[:25, 0].eq(0).all() and pos[25:, 0].eq(1).all()
    assert pos[:25, 1].tolist() == list(range(25)) and pos[25:, 1].tolist() == list(range(5))
    mask = layout.value_mask(QuantSpec(8, "channel"))
    assert mask.sum() == 300 + 10 + 10 + 48 + 4 + 4
    assert layout.value_mask(QuantSpec(8, "channel"), side="fp").sum() == 348


def test_padding_fills_blanks_and_placeholders():
    spec = QuantSpec(8, "channel")
    for mode, check in (
        ("zero", lambda v: v.eq(0).all()),
        ("one", lambda v: v.eq(1).all()),
        ("gaussian", lambda v: abs(v.std() - 1) < 0.2),
    ):
        tok, sds, qs = fitted(TINY_VIT, [spec], 64, mode, n=1)
        fp_blank = ~tok.layout.value_mask(spec, "fp")
        q_blank = ~tok.loss_mask(spec)
        assert check(tok.encode_fp(sds[0])[fp_blank]) and check(
            tok.encode_quantized(qs[spec][0], spec)[q_blank]
        )
    # Gaussian padding is seeded: the same tokenizer seed gives the same noise.
    a, _, _ = fitted(TINY_VIT, [spec], 64, "gaussian", n=1)
    assert torch.equal(a.encode_fp(sds[0]), tok.encode_fp(sds[0]))


def test_normalisation_statistics_come_from_training_checkpoints():
    spec = QuantSpec(8, "group")
    tok, sds, qs = fitted(TINY_MIXER, [spec], 128)
    name = tok.layout.shapes[0][0]
    expected_mean = torch.stack([sd[name].double().mean() for sd in sds]).mean()
    assert math.isclose(tok.fp_stats[0, 0].item(), expected_mean.item(), rel_tol=1e-5)
    # Symmetric zero points are constant 0: kept in raw units (std 1), so they encode to 0.
    assert tok.q_stats[spec.name][:, 2, 1].eq(1).all()


def test_save_load(tmp_path):
    spec = QuantSpec(4, "group")
    tok, sds, qs = fitted(TINY_VIT, [spec], 100)
    tok.save(tmp_path)
    tok2 = Tokenizer.load(tmp_path)
    assert torch.equal(tok.encode_fp(sds[0]), tok2.encode_fp(sds[0]))
    assert torch.equal(
        tok.encode_quantized(qs[spec][0], spec), tok2.encode_quantized(qs[spec][0], spec)
    )


def test_mismatched_checkpoint_and_spec_are_refused():
    spec = QuantSpec(4, "group")
    tok, _, _ = fitted(TINY_VIT, [spec], 100, n=1)
    with pytest.raises(ValueError, match="does not match the tokenizer layout"):
        tok.encode_fp(checkpoints(TINY_MIXER, 1)[0])
    with pytest.raises(ValueError, match="serves"):
        tok.decode_quantized(torch.zeros(tok.shape), QuantSpec(3, "group"))
    with pytest.raises(ValueError, match="expected tokens of shape"):
        tok.decode_quantized(torch.zeros(3, 100), spec)
    with pytest.raises(ValueError, match="padding"):
        fitted(TINY_VIT, [spec], 100, padding="uniform", n=1)


def test_decode_clamps_codes_and_keeps_scale_positive():
    spec = QuantSpec(3, "group")
    tok, _, _ = fitted(TINY_VIT, [spec], 100, n=1)
    out = tok.decode_quantized(torch.full(tok.shape, -1e4), spec)
    for qt in out.values():
        assert qt.codes.min() >= spec.qmin and (qt.scale > 0).all() and qt.zero.min() >= spec.qmin


def test_sinusoidal_2d():
    pos = torch.tensor([[0, 0], [0, 1], [3, 0]])
    emb = sinusoidal_2d(pos, 16)
    assert emb.shape == (3, 16)
    assert torch.equal(emb[0, :8], emb[1, :8]) and not torch.equal(emb[0, 8:], emb[1, 8:])
    assert torch.equal(emb[0, 8:], emb[2, 8:]) and not torch.equal(emb[0, :8], emb[2, :8])
    assert emb.abs().max() <= 1


def test_symmetric_decode_has_no_zero_point():
    """Eq. 1 has no zero point: whatever a generator writes in the Z tokens, a symmetric file
    carries Z = 0 (issue 19 found non-zero Z in ~20 % of groups of generated symmetric files)."""
    sym, asym = QuantSpec(4, "group"), QuantSpec(4, "group", scheme="asymmetric")
    tok, _, _ = fitted(TINY_VIT, [sym, asym], 100, n=2)
    noise = torch.randn(tok.shape, generator=torch.Generator().manual_seed(0)) * 5
    assert all(int(qt.zero.abs().sum()) == 0 for qt in tok.decode_quantized(noise, sym).values())
    assert any(int(qt.zero.abs().sum()) > 0 for qt in tok.decode_quantized(noise, asym).values())


@pytest.mark.parametrize("target", ["direct", "residual"])
def test_centered_codes_round_trip_and_a_zero_point_flip_moves_only_z(target):
    """`codes: centered` tokens hold q - Z: decoding them is exact, on a symmetric grid they are the
    raw tokens, and a target whose group has Z + 1 and every code + 1 (the same weights) differs
    from the other in the Z token alone, where raw tokens differ at every code of the group."""
    asym, sym = QuantSpec(4, "group", 16, "asymmetric"), QuantSpec(4, "group", 16)
    sds = checkpoints(TINY_VIT, 3)
    qs = {s: [quantize_state_dict(sd, s) for sd in sds] for s in (asym, sym)}
    tok = {c: Tokenizer.fit(sds, qs, 32, target=target, codes=c) for c in ("raw", "centered")}
    for spec in (asym, sym):
        tokens = tok["centered"].encode_quantized(qs[spec][0], spec, sds[0])
        for name, qt in tok["centered"].decode_quantized(tokens, spec, sds[0]).items():
            assert torch.equal(qt.codes, qs[spec][0][name].codes), name
            assert torch.equal(qt.zero, qs[spec][0][name].zero), name
    raw_sym = tok["raw"].encode_quantized(qs[sym][0], sym, sds[0])
    assert torch.equal(raw_sym, tok["centered"].encode_quantized(qs[sym][0], sym, sds[0]))

    name = next(n for n, q in qs[asym][0].items() if hasattr(q, "codes") and q.zero[0, 0] < 7)
    q = qs[asym][0][name]
    inside = q.codes.clamp(max=asym.qmax - 1)  # a group the flip keeps in range
    flip = torch.zeros_like(q.codes).reshape(q.shape[0], -1)
    flip[0, :16] = 1
    zero = q.zero.clone()
    zero[0, 0] += 1
    qsd = {**qs[asym][0], name: type(q)(inside, q.scale, q.zero, asym)}
    flipped = {**qsd, name: type(q)(inside + flip.reshape(q.shape), q.scale, zero, asym)}
    li = [n for n, _ in tok["raw"].layout.shapes].index(name)
    for c, moved in (("raw", 16 + 1), ("centered", 1)):
        a = tok[c].encode_quantized(qsd, asym, sds[0])
        b = tok[c].encode_quantized(flipped, asym, sds[0])
        assert int((a != b).sum()) == moved, c
        seg = next(s for s in tok[c].layout.segments if (s.layer_index, s.kind) == (li, "zero"))
        assert not torch.equal(tok[c]._read(a, seg, 1), tok[c]._read(b, seg, 1))
    with pytest.raises(ValueError, match="codes must be one of"):
        Tokenizer.fit(sds, qs, 32, codes="offset")


def test_a_symmetric_generator_s_cache_key_ignores_the_code_tokens():
    """q - Z is q on a symmetric grid: setting `codes` retrains only the asymmetric generators."""
    from qg.config.profiles import load_profile
    from qg.study.experiments import tokenizer_key
    from qg.study.settings import Setting

    raw = load_profile("smoke")
    centered = load_profile("smoke", {"tokenizer": {"codes": "centered"}})
    for scheme, same in (("symmetric", True), ("asymmetric", False)):
        s = Setting("vit", "full", [QuantSpec(4, "group", scheme=scheme)])
        assert (tokenizer_key(raw, s) == tokenizer_key(centered, s)) is same
