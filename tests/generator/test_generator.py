import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from qg.generator.directory import QuantGen
from qg.generator.loss import loss_tolerance, loss_weights
from qg.generator.model import Generator, GeneratorConfig
from qg.generator.pairs import TokenPairs
from qg.generator.tokenizer import Tokenizer
from qg.generator.train import TrainConfig, fit_generator, train
from qg.quant.fileformat import load_quantized, save_quantized
from qg.quant.quantizer import QTensor, QuantSpec, quantize_state_dict

SPEC = QuantSpec(8, "group", group_size=16)


def tiny_checkpoints(
    n, seed=0, shapes=(("a.weight", (16, 24)), ("a.bias", (16,)), ("b.weight", (8, 16)))
):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes}
    return [
        {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)
    ]


def tiny_data(specs=(SPEC,), n=2, token_size=32, conditional=False):
    sds = tiny_checkpoints(n)
    qs = {s: [quantize_state_dict(sd, s) for sd in sds] for s in specs}
    tok = Tokenizer.fit(sds, qs, token_size)
    return tok, TokenPairs.build(tok, sds, qs, conditional=conditional), sds


def tiny_config(tok, **kw):
    base = dict(
        token_size=tok.shape[1],
        n_tokens=tok.shape[0],
        d_state=8,
        headdim=16,
        chunk_size=8,
        n_heads=2,
    )
    return GeneratorConfig(**{**base, **kw})


@pytest.mark.parametrize("backbone", ["mamba2", "lstm", "transformer"])
def test_overfits_tiny_pairs(tmp_path, backbone):
    tok, data, _ = tiny_data()
    torch.manual_seed(0)
    model = Generator(tiny_config(tok, backbone=backbone), tok.layout.positions())
    rec = train(
        model, data, TrainConfig(steps=400, batch_size=2, lr=3e-3, ckpt_every=1000), tmp_path
    )
    losses = [float(r.split(",")[1]) for r in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 400 and rec["steps"] == 400
    assert losses[0] / min(losses[-10:]) > 100, (losses[0], losses[-10:])


@pytest.mark.parametrize("backbone", ["mamba2", "lstm", "transformer"])
def test_recomputing_the_blocks_trains_the_same_generator_on_less_memory(tmp_path, backbone):
    """`train.recompute` keeps only each block's input and runs the block again in the backward
    pass: the same losses and weights, bit for bit, and fewer saved activations."""
    tok, data, _ = tiny_data()
    runs = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = Generator(tiny_config(tok, backbone=backbone, n_layers=3), tok.layout.positions())
        cfg = TrainConfig(steps=5, batch_size=2, lr=3e-3, ckpt_every=1000, recompute=recompute)
        record = train(model, data, cfg, tmp_path / str(recompute))
        runs[recompute] = record, (tmp_path / str(recompute) / "loss.csv").read_text(), model
    (kept, kept_losses, a), (redone, redone_losses, b) = runs[False], runs[True]
    assert redone_losses == kept_losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert redone["activation_mb"] < kept["activation_mb"]
    # not part of the run's identity: a run saved with it resumes without it
    model = Generator(tiny_config(tok, backbone=backbone, n_layers=3), tok.layout.positions())
    cfg = TrainConfig(steps=5, batch_size=2, lr=3e-3, ckpt_every=1000, recompute=False)
    resumed = train(model, data, cfg, tmp_path / "True")
    assert resumed["steps"] == 5 and (tmp_path / "True" / "loss.csv").read_text() == redone_losses
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), b.parameters()))


def test_diffusion_head_learns_tiny_pairs(tmp_path):
    tok, data, _ = tiny_data()
    torch.manual_seed(0)
    cfg = tiny_config(tok, head="diffusion", diffusion={"n_steps": 100})
    model = Generator(cfg, tok.layout.positions())
    batch = data.batch(torch.arange(2))
    x, y, mask = batch["tokens"], batch["target"], batch["mask"].bool()

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
    assert (tmp_path / "full" / "loss.csv").read_text() == (
        tmp_path / "resumed" / "loss.csv"
    ).read_text()


def test_a_finished_run_restored_from_its_state_keeps_its_measurements(tmp_path):
    """Training again a run that is complete takes no step; its record keeps the activation memory
    measured on its first step (it used to be NaN)."""
    tok, data, _ = tiny_data()
    cfg = TrainConfig(steps=3, batch_size=2, lr=3e-3, ckpt_every=1000)
    records = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Generator(tiny_config(tok), tok.layout.positions())
        records.append(train(model, data, cfg, tmp_path))
    assert records[1]["steps"] == 3 and records[1]["activation_mb"] == records[0]["activation_mb"]
    assert records[0]["activation_mb"] > 0


def test_conditional_generator_and_quantize_end_to_end(tmp_path):
    specs = (QuantSpec(4, "group", 16), QuantSpec(8, "channel"))
    tok, data, sds = tiny_data(specs, conditional=True)
    assert data.conditions == [s.name for s in specs] and len(data) == 4
    qg = fit_generator(
        tok,
        data,
        tiny_config(tok, conditions=data.conditions),
        TrainConfig(steps=5, batch_size=2, ckpt_every=5),
        tmp_path / "gen",
    )
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
    qg = fit_generator(
        tok, data, tiny_config(tok), TrainConfig(steps=2, batch_size=2), tmp_path / "gen"
    )
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
    with pytest.raises(ValueError, match=r"strategy must be one of \('ddp', 'fsdp'\)"):
        TrainConfig(strategy="zero")


def torchrun(root, nproc, out, strategy="ddp", *args, nodes=1):
    """Train on root/data in `nproc` processes under torchrun (gloo) into root/out: its generator
    directory. With `nodes` > 1, that many torchrun agents on this machine, each starting `nproc`
    processes, meet at a c10d rendezvous as separate machines would (train.py's multi-node
    command)."""
    overrides = {
        "generator": {"d_state": 8, "headdim": 16, "chunk_size": 8},
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "ckpt_every": 3, "strategy": strategy},
    }
    (root / f"{out}.json").write_text(json.dumps(overrides))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    launch = [f"--nproc_per_node={nproc}", "--standalone"]
    if nodes > 1:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [f"--nproc_per_node={nproc}", f"--nnodes={nodes}", "--rdzv_backend=c10d"]
        launch += [f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={out}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "qg.generator.train"]
    cmd += ["--data", str(root / "data"), "--out", str(root / out)]
    cmd += ["--config", str(root / f"{out}.json"), "--device", "cpu", *args]
    agents = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(nodes)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    return QuantGen.load(root / out)


@pytest.fixture(scope="module")
def torchrun_root(tmp_path_factory):
    """A folder with the tiny data of the torchrun tests and, in single/, its 1-process run."""
    root = tmp_path_factory.mktemp("torchrun")
    tok, data, _ = tiny_data(n=4)
    tok.save(root / "data")
    data.save(root / "data" / "pairs.safetensors")
    torchrun(root, 1, "single")
    return root


@pytest.fixture(scope="module")
def fsdp_run(torchrun_root):
    """The 2-process run of the torchrun tests sharded with FSDP2, in fsdp/."""
    return torchrun(torchrun_root, 2, "fsdp", "fsdp")


def test_torchrun_data_parallel_matches_one_process(torchrun_root):
    ddp, single = torchrun(torchrun_root, 2, "ddp"), QuantGen.load(torchrun_root / "single")
    assert ddp.record["world_size"] == 2 and single.record["world_size"] == 1
    for (k, a), b in zip(ddp.model.state_dict().items(), single.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_two_nodes_meeting_at_a_rendezvous_train_what_one_process_does(torchrun_root):
    """train.py's multi-node launch (torchrun --nnodes 2 --rdzv_backend c10d), as two machines of
    one process each, here two agents on this one: the 1-process run's weights."""
    nodes, single = (
        torchrun(torchrun_root, 1, "nodes", nodes=2),
        QuantGen.load(torchrun_root / "single"),
    )
    assert nodes.record["world_size"] == 2
    for (k, a), b in zip(nodes.model.state_dict().items(), single.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_fully_sharded_matches_one_process_on_half_the_bytes(torchrun_root, fsdp_run):
    """strategy: fsdp at 2 processes: the 1-process loss curve and weights (up to float rounding),
    each process holding about half the parameter and AdamW bytes."""
    single = QuantGen.load(torchrun_root / "single")
    assert fsdp_run.record["world_size"] == 2 and fsdp_run.record["train"]["strategy"] == "fsdp"
    curves = [
        [
            [float(x) for x in row.split(",")]
            for row in (torchrun_root / run / "loss.csv").read_text().splitlines()[1:]
        ]
        for run in ("fsdp", "single")
    ]
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-5, atol=0)
    for (k, a), b in zip(fsdp_run.model.state_dict().items(), single.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)
    held = [
        r["param_bytes_per_rank"] + r["optimizer_bytes_per_rank"]
        for r in (fsdp_run.record, single.record)
    ]
    assert 0.4 < held[0] / held[1] < 0.6, held


def test_a_fully_sharded_run_resumes_exactly_and_in_one_process(torchrun_root, fsdp_run):
    """A 2-process fsdp run interrupted after step 3 and resumed ends as the uninterrupted one; its
    checkpoint (full tensors) resumes in one process too."""
    root = torchrun_root
    assert torchrun(root, 2, "resumed", "fsdp", "--stop-after", "3").record["steps"] == 3
    # a mark that only a resumed run carries on: the checkpoint's training time
    state = torch.load(root / "resumed" / "train_state.pt", weights_only=True)
    torch.save({**state, "elapsed": 1000.0}, root / "resumed" / "train_state.pt")
    shutil.copytree(root / "resumed", root / "resumed_alone")
    resumed = torchrun(root, 2, "resumed", "fsdp")
    assert resumed.record["train_seconds"] > 1000
    for (k, a), b in zip(fsdp_run.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    interrupted = QuantGen.load(root / "resumed_alone")
    alone = fit_generator(
        interrupted.tokenizer,
        TokenPairs.load(root / "data" / "pairs.safetensors"),
        interrupted.model.cfg,
        TrainConfig(**interrupted.record["train"]),
        root / "resumed_alone",
    )
    assert alone.record["world_size"] == 1 and alone.record["train_seconds"] > 1000
    for (k, a), b in zip(fsdp_run.model.state_dict().items(), alone.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("skip", ["add", "gain"])
def test_skip_generator_starts_as_its_input_on_weights(tmp_path, skip):
    """With a skip and a zeroed output layer, the prediction is the fp weight tokens (padding not
    copied)."""
    tok, data, _ = tiny_data()
    model = Generator.for_tokenizer(tiny_config(tok, skip=skip), tok)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    x, base = data.x[:1], data.base[:1]
    out = model.generate(x, base=base)
    weights = tok.layout.value_mask(SPEC, "fp")
    assert torch.equal(out[0][weights], x[0][weights]) and (out[0][~weights] == 0).all()
    with pytest.raises(ValueError, match="base tokens"):
        model.generate(x)
    with pytest.raises(ValueError, match="diffusion head"):
        tiny_config(tok, skip=skip, head="diffusion")
    with pytest.raises(ValueError, match="skip must be one of"):
        tiny_config(tok, skip="mul")
    rec = fit_generator(
        tok,
        data,
        tiny_config(tok, skip=skip),
        TrainConfig(steps=3, batch_size=2, ckpt_every=10),
        tmp_path,
    )
    back = QuantGen.load(tmp_path)
    assert back.model.cfg.skip == skip and torch.equal(
        back.model.generate(x, base=base), rec.model.generate(x, base=base)
    )


def test_log_scale_tokens_round_trip_and_segment_weights():
    sds = tiny_checkpoints(2)
    qs = {SPEC: [quantize_state_dict(sd, SPEC) for sd in sds]}
    tok = Tokenizer.fit(sds, qs, 32, log_scale=True)
    back = tok.decode_quantized(tok.encode_quantized(qs[SPEC][0], SPEC), SPEC)
    for name, qt in back.items():
        assert torch.equal(qt.codes, qs[SPEC][0][name].codes)
        assert torch.allclose(qt.scale, qs[SPEC][0][name].scale, rtol=1e-5)
    element, segment = loss_weights(tok, SPEC), loss_weights(tok, SPEC, "segment")
    mask = tok.loss_mask(SPEC)
    assert torch.equal(element, mask.float()) and torch.equal(segment > 0, mask)
    assert segment[mask].mean().item() == pytest.approx(1)
    totals = [
        segment.view(-1)[s.start * 32 : s.start * 32 + tok.layout.numel(s, SPEC)].sum().item()
        for s in tok.layout.segments
    ]
    assert max(totals) == pytest.approx(min(totals))  # every (layer, kind) segment weighs the same
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weights(tok, SPEC, "balanced")


def test_a_run_saved_before_new_settings_existed_resumes(tmp_path):
    """A train_state.pt whose stored settings lack fields added later (skip, loss_weighting) still
    resumes."""
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
        train(
            model,
            weighted,
            TrainConfig(steps=1, batch_size=2, loss_weighting="segment", mask_padding=False),
            tmp_path,
        )


def residual_data(specs=(SPEC,), n=3, targets=None):
    """A residual tokenizer and pairs; `targets(sd, spec)` makes each target (default: RTN, i.e.
    PTQ)."""
    sds = tiny_checkpoints(n)
    qs = {
        s: [targets(sd, s) if targets else quantize_state_dict(sd, s) for sd in sds] for s in specs
    }
    tok = Tokenizer.fit(sds, qs, 32, target="residual")
    return tok, TokenPairs.build(tok, sds, qs, conditional=len(specs) > 1), sds, qs


@pytest.mark.parametrize("skip", ["none", "add", "gain"])
def test_an_untrained_residual_generator_is_ptq(skip):
    """Zeroed offsets decode to round-to-nearest of the input: codes, S and Z exactly PTQ's."""
    specs = (
        QuantSpec(3, "group", group_size=16),
        QuantSpec(8, "channel"),
        QuantSpec(4, "group", 16, "asymmetric"),
    )
    tok, data, sds, qs = residual_data(specs)
    # PTQ targets: no real value departs from RTN
    assert (data.y * data.masks[data.cond]).abs().max() == 0
    torch.manual_seed(0)
    gen = QuantGen(
        Generator.for_tokenizer(
            tiny_config(tok, skip=skip, target="residual", conditions=data.conditions), tok
        ),
        tok,
    )
    for spec in specs:
        qsd, _ = gen.quantize(sds[1], spec)
        for name, qt in qs[spec][1].items():
            if isinstance(qt, QTensor):
                assert torch.equal(qsd[name].codes, qt.codes), (spec, name)
                assert torch.equal(qsd[name].scale, qt.scale), (spec, name)
                assert torch.equal(qsd[name].zero, qt.zero), (spec, name)
    batch = data.batch(torch.arange(len(data)), torch.eye(len(data.conditions)))
    # RTN is inside every dead zone: PTQ targets train nothing away
    assert gen.model(**batch).item() == 0
    with pytest.raises(ValueError, match="target"):
        Generator.for_tokenizer(tiny_config(tok, skip=skip, conditions=data.conditions), tok)
    with pytest.raises(ValueError, match="diffusion"):
        tiny_config(tok, target="residual", head="diffusion")


def test_residual_tokens_round_trip_offsets_and_log_ratio_of_s():
    """A target that departs from RTN (codes +1 where w/S sits above the middle, S x 1.1) is encoded
    as offsets / log ratios scaled by their RMS and decoded back exactly; S decodes through exp,
    always > 0."""
    from qg.quant.quantizer import quantize, quantize_with, remainder

    def shifted(sd, spec):
        out = {}
        for k, w in sd.items():
            if w.ndim < 2:
                out[k] = w
                continue
            rtn = quantize(w, spec)
            up = (remainder(w, rtn) > 0.25).to(torch.int8)
            q = quantize_with(w, rtn.scale * 1.1, rtn.zero, spec)
            out[k] = QTensor((rtn.codes + up).clamp(spec.qmin, spec.qmax), q.scale, q.zero, spec)
        return out

    tok, data, sds, qs = residual_data(targets=shifted)
    for sd, qsd in zip(sds, qs[SPEC]):
        tokens = tok.encode_quantized(qsd, SPEC, sd)
        for name, qt in tok.decode_quantized(tokens, SPEC, sd).items():
            assert torch.equal(qt.codes, qsd[name].codes), name
            torch.testing.assert_close(qt.scale, qsd[name].scale, rtol=1e-5, atol=0)
    stats = tok.q_stats[SPEC.name]
    assert (stats[:, :, 0] == 0).all()  # no mean shift: zero tokens stay RTN
    # RMS of log(S / S_rtn)
    assert torch.allclose(stats[:, 1, 1], torch.tensor(1.1).log(), rtol=1e-4)
    r = tok.base_tokens(sds[0], SPEC)[tok.layout.value_mask(SPEC, "fp")] * stats[0, 0, 1]
    assert r.abs().max() <= 0.5 + 1e-5  # remainders of RTN, in code units
    tol, codes = loss_tolerance(tok, tokens, SPEC) * stats[0, 0, 1], tokens * stats[0, 0, 1]
    # the first layer's code offsets
    first = slice(0, tok.layout.numel(tok.layout.segments[0], SPEC))
    departs = codes.view(-1)[first].abs() > 0.5
    moved, kept = tol.view(-1)[first][departs], tol.view(-1)[first][~departs]
    assert departs.any() and torch.allclose(moved, torch.full_like(moved, 0.4))
    assert torch.allclose(kept, torch.full_like(kept, 0.5))
    huge = tok.decode_quantized(torch.full(tok.shape, 1e4), SPEC, sds[0])
    assert all(torch.isfinite(q.scale).all() and (q.scale > 0).all() for q in huge.values())
    with pytest.raises(ValueError, match="pass its state_dict"):
        tok.decode_quantized(tokens, SPEC)
    with pytest.raises(ValueError, match="target must be one of"):
        Tokenizer.fit(sds, qs, 32, target="delta")


def test_a_residual_generator_learns_a_departure_from_rtn(tmp_path):
    """Targets that round up wherever the remainder exceeds 0.25: the gain skip on the remainder can
    express round(r + 0.25), so a short training run recovers most of the changed codes that RTN
    gets wrong."""
    from qg.quant.quantizer import quantize, remainder

    def up(sd, spec):
        return {
            k: QTensor(
                (
                    quantize(w, spec).codes
                    + (remainder(w, quantize(w, spec)) > 0.25).to(torch.int8)
                ).clamp(spec.qmin, spec.qmax),
                quantize(w, spec).scale,
                quantize(w, spec).zero,
                spec,
            )
            if w.ndim >= 2
            else w
            for k, w in sd.items()
        }

    tok, data, sds, qs = residual_data(targets=up, n=4)
    torch.manual_seed(0)
    cfg = tiny_config(tok, skip="gain", target="residual")
    gen = fit_generator(
        tok, data, cfg, TrainConfig(steps=300, batch_size=2, lr=3e-3, ckpt_every=1000), tmp_path
    )
    qsd, _ = gen.quantize(sds[0], SPEC)
    target, rtn = qs[SPEC][0], quantize_state_dict(sds[0], SPEC)
    moved = {k: target[k].codes != rtn[k].codes for k in target if isinstance(target[k], QTensor)}
    right = sum(int((qsd[k].codes == target[k].codes)[m].sum()) for k, m in moved.items())
    assert right / sum(int(m.sum()) for m in moved.values()) > 0.6
    assert QuantGen.load(tmp_path).tokenizer.target == "residual"


def rtn_base_data(specs=(SPEC,), n=3):
    sds = tiny_checkpoints(n)
    qs = {s: [quantize_state_dict(sd, s) for sd in sds] for s in specs}
    tok = Tokenizer.fit(sds, qs, 32, log_scale=True, base="rtn")
    return tok, TokenPairs.build(tok, sds, qs, conditional=len(specs) > 1), sds, qs


def test_the_rtn_base_is_within_half_a_step_of_ptq_and_an_untrained_generator_on_it_is_ptq(
    tmp_path,
):
    """`base: rtn`: the skip adds to RTN of the input (codes before rounding), so a PTQ target's
    codes are within half a step of the base, S and Z equal it, the zero-initialised head decodes to
    PTQ exactly and its loss, inside the rounding dead zone, is zero."""
    specs = (
        QuantSpec(3, "group", group_size=16),
        QuantSpec(8, "channel"),
        QuantSpec(4, "group", 16, "asymmetric"),
    )
    tok, data, sds, qs = rtn_base_data(specs)
    stats = {s: tok.q_stats[s.name] for s in specs}
    for i, spec in enumerate(specs):
        rows = data.cond == i
        gap = (data.y[rows] - data.base[rows]) * data.masks[i]
        # in code units: a code's gap is its rounding, S and Z have none
        for seg in tok.layout.segments:
            at = slice(seg.start, seg.start + seg.n_tokens)
            step = float(
                stats[spec][seg.layer_index, ("weight", "scale", "zero").index(seg.kind), 1]
            )
            bound = 0.5 + 1e-4 if seg.kind == "weight" else 1e-4
            assert (gap[:, at] * step).abs().max() <= bound, (spec.name, seg.kind)
    torch.manual_seed(0)
    gen = QuantGen(
        Generator.for_tokenizer(tiny_config(tok, skip="add", conditions=data.conditions), tok), tok
    )
    for spec in specs:
        qsd, _ = gen.quantize(sds[1], spec)
        for name, qt in qs[spec][1].items():
            if isinstance(qt, QTensor):
                assert torch.equal(qsd[name].codes, qt.codes), (spec.name, name)
                torch.testing.assert_close(qsd[name].scale, qt.scale, rtol=1e-5, atol=0)
                assert torch.equal(qsd[name].zero, qt.zero), (spec.name, name)
    batch = data.batch(torch.arange(len(data)), torch.eye(len(data.conditions)))
    # PTQ is inside every dead zone: PTQ targets train nothing away
    assert gen.model(**batch).item() == 0
    gen.save(tmp_path)
    assert QuantGen.load(tmp_path).tokenizer.base == "rtn"


def test_rounding_ties_keep_the_rtn_base_exact_through_training(tmp_path):
    """Weights that sit on a rounding tie (w / S = k + 1/2) come out of the normalisation a hair
    past the boundary: they keep RTN's code, so the loss of RTN is exactly zero, every gradient is
    zero, and training a generator on the RTN base on PTQ targets takes no step and would change
    none of its codes if it did (before the tie margin these positions counted as departures, the
    loss was 1e-6 here and AdamW made codes drift). Only float error can still round an exact tie
    the other way, on a few of them."""
    sds = tiny_checkpoints(3, shapes=(("a.weight", (16, 32)), ("a.bias", (16,))))
    # every group of a.weight: its max at code 127, the others on ties k + 1/2 of that step
    for sd in sds:
        w = sd["a.weight"].view(16, -1, 16)
        step = w.abs().amax(-1, keepdim=True) / 127
        k = torch.randint(-100, 100, w.shape, generator=torch.Generator().manual_seed(1)).float()
        w.copy_(torch.where(w.abs() == w.abs().amax(-1, keepdim=True), w, (k + 0.5) * step))
    qs = {SPEC: [quantize_state_dict(sd, SPEC) for sd in sds]}
    tok = Tokenizer.fit(sds, qs, 32, log_scale=True, base="rtn")
    data = TokenPairs.build(tok, sds, qs)
    stats = tok.q_stats[SPEC.name]
    gap = ((data.y - data.base) * stats[0, 0, 1]).view(len(sds), -1)[:, : 16 * 32].abs()
    assert ((gap - 0.5).abs() < 1e-3).float().mean() > 0.5  # most of a.weight's codes are ties
    torch.manual_seed(0)
    model = Generator.for_tokenizer(tiny_config(tok, skip="add"), tok)
    assert model(**data.batch(torch.arange(len(data)))).item() == 0
    before, _ = QuantGen(model, tok).quantize(sds[0], SPEC)
    record = train(
        model,
        data,
        TrainConfig(steps=20, batch_size=2, lr=1e-2, warmup=2, ckpt_every=100),
        tmp_path / "a",
    )
    # at the minimum: no step
    assert record["exact_at_start"] and record["steps"] == 0 and record["final_loss"] == 0
    # the steps it skips would change nothing (weight decay, which would, keeps them: the zero head
    # stays zero)
    record = train(
        model,
        data,
        TrainConfig(steps=20, batch_size=2, lr=1e-2, warmup=2, weight_decay=1e-2),
        tmp_path / "b",
    )
    assert not record["exact_at_start"] and record["steps"] == 20 and record["final_loss"] == 0
    after, _ = QuantGen(model, tok).quantize(sds[0], SPEC)
    ptq = qs[SPEC][0]["a.weight"].codes
    assert torch.equal(after["a.weight"].codes, before["a.weight"].codes)
    assert (after["a.weight"].codes != ptq).sum() <= 0.01 * ptq.numel()


def test_the_rtn_base_is_refused_where_it_means_nothing():
    tok, data, sds, qs = rtn_base_data()
    with pytest.raises(ValueError, match="skip: add"):
        Generator.for_tokenizer(tiny_config(tok, skip="gain"), tok)
    with pytest.raises(ValueError, match="residual"):
        Tokenizer.fit(sds, qs, 32, target="residual", base="rtn")
    with pytest.raises(ValueError, match="base must be one of"):
        Tokenizer.fit(sds, qs, 32, base="weight")


class _Planted:
    """What a malicious pickle holds: loading it would call os.system."""

    def __reduce__(self):
        return (os.system, ("echo planted",))


def test_a_pickle_planted_as_the_resume_point_is_not_loaded(tmp_path, capfd):
    import pickle

    from qg.generator.parallel import read_checkpoint

    planted = tmp_path / "train_state.pt"
    planted.write_bytes(pickle.dumps({"step": _Planted()}))
    assert read_checkpoint(planted, "cpu") is None
    err = capfd.readouterr()  # file descriptors: os.system would write there
    assert (
        f"{planted} holds more than tensors (a pickle that could run code: not loaded)" in err.err
    )
    assert "planted" not in err.out
