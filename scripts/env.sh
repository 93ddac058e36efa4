# Sourced by the scripts: a cargo target directory kept outside the clone (reused across fresh
# clones and CI runs), unless the caller chose one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scopegym/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# libtorch for the `torch` feature (tch): PyTorch 2.13.0 from the project's .venv
# (scripts/setup.sh installs it), found by tch's build through the venv's python, and its
# shared libraries on the loader path for the binaries and tests that link them.
# SCOPEGYM_VENV picks another virtual environment (default: the clone's .venv).
SCOPEGYM_VENV="${SCOPEGYM_VENV:-$PWD/.venv}"
if [ -x "$SCOPEGYM_VENV/bin/python" ]; then
    export VIRTUAL_ENV="$SCOPEGYM_VENV"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
    TORCH_DIR="$("$VIRTUAL_ENV/bin/python" -c 'import importlib.util as u; s = u.find_spec("torch"); print(s.submodule_search_locations[0] if s else "")' 2>/dev/null || true)"
    # torch-sys only checks that LIBTORCH_USE_PYTORCH is set, and reruns its build script when
    # its value changes, not when the venv does. Its value is therefore this venv's torch
    # directory: a build cached outside the clone then links against this libtorch, never
    # against one of an earlier clone's venv that has since been removed.
    export LIBTORCH_USE_PYTORCH="${TORCH_DIR:-1}"
    if [ -n "$TORCH_DIR" ]; then
        export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi
