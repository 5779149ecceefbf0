import json
import os
import subprocess
import sys

import pytest
import torch

from qg.generator import Generator, GeneratorConfig, QuantGen
from qg.quant import QTensor, QuantSpec, load_quantized, quantize_state_dict, save_quantized
from qg.tokenizer import Tokenizer
from qg.train import TokenPairs, TrainConfig, fit_generator, train

SPEC = QuantSpec(8, "group", group_size=16)


def tiny_checkpoints(n, seed=0, shapes=(("a.weight", (16, 24)), ("a.bias", (16,)), ("b.weight", (8, 16)))):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes}
    return [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


def tiny_data(specs=(SPEC,), n=2, token_size=32, conditional=False):
    sds = tiny_checkpoints(n)
    qs = {s: [quantize_state_dict(sd, s) for sd in sds] for s in specs}
    tok = Tokenizer.fit(sds, qs, token_size)
    return tok, TokenPairs.build(tok, sds, qs, conditional=conditional), sds


def tiny_config(tok, **kw):
    base = dict(token_size=tok.shape[1], n_tokens=tok.shape[0], d_state=8, headdim=16, chunk_size=8, n_heads=2)
    return GeneratorConfig(**{**base, **kw})


@pytest.mark.parametrize("backbone", ["mamba2", "lstm", "transformer"])
def test_overfits_tiny_pairs(tmp_path, backbone):
    tok, data, _ = tiny_data()
    torch.manual_seed(0)
    model = Generator(tiny_config(tok, backbone=backbone), tok.layout.positions())
    rec = train(model, data, TrainConfig(steps=400, batch_size=2, lr=3e-3, ckpt_every=1000), tmp_path)
    losses = [float(r.split(",")[1]) for r in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 400 and rec["steps"] == 400
    assert losses[0] / min(losses[-10:]) > 100, (losses[0], losses[-10:])


def test_diffusion_head_learns_tiny_pairs(tmp_path):
    tok, data, _ = tiny_data()
    torch.manual_seed(0)
    cfg = tiny_config(tok, head="diffusion", diffusion={"n_steps": 100})
    model = Generator(cfg, tok.layout.positions())
    x, y, _, mask = data.batch(torch.arange(2), 0)
    mask = mask.bool()

    def sample_error():
        out = model.generate(x, rng=torch.Generator().manual_seed(0))
        return ((out - y)[mask].pow(2).mean() / y[mask].pow(2).mean()).item()

    before = sample_error()
    train(model, data, TrainConfig(steps=400, batch_size=2, lr=3e-3, ckpt_every=1000), tmp_path)
    after = sample_error()
    assert after < before / 10, (before, after)


def test_resume_is_exact(tmp_path):
    tok, data, _ = tiny_data()
    cfg = TrainConfig(steps=20, batch_size=2, lr=3e-3, ckpt_every=5)

    def fresh():
        torch.manual_seed(0)
        return Generator(tiny_config(tok), tok.layout.positions())

    full = fresh()
    train(full, data, cfg, tmp_path / "full")
    interrupted = fresh()
    train(interrupted, data, cfg, tmp_path / "resumed", stop_after=10)  # as if killed after step 10
    resumed = fresh()  # a new process: new model, state read from disk
    train(resumed, data, cfg, tmp_path / "resumed")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "full" / "loss.csv").read_text() == (tmp_path / "resumed" / "loss.csv").read_text()


def test_conditional_generator_and_quantize_end_to_end(tmp_path):
    specs = (QuantSpec(4, "group", 16), QuantSpec(8, "channel"))
    tok, data, sds = tiny_data(specs, conditional=True)
    assert data.conditions == [s.name for s in specs] and len(data) == 4
    qg = fit_generator(tok, data, tiny_config(tok, conditions=data.conditions),
                       TrainConfig(steps=5, batch_size=2, ckpt_every=5), tmp_path / "gen")
    loaded = QuantGen.load(tmp_path / "gen")
    assert loaded.record["steps"] == 5 and loaded.record["train_seconds"] > 0
    for spec in specs:
        qsd, seconds = loaded.quantize(sds[0], spec)
        assert seconds > 0 and torch.equal(qsd["a.bias"], sds[0]["a.bias"])
        qt = qsd["a.weight"]
        assert isinstance(qt, QTensor) and qt.scale.shape == spec.param_shape((16, 24))
        assert qt.codes.min() >= spec.qmin and qt.codes.max() <= spec.qmax and (qt.scale > 0).all()
        save_quantized(tmp_path / f"{spec.name}.safetensors", qsd, spec)
        fsd, spec2, _ = load_quantized(tmp_path / f"{spec.name}.safetensors")
        assert spec2 == spec and fsd.keys() == sds[0].keys()
    # Same weights, same output: generation is deterministic.
    a, _ = qg.quantize(sds[1], specs[0])
    b, _ = loaded.quantize(sds[1], specs[0])
    assert torch.equal(a["b.weight"].codes, b["b.weight"].codes)
    with pytest.raises(ValueError, match="trained for"):
        loaded.quantize(sds[0], QuantSpec(3, "group"))


def test_bad_inputs_are_clear(tmp_path):
    tok, data, sds = tiny_data()
    qg = fit_generator(tok, data, tiny_config(tok), TrainConfig(steps=2, batch_size=2), tmp_path / "gen")
    # A checkpoint of another architecture.
    other = tiny_checkpoints(1, shapes=(("a.weight", (16, 24)), ("c.weight", (4, 4))))[0]
    with pytest.raises(ValueError, match="does not match the tokenizer layout"):
        qg.quantize(other, SPEC)
    # NaN weights.
    bad = {k: v.clone() for k, v in sds[0].items()}
    bad["b.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        qg.quantize(bad, SPEC)
    # Token width or count that the generator was not built for.
    with pytest.raises(ValueError, match="expected tokens of shape"):
        qg.model.generate(torch.zeros(1, tok.shape[0], tok.shape[1] + 1))
    # A generator file whose weights belong to another architecture.
    info = json.loads((tmp_path / "gen" / "generator.json").read_text())
    info["config"]["n_layers"] = 3
    (tmp_path / "gen" / "generator.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="does not match generator.json's architecture"):
        QuantGen.load(tmp_path / "gen")
    with pytest.raises(FileNotFoundError, match="not a generator directory"):
        QuantGen.load(tmp_path)
    with pytest.raises(ValueError, match="backbone"):
        tiny_config(tok, backbone="gru")


def test_torchrun_data_parallel_matches_one_process(tmp_path):
    tok, data, _ = tiny_data(n=4)
    tok.save(tmp_path / "data")
    data.save(tmp_path / "data" / "pairs.safetensors")
    overrides = {"generator": {"d_state": 8, "headdim": 16, "chunk_size": 8},
                 "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "ckpt_every": 3}}
    (tmp_path / "cfg.json").write_text(json.dumps(overrides))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    for nproc, out in ((2, "ddp"), (1, "single")):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               "-m", "qg.train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / out),
               "--config", str(tmp_path / "cfg.json"), "--device", "cpu"]
        run = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    ddp, single = QuantGen.load(tmp_path / "ddp"), QuantGen.load(tmp_path / "single")
    assert ddp.record["world_size"] == 2 and single.record["world_size"] == 1
    for (k, a), b in zip(ddp.model.state_dict().items(), single.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("skip", ["add", "gain"])
def test_skip_generator_starts_as_its_input_on_weights(tmp_path, skip):
    """With a skip and a zeroed output layer, the prediction is the fp weight tokens (padding not copied)."""
    tok, data, _ = tiny_data()
    model = Generator.for_tokenizer(tiny_config(tok, skip=skip), tok)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    x = data.x[:1]
    out = model.generate(x)
    weights = tok.layout.value_mask(SPEC, "fp")
    assert torch.equal(out[0][weights], x[0][weights]) and (out[0][~weights] == 0).all()
    with pytest.raises(ValueError, match="weight values"):
        Generator(tiny_config(tok, skip=skip), tok.layout.positions())
    with pytest.raises(ValueError, match="diffusion head"):
        tiny_config(tok, skip=skip, head="diffusion")
    with pytest.raises(ValueError, match="skip must be one of"):
        tiny_config(tok, skip="mul")
    rec = fit_generator(tok, data, tiny_config(tok, skip=skip), TrainConfig(steps=3, batch_size=2, ckpt_every=10), tmp_path)
    back = QuantGen.load(tmp_path)
    assert back.model.cfg.skip == skip and torch.equal(back.model.generate(x), rec.model.generate(x))


def test_log_scale_tokens_round_trip_and_segment_weights():
    sds = tiny_checkpoints(2)
    qs = {SPEC: [quantize_state_dict(sd, SPEC) for sd in sds]}
    tok = Tokenizer.fit(sds, qs, 32, log_scale=True)
    back = tok.decode_quantized(tok.encode_quantized(qs[SPEC][0], SPEC), SPEC)
    for name, qt in back.items():
        assert torch.equal(qt.codes, qs[SPEC][0][name].codes)
        assert torch.allclose(qt.scale, qs[SPEC][0][name].scale, rtol=1e-5)
    element, segment = tok.loss_weights(SPEC), tok.loss_weights(SPEC, "segment")
    mask = tok.loss_mask(SPEC)
    assert torch.equal(element, mask.float()) and torch.equal(segment > 0, mask)
    assert segment[mask].mean().item() == pytest.approx(1)
    totals = [segment.view(-1)[s.start * 32: s.start * 32 + tok.layout.numel(s, SPEC)].sum().item() for s in tok.layout.segments]
    assert max(totals) == pytest.approx(min(totals))  # every (layer, kind) segment weighs the same
    with pytest.raises(ValueError, match="loss weighting"):
        tok.loss_weights(SPEC, "balanced")


def test_a_run_saved_before_new_settings_existed_resumes(tmp_path):
    """A train_state.pt whose stored settings lack fields added later (skip, loss_weighting) still resumes."""
    tok, data, _ = tiny_data()
    cfg = TrainConfig(steps=6, batch_size=2, ckpt_every=3)
    torch.manual_seed(0)
    train(Generator(tiny_config(tok), tok.layout.positions()), data, cfg, tmp_path, stop_after=3)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["run"]["generator"]["skip"], state["run"]["train"]["loss_weighting"]
    torch.save(state, tmp_path / "train_state.pt")
    rec = train(Generator(tiny_config(tok), tok.layout.positions()), data, cfg, tmp_path)
    assert rec["steps"] == 6


def test_loss_weights_must_match_the_run(tmp_path):
    tok, data, sds = tiny_data()
    model = Generator(tiny_config(tok), tok.layout.positions())
    with pytest.raises(ValueError, match="rebuild them"):
        train(model, data, TrainConfig(steps=1, batch_size=2, loss_weighting="segment"), tmp_path)
    qs = {SPEC: [quantize_state_dict(sd, SPEC) for sd in sds]}
    weighted = TokenPairs.build(tok, sds, qs, loss_weighting="segment")
    weighted.save(tmp_path / "pairs.safetensors")
    assert TokenPairs.load(tmp_path / "pairs.safetensors").loss_weighting == "segment"
    with pytest.raises(ValueError, match="mask_padding=False"):
        train(model, weighted, TrainConfig(steps=1, batch_size=2, loss_weighting="segment", mask_padding=False), tmp_path)
