"""The experiments behind the tables: which generators to train, on what, and how every method is scored.

A `Setting` is one generator: an (architecture, task), the quantization spec(s) it produces, where its
targets come from (`ptq`: round-to-nearest of each checkpoint; `qat`: the QAT targets 01_collect made) and,
for the ablations, overrides of the tokenizer / generator / training settings of the profile.

Splits (the honest part): run A's checkpoints are split into `trained` (the generator learns from them) and
`heldout_ckpt` (every `heldout_every`-th checkpoint, interleaved in time, never trained on); run B, a
second fine-tuning with another seed, is `heldout_run`. The paper evaluates on `trained` only.

Every quantized model (PTQ, QAT, generated) is written as a quantized file and scored from the file;
files, generators and accuracies are cached under the profile's artifacts, named by their parameters.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .fidelity import error_iou, layer_fidelity, nearest_distances, sensitivity
from .data import batches, held
from .generator import GeneratorConfig, QuantGen
from .io import CorruptFileError, params_key, read_safetensors, save_safetensors
from .models import ModelSpec, build_model, load_checkpoint, load_model_file, load_weights, predict, resolve_device
from .pipeline import Paths, ablation_setup, git_commit, pairs, require, selected
from .baselines import quantize_model
from .quant import QuantSpec, is_quantized_weight, read_quantized, save_quantized
from .tokenizer import Tokenizer
from .train import TokenPairs, TrainConfig, fit_generator

SPLITS = ("trained", "heldout_ckpt", "heldout_run")
SOURCES = ("ptq", "qat")


@dataclass
class Setting:
    """One generator to train: which model, which spec(s), which targets, which overrides."""

    arch: str
    task: str
    specs: list[QuantSpec]
    source: str = "ptq"
    condition: str | None = None  # None (one spec), "precision" or "granularity"
    overrides: dict = field(default_factory=dict)  # {"tokenizer"|"generator"|"train": {...}} for ablations
    label: str = ""  # names an ablation variant in tables

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if len(self.specs) > 1 and self.condition is None:
            raise ValueError("a setting with several specs is a conditional generator: give condition=")

    @property
    def name(self) -> str:
        """Names the generator (not the ablation label: a variant equal to the default shares its generator)."""
        what = f"cond-{self.condition}" if self.condition else self.specs[0].name
        return "-".join([self.arch, self.task, self.source, what])


def spec_from(bits: int, granularity: str, quant: dict) -> QuantSpec:
    """A QuantSpec with the profile's group size and scheme."""
    return QuantSpec(bits, granularity, quant.get("group_size", 64), quant.get("scheme", "symmetric"))


def pick(items: list, n: int | None) -> list:
    """`n` items evenly spaced over `items` (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


class Experiment:
    """One profile's collected checkpoints, generators and scores, with everything cached on disk."""

    def __init__(self, profile: dict, paths: Paths | None = None):
        self.profile = profile
        self.paths = (paths or Paths.of(profile["name"])).make()
        self.manifest = require(self.paths.artifacts / "collect" / "manifest.json", "01_collect",
                                "the checkpoints and QAT targets")
        self.commit = git_commit()
        self.device = resolve_device(profile.get("device"))
        self._test_sets: dict = {}

    # ------------------------------------------------------------------ checkpoints and targets
    def task_entry(self, arch: str, task: str) -> dict:
        try:
            return self.manifest["archs"][arch]["tasks"][task]
        except KeyError:
            raise ValueError(f"01_collect made no {arch}/{task} for this profile; "
                             f"it has {self._available()} (rerun 01_collect after editing the profile)") from None

    def _available(self) -> list[str]:
        return [f"{a}/{t}" for a, e in self.manifest["archs"].items() for t in e["tasks"]]

    def splits(self, arch: str, task: str) -> dict[str, list[Path]]:
        """Checkpoint files of each split (see the module docstring)."""
        entry, every = self.task_entry(arch, task), self.profile["checkpoints"]["heldout_every"]
        run_a = [Path(p) for p in entry["runA"]]
        return {"trained": [p for i, p in enumerate(run_a) if i % every != every - 1],
                "heldout_ckpt": [p for i, p in enumerate(run_a) if i % every == every - 1],
                "heldout_run": [Path(p) for p in entry["runB"]]}

    def target(self, setting: Setting, spec: QuantSpec, checkpoint: Path) -> Path:
        """The quantized file the generator is trained to produce for `checkpoint` (PTQ or QAT)."""
        if setting.source == "ptq":
            return self.quantized(checkpoint, spec, "ptq")
        entry = self.task_entry(setting.arch, setting.task)
        if spec.name not in entry.get("qat", {}):
            raise ValueError(f"01_collect made no QAT targets for {spec.name}; the profile's qat.bits decides which")
        runs = {str(p): q for run in ("runA", "runB") for p, q in zip(entry[run], entry["qat"][spec.name][run])}
        return Path(runs[str(checkpoint)])

    def quantized(self, checkpoint: Path, spec: QuantSpec, method: str = "ptq") -> Path:
        """A data-free quantization of a checkpoint (`qg.baselines.METHODS`, or the `noise` control), as a
        cached quantized file with its wall time."""
        out = self.paths.artifacts / "quantized" / method / spec.name / checkpoint.parent.name / f"{checkpoint.stem}.safetensors"
        if not out.is_file():
            sd, model_spec, _ = load_checkpoint(checkpoint)
            if method == "noise":
                sd, method_used = self.perturbed(sd, checkpoint), "ptq"
            else:
                method_used = method
            start = time.perf_counter()
            qsd, file_spec = quantize_model(sd, spec, method_used)
            save_quantized(out, qsd, file_spec, {"model": model_spec.to_dict(), "method": method, "source": str(checkpoint),
                                                 "seconds": time.perf_counter() - start})
        return out

    def perturbed(self, sd: dict, checkpoint: Path) -> dict:
        """The `noise` control: each quantized weight plus seeded Gaussian noise of `controls.noise` x its std.

        If Gen's gain over PTQ came from a regularising perturbation rather than a learned quantizer, PTQ of
        a slightly perturbed checkpoint would show it too.
        """
        sigma = self.profile["controls"]["noise"]
        gen = torch.Generator().manual_seed(self.profile["seed"] + int(params_key({"c": str(checkpoint)})[:6], 16))
        return {k: v + sigma * v.std() * torch.randn(v.shape, generator=gen) if is_quantized_weight(k, v) else v
                for k, v in sd.items()}

    def soup(self, arch: str, task: str, spec: QuantSpec) -> Path:
        """The `soup` control: PTQ of the average of the generator's training checkpoints (one model).

        A generator trained with MSE on many checkpoints may learn their average; if PTQ of that average
        scores like Gen, Gen's gain is weight averaging, not quantization.
        """
        ckpts = self.splits(arch, task)["trained"]
        out = self.paths.artifacts / "quantized" / "soup" / spec.name / ckpts[0].parent.name / f"soup-{len(ckpts)}.safetensors"
        if not out.is_file():
            sds = [load_checkpoint(p)[0] for p in ckpts]
            model_spec = load_checkpoint(ckpts[0])[1]
            mean = {k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in sds[0]}
            qsd, file_spec = quantize_model(mean, spec, "ptq")
            save_quantized(out, qsd, file_spec, {"model": model_spec.to_dict(), "method": "soup", "seconds": 0.0,
                                                 "source": [str(p) for p in ckpts]})
        return out

    # ------------------------------------------------------------------ generators
    def config(self, setting: Setting, part: str) -> dict:
        """The profile's `tokenizer`, `generator` or `train` settings, updated in turn by `conditional_train`
        (conditional generators), the architecture's own entry (ViT-Base's larger tokens) and the setting's
        overrides (ablations)."""
        conf = copy.deepcopy(self.profile[part])
        if setting.condition and part == "train":
            conf.update(self.profile.get("conditional_train", {}))
        conf.update(self.profile["archs"][setting.arch].get(part, {}))
        conf.update(setting.overrides.get(part, {}))
        return conf

    def generator_dir(self, setting: Setting) -> Path:
        params = {"setting": setting.name, "specs": [s.to_dict() for s in setting.specs],
                  "tokenizer": self.config(setting, "tokenizer"), "generator": self.config(setting, "generator"),
                  "train": self.config(setting, "train"), "seed": self.profile["seed"],
                  "data": [str(p) for p in self.splits(setting.arch, setting.task)["trained"]]}
        return self.paths.artifacts / "generators" / f"{setting.name}-{params_key(params)}"

    def generator(self, setting: Setting) -> QuantGen:
        """The trained generator of a setting: read back when cached, trained (resumably) when not."""
        out = self.generator_dir(setting)
        if (out / "generator.json").is_file():
            return QuantGen.load(out, self.device)
        train_ckpts = self.splits(setting.arch, setting.task)["trained"]
        fp = [load_checkpoint(p)[0] for p in train_ckpts]
        targets = {spec: [read_quantized(self.target(setting, spec, p))[0] for p in train_ckpts]
                   for spec in setting.specs}
        tok = self.config(setting, "tokenizer")
        tokenizer = Tokenizer.fit(fp, targets, tok["token_size"], tok.get("padding", "gaussian"), self.profile["seed"],
                                  tok.get("log_scale", False))
        train_cfg = TrainConfig(seed=self.profile["seed"], **self.config(setting, "train"))
        data = TokenPairs.build(tokenizer, fp, targets, conditional=setting.condition is not None,
                                loss_weighting=train_cfg.loss_weighting)
        n_tokens, token_size = tokenizer.shape
        gen_cfg = GeneratorConfig(token_size=token_size, n_tokens=n_tokens, conditions=data.conditions,
                                  **self.config(setting, "generator"))
        quantgen = fit_generator(tokenizer, data, gen_cfg, train_cfg, out, device=self.device)
        quantgen.record.update(setting=setting.name, n_train_checkpoints=len(train_ckpts))
        quantgen.save(out)
        return quantgen

    def generated(self, setting: Setting, spec: QuantSpec, checkpoint: Path, quantgen: QuantGen | None = None) -> Path:
        """The generator's quantized model of a checkpoint, as a cached quantized file with its wall time."""
        gdir = self.generator_dir(setting)
        out = gdir / "quantized" / spec.name / checkpoint.parent.name / f"{checkpoint.stem}.safetensors"
        if not out.is_file():
            quantgen = quantgen or self.generator(setting)
            sd, model_spec, _ = load_checkpoint(checkpoint)
            qsd, seconds = quantgen.quantize(sd, spec, seed=self.profile["seed"])
            save_quantized(out, qsd, spec, {"model": model_spec.to_dict(), "method": "gen", "source": str(checkpoint),
                                            "generator": gdir.name, "seconds": seconds})
        return out

    # ------------------------------------------------------------------ scoring
    def test_set(self, spec: ModelSpec):
        """Batches of the seeded test subset every model of this profile is scored on: held in memory when it
        fits in `eval.hold_mb` (default 8192), else streamed from disk for each model."""
        key = (spec.dataset, spec.img_size, spec.norm)
        if key not in self._test_sets:
            ev = self.profile["eval"]
            loader = batches(spec.dataset, "test", spec.img_size, ev.get("batch_size", 1000),
                             subset=ev.get("test_subset"), seed=self.profile["seed"], norm=spec.norm)
            self._test_sets[key] = held(loader, ev.get("hold_mb", 8192))
        return self._test_sets[key]

    def score(self, path: Path) -> float:
        """Top-1 accuracy (%) of a checkpoint or quantized file on the profile's test subset."""
        pred, labels = self.predictions(path)
        return 100.0 * int((pred == labels).sum()) / len(labels)

    def predictions(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted classes, labels) of a checkpoint or quantized file on the profile's test subset.

        Evaluated from the file once and cached beside it (`<file>.pred-<key>.safetensors`, keyed by the test
        subset and seed), so accuracies and the memorisation tests' error overlaps share one evaluation.
        A cache older than its file, or unreadable, is recomputed.
        """
        test_key = params_key({"test_subset": self.profile["eval"].get("test_subset"), "seed": self.profile["seed"]})
        cache = path.with_name(path.name + f".pred-{test_key}.safetensors")
        if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
            try:
                t = read_safetensors(cache)[0]
                return t["pred"].long(), t["labels"].long()
            except (CorruptFileError, KeyError):
                pass  # a damaged cache is only a cache: evaluate again below
        sd, spec, _ = load_model_file(path)
        pred, labels = predict(load_weights(build_model(spec), sd), self.test_set(spec), self.device)
        save_safetensors({"pred": pred.to(torch.int16), "labels": labels.to(torch.int16)}, cache, {"file": path.name})
        return pred, labels

    def evaluate(self, setting: Setting, methods: tuple[str, ...] = ("fp", "ptq", "gen"),
                 splits: tuple[str, ...] = SPLITS) -> pd.DataFrame:
        """One row per (method, spec, split, checkpoint): accuracy and the seconds that model took."""
        quantgen = self.generator(setting) if "gen" in methods else None
        per_split = self.profile["eval"].get("per_split")
        rows = []
        for split, ckpts in self.splits(setting.arch, setting.task).items():
            if split not in splits:
                continue
            for ckpt in pick(ckpts, per_split):
                for spec in setting.specs:
                    for method in methods:
                        if method == "fp":
                            path, seconds = ckpt, 0.0
                        else:
                            path = (self.target(setting, spec, ckpt) if method == "qat" else
                                    self.generated(setting, spec, ckpt, quantgen) if method == "gen" else
                                    self.quantized(ckpt, spec, method))
                            seconds = read_quantized(path)[2]["seconds"]
                        rows.append(self._row(setting, spec, split, ckpt, method, self.score(path), seconds))
        return pd.DataFrame(rows)

    def _row(self, setting, spec, split, ckpt, method, acc, seconds) -> dict:
        return {"arch": setting.arch, "task": setting.task, "dataset": self.task_entry(setting.arch, setting.task)["task"]["dataset"],
                "setting": setting.name, "source": setting.source, "condition": setting.condition or "",
                "variant": setting.label, "method": method, "bits": spec.bits, "granularity": spec.granularity,
                "split": split, "checkpoint": f"{ckpt.parent.name}/{ckpt.stem}", "accuracy": acc, "seconds": seconds}


def main_settings(profile: dict) -> dict[str, list[Setting]]:
    """The generators Tables 1-3 and Figure 3 need, by the table that first needs them.

    table1: unconditional, PTQ targets, group-wise at every bit-width and channel-wise at `granularity_bits`,
    for every (architecture, task); figure3: channel-wise at the other bit-widths for one (architecture,
    task); table2: QAT targets; table3: one generator conditional on precision, one on granularity.
    """
    quant, t1 = profile["quant"], profile["table1"]
    bits, gbits = t1["bits"], t1["granularity_bits"]
    f3, t3 = profile["figure3"], profile["table3"]
    qat = profile["qat"]
    settings = {
        "table1": [Setting(a, t, [spec_from(b, "group", quant)]) for a, t in pairs(profile) for b in bits]
                  + [Setting(a, t, [spec_from(gbits, "channel", quant)]) for a, t in pairs(profile)],
        "figure3": [Setting(f3["arch"], f3["task"], [spec_from(b, "channel", quant)]) for b in bits if b != gbits],
        "table2": [Setting(a, t, [spec_from(b, qat["granularity"], quant)], source="qat") for a, t in pairs(profile)
                   if selected(qat, a, t) for b in qat["bits"]],
        "table3": [],
    }
    for a, t in pairs(profile):
        if selected(t3, a, t):
            settings["table3"] += [
                Setting(a, t, [spec_from(b, "group", quant) for b in bits], condition="precision"),
                Setting(a, t, [spec_from(gbits, g, quant) for g in ("channel", "group")], condition="granularity")]
    return settings


def convergence_settings(profile: dict) -> list[Setting]:
    """The convergence study of 02_train: every (architecture, task) at one spec, once per variant of the
    profile's `convergence` block (label -> overrides of tokenizer / generator / train settings: more steps,
    the paper's head, another width). A variant equal to the defaults is the Table 1 generator, not a new one;
    no block (or no variants) means no study."""
    c = profile.get("convergence") or {}
    if not c.get("variants"):
        return []
    spec = spec_from(c["bits"], c["granularity"], profile["quant"])
    return [Setting(a, t, [spec], overrides=copy.deepcopy(overrides or {}), label=label)
            for a, t in pairs(profile) for label, overrides in c["variants"].items()]


def convergence_row(exp: Experiment, setting: Setting, split: str = "heldout_run") -> dict:
    """One variant of the convergence study: its cost, final loss, fidelity and Gen − PTQ on `split`, and for
    the layer with the largest code error, how much of it is a wrong range per group (`worst_gain_err`,
    `worst_scale_err`) and how much is per element (`worst_local_err`, see `qg.fidelity.layer_fidelity`)."""
    spec, record = setting.specs[0], exp.generator(setting).record
    layers = diagnose(exp, setting, spec, split, memorisation=False)["layers"].groupby("layer").mean(numeric_only=True)
    worst = layers.code_mae.idxmax()
    ev = exp.evaluate(setting, ("ptq", "gen"), splits=(split,))
    acc = ev.groupby("method").accuracy.mean()
    gen_cfg, train_cfg = exp.config(setting, "generator"), exp.config(setting, "train")
    return {"arch": setting.arch, "task": setting.task, "variant": setting.label, "bits": spec.bits,
            "granularity": spec.granularity, "split": split, "skip": gen_cfg.get("skip", "none"),
            "d_model": gen_cfg.get("d_model") or exp.config(setting, "tokenizer")["token_size"],
            "steps": train_cfg["steps"], "n_params": record["n_params"], "train_seconds": record["train_seconds"],
            "final_loss": record["final_loss"], "codes_equal": layers.codes_equal.mean(), "code_mae": layers.code_mae.mean(),
            "code_mae_worst": layers.code_mae.max(), "worst_layer": worst,
            "worst_gain_err": layers.group_gain_err[worst], "worst_local_err": layers.code_mae_local[worst],
            "scale_rel_err": layers.scale_rel_err.mean(), "worst_scale_err": layers.scale_rel_err[worst],
            "gen": acc["gen"], "ptq": acc["ptq"], "gen_minus_ptq": acc["gen"] - acc["ptq"]}


ABLATIONS = {
    # factor -> how one variant value overrides the profile (the ablation notebooks 04-07)
    "padding": lambda v: {"tokenizer": {"padding": v}},
    "head": lambda v: {"generator": v},
    "backbone": lambda v: {"generator": {"backbone": v}},
    "token_size": lambda v: {"tokenizer": {"token_size": v}, "generator": {"d_model": v}},  # RPG: width = token
}


def ablation_settings(profile: dict, factor: str, variants: dict) -> list[Setting]:
    """One generator per (variant, spec) of the profile's ablation setting, changing only `factor`.

    `variants` maps a label to the factor's value (for `head`, GeneratorConfig fields). A variant equal to
    the profile's default trains nothing new: it is the main tables' generator, read from the cache.
    """
    if factor not in ABLATIONS:
        raise ValueError(f"unknown ablation factor {factor!r}; one of {sorted(ABLATIONS)}")
    a = ablation_setup(profile, factor)
    return [Setting(a["arch"], a["task"], [spec_from(b, a["granularity"], profile["quant"])],
                    overrides=ABLATIONS[factor](value), label=str(label))
            for label, value in variants.items() for b in a["bits"]]


def run_ablation(exp: Experiment, factor: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """Train (or read back) and evaluate every variant of one ablation.

    Returns the per-checkpoint evaluations (PTQ and Gen), one cost row per generator (training seconds,
    activation MB, parameters, final loss) and each generator's loss curve.
    """
    from .models import progress

    runs, costs, curves = [], [], {}
    for s in progress(ablation_settings(exp.profile, factor, exp.profile["ablation"][factor]), desc=factor):
        record = exp.generator(s).record
        runs.append(exp.evaluate(s, ("ptq", "gen")))
        costs.append({"variant": s.label, "bits": s.specs[0].bits,
                      **{k: record.get(k, float("nan")) for k in ("train_seconds", "activation_mb", "n_params", "final_loss")}})
        curves[f"{s.label}, {s.specs[0].name}"] = pd.read_csv(exp.generator_dir(s) / "loss.csv")
    return pd.concat(runs, ignore_index=True), pd.DataFrame(costs), curves


def diagnose(exp: Experiment, setting: Setting, spec: QuantSpec, split: str = "heldout_run",
             memorisation: bool = True) -> dict[str, pd.DataFrame]:
    """Fidelity, input sensitivity and memorisation of one generator on the checkpoints of one split.

    Compared with the generator's own targets (PTQ or QAT of the same checkpoint), `qg.fidelity`'s measures:
    `layers` per (checkpoint, layer); `sensitivity` per (pair of consecutive checkpoints, layer); `nearest`
    per checkpoint, for the generated model and, as the reference a faithful quantizer would match, for the
    target itself: distances to the nearest training target and the error IoU with that training model
    (`memorisation=False` skips this part, which needs every training target and two evaluations per model).
    """
    quantgen = exp.generator(setting)
    splits = exp.splits(setting.arch, setting.task)
    ckpts = pick(splits[split], exp.profile["eval"].get("per_split"))
    gen_files = [exp.generated(setting, spec, c, quantgen) for c in ckpts]
    own_files = [exp.target(setting, spec, c) for c in ckpts]
    gen, own = ([read_quantized(p)[0] for p in files] for files in (gen_files, own_files))
    tag = {"arch": setting.arch, "task": setting.task, "setting": setting.name, "source": setting.source,
           "bits": spec.bits, "granularity": spec.granularity, "split": split}
    layers = pd.concat([layer_fidelity(g, t).assign(checkpoint=c.stem) for g, t, c in zip(gen, own, ckpts)])
    sens = pd.concat([sensitivity(gen[i], gen[i + 1], own[i], own[i + 1]).assign(pair=i) for i in range(len(ckpts) - 1)]
                     or [pd.DataFrame(columns=["layer", "target_moves", "sensitivity", "alignment", "pair"])])
    if not memorisation:
        return {"layers": layers.assign(**tag), "sensitivity": sens.assign(**tag)}
    train_files = [exp.target(setting, spec, c) for c in splits["trained"]]
    train = [read_quantized(p)[0] for p in train_files]
    near = []
    for model, files, g in (("gen", gen_files, gen), ("target", own_files, own)):
        d = nearest_distances(g, own, train)
        for i, row in d.iterrows():
            pred, labels = exp.predictions(files[i])
            pred_train, _ = exp.predictions(train_files[int(row.nearest_train)])
            pred_own, _ = exp.predictions(own_files[i])
            near.append({**row.to_dict(), "model": model, "checkpoint": ckpts[i].stem,
                         "iou_nearest_train": error_iou(pred, pred_train, labels), "iou_own": error_iou(pred, pred_own, labels)})
    return {"layers": layers.assign(**tag), "sensitivity": sens.assign(**tag), "nearest": pd.DataFrame(near).assign(**tag)}
