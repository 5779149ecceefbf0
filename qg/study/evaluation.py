"""Scoring the experiments: the tidy frames every table and figure is drawn from.

`evaluate` scores every method's model file of a generator's setting (one row per method, spec,
split and checkpoint); `diagnose` compares its generated files with their targets (fidelity, input
sensitivity, memorisation); `convergence_row` and `run_ablation` combine both for 02_train's
convergence study and the ablation notebooks; `file_costs` and `runtime_rows` measure the files
themselves (size, and the packed runtime against the simulated model) for 09_real_files.
`qg.study.experiments` says which files and generators exist; this module only reads them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import torch

from .. import methods as registry
from ..methods import QWT_SUFFIX
from ..quant.fileformat import load_quantized, read_quantized, read_quantized_meta, storage
from ..quant.quantizer import QuantSpec
from ..targets.models import build_from, load_checkpoint, predict, progress, top1
from ..targets.runtime import latency, load_runtime, max_logit_difference, weight_bytes
from .agreement import agreement_rows
from .experiments import Experiment, evenly_spaced
from .fidelity import distances, error_iou, layer_fidelity, nearest_distances, sensitivity
from .settings import SPLITS, Setting, ablation_settings


def evaluate(
    exp: Experiment,
    setting: Setting,
    methods: tuple[str, ...] = ("fp", "ptq", "gen"),
    splits: tuple[str, ...] = SPLITS,
) -> pd.DataFrame:
    """One row per (method, spec, split, checkpoint): accuracy and the seconds that model took."""
    wanted = {m.removesuffix(QWT_SUFFIX) for m in methods}  # `gen+qwt` needs `gen`'s generator
    quantgens = {
        m: exp.generator(setting.generator_for(m))
        for m in registry.names("generator")
        if m in wanted
    }
    dataset = exp.collected.entry(setting.arch, setting.task)["task"]["dataset"]
    rows = []
    for split, ckpts in exp.collected.splits(setting.arch, setting.task, splits).items():
        for ckpt in evenly_spaced(ckpts, exp.profile.eval.per_split):
            for spec in setting.specs:
                for method in methods:
                    path = exp.model_file(
                        setting, spec, ckpt, method, quantgens.get(method.removesuffix(QWT_SUFFIX))
                    )
                    rows.append(
                        _row(
                            setting,
                            dataset,
                            spec,
                            split,
                            ckpt,
                            method,
                            exp.scorer.score(path),
                            _seconds(path, method),
                        )
                    )
    return pd.DataFrame(rows)


def _seconds(path: Path, method: str) -> float:
    """What making a method's model file took: none for the checkpoint itself, the fine-tuning for
    QAT's FP32 control (a checkpoint), else what the quantized file records."""
    kind = registry.get(method).kind
    if kind == "reference":
        return 0.0
    if kind == "finetuned":
        return load_checkpoint(path)[2]["seconds"]
    return read_quantized_meta(path)[1]["seconds"]


def _row(
    setting: Setting,
    dataset: str,
    spec: QuantSpec,
    split: str,
    ckpt: Path,
    method: str,
    acc: float,
    seconds: float,
) -> dict:
    return {
        "arch": setting.arch,
        "task": setting.task,
        "dataset": dataset,
        "setting": setting.name,
        "source": setting.source,
        "condition": setting.condition or "",
        "variant": setting.label,
        "method": method,
        "bits": spec.bits,
        "granularity": spec.granularity,
        "split": split,
        "checkpoint": f"{ckpt.parent.name}/{ckpt.stem}",
        "accuracy": acc,
        "seconds": seconds,
    }


def convergence_row(exp: Experiment, setting: Setting, split: str = "heldout_run") -> dict:
    """One variant of the convergence study: its cost, final loss, fidelity and Gen − PTQ on
    `split`, and for the layer with the largest code error, how much of it is a wrong range per
    group (`worst_gain_err`, `worst_scale_err`) and how much is per element (`worst_local_err`, see
    `qg.study.fidelity.layer_fidelity`); and whether it follows its input: on how many of the n
    checkpoints Gen's model, and PTQ's, is closest to its own FP32 input (`qg.study.agreement`)."""
    spec, record = setting.specs[0], exp.generator(setting).record
    layers = (
        diagnose(exp, setting, spec, split, memorisation=False)["layers"]
        .groupby("layer")
        .mean(numeric_only=True)
    )
    worst = layers.code_mae.idxmax()
    ev = evaluate(exp, setting, ("ptq", "gen"), splits=(split,))
    acc = ev.groupby("method").accuracy.mean()
    (follows,) = agreement_rows(exp, setting, splits=(split,))
    gen_cfg = setting.block(exp.profile, "generator")
    tok_cfg = setting.block(exp.profile, "tokenizer")
    return {
        "arch": setting.arch,
        "task": setting.task,
        "variant": setting.label,
        "bits": spec.bits,
        "granularity": spec.granularity,
        "split": split,
        "skip": gen_cfg.skip,
        "base": tok_cfg.base,
        "d_model": gen_cfg.d_model or tok_cfg.token_size,
        "steps": record["steps"],
        "n_params": record["n_params"],
        "train_seconds": record["train_seconds"],
        "final_loss": record["final_loss"],
        "codes_equal": layers.codes_equal.mean(),
        "code_mae": layers.code_mae.mean(),
        "code_mae_worst": layers.code_mae.max(),
        "worst_layer": worst,
        "worst_gain_err": layers.group_gain_err[worst],
        "worst_local_err": layers.code_mae_local[worst],
        "scale_rel_err": layers.scale_rel_err.mean(),
        "worst_scale_err": layers.scale_rel_err[worst],
        "gen": acc["gen"],
        "ptq": acc["ptq"],
        "gen_minus_ptq": acc["gen"] - acc["ptq"],
        "n": follows["n"],
        "closest_input": follows["closest_input"],
        "ptq_closest_input": follows["target_closest_input"],
    }


def run_ablation(
    exp: Experiment, factor: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """Train (or read back) and evaluate every variant of one ablation.

    Returns the per-checkpoint evaluations (PTQ and Gen), one cost row per generator (training
    seconds, activation MB, parameters, final loss) and each generator's loss curve.
    """
    runs, costs, curves = [], [], {}
    for s in progress(ablation_settings(exp.profile, factor), desc=factor):
        record = exp.generator(s).record
        runs.append(evaluate(exp, s, ("ptq", "gen")))
        costs.append(
            {
                "variant": s.label,
                "bits": s.specs[0].bits,
                **{
                    k: record.get(k, float("nan"))
                    for k in ("train_seconds", "activation_mb", "n_params", "final_loss")
                },
            }
        )
        curves[f"{s.label}, {s.specs[0].name}"] = pd.read_csv(exp.generator_dir(s) / "loss.csv")
    return pd.concat(runs, ignore_index=True), pd.DataFrame(costs), curves


def diagnose(
    exp: Experiment,
    setting: Setting,
    spec: QuantSpec,
    split: str = "heldout_run",
    memorisation: bool = True,
) -> dict[str, pd.DataFrame]:
    """Fidelity, input sensitivity and memorisation of one generator on the checkpoints of one
    split.

    Compared with the generator's own targets (PTQ or QAT of the same checkpoint),
    `qg.study.fidelity`'s measures: `layers` per (checkpoint, layer); `sensitivity` per (pair of
    consecutive checkpoints, layer); `nearest` per checkpoint, for the generated model and, as the
    reference a faithful quantizer would match, for the target itself: distances to the nearest
    training target and the error IoU with that training model (`memorisation=False` skips this
    part, which needs every training target and two evaluations per model).
    """
    quantgen = exp.generator(setting)
    splits = exp.collected.splits(setting.arch, setting.task, ("trained", split))
    ckpts = evenly_spaced(splits[split], exp.profile.eval.per_split)
    gen_files = [exp.generated(setting, spec, c, quantgen) for c in ckpts]
    own_files = [exp.target(setting, spec, c) for c in ckpts]
    gen, own = ([read_quantized(p)[0] for p in files] for files in (gen_files, own_files))
    tag = _tag(setting, spec, split)
    layers = pd.concat(
        [layer_fidelity(g, t).assign(checkpoint=c.stem) for g, t, c in zip(gen, own, ckpts)]
    )
    sens = pd.concat(
        [
            sensitivity(gen[i], gen[i + 1], own[i], own[i + 1]).assign(pair=i)
            for i in range(len(ckpts) - 1)
        ]
        or [pd.DataFrame(columns=["layer", "target_moves", "sensitivity", "alignment", "pair"])]
    )
    if not memorisation:
        return {"layers": layers.assign(**tag), "sensitivity": sens.assign(**tag)}
    train_files = [exp.target(setting, spec, c) for c in splits["trained"]]
    near = _nearest(exp.scorer, (gen_files, gen), (own_files, own), train_files, ckpts)
    return {
        "layers": layers.assign(**tag),
        "sensitivity": sens.assign(**tag),
        "nearest": pd.DataFrame(near).assign(**tag),
    }


def _tag(setting: Setting, spec: QuantSpec, split: str) -> dict:
    """The columns every frame of `diagnose` carries: which setting, spec and split it measures."""
    return {
        "arch": setting.arch,
        "task": setting.task,
        "setting": setting.name,
        "source": setting.source,
        "variant": setting.label,
        "bits": spec.bits,
        "granularity": spec.granularity,
        "split": split,
    }


def _nearest(scorer, generated, targets, train_files, ckpts) -> list[dict]:
    """For each checkpoint's generated model and its target (each (files, loaded models)): the
    distances to the nearest training target and the error IoU with that training model and with
    the own target."""
    train = [read_quantized(p)[0] for p in train_files]
    own_files, own = targets
    rows = []
    for model, (files, models) in (("gen", generated), ("target", targets)):
        for i, row in nearest_distances(models, own, train).iterrows():
            pred, labels = scorer.predictions(files[i])
            pred_train, _ = scorer.predictions(train_files[int(row.nearest_train)])
            pred_own, _ = scorer.predictions(own_files[i])
            rows.append(
                {
                    **row.to_dict(),
                    "model": model,
                    "checkpoint": ckpts[i].stem,
                    "iou_nearest_train": error_iou(pred, pred_train, labels),
                    "iou_own": error_iou(pred, pred_own, labels),
                }
            )
    return rows


def split_distances(exp: Experiment, arch: str, task: str) -> pd.DataFrame:
    """How new each split's inputs are: per evaluated checkpoint of every split, the distance of its
    FP32 weights to the nearest training checkpoint (another one, for a training checkpoint), in
    units of `spacing`, the median distance between neighbouring training checkpoints. About 1:
    as new as a training checkpoint is to its neighbours; far above 1: outside what the generator
    was trained on."""
    splits = exp.collected.splits(arch, task)
    train = [load_checkpoint(p)[0] for p in splits["trained"]]
    within = distances(train, train)
    within.fill_diagonal_(float("inf"))
    spacing = float(within.min(1).values.median())
    rows = []
    for split, ckpts in splits.items():
        ckpts = evenly_spaced(ckpts, exp.profile.eval.per_split)
        d = distances([load_checkpoint(p)[0] for p in ckpts], train)
        if split == "trained":  # a training checkpoint's nearest other one
            d[d == 0] = float("inf")
        rows += [
            {
                "arch": arch,
                "task": task,
                "split": split,
                "checkpoint": c.stem,
                "to_nearest_train": float(x),
                "in_spacings": float(x) / spacing,
            }
            for c, x in zip(ckpts, d.min(1).values)
        ]
    return pd.DataFrame(rows)


def split_gap(exp: Experiment, setting: Setting, spec: QuantSpec) -> pd.DataFrame:
    """`diagnose`'s per-layer fidelity of one generator on every split (no memorisation test):
    what changes in its codes between the checkpoints it was trained on and a new run's."""
    return pd.concat(
        [diagnose(exp, setting, spec, split, memorisation=False)["layers"] for split in SPLITS],
        ignore_index=True,
    )


def file_costs(
    exp: Experiment,
    setting: Setting,
    split: str = "heldout_run",
    methods: tuple[str, ...] = ("ptq", "hqq", "gen"),
) -> pd.DataFrame:
    """What each method's file of the first checkpoint of `split` costs: bytes on disk and bits per
    quantized weight (`qg.quant.fileformat.storage`), against the FP32 checkpoint file, and the
    seconds the method took."""
    ckpt = exp.collected.splits(setting.arch, setting.task, (split,))[split][0]
    rows = []
    for spec in setting.specs:
        for method in methods:
            path = exp.model_file(setting, spec, ckpt, method)
            file_spec, meta = read_quantized_meta(path)
            rows.append(
                {
                    "arch": setting.arch,
                    "task": setting.task,
                    "method": method,
                    "bits": spec.bits,
                    "granularity": spec.granularity,
                    "group_size": spec.group_size,
                    "scheme": file_spec.scheme,
                    "checkpoint": f"{ckpt.parent.name}/{ckpt.stem}",
                    "fp32_file_bytes": ckpt.stat().st_size,
                    **storage(path),
                    "seconds": meta["seconds"],
                }
            )
    return pd.DataFrame(rows)


def runtime_rows(
    exp: Experiment,
    setting: Setting,
    split: str = "heldout_run",
    batch: int = 256,
    repeats: int = 5,
) -> pd.DataFrame:
    """The generator's file of the first checkpoint of `split`, run packed (`qg.targets.runtime`)
    and simulated (dequantized to float32): accuracy of both on the profile's test subset, their
    largest logit difference, resident weight bytes and seconds per batch of `batch` test images,
    with the FP32 checkpoint's (on CPU: the runtime is a CPU runtime; FP32 is timed again beside
    each file, so each ratio is of two timings taken together)."""
    ckpt = exp.collected.splits(setting.arch, setting.task, (split,))[split][0]
    fp_sd, model_spec, _ = load_checkpoint(ckpt)
    fp = build_from(model_spec, fp_sd, str(ckpt)).eval()
    test = exp.scorer.test_set(model_spec)
    x = torch.cat(
        list(itertools.islice((images for images, _ in test), -(-batch // test.batch_size)))
    )[:batch]
    rows = []
    for spec in setting.specs:
        path = exp.generated(setting, spec, ckpt)
        packed = load_runtime(path)[0]
        simulated = build_from(model_spec, load_quantized(path)[0], str(path)).eval()
        rows.append(
            {
                "arch": setting.arch,
                "task": setting.task,
                "method": "gen",
                "bits": spec.bits,
                "granularity": spec.granularity,
                "checkpoint": f"{ckpt.parent.name}/{ckpt.stem}",
                "accuracy_simulated": exp.scorer.score(path),
                "accuracy_runtime": top1(*predict(packed, test, "cpu")),
                "max_logit_diff": max_logit_difference(packed, simulated, x),
                "weight_bytes_runtime": weight_bytes(packed),
                "weight_bytes_fp32": weight_bytes(fp),
                "batch": len(x),
                "device": f"cpu, torch threads: {torch.get_num_threads()}",
                "seconds_runtime": latency(packed, x, repeats),
                "seconds_fp32": latency(fp, x, repeats),
            }
        )
    return pd.DataFrame(rows)
