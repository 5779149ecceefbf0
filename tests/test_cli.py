"""`python -m qg quantize` / `evaluate`: the way to use a trained generator on your own
checkpoint."""

import pytest
from fakes import TINY_MIXER, TINY_VIT, checkpoints

from qg.__main__ import main
from qg.generator.model import GeneratorConfig
from qg.generator.pairs import TokenPairs
from qg.generator.tokenizer import Tokenizer
from qg.generator.train import TrainConfig, fit_generator
from qg.quant.fileformat import read_quantized
from qg.quant.quantizer import QuantSpec, quantize_state_dict
from qg.targets.models import ModelSpec, save_checkpoint

SPEC = QuantSpec(4, "group", 16)


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    sds = checkpoints(TINY_VIT, 3)
    qs = {SPEC: [quantize_state_dict(sd, SPEC) for sd in sds]}
    tok = Tokenizer.fit(sds, qs, 64)
    cfg = GeneratorConfig(
        token_size=64, n_tokens=tok.shape[0], d_state=16, headdim=16, chunk_size=32
    )
    fit_generator(tok, TokenPairs.build(tok, sds, qs), cfg, TrainConfig(steps=5, ckpt_every=5), out)
    return out


def _checkpoint(tmp_path, spec=TINY_VIT, name="ckpt.safetensors"):
    path = tmp_path / name
    save_checkpoint(
        path, checkpoints(spec, 1, seed=7)[0], ModelSpec(spec.arch, spec.kwargs, "digits")
    )
    return path


def test_quantize_then_evaluate(generator_dir, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    main(_quantize_args(generator_dir, _checkpoint(tmp_path), out))
    qsd, spec, meta = read_quantized(out)
    assert spec == SPEC and meta["method"] == "gen" and meta["seconds"] > 0
    assert all(
        q.codes.min() >= SPEC.qmin and q.codes.max() <= SPEC.qmax
        for q in qsd.values()
        if hasattr(q, "codes")
    )
    main(["evaluate", str(out), "--test-subset", "50"])
    simulated = capsys.readouterr().out
    main(["evaluate", str(out), "--test-subset", "50", "--runtime"])
    packed = capsys.readouterr().out
    assert "top-1" in simulated and "bits per quantized weight (format version 2)" in simulated
    assert (
        "(packed runtime)" in packed
        and packed.split("top-1 ")[1][:6] == simulated.split("top-1 ")[1][:6]
    )
    with pytest.raises(
        SystemExit, match="full-precision checkpoint: --runtime runs quantized model files only"
    ):
        main(["evaluate", str(tmp_path / "ckpt.safetensors"), "--runtime"])


@pytest.mark.parametrize(
    "change, message",
    [
        (["--bits", "3"], "trained for"),
        (["--bits", "9"], "bits must be an integer in 2..8"),
    ],
)
def test_unsupported_setting_is_a_clear_error(generator_dir, tmp_path, change, message, capsys):
    args = _quantize_args(generator_dir, _checkpoint(tmp_path), tmp_path / "q.safetensors")
    args[args.index("--bits") : args.index("--bits") + 2] = change
    with pytest.raises(SystemExit, match=message):
        main(args)
    assert not (tmp_path / "q.safetensors").exists()


def test_checkpoint_of_another_architecture_is_refused(generator_dir, tmp_path):
    with pytest.raises(SystemExit, match="does not match the tokenizer layout"):
        main(
            _quantize_args(
                generator_dir, _checkpoint(tmp_path, TINY_MIXER), tmp_path / "q.safetensors"
            )
        )


def test_missing_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="not a generator directory"):
        main(_quantize_args(tmp_path / "nothing", "x", tmp_path / "q.safetensors"))
    with pytest.raises(SystemExit, match="does not exist"):
        main(["evaluate", str(tmp_path / "missing.safetensors")])
    with pytest.raises(SystemExit, match="is a folder, not a file: give the file inside it"):
        main(["evaluate", str(tmp_path)])


def _quantize_args(generator_dir, checkpoint, out, *extra):
    return [
        "quantize",
        "--generator",
        str(generator_dir),
        "--checkpoint",
        str(checkpoint),
        "--bits",
        "4",
        "--granularity",
        "group",
        "-o",
        str(out),
        *extra,
    ]


def test_quantize_never_destroys_its_input(generator_dir, tmp_path):
    ckpt = _checkpoint(tmp_path)
    before = (
        ckpt.read_bytes(),
        {p.name: p.read_bytes() for p in generator_dir.iterdir() if p.is_file()},
    )
    for out, message in (
        (ckpt, "would overwrite an input"),
        (generator_dir / "weights.safetensors", "would overwrite"),
        (generator_dir, "would overwrite"),
        (tmp_path, "is a directory"),
        (ckpt / "q.safetensors", "is a file, not a directory"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(_quantize_args(generator_dir, ckpt, out))
    assert (
        ckpt.read_bytes(),
        {p.name: p.read_bytes() for p in generator_dir.iterdir() if p.is_file()},
    ) == before
    out = tmp_path / "q.safetensors"
    main(_quantize_args(generator_dir, ckpt, out))
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(_quantize_args(generator_dir, ckpt, out))
    main(_quantize_args(generator_dir, ckpt, out, "--force"))


def test_group_size_must_be_positive(generator_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            _quantize_args(
                generator_dir,
                _checkpoint(tmp_path),
                tmp_path / "q.safetensors",
                "--group-size",
                "0",
            )
        )
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def _damaged(src, dst, tensors=None, metadata=None):
    """A copy of a safetensors file with some tensors or metadata entries replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        t, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file({**t, **(tensors(t) if tensors else {})}, str(dst), {**meta, **(metadata or {})})
    return dst


def test_evaluate_refuses_damaged_files(generator_dir, tmp_path, capsys):
    import torch

    good = tmp_path / "q.safetensors"
    main(_quantize_args(generator_dir, _checkpoint(tmp_path), good))
    name = next(k for k in read_quantized(good)[0] if k.endswith(".weight"))
    cases = [
        (
            lambda t: {f"{name}.scale": torch.full_like(t[f"{name}.scale"], float("nan"))},
            None,
            "scales that are not finite",
        ),
        # packed byte 0 unpacks to codes of -8, which the 4-bit symmetric scheme cannot hold
        (
            lambda t: {f"{name}.qweight": torch.zeros_like(t[f"{name}.qweight"])},
            None,
            "codes outside -7..7",
        ),
        (
            lambda t: {f"{name}.zero": torch.ones_like(t[f"{name}.scale"])},
            None,
            "non-zero zero point",
        ),
        (None, {"meta": "{not json"}, "metadata entry `meta` is not valid JSON"),
    ]
    for i, (tensors, metadata, message) in enumerate(cases):
        with pytest.raises(SystemExit, match=message):
            main(
                [
                    "evaluate",
                    str(_damaged(good, tmp_path / f"bad{i}.safetensors", tensors, metadata)),
                ]
            )


def test_evaluate_refuses_nan_weights_and_huge_descriptions(tmp_path, capsys):
    import json

    import torch

    ckpt = _checkpoint(tmp_path)
    nan = _damaged(
        ckpt,
        tmp_path / "nan.safetensors",
        lambda t: {
            k: torch.full_like(v, float("nan")) for k, v in t.items() if k.endswith("head.bias")
        },
    )
    with pytest.raises(SystemExit, match="NaN/inf values in 1 tensor.*--allow-nonfinite"):
        main(["evaluate", str(nan)])
    main(["evaluate", str(nan), "--allow-nonfinite", "--test-subset", "20"])
    assert "warning" in capsys.readouterr().err
    huge = {
        "arch": TINY_VIT.arch,
        "kwargs": {**TINY_VIT.kwargs, "embed_dim": 200000, "depth": 64},
        "dataset": "digits",
    }
    with pytest.raises(SystemExit, match="over the limit"):
        main(
            [
                "evaluate",
                str(
                    _damaged(
                        ckpt, tmp_path / "huge.safetensors", metadata={"model": json.dumps(huge)}
                    )
                ),
            ]
        )


def test_quantize_with_qwt_writes_the_compensations_and_says_when_data_is_missing(
    generator_dir, tmp_path, capsys, monkeypatch
):
    from qg.targets.runtime import load_runtime

    out = tmp_path / "q.safetensors"
    main(_quantize_args(generator_dir, _checkpoint(tmp_path), out, "--qwt", "32"))
    qsd, _, meta = read_quantized(out)
    assert (
        meta["method"] == "gen+qwt"
        and meta["qwt"]["images"] == 32
        and meta["qwt"]["split"] == "train"
    )
    assert any(k.startswith("qwt.blocks.") for k in qsd) and "QwT on" in capsys.readouterr().out
    assert load_runtime(out)[0] is not None
    # a model of a dataset that is not on this machine (QG_DATA names an empty folder)
    fashion = tmp_path / "fm.safetensors"
    save_checkpoint(
        fashion,
        checkpoints(TINY_VIT, 1, seed=7)[0],
        ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "fashion_mnist"),
    )
    (tmp_path / "no-data-here").mkdir()
    monkeypatch.setenv("QG_DATA", str(tmp_path / "no-data-here"))
    monkeypatch.setattr(
        "qg.targets.sources._download_fashion_mnist", lambda target: "no network (test)"
    )
    with pytest.raises(
        SystemExit,
        match="(?s)--qwt fits on 32 images of the training split of fashion_mnist.*Omit --qwt",
    ):
        main(_quantize_args(generator_dir, fashion, tmp_path / "q2.safetensors", "--qwt", "32"))


def test_a_file_that_no_longer_matches_its_sidecar_is_refused(generator_dir, tmp_path):
    """A quantized file with 64 bytes overwritten still reads as a valid model (codes in range),
    so only its `.sha256` can tell: `evaluate` refuses it with one line naming the file, and
    `quantize` refuses a checkpoint the same way; a file without a sidecar is left to its reader."""
    from qg.core.io import record_hash

    good = tmp_path / "q.safetensors"
    main(_quantize_args(generator_dir, _checkpoint(tmp_path), good))
    record_hash(good)
    blob = bytearray(good.read_bytes())
    blob[-200:-136] = b"\x7f" * 64
    good.write_bytes(bytes(blob))
    with pytest.raises(SystemExit, match=r"q\.safetensors does not match the hash recorded in"):
        main(["evaluate", str(good)])
    ckpt = _checkpoint(tmp_path, name="c.safetensors")
    record_hash(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-4] + b"\x00\x00\x80\x7f")
    with pytest.raises(SystemExit, match=r"c\.safetensors does not match the hash"):
        main(_quantize_args(generator_dir, ckpt, tmp_path / "out.safetensors"))


def test_export_writes_a_file_hqq_loads(generator_dir, tmp_path, capsys):
    """`python -m qg export` on a generated file: hqq's HQQLinear holds its Linear layers, the
    output says which layers stay float32 and why, and the file is never written over its input."""
    from qg.targets.export import load_hqq

    good = tmp_path / "q.safetensors"
    main(_quantize_args(generator_dir, _checkpoint(tmp_path), good))
    capsys.readouterr()
    main(["export", str(good), "-o", str(tmp_path / "hqq.safetensors")])
    said = capsys.readouterr().out
    assert "quantized layers as hqq's HQQLinear" in said
    assert "patch_embed.proj: float32, hqq quantizes Linear layers only" in said
    assert load_hqq(tmp_path / "hqq.safetensors") is not None
    with pytest.raises(SystemExit, match="would overwrite an input"):
        main(["export", str(good), "-o", str(good)])
