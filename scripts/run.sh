#!/usr/bin/env bash
# The main job: set up, build (with the torch feature: DKL, REINFORCE, PPO) and run the
# benchmark suite's small budget (suite/suite-v2.toml: every task, every baseline agent,
# evaluated on the test split) into out/suite: results.json and a table per run, scores.json,
# suite.png (interquartile mean with bootstrap intervals, performance profiles) and the table.
# --restart: every run of this script computes its results afresh (no jobs saved by an earlier
# build are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --features torch
"$CARGO_TARGET_DIR/release/scopegym" suite --budget small --out out/suite --restart
