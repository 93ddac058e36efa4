#!/usr/bin/env bash
# Installs everything scopegym needs on a fresh Debian machine with Rust and Python 3.11:
# the HDF5 C library (Debian's libhdf5-dev 1.10), and a Python virtual environment in .venv with
# the test and benchmark tools (Gymnasium, Stable-Baselines3, Minari, mypy, maturin, torch, Ray). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! pkg-config --exists hdf5 2>/dev/null && [ ! -e /usr/include/hdf5/serial/hdf5.h ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libhdf5-dev pkg-config >/dev/null
fi
# Headless Chromium and its WebDriver for the dashboard's browser test (tests/python/test_serve.py).
if ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# No pip cache: PyTorch's wheels with their CUDA libraries take about 3.5 GB, and a cached copy
# beside the installed 5.7 GB fills small CI disks.
if ! .venv/bin/python -c "import numpy, scipy, h5py, pytest, gymnasium, stable_baselines3, minari, mypy, maturin, PIL, torch, botorch, ray, mcp, selenium" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check --no-cache-dir -r requirements-dev.txt
fi
