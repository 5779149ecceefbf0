"""The experiments behind the tables: which generators to train, on what, and the model files they
make.

A `Setting` is one generator: an (architecture, task), the quantization spec(s) it produces, where
its targets come from (`ptq`: round-to-nearest of each checkpoint; `qat`: the QAT targets 01_collect
made) and, for the ablations, overrides of the tokenizer / generator / training settings of the
profile.

Splits (the honest part): run A's checkpoints are split into `trained` (the generator learns from
them) and `heldout_ckpt` (every `heldout_every`-th checkpoint, interleaved in time, never trained
on); run B, a second fine-tuning with another seed, is `heldout_run`; run C, a third, is the
validation run where a variant is chosen (`CHOICE_SPLIT`). The paper evaluates on `trained` only.

Every quantized model (PTQ, QAT, generated, a control) is written as a quantized file, cached under
the profile's artifacts and named by its parameters; `qg.study.evaluation` scores the files into the
tables' rows. A cached file is read back only after its reader accepts it (`read_quantized`).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import methods
from ..config.blocks import Qwt
from ..config.profiles import Paths
from ..config.schema import Profile
from ..core.io import cached, content_digest, params_key, read_json, write_json
from ..core.report import git_commit
from ..generator.directory import QuantGen
from ..generator.model import GeneratorConfig
from ..generator.pairs import TokenPairs
from ..generator.tokenizer import Tokenizer
from ..generator.train import TrainConfig, fit_generator
from ..quant.baselines import quantize_model
from ..quant.fileformat import read_quantized, save_quantized
from ..quant.quantizer import QuantSpec, is_quantized_weight
from ..targets.calibrate import with_qwt
from ..targets.data import fingerprint
from ..targets.models import load_checkpoint, load_model_description
from .collected import Collected
from .layer_cost import layer_cost
from .scoring import Scorer
from .settings import Setting


def evenly_spaced(items: list, n: int | None) -> list:
    """`n` items evenly spaced over `items` (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


class Experiment:
    """One profile's collected checkpoints, generators and scores, with everything cached on
    disk."""

    def __init__(self, profile: Profile, paths: Paths | None = None):
        self.profile = profile
        self.paths = (paths or Paths.for_profile(profile)).make()
        self.collected = Collected(
            self.paths.artifacts / "collect", profile.checkpoints.heldout_every
        )
        self.commit = git_commit()
        self.scorer = Scorer(profile.eval, profile.seed, profile.device)
        self.device = self.scorer.device

    # ------------------------------------------------------------------ targets and quantized files
    def target(self, setting: Setting, spec: QuantSpec, checkpoint: Path) -> Path:
        """The quantized file the generator is trained to produce for `checkpoint` (PTQ or QAT)."""
        if setting.source == "ptq":
            return self.quantized(checkpoint, spec, "ptq")
        return self.collected.qat(setting.arch, setting.task, spec, checkpoint)

    def quantized(self, checkpoint: Path, spec: QuantSpec, method: str = "ptq") -> Path:
        """A data-free quantization of a checkpoint (`qg.quant.baselines.QUANTIZERS`), as a cached
        quantized file with its wall time."""
        out = (
            self.paths.artifacts
            / "quantized"
            / method
            / spec.name
            / checkpoint.parent.name
            / f"{checkpoint.stem}.safetensors"
        )
        return cached(
            out,
            lambda path: self._quantize(path, [checkpoint], spec, method, lambda sds: sds[0]),
            self._inputs([checkpoint]),
            check=read_quantized,
        )

    def control(self, name: str, spec: QuantSpec, checkpoints: list[Path]) -> Path:
        """A control (a `control` of `qg.methods`): PTQ of an input made from `checkpoints`, as a
        cached file.

        `noise` (one checkpoint): each quantized weight plus seeded Gaussian noise of
        `controls.noise` x its std. If Gen's gain over PTQ came from a regularising perturbation
        rather than a learned quantizer, PTQ of a slightly perturbed checkpoint would show it too.
        `soup` (the generator's training checkpoints): their average. A generator trained with MSE
        on many checkpoints may learn it; if PTQ of the average scores like Gen, Gen's gain is
        weight averaging.
        """
        if name not in methods.names("control"):
            raise ValueError(f"unknown control {name!r}; one of {list(methods.names('control'))}")
        first = checkpoints[0]
        if name == "noise":
            stem = first.stem
            params = {"sigma": self.profile.controls.noise, "seed": self.profile.seed}

            def make_input(sds):
                return self._perturbed(sds[0], first)
        else:
            stem = f"soup-{len(checkpoints)}"
            params = {"checkpoints": [self.collected.relative(p) for p in checkpoints]}
            make_input = _average
        out = (
            self.paths.artifacts
            / "quantized"
            / f"{name}-{params_key(params)}"
            / spec.name
            / first.parent.name
            / f"{stem}.safetensors"
        )
        return cached(
            out,
            lambda path: self._quantize(path, checkpoints, spec, name, make_input),
            self._inputs(checkpoints),
            check=read_quantized,
        )

    def _quantize(
        self, out: Path, checkpoints: list[Path], spec: QuantSpec, method: str, make_input
    ) -> None:
        """Write the quantization of `make_input(state_dicts of checkpoints)` to `out` (PTQ for a
        control)."""
        loaded = [load_checkpoint(p) for p in checkpoints]
        sd = make_input([state_dict for state_dict, _, _ in loaded])
        start = time.perf_counter()
        qsd, file_spec = quantize_model(
            sd, spec, "ptq" if methods.get(method).kind == "control" else method
        )
        save_quantized(
            out,
            qsd,
            file_spec,
            {
                "model": loaded[0][1].to_dict(),
                "method": method,
                "source": [self.collected.relative(p) for p in checkpoints],
                "seconds": time.perf_counter() - start,
            },
        )

    def _inputs(self, checkpoints: list[Path]) -> dict[str, str]:
        """What a file made from `checkpoints` was computed from: their names and content digests
        (`cached` remakes the file when a checkpoint under the same name has other content)."""
        return {self.collected.relative(p): content_digest(p) for p in checkpoints}

    def _perturbed(self, sd: dict, checkpoint: Path) -> dict:
        sigma = self.profile.controls.noise
        # not the absolute path: the same noise wherever the tree lives
        name = self.collected.relative(checkpoint)
        gen = torch.Generator().manual_seed(
            self.profile.seed + int(params_key({"c": name})[:6], 16)
        )
        return {
            k: v + sigma * v.std() * torch.randn(v.shape, generator=gen)
            if is_quantized_weight(k, v)
            else v
            for k, v in sd.items()
        }

    # ------------------------------------------------------------------ generators
    def generator_dir(self, setting: Setting) -> Path:
        params = {
            "setting": setting.name,
            "specs": [s.to_dict() for s in setting.specs],
            "tokenizer": tokenizer_key(self.profile, setting),
            "generator": setting.config(self.profile, "generator"),
            "train": setting.config(self.profile, "train"),
            "seed": self.profile.seed,
            "data": [
                self.collected.relative(p)
                for p in self.collected.splits(setting.arch, setting.task)["trained"]
            ],
        }
        return self.paths.artifacts / "generators" / f"{setting.name}-{params_key(params)}"

    def generator(self, setting: Setting) -> QuantGen:
        """The trained generator of a setting: read back when cached, trained (resumably) when
        not."""
        out = self.generator_dir(setting)
        train_ckpts = self.collected.splits(setting.arch, setting.task)["trained"]
        inputs, marker = self._training_inputs(setting, train_ckpts), out / "inputs.json"
        recorded = read_json(marker) if marker.is_file() else None
        # other checkpoints or targets under the same names, or a folder that lost its record
        if out.exists() and recorded != inputs:
            print(
                f"[qg] warning: {out.name} was trained on checkpoints (or QAT targets) that have "
                "changed since, or lost its inputs.json; training it again",
                file=sys.stderr,
                flush=True,
            )
            shutil.rmtree(out)  # its training state and generated files too
        if QuantGen.complete(out):
            return QuantGen.load(out, self.device)
        # before training starts: an interrupted run resumes only on the same inputs
        write_json(marker, inputs)
        return self._train_generator(setting, train_ckpts, out)

    def _train_generator(self, setting: Setting, train_ckpts: list[Path], out: Path) -> QuantGen:
        """Fit the setting's tokenizer on its training checkpoints and targets, then train (or
        resume) its generator in `out`."""
        fp = [load_checkpoint(p)[0] for p in train_ckpts]
        targets = {
            spec: [read_quantized(self.target(setting, spec, p))[0] for p in train_ckpts]
            for spec in setting.specs
        }
        tok = setting.block(self.profile, "tokenizer")
        tokenizer = Tokenizer.fit(
            fp,
            targets,
            tok.token_size,
            tok.padding,
            self.profile.seed,
            tok.log_scale,
            tok.target,
            tok.base,
            tok.codes,
        )
        train_cfg = TrainConfig(seed=self.profile.seed, **setting.config(self.profile, "train"))
        costs = (
            {s: layer_cost(train_ckpts, s, self.profile.seed) for s in setting.specs}
            if train_cfg.loss_weighting == "cost"
            else None
        )
        data = TokenPairs.build(
            tokenizer,
            fp,
            targets,
            conditional=setting.condition is not None,
            loss_weighting=train_cfg.loss_weighting,
            layer_costs=costs,
        )
        n_tokens, token_size = tokenizer.shape
        gen_cfg = GeneratorConfig(
            token_size=token_size,
            n_tokens=n_tokens,
            conditions=data.conditions,
            target=tokenizer.target,
            **setting.config(self.profile, "generator"),
        )
        quantgen = fit_generator(tokenizer, data, gen_cfg, train_cfg, out, device=self.device)
        quantgen.record.update(setting=setting.name, n_train_checkpoints=len(train_ckpts))
        quantgen.save(out)
        return quantgen

    def _training_inputs(self, setting: Setting, train_ckpts: list[Path]) -> dict[str, str]:
        """What a generator is trained from: its checkpoints and, for QAT targets (collected files,
        not a function of the checkpoint as PTQ is), the targets too."""
        if setting.source != "qat":
            return self._inputs(train_ckpts)
        return self._inputs(
            train_ckpts
            + [self.target(setting, spec, p) for spec in setting.specs for p in train_ckpts]
        )

    def generated(
        self, setting: Setting, spec: QuantSpec, checkpoint: Path, quantgen: QuantGen | None = None
    ) -> Path:
        """The generator's quantized model of a checkpoint, as a cached quantized file with its wall
        time."""
        gdir = self.generator_dir(setting)

        def make(path: Path) -> None:
            sd, model_spec, _ = load_checkpoint(checkpoint)
            qsd, seconds = (quantgen or self.generator(setting)).quantize(
                sd, spec, seed=self.profile.seed
            )
            save_quantized(
                path,
                qsd,
                spec,
                {
                    "model": model_spec.to_dict(),
                    "method": "gen",
                    "generator": gdir.name,
                    "source": [self.collected.relative(checkpoint)],
                    "seconds": seconds,
                },
            )

        out = (
            gdir
            / "quantized"
            / spec.name
            / checkpoint.parent.name
            / f"{checkpoint.stem}.safetensors"
        )
        return cached(out, make, self._inputs([checkpoint]), check=read_quantized)

    def model_file(
        self,
        setting: Setting,
        spec: QuantSpec,
        checkpoint: Path,
        method: str,
        quantgen: QuantGen | None = None,
    ) -> Path:
        """The file a method of `qg.methods` makes of a checkpoint, by its kind: the checkpoint
        itself (`reference`), its QAT model (`qat`, whatever the generator's targets) or QAT's FP32
        control (`finetuned`), a generator's
        model (`quantgen`, when given, is that generator), a per-checkpoint control, a data-free
        quantizer's, or any of these with QwT on top (`ptq+qwt`, `gen+qwt`, ...). The soup is one
        model per (architecture, task), not per checkpoint: `control("soup", ...)`."""
        m = methods.get(method)
        if method.endswith(methods.QWT_SUFFIX):
            base = method.removesuffix(methods.QWT_SUFFIX)
            return self.compensated(
                self.model_file(setting, spec, checkpoint, base, quantgen), checkpoint
            )
        if not m.per_checkpoint:
            raise ValueError(
                f"{method!r} makes one model per (architecture, task): use Experiment.control"
            )
        makers = {
            "reference": lambda: checkpoint,
            "qat": lambda: self.collected.qat(setting.arch, setting.task, spec, checkpoint),
            "finetuned": lambda: self.collected.qat(setting.arch, setting.task, None, checkpoint),
            "generator": lambda: self.generated(
                setting.generator_for(method), spec, checkpoint, quantgen
            ),
            "control": lambda: self.control(method, spec, [checkpoint]),
            "quantizer": lambda: self.quantized(checkpoint, spec, method),
        }
        return makers[m.kind]()

    def compensated(self, base: Path, checkpoint: Path) -> Path:
        """QwT (`qg.quant.qwt`) on top of a quantized file of `checkpoint`, fitted on the profile's
        `qwt.images` images of the task's training split (seeded; never the test split), as a cached
        quantized file under `qwt-<key of images, batch size, seed>/` mirroring the base file's
        place, with the compensations, the fits and both wall times in it."""
        q = self.profile.qwt or Qwt()
        # not `splits`: which checkpoints get QwT rows, not how a file is made
        conf = {"images": q.images, "batch_size": q.batch_size, "seed": self.profile.seed}
        spec_model = load_model_description(checkpoint)
        inputs = {
            "base file": content_digest(base),
            self.collected.relative(checkpoint): content_digest(checkpoint),
            "calibration data": fingerprint(spec_model.dataset, "train"),
        }
        where = base.relative_to(self.paths.artifacts)
        return cached(
            self.paths.artifacts / f"qwt-{params_key(conf)}" / where,
            lambda out: self._compensate(out, base, checkpoint, conf),
            inputs,
            check=read_quantized,
        )

    def _compensate(self, out: Path, base: Path, checkpoint: Path, conf: dict) -> None:
        qsd, spec, meta = read_quantized(base)
        fp_sd, spec_model, _ = load_checkpoint(checkpoint)
        compensated, record = with_qwt(
            qsd, fp_sd, spec_model, conf["images"], conf["batch_size"], conf["seed"], self.device
        )
        save_quantized(
            out,
            compensated,
            spec,
            {
                **meta,
                "method": meta.get("method", "") + methods.QWT_SUFFIX,
                "seconds": meta["seconds"] + record["seconds"],
                "qwt": record,
                "base": base.name,
            },
        )


def tokenizer_key(profile: Profile, setting: Setting) -> dict:
    """The tokenizer settings in a generator's cache key: as written, less `codes` when every spec
    is symmetric (q - Z is q when Z = 0: the same tokens, so the same generator)."""
    conf = setting.config(profile, "tokenizer")
    if all(s.scheme == "symmetric" for s in setting.specs):
        conf.pop("codes", None)
    return conf


def _average(sds: list[dict]) -> dict:
    """The element-wise mean of state_dicts of one architecture (the soup)."""
    return {k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in sds[0]}
