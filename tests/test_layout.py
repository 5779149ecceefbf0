"""The package's layout: packages and modules import only downwards, as qg's docstrings list them,
and the command line's quantize path never loads the study, its tables or the profiles."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qg

QG = Path(qg.__file__).parent


def listed(doc: str) -> list[str]:
    """The names a package docstring lists, in order (two-space-indented `name description`
    lines)."""
    return re.findall(r"^  (\w+)  ", doc, flags=re.M)


def modules() -> list[tuple[str, Path]]:
    """Every module of qg as (dotted name under qg, path), package faces excluded."""
    return [
        (".".join(p.relative_to(QG).with_suffix("").parts), p)
        for p in sorted(QG.rglob("*.py"))
        if p.name != "__init__.py"
    ]


def rank(dotted: str) -> tuple[int, int]:
    """(position of its top-level entry in qg's list, position inside its package's list)."""
    top = listed(qg.__doc__)
    first, _, rest = dotted.partition(".")
    if not rest:
        return top.index(first), 0
    inner = listed(importlib.import_module(f"qg.{first}").__doc__)
    return top.index(first), inner.index(rest.split(".")[0]) + 1


def imported(path: Path, dotted: str) -> set[str]:
    """The qg modules (dotted under qg) a module imports, relative or absolute, packages resolved to
    modules."""
    package = dotted.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif (node.module or "").startswith("qg"):
                base, node = [], node
            else:
                continue
            parts = base + (
                [m for m in (node.module or "").split(".") if m]
                if node.level
                else node.module.split(".")[1:]
            )
            # `from qg.quant import qwt` names a module; `from .io import x` a name
            for alias in node.names:
                candidate = ".".join(parts + [alias.name])
                found.add(
                    candidate
                    if (QG / Path(*candidate.split("."))).with_suffix(".py").is_file()
                    else ".".join(parts)
                )
        elif isinstance(node, ast.Import):
            found |= {a.name[3:] for a in node.names if a.name.startswith("qg.")}
    return {f for f in found if f}


def test_every_module_is_listed_in_its_package_docstring():
    top = listed(qg.__doc__)
    for dotted, _ in modules():
        first, _, rest = dotted.partition(".")
        assert first in top, f"qg.{first} is not listed in qg/__init__.py's docstring"
        if rest:
            inner = listed(importlib.import_module(f"qg.{first}").__doc__)
            assert rest in inner, f"qg.{dotted} is not listed in qg/{first}/__init__.py's docstring"


@pytest.mark.parametrize("dotted,path", modules(), ids=[d for d, _ in modules()])
def test_imports_run_down_the_lists(dotted, path):
    """A module imports only modules listed above it in its package and packages listed above its
    own."""
    here = rank(dotted)
    for target in imported(path, dotted):
        if target in ("", dotted.split(".")[0]) or "." not in target and (QG / target).is_dir():
            continue  # a package face (`from .. import x` resolved above, or qg itself)
        assert rank(target) < here, f"qg.{dotted} imports qg.{target}, listed at or below it"


def test_the_quantize_path_loads_neither_the_study_nor_the_tables():
    """`python -m qg quantize` needs the quantizer, the target models and the generator, nothing
    else."""
    code = (
        "import runpy, sys\nsys.argv = ['qg', 'quantize', '--help']\n"
        "try:\n    runpy.run_module('qg', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('qg.'))), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = done.stderr.split()
    assert "qg.generator.model" in loaded and "qg.targets.models" in loaded, loaded
    assert not [m for m in loaded if m.startswith(("qg.study", "qg.tables", "qg.config"))], loaded


def test_every_module_function_and_line_reads_at_once():
    """Modules of at most 400 lines, functions of at most 50, lines of at most 100 columns (the
    size a reader takes in without scrolling)."""
    too_long = []
    for path in sorted(QG.rglob("*.py")):
        dotted = ".".join(path.relative_to(QG).with_suffix("").parts)
        lines = path.read_text().splitlines()
        if len(lines) > 400:
            too_long.append(f"qg.{dotted}: {len(lines)} lines")
        too_long += [
            f"qg.{dotted}:{i}: {len(line)} columns"
            for i, line in enumerate(lines, 1)
            if len(line) > 100
        ]
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 50:
                    too_long.append(f"qg.{dotted}.{node.name}: {length} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_every_notebook_code_line_fits_100_columns():
    """The notebooks' code is read in JupyterLab beside its output: no line over 100 columns."""
    import json

    long = [
        f"{nb.name} cell {cell.get('id')}: {len(line)} columns"
        for nb in sorted((QG.parent / "notebooks").glob("*.ipynb"))
        for cell in json.loads(nb.read_text())["cells"]
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if len(line) > 100
    ]
    assert not long, "wrap these:\n" + "\n".join(long)
