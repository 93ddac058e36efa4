//! The shared real-instrument data files (`../shared/data` beside the checkout).

use std::path::PathBuf;

/// The shared data file `name`, or `None` (with a SKIPPED line) when it is missing.
pub fn data(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("SCOPEGYM_DATA")
        .or_else(|| std::env::var_os("SCOPEGYM_DATA_DIR"))
        .map(PathBuf::from)
        .or_else(|| {
            // `../shared/data` beside the workspace root (or any folder above it).
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            root.ancestors()
                .skip(1)
                .map(|a| a.join("shared/data"))
                .find(|d| d.is_dir())
        });
    let f = dir.map(|d| d.join(name)).filter(|f| f.is_file());
    if f.is_none() {
        eprintln!("SKIPPED: real data {name} not found (set SCOPEGYM_DATA)");
    }
    f
}
