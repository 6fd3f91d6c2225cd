"""Fuzzed configs and benchmark YAMLs through the real CLI entry function (`oodlab.cli.main`), with Hypothesis.

Documents: the shipped configs (and a benchmark YAML) as they are, and mutated: keys set to values of every type
(huge and negative numbers, infinities, long strings, lists and maps), keys deleted, unknown keys added, values
nested hundreds of levels deep, alias structures of every size up to billions of values, numbers with thousands of
digits, and raw text or bytes. Each must either validate (then `oodlab train` stops at the empty data root, and
`oodlab data build` at the missing sources: exit 2 naming `data.root` or the sources' keys) or exit 2 with a
message naming a key or the file; never a traceback, never within more than the deadline, nothing written.

Derandomized (a fixed seed per test, no example database), so CI runs the same examples every time.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oodlab.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
BENCHMARK = {"name": "fuzz", "image_size": 32, "num_classes": 10, "augment": "flip",
             "id": {"train": "id/train", "test": {"path": "id/test.npz", "limit": 100}, "val": {"fraction": 0.2}},
             "ood": {"val": {"path": "ood/val", "only_labels": [1, 2]}, "val_overlaps": [],
                     "near": {"n1": "near/n1.txt"}, "far": {"f1": {"path": "far/f1.mat"}}},
             "write": {"mode": "jpg", "jpeg_quality": 90}, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
SETTINGS = settings(max_examples=150, derandomize=True, database=None, deadline=timedelta(seconds=10),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HOLE = "__fuzz_hole_{}__"  # a placeholder value, replaced by raw YAML text in the dumped document
CONFIG_KEYS = re.compile(r"\b(name|seed|data|model|eval|ray|mlflow|checkpoint|stages|search|override)\b")
BENCHMARK_KEYS = re.compile(r"\b(name|image_size|id|ood|num_classes|mean|std|augment|eval_crop|color|write|about)\b")

numbers = st.one_of(st.integers(-10, 10), st.integers(), st.integers(-(10**40), 10**40),
                    st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64, 10**6, 10**9]),
                    st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12),
                    st.sampled_from(["train", "eval", "estimate", "energy", "msp", "knn", "random", "asha", "raw", "jpg",
                                     "../../x", "s3://b/k", "sqlite:///x.db", "http://127.0.0.1:9", "a" * 300]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@st.composite
def raw_yaml(draw: st.DrawFn) -> str:
    """YAML text a dumper never writes: aliases (up to billions of values), deep nesting, long numbers."""
    kind = draw(st.sampled_from(["aliases", "nested", "digits", "recursive"]))
    if kind == "aliases":
        levels, width = draw(st.integers(1, 12)), draw(st.integers(1, 10))
        parts = [f"&h0 [{', '.join(['x'] * width)}]"]
        parts += [f"&h{i} [{', '.join([f'*h{i - 1}'] * width)}]" for i in range(1, levels)]
        return "[" + ", ".join(parts) + "]"
    if kind == "nested":
        depth = draw(st.integers(1, 400))
        open_, close = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return open_ * depth + "1" + close * depth
    if kind == "digits":
        return draw(st.sampled_from(["", "-", "0x", "0o", "1e"])) + "9" * draw(st.integers(15, 6000))
    return "&r [1, *r]"


def similar(value: Any) -> st.SearchStrategy:
    """Another value of the same kind, most often still valid: a number between half and twice it (a whole number
    stays whole), a flag; anything else as it is."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(value // 2, 2 * value)
    if isinstance(value, float):
        return st.floats(value / 2, value)
    return st.just(value)


def leaf_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value of a nested dict (sections included)."""
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += leaf_paths(value, (*prefix, key))
    return found


@st.composite
def documents(draw: st.DrawFn, bases: list[dict]) -> str | bytes:
    """A base document as is, mutated, or replaced by raw text or bytes."""
    shape = draw(st.sampled_from(["base", "mutated", "mutated", "mutated", "text", "bytes"]))
    if shape == "text":
        return draw(st.text(max_size=200))
    if shape == "bytes":
        return draw(st.binary(max_size=200))
    doc = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(bases))))
    holes: list[str] = []
    for _ in range(draw(st.integers(0 if shape == "base" else 1, 0 if shape == "base" else 4))):
        paths = leaf_paths(doc)
        path = draw(st.sampled_from(paths)) if paths else ("x",)
        op = draw(st.sampled_from(["tweak", "tweak", "set", "set", "delete", "unknown", "raw"]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if op == "delete":
            del parent[path[-1]]
        elif op == "unknown":
            target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
            target[draw(st.text(min_size=1, max_size=10))] = draw(values)
        elif op == "tweak":  # another value of the same kind, often still valid
            parent[path[-1]] = draw(similar(parent[path[-1]]))
        elif op == "raw":
            holes.append(draw(raw_yaml()))
            parent[path[-1]] = HOLE.format(len(holes) - 1)
        else:
            parent[path[-1]] = draw(values)
    text = yaml.safe_dump(doc, sort_keys=False)
    for k, snippet in enumerate(holes):
        text = text.replace(HOLE.format(k), snippet)
    return text


def run(document: str | bytes, argv: list[str], folder: Path) -> tuple[int, str]:
    """`main(argv)` on the document written to folder/doc.yaml, in that folder; (exit status, what it printed)."""
    path = folder / "doc.yaml"
    path.write_bytes(document if isinstance(document, bytes) else document.encode("utf-8", "surrogatepass"))
    out = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            status = main([arg.replace("DOC", str(path)) for arg in argv])
        except SystemExit as stop:  # argparse's own errors
            status = stop.code
    return status, out.getvalue()


def check(status: int, printed: str, keys: re.Pattern, folder: Path) -> None:
    assert status == 2, printed[-2000:]
    assert "Traceback" not in printed, printed[-2000:]
    error = printed[printed.index("oodlab: error:"):]
    assert keys.search(error) or "doc.yaml" in error, error[:2000]
    assert [p.name for p in folder.rglob("*") if p.is_file()] == ["doc.yaml"]  # nothing written


@pytest.fixture(scope="module", autouse=True)
def imports():
    """What the first valid document imports (FFCV, Ray, MLflow: seconds), imported before the deadlines count."""
    import oodlab.datapipes.build  # noqa: F401
    import oodlab.distributed.pipeline  # noqa: F401


@SETTINGS
@given(documents([yaml.safe_load(p.read_text()) for p in CONFIGS]))
def test_fuzzed_configs_validate_or_exit_2_naming_a_key(document):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "empty").mkdir()
        status, printed = run(document, ["train", "DOC", f"data.root={folder / 'empty'}"], folder)
        check(status, printed, CONFIG_KEYS, folder)


@SETTINGS
@given(documents([BENCHMARK]))
def test_fuzzed_benchmarks_validate_or_exit_2_naming_a_key(document):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "empty").mkdir()
        status, printed = run(document, ["data", "build", "DOC", "--out", str(folder / "out"), "--root",
                                         str(folder / "empty")], folder)
        check(status, printed, BENCHMARK_KEYS, folder)
