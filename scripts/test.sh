#!/usr/bin/env bash
# Every test: formatting, lints, Rust unit/integration/property/doc tests, and the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh

# The `torch` feature (tch on the .venv's PyTorch: DKL, REINFORCE, PPO) is on for everything;
# the agents also build and pass their lints without it.
FEATURES=(--features scopegym/torch)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked "${FEATURES[@]}" -- -D warnings
cargo clippy -p scopegym-agents --all-targets --locked -- -D warnings
# The Python package first (the abi3 wheel, maturin, release, installed into .venv): the Rust
# tests of the Python STEM gateway run it.
WHEELS="$CARGO_TARGET_DIR/python-wheels"
rm -rf "$WHEELS"
.venv/bin/maturin build --release --locked --quiet --auditwheel skip --out "$WHEELS"
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$WHEELS"/scopegym-*.whl
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked "${FEATURES[@]}"
else
    cargo test --workspace --locked --lib --bins --tests "${FEATURES[@]}"
fi
cargo test --workspace --locked --doc "${FEATURES[@]}"
cargo build --locked --bin scopegym "${FEATURES[@]}"
SCOPEGYM_BIN="$CARGO_TARGET_DIR/debug/scopegym" .venv/bin/python -m pytest -q tests/python
