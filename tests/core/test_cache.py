"""The cache rule: artifacts are made once, their hash recorded, and rebuilt when damaged instead of
trusted."""

import os
import time

import pytest
import torch
from fakes import TINY_VIT, checkpoints

from qg.core.io import (
    CACHE_FORMAT,
    FORMAT_FILE,
    HASH_SUFFIX,
    STALE_TMP_SECONDS,
    atomic_write,
    cached,
    claim_cache,
    read_safetensors,
    record_hash,
    save_safetensors,
    verified,
)
from qg.generator.directory import QuantGen
from qg.generator.model import Generator, GeneratorConfig
from qg.generator.pairs import TokenPairs
from qg.generator.tokenizer import Tokenizer
from qg.generator.train import TrainConfig, _resume, fit_generator
from qg.quant.quantizer import QuantSpec, quantize_state_dict
from qg.study.training import TrainSpec, train_model
from qg.targets.models import ModelSpec


def _maker(calls):
    def make(path):
        calls.append(path)
        save_safetensors({"x": torch.arange(1000.0)}, path)

    return make


def _flip(path, at=None):
    data = bytearray(path.read_bytes())
    data[at if at is not None else len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_cached_makes_once_and_rebuilds_damaged_files(tmp_path, capsys):
    calls, out = [], tmp_path / "a.safetensors"
    assert cached(out, _maker(calls)) == out and len(calls) == 1
    assert (tmp_path / ("a.safetensors" + HASH_SUFFIX)).is_file()
    cached(out, _maker(calls))
    assert len(calls) == 1  # a good file is read back
    # one flipped byte inside the tensor data: still a readable file
    _flip(out, at=len(out.read_bytes()) - 7)
    read_safetensors(out)
    cached(out, _maker(calls))
    assert len(calls) == 2 and "does not match its recorded hash" in capsys.readouterr().err
    assert torch.equal(read_safetensors(out)[0]["x"], torch.arange(1000.0))
    out.write_bytes(out.read_bytes()[:100])  # truncated
    cached(out, _maker(calls))
    assert len(calls) == 3 and verified(out)
    out.unlink()
    cached(out, _maker(calls))
    assert len(calls) == 4


def test_a_file_without_a_recorded_hash_is_rebuilt_not_trusted(tmp_path, capsys):
    out, calls = tmp_path / "old.safetensors", []
    save_safetensors({"x": torch.ones(3)}, out)  # its sidecar lost, or planted by another tool
    assert not verified(out) and not out.exists()
    assert "has no recorded hash" in capsys.readouterr().err
    save_safetensors({"x": torch.ones(3)}, out)
    cached(out, _maker(calls))
    assert calls == [out] and torch.equal(read_safetensors(out)[0]["x"], torch.arange(1000.0))


def test_a_cache_of_an_older_format_is_set_aside_and_a_newer_one_refused(tmp_path, capsys):
    root = tmp_path / "artifacts" / "smoke"
    assert claim_cache(root).is_dir() and (root / FORMAT_FILE).read_text() == f"{CACHE_FORMAT}\n"
    (root / "ptq").mkdir()
    claim_cache(root)  # its own format: kept as it is
    assert (root / "ptq").is_dir() and not capsys.readouterr().err
    (root / FORMAT_FILE).unlink()  # a cache written before formats were recorded: format 1
    claim_cache(root)
    old = tmp_path / "artifacts" / "smoke.format-1"
    assert (old / "ptq").is_dir() and sorted(p.name for p in root.iterdir()) == [FORMAT_FILE]
    assert f"kept as {old}" in capsys.readouterr().err
    (root / "ptq").mkdir()
    (root / FORMAT_FILE).unlink()
    claim_cache(root)  # a second old cache does not overwrite the first
    assert (tmp_path / "artifacts" / "smoke.format-1.2" / "ptq").is_dir() and old.is_dir()
    (root / FORMAT_FILE).write_text(f"{CACHE_FORMAT + 1}\n")
    with pytest.raises(ValueError, match="newer than this qg"):
        claim_cache(root)


def test_a_killed_write_leaves_no_temporary_file_for_ever(tmp_path):
    out = tmp_path / "f.json"
    stale, fresh = tmp_path / ".f.json.abc123.tmp", tmp_path / ".f.json.def456.tmp"
    stale.write_text("half")
    fresh.write_text("another process writing now")
    old = time.time() - STALE_TMP_SECONDS - 1
    os.utime(stale, (old, old))
    with atomic_write(out, "w") as f:
        f.write("{}")
    assert not stale.exists() and fresh.exists()
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        with atomic_write(tmp_path, "w") as f:
            f.write("x")


def test_a_run_that_lost_a_checkpoint_is_trained_again(tmp_path, capsys):
    spec = ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "digits")
    run = TrainSpec("digits", epochs=1, lr=1e-3, batch_size=16, train_subset=64)
    paths, _ = train_model(spec, run, None, 0, tmp_path, n_checkpoints=2)
    first, meta = read_safetensors(paths[1])
    paths[1].unlink()
    again, _ = train_model(spec, run, None, 0, tmp_path, n_checkpoints=2)
    # (safetensors orders metadata keys at random: not the bytes)
    tensors, meta_again = read_safetensors(again[1])
    # seeded
    assert (
        again == paths
        and meta_again == meta
        and all(torch.equal(first[k], tensors[k]) for k in first)
    )
    assert "lost a checkpoint" in capsys.readouterr().err


def test_a_damaged_generator_is_not_loaded_and_a_truncated_training_state_restarts(
    tmp_path, capsys
):
    spec = QuantSpec(4, "group", 16)
    sds = checkpoints(TINY_VIT, 2)
    qs = {spec: [quantize_state_dict(sd, spec) for sd in sds]}
    tok = Tokenizer.fit(sds, qs, 64)
    cfg = GeneratorConfig(
        token_size=64, n_tokens=tok.shape[0], d_state=16, headdim=16, chunk_size=32
    )
    data, train_cfg = TokenPairs.build(tok, sds, qs), TrainConfig(steps=4, ckpt_every=2)
    fit_generator(tok, data, cfg, train_cfg, tmp_path)
    assert QuantGen.complete(tmp_path)
    _flip(tmp_path / "generator.safetensors", at=-5)
    assert (
        not QuantGen.complete(tmp_path)
        and "generator.safetensors does not match" in capsys.readouterr().err
    )
    state = tmp_path / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    # a damaged resume point is only a resume point: start over, warned
    net = Generator.for_tokenizer(cfg, tok)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step, losses, seconds, activation_mb = _resume(state, {}, net, opt, sched, "cpu")
    assert (step, losses, seconds) == (0, [], 0.0) and activation_mb != activation_mb  # NaN
    assert "unreadable" in capsys.readouterr().err


def test_caches_know_the_data_they_were_computed_from(tmp_path, monkeypatch, capsys):
    """Wrong test labels, then the right ones under the same file names: the cached score is
    computed again; other training data under the same names retrains the run (both were kept
    before), within one process."""
    import numpy as np
    from fakes import write_fashion_mnist, write_idx

    from qg.config.blocks import Eval
    from qg.study.scoring import Scorer
    from qg.targets.models import build_model, save_checkpoint, state_dict_of

    monkeypatch.setenv("QG_DATA", str(tmp_path / "data"))
    write_fashion_mnist(tmp_path / "data", n_train=64, n_test=40)
    spec = ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "fashion_mnist")
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.safetensors"
    save_checkpoint(ckpt, state_dict_of(build_model(spec)), spec)
    scorer = Scorer(Eval(test_subset=None), 0)
    pred, labels = scorer.predictions(ckpt)
    wrong = (labels + 1) % 10
    write_idx(tmp_path / "data" / "t10k-labels-idx1-ubyte.gz", wrong.numpy().astype(np.uint8))
    # the same process (a notebook kernel that outlives a rerun of the data): its memos see the new
    # files
    _, labels_now = Scorer(Eval(test_subset=None), 0).predictions(ckpt)
    assert torch.equal(labels_now, wrong) and "inputs that have changed" in capsys.readouterr().err

    run = TrainSpec("fashion_mnist", epochs=1, lr=1e-3, batch_size=16)
    first, _ = train_model(spec, run, None, 0, tmp_path / "runs", n_checkpoints=1)
    before = read_safetensors(first[0])[0]["head.weight"]
    # other images, same names
    write_fashion_mnist(tmp_path / "data", n_train=64, n_test=40, seed=1)
    again, _ = train_model(spec, run, None, 0, tmp_path / "runs", n_checkpoints=1)
    assert "trained on other fashion_mnist data" in capsys.readouterr().err and again == first
    assert not torch.equal(before, read_safetensors(again[0])[0]["head.weight"])


def test_verify_reports_damaged_artifacts_and_changes_nothing(tmp_path, monkeypatch, capsys):
    from qg import pipeline

    monkeypatch.setenv("QG_OUTPUT", str(tmp_path))
    root = tmp_path / "artifacts" / "smoke"
    good, bad = (
        cached(root / "a.safetensors", _maker([])),
        cached(root / "sub" / "b.safetensors", _maker([])),
    )
    assert pipeline.verify("smoke") == 0
    _flip(bad, at=-3)
    before = bad.read_bytes()
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--profile", "smoke", "--verify"])
    assert err.value.code == 1
    out = capsys.readouterr().out
    assert (
        "damaged: sub/b.safetensors" in out
        and "2 cached artifacts" in out
        and "a.safetensors" not in out.split("\n")[0]
    )
    assert bad.read_bytes() == before and good.is_file()


def test_an_empty_sidecar_or_a_file_its_reader_refuses_is_rebuilt(tmp_path, capsys):
    from qg.core.io import CorruptFileError
    from qg.quant.fileformat import read_quantized, save_quantized

    calls, out = [], tmp_path / "a.safetensors"
    cached(out, _maker(calls))
    (tmp_path / ("a.safetensors" + HASH_SUFFIX)).write_text("")
    cached(out, _maker(calls))
    assert len(calls) == 2 and "does not match its recorded hash" in capsys.readouterr().err
    # a symmetric file with a non-zero zero point (generators wrote such files before Z = 0 was
    # enforced): its hash is right, its reader refuses it, so it is remade
    spec = QuantSpec(4, "group", 16)
    old = quantize_state_dict(checkpoints(TINY_VIT, 1)[0], spec)
    name = next(k for k, v in old.items() if hasattr(v, "codes"))
    old[name].zero[0, 0] = 1.0
    path = tmp_path / "gen.safetensors"
    _version_1_file(path, old, spec)
    record_hash(path)
    with pytest.raises(CorruptFileError):
        read_quantized(path)
    fixed = []
    cached(
        path,
        lambda p: fixed.append(
            save_quantized(p, quantize_state_dict(checkpoints(TINY_VIT, 1)[0], spec), spec, {})
        ),
        check=read_quantized,
    )
    assert (
        fixed
        and "is not what its reader accepts" in capsys.readouterr().err
        and read_quantized(path)
    )


def test_a_version_1_file_reads_back_the_same_model_packed_files_are_smaller(tmp_path):
    from qg.quant.fileformat import format_version, read_quantized, save_quantized

    spec = QuantSpec(3, "group", 16)
    qsd = quantize_state_dict(checkpoints(TINY_VIT, 1)[0], spec)
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    _version_1_file(v1, qsd, spec)
    save_quantized(v2, qsd, spec, {})
    assert (format_version(v1), format_version(v2)) == ("1", "2")
    for path in (v1, v2):
        back = read_quantized(path)[0]
        assert all(
            torch.equal(back[k].codes, q.codes) and torch.equal(back[k].scale, q.scale)
            for k, q in qsd.items()
            if hasattr(q, "codes")
        )
    # 3-bit packed against int8
    assert v2.stat().st_size < 0.6 * v1.stat().st_size


def _version_1_file(path, qsd, spec):
    """A quantized file as qg wrote it before bit-packing (format version 1: int8 codes, Z always
    stored)."""
    import json

    from qg.quant.quantizer import QTensor

    tensors = {}
    for name, v in qsd.items():
        if isinstance(v, QTensor):
            tensors.update(
                {f"{name}.qweight": v.codes, f"{name}.scale": v.scale, f"{name}.zero": v.zero}
            )
        else:
            tensors[name] = v
    save_safetensors(
        tensors,
        path,
        {
            "format": "qg-quantized",
            "format_version": "1",
            "spec": json.dumps(spec.to_dict()),
            "meta": "{}",
        },
    )


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata in hash-map order; `save_safetensors` sorts it, so a file
    rewritten from the same tensors keeps its content hash (and what is keyed by it), and still
    reads back as written."""
    import torch

    from qg.core.io import read_safetensors, save_safetensors

    tensors = {"b": torch.arange(5.0), "a": torch.ones(2, 3, dtype=torch.float16)}
    metadata = {k: f"value of {k}" for k in ("model", "spec", "run", "format", "source", "z", "a")}
    blobs = set()
    for i in range(6):
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    loaded, meta = read_safetensors(tmp_path / "0.safetensors")
    assert meta == metadata and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_second_run_waits_for_the_first_instead_of_racing_it(tmp_path, capsys):
    """`exclusive` (the pipeline's lock per output folder): while another process holds it, entering
    waits, says so once, and goes on when the holder ends."""
    import subprocess
    import sys
    import time

    from qg.core.io import exclusive

    lock = tmp_path / ".cpu.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from qg.core.io import exclusive\n"
            f"with exclusive({str(lock)!r}, 'holder'):\n"
            "    print('held', flush=True); time.sleep(1.5)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    with exclusive(lock, "qg.pipeline"):
        waited = time.perf_counter() - start
    holder.wait()
    assert waited > 0.5
    assert "another run is writing there" in capsys.readouterr().err


def test_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    """A write that runs out of disk (errno ENOSPC, or torch.save's bare "file write failed" on a
    disk with no room left) says so, with the folder, and leaves no partial file."""
    import errno
    import shutil
    from collections import namedtuple

    from qg.core.io import atomic_write

    with pytest.raises(
        OSError, match=f"no space left on the disk holding {tmp_path} while writing a"
    ):
        with atomic_write(tmp_path / "a.bin") as f:
            raise OSError(errno.ENOSPC, "No space left on device")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(100, 100, 0))
    with pytest.raises(OSError, match="no space left on the disk holding"):
        with atomic_write(tmp_path / "b.pt") as f:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(100, 0, 100 << 20))
    with pytest.raises(RuntimeError, match="other failure"):
        with atomic_write(tmp_path / "c.bin") as f:
            f.write(b"x")
            raise RuntimeError("other failure")


def test_a_json_file_that_already_holds_the_object_is_not_rewritten(tmp_path):
    """`update_json` (01_collect's manifest): same content, same file, untouched, so a rerun on a
    read-only cache does not fail; other content is written."""
    from qg.core.io import read_json, update_json

    path = tmp_path / "manifest.json"
    update_json(path, {"archs": {"vit": ("a", 1)}, "seed": 0})
    before = path.stat().st_mtime_ns, path.stat().st_ino  # a rewrite replaces the file
    update_json(path, {"archs": {"vit": ["a", 1]}, "seed": 0})
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    update_json(path, {"seed": 1})
    assert read_json(path) == {"seed": 1}
