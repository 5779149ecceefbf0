"""Profiles: what one run of the reproduction does, and where its files live.

A profile (`params/<name>.yaml`) holds every setting of a run: `smoke` (the tests), `cpu` (the
default reproduction) and `paper` (the paper's models, data and token sizes, for a GPU). This module
reads and checks one (`load_profile`, `profile_problems`), answers what it covers (`pairs`,
`selected`, `ablation_setup`) and says where its files go (`Paths`): cached artifacts (checkpoints,
generators, quantized files) in `artifacts/<profile>/`, tables in `results/<profile>/`, figures in
`figures/<profile>/`, executed notebooks in `results/notebooks/<profile>/`, in the repository or
under $QG_OUTPUT when it is set. The runner that executes the notebooks is `qg.pipeline`. What each
key means, its type and range: `qg.config.schema`.
"""

from __future__ import annotations

import ast
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.io import ROOT, claim_cache, params_key, read_json
from .blocks import ABLATION_FACTORS, AblationSetup, Selection
from .schema import Profile, validated

# What 01_collect makes from: overriding these would change the checkpoints under the shared cache's
# manifest, so a variant of them is a profile file of its own, not an override.
COLLECT_KEYS = ("seed", "archs", "pretrain", "tasks", "checkpoints", "quant", "qat")


def load_profile(name: str, overrides: dict | None = None) -> Profile:
    """The settings of profile `name` from `params/<name>.yaml` (a path to a YAML file also works),
    with `overrides` merged in (nested dicts key by key; the papermill way to sweep a value without
    editing files).

    An overridden profile is named `<name>+<key of the overrides>`: its tables, figures and executed
    notebooks go to their own folders, while its artifacts share `<name>`'s cache (every artifact is
    keyed by the parameters that made it, so only what the overrides change is recomputed).
    `overrides` is recorded in the profile, hence in every provenance file.
    """
    path = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "params" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "params").glob("*.yaml"))
        raise FileNotFoundError(
            f"no profile {name!r} ({path} does not exist); known profiles: {known}"
        )
    try:
        profile = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"profile {path} is not valid YAML: {e}") from None
    if isinstance(profile, dict):
        profile = {**profile, "name": path.stem, "cache": path.stem}
    profile = validated(profile, str(path))
    if overrides:
        _check_overrides(profile.written, overrides, path)
        named = {"overrides": overrides, "name": f"{path.stem}+{params_key(overrides)[:8]}"}
        profile = validated(
            {**_merged(profile.written, overrides), **named}, f"{path} with overrides {overrides}"
        )
    problems = profile_problems(profile)
    if problems:
        raise ValueError(
            f"profile {path} does not line up:\n" + "\n".join(f"  {p}" for p in problems)
        )
    return profile


def refuse_undeclared(history: list[str]) -> None:
    """A papermill parameter the `parameters` cell does not declare is an error (`qg.notebook.setup`
    calls this first; papermill run directly only warns, and the notebook would run without it;
    `qg.pipeline` checks before it starts). `history` is IPython's input history: the parameters
    cell is the first code cell, papermill's injected cell starts with `# Parameters`. Nothing is
    injected in JupyterLab: nothing to check."""
    cells = [c for c in history if c.strip()]
    injected = [c for c in cells if c.lstrip().startswith("# Parameters")]
    if not injected:
        return
    declared, given = _assigned(cells[0]), _assigned(injected[-1])
    unknown = sorted(given - declared)
    if unknown:
        raise ValueError(
            f"unknown notebook parameter(s) {unknown}: this notebook declares "
            f"{sorted(declared)} (pass settings as overrides, e.g. "
            "-y 'overrides: {train: {steps: 600}}')"
        )


def _assigned(source: str) -> set[str]:
    return {
        t.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def pairs(profile: Profile) -> list[tuple[str, str]]:
    """Every collected (architecture, task): all tasks, or those an archs entry lists under
    `tasks`."""
    return [
        (a, t)
        for a, entry in profile.archs.items()
        for t in profile.tasks
        if entry.tasks is None or t in entry.tasks
    ]


def selected(block: Selection, arch: str, task: str) -> bool:
    """Whether a profile block (`qat`, `table3`) that may list `archs` and `tasks` covers (arch,
    task)."""
    return (block.archs is None or arch in block.archs) and (
        block.tasks is None or task in block.tasks
    )


def ablation_setup(profile: Profile, factor: str) -> AblationSetup:
    """The (arch, task, bits, granularity) one ablation runs on: the `ablation` block's, updated by
    its `per_factor` entry for that factor (the paper ablates token size on ViT-Base, the rest on
    ViT-Tiny)."""
    a = profile.ablation
    own = a.per_factor.get(factor)
    return AblationSetup(
        **{
            **{k: getattr(a, k) for k in ("arch", "task", "bits", "granularity")},
            **(own.model_dump(exclude_unset=True) if own else {}),
        }
    )


def _check_overrides(profile: dict, overrides: dict, path: Path) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(
            f"overrides must be a mapping such as {{train: {{steps: 600}}}}, got {overrides!r}"
        )
    blocks = set(profile) - {"name", "cache"}
    unknown = sorted(set(overrides) - blocks)
    if unknown:
        near = {u: difflib.get_close_matches(u, blocks, n=1, cutoff=0.7) for u in unknown}
        hints = "".join(f" (`{u}`: did you mean `{n[0]}`?)" for u, n in near.items() if n)
        raise ValueError(
            f"overrides name {unknown}, which profile {path.stem} does not have{hints}; "
            f"its blocks: {sorted(blocks)}"
        )
    collect = sorted(set(overrides) & set(COLLECT_KEYS))
    if collect:
        raise ValueError(
            f"overrides of {collect} change what 01_collect makes; copy {path} to a new profile "
            "file instead (its artifacts then live in their own cache)"
        )


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in: nested mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (
            _merged(base[key], value)
            if isinstance(value, dict) and isinstance(base.get(key), dict)
            else value
        )
    return out


def profile_problems(profile: Profile) -> list[str]:
    """Names in a profile that refer to nothing (a typo would silently drop a model, a table or a
    figure)."""
    archs, tasks, collected = list(profile.archs), list(profile.tasks), pairs(profile)
    lists = [(f"archs.{a}.tasks", e.tasks, tasks) for a, e in profile.archs.items()]
    lists += [
        (f"{b}.{k}", getattr(getattr(profile, b), k), valid)
        for b in ("qat", "table3")
        for k, valid in (("archs", archs), ("tasks", tasks))
    ]
    problems = []
    # types and ranges are the schema's (qg.config.schema); names are checked here
    for where, value, valid in lists:
        if value is not None and not set(value) <= set(valid):
            problems.append(f"{where} names {sorted(set(value) - set(valid))}, not among {valid}")
    factors = ablation_factors(profile)
    wanted = {"figure1": profile.figure1, "figure3": profile.figure3}
    wanted.update({f"ablation ({factor})": ablation_setup(profile, factor) for factor in factors})
    problems += [
        f"ablation.per_factor.{factor} is not an ablation of this profile ({factors})"
        for factor in profile.ablation.per_factor
        if factor not in factors
    ]
    problems += [
        f"{where} uses {block.arch}/{block.task}, which 01_collect does not make (it makes "
        f"{[f'{a}/{t}' for a, t in collected]})"
        for where, block in wanted.items()
        if (block.arch, block.task) not in collected
    ]
    problems += _qat_steps_problems(profile.qat.steps, profile.qat.tasks or tasks)
    amortized = profile.amortized_qat.bits if profile.amortized_qat else []
    missing = sorted(set(amortized) - set(profile.qat.bits))
    if missing:
        problems.append(
            f"amortized_qat.bits {missing} have no QAT targets: add them to qat.bits (01_collect "
            "makes them)"
        )
    if profile.rpg:
        problems += _rpg_problems(profile.rpg, archs, collected)
    problems += _convergence_problems(profile.convergence)
    return problems


def ablation_factors(profile: Profile) -> list[str]:
    """The factors the profile ablates (the `ablation` block's variant tables that are set)."""
    a = profile.ablation
    return [f for f in ABLATION_FACTORS if getattr(a, f) is not None]


def _qat_steps_problems(steps, tasks: list[str]) -> list[str]:
    """A per-task step count must name every task QAT covers, and only tasks."""
    if not isinstance(steps, dict):
        return []
    problems = [f"qat.steps names task {t!r}, not among {tasks}" for t in steps if t not in tasks]
    return problems + [
        f"qat.steps has no step count for task {t!r}: add `{t}: <steps>` (or give one number)"
        for t in tasks
        if t not in steps
    ]


def _rpg_problems(rpg, archs: list[str], collected: list[tuple[str, str]]) -> list[str]:
    problems = [f"rpg.archs names {a!r}, not among {archs}" for a in rpg.archs if a not in archs]
    problems += [
        f"rpg uses {a}/{rpg.task}, which 01_collect does not make"
        for a in rpg.archs
        if a in archs and (a, rpg.task) not in collected
    ]
    if rpg.binary and rpg.binary.arch and rpg.binary.arch not in archs:
        problems.append(f"rpg.binary.arch names {rpg.binary.arch!r}, not among {archs}")
    return problems


def _convergence_problems(convergence) -> list[str]:
    if not convergence or not convergence.variants:
        return []
    problems = []
    if convergence.bits is None or convergence.granularity is None:
        problems.append("convergence needs `bits` and `granularity` beside its `variants`")
    return problems


def resolved(path: str | os.PathLike, what: str) -> Path:
    """`path` made absolute, links followed; a loop of symbolic links is an error naming `what`
    (the variable or setting it came from), not pathlib's traceback."""
    try:
        return Path(path).resolve()
    except RuntimeError as e:  # pathlib's "Symlink loop from ..."
        raise ValueError(f"{what}={path} cannot be resolved: {e}; point it at a folder") from e


@dataclass(frozen=True)
class Paths:
    """Where one profile's files live."""

    artifacts: Path
    results: Path
    figures: Path
    notebooks: Path

    @classmethod
    def of(cls, profile: str, root: Path | None = None, cache: str | None = None) -> "Paths":
        """Paths of a profile under `root`: $QG_OUTPUT when set (a scratch disk, a test's folder),
        else the repo; artifacts under `cache` (another profile's, for an overridden one) when
        given."""
        root = resolved(root or os.environ.get("QG_OUTPUT") or ROOT, "QG_OUTPUT")
        profile = Path(profile).stem
        return cls(
            root / "artifacts" / (cache or profile),
            root / "results" / profile,
            root / "figures" / profile,
            root / "results" / "notebooks" / profile,
        )

    @classmethod
    def for_profile(cls, profile: Profile, root: Path | None = None) -> "Paths":
        """Paths of a loaded profile: its own results, the cache of the profile file it came
        from."""
        return cls.of(profile.name, root, profile.cache)

    def make(self) -> "Paths":
        """Create the folders; the cache is claimed for this cache format (`claim_cache`)."""
        claim_cache(self.artifacts)
        for p in (self.results, self.figures):
            p.mkdir(parents=True, exist_ok=True)
        return self


def require(path: Path, notebook: str, what: str = "its output") -> dict:
    """Read a manifest an upstream notebook wrote, or say which notebook to run first."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path} is missing: run notebooks/{notebook}.ipynb with the same profile first "
            f"(it writes {what}), e.g. `python -m qg.pipeline --profile <name> {notebook}`"
        )
    return read_json(path)
