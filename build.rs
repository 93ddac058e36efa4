//! Records the git commit the CLI was built from (provenance in every file it writes), and
//! with the `torch` feature writes libtorch's directory into the binary's run path, so
//! `scopegym` finds PyTorch's libraries without `LD_LIBRARY_PATH`.
use std::process::Command;

/// libtorch's library directory: `$LIBTORCH/lib`, else the `lib` folder of the torch package
/// of the active virtual environment's python (as tch's build finds it with
/// `LIBTORCH_USE_PYTORCH=1`).
fn libtorch_lib_dir() -> Option<String> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(format!("{dir}/lib"));
    }
    let python = match std::env::var("VIRTUAL_ENV") {
        Ok(venv) => format!("{venv}/bin/python"),
        Err(_) => "python3".into(),
    };
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.util as u, os; s = u.find_spec('torch'); \
             print(os.path.join(s.submodule_search_locations[0], 'lib') if s else '')",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then_some(dir)
}

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=SCOPEGYM_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some() {
        println!("cargo:rerun-if-env-changed=LIBTORCH");
        println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
        if let Some(dir) = libtorch_lib_dir() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
