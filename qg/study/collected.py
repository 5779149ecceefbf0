"""What 01_collect made, read back: each (architecture, task)'s checkpoints, their splits (the
honest part of the study: what a generator may train on, and what it is judged on) and their QAT
targets."""

from __future__ import annotations

from pathlib import Path

from ..config.profiles import require
from ..quant.quantizer import QuantSpec
from .collect import FP_STEPS, RUNS
from .settings import SPLITS, VALIDATION

RUN_OF = {"heldout_run": "runB", VALIDATION: "runC"}  # the splits that are whole runs


class Collected:
    """What 01_collect made, read back from its manifest: each (architecture, task)'s checkpoints,
    their splits and QAT targets, as paths under the collect folder wherever that folder now lives.

    Splits (the honest part): run A's checkpoints are split into `trained` (the generator learns
    from them) and `heldout_ckpt` (every `heldout_every`-th checkpoint, interleaved in time, never
    trained on; with `checkpoints.runs` > 1, run A is its fine-tunings' checkpoints one after the
    other, so the held-out ones come from every fine-tuning); run B, a second fine-tuning with
    another seed, is `heldout_run`, where every claim is made; run C, a third seed, is the
    validation run (`VALIDATION`), where a variant is chosen. The paper evaluates on `trained`
    only.
    """

    def __init__(self, root: Path, heldout_every: int):
        self.root = Path(root)
        self.manifest = require(
            self.root / "manifest.json", "01_collect", "the checkpoints and QAT targets"
        )
        self.heldout_every = heldout_every

    def pairs(self) -> list[tuple[str, str]]:
        """The (architecture, task) pairs collected."""
        return [(a, t) for a, e in self.manifest["archs"].items() for t in e["tasks"]]

    def pretrained(self, arch: str) -> Path:
        """The pretrained checkpoint every task of `arch` starts from."""
        if arch not in self.manifest["archs"]:
            raise ValueError(
                f"01_collect made no {arch} for this profile; it has {list(self.manifest['archs'])}"
            )
        return self.path(self.manifest["archs"][arch]["pretrained"])

    def entry(self, arch: str, task: str) -> dict:
        """The manifest entry of one (architecture, task), as 01_collect wrote it (paths
        relative)."""
        try:
            return self.manifest["archs"][arch]["tasks"][task]
        except KeyError:
            raise ValueError(
                f"01_collect made no {arch}/{task} for this profile; it has "
                f"{[f'{a}/{t}' for a, t in self.pairs()]} (rerun 01_collect after editing the "
                "profile)"
            ) from None

    def path(self, name: str) -> Path:
        """A file named in the manifest (older manifests hold absolute paths, which pass
        through)."""
        return self.root / name

    def run(self, arch: str, task: str, run: str) -> list[Path]:
        """The checkpoints of run A, B or C of one (architecture, task)."""
        entry = self.entry(arch, task)
        if run not in entry:
            raise ValueError(
                f"01_collect made no {run} of {arch}/{task}: this collect folder predates it "
                "(rerun 01_collect; the runs it has are kept)"
            )
        return [self.path(p) for p in entry[run]]

    def splits(
        self, arch: str, task: str, names: tuple[str, ...] = SPLITS
    ) -> dict[str, list[Path]]:
        """Checkpoint files of each split in `names` (see the class docstring), in the order of
        `SPLITS`, then the validation run: the reported ones, unless the validation run is asked
        for."""
        unknown = set(names) - {*SPLITS, VALIDATION}
        if unknown:
            raise ValueError(f"no split {sorted(unknown)}; the splits: {[*SPLITS, VALIDATION]}")
        run_a, every = self.run(arch, task, "runA"), self.heldout_every
        held = [i % every == every - 1 for i in range(len(run_a))]
        within_a = {
            "trained": [p for p, h in zip(run_a, held) if not h],
            "heldout_ckpt": [p for p, h in zip(run_a, held) if h],
        }
        return {
            name: within_a[name] if name in within_a else self.run(arch, task, RUN_OF[name])
            for name in (*SPLITS, VALIDATION)
            if name in names
        }

    def qat(self, arch: str, task: str, spec: QuantSpec | None, checkpoint: Path) -> Path:
        """The QAT target of one checkpoint; with `spec` None, its FP32 control (QAT's steps
        without quantization)."""
        entry, name = self.entry(arch, task), spec.name if spec else FP_STEPS
        if name not in entry.get("qat", {}):
            raise ValueError(
                f"01_collect made no QAT targets for {name} of {arch}/{task}; the profile's qat "
                "block decides which (rerun 01_collect after changing it)"
            )
        files = {
            ckpt: self.path(q)
            for run in RUNS
            if run in entry
            for ckpt, q in zip(self.run(arch, task, run), entry["qat"][name][run])
        }
        return files[Path(checkpoint)]

    def relative(self, path: Path) -> str:
        """A collected file's name relative to the collect folder: what cache keys and seeds are
        made of."""
        return str(Path(path).relative_to(self.root))
