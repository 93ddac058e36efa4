#!/usr/bin/env bash
# The main job: set up, build, and simulate a STEM session from a scenario
# (graphene with a Si dopant at 60 kV): 4 frames with drift, as PNG and HDF5, in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked
mkdir -p out
"$CARGO_TARGET_DIR/release/scopegym" simulate scenarios/stem_graphene_si.toml \
    --out out/stem_graphene_si.png --hdf5 out/stem_graphene_si.h5 --frames 4 --seed 1
"$CARGO_TARGET_DIR/release/scopegym" perf scenarios/stem_graphene_si.toml --frames 50
