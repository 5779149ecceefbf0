"""`python -m qg quantize` / `evaluate`: the way to use a trained generator on your own checkpoint."""

import pytest
from fakes import TINY_MIXER, TINY_VIT, checkpoints

from qg.__main__ import main
from qg.generator import GeneratorConfig
from qg.models import ModelSpec, save_checkpoint
from qg.quant import QuantSpec, quantize_state_dict, read_quantized
from qg.tokenizer import Tokenizer
from qg.train import TokenPairs, TrainConfig, fit_generator

SPEC = QuantSpec(4, "group", 16)


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    sds = checkpoints(TINY_VIT, 3)
    qs = {SPEC: [quantize_state_dict(sd, SPEC) for sd in sds]}
    tok = Tokenizer.fit(sds, qs, 64)
    cfg = GeneratorConfig(token_size=64, n_tokens=tok.shape[0], d_state=16, headdim=16, chunk_size=32)
    fit_generator(tok, TokenPairs.build(tok, sds, qs), cfg, TrainConfig(steps=5, ckpt_every=5), out)
    return out


def _checkpoint(tmp_path, spec=TINY_VIT, name="ckpt.safetensors"):
    path = tmp_path / name
    save_checkpoint(path, checkpoints(spec, 1, seed=7)[0], ModelSpec(spec.arch, spec.kwargs, "digits"))
    return path


def test_quantize_then_evaluate(generator_dir, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    main(["quantize", "--generator", str(generator_dir), "--checkpoint", str(_checkpoint(tmp_path)),
          "--bits", "4", "--granularity", "group", "-o", str(out)])
    qsd, spec, meta = read_quantized(out)
    assert spec == SPEC and meta["method"] == "gen" and meta["seconds"] > 0
    assert all(q.codes.min() >= SPEC.qmin and q.codes.max() <= SPEC.qmax for q in qsd.values() if hasattr(q, "codes"))
    main(["evaluate", str(out), "--test-subset", "50"])
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (["--bits", "3"], "trained for"),
    (["--bits", "9"], "bits must be an integer in 2..8"),
])
def test_unsupported_setting_is_a_clear_error(generator_dir, tmp_path, change, message, capsys):
    args = ["quantize", "--generator", str(generator_dir), "--checkpoint", str(_checkpoint(tmp_path)),
            "--bits", "4", "--granularity", "group", "-o", str(tmp_path / "q.safetensors")]
    args[args.index("--bits"):args.index("--bits") + 2] = change
    with pytest.raises(SystemExit, match=message):
        main(args)
    assert not (tmp_path / "q.safetensors").exists()


def test_checkpoint_of_another_architecture_is_refused(generator_dir, tmp_path):
    with pytest.raises(SystemExit, match="does not match the tokenizer layout"):
        main(["quantize", "--generator", str(generator_dir), "--checkpoint", str(_checkpoint(tmp_path, TINY_MIXER)),
              "--bits", "4", "--granularity", "group", "-o", str(tmp_path / "q.safetensors")])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="not a generator directory"):
        main(["quantize", "--generator", str(tmp_path), "--checkpoint", "x", "--bits", "4", "--granularity", "group",
              "-o", str(tmp_path / "q.safetensors")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["evaluate", str(tmp_path / "missing.safetensors")])
