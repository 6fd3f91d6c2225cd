"""One package, one copy of each module: datapipes/, distributed/ and tuning/ are `oodlab.<layer>` by pyproject alone.

From the repository root (pytest's working directory, `python -m ...`) the folders are also importable as top-level
names, which would load a second copy of the same file beside `oodlab.<layer>` (and `distributed` is Dask's name):
no module, test or bench may import them so. `oodlab submit` ships the tree in the installed layout, so that a job
imports every layer from the shipped copy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import oodlab
import oodlab.datapipes
import oodlab.distributed
import oodlab.tuning
from oodlab.distributed import submit

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("datapipes", "distributed", "tuning")


def python_files() -> list[Path]:
    return sorted(p for folder in ("oodlab", *LAYERS, "tests", "bench", "scripts") for p in (ROOT / folder).rglob("*.py"))


def absolute_imports(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports absolutely (`import a.b`, `from a.b import c`), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def test_no_module_test_or_bench_imports_a_layer_as_a_top_level_name():
    files = python_files()
    assert len(files) > 50 and ROOT / "distributed" / "group.py" in files
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in files
             for name, line in absolute_imports(path) if name.split(".")[0] in LAYERS]
    assert wrong == []


def test_the_layers_map_into_oodlab_by_pyproject_alone():
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert folders == {"oodlab": "oodlab", **{f"oodlab.{layer}": layer for layer in LAYERS}}
    assert list(oodlab.__path__) == [str(ROOT / "oodlab")]  # nothing appended
    for layer in LAYERS:
        assert Path(sys.modules[f"oodlab.{layer}"].__file__) == ROOT / layer / "__init__.py"
        assert layer not in sys.modules or not Path(sys.modules[layer].__file__ or "").is_relative_to(ROOT)


def test_a_submitted_job_imports_every_layer_from_the_shipped_tree(tmp_path):
    zip_path = submit.pack(ROOT, {submit.JOB_CONFIG: "name: x\n"}, tmp_path)
    names = zipfile.ZipFile(zip_path).namelist()
    assert "oodlab/distributed/group.py" in names and "oodlab/datapipes/builtin_benchmarks/digits.yaml" in names
    assert not [n for n in names if n.split("/")[0] in LAYERS] and submit.JOB_CONFIG in names
    shipped = tmp_path / "working_dir"
    zipfile.ZipFile(zip_path).extractall(shipped)
    code = "import oodlab.datapipes, oodlab.distributed.jobs, oodlab.tuning, oodlab.cli as c; " \
           "print(oodlab.datapipes.__file__, oodlab.distributed.jobs.__file__, oodlab.tuning.__file__, c.CONFIGS)"
    out = subprocess.run([sys.executable, "-c", code], cwd=shipped, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [Path(p) for p in out.stdout.split()] == [shipped / "oodlab/datapipes/__init__.py",
                                                     shipped / "oodlab/distributed/jobs.py",
                                                     shipped / "oodlab/tuning/__init__.py", shipped / "configs"]
    assert submit.benchmark_for_job(ROOT / "datapipes/builtin_benchmarks/digits.yaml") == \
        "oodlab/datapipes/builtin_benchmarks/digits.yaml"
