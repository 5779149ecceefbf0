"""The `paper` profile: its settings are the paper's, and its code path runs end to end on tiny fake
data.

The real run needs a GPU, ImageNet, CIFAR and timm's pretrained weights, none of which the
development machines have. So the second test keeps the paper profile's structure (timm registered
names loaded from a pretrained-weights file, ImageNet and CIFAR in their on-disk formats streamed
from disk, per-architecture tasks, ViT-Base's larger tokens, QAT only for ViT-Tiny on ImageNet, a
per-factor ablation setting) and shrinks only the sizes, then runs every notebook on it with
papermill, as `make reproduce` would.
"""

import json

import pandas as pd
import pytest
import timm
import torch
import yaml
from fakes import write_cifar, write_imagenet
from safetensors.torch import load_file

from qg import pipeline
from qg.config import profiles
from qg.config.profiles import ablation_setup, pairs
from qg.core.io import read_json, save_safetensors
from qg.generator.model import Generator, GeneratorConfig
from qg.quant.quantizer import is_quantized_weight
from qg.study.experiments import Experiment
from qg.study.settings import main_settings
from qg.targets.models import (
    ModelSpec,
    build_model,
    load_checkpoint,
    pretrained_norm,
    pretrained_weights,
    resolve_device,
    state_dict_of,
)
from qg.targets.sources import DATASET_INFO

PAPER_GENERATOR_PARAMS = {8192: 1018e6, 16384: 3076e6}  # the paper's Table 7 (Base, Large)


def test_paper_profile_names_the_papers_setup():
    P = profiles.load_profile("paper")
    assert P.pretrain is None and P.device == "cuda"
    assert {a.arch for a in P.archs.values()} == {
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "mixer_b16_224",
    }
    for a in P.archs.values():  # timm's default weights for each name: ImageNet-1k classifiers
        cfg = timm.get_pretrained_cfg(a.arch)
        assert (
            cfg.num_classes == 1000
            and cfg.tag.endswith("in1k")
            and pretrained_norm(a.arch) == (cfg.mean, cfg.std)
        )
    assert (
        {t.dataset for t in P.tasks.values()}
        == {"imagenet", "cifar10", "cifar100"}
        <= set(DATASET_INFO)
    )
    # the rows of the paper's Table 1
    assert set(pairs(P)) == {
        ("vit_tiny", "imagenet"),
        ("vit_tiny", "cifar10"),
        ("vit_tiny", "cifar100"),
        ("mlp_mixer", "cifar10"),
        ("mlp_mixer", "cifar100"),
        ("vit_small", "imagenet"),
        ("vit_base", "imagenet"),
    }
    for block in ("figure1", "figure3"):
        assert (getattr(P, block).arch, getattr(P, block).task) in pairs(P)
    for factor in ("padding", "head", "backbone", "token_size"):
        a = ablation_setup(P, factor)
        assert (a.arch, a.task) in pairs(P)
    assert ablation_setup(P, "token_size").arch == "vit_base"
    settings = main_settings(P)
    assert {(s.arch, s.task) for s in settings["table2"]} == {("vit_tiny", "imagenet")}
    assert {(s.arch, s.task, s.condition) for s in settings["table3"]} == {
        ("vit_tiny", "imagenet", "precision"),
        ("vit_tiny", "imagenet", "granularity"),
    }
    assert P.train.steps == 50_000 and P.train.batch_size == 4 and P.checkpoints.n == 50


@pytest.mark.parametrize("arch, token_size", [("vit_tiny", 8192), ("vit_base", 16384)])
def test_paper_profile_generators_are_the_papers_size(arch, token_size):
    """Built on the meta device (no memory): 2 Mamba-2 layers as wide as the token, near Table 7's
    counts."""
    P = profiles.load_profile("paper")
    tokenizer = {**P.set_in("tokenizer"), **P.set_in("archs", arch, "tokenizer")}
    assert tokenizer["token_size"] == token_size
    with torch.device("meta"):
        target = build_model(ModelSpec.from_dict(P.set_in("archs", arch)))
        n_weights = sum(
            p.numel() for n, p in target.named_parameters() if is_quantized_weight(n, p)
        )
        cfg = GeneratorConfig(
            token_size=token_size, n_tokens=-(-n_weights // token_size), **P.set_in("generator")
        )
        n_params = sum(
            p.numel()
            for p in Generator(cfg, torch.zeros(cfg.n_tokens, 2, dtype=torch.long)).parameters()
        )
    assert cfg.d_model == token_size
    assert 0.75 < n_params / PAPER_GENERATOR_PARAMS[token_size] < 1.25, n_params


def test_pretrained_weights_from_a_local_file_and_its_errors(tmp_path):
    tiny = ModelSpec(
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
    )
    torch.manual_seed(0)
    weights = state_dict_of(build_model(tiny))
    save_safetensors(weights, tmp_path / "w.safetensors")
    loaded = pretrained_weights(tiny, tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    # timm drops a head of another size
    ten = ModelSpec(tiny.arch, {**tiny.kwargs, "num_classes": 10})
    assert pretrained_weights(ten, tmp_path / "w.safetensors")["head.weight"].shape == (10, 32)
    with pytest.raises(ValueError, match="pickles are never loaded"):
        pretrained_weights(tiny, tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError, match="pretrained_file"):
        pretrained_weights(tiny, tmp_path / "missing.safetensors")
    mixer = ModelSpec(
        "MlpMixer", {"img_size": 32, "patch_size": 8, "num_blocks": 1, "embed_dim": 32}
    )
    with pytest.raises(ValueError, match="give its archs entry a `pretrained_file`"):
        pretrained_weights(mixer)
    with pytest.raises(ValueError, match="does not match the MlpMixer architecture"):
        pretrained_weights(mixer, tmp_path / "w.safetensors")


def test_device_names():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="set `device: cpu`"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_a_profile_whose_names_do_not_line_up_is_refused(tmp_path):
    P = profiles.load_profile("paper").written  # the file's dict, edited below
    P["archs"]["vit_tiny"]["tasks"] = ["imagenet", "cifar1O"]
    P["figure3"]["task"] = "cifar100_"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(P))
    with pytest.raises(ValueError) as err:
        profiles.load_profile(str(tmp_path / "bad.yaml"))
    for problem in ("archs.vit_tiny.tasks names ['cifar1O']", "figure3 uses vit_tiny/cifar100_"):
        assert problem in str(err.value)
    # wrong types and unknown factors are the schema's, reported before the names are cross-checked
    P["qat"]["archs"] = "vit_tiny"
    P["ablation"]["per_factor"]["tokensize"] = {"arch": "vit_base"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(P))
    with pytest.raises(ValueError) as err:
        profiles.load_profile(str(tmp_path / "bad.yaml"))
    for problem in ("qat.archs: Input should be a valid list", "ablation.per_factor.tokensize"):
        assert problem in str(err.value)


def tiny_paper_profile(tmp_path) -> dict:
    """params/paper.yaml with every size shrunk; structure, model names and data formats kept."""
    P = profiles.load_profile("paper").written  # the file's dict, edited below
    tiny_vit = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    P["device"] = "auto"
    P["archs"] = {
        "vit_tiny": {
            **P["archs"]["vit_tiny"],
            "kwargs": tiny_vit,
            "tasks": ["imagenet", "cifar10"],
        },
        # timm's mixer names fix their widths, so the tiny Mixer is timm's class with its
        # "pretrained" file
        "mlp_mixer": {
            **P["archs"]["mlp_mixer"],
            "arch": "MlpMixer",
            "tasks": ["cifar100"],
            "kwargs": {
                "img_size": 32,
                "patch_size": 8,
                "num_blocks": 1,
                "embed_dim": 32,
                "num_classes": 1000,
            },
        },
        "vit_base": {**P["archs"]["vit_base"], "kwargs": tiny_vit, "tokenizer": {"token_size": 64}},
    }
    # "pretrained" weights, read by timm from a local file (the offline route)
    for name, arch in P["archs"].items():
        torch.manual_seed(len(name))
        arch["pretrained_file"] = str(tmp_path / f"{name}.safetensors")
        save_safetensors(
            state_dict_of(build_model(ModelSpec.from_dict(arch))), arch["pretrained_file"]
        )
    for task in P["tasks"].values():
        task.update(epochs=1, batch_size=2)
    P["checkpoints"] = {"n": 5, "heldout_every": 5, "heldout_run": 2, "validation_run": 1}
    P["qat"].update(steps=2, batch_size=2)
    P["tokenizer"]["token_size"] = 32
    P["generator"].update(d_state=16, headdim=16, chunk_size=32)
    P["train"] = {"steps": 6, "batch_size": 2, "lr": 0.003, "warmup": 1, "ckpt_every": 3}
    P["table1"] = {"bits": [8, 4], "granularity_bits": 8}
    P["eval"] = {"test_subset": None, "per_split": 1, "batch_size": 4}
    P["ablation"].update(
        bits=[4],
        per_factor={"token_size": {"arch": "vit_base", "bits": [8]}},
        head={
            "- diffusion": {},
            "+ diffusion": {
                "head": "diffusion",
                "skip": "none",
                "diffusion": {
                    "n_steps": 20,
                    "sampler": "ddim",
                    "sample_steps": 4,
                    "diffusion_batch": 8,
                },
            },
        },
        token_size={"32": 32, "64": 64},
    )
    P["rpg"].update(
        samples=2,
        token_size=32,
        train={"steps": 3, "batch_size": 2, "lr": 0.003, "ckpt_every": 3},
        generator={
            "n_layers": 1,
            "d_state": 16,
            "headdim": 16,
            "chunk_size": 32,
            "diffusion": {
                "n_steps": 20,
                "sampler": "ddim",
                "sample_steps": 4,
                "diffusion_batch": 8,
                "channels": [1, 8, 1],
            },
        },
        binary={
            "dataset": "cifar10",
            "seen": 3,
            "unseen": 1,
            "checkpoints": 2,
            "samples": 1,
            "token_size": 16,
            "train": {"epochs": 1, "lr": 0.01, "batch_size": 4, "train_subset": 8},
        },
    )
    return P


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """Fake ImageNet/CIFAR-10/CIFAR-100 under QG_DATA; outputs under QG_OUTPUT; every split
    streamed."""
    write_imagenet(
        tmp_path / "data",
        classes=("n01440764", "n01443537", "n01484850"),
        per_class=4,
        size=(36, 40),
    )
    write_cifar(tmp_path / "data", "cifar10", n=4)
    write_cifar(tmp_path / "data", "cifar100", n=10)
    for var, value in (
        ("QG_DATA", tmp_path / "data"),
        ("QG_OUTPUT", tmp_path / "out"),
        ("QG_IN_MEMORY_MB", 0),
    ):
        monkeypatch.setenv(var, str(value))
    return tmp_path


def test_paper_profile_runs_every_notebook_on_tiny_fake_data(fake_data):
    P = tiny_paper_profile(fake_data)
    profile = fake_data / "paper-tiny.yaml"
    profile.write_text(yaml.safe_dump(P, sort_keys=False))
    executed = pipeline.run(str(profile))
    assert [p.stem for p in executed] == list(pipeline.NOTEBOOKS)

    paths = profiles.Paths.of("paper-tiny")
    assert paths.results == fake_data / "out" / "results" / "paper-tiny"
    exp = Experiment(profiles.load_profile(str(profile)), paths)
    collected = {(a, t) for a, e in exp.collected.manifest["archs"].items() for t in e["tasks"]}
    assert collected == {
        ("vit_tiny", "imagenet"),
        ("vit_tiny", "cifar10"),
        ("mlp_mixer", "cifar100"),
        ("vit_base", "imagenet"),
    }
    # task models take their dataset's classes; the head-only task keeps the pretrained file's
    # features
    # trained on the profile's device; inputs normalised as the pretrained weights expect (timm's
    # ViT: 0.5/0.5)
    for (arch, task), classes in {
        ("vit_tiny", "imagenet"): 1000,
        ("vit_tiny", "cifar10"): 10,
        ("mlp_mixer", "cifar100"): 100,
    }.items():
        ckpt = exp.collected.splits(arch, task)["heldout_run"][0]
        _, spec, _ = load_checkpoint(ckpt)
        assert spec.arch == P["archs"][arch]["arch"] and spec.kwargs["num_classes"] == classes
        assert spec.dataset == task  # the paper profile names each task after its dataset
        assert spec.norm == (((0.5,) * 3,) * 2 if arch == "vit_tiny" else None)
        assert read_json(ckpt.parent / "run.json")["device"] == exp.device
    features = load_file(P["archs"]["vit_tiny"]["pretrained_file"])
    head_task, _, _ = load_checkpoint(exp.collected.splits("vit_tiny", "cifar10")["trained"][0])
    assert all(
        torch.equal(head_task[k], v) for k, v in features.items() if not k.startswith("head.")
    )
    # QAT targets only where the profile asks; ViT-Base's generator uses its own token size
    assert [
        a
        for a, e in exp.collected.manifest["archs"].items()
        for t in e["tasks"].values()
        if "qat" in t
    ] == ["vit_tiny"]
    tokens = {
        s.arch: exp.generator(s).tokenizer.shape[1] for s in main_settings(exp.profile)["table1"]
    }
    assert tokens == {"vit_tiny": 32, "mlp_mixer": 32, "vit_base": 64}
    table1 = pd.read_csv(paths.results / "table1.csv")
    accuracy = table1[table1.method != "gen-ptq"].value
    assert (
        set(table1.arch) == {"vit_tiny", "mlp_mixer", "vit_base"} and accuracy.between(0, 100).all()
    )
    for name in ("table2", "table3", "ablation_token_size", "ablation_backbone"):
        assert (paths.results / f"{name}.csv").is_file(), name
    assert (paths.figures / "figure1.png").is_file() and (paths.figures / "figure3.png").is_file()
    for name in ("amortized_qat", "fidelity_residual"):
        assert (paths.results / f"{name}.csv").is_file(), name
    # every executed notebook displays each figure it saves, and no output names this machine's
    # folders
    for executed_nb in executed:
        nb = json.loads(executed_nb.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code" and "save_figure(" in "".join(cell["source"]):
                shown = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
                assert shown, (
                    f"{executed_nb.name}: a cell saves a figure it does not display:\n"
                    f"{''.join(cell['source'])[:200]}"
                )
        paths_run = {k: nb["metadata"]["papermill"][k] for k in ("input_path", "output_path")}
        outputs = json.dumps([c.get("outputs", []) for c in nb["cells"]]) + json.dumps(paths_run)
        # (bar the profile file)
        assert str(fake_data) not in outputs, f"{executed_nb.name} records an absolute path"
    for written in [
        *paths.results.glob("*.csv"),
        *paths.results.glob("*.json"),
        *paths.results.glob("*.md"),
    ]:
        assert str(fake_data) not in written.read_text(), f"{written.name} records an absolute path"
