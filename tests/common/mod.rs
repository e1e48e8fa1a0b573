//! Running the built binary, for the end-to-end tests.
#![allow(dead_code)] // each test file uses its own part of this
use std::path::Path;
use std::process::{Command, Output};

/// `ddpm args…` run in `cwd`, to completion.
pub fn ddpm(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("ddpm runs")
}

/// `ddpm args…` run in `cwd`; fails the test, with its stderr, unless it succeeds.
pub fn ddpm_ok(args: &[&str], cwd: &Path) -> Output {
    let out = ddpm(args, cwd);
    assert!(out.status.success(), "ddpm {args:?}: {}", stderr(&out));
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
