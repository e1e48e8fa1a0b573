//! Data-parallel training through c10d/Gloo on loopback, as separate processes: two ranks train
//! like one, a run resumes with another number of ranks, and a rank that dies, hangs or cannot
//! connect stops the others with an error in bounded time.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddpm::checkpoint::from_safetensors;

mod common;
use common::ddpm_ok;

const CONFIG: &str = "[model]\nchannels = 16\ndropout = 0.0\n[train]\nbatch = 8\nlog_every = 1\ndevice = \"cpu\"\nsteps = 6\n[data]\nhflip = true\ncolor_jitter = 0.1\n[sample]\nnum = 4\nsteps = 2\n[checkpoint]\nevery = 3\n";

/// The largest absolute difference between the model weights of two checkpoints.
fn weight_difference(a: &Path, b: &Path) -> f64 {
    let read = |p: &Path| from_safetensors(&std::fs::read(p).unwrap(), p).unwrap();
    let (a, b) = (read(a), read(b));
    let mut worst = 0.0f64;
    for (name, x) in a.iter().filter(|(n, _)| n.starts_with("model.")) {
        let y = &b[name];
        worst = worst.max((x - y).abs().max().double_value(&[]));
    }
    worst
}

/// The metrics lines of a run, one per logged step.
fn records(dir: &Path, run: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn checkpoint(dir: &Path, run: &str, step: u64) -> std::path::PathBuf {
    dir.join(run)
        .join("checkpoints")
        .join(format!("step-{step:08}.safetensors"))
}

#[test]
fn two_ranks_train_like_one_and_runs_resume_with_another_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("small.toml"), CONFIG).unwrap();
    let config = ["--config", "small.toml"];
    ddpm_ok(&[&["train"][..], &config, &["--out", "one"]].concat(), d);
    // Two ranks for three steps, then one rank for the rest.
    ddpm_ok(
        &[
            &["launch", "--nproc", "2", "--", "train"][..],
            &config,
            &["--out", "two", "--stop-at", "3"],
        ]
        .concat(),
        d,
    );
    ddpm_ok(&["train", "--resume", "two"], d);
    // One rank for three steps, then two ranks for the rest.
    ddpm_ok(
        &[
            &["train"][..],
            &config,
            &["--out", "mixed", "--stop-at", "3"],
        ]
        .concat(),
        d,
    );
    ddpm_ok(
        // As torchrun users type it, without `--`.
        &["launch", "--nproc", "2", "train", "--resume", "mixed"],
        d,
    );
    // Accumulating two micro-batches per rank: averaged once, after the last. Class-conditional:
    // labels shard with their images, and classes are dropped per global batch.
    let accumulated = [
        "--grad-accum",
        "2",
        "--steps",
        "3",
        "--num-classes",
        "auto",
        "--class-dropout",
        "0.3",
    ];
    ddpm_ok(
        &[
            &["train"][..],
            &config,
            &accumulated,
            &["--out", "one-accum"],
        ]
        .concat(),
        d,
    );
    ddpm_ok(
        &[
            &["launch", "--nproc", "2", "--", "train"][..],
            &config,
            &accumulated,
            &["--out", "two-accum"],
        ]
        .concat(),
        d,
    );
    let difference = weight_difference(
        &checkpoint(d, "one-accum", 3),
        &checkpoint(d, "two-accum", 3),
    );
    eprintln!("accumulating: weights differ by at most {difference:.2e}");
    assert!(difference < 1e-4, "accumulating: {difference}");
    // bf16-pure averages its f32 gradient sums after backward: rank 0's gradient norms are the
    // whole batch's up to bf16 rounding (measured within 0.1%; 3–16% off without averaging).
    let pure = [
        "--precision",
        "bf16-pure",
        "--grad-accum",
        "2",
        "--steps",
        "3",
    ];
    ddpm_ok(
        &[&["train"][..], &config, &pure, &["--out", "one-pure"]].concat(),
        d,
    );
    ddpm_ok(
        &[
            &["launch", "--nproc", "2", "--", "train"][..],
            &config,
            &pure,
            &["--out", "two-pure"],
        ]
        .concat(),
        d,
    );
    let (one, two) = (records(d, "one-pure"), records(d, "two-pure"));
    assert_eq!(two.len(), 3);
    for (a, b) in one.iter().zip(&two) {
        let (x, y) = (
            a["grad_norm"].as_f64().unwrap(),
            b["grad_norm"].as_f64().unwrap(),
        );
        assert!(
            (x - y).abs() <= 5e-3 * x,
            "bf16-pure step {}: grad norm {x} vs {y}",
            a["step"]
        );
    }
    // The same global batches, augmentation and noise: equal up to float summation order.
    for (run, step) in [("two", 3), ("two", 6), ("mixed", 6)] {
        let difference = weight_difference(&checkpoint(d, "one", step), &checkpoint(d, run, step));
        eprintln!("{run} step {step}: weights differ by at most {difference:.2e}");
        assert!(difference < 1e-4, "{run} step {step}: {difference}");
    }
    // Only rank 0 wrote: one metrics line per step. Its gradient norms are those of the whole
    // batch (a rank's half alone would give a different norm), and so are its losses.
    let (one, two) = (records(d, "one"), records(d, "two"));
    assert_eq!(two.len(), 6);
    for (a, b) in one.iter().zip(&two) {
        for field in ["grad_norm", "loss"] {
            let (x, y) = (a[field].as_f64().unwrap(), b[field].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs(),
                "step {}: {field} {x} vs {y}",
                a["step"]
            );
        }
    }
}

/// Starts rank `rank` of 2 on `port`, training for a long time.
fn start_rank(dir: &Path, rank: usize, port: u16, timeout_s: u64) -> Child {
    start_rank_with(dir, rank, port, timeout_s, &[])
}

fn start_rank_with(dir: &Path, rank: usize, port: u16, timeout_s: u64, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args([
            "train",
            "--config",
            "small.toml",
            "--steps",
            "100000",
            "--out",
            "run",
        ])
        .args(extra)
        .current_dir(dir)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("DDPM_DIST_TIMEOUT", timeout_s.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until rank 0 has logged a few steps.
fn wait_for_training(dir: &Path) {
    let started = Instant::now();
    while std::fs::read_to_string(dir.join("run/metrics.jsonl")).map_or(0, |m| m.lines().count())
        < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `child` to exit and returns its stderr and how long that took.
fn exit_of(mut child: Child, limit: Duration) -> (String, Duration, bool) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return (stderr, started.elapsed(), status.success());
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn a_rank_that_dies_or_hangs_stops_the_other_with_an_error() {
    for (signal, timeout_s) in [(9, 600), (19 /* SIGSTOP */, 5)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("small.toml"), CONFIG).unwrap();
        let port = free_port();
        let leader = start_rank(dir.path(), 0, port, timeout_s);
        let mut other = start_rank(dir.path(), 1, port, timeout_s);
        wait_for_training(dir.path());
        unsafe { kill(other.id() as i32, signal) };
        // Killed: the leader sees the closed connection at once. Stopped: it gives up after
        // DDPM_DIST_TIMEOUT.
        let (stderr, took, success) = exit_of(leader, Duration::from_secs(timeout_s.min(60) + 30));
        eprintln!(
            "signal {signal}: rank 0 exited after {took:?}: {}",
            stderr.lines().last().unwrap_or_default()
        );
        assert!(!success);
        assert!(
            stderr.contains("rank 0 of 2") && stderr.contains("failed"),
            "{stderr}"
        );
        let _ = other.kill();
        let _ = other.wait();
    }
}

#[test]
fn a_rank_that_cannot_reach_rank_0_gives_up_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.toml"), CONFIG).unwrap();
    let alone = start_rank(dir.path(), 1, free_port(), 2);
    let (stderr, took, success) = exit_of(alone, Duration::from_secs(60));
    assert!(!success);
    assert!(
        stderr.contains("rank 1 of 2 could not join the Gloo process group"),
        "{stderr}"
    );
    eprintln!(
        "rank 1 alone gave up after {took:?}: {}",
        stderr.lines().last().unwrap_or_default()
    );
}

#[test]
fn ctrl_c_to_the_launcher_stops_all_ranks_after_the_same_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.toml"), CONFIG).unwrap();
    let launcher = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args([
            "launch",
            "--nproc",
            "2",
            "--",
            "train",
            "--config",
            "small.toml",
        ])
        .args(["--steps", "100000", "--out", "run"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_training(dir.path());
    unsafe {
        kill(launcher.id() as i32, 2 /* SIGINT */)
    };
    let started = Instant::now();
    let mut launcher = launcher;
    let status = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "launcher still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(launcher.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    assert!(!stderr.contains("exited with status"), "{stderr}");
    let checkpoints = ddpm::checkpoint::list(&dir.path().join("run/checkpoints")).unwrap();
    assert!(!checkpoints.is_empty());
}

#[test]
fn ranks_with_different_recipes_refuse_to_train() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.toml"), CONFIG).unwrap();
    let port = free_port();
    let leader = start_rank(dir.path(), 0, port, 30);
    let other = start_rank_with(dir.path(), 1, port, 30, &["--lr", "0.002"]);
    let (stderr, _, success) = exit_of(other, Duration::from_secs(60));
    assert!(!success);
    assert!(
        stderr.contains("rank 1 of 2 disagrees with rank 0 on the recipe"),
        "{stderr}"
    );
    let (stderr, _, success) = exit_of(leader, Duration::from_secs(60));
    assert!(!success, "{stderr}");
}
