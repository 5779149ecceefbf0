"""The pipeline's pieces: profiles, the papermill runner's checks, QAT targets, splits, tables,
provenance."""

import json
import os

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from fakes import TINY_VIT, fake_collect, write_manifest

from qg import pipeline
from qg.config import profiles
from qg.config.blocks import Checkpoints
from qg.core import report
from qg.core.io import content_digest, read_json, record_hash
from qg.quant.fileformat import read_quantized
from qg.quant.quantizer import QuantSpec
from qg.study import collect
from qg.study.experiments import Experiment, evenly_spaced
from qg.study.settings import SPLITS, Setting, ablation_settings, main_settings
from qg.tables import paper
from qg.tables.main import figure3, table1
from qg.targets.models import (
    ModelSpec,
    build_model,
    load_checkpoint,
    load_model_file,
    save_checkpoint,
    state_dict_of,
)


@pytest.mark.parametrize("name", ["smoke", "cpu"])
def test_profiles_load_and_name_every_table(name):
    P = profiles.load_profile(name)
    settings = main_settings(P)
    assert P.name == name and set(settings) == {"table1", "figure3", "table2", "table3"}
    pairs = len(P.archs) * len(P.tasks)
    assert len(settings["table1"]) == pairs * (len(P.table1.bits) + 1)
    assert {s.source for s in settings["table2"]} == {"qat"}
    assert all(s.condition in ("precision", "granularity") for s in settings["table3"])
    for factor in ("padding", "head", "backbone", "token_size"):
        expected = len(P.set_in("ablation", factor)) * len(P.ablation.bits)
        assert len(ablation_settings(P, factor)) == expected


def test_unknown_profile_and_notebook_are_clear_errors():
    with pytest.raises(FileNotFoundError, match="known profiles"):
        profiles.load_profile("nope")
    with pytest.raises(ValueError, match="unknown notebook"):
        pipeline.run("smoke", ["99_missing"])


def test_unknown_papermill_parameter_is_refused():
    with pytest.raises(ValueError, match="has no parameter"):
        pipeline.check_parameters(
            profiles.ROOT / "notebooks" / "01_collect.ipynb", {"profile": "smoke", "profle": "x"}
        )
    pipeline.check_parameters(
        profiles.ROOT / "notebooks" / "01_collect.ipynb", {"profile": "smoke"}
    )


def test_missing_upstream_says_which_notebook_to_run(tmp_path):
    P = profiles.load_profile("smoke")
    with pytest.raises(FileNotFoundError, match="01_collect"):
        Experiment(P, profiles.Paths.of("smoke", tmp_path))


def test_notebooks_declare_the_profile_and_overrides_parameters_and_use_python3():
    import papermill

    for name in pipeline.NOTEBOOKS:
        nb = nbformat.read(profiles.ROOT / "notebooks" / f"{name}.ipynb", 4)
        assert nb.metadata.kernelspec.name == "python3"
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and params[0].source.startswith('profile = "smoke"')
        assert set(
            papermill.inspect_notebook(str(profiles.ROOT / "notebooks" / f"{name}.ipynb"))
        ) == {"profile", "overrides"}
        assert any(c.source.startswith(pipeline.CHECK_MARK) for c in nb.cells), (
            f"{name} has no checked cell"
        )


@pytest.mark.parametrize("bits", [3, 4])  # 3 bits: the amortized-QAT table's lowest
def test_qat_target_is_a_quantized_file_with_its_time(tmp_path, bits):
    spec_model = ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "digits")
    torch.manual_seed(0)
    sd = state_dict_of(build_model(spec_model))
    ckpt = tmp_path / "runA-x" / "ckpt_000.safetensors"
    save_checkpoint(ckpt, sd, spec_model)
    q = QuantSpec(bits, "group", 16)
    task = collect.TrainSpec("digits", 1, 1e-3, batch_size=64)
    out = collect.qat_target(
        ckpt, q, collect.QATSpec(steps=3, lr=1e-3, batch_size=64), task, 0, tmp_path / "qat"
    )
    qsd, spec, meta = read_quantized(out)
    assert spec == q and meta["method"] == "qat" and meta["seconds"] > 0
    codes = [v.codes for v in qsd.values() if hasattr(v, "codes")]
    assert codes and all(c.min() >= q.qmin and c.max() <= q.qmax for c in codes)
    fp_sd, model_spec, _ = load_model_file(out)
    assert model_spec == spec_model and set(fp_sd) == set(sd)
    # QAT changed the weights (it trained), and a second call is read from the cache
    assert any(
        not torch.equal(fp_sd[k], sd[k]) for k in sd if k.endswith(".weight") and sd[k].ndim >= 2
    )
    mtime = out.stat().st_mtime_ns
    assert (
        collect.qat_target(
            ckpt, q, collect.QATSpec(steps=3, lr=1e-3, batch_size=64), task, 0, tmp_path / "qat"
        )
        == out
    )
    assert out.stat().st_mtime_ns == mtime


def test_splits_hold_out_every_kth_checkpoint_and_runs_b_and_c(tmp_path):
    """The tables report three splits; the validation run (run C) is a split only when asked for,
    and an unknown split or a manifest without run C says what to do."""
    P = profiles.load_profile("smoke")
    P.checkpoints = {"n": 10, "heldout_every": 5, "heldout_run": 2, "validation_run": 2}
    paths = profiles.Paths.of("smoke", tmp_path)
    run_a = [str(tmp_path / "runA" / f"ckpt_{i:03d}.safetensors") for i in range(10)]
    run_b = [str(tmp_path / "runB" / f"ckpt_{i:03d}.safetensors") for i in range(2)]
    run_c = [str(tmp_path / "runC" / f"ckpt_{i:03d}.safetensors") for i in range(2)]
    old = {"runA": run_a, "runB": run_b, "task": {"dataset": "fashion_mnist"}}
    write_manifest(
        paths.artifacts / "collect",
        {
            "archs": {
                "vit": {"tasks": {"full": {**old, "runC": run_c}}},
                "mixer": {"tasks": {"head": old}},  # collected before run C existed
            }
        },
    )
    collected = Experiment(P, paths).collected
    splits = collected.splits("vit", "full")
    assert list(splits) == ["trained", "heldout_ckpt", "heldout_run"]
    assert [p.name for p in splits["heldout_ckpt"]] == [
        "ckpt_004.safetensors",
        "ckpt_009.safetensors",
    ]
    assert len(splits["trained"]) == 8 and not set(splits["trained"]) & set(splits["heldout_ckpt"])
    assert [str(p) for p in splits["heldout_run"]] == run_b
    every = collected.splits("vit", "full", ("heldout_run", "validation_run", "trained"))
    assert list(every) == ["trained", "heldout_run", "validation_run"]  # SPLITS' order, then C
    assert [str(p) for p in every["validation_run"]] == run_c
    assert not set(every["validation_run"]) & {*every["trained"], *every["heldout_run"]}
    with pytest.raises(ValueError, match="made no mixer/full"):
        collected.splits("mixer", "full")
    with pytest.raises(ValueError, match=r"no split \['heldout'\]"):
        collected.splits("vit", "full", ("heldout",))
    assert list(collected.splits("mixer", "head")) == ["trained", "heldout_ckpt", "heldout_run"]
    with pytest.raises(ValueError, match="made no runC of mixer/head.*rerun 01_collect"):
        collected.splits("mixer", "head", ("validation_run",))


def test_pick_is_even_and_total():
    assert evenly_spaced(list(range(10)), 3) == [0, 4, 9] or evenly_spaced(list(range(10)), 3) == [
        0,
        5,
        9,
    ]
    assert evenly_spaced([1, 2], 5) == [1, 2] and evenly_spaced([1, 2, 3], None) == [1, 2, 3]


def test_setting_validation():
    with pytest.raises(ValueError, match="source"):
        Setting("vit", "full", [QuantSpec(4, "group")], source="gptq")
    with pytest.raises(ValueError, match="conditional"):
        Setting("vit", "full", [QuantSpec(4, "group"), QuantSpec(8, "group")])


def _fake_runs(seed=0):
    """Per-checkpoint rows like qg.study.evaluation.evaluate's, for two bit-widths and all
    splits."""
    rng = np.random.default_rng(seed)
    rows = []
    for bits, gran in ((8, "group"), (4, "group"), (8, "channel")):
        for split in SPLITS:
            for c in range(3):
                for method, base in (("fp", 80), ("ptq", 79), ("gen", 78)):
                    rows.append(
                        {
                            "arch": "vit",
                            "task": "full",
                            "dataset": "fashion_mnist",
                            "setting": f"s{bits}{gran}",
                            "source": "ptq",
                            "condition": "",
                            "variant": "",
                            "method": method,
                            "bits": bits,
                            "granularity": gran,
                            "split": split,
                            "checkpoint": f"{split}/{c}",
                            "accuracy": base + rng.normal(0, 0.1),
                            "seconds": 0.01,
                        }
                    )
    return pd.DataFrame(rows)


def test_table1_has_paper_rows_and_paired_difference():
    P = profiles.load_profile("smoke")
    tidy, md = table1(_fake_runs(), P, "abc")
    assert {
        "table",
        "method",
        "bits",
        "granularity",
        "split",
        "value",
        "std",
        "n",
        "profile",
        "commit",
    } <= set(tidy.columns)
    diff = tidy[(tidy.method == "gen-ptq") & (tidy.bits == 4)]
    assert np.allclose(diff.value, -1.0, atol=0.5) and (diff.n == 3).all()
    assert "Gen (paper, ImageNet-1K ViT-Tiny)" in md and "75.42" in md and "Gen − PTQ" in md
    assert paper.table1_value("full", "vit", "PTQ", "3-bit") == 53.17
    # the paper has no ImageNet MLP-Mixer
    assert paper.table1_value("full", "mixer", "PTQ", "3-bit") is None


def test_write_table_records_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("QG_OUTPUT", str(tmp_path))
    P = profiles.load_profile("smoke")
    tidy, md = table1(_fake_runs(), P, "abc")
    inp = tmp_path / "input.txt"
    inp.write_text("x")
    report.write_table(tmp_path, "table1", tidy, md, report.provenance(P, "abc", [inp]))
    prov = json.loads((tmp_path / "table1.json").read_text())
    assert prov["commit"] == "abc" and prov["parameters"]["name"] == "smoke"
    assert list(prov["inputs"]) == ["input.txt"]  # relative to QG_OUTPUT
    assert pd.read_csv(tmp_path / "table1.csv").shape[0] == len(tidy)
    assert (tmp_path / "table1.md").read_text().startswith("### Table 1")


def test_figures_are_deterministic(tmp_path):
    runs = _fake_runs()
    a = report.save_figure(figure3(runs, "vit", "full"), tmp_path / "a.png")
    b = report.save_figure(figure3(runs, "vit", "full"), tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()


def test_score_and_predictions_share_one_cached_evaluation(tmp_path):
    P = profiles.load_profile("smoke")
    paths = profiles.Paths.of("smoke", tmp_path)
    write_manifest(paths.artifacts / "collect", {"archs": {}})
    spec_model = ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "digits")
    torch.manual_seed(0)
    ckpt = tmp_path / "runA-x" / "ckpt_000.safetensors"
    save_checkpoint(ckpt, state_dict_of(build_model(spec_model)), spec_model)
    exp = Experiment(P, paths)
    pred, labels = exp.scorer.predictions(ckpt)
    assert pred.shape == labels.shape and pred.dtype == torch.long
    assert exp.scorer.score(ckpt) == pytest.approx(100.0 * (pred == labels).float().mean().item())
    cache = next(ckpt.parent.glob("ckpt_000.safetensors.pred-*.safetensors"))
    # a damaged cache is evaluated again, to the same answer, and rewritten
    cache.write_bytes(b"not a safetensors file")
    again, _ = Experiment(P, paths).scorer.predictions(ckpt)
    assert torch.equal(again, pred) and cache.stat().st_size > 100


def test_a_moved_artifact_tree_is_reused_and_its_noise_control_unchanged(tmp_path):
    """Cache keys and seeds name collected files relative to the collect folder, so moving the whole
    tree (another checkout, another QG_OUTPUT) recomputes nothing and makes the same controls."""
    import shutil

    P = profiles.load_profile("smoke")
    spec_model = ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "digits")
    collect_dir = profiles.Paths.of("smoke", tmp_path / "a").artifacts / "collect"
    names = {
        run: [f"vit/full/{run}-k/ckpt_{i:03d}.safetensors" for i in range(n)]
        for run, n in (("runA", 5), ("runB", 2))
    }
    torch.manual_seed(0)
    for name in names["runA"] + names["runB"]:
        save_checkpoint(collect_dir / name, state_dict_of(build_model(spec_model)), spec_model)
    write_manifest(
        collect_dir,
        {"archs": {"vit": {"tasks": {"full": {**names, "task": {"dataset": "digits"}}}}}},
    )
    spec, setting = QuantSpec(4, "group", 16), Setting("vit", "full", [QuantSpec(4, "group", 16)])

    def files(root):
        exp = Experiment(P, profiles.Paths.of("smoke", root))
        ckpt = exp.collected.splits("vit", "full")["heldout_run"][0]
        made = {
            "ptq": exp.quantized(ckpt, spec),
            "noise": exp.control("noise", spec, [ckpt]),
            "soup": exp.control("soup", spec, exp.collected.splits("vit", "full")["trained"]),
        }
        return exp, {k: p.relative_to(exp.paths.artifacts) for k, p in made.items()}, made

    exp_a, rel_a, made_a = files(tmp_path / "a")
    gen_dir_a = exp_a.generator_dir(setting).relative_to(exp_a.paths.artifacts)
    stamps = {k: p.stat().st_mtime_ns for k, p in made_a.items()}
    noise_codes = {
        k: v.codes for k, v in read_quantized(made_a["noise"])[0].items() if hasattr(v, "codes")
    }
    shutil.move(tmp_path / "a", tmp_path / "b")

    exp_b, rel_b, made_b = files(tmp_path / "b")
    assert (
        rel_b == rel_a
        and exp_b.generator_dir(setting).relative_to(exp_b.paths.artifacts) == gen_dir_a
    )
    # read back, not made again
    assert {k: p.stat().st_mtime_ns for k, p in made_b.items()} == stamps
    made_b["noise"].unlink()  # made afresh in the new place: the same noise
    again = read_quantized(files(tmp_path / "b")[2]["noise"])[0]
    assert all(torch.equal(again[k].codes, c) for k, c in noise_codes.items())
    # another checkpoint under the same name (a rerun of 01_collect on other data): what was made
    # from it is remade
    exp_b, _, _ = files(tmp_path / "b")
    ckpt = exp_b.collected.splits("vit", "full")["heldout_run"][0]
    save_checkpoint(ckpt, state_dict_of(build_model(spec_model)), spec_model)
    ptq = exp_b.quantized(ckpt, spec)
    assert ptq.stat().st_mtime_ns != stamps["ptq"]
    # and then kept
    assert torch.equal(
        read_quantized(ptq)[0]["head.weight"].codes,
        read_quantized(exp_b.quantized(ckpt, spec))[0]["head.weight"].codes,
    )


def test_overrides_merge_into_the_profile_and_keep_its_cache(tmp_path):
    """An overridden profile changes what it says, keeps the base profile's cache, writes its
    results apart, and refuses overrides that name nothing or that would change what 01_collect
    makes."""
    base = profiles.load_profile("smoke")
    P = profiles.load_profile("smoke", {"train": {"steps": 7}, "eval": {"per_split": 1}})
    assert (
        P.written["train"] == {**base.written["train"], "steps": 7}
        and P.train == base.train.model_copy(update={"steps": 7})
        and P.eval.per_split == 1
        and P.tokenizer == base.tokenizer
    )
    assert P.name.startswith("smoke+") and P.overrides == P.written["overrides"] == {
        "train": {"steps": 7},
        "eval": {"per_split": 1},
    }
    paths, base_paths = (
        profiles.Paths.for_profile(P, tmp_path),
        profiles.Paths.for_profile(base, tmp_path),
    )
    assert paths.artifacts == base_paths.artifacts and paths.results != base_paths.results
    assert profiles.load_profile("smoke", {"train": {"steps": 7}}).name != P.name
    with pytest.raises(ValueError, match="does not have"):
        profiles.load_profile("smoke", {"trian": {"steps": 7}})
    with pytest.raises(ValueError, match="01_collect"):
        profiles.load_profile("smoke", {"checkpoints": {"n": 3}})
    with pytest.raises(ValueError, match="has no parameter"):
        pipeline.check_parameters(
            profiles.ROOT / "notebooks" / "02_train.ipynb", {"profile": "smoke", "overide": {}}
        )


def test_the_qat_method_is_the_qat_model_whatever_the_generators_targets(tmp_path):
    """`model_file(..., "qat")` is 01_collect's QAT file of the checkpoint for a PTQ-target setting
    too (08 scores QAT beside generators of both sources)."""
    P = profiles.load_profile("smoke")
    spec = QuantSpec(4, "group", 64)
    collect_dir = profiles.Paths.of("smoke", tmp_path).artifacts / "collect"
    runs = {
        run: [f"vit/full/{run}-k/ckpt_{i:03d}.safetensors" for i in range(n)]
        for run, n in (("runA", 5), ("runB", 2))
    }
    qat = {
        spec.name: {run: [f.replace("ckpt_", "qat_") for f in files] for run, files in runs.items()}
    }
    task = {**runs, "qat": qat, "task": {"dataset": "digits"}}
    write_manifest(collect_dir, {"archs": {"vit": {"tasks": {"full": task}}}})
    exp = Experiment(P, profiles.Paths.of("smoke", tmp_path))
    ckpt = exp.collected.splits("vit", "full")["heldout_run"][1]
    for source in ("ptq", "qat"):
        setting = Setting("vit", "full", [spec], source=source)
        assert (
            exp.model_file(setting, spec, ckpt, "qat")
            == collect_dir / "vit/full/runB-k/qat_001.safetensors"
        )


def test_notebooks_refuse_undeclared_papermill_parameters(tmp_path, monkeypatch):
    """papermill run directly (not through qg.pipeline) with a misspelt name stops in the setup
    cell: every notebook's set-up is `qg.notebook.setup(profile, overrides, In)`, which checks the
    parameters before it reads the profile, and turns on autoreload only outside papermill."""
    import IPython

    from qg import notebook

    params = 'profile = "smoke"\noverrides = {}'
    profiles.refuse_undeclared(["", params, "%load_ext autoreload"])  # JupyterLab: nothing injected
    profiles.refuse_undeclared([params, '# Parameters\nprofile = "cpu"\n'])
    with pytest.raises(ValueError, match=r"unknown notebook parameter\(s\) \['profle'\]"):
        profiles.refuse_undeclared([params, '# Parameters\nprofle = "cpu"\n'])
    misspelt = [
        "",
        params,
        '# Parameters\nprofle = "cpu"\n',
        "P, paths = setup(profile, overrides, In)",
    ]
    # not the missing profile's error
    with pytest.raises(ValueError, match="unknown notebook parameter"):
        notebook.setup("no-such-profile", {}, misspelt)
    magics = []

    class Shell:
        def run_line_magic(self, name, line):
            magics.append((name, line))

    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    monkeypatch.setenv("QG_OUTPUT", str(tmp_path / "out"))
    with pd.option_context("display.width", 80, "display.max_columns", 20):  # restored after
        P, paths = notebook.setup("smoke", {}, ["", params, '# Parameters\nprofile = "smoke"\n'])
        assert (
            P.name == "smoke"
            and paths.results.is_dir()
            and paths.results.is_relative_to(tmp_path.resolve())
        )
        assert pd.get_option("display.width") == 200 and not magics  # papermill: no autoreload
        notebook.setup("smoke", {}, ["", params])  # JupyterLab
    assert magics == [("load_ext", "autoreload"), ("autoreload", "2")]
    # every notebook's set-up is that one call, right below its parameters
    for name in pipeline.NOTEBOOKS:
        cells = [
            c
            for c in nbformat.read(profiles.ROOT / "notebooks" / f"{name}.ipynb", 4).cells
            if c.cell_type == "code"
        ]
        assert cells[0].metadata.get("tags") == ["parameters"], name
        assert "P, paths = setup(profile, overrides, In)" in cells[1].source, name
        assert not any("load_profile(" in c.source or "autoreload" in c.source for c in cells), name
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="unknown notebook parameter"):
        papermill.execute_notebook(
            str(profiles.ROOT / "notebooks" / "01_collect.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"profle": "cpu"},
            kernel_name="python3",
            progress_bar=False,
            cwd=str(profiles.ROOT / "notebooks"),
        )


def test_a_failing_notebook_is_one_error_line_and_a_relative_output_stays_put(
    tmp_path, monkeypatch, capsys
):
    """02_train before 01_collect: the runner prints the notebook's own message and where the
    executed copy is; a relative QG_OUTPUT means the same folder to the runner and to the kernels
    (which run in notebooks/)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QG_OUTPUT", "out")
    # the runner edits both; restore them after
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--profile", "smoke", "02_train"])
    message = str(err.value)
    assert (
        message.startswith("error: 02_train stopped in cell")
        and "run notebooks/01_collect.ipynb" in message
    )
    assert len(message.splitlines()) == 2
    executed = tmp_path / "out" / "results" / "notebooks" / "smoke"
    # no temporary copy left
    assert (executed / "02_train.ipynb").is_file() and not list(executed.glob(".*"))
    recorded = nbformat.read(executed / "02_train.ipynb", 4).metadata.papermill.output_path
    assert recorded == "results/notebooks/smoke/02_train.ipynb"
    assert not (profiles.ROOT / "notebooks" / "out").exists()


def test_notebooks_run_two_at_a_time_and_a_failure_is_reported(tmp_path, monkeypatch):
    """--jobs 2: the notebooks after 02_train run in two worker processes; one that raises (here
    both: nothing was collected) is reported with its own message, and each executed copy is where
    it belongs."""
    monkeypatch.setenv("QG_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    with pytest.raises(SystemExit) as err:
        pipeline.main(
            ["--profile", "smoke", "--jobs", "2", "06_ablate_backbone", "07_ablate_token_size"]
        )
    assert str(err.value).startswith("error: 0") and "stopped in cell" in str(err.value)
    executed = tmp_path / "out" / "results" / "notebooks" / "smoke"
    assert sorted(p.name for p in executed.glob("*.ipynb")) == [
        "06_ablate_backbone.ipynb",
        "07_ablate_token_size.ipynb",
    ]
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        pipeline.run("smoke", ["06_ablate_backbone"], jobs=0)


def test_a_generator_on_qat_targets_is_retrained_when_a_target_changes(tmp_path, capsys):
    """QAT targets are collected files, not a function of the checkpoint as PTQ is: a generator
    trained on them records their digests too, and other targets under the same names train it
    again."""
    from qg.quant.fileformat import save_quantized
    from qg.quant.quantizer import quantize_state_dict

    P = profiles.load_profile("smoke", {"train": {"steps": 2, "ckpt_every": 2}})
    spec, spec_model = (
        QuantSpec(4, "group", 64),
        ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "digits"),
    )
    collect_dir = profiles.Paths.of("smoke", tmp_path).artifacts / "collect"
    runs = {
        run: [f"vit/full/{run}-k/ckpt_{i:03d}.safetensors" for i in range(n)]
        for run, n in (("runA", 3), ("runB", 1))
    }
    qat = {
        spec.name: {run: [f.replace("ckpt_", "qat_") for f in files] for run, files in runs.items()}
    }
    torch.manual_seed(0)
    for run, files in runs.items():
        for ckpt, target in zip(files, qat[spec.name][run]):
            sd = state_dict_of(build_model(spec_model))
            save_checkpoint(collect_dir / ckpt, sd, spec_model)
            save_quantized(
                collect_dir / target,
                quantize_state_dict(sd, spec),
                spec,
                {"model": spec_model.to_dict()},
            )
    write_manifest(
        collect_dir,
        {
            "archs": {
                "vit": {"tasks": {"full": {**runs, "qat": qat, "task": {"dataset": "digits"}}}}
            }
        },
    )
    exp = Experiment(P, profiles.Paths.of("smoke", tmp_path))
    setting = Setting("vit", "full", [spec], source="qat")
    exp.generator(setting)
    marker = exp.generator_dir(setting) / "inputs.json"
    trained = exp.collected.splits("vit", "full")["trained"]
    # the trained split's targets
    assert sum(1 for k in read_json(marker) if "qat_" in k) == len(trained)
    target = exp.target(setting, spec, trained[0])
    other = quantize_state_dict(state_dict_of(build_model(spec_model)), spec)
    save_quantized(target, other, spec, {"model": spec_model.to_dict()})
    exp.generator(setting)
    assert "(or QAT targets) that have changed since" in capsys.readouterr().err
    # trained on the new one
    assert read_json(marker)[exp.collected.relative(target)] == content_digest(target)


def test_kernels_import_this_checkouts_qg_before_another_on_pythonpath(tmp_path, monkeypatch):
    """Two checkouts: the runner's kernels import the qg of the checkout that runs them, even when
    PYTHONPATH (or an editable install) names the other one first."""
    import subprocess
    import sys

    other = tmp_path / "other-checkout"
    (other / "qg").mkdir(parents=True)
    (other / "qg" / "__init__.py").write_text(
        "raise ImportError('the other checkout was imported')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(other))
    monkeypatch.setenv("QG_OUTPUT", "relative-out")
    monkeypatch.setenv("QG_DATA", "fm")
    monkeypatch.chdir(tmp_path)
    pipeline._kernel_environment()
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(profiles.ROOT), str(other)]
    assert os.environ["QG_OUTPUT"] == str(tmp_path.resolve() / "relative-out")
    assert os.environ["QG_DATA"] == str(tmp_path.resolve() / "fm")  # not notebooks/fm
    found = subprocess.run(
        [sys.executable, "-c", "import qg; print(qg.__file__)"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == str(profiles.ROOT / "qg" / "__init__.py")


def test_a_damaged_cache_gives_the_same_table(tmp_path, capsys):
    """End to end: flip a byte of a PTQ file and of a generated file, truncate an HQQ file, garble a
    cached prediction, delete a checkpoint's hash record: the next evaluation rebuilds what is
    damaged (one warning line each) and its rows equal the first run's."""
    from qg.core.io import HASH_SUFFIX
    from qg.study.evaluation import evaluate

    P = profiles.load_profile(
        "smoke",
        {"eval": {"per_split": 1, "test_subset": 60}, "train": {"steps": 2, "ckpt_every": 2}},
    )
    fake_collect(profiles.Paths.of("smoke", tmp_path).artifacts / "collect")
    exp = Experiment(P, profiles.Paths.of("smoke", tmp_path))
    setting = Setting("vit", "full", [QuantSpec(3, "group", 16)])
    methods = ("fp", "ptq", "hqq", "gen")
    first = evaluate(exp, setting, methods).drop(columns="seconds")
    ckpt = exp.collected.splits("vit", "full")["heldout_run"][0]
    ptq, hqq = (exp.quantized(ckpt, setting.specs[0], m) for m in ("ptq", "hqq"))
    gen = exp.generated(setting, setting.specs[0], ckpt)
    for path in (ptq, gen):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    hqq.write_bytes(hqq.read_bytes()[:-40])
    pred = next(ptq.parent.glob(ptq.name + ".pred-*.safetensors"))
    pred.write_bytes(pred.read_bytes()[:10])
    (ckpt.parent / (ckpt.name + HASH_SUFFIX)).unlink(missing_ok=True)
    again = evaluate(Experiment(P, profiles.Paths.of("smoke", tmp_path)), setting, methods).drop(
        columns="seconds"
    )
    pd.testing.assert_frame_equal(first, again)
    err = capsys.readouterr().err
    assert err.count("rebuilding it") >= 3 and all(str(p) in err for p in (ptq, hqq, gen))


def test_verify_refuses_an_unknown_or_never_run_profile(tmp_path, monkeypatch):
    """`--verify --profile nosuch` used to say "0 damaged" and exit 0."""
    with pytest.raises(SystemExit, match="no profile 'nosuch'"):
        pipeline.main(["--verify", "--profile", "nosuch"])
    monkeypatch.setenv("QG_OUTPUT", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="has not run here"):
        pipeline.main(["--verify", "--profile", "smoke"])


def test_verify_reports_unverified_and_orphaned_artifacts(tmp_path, monkeypatch, capsys):
    """A file with no recorded hash is reported (the next run rebuilds it) and fails the check; an
    artifact whose checkpoint is gone or changed is reported as orphaned, without failing it."""
    root = tmp_path / "artifacts" / "smoke"
    ckpts = [root / "collect" / "vit" / "full" / "runA" / f"ckpt_00{i}.safetensors" for i in (0, 1)]
    made = []
    for i, ckpt in enumerate(ckpts):
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"checkpoint %d" % i)
        record_hash(ckpt)
        made.append(root / "quantized" / f"ptq_{i}.safetensors")
        made[-1].parent.mkdir(parents=True, exist_ok=True)
        made[-1].write_bytes(b"codes %d" % i)
        record_hash(made[-1], {f"vit/full/runA/{ckpt.name}": content_digest(ckpt)})
    monkeypatch.setenv("QG_OUTPUT", str(tmp_path))
    assert pipeline.verify("smoke") == 0
    assert "0 damaged, 0 unverified, 0 orphaned" in capsys.readouterr().out
    ckpts[0].unlink()
    ckpts[0].with_name(ckpts[0].name + ".sha256").unlink()
    ckpts[1].write_bytes(b"retrained")
    record_hash(ckpts[1])
    (root / "quantized" / "planted.safetensors").write_bytes(b"from another tool")
    assert pipeline.verify("smoke") == 1
    out = capsys.readouterr().out
    assert "unverified: quantized/planted.safetensors (no recorded hash)" in out
    assert "orphaned: quantized/ptq_0.safetensors (made from vit/full/runA/ckpt_000" in out
    assert "ckpt_001.safetensors, which has changed since)" in out
    assert "0 damaged, 1 unverified (the next run rebuilds them), 2 orphaned" in out


def test_the_runner_finds_the_repair_lines_a_kernel_printed(tmp_path):
    """The cache's repair warnings are printed by the kernel, into the executed notebook: the
    runner reads them back to repeat them on the terminal."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output(
            "stream",
            name="stderr",
            text="[qg] warning: a/b.safetensors has no recorded hash; "
            "rebuilding it\nother output\n",
        ),
        nbformat.v4.new_output("stream", name="stdout", text="[qg] note: not a warning\n"),
    ]
    nb.cells = [cell]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert pipeline.warnings_in(tmp_path / "x.ipynb") == [
        "[qg] warning: a/b.safetensors has no recorded hash; rebuilding it"
    ]


def test_a_symlink_loop_as_the_output_folder_is_one_line(tmp_path, monkeypatch):
    """QG_OUTPUT pointing into a loop of symbolic links: one error line, not pathlib's traceback."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    monkeypatch.setenv("QG_OUTPUT", str(tmp_path / "a"))
    with pytest.raises(SystemExit, match="cannot be resolved: Symlink loop"):
        pipeline.main(["--profile", "smoke", "01_collect"])
    with pytest.raises(SystemExit, match="cannot be resolved: Symlink loop"):
        pipeline.main(["--profile", "smoke", "--verify"])


def test_two_runs_into_one_fresh_folder_both_succeed_with_the_same_tables(tmp_path, monkeypatch):
    """Two pipelines started together into one fresh output folder (one used to fail, the other
    having judged its half-written file damaged and deleted it): the second waits for the first's
    lock, saying so, then finds the first's artifacts cached; both exit 0, every artifact verifies,
    and the tables the second writes are the first's (times and commit aside)."""
    import shutil
    import subprocess
    import sys
    import time

    from qg import results

    out = tmp_path / "out"
    env = {**os.environ, "QG_OUTPUT": str(out), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "qg.pipeline", "--profile", "smoke", "01_collect"]
    run = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.Popen(cmd, **run)
    for _ in range(600):  # the second starts once the first holds the folder
        if (out / "artifacts" / ".smoke.lock").exists() or first.poll() is not None:
            break
        time.sleep(0.1)
    second = subprocess.Popen(cmd, **run)
    log = first.communicate(timeout=900)[0]
    shutil.copytree(out / "results" / "smoke", tmp_path / "first" / "results" / "smoke")
    log += second.communicate(timeout=900)[0]
    assert first.returncode == 0 and second.returncode == 0, log[-3000:]
    assert "another run is writing there" in log
    monkeypatch.setenv("QG_OUTPUT", str(out))
    assert pipeline.verify("smoke") == 0
    assert results.compare("smoke", tmp_path / "first") == 0


def test_run_a_from_several_fine_tunings_gives_n_over_runs_checkpoints_each(tmp_path):
    """checkpoints.runs: run A's n checkpoints come from `runs` seeds (never run B's seed + 1), so a
    generator trains on more than one run's spread; runs = 1 is the one run it always was."""
    spec = ModelSpec(TINY_VIT.arch, TINY_VIT.kwargs, "digits")
    task = collect.TrainSpec("digits", 1, 1e-3, batch_size=64)
    torch.manual_seed(0)
    start = state_dict_of(build_model(spec))
    assert collect.run_a_seeds(0, 1) == [0] and collect.run_a_seeds(7, 3) == [7, 9, 10]
    # run C's seed is none of run A's (seed, seed + 2, ...) nor run B's (seed + 1)
    assert collect.validation_seed(0, 1) == 2 and collect.validation_seed(7, 3) == 11
    entry = collect.collect_task(spec, start, task, 4, 1, 1, 0, tmp_path, runs=2)
    assert entry["runs"] == 2 and len(entry["runA"]) == 4 and len(entry["runB"]) == 1
    assert len(entry["runC"]) == 1
    folders = [os.path.dirname(p) for p in entry["runA"]]
    run_b, run_c = (os.path.dirname(entry[r][0]) for r in ("runB", "runC"))
    assert folders[0] == folders[1] != folders[2] == folders[3] != run_b != run_c
    assert run_c not in folders
    first, second = (load_checkpoint(entry["runA"][i])[0] for i in (1, 3))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another seed, other weights
    one = collect.collect_task(spec, start, task, 2, 1, 1, 0, tmp_path / "one")
    assert one["runs"] == 1 and len(one["runA"]) == 2
    with pytest.raises(ValueError, match="multiple of checkpoints.runs"):
        Checkpoints(n=10, heldout_every=5, heldout_run=2, validation_run=2, runs=3)
