"""The experiments behind the tables: which generators to train, on what, and the model files they make.

A `Setting` is one generator: an (architecture, task), the quantization spec(s) it produces, where its
targets come from (`ptq`: round-to-nearest of each checkpoint; `qat`: the QAT targets 01_collect made) and,
for the ablations, overrides of the tokenizer / generator / training settings of the profile.

Splits (the honest part): run A's checkpoints are split into `trained` (the generator learns from them) and
`heldout_ckpt` (every `heldout_every`-th checkpoint, interleaved in time, never trained on); run B, a
second fine-tuning with another seed, is `heldout_run`. The paper evaluates on `trained` only.

Every quantized model (PTQ, QAT, generated, a control) is written as a quantized file, cached under the
profile's artifacts and named by its parameters; `qg.study.evaluation` scores the files into the tables' rows.
A cached PTQ, control or generated file of an older format version is remade in today's (`read_current`).
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import methods
from ..config.profiles import Paths, ablation_setup, pairs, selected
from ..core.io import cached, content_digest, params_key, read_json, write_json
from ..core.report import git_commit
from ..generator.model import GeneratorConfig, QuantGen
from ..generator.tokenizer import TARGETS, Tokenizer
from ..generator.train import TokenPairs, TrainConfig, fit_generator
from ..quant import qwt
from ..quant.baselines import quantize_model
from ..quant.fileformat import read_current, read_quantized, save_quantized
from ..quant.quantizer import QuantSpec, is_quantized_weight, spec_from
from ..targets.calibrate import with_qwt
from ..targets.data import fingerprint
from ..targets.models import load_checkpoint, load_model_description
from .collect import Collected
from .scoring import Scorer

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

    def generator_for(self, method: str) -> "Setting":
        """The setting of the generator that makes `method`'s models (a `generator` of `qg.methods`, with its
        overrides and variant label): this one for `gen`."""
        m = methods.get(method)
        if m.kind != "generator":
            raise ValueError(f"{method!r} is not a generator method; they are {list(methods.names('generator'))}")
        if not m.overrides:
            return self
        merged = copy.deepcopy(self.overrides)
        for part, conf in m.overrides.items():
            merged[part] = {**merged.get(part, {}), **conf}
        return replace(self, overrides=merged, label=m.variant)

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
        """A data-free quantization of a checkpoint (`qg.quant.baselines.QUANTIZERS`), as a cached quantized file with
        its wall time."""
        out = self.paths.artifacts / "quantized" / method / spec.name / checkpoint.parent.name / f"{checkpoint.stem}.safetensors"
        return cached(out, lambda path: self._quantize(path, [checkpoint], spec, method, lambda sds: sds[0]),
                      self._inputs([checkpoint]), check=read_current)

    def control(self, name: str, spec: QuantSpec, checkpoints: list[Path]) -> Path:
        """A control (a `control` of `qg.methods`): PTQ of an input made from `checkpoints`, as a cached file.

        `noise` (one checkpoint): each quantized weight plus seeded Gaussian noise of `controls.noise` x its
        std. If Gen's gain over PTQ came from a regularising perturbation rather than a learned quantizer, PTQ
        of a slightly perturbed checkpoint would show it too.
        `soup` (the generator's training checkpoints): their average. A generator trained with MSE on many
        checkpoints may learn it; if PTQ of the average scores like Gen, Gen's gain is weight averaging.
        """
        if name not in methods.names("control"):
            raise ValueError(f"unknown control {name!r}; one of {list(methods.names('control'))}")
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
        return cached(out, lambda path: self._quantize(path, checkpoints, spec, name, make_input), self._inputs(checkpoints),
                      check=read_current)

    def _quantize(self, out: Path, checkpoints: list[Path], spec: QuantSpec, method: str, make_input) -> None:
        """Write the quantization of `make_input(state_dicts of checkpoints)` to `out` (PTQ for a control)."""
        loaded = [load_checkpoint(p) for p in checkpoints]
        sd = make_input([state_dict for state_dict, _, _ in loaded])
        start = time.perf_counter()
        qsd, file_spec = quantize_model(sd, spec, "ptq" if methods.get(method).kind == "control" else method)
        save_quantized(out, qsd, file_spec, {"model": loaded[0][1].to_dict(), "method": method,
                                             "source": [self.collected.relative(p) for p in checkpoints],
                                             "seconds": time.perf_counter() - start})

    def _inputs(self, checkpoints: list[Path]) -> dict[str, str]:
        """What a file made from `checkpoints` was computed from: their names and content digests (`cached`
        remakes the file when a checkpoint under the same name has other content)."""
        return {self.collected.relative(p): content_digest(p) for p in checkpoints}

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
        train_ckpts = self.collected.splits(setting.arch, setting.task)["trained"]
        inputs, marker = self._training_inputs(setting, train_ckpts), out / "inputs.json"
        recorded = read_json(marker) if marker.is_file() else None
        adopt = recorded is None or recorded == self._inputs(train_ckpts)  # from before inputs (or targets) were recorded
        if not adopt and recorded != inputs:  # other checkpoints or targets under the same names
            print(f"[qg] warning: {out.name} was trained on checkpoints (or QAT targets) that have changed since; "
                  "training it again", file=sys.stderr, flush=True)
            shutil.rmtree(out)  # its training state and generated files too
        if QuantGen.complete(out):
            if adopt and recorded != inputs:
                write_json(marker, inputs)
            return QuantGen.load(out, self.device)
        write_json(marker, inputs)  # before training starts: an interrupted run resumes only on the same inputs
        fp = [load_checkpoint(p)[0] for p in train_ckpts]
        targets = {spec: [read_quantized(self.target(setting, spec, p))[0] for p in train_ckpts]
                   for spec in setting.specs}
        tok = setting.config(self.profile, "tokenizer")
        tokenizer = Tokenizer.fit(fp, targets, tok["token_size"], tok.get("padding", "gaussian"), self.profile["seed"],
                                  tok.get("log_scale", False), tok.get("target", "direct"), tok.get("base", "weights"))
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

    def _training_inputs(self, setting: Setting, train_ckpts: list[Path]) -> dict[str, str]:
        """What a generator is trained from: its checkpoints and, for QAT targets (collected files, not a
        function of the checkpoint as PTQ is), the targets too."""
        if setting.source != "qat":
            return self._inputs(train_ckpts)
        return self._inputs(train_ckpts + [self.target(setting, spec, p) for spec in setting.specs for p in train_ckpts])

    def generated(self, setting: Setting, spec: QuantSpec, checkpoint: Path, quantgen: QuantGen | None = None) -> Path:
        """The generator's quantized model of a checkpoint, as a cached quantized file with its wall time."""
        gdir = self.generator_dir(setting)

        def make(path: Path) -> None:
            sd, model_spec, _ = load_checkpoint(checkpoint)
            qsd, seconds = (quantgen or self.generator(setting)).quantize(sd, spec, seed=self.profile["seed"])
            save_quantized(path, qsd, spec, {"model": model_spec.to_dict(), "method": "gen", "generator": gdir.name,
                                             "source": [self.collected.relative(checkpoint)], "seconds": seconds})

        # check: a file generated before symmetric specs decoded Z = 0 is refused on read, hence remade, and so is
        # one in format version 1 (int8 codes): remade packed, with the same codes, S and Z
        return cached(gdir / "quantized" / spec.name / checkpoint.parent.name / f"{checkpoint.stem}.safetensors", make,
                      self._inputs([checkpoint]), check=read_current)

    def model_file(self, setting: Setting, spec: QuantSpec, checkpoint: Path, method: str,
                   quantgen: QuantGen | None = None) -> Path:
        """The file a method of `qg.methods` makes of a checkpoint, by its kind: the checkpoint itself
        (`reference`), its QAT model (`qat`, whatever the generator's targets), a generator's model (`quantgen`,
        when given, is that generator), a per-checkpoint control, a data-free quantizer's, or any of these with
        QwT on top (`ptq+qwt`, `gen+qwt`, ...). The soup is one model per (architecture, task), not per
        checkpoint: `control("soup", ...)`."""
        m = methods.get(method)
        if method.endswith(methods.QWT_SUFFIX):
            base = method.removesuffix(methods.QWT_SUFFIX)
            return self.compensated(self.model_file(setting, spec, checkpoint, base, quantgen), checkpoint)
        if not m.per_checkpoint:
            raise ValueError(f"{method!r} makes one model per (architecture, task): use Experiment.control")
        makers = {"reference": lambda: checkpoint,
                  "qat": lambda: self.collected.qat(setting.arch, setting.task, spec, checkpoint),
                  "generator": lambda: self.generated(setting.generator_for(method), spec, checkpoint, quantgen),
                  "control": lambda: self.control(method, spec, [checkpoint]),
                  "quantizer": lambda: self.quantized(checkpoint, spec, method)}
        return makers[m.kind]()

    def compensated(self, base: Path, checkpoint: Path) -> Path:
        """QwT (`qg.quant.qwt`) on top of a quantized file of `checkpoint`, fitted on the profile's `qwt.images`
        images of the task's training split (seeded; never the test split), as a cached quantized file under
        `qwt-<key of images, batch size, seed>/` mirroring the base file's place, with the compensations, the
        fits and both wall times in it."""
        conf = {"images": qwt.IMAGES, "batch_size": qwt.BATCH_SIZE, **(self.profile.get("qwt") or {}),
                "seed": self.profile["seed"]}
        conf.pop("splits", None)  # which checkpoints get QwT rows, not how a file is made
        spec_model = load_model_description(checkpoint)
        inputs = {"base file": content_digest(base), self.collected.relative(checkpoint): content_digest(checkpoint),
                  "calibration data": fingerprint(spec_model.dataset, "train")}
        where = base.relative_to(self.paths.artifacts)
        return cached(self.paths.artifacts / f"qwt-{params_key(conf)}" / where,
                      lambda out: self._compensate(out, base, checkpoint, conf), inputs, check=read_current)

    def _compensate(self, out: Path, base: Path, checkpoint: Path, conf: dict) -> None:
        qsd, spec, meta = read_quantized(base)
        fp_sd, spec_model, _ = load_checkpoint(checkpoint)
        compensated, record = with_qwt(qsd, fp_sd, spec_model, conf["images"], conf["batch_size"], conf["seed"],
                                       self.device)
        save_quantized(out, compensated, spec, {**meta, "method": meta.get("method", "") + methods.QWT_SUFFIX,
                                                "seconds": meta["seconds"] + record["seconds"], "qwt": record,
                                                "base": base.name})


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


def table1_generators(profile: dict) -> tuple[str, ...]:
    """The generator methods (`qg.methods`) Table 1 compares for each of its settings."""
    return tuple(profile["table1"].get("generators", ["gen"]))


def table_methods(profile: dict) -> dict[str, tuple[str, ...]]:
    """The methods (`qg.methods`) 03_generate scores for each table on every split: Table 1 and Figure 3 set
    the generators against FP32 and every data-free quantizer and per-checkpoint control; Tables 2 and 3
    against PTQ (and QAT)."""
    baselines = tuple(n for n in methods.names("quantizer", "control") if methods.get(n).per_checkpoint)
    return {"table1": ("fp", *baselines, *table1_generators(profile)), "figure3": ("fp", *baselines, "gen"),
            "table2": ("fp", "ptq", "qat", "gen"), "table3": ("fp", "ptq", "gen")}


def qwt_methods(profile: dict) -> tuple[str, ...]:
    """The methods 03_generate also scores with QwT on top (needs calibration data): none without a `qwt` block."""
    shown = methods.shown_with_qwt()
    return tuple(m for m in shown if m.endswith(methods.QWT_SUFFIX)) if profile.get("qwt") else ()


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


def _average(sds: list[dict]) -> dict:
    """The element-wise mean of state_dicts of one architecture (the soup)."""
    return {k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in sds[0]}
