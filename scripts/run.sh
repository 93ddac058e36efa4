#!/usr/bin/env bash
# The main job: set up, build, and simulate from the shipped scenarios into out/: a STEM
# session (graphene with a Si dopant at 60 kV, 4 frames with drift), an AFM frame of terraces,
# an STM frame of Ag adatoms, and a PFM frame of a PbTiO3 film with a switching loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked
mkdir -p out
"$CARGO_TARGET_DIR/release/scopegym" simulate scenarios/stem_graphene_si.toml \
    --out out/stem_graphene_si.png --hdf5 out/stem_graphene_si.h5 --frames 4 --seed 1
for s in afm_terraces stm_ag111_adatoms; do
    "$CARGO_TARGET_DIR/release/scopegym" simulate "scenarios/$s.toml" \
        --out "out/$s.png" --hdf5 "out/$s.h5" --seed 1
done
"$CARGO_TARGET_DIR/release/scopegym" simulate scenarios/pfm_pto_film.toml \
    --out out/pfm_pto_film.png --hdf5 out/pfm_pto_film.h5 --seed 1 --spectroscopy 1e-6,1e-6
"$CARGO_TARGET_DIR/release/scopegym" perf scenarios/stem_graphene_si.toml --frames 50
"$CARGO_TARGET_DIR/release/scopegym" perf scenarios/afm_terraces.toml --frames 5
