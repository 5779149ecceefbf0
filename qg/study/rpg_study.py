"""RPG's own experiment at our scale (10_rpg): whole models sampled from noise, scored against the
checkpoints RPG learned from, with the memorisation tests and the two baselines a weight generator
must beat (Zeng et al., "Generative Modeling of Weights: Generalization or Memorization?", arXiv
2506.07998):

    original   run A's training checkpoints of the profile's `rpg.task`: what RPG learns from
    heldout    run B's checkpoints: genuinely new models of the same recipe (another seed), never
               seen
    generated  RPG's samples, each from its own noise (`qg.generator.rpg`)
    noise      a training checkpoint plus Gaussian noise of `rpg.noise` x each tensor's std
    average    the mean of `rpg.average_of` randomly drawn training checkpoints (weight averaging)

Every model is a checkpoint file (cached, keyed by what made it) scored by
`qg.study.scoring.Scorer`. Each one gets its distance to the nearest training checkpoint other than
itself, relative to the training checkpoints' mean norm (`qg.study.fidelity.distances`), and the IoU
of its test-set mistakes with that checkpoint's (`qg.study.fidelity.error_iou`). A replay of the
training set sits at distance ~0 with IoU ~1; a new model of the recipe sits where the held-out run
does.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from ..config.rpg import Rpg
from ..config.schema import Profile
from ..core.io import cached, content_digest, params_key, read_json, write_json
from ..generator.rpg import RPG
from ..generator.train import TrainConfig
from ..targets.models import (
    load_checkpoint,
    save_checkpoint,
    top1,
)
from .experiments import Experiment, evenly_spaced
from .fidelity import distances, error_iou

KINDS = ("original", "heldout", "generated", "noise", "average")


def block_defaults(block) -> dict:
    """A schema block's defaults that are values (a profile's dict holds only the keys its file
    set)."""
    return {
        k: f.default
        for k, f in block.model_fields.items()
        if not f.is_required() and f.default is not None
    }


def rpg_config(profile: Profile) -> dict:
    """The profile's `rpg` block with its defaults: generator settings as written (RPG mode's head
    is the diffusion head), training settings as written or, if unset, the profile's `train`
    block."""
    if profile.rpg is None:
        raise ValueError(
            "this profile has no `rpg` block: 10_rpg has nothing to run (see params/cpu.yaml)"
        )
    return {
        **block_defaults(Rpg),
        **profile.set_in("rpg"),
        "generator": {**profile.set_in("rpg", "generator"), "head": "diffusion"},
        "train": profile.set_in("rpg", "train") or profile.set_in("train"),
    }


def training_checkpoints(exp: Experiment, arch: str, first: int | None = None) -> list[Path]:
    """Run A's training checkpoints of `arch` (the `first` of them, for the overfit test)."""
    return exp.collected.splits(arch, rpg_config(exp.profile)["task"])["trained"][:first]


def rpg_dir(exp: Experiment, arch: str, first: int | None = None) -> Path:
    """Where the RPG of `arch` lives, named by everything that determines it."""
    conf = rpg_config(exp.profile)
    params = {k: conf[k] for k in ("task", "token_size", "generator", "train")}
    params.update(
        seed=exp.profile.seed,
        data=[exp.collected.relative(p) for p in training_checkpoints(exp, arch, first)],
    )
    return exp.paths.artifacts / "rpg" / f"{arch}-{conf['task']}-{params_key(params)}"


def trained_rpg(exp: Experiment, arch: str, first: int | None = None) -> RPG:
    """RPG trained on the training checkpoints of `arch` (only the `first` of them, for the
    overfit test): read back when cached, trained (resumably) when not."""
    out, ckpts = rpg_dir(exp, arch, first), training_checkpoints(exp, arch, first)
    conf = rpg_config(exp.profile)
    inputs = {exp.collected.relative(p): content_digest(p) for p in ckpts}
    marker = out / "inputs.json"
    if marker.is_file() and read_json(marker) != inputs:
        print(
            f"[qg] warning: {out.name} was trained on checkpoints that have changed since; "
            "training it again",
            file=sys.stderr,
            flush=True,
        )
        shutil.rmtree(out)
    if RPG.complete(out):
        return RPG.load(out, exp.device)
    # before training starts: an interrupted run resumes only on the same inputs
    write_json(marker, inputs)
    train_cfg = TrainConfig(seed=exp.profile.seed, **conf["train"])
    rpg = RPG.fit(
        [load_checkpoint(p)[0] for p in ckpts],
        out,
        conf["generator"],
        train_cfg,
        token_size=conf["token_size"],
        device=exp.device,
    )
    rpg.record.update(arch=arch, task=conf["task"], n_train_checkpoints=len(ckpts))
    rpg.save(out)
    return rpg


def model_files(exp: Experiment, arch: str) -> dict[str, list[Path]]:
    """Every model of the study as a checkpoint file, by kind (`KINDS`)."""
    conf, seed = rpg_config(exp.profile), exp.profile.seed
    train, n = training_checkpoints(exp, arch), conf["samples"]
    splits = exp.collected.splits(arch, conf["task"])
    spec = load_checkpoint(train[0])[1]
    rpg, out = trained_rpg(exp, arch), rpg_dir(exp, arch)
    made_by = {"rpg": content_digest(out / "generator.safetensors")}
    file = functools.partial(_model_file, out, spec)
    digests = {exp.collected.relative(p): content_digest(p) for p in train}
    return {
        "original": list(train),
        "heldout": list(splits["heldout_run"]),
        "generated": [
            file("generated", i, lambda i=i: (rpg.sample_one(i, seed=seed), []), made_by)
            for i in range(n)
        ],
        "noise": [
            file(
                f"noise-{params_key({'sigma': conf['noise']})}",
                i,
                lambda p=p, i=i: _noisy(p, conf["noise"], seed * 1_000_003 + i, exp.collected),
                {exp.collected.relative(p): content_digest(p)},
            )
            for i, p in enumerate(evenly_spaced(train, n))
        ],
        "average": [
            file(
                f"average-{conf['average_of']}",
                i,
                lambda i=i: _averaged(
                    train, conf["average_of"], seed * 1_000_003 + i, exp.collected
                ),
                digests,
            )
            for i in range(n)
        ],
    }


def _model_file(out: Path, spec, kind: str, i: int, make, inputs: dict) -> Path:
    """Model `i` of `kind` as a checkpoint file under `out`, cached on `inputs`: the weights and
    sources `make()` returns, with the seconds making them took."""

    def write(path: Path) -> None:
        start = time.perf_counter()
        sd, source = make()
        save_checkpoint(
            path,
            sd,
            spec,
            {"method": kind, "source": source, "seconds": time.perf_counter() - start},
        )

    return cached(out / kind / f"{i:03d}.safetensors", write, inputs)


def _noisy(path: Path, sigma: float, seed: int, collected) -> tuple[dict, list[str]]:
    """The checkpoint at `path` plus Gaussian noise of `sigma` times each tensor's std (seeded),
    and its source."""
    sd = load_checkpoint(path)[0]
    gen = torch.Generator().manual_seed(seed)
    return (
        {
            k: v + sigma * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v
            for k, v in sd.items()
        },
        [collected.relative(path)],
    )


def _averaged(train: list[Path], k: int, seed: int, collected) -> tuple[dict, list[str]]:
    """The mean of `k` training checkpoints drawn without replacement (seeded), and its sources."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    chosen = [train[j] for j in sorted(pick[:k].tolist())]
    sds = [load_checkpoint(p)[0] for p in chosen]
    return (
        {name: torch.stack([sd[name] for sd in sds]).mean(0) for name in sds[0]},
        [collected.relative(p) for p in chosen],
    )


def tensor_stats(files: dict[str, list[Path]], kinds=("original", "generated")) -> pd.DataFrame:
    """Per tensor and model: the mean, std and norm of its values, for the models of `kinds`
    (do samples have the checkpoints' scale, layer by layer?)."""
    rows = []
    for kind in kinds:
        for path in files[kind]:
            for name, v in load_checkpoint(path)[0].items():
                if v.is_floating_point() and v.numel() > 1:
                    v = v.double()
                    rows.append(
                        {
                            "kind": kind,
                            "model": path.stem,
                            "tensor": name,
                            "mean": float(v.mean()),
                            "std": float(v.std()),
                            "norm": float(v.norm()),
                        }
                    )
    return pd.DataFrame(rows)


def rpg_rows(exp: Experiment, arch: str) -> pd.DataFrame:
    """One row per model of the study: its kind, accuracy, seconds to make it, distance to the
    nearest training checkpoint other than itself (relative to their mean norm) and the IoU of its
    test mistakes with that one's."""
    files, conf = model_files(exp, arch), rpg_config(exp.profile)
    train = files["original"]
    train_sds = [load_checkpoint(p)[0] for p in train]
    train_preds = [exp.scorer.predictions(p)[0] for p in train]
    rows = []
    for kind, paths in files.items():
        loaded = [load_checkpoint(p) for p in paths]
        d = distances([sd for sd, _, _ in loaded], train_sds)
        if kind == "original":
            # an original's nearest training checkpoint is another one
            d.fill_diagonal_(float("inf"))
        for i, (path, (_, _, meta)) in enumerate(zip(paths, loaded)):
            seconds = (
                meta.get("seconds", float("nan"))
                if kind not in ("original", "heldout")
                else float("nan")
            )
            nearest = int(d[i].argmin())
            pred, labels = exp.scorer.predictions(path)
            rows.append(
                {
                    "arch": arch,
                    "task": conf["task"],
                    "kind": kind,
                    "model": f"{path.parent.name}/{path.stem}",
                    "accuracy": top1(pred, labels),
                    "seconds": float(seconds),
                    "to_nearest_train": float(d[i, nearest]),
                    "nearest_train": train[nearest].stem,
                    "error_iou": error_iou(pred, train_preds[nearest], labels),
                }
            )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- unseen tasks
# RPG Sec. 4: binary tasks made by giving each class of a dataset the label 0 or 1 (a 10-bit
# embedding for 10 classes; 1022 hold both labels). Head-only classifiers of a frozen pretrained
# model are collected for `seen` embeddings; RPG, conditioned on the embedding, is trained on them
# and asked for models of `unseen` ones.
