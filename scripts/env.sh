# Sourced by the scripts: a cargo target directory kept outside the clone (reused across fresh
# clones and CI runs), unless the caller chose one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scopegym/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
