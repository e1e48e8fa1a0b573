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

/// A one-step run in `cwd/out` from the TOML `config` (written as `small.toml`), to sample or
/// score; fails the test unless it trains.
pub fn one_step_run(config: &str, out: &str, cwd: &Path) {
    std::fs::write(cwd.join("small.toml"), config).unwrap();
    let args = [
        "train",
        "--config",
        "small.toml",
        "--steps",
        "1",
        "--sample-every",
        "0",
        "--out",
        out,
    ];
    ddpm_ok(&args, cwd);
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ddpm args…` run in `cwd`, killed and reported as a failure if it has not ended within
/// `seconds` (for inputs that could make it hang).
pub fn ddpm_within(args: &[&str], cwd: &Path, seconds: u64) -> Output {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ddpm runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while child.try_wait().expect("waitable").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("killed");
            panic!(
                "ddpm {args:?} still ran after {seconds} s: {}",
                stderr(&out)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output().expect("ended")
}

/// A file a test needs that the test command does not fetch, where `usable`: else None (the
/// test is skipped, saying so), except under CI, which installs it and where one missing fails.
pub fn installed(
    path: std::path::PathBuf,
    usable: bool,
    install: &str,
) -> Option<std::path::PathBuf> {
    match (usable, std::env::var_os("CI")) {
        (true, _) => Some(path),
        (false, Some(_)) => panic!(
            "CI runs this test for real, and {} is missing or unusable: {install}",
            path.display()
        ),
        (false, None) => {
            eprintln!(
                "skipped: {} is missing ({install} to run this test)",
                path.display()
            );
            None
        }
    }
}

/// The Inception network of the FID tests ($DDPM_INCEPTION, else where tools/get_inception.sh
/// puts it).
pub fn inception() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("DDPM_INCEPTION")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ddpm::eval::default_inception_path().unwrap());
    let usable = path.is_file();
    installed(path, usable, "run tools/get_inception.sh")
}
