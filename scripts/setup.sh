#!/usr/bin/env bash
# One-time (idempotent) set-up: Debian packages FFCV needs, a .venv with oodlab installed editable.
# Called by `make demo` / `make test`; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# FFCV 1.0.2 builds from source against Debian's OpenCV and libturbojpeg, and links them at run time.
packages="pkg-config libopencv-dev libturbojpeg0-dev"
# The fmnist benchmark (and the demo) read Fashion-MNIST's original idx files that Debian packages, and render
# notMNIST-style letters from the fonts of these three packages (datapipes/glyphs.py).
packages="$packages dataset-fashion-mnist fonts-urw-base35 fonts-liberation fonts-freefont-ttf"
# The browser test renders the MLflow UI in Debian's headless Chromium, driven by its chromedriver.
packages="$packages chromium chromium-driver"
# PostgreSQL server binaries: tests/test_mlflow_server.py runs a real MLflow server on a PostgreSQL store.
packages="$packages postgresql"
command -v g++ >/dev/null 2>&1 || packages="$packages build-essential"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "oodlab setup: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  else
    echo "oodlab setup: these Debian packages are missing:$missing" >&2
    echo "  run:  sudo apt-get update && sudo apt-get install -y --no-install-recommends$missing" >&2
    echo "  then run this command again." >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "oodlab setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "oodlab setup: installing torch, then oodlab and its pinned dependencies (first time: a few minutes)"
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[dev]"
.venv/bin/oodlab --help >/dev/null  # fails the set-up (set -e) if oodlab cannot start
echo "oodlab setup: done (oodlab CLI ok)"
