"""The reproduction as a pipeline: a papermill runner that executes the notebooks in order.

Every notebook takes two papermill parameters, `profile` (see `qg.config.profiles`) and `overrides`
(a mapping merged into it, `{}` by default), and reads the rest from the YAML, so one file and one
mapping say what a run did.

    python -m qg.pipeline --profile cpu                  # every notebook, in order
    python -m qg.pipeline --profile cpu --jobs 2         # 03-10 two at a time, one core each
    python -m qg.pipeline --profile smoke 01_collect     # one step
    # a sweep point
    python -m qg.pipeline --profile cpu --overrides "{train: {steps: 600}}" 02_train 03_generate
    # do its results/cpu tables equal ours?
    python -m qg.pipeline --profile cpu --compare /other/root

Executed notebooks go to `results/notebooks/<profile>/`, tables to `results/<profile>/`, figures to
`figures/<profile>/`, cached artifacts to `artifacts/<profile>/` (each keyed by the parameters that
made it, so a rerun recomputes only what changed), in the repository or under $QG_OUTPUT when it is
set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from . import results
from .config.profiles import ROOT, Paths, load_profile, resolved
from .core.audit import damaged, orphaned, unverified
from .core.io import HASH_SUFFIX, exclusive
from .results import compare

NOTEBOOKS = (
    "01_collect",
    "02_train",
    "03_generate",
    "04_ablate_padding",
    "05_ablate_diffusion",
    "06_ablate_backbone",
    "07_ablate_token_size",
    "08_residual_qat",
    "09_real_files",
    "10_rpg",
)
# what every later notebook reads the cache of; the later ones write only their own
SHARED = ("01_collect", "02_train")


def check_parameters(notebook: Path, parameters: dict) -> None:
    """Refuse parameters the notebook's `parameters` cell does not declare (papermill only
    warns)."""
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    unknown = sorted(set(parameters) - declared)
    if unknown:
        raise ValueError(
            f"{notebook.name} has no parameter(s) {unknown}; it declares {sorted(declared)}"
        )


def run(
    profile: str, notebooks: list[str] | None = None, parameters: dict | None = None, jobs: int = 1
) -> list[Path]:
    """Execute notebooks with papermill; returns the executed copies' paths, in the notebooks'
    order.

    `SHARED` notebooks run first, in order. With `jobs` > 1 the others, which read only those
    notebooks' caches and write results of their own, run `jobs` at a time, each in its own process
    with its kernel limited to its share of the cores (OMP_NUM_THREADS): two kernels whose OpenMP
    threads wait for each other on one core slow each other down many times over."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    # the kernels run in notebooks/: a relative path must not change meaning
    if profile.endswith((".yaml", ".yml")):
        profile = str(Path(profile).resolve())
    params = {"profile": profile, **(parameters or {})}
    # fail before starting a kernel if the profile is wrong
    loaded = load_profile(profile, params.get("overrides"))
    _kernel_environment()
    names = notebooks or [n for n in NOTEBOOKS if (ROOT / "notebooks" / f"{n}.ipynb").is_file()]
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(
            f"unknown notebook(s) {unknown}; the pipeline's notebooks are {list(NOTEBOOKS)}"
        )
    for name in names:  # every notebook's parameters, before any runs
        check_parameters(ROOT / "notebooks" / f"{name}.ipynb", params)
    paths = Paths.for_profile(loaded)
    # one run at a time per output folder; the cache claimed once here, not by two kernels at once
    with exclusive(paths.artifacts.with_name(f".{paths.artifacts.name}.lock"), "qg.pipeline"):
        out_dir = paths.make().notebooks
        out_dir.mkdir(parents=True, exist_ok=True)
        first = [n for n in names if jobs == 1 or n in SHARED]
        for name in first:
            _run_one(name, out_dir, params, loaded.name)
        later = [n for n in names if n not in first]
        if later:
            _in_parallel(later, jobs, out_dir, params, loaded.name)
    readme = results.write(paths.results, loaded.name)
    print(f"[qg.pipeline] findings: {readme}", flush=True)
    return [out_dir / f"{name}.ipynb" for name in names]


KERNEL_START_FAILED = "Kernel died before replying to kernel_info"


def _run_one(
    name: str, out_dir: Path, params: dict, profile_name: str, threads: int | None = None
) -> None:
    if threads is not None:  # read by the kernel's torch when it starts
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    print(f"[qg.pipeline] {name} (profile {profile_name})", flush=True)
    source, out = ROOT / "notebooks" / f"{name}.ipynb", out_dir / f"{name}.ipynb"
    try:
        _execute(source, out, params)
    except RuntimeError as e:
        # Two kernels starting at once can be handed the same free TCP port (jupyter_client picks
        # ports before the kernel binds them): the kernel dies before any cell ran, so start again.
        if KERNEL_START_FAILED not in str(e):
            raise
        print(f"[qg.pipeline] {name}: its kernel died while starting ({e}); starting it again")
        _execute(source, out, params)


def _in_parallel(
    names: list[str], jobs: int, out_dir: Path, params: dict, profile_name: str
) -> None:
    """Run `names` `jobs` at a time in worker processes (papermill changes the process's working
    directory, so two notebooks cannot share one), each taken from the queue as a worker frees; the
    first failure stops the ones not started and is raised once the running ones end."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_run_one, name, out_dir, params, profile_name, threads) for name in names
        ]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f in done and f.exception() is not None]
        for f in pending:
            f.cancel()
    if failed:
        raise failed[0]


def _execute(source: Path, out: Path, params: dict) -> None:
    """Run one notebook into `out`, through a temporary copy: a run that dies writing (a full disk)
    keeps the previous executed notebook instead of leaving a truncated one. A notebook that raises
    is kept, with its traceback, and reported by its own message."""
    import papermill

    running = out.with_name(f".{out.stem}.running.ipynb")
    try:
        papermill.execute_notebook(
            str(source),
            str(running),
            parameters=params,
            cwd=str(ROOT / "notebooks"),
            kernel_name="python3",
            progress_bar=True,
        )
    # the cell's own message, not 100 lines of traceback
    except papermill.PapermillExecutionError as e:
        os.replace(running, out)
        _relative_paths(out)
        raise NotebookError(
            f"{source.stem} stopped in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
            f"  the executed notebook, with the traceback: {out}"
        ) from None
    except BaseException:
        running.unlink(missing_ok=True)
        raise
    os.replace(running, out)
    _relative_paths(out)
    for line in warnings_in(out):
        print(f"[qg.pipeline] {source.stem}: {line}", file=sys.stderr, flush=True)


def warnings_in(executed: Path) -> list[str]:
    """The cache's repair lines (`[qg] warning: ... rebuilding it`) a kernel printed inside an
    executed notebook: the runner repeats them on the terminal, where they would otherwise never
    be seen."""
    import nbformat

    nb = nbformat.read(executed, 4)
    return [
        line
        for cell in nb.cells
        for o in cell.get("outputs", [])
        if o.get("output_type") == "stream"
        for line in o.get("text", "").splitlines()
        if line.startswith("[qg] warning:")
    ]


class NotebookError(RuntimeError):
    """A notebook of the pipeline raised: its message, and where the executed notebook with the
    traceback is."""


def _kernel_environment() -> None:
    """What the kernels inherit: QG_OUTPUT and QG_DATA made absolute from where the command was
    started (they run in notebooks/, where a relative one would point elsewhere, and a download
    would land inside the checkout), this checkout first on PYTHONPATH (so they import its qg, not
    another checkout's editable install); they also inherit the pinned CPU kernels that `import qg`
    set in this process's environment (`qg.core.kernels`), whatever a notebook imports first."""
    for name in ("QG_OUTPUT", "QG_DATA"):
        if os.environ.get(name):
            os.environ[name] = str(resolved(Path(os.environ[name]).expanduser(), name))
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *rest])


def _relative_paths(executed: Path) -> None:
    """papermill records the notebook's absolute input and output paths (the latter the temporary
    copy's): record them relative to the repository, the output as the executed notebook's final
    name."""
    import nbformat

    from .core.report import portable

    nb = nbformat.read(executed, 4)
    meta = nb.metadata.get("papermill", {})
    if meta.get("input_path"):
        meta["input_path"] = portable(meta["input_path"])
    meta["output_path"] = portable(executed)
    nbformat.write(nb, executed)


CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def store_checks(profile: str = "smoke", notebooks: list[str] | None = None) -> list[Path]:
    """Copy the outputs of checked cells from an executed run into `notebooks/*.ipynb`.

    Those stored outputs are what `pytest --nbval-lax` compares a fresh execution against; every
    other cell of the source notebooks is kept without outputs. Run after changing what a checked
    cell prints: `python -m qg.pipeline --profile smoke --store-checks`.
    """
    import nbformat

    changed = []
    for name in notebooks or NOTEBOOKS:
        source_path = ROOT / "notebooks" / f"{name}.ipynb"
        run_path = Paths.of(profile).notebooks / f"{name}.ipynb"
        if not source_path.is_file():
            continue
        source, executed = nbformat.read(source_path, 4), nbformat.read(run_path, 4)
        ran = [c for c in executed.cells if "injected-parameters" not in c.metadata.get("tags", [])]
        if [c.source for c in ran] != [c.source for c in source.cells]:
            raise ValueError(
                f"{run_path} was not executed from the current {source_path.name}; rerun it first"
            )
        for cell, done in zip(source.cells, ran):
            if cell.cell_type != "code":
                continue
            checked = cell.source.startswith(CHECK_MARK)
            cell.outputs = done.outputs if checked else []
            cell.execution_count = done.execution_count if checked else None
        nbformat.write(source, source_path)
        changed.append(source_path)
    return changed


def verify(profile: str) -> int:
    """Report a profile's cache without changing it: damaged artifacts (their bytes no longer match
    their recorded hash) and unverified ones (no hash at all), which the next run rebuilds (exit
    status 1 when there are any), and orphaned ones, made from checkpoints that are gone or changed,
    which no run reads as they are (safe to delete). An unknown profile, or one never run here, is
    an error, not "0 damaged"."""
    load_profile(profile)  # FileNotFoundError naming the known profiles
    root = Paths.of(profile).artifacts
    if not root.is_dir():
        sys.exit(f"error: {root} does not exist: the {profile} profile has not run here")
    bad, loose = damaged(root), unverified(root)
    orphans = orphaned(root, root / "collect")  # inputs are named as `Collected.relative` does
    for path in bad:
        print(f"damaged: {path.relative_to(root)}")
    for path in loose:
        print(f"unverified: {path.relative_to(root)} (no recorded hash)")
    for path, why in orphans.items():
        print(f"orphaned: {path.relative_to(root)} ({why})")
    checked = sum(1 for _ in root.rglob(f"*{HASH_SUFFIX}"))
    print(
        f"[qg.pipeline] {checked} cached artifacts of {root} checked: {len(bad)} damaged, "
        f"{len(loose)} unverified"
        + (" (the next run rebuilds them)" if bad or loose else "")
        + f", {len(orphans)} orphaned"
        + (" (no run reads them: safe to delete)" if orphans else "")
    )
    return 1 if bad or loose else 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.verify:
        try:
            sys.exit(verify(args.profile))
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
    if args.compare:
        sys.exit(compare(args.profile, args.compare))
    try:
        run(
            args.profile,
            args.notebooks or None,
            {"overrides": args.overrides} if args.overrides else None,
            args.jobs,
        )
        if args.store_checks:
            for path in store_checks(args.profile, args.notebooks or None):
                print(f"[qg.pipeline] stored checked outputs in {path.relative_to(ROOT)}")
    except (ValueError, OSError, NotebookError) as e:
        sys.exit(f"error: {e}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--profile", default=os.environ.get("PROFILE", "cpu"), help="params/<profile>.yaml"
    )
    p.add_argument(
        "notebooks", nargs="*", help=f"which notebooks (default: all of {list(NOTEBOOKS)})"
    )
    p.add_argument(
        "--overrides",
        type=yaml.safe_load,
        default=None,
        help='a YAML mapping merged into the profile, e.g. "{train: {steps: 600}}"',
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every cached artifact of the profile against its recorded hash; run nothing",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("JOBS", 1)),
        help="after 01_collect and 02_train, run this many notebooks at a time (one core each on 2 "
        "cores)",
    )
    p.add_argument(
        "--compare",
        metavar="ROOT",
        type=Path,
        help="compare results/<profile>/*.csv with those under ROOT (times and commit left out); "
        "run nothing",
    )
    p.add_argument(
        "--store-checks",
        action="store_true",
        help="after running, store the checked cells' outputs in notebooks/ (what nbval compares)",
    )
    return p


if __name__ == "__main__":
    main()
