"""oodlab: image classifiers that know what they don't know.

The layers datapipes/, distributed/ and tuning/ sit beside this package in the source tree and are installed as
oodlab.datapipes, oodlab.distributed and oodlab.tuning by pyproject.toml's package-dir alone: import them by those
names only (tests/test_layout.py checks).
"""
