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

from .baselines import quantize_model
from .collect import Collected
from .fidelity import error_iou, layer_fidelity, nearest_distances, sensitivity
from .generator import GeneratorConfig, QuantGen
from .io import cached, params_key
from .models import load_checkpoint
from .profiles import Paths, ablation_setup, pairs, selected
from .quant import QuantSpec, is_quantized_weight, read_quantized, read_quantized_meta, save_quantized
from .report import git_commit
from .scoring import Scorer
from .tokenizer import TARGETS, Tokenizer
from .train import TokenPairs, TrainConfig, fit_generator

SPLITS = ("trained", "heldout_ckpt", "heldout_run")
CONTROLS = ("noise", "soup")  # PTQ of a modified input (Experiment.control)
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

    def config(self, profile: dict, part: str) -> dict:
        """The profile's `tokenizer`, `generator` or `train` settings for this generator, updated in turn by
        `conditional_train` (conditional generators), the architecture's own entry (ViT-Base's larger tokens)
        and the setting's overrides (ablations, convergence variants)."""
        conf = copy.deepcopy(profile[part])
        if self.condition and part == "train":
            conf.update(profile.get("conditional_train", {}))
        conf.update(profile["archs"][self.arch].get(part, {}))
        conf.update(self.overrides.get(part, {}))
        return conf


def spec_from(bits: int, granularity: str, quant: dict) -> QuantSpec:
    """A QuantSpec with the profile's group size and scheme."""
    return QuantSpec(bits, granularity, quant.get("group_size", 64), quant.get("scheme", "symmetric"))


def evenly_spaced(items: list, n: int | None) -> list:
    """`n` items evenly spaced over `items` (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


class Experiment:
    """One profile's collected checkpoints, generators and scores, with everything cached on disk."""

    def __init__(self, profile: dict, paths: Paths | None = None):
        self.profile = profile
        self.paths = (paths or Paths.for_profile(profile)).make()
        self.collected = Collected(self.paths.artifacts / "collect", profile["checkpoints"]["heldout_every"])
        self.commit = git_commit()
        self.scorer = Scorer(profile)
        self.device = self.scorer.device

    # ------------------------------------------------------------------ targets and quantized files
    def target(self, setting: Setting, spec: QuantSpec, checkpoint: Path) -> Path:
        """The quantized file the generator is trained to produce for `checkpoint` (PTQ or QAT)."""
        if setting.source == "ptq":
            return self.quantized(checkpoint, spec, "ptq")
        return self.collected.qat(setting.arch, setting.task, spec, checkpoint)

    def quantized(self, checkpoint: Path, spec: QuantSpec, method: str = "ptq") -> Path:
        """A data-free quantization of a checkpoint (`qg.baselines.METHODS`), as a cached quantized file with
        its wall time."""
        out = self.paths.artifacts / "quantized" / method / spec.name / checkpoint.parent.name / f"{checkpoint.stem}.safetensors"
        return cached(out, lambda path: self._quantize(path, [checkpoint], spec, method, lambda sds: sds[0]))

    def control(self, name: str, spec: QuantSpec, checkpoints: list[Path]) -> Path:
        """A control (`CONTROLS`): PTQ of an input made from `checkpoints`, as a cached quantized file.

        `noise` (one checkpoint): each quantized weight plus seeded Gaussian noise of `controls.noise` x its
        std. If Gen's gain over PTQ came from a regularising perturbation rather than a learned quantizer, PTQ
        of a slightly perturbed checkpoint would show it too.
        `soup` (the generator's training checkpoints): their average. A generator trained with MSE on many
        checkpoints may learn it; if PTQ of the average scores like Gen, Gen's gain is weight averaging.
        """
        if name not in CONTROLS:
            raise ValueError(f"unknown control {name!r}; one of {list(CONTROLS)}")
        first = checkpoints[0]
        if name == "noise":
            stem, params = first.stem, {"sigma": self.profile["controls"]["noise"], "seed": self.profile["seed"]}

            def make_input(sds):
                return self._perturbed(sds[0], first)
        else:
            stem, params = f"soup-{len(checkpoints)}", {"checkpoints": [self.collected.relative(p) for p in checkpoints]}
            make_input = _average
        out = (self.paths.artifacts / "quantized" / f"{name}-{params_key(params)}" / spec.name / first.parent.name
               / f"{stem}.safetensors")
        return cached(out, lambda path: self._quantize(path, checkpoints, spec, name, make_input))

    def _quantize(self, out: Path, checkpoints: list[Path], spec: QuantSpec, method: str, make_input) -> None:
        """Write the quantization of `make_input(state_dicts of checkpoints)` to `out` (PTQ for a control)."""
        loaded = [load_checkpoint(p) for p in checkpoints]
        sd = make_input([state_dict for state_dict, _, _ in loaded])
        start = time.perf_counter()
        qsd, file_spec = quantize_model(sd, spec, "ptq" if method in CONTROLS else method)
        save_quantized(out, qsd, file_spec, {"model": loaded[0][1].to_dict(), "method": method,
                                             "source": [self.collected.relative(p) for p in checkpoints],
                                             "seconds": time.perf_counter() - start})

    def _perturbed(self, sd: dict, checkpoint: Path) -> dict:
        sigma = self.profile["controls"]["noise"]
        name = self.collected.relative(checkpoint)  # not the absolute path: the same noise wherever the tree lives
        gen = torch.Generator().manual_seed(self.profile["seed"] + int(params_key({"c": name})[:6], 16))
        return {k: v + sigma * v.std() * torch.randn(v.shape, generator=gen) if is_quantized_weight(k, v) else v
                for k, v in sd.items()}

    # ------------------------------------------------------------------ generators
    def generator_dir(self, setting: Setting) -> Path:
        params = {"setting": setting.name, "specs": [s.to_dict() for s in setting.specs],
                  "tokenizer": setting.config(self.profile, "tokenizer"), "generator": setting.config(self.profile, "generator"),
                  "train": setting.config(self.profile, "train"), "seed": self.profile["seed"],
                  "data": [self.collected.relative(p) for p in self.collected.splits(setting.arch, setting.task)["trained"]]}
        return self.paths.artifacts / "generators" / f"{setting.name}-{params_key(params)}"

    def generator(self, setting: Setting) -> QuantGen:
        """The trained generator of a setting: read back when cached, trained (resumably) when not."""
        out = self.generator_dir(setting)
        if (out / "generator.json").is_file():
            return QuantGen.load(out, self.device)
        train_ckpts = self.collected.splits(setting.arch, setting.task)["trained"]
        fp = [load_checkpoint(p)[0] for p in train_ckpts]
        targets = {spec: [read_quantized(self.target(setting, spec, p))[0] for p in train_ckpts]
                   for spec in setting.specs}
        tok = setting.config(self.profile, "tokenizer")
        tokenizer = Tokenizer.fit(fp, targets, tok["token_size"], tok.get("padding", "gaussian"), self.profile["seed"],
                                  tok.get("log_scale", False), tok.get("target", "direct"))
        train_cfg = TrainConfig(seed=self.profile["seed"], **setting.config(self.profile, "train"))
        data = TokenPairs.build(tokenizer, fp, targets, conditional=setting.condition is not None,
                                loss_weighting=train_cfg.loss_weighting)
        n_tokens, token_size = tokenizer.shape
        gen_cfg = GeneratorConfig(token_size=token_size, n_tokens=n_tokens, conditions=data.conditions,
                                  target=tokenizer.target, **setting.config(self.profile, "generator"))
        quantgen = fit_generator(tokenizer, data, gen_cfg, train_cfg, out, device=self.device)
        quantgen.record.update(setting=setting.name, n_train_checkpoints=len(train_ckpts))
        quantgen.save(out)
        return quantgen

    def generated(self, setting: Setting, spec: QuantSpec, checkpoint: Path, quantgen: QuantGen | None = None) -> Path:
        """The generator's quantized model of a checkpoint, as a cached quantized file with its wall time."""
        gdir = self.generator_dir(setting)

        def make(path: Path) -> None:
            sd, model_spec, _ = load_checkpoint(checkpoint)
            qsd, seconds = (quantgen or self.generator(setting)).quantize(sd, spec, seed=self.profile["seed"])
            save_quantized(path, qsd, spec, {"model": model_spec.to_dict(), "method": "gen", "generator": gdir.name,
                                             "source": [self.collected.relative(checkpoint)], "seconds": seconds})

        return cached(gdir / "quantized" / spec.name / checkpoint.parent.name / f"{checkpoint.stem}.safetensors", make)

    def model_file(self, setting: Setting, spec: QuantSpec, checkpoint: Path, method: str,
                   quantgen: QuantGen | None = None) -> Path:
        """The file a method makes of a checkpoint: the checkpoint itself (`fp`), its QAT model (`qat`, whatever
        the generator's targets), the generator's model (`gen`), the `noise` control or a data-free quantizer's
        (`qg.baselines.METHODS`). The soup is one model per (architecture, task), not per checkpoint:
        `control("soup", ...)`."""
        if method == "fp":
            return checkpoint
        if method == "qat":
            return self.collected.qat(setting.arch, setting.task, spec, checkpoint)
        if method == "gen":
            return self.generated(setting, spec, checkpoint, quantgen)
        if method == "noise":
            return self.control(method, spec, [checkpoint])
        return self.quantized(checkpoint, spec, method)

    def evaluate(self, setting: Setting, methods: tuple[str, ...] = ("fp", "ptq", "gen"),
                 splits: tuple[str, ...] = SPLITS) -> pd.DataFrame:
        """One row per (method, spec, split, checkpoint): accuracy and the seconds that model took."""
        quantgen = self.generator(setting) if "gen" in methods else None
        per_split = self.profile["eval"].get("per_split")
        rows = []
        for split, ckpts in self.collected.splits(setting.arch, setting.task).items():
            if split not in splits:
                continue
            for ckpt in evenly_spaced(ckpts, per_split):
                for spec in setting.specs:
                    for method in methods:
                        path = self.model_file(setting, spec, ckpt, method, quantgen)
                        seconds = 0.0 if method == "fp" else read_quantized_meta(path)[1]["seconds"]
                        rows.append(self._row(setting, spec, split, ckpt, method, self.scorer.score(path), seconds))
        return pd.DataFrame(rows)

    def _row(self, setting, spec, split, ckpt, method, acc, seconds) -> dict:
        dataset = self.collected.entry(setting.arch, setting.task)["task"]["dataset"]
        return {"arch": setting.arch, "task": setting.task, "dataset": dataset,
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
    gen_cfg, train_cfg = setting.config(exp.profile, "generator"), setting.config(exp.profile, "train")
    return {"arch": setting.arch, "task": setting.task, "variant": setting.label, "bits": spec.bits,
            "granularity": spec.granularity, "split": split, "skip": gen_cfg.get("skip", "none"),
            "d_model": gen_cfg.get("d_model") or setting.config(exp.profile, "tokenizer")["token_size"],
            "steps": train_cfg["steps"], "n_params": record["n_params"], "train_seconds": record["train_seconds"],
            "final_loss": record["final_loss"], "codes_equal": layers.codes_equal.mean(), "code_mae": layers.code_mae.mean(),
            "code_mae_worst": layers.code_mae.max(), "worst_layer": worst,
            "worst_gain_err": layers.group_gain_err[worst], "worst_local_err": layers.code_mae_local[worst],
            "scale_rel_err": layers.scale_rel_err.mean(), "worst_scale_err": layers.scale_rel_err[worst],
            "gen": acc["gen"], "ptq": acc["ptq"], "gen_minus_ptq": acc["gen"] - acc["ptq"]}


ABLATIONS = {
    # factor -> how one variant value overrides the profile (the ablation notebooks 04-07, and 08's target)
    "target": lambda v: {"tokenizer": {"target": v}} if v != "direct" else {},
    "padding": lambda v: {"tokenizer": {"padding": v}},
    "head": lambda v: {"generator": v},
    "backbone": lambda v: {"generator": {"backbone": v}},
    "token_size": lambda v: {"tokenizer": {"token_size": v}, "generator": {"d_model": v}},  # RPG: width = token
}


def amortized_settings(profile: dict) -> list[Setting]:
    """08_residual_qat: for every (architecture, task) with QAT targets and each of `amortized_qat.bits`, one
    generator per target (`direct`, the paper's; `residual`, offsets from RTN) and per source (PTQ targets: the
    correctness check, where the right answer is to change nothing; QAT targets: amortized QAT). The direct
    ones are Tables 1 and 2's generators, read from the cache."""
    qat = profile["qat"]
    return [Setting(a, t, [spec_from(b, qat["granularity"], profile["quant"])], source,
                    overrides=ABLATIONS["target"](target), label=target)
            for a, t in pairs(profile) if selected(qat, a, t) for b in (profile.get("amortized_qat") or {}).get("bits", [])
            for source in SOURCES for target in TARGETS]


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
    splits = exp.collected.splits(setting.arch, setting.task)
    ckpts = evenly_spaced(splits[split], exp.profile["eval"].get("per_split"))
    gen_files = [exp.generated(setting, spec, c, quantgen) for c in ckpts]
    own_files = [exp.target(setting, spec, c) for c in ckpts]
    gen, own = ([read_quantized(p)[0] for p in files] for files in (gen_files, own_files))
    tag = {"arch": setting.arch, "task": setting.task, "setting": setting.name, "source": setting.source,
           "variant": setting.label, "bits": spec.bits, "granularity": spec.granularity, "split": split}
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
            pred, labels = exp.scorer.predictions(files[i])
            pred_train, _ = exp.scorer.predictions(train_files[int(row.nearest_train)])
            pred_own, _ = exp.scorer.predictions(own_files[i])
            near.append({**row.to_dict(), "model": model, "checkpoint": ckpts[i].stem,
                         "iou_nearest_train": error_iou(pred, pred_train, labels), "iou_own": error_iou(pred, pred_own, labels)})
    return {"layers": layers.assign(**tag), "sensitivity": sens.assign(**tag), "nearest": pd.DataFrame(near).assign(**tag)}


def _average(sds: list[dict]) -> dict:
    """The element-wise mean of state_dicts of one architecture (the soup)."""
    return {k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in sds[0]}
