"""oodlab: image classifiers that know what they don't know.

The layers datapipes/, distributed/ and tuning/ sit beside this package in the source tree and are installed as
oodlab.datapipes, oodlab.distributed and oodlab.tuning (pyproject.toml). Where oodlab is imported from a plain
copy of the tree (the project `oodlab submit` ships to a Ray cluster, first on the job's Python path), the line
below finds them in that copy too: a job runs the code it shipped, not what the cluster has installed.
"""

from pathlib import Path

_TREE = Path(__file__).resolve().parent.parent
if (_TREE / "distributed" / "__init__.py").is_file():
    __path__.append(str(_TREE))
