import pytest
import torch
from fakes import TINY_MIXER, TINY_VIT, checkpoints
from torch import nn

from qg.quant.quantizer import QuantSpec, dequantize_state_dict, quantize_state_dict
from qg.quant.qwt import PREFIX, Compensated, attach, compensate, fit_block, split, tensors
from qg.targets.models import build_model, load_weights


class Net(nn.Module):
    """A model whose blocks are linear: QwT can make the quantized one exact."""

    def __init__(self, dim=6, depth=2):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


def _images(n=4, tokens=10, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, tokens, dim, generator=g) for _ in range(n)]


def test_on_linear_blocks_qwt_recovers_the_full_precision_output():
    torch.manual_seed(0)
    fp = Net()
    quantized = Net()
    quantized.load_state_dict(
        dequantize_state_dict(quantize_state_dict(fp.state_dict(), QuantSpec(2, "channel")))
    )
    x = _images(seed=1)
    before = max((fp(b) - quantized(b)).abs().max().item() for b in x)
    fits = compensate(fp, quantized, _images())
    after = max((fp(b) - quantized(b)).abs().max().item() for b in x)
    assert all(f.applied and f.r2 > 0.999 and not f.ridge for f in fits) and before > 0.05
    assert after < 2e-3 * before  # exact up to W, b stored in float16
    assert all(isinstance(b, Compensated) for b in quantized.blocks)


def test_a_fit_whose_float16_weights_explain_nothing_gets_no_compensation():
    """The residual is 12345.6 x0 - 12349.3 x1 with x1 within 1e-4 of x0: the float64 fit is exact,
    but W rounded to float16 as stored (12344, -12352) misses by more than the residual varies (R^2
    < 0), so the block gets zero compensation; and a block that quantization did not change (nothing
    to explain) gets none either."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(4):
        x = torch.randn(8, 10, 6, generator=g)
        x[..., 1] = x[..., 0] + 1e-4 * torch.randn(8, 10, generator=g)
        inputs.append(x)

    class Residual(nn.Module):
        def forward(self, x):
            return (12345.6 * x[..., :1] - 12349.3 * x[..., 1:2]).expand_as(x)

    fit = fit_block(inputs, Residual(), lambda x: torch.zeros_like(x))
    assert (
        fit.r2 < 0 and not fit.applied and fit.weight.abs().sum() == 0 and fit.bias.abs().sum() == 0
    )
    block = nn.Linear(6, 6)
    same = fit_block(inputs, block, block)
    assert not same.applied and same.weight.abs().sum() == 0


def test_compensation_survives_a_file_round_trip(tmp_path):
    from qg.quant.fileformat import read_quantized, save_quantized

    for model_spec in (TINY_VIT, TINY_MIXER):
        sd = checkpoints(model_spec, 1)[0]
        spec = QuantSpec(3, "group", 16)
        qsd = quantize_state_dict(sd, spec)
        fp = load_weights(build_model(model_spec), sd).eval()
        q = load_weights(build_model(model_spec), dequantize_state_dict(qsd)).eval()
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(2)]
        fits = compensate(fp, q, calib)
        extra = tensors(fits)
        assert extra and all(v.dtype == torch.float16 for v in extra.values())
        save_quantized(
            tmp_path / "m.safetensors", {**qsd, **extra}, spec, {"model": model_spec.to_dict()}
        )
        own, back = split(dequantize_state_dict(read_quantized(tmp_path / "m.safetensors")[0]))
        assert set(back) == set(extra) and all(k.startswith(PREFIX) for k in back)
        rebuilt = attach(load_weights(build_model(model_spec), own), back).eval()
        x = torch.randn(4, 1, 28, 28, generator=g)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), q(x))


def test_qwt_files_are_calibrated_on_training_images_only_and_score_from_the_file(
    tmp_path, monkeypatch
):
    """`Experiment.model_file(..., "ptq+qwt")`: the compensation is fitted on `qwt.images` images
    drawn from the task's training split (never its test split), stored in the file with its record,
    and the file alone rebuilds the compensated model (the Scorer and the packed runtime agree)."""
    from fakes import fake_collect

    from qg.config import profiles
    from qg.quant.fileformat import read_quantized_meta
    from qg.study.experiments import Experiment
    from qg.study.settings import Setting
    from qg.targets import calibrate
    from qg.targets.models import load_model_description, predict
    from qg.targets.runtime import load_runtime

    scoring = {"eval": {"per_split": 1, "test_subset": 60}}
    P = profiles.load_profile("smoke", {**scoring, "qwt": {"images": 48, "batch_size": 16}})
    fake_collect(profiles.Paths.of("smoke", tmp_path).artifacts / "collect")
    drawn = []
    real_batches = calibrate.batches

    def spy(name, split, *args, **kw):
        drawn.append((name, split, kw.get("subset")))
        return real_batches(name, split, *args, **kw)

    monkeypatch.setattr(calibrate, "batches", spy)
    exp = Experiment(P, profiles.Paths.of("smoke", tmp_path))
    setting = Setting("vit", "full", [QuantSpec(3, "group", 16)])
    ckpt = exp.collected.splits("vit", "full")["heldout_run"][0]
    path = exp.model_file(setting, setting.specs[0], ckpt, "ptq+qwt")
    assert drawn == [("digits", "train", 48)]
    _, meta = read_quantized_meta(path)
    assert (
        meta["method"] == "ptq+qwt"
        and meta["qwt"]["images"] == 48
        and meta["qwt"]["split"] == "train"
    )
    assert (
        len(meta["qwt"]["r2"]) == TINY_VIT.kwargs["depth"]
        and meta["seconds"] > meta["qwt"]["seconds"] > 0
    )
    simulated = exp.scorer.predictions(path)[0]
    packed = load_runtime(path)[0]
    assert sum(isinstance(b, Compensated) for b in packed.blocks) == sum(meta["qwt"]["applied"]) > 0
    test = exp.scorer.test_set(load_model_description(path))
    assert torch.equal(predict(packed, test)[0], simulated)
    # cached
    assert exp.model_file(setting, setting.specs[0], ckpt, "ptq+qwt") == path and len(drawn) == 1
    # other calibration settings: another file, fitted again
    P = profiles.load_profile("smoke", {**scoring, "qwt": {"images": 32, "batch_size": 16}})
    other = Experiment(P, profiles.Paths.of("smoke", tmp_path)).model_file(
        setting, setting.specs[0], ckpt, "ptq+qwt"
    )
    assert other != path and drawn[-1] == ("digits", "train", 32)
    with pytest.raises(ValueError, match="fp\\+qwt. is not a method"):
        exp.model_file(setting, setting.specs[0], ckpt, "fp+qwt")


class Tanh(nn.Module):
    """A nonlinear token-wise block."""

    def __init__(self, dim=6):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def test_each_block_is_fitted_on_the_compensated_outputs_of_the_blocks_before_it(monkeypatch):
    from qg.quant import qwt

    torch.manual_seed(0)
    fp = Net()
    fp.blocks = nn.Sequential(Tanh(), Tanh(), Tanh())
    quantized = Net()
    quantized.blocks = nn.Sequential(Tanh(), Tanh(), Tanh())
    quantized.load_state_dict(
        dequantize_state_dict(quantize_state_dict(fp.state_dict(), QuantSpec(2, "channel")))
    )
    seen = []
    real = qwt.fit_block
    monkeypatch.setattr(
        qwt,
        "fit_block",
        lambda inputs, f, q: seen.append([x.clone() for x in inputs]) or real(inputs, f, q),
    )
    images = _images()
    compensate(fp, quantized, images)
    with torch.no_grad():
        for i in range(1, 3):  # block i saw what the compensated blocks 0..i-1 output
            expected = [quantized.blocks[:i](x) for x in images]
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen[i], expected))
    assert torch.equal(seen[0][0], images[0])


def test_r_squared_from_the_accumulators_equals_the_direct_one():
    from qg.quant.qwt import r_squared, solve

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    d = torch.tanh(x @ torch.randn(5, 4, generator=g, dtype=torch.float64)) + 0.1
    xo = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    coef, ridge = solve(xo.T @ xo, xo.T @ d)
    direct = 1 - ((d - xo @ coef) ** 2).sum() / ((d - d.mean(0)) ** 2).sum()
    from_sums = r_squared(coef, xo.T @ xo, xo.T @ d, float((d**2).sum()), d.sum(0), 200)
    assert not ridge and from_sums == pytest.approx(float(direct))


def test_a_singular_system_gets_a_ridge_and_a_damaged_compensation_is_refused():
    from qg.core.io import CorruptFileError
    from qg.quant.qwt import solve

    x = torch.randn(50, 3, dtype=torch.float64)
    # a repeated feature: singular
    x = torch.cat([x, x[:, :1], torch.ones(50, 1, dtype=torch.float64)], 1)
    _, ridge = solve(x.T @ x, x.T @ torch.randn(50, 2, dtype=torch.float64))
    assert ridge
    model = build_model(TINY_VIT)
    width = TINY_VIT.kwargs["embed_dim"]
    with pytest.raises(CorruptFileError, match="compensation of block 0.*does not fit"):
        attach(
            model,
            {
                f"{PREFIX}.0.weight": torch.zeros(width, width + 1, dtype=torch.float16),
                f"{PREFIX}.0.bias": torch.zeros(width, dtype=torch.float16),
            },
        )
    with pytest.raises(CorruptFileError, match="does not fit"):
        # no bias
        attach(model, {f"{PREFIX}.0.weight": torch.zeros(width, width, dtype=torch.float16)})
    with pytest.raises(CorruptFileError, match="unexpected QwT tensor"):
        attach(model, {f"{PREFIX}.x.weight": torch.zeros(1)})
