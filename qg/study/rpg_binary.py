"""RPG on binary tasks it never saw (RPG Tables 9 and 14 at our scale, 10_rpg): a dataset
relabelled 0/1 by a 10-bit embedding per task, head-only classifiers trained per task, RPG
conditioned on the embedding, and its samples on unseen tasks against the nearest seen task's
classifiers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..config.rpg import BinaryRun, RpgBinary
from ..config.schema import Profile
from ..core.io import cached, content_digest, params_key
from ..generator.rpg import RPG
from ..generator.train import TrainConfig
from ..targets.models import (
    ModelSpec,
    load_checkpoint,
    load_model_description,
    save_checkpoint,
)
from ..targets.names import dataset_info, relabelled
from .experiments import Experiment
from .fidelity import distances
from .rpg_study import block_defaults, rpg_config
from .training import TrainSpec, task_start, train_model


def embeddings(n_classes: int) -> list[str]:
    """Every binary task of `n_classes` classes: the 2^n - 2 strings of 0/1 holding both labels, in
    order."""
    return [format(i, f"0{n_classes}b") for i in range(1, 2**n_classes - 1)]


def task_split(
    n_classes: int, n_seen: int, n_unseen: int, seed: int
) -> tuple[list[str], list[str]]:
    """(seen, unseen) embeddings, disjoint, drawn by a seeded permutation of `embeddings`."""
    every = embeddings(n_classes)
    if n_seen + n_unseen > len(every):
        raise ValueError(
            f"{n_seen} seen + {n_unseen} unseen tasks: only {len(every)} binary tasks of "
            f"{n_classes} classes"
        )
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed)).tolist()
    return (
        [every[i] for i in order[n_unseen : n_unseen + n_seen]],
        [every[i] for i in order[:n_unseen]],
    )


def binary_config(profile: Profile) -> dict:
    """The `rpg.binary` block with its defaults: the first of `rpg.archs`, RPG's generator and
    training settings."""
    rpg = rpg_config(profile)
    if profile.rpg.binary is None:
        raise ValueError(
            "this profile has no `rpg.binary` block: the unseen-task study has nothing to run"
        )
    own = ("rpg", "binary")
    return {
        **block_defaults(RpgBinary),
        "arch": rpg["archs"][0],
        "rpg_train": rpg["train"],
        **profile.set_in(*own),
        "train": {**block_defaults(BinaryRun), **profile.set_in(*own, "train")},
        "generator": {**rpg["generator"], **profile.set_in(*own, "generator"), "head": "diffusion"},
    }


def _task_spec(exp: Experiment, embedding: str) -> tuple[ModelSpec, TrainSpec]:
    """(ModelSpec, TrainSpec) of the binary task `embedding`: the pretrained model of
    `rpg.binary.arch` (its architecture and input normalisation) with a two-class head, trained
    head-only on the relabelled data."""
    conf = binary_config(exp.profile)
    base = load_model_description(exp.collected.pretrained(conf["arch"]))
    name = relabelled(conf["dataset"], embedding)
    spec = ModelSpec(base.arch, {**base.kwargs, "num_classes": 2}, name, base.norm)
    return spec, TrainSpec(dataset=name, head_only=True, **conf["train"])


def task_checkpoints(exp: Experiment, embedding: str) -> list[Path]:
    """The head-only classifiers of one binary task (cached): `rpg.binary.checkpoints` from the last
    epoch of one run from the pretrained model of 01_collect."""
    conf, seed = binary_config(exp.profile), exp.profile.seed
    spec, task = _task_spec(exp, embedding)
    pretrained = load_checkpoint(exp.collected.pretrained(conf["arch"]))[0]
    start = task_start(pretrained, spec, task, seed)
    root = exp.paths.artifacts / "rpg" / "binary" / conf["arch"] / embedding
    return train_model(
        spec, task, start, seed, root, conf["checkpoints"], label="run", device=exp.device
    )[0]


def binary_dir(exp: Experiment) -> Path:
    """Where the unseen-task RPG lives, named by everything that determines it."""
    conf, (seen, _) = binary_config(exp.profile), binary_tasks(exp.profile)
    params = {
        k: conf[k]
        for k in ("arch", "dataset", "token_size", "generator", "train", "rpg_train", "checkpoints")
    }
    key = params_key({**params, "seed": exp.profile.seed, "seen": seen})
    return exp.paths.artifacts / "rpg" / "binary" / f"rpg-{key}"


def binary_rpg(exp: Experiment) -> RPG:
    """RPG conditioned on the task embedding, trained on the seen tasks' classifiers (cached,
    resumable)."""
    conf, seed, out = binary_config(exp.profile), exp.profile.seed, binary_dir(exp)
    if RPG.complete(out):
        return RPG.load(out, exp.device)
    seen, _ = binary_tasks(exp.profile)
    ckpts = [(e, p) for e in seen for p in task_checkpoints(exp, e)]
    rpg = RPG.fit(
        [load_checkpoint(p)[0] for _, p in ckpts],
        out,
        {**conf["generator"], "cond_bits": len(seen[0])},
        TrainConfig(seed=seed, **conf["rpg_train"]),
        conditions=[e for e, _ in ckpts],
        token_size=conf["token_size"],
        device=exp.device,
    )
    rpg.record.update(arch=conf["arch"], seen_tasks=len(seen), n_train_checkpoints=len(ckpts))
    rpg.save(out)
    return rpg


def binary_tasks(profile: Profile) -> tuple[list[str], list[str]]:
    """The (seen, unseen) binary tasks of a profile's `rpg.binary` block."""
    conf = binary_config(profile)
    return task_split(_classes(conf), conf["seen"], conf["unseen"], profile.seed)


def _classes(conf: dict) -> int:
    return dataset_info(conf["dataset"])["num_classes"]


def hamming(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a, b))


def binary_rows(exp: Experiment) -> pd.DataFrame:
    """One row per model scored on an unseen task: the task's own classifiers (which RPG never saw),
    RPG's samples for its embedding, and the baseline that needs no generator, the classifiers of
    the nearest seen task (Hamming distance of the embeddings); each with its distance to the
    nearest of RPG's training checkpoints (relative to their mean norm). And the floor each task
    has: always answering its more frequent test label (`majority_row`)."""
    conf = binary_config(exp.profile)
    seen, unseen = binary_tasks(exp.profile)
    rpg = binary_rpg(exp)
    train_sds = [load_checkpoint(p)[0] for e in seen for p in task_checkpoints(exp, e)]
    rows = []
    for e in unseen:
        near = min(seen, key=lambda s: (hamming(s, e), s))
        for kind, paths in _unseen_files(exp, rpg, e, near, conf["samples"]).items():
            d = distances([load_checkpoint(p)[0] for p in paths], train_sds).min(1).values
            for path, dist in zip(paths, d):
                rows.append(
                    {
                        "arch": conf["arch"],
                        "embedding": e,
                        "kind": kind,
                        "model": f"{path.parent.name}/{path.stem}",
                        "accuracy": exp.scorer.score(path),
                        "to_nearest_train": float(dist),
                        "nearest_seen": near,
                        "hamming": hamming(near, e),
                    }
                )
        rows.append(majority_row(exp, e, rows[-1]))
    return pd.DataFrame(rows)


def majority_row(exp: Experiment, embedding: str, like: dict) -> dict:
    """The unseen task's floor as a row like `like`: the accuracy of always answering the most
    frequent label of its test subset (not 50 %: a task's two labels cover unequal numbers of
    classes)."""
    labels = exp.scorer.predictions(task_checkpoints(exp, embedding)[0])[1]
    counts = labels.bincount()
    return {
        **like,
        "kind": "majority class",
        "model": f"always {int(counts.argmax())}",
        "accuracy": 100.0 * counts.max().item() / len(labels),
        "to_nearest_train": float("nan"),
    }


def _unseen_files(exp: Experiment, rpg, e: str, near: str, samples: int) -> dict[str, list[Path]]:
    """The model files of unseen task `e` by kind: its own classifiers, RPG's `samples` for its
    embedding and the classifiers of the nearest seen task `near` (cached as files of task `e`)."""
    spec, _ = _task_spec(exp, e)
    out = binary_dir(exp)
    made_by = {"rpg": content_digest(out / "generator.safetensors")}

    def write(path: Path, sd: dict, method: str, source: list[str]) -> None:
        save_checkpoint(path, sd, spec, {"method": method, "source": source, "embedding": e})

    return {
        "original": task_checkpoints(exp, e),
        "generated": [
            cached(
                out / "samples" / e / f"{i:03d}.safetensors",
                lambda path, i=i: write(path, rpg.sample_one(i, e, exp.profile.seed), "rpg", []),
                made_by,
            )
            for i in range(samples)
        ],
        "nearest seen": [
            cached(
                out / "nearest" / e / f"{near}-{j:03d}.safetensors",
                lambda path, p=p: write(path, load_checkpoint(p)[0], "nearest seen", [p.name]),
                {p.name: content_digest(p)},
            )
            for j, p in enumerate(task_checkpoints(exp, near))
        ],
    }
