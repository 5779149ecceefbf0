"""Collecting the full-precision checkpoints the generator learns from (the paper's Sec. 4.1, scaled
down).

Two tasks per architecture, as in the paper:
  full  the ImageNet setting: a model trained on the task ("pretrained"), then one more epoch of
        full fine-tuning from which N checkpoints are saved at evenly spaced steps;
  head  the CIFAR setting: the pretrained model's features are frozen and a new classification head
        is trained on another dataset; checkpoints come from the final training epoch.
Each task is collected three times from the same starting weights: run A (seed s, or
`checkpoints.runs` fine-tunings of seeds s, s + 2, s + 3, ...; the generator trains on most of it,
the rest are held-out checkpoints), run B (seed s + 1; never trained on, the held-out run every
claim is made on) and run C (seed s + runs + 1, the first after runs A's and B's; never trained on,
the validation run on which a variant is chosen, so that the held-out run only reports).
`Collected` (collected.py) reads it back.

QAT targets (the paper's QAT setting) are made per checkpoint: a short quantization-aware
fine-tuning started from the checkpoint, then quantized; its wall time is recorded in the file,
since "time to quantize N models with QAT" is what the generator is compared against (Table 2,
Figure 1).

Every run is cached under a directory named by the hash of everything that determines it, and marked
complete by `run.json`, written last and atomically: a finished run is never recomputed, an
interrupted one is redone, and one whose checkpoints no longer match their recorded hashes (or are
gone) is trained again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config.profiles import pairs, selected
from ..config.schema import Profile
from ..core.io import cached, file_sha256, params_key, update_json
from ..quant.fileformat import save_quantized
from ..quant.quantizer import QuantSpec, quantize_state_dict
from ..targets.data import batches
from ..targets.models import (
    ModelSpec,
    build_model,
    check_pretrained_file,
    fit,
    load_checkpoint,
    load_weights,
    pretrained_norm,
    pretrained_weights,
    save_checkpoint,
    state_dict_of,
)
from ..targets.names import dataset_info
from .training import TrainSpec, task_start, train_model


def collect_task(
    spec: ModelSpec,
    pretrained: dict,
    task: TrainSpec,
    n_checkpoints: int,
    n_heldout_run: int,
    n_validation_run: int,
    seed: int,
    root,
    device: str = "cpu",
    runs: int = 1,
) -> dict:
    """Run A (n_checkpoints, from `runs` fine-tunings of n_checkpoints / runs each), run B
    (n_heldout_run, seed + 1) and run C (n_validation_run, `validation_seed`) of one task; returns
    their file lists."""
    start = task_start(pretrained, spec, task, seed)
    run_a, seconds = [], 0.0
    for r, run_seed in enumerate(run_a_seeds(seed, runs)):
        paths, record = train_model(
            spec,
            task,
            start,
            run_seed,
            root,
            n_checkpoints // runs,
            label="runA" if r == 0 else f"runA-{r}",
            device=device,
        )
        run_a, seconds = run_a + paths, seconds + record["seconds"]
    held_out = {}  # runs B and C: one fine-tuning each, never trained on
    for label, run_seed, n in (
        ("runB", seed + 1, n_heldout_run),
        ("runC", validation_seed(seed, runs), n_validation_run),
    ):
        paths, record = train_model(spec, task, start, run_seed, root, n, label, device=device)
        held_out[label], seconds = [str(p) for p in paths], seconds + record["seconds"]
    return {
        "model": spec.to_dict(),
        "task": asdict(task),
        "runA": [str(p) for p in run_a],
        **held_out,
        "runs": runs,
        "seconds": seconds,
    }


def run_a_seeds(seed: int, runs: int) -> list[int]:
    """The seeds of run A's fine-tunings: `seed`, then seed + 2, seed + 3, ... (seed + 1 is run
    B's, which stays a run no generator sees)."""
    return [seed] + [seed + 1 + r for r in range(1, runs)]


def validation_seed(seed: int, runs: int) -> int:
    """Run C's seed: the first after those of runs A (`run_a_seeds`) and B (seed + 1), so that no
    two runs share one."""
    return seed + runs + 1


@dataclass(frozen=True)
class QATSpec:
    """Quantization-aware fine-tuning from a checkpoint: `steps` AdamW steps on the task's data."""

    steps: int
    lr: float
    batch_size: int = 128
    weight_decay: float = 0.0


RUNS = ("runA", "runB", "runC")  # the manifest's names of a task's runs
FP_STEPS = "fp32"  # the manifest's key, beside the QAT specs' names, of QAT's FP32 control


def qat_target(
    checkpoint: Path,
    spec: QuantSpec | None,
    qat: QATSpec,
    task: TrainSpec,
    seed: int,
    root,
    device: str = "cpu",
) -> Path:
    """The QAT-quantized model of one checkpoint, as a quantized file (cached by content and
    settings); with `spec` None, its control: the same fine-tuning (steps, data, order) with no
    quantization, as a checkpoint, so that QAT − FP32 splits into what the extra steps gain and
    what quantizing costs.

    The whole network is fine-tuned with fake-quantized weights, then quantized with `spec`; the
    file's metadata records the wall time of the fine-tuning (`seconds`), the cost Table 2 charges
    to QAT.
    """
    key = params_key(
        {
            "ckpt": file_sha256(checkpoint),
            "spec": spec.to_dict() if spec else None,
            "qat": asdict(qat),
            "task": asdict(task),
            "seed": seed,
        }
    )
    return cached(
        Path(root)
        / (spec.name if spec else FP_STEPS)
        / f"{Path(checkpoint).stem}-{key}.safetensors",
        lambda out: _fine_tune_qat(out, checkpoint, spec, qat, task, seed, device),
    )


def _fine_tune_qat(
    out: Path,
    checkpoint: Path,
    spec: QuantSpec | None,
    qat: QATSpec,
    task: TrainSpec,
    seed: int,
    device: str,
) -> None:
    sd, model_spec, meta = load_checkpoint(checkpoint)
    model = load_weights(build_model(model_spec), sd)
    # the data its run saw
    loader = batches(
        task.dataset,
        "train",
        model_spec.img_size,
        qat.batch_size,
        shuffle=True,
        subset=task.train_subset,
        seed=seed,
        subset_seed=meta.get("seed", seed),
        norm=model_spec.norm,
    )
    start = time.perf_counter()
    fit(
        model,
        loader,
        qat.steps / len(loader),
        qat.lr,
        qat.weight_decay,
        quant=spec,
        desc=f"QAT {spec.name if spec else 'steps, fp32'}",
        device=device,
    )
    seconds = time.perf_counter() - start
    record = {"source": str(checkpoint), "seconds": seconds, "device": device}
    if spec is None:
        save_checkpoint(out, state_dict_of(model), model_spec, {**meta, **record, "method": "fp"})
        return
    save_quantized(
        out,
        quantize_state_dict(state_dict_of(model), spec),
        spec,
        {"model": model_spec.to_dict(), "method": "qat", **record, "fp_meta": meta},
    )


def collect_qat(
    task_entry: dict, specs: list[QuantSpec], qat: QATSpec, seed: int, root, device: str = "cpu"
) -> dict:
    """QAT targets for every checkpoint of every run of a collected task, and their FP32 control
    (`FP_STEPS`): {spec name or FP_STEPS: {run: [files]}}."""
    task = TrainSpec(**task_entry["task"])
    return {
        spec.name if spec else FP_STEPS: {
            run: [
                str(qat_target(Path(p), spec, qat, task, seed + i, Path(root) / "qat", device))
                for i, p in enumerate(task_entry[run])
            ]
            for run in RUNS
        }
        for spec in [*specs, None]
    }


def pretrained_start(spec: ModelSpec, file, root) -> tuple[ModelSpec, Path]:
    """timm's pretrained weights for `spec` (from the hub, or `file`), saved once as a checkpoint
    under `root` so that reruns need neither; the returned spec carries the input normalisation
    those weights expect."""
    if file is not None:
        check_pretrained_file(file)
    spec = replace(spec, norm=spec.norm or pretrained_norm(spec.arch))
    key = params_key(
        {"model": spec.to_dict(), "file": file_sha256(file) if file is not None else "timm hub"}
    )
    out = cached(
        Path(root) / f"pretrained-{key}.safetensors",
        lambda path: save_checkpoint(
            path, pretrained_weights(spec, file), spec, {"source": str(file or "timm hub")}
        ),
    )
    return spec, out


def collect(profile: Profile, root, device: str = "cpu") -> dict:
    """Pretrain every architecture of the profile, then collect every task (and its QAT targets):
    the manifest 02_train reads (`root/manifest.json`, its file paths relative to `root`; read it
    back with `Collected`).

    Each architecture is pretrained on its dataset (or, with `pretrain: null`, starts from timm's
    weights: the paper profile); each of its tasks fine-tunes it (the task's dataset and number of
    classes) into the checkpoints of runs A, B and C; `qat` selects the pairs that also get QAT
    targets. Every run is keyed by the values as the profile file wrote them (`Profile.written`).
    Training runs on `device`.
    """
    root, seed = Path(root), profile.seed
    manifest = {"archs": {}, "seed": seed}
    for arch_name in profile.archs:
        spec, path, seconds = _pretrained(profile, arch_name, root, device)
        pretrained = load_checkpoint(path)[0]
        entry = {"pretrained": _relative(path, root), "pretrain_seconds": seconds, "tasks": {}}
        for task_name in profile.tasks:
            if (arch_name, task_name) in pairs(profile):
                task_entry = _collect_pair(
                    profile, spec, pretrained, task_name, root / arch_name, device
                )
                entry["tasks"][task_name] = _relative_entry(task_entry, root)
        manifest["archs"][arch_name] = entry
    update_json(root / "manifest.json", manifest)
    return manifest


def _pretrained(profile: Profile, arch_name: str, root: Path, device: str):
    """(ModelSpec, pretrained checkpoint, seconds it took) of one architecture: trained here, or
    timm's weights when the profile's `pretrain` is null."""
    spec = ModelSpec.from_dict(profile.written["archs"][arch_name])
    if profile.pretrain is None:
        spec, path = pretrained_start(
            spec, profile.archs[arch_name].pretrained_file, root / arch_name
        )
        return spec, path, 0.0
    paths, record = train_model(
        spec,
        TrainSpec(**profile.written["pretrain"]),
        None,
        profile.seed,
        root / arch_name,
        label="pretrain",
        device=device,
    )
    return spec, paths[-1], record["seconds"]


def _collect_pair(
    profile: Profile, spec: ModelSpec, pretrained: dict, task_name: str, arch_dir: Path, device
) -> dict:
    """One (architecture, task)'s checkpoints of runs A, B and C and, where the profile asks, their
    QAT targets: its manifest entry (absolute paths)."""
    task = profile.tasks[task_name]
    classes = dataset_info(task.dataset)["num_classes"]
    task_spec = ModelSpec(
        spec.arch, {**spec.kwargs, "num_classes": classes}, task.dataset, spec.norm
    )
    task_dir = arch_dir / task_name
    entry = collect_task(
        task_spec,
        pretrained,
        TrainSpec(**profile.written["tasks"][task_name]),
        profile.checkpoints.n,
        profile.checkpoints.heldout_run,
        profile.checkpoints.validation_run,
        profile.seed,
        task_dir,
        device,
        runs=profile.checkpoints.runs,
    )
    if selected(profile.qat, arch_dir.name, task_name):
        entry["qat"] = collect_qat(
            entry,
            _qat_specs(profile),
            _qat_training(profile, task_name),
            profile.seed,
            task_dir,
            device,
        )
    return entry


def _qat_specs(profile: Profile) -> list[QuantSpec]:
    return [profile.qat.spec(profile.quant, b) for b in profile.qat.bits]


def _qat_training(profile: Profile, task: str) -> QATSpec:
    """The QAT run's own settings on `task` (the `qat` block less what selects and names its
    specs, with the task's step count)."""
    skip = ("bits", "granularity", "scheme", "archs", "tasks")
    run = {k: v for k, v in profile.set_in("qat").items() if k not in skip}
    return QATSpec(**{**run, "steps": profile.qat.steps_for(task)})


def _relative(path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def _relative_entry(entry: dict, root: Path) -> dict:
    """A task's manifest entry with its checkpoint and QAT files relative to the collect folder, so
    the artifact tree can move (to another checkout, another $QG_OUTPUT) without changing what it
    names."""
    out = {**entry, **{run: [_relative(p, root) for p in entry[run]] for run in RUNS}}
    if "qat" in entry:
        out["qat"] = {
            spec: {run: [_relative(p, root) for p in files] for run, files in runs.items()}
            for spec, runs in entry["qat"].items()
        }
    return out
