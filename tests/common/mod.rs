//! What the command-line tests share: running the `scopegym` binary and checking its exit.

use std::process::{Command, Output};

/// Runs `scopegym` with `args` and waits for it.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scopegym"))
        .args(args)
        .output()
        .expect("runs")
}

/// Its stdout, after asserting success (the failure message is its stderr).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
