"""The reproduction as a pipeline: profiles, where each step's files live, and a papermill runner.

A profile (`params/<name>.yaml`) holds every setting of a run: `smoke` (the tests), `cpu` (the default
reproduction) and `paper` (the paper's models, data and token sizes, for a GPU). Every notebook takes one
papermill parameter, `profile`, and reads the rest from the YAML, so one file says what a run did.

    python -m qg.pipeline --profile cpu                  # every notebook, in order
    python -m qg.pipeline --profile smoke 01_collect     # one step

Executed notebooks go to `results/notebooks/<profile>/`; tables to `results/<profile>/`; figures to
`figures/<profile>/`; cached artifacts (checkpoints, generators, quantized files) to
`artifacts/<profile>/`, each keyed by the parameters that made it, so a rerun recomputes only what changed.
These four folders sit in the repository, or under $QG_OUTPUT when it is set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .io import read_json

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("01_collect", "02_train", "03_generate", "04_ablate_padding", "05_ablate_diffusion",
             "06_ablate_backbone", "07_ablate_token_size")


def load_profile(name: str) -> dict:
    """The settings of profile `name` from `params/<name>.yaml` (a path to a YAML file also works)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "params" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "params").glob("*.yaml"))
        raise FileNotFoundError(f"no profile {name!r} ({path} does not exist); known profiles: {known}")
    profile = yaml.safe_load(path.read_text())
    profile["name"] = path.stem
    problems = profile_problems(profile)
    if problems:
        raise ValueError(f"profile {path} does not line up:\n" + "\n".join(f"  {p}" for p in problems))
    return profile


def pairs(profile: dict) -> list[tuple[str, str]]:
    """Every collected (architecture, task): all tasks, or those an archs entry lists under `tasks`."""
    return [(a, t) for a, entry in profile["archs"].items() for t in profile["tasks"]
            if t in entry.get("tasks", profile["tasks"])]


def selected(block: dict, arch: str, task: str) -> bool:
    """Whether a profile block (`qat`, `table3`) that may list `archs` and `tasks` covers (arch, task)."""
    return arch in block.get("archs", [arch]) and task in block.get("tasks", [task])


def ablation_setup(profile: dict, factor: str) -> dict:
    """The (arch, task, bits, granularity) one ablation runs on: the `ablation` block's, updated by its
    `per_factor` entry for that factor (the paper ablates token size on ViT-Base, the rest on ViT-Tiny)."""
    a = profile["ablation"]
    return {**{k: a[k] for k in ("arch", "task", "bits", "granularity")}, **a.get("per_factor", {}).get(factor, {})}


def profile_problems(profile: dict) -> list[str]:
    """Names in a profile that refer to nothing (a typo would silently drop a model, a table or a figure)."""
    archs, tasks, collected = list(profile["archs"]), list(profile["tasks"]), pairs(profile)
    lists = [(f"archs.{a}.tasks", e.get("tasks"), tasks) for a, e in profile["archs"].items()]
    lists += [(f"{b}.{k}", profile.get(b, {}).get(k), valid) for b in ("qat", "table3")
              for k, valid in (("archs", archs), ("tasks", tasks))]
    problems = []
    for where, value, valid in lists:
        if value is not None and not isinstance(value, list):
            problems.append(f"{where} must be a list of names, got {value!r}")
        elif value is not None and not set(value) <= set(valid):
            problems.append(f"{where} names {sorted(set(value) - set(valid))}, not among {valid}")
    ablation = profile.get("ablation", {})
    factors = [k for k, v in ablation.items() if isinstance(v, dict) and k != "per_factor"]
    wanted = {"figure1": profile.get("figure1"), "figure3": profile.get("figure3")}
    wanted.update({f"ablation ({factor})": ablation_setup(profile, factor) for factor in factors})
    problems += [f"ablation.per_factor.{factor} is not an ablation of this profile ({factors})"
                 for factor in ablation.get("per_factor", {}) if factor not in factors]
    problems += [f"{where} uses {block['arch']}/{block['task']}, which 01_collect does not make (it makes "
                 f"{[f'{a}/{t}' for a, t in collected]})"
                 for where, block in wanted.items() if block and (block["arch"], block["task"]) not in collected]
    convergence = profile.get("convergence") or {}
    if convergence.get("variants") and not {"bits", "granularity"} <= set(convergence):
        problems.append("convergence needs `bits` and `granularity` beside its `variants`")
    for label, overrides in (convergence.get("variants") or {}).items():
        unknown = sorted(set(overrides or {}) - {"tokenizer", "generator", "train"})
        if unknown:
            problems.append(f"convergence.variants.{label} overrides {unknown}; only tokenizer, generator and train can change")
    return problems


@dataclass(frozen=True)
class Paths:
    """Where one profile's files live."""

    artifacts: Path
    results: Path
    figures: Path
    notebooks: Path

    @classmethod
    def of(cls, profile: str, root: Path | None = None) -> "Paths":
        """Paths of a profile under `root`: $QG_OUTPUT when set (a scratch disk, a test's folder), else the repo."""
        root = Path(root or os.environ.get("QG_OUTPUT") or ROOT)
        profile = Path(profile).stem
        return cls(root / "artifacts" / profile, root / "results" / profile, root / "figures" / profile,
                   root / "results" / "notebooks" / profile)

    def make(self) -> "Paths":
        for p in (self.artifacts, self.results, self.figures):
            p.mkdir(parents=True, exist_ok=True)
        return self


def require(path: Path, notebook: str, what: str = "its output") -> dict:
    """Read a manifest an upstream notebook wrote, or say which notebook to run first."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: run notebooks/{notebook}.ipynb with the same profile first "
                                f"(it writes {what}), e.g. `python -m qg.pipeline --profile <name> {notebook}`")
    return read_json(path)


def git_commit() -> str:
    """The code's commit, with `-dirty` when tracked files under qg/, notebooks/ or params/ have changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--", "qg", "notebooks", "params") else "")


def check_parameters(notebook: Path, parameters: dict) -> None:
    """Refuse parameters the notebook's `parameters` cell does not declare (papermill only warns)."""
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    unknown = sorted(set(parameters) - declared)
    if unknown:
        raise ValueError(f"{notebook.name} has no parameter(s) {unknown}; it declares {sorted(declared)}")


def run(profile: str, notebooks: list[str] | None = None, parameters: dict | None = None) -> list[Path]:
    """Execute notebooks in order with papermill; returns the executed copies' paths."""
    import papermill

    load_profile(profile)  # fail before starting a kernel if the profile does not exist
    names = notebooks or [n for n in NOTEBOOKS if (ROOT / "notebooks" / f"{n}.ipynb").is_file()]
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; the pipeline's notebooks are {list(NOTEBOOKS)}")
    params = {"profile": profile, **(parameters or {})}
    out_dir = Paths.of(profile).notebooks
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names:
        source = ROOT / "notebooks" / f"{name}.ipynb"
        check_parameters(source, params)
        print(f"[qg.pipeline] {name} (profile {profile})", flush=True)
        papermill.execute_notebook(str(source), str(out_dir / f"{name}.ipynb"), parameters=params,
                                   cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=True)
        _relative_paths(out_dir / f"{name}.ipynb")
        done.append(out_dir / f"{name}.ipynb")
    return done


def _relative_paths(executed: Path) -> None:
    """papermill records the notebook's absolute input and output paths: keep them relative to the repository."""
    import nbformat

    from .report import portable

    nb = nbformat.read(executed, 4)
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            meta[key] = portable(meta[key])
    nbformat.write(nb, executed)


CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def store_checks(profile: str = "smoke", notebooks: list[str] | None = None) -> list[Path]:
    """Copy the outputs of checked cells from an executed run into `notebooks/*.ipynb`.

    Those stored outputs are what `pytest --nbval-lax` compares a fresh execution against; every other
    cell of the source notebooks is kept without outputs. Run after changing what a checked cell prints:
    `python -m qg.pipeline --profile smoke --store-checks`.
    """
    import nbformat

    changed = []
    for name in notebooks or NOTEBOOKS:
        source_path, run_path = ROOT / "notebooks" / f"{name}.ipynb", Paths.of(profile).notebooks / f"{name}.ipynb"
        if not source_path.is_file():
            continue
        source, executed = nbformat.read(source_path, 4), nbformat.read(run_path, 4)
        ran = [c for c in executed.cells if "injected-parameters" not in c.metadata.get("tags", [])]
        if [c.source for c in ran] != [c.source for c in source.cells]:
            raise ValueError(f"{run_path} was not executed from the current {source_path.name}; rerun it first")
        for cell, done in zip(source.cells, ran):
            if cell.cell_type != "code":
                continue
            checked = cell.source.startswith(CHECK_MARK)
            cell.outputs = done.outputs if checked else []
            cell.execution_count = done.execution_count if checked else None
        nbformat.write(source, source_path)
        changed.append(source_path)
    return changed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"), help="params/<profile>.yaml")
    p.add_argument("notebooks", nargs="*", help=f"which notebooks (default: all of {list(NOTEBOOKS)})")
    p.add_argument("--store-checks", action="store_true",
                   help="after running, store the checked cells' outputs in notebooks/ (what nbval compares)")
    args = p.parse_args(argv)
    try:
        run(args.profile, args.notebooks or None)
        if args.store_checks:
            for path in store_checks(args.profile, args.notebooks or None):
                print(f"[qg.pipeline] stored checked outputs in {path.relative_to(ROOT)}")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
