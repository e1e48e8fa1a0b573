//! The command line, end to end, through the built binary.
use std::path::Path;
use std::process::{Command, Output};

fn ddpm(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).current_dir(cwd).output().expect("ddpm runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn model_prints_the_exact_cifar10_parameter_count() {
    let dir = tempfile::tempdir().unwrap();
    let out = ddpm(&["model", "--preset", "cifar10"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("parameters: 35746307"));
}

#[test]
fn config_errors_name_the_key_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[train]\nlearning_rate = 0.1\n").unwrap();
    let out = ddpm(&["train", "--config", "bad.toml", "--out", "run"], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("train.learning_rate"), "{}", stderr(&out));
    assert!(!dir.path().join("run").exists(), "no run directory before the config is valid");

    let out = ddpm(&["train", "--ema-decay", "1.5", "--out", "run"], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("train.ema_decay") && stderr(&out).contains("1.5"), "{}", stderr(&out));

    let out = ddpm(&["train", "--data", "no/such/folder", "--out", "run"], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no/such/folder"), "{}", stderr(&out));
}

#[test]
fn train_resume_and_sample_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[model]\nchannels = 16\n[train]\nbatch = 8\nlog_every = 1\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 3\n[checkpoint]\nevery = 2\n";
    std::fs::write(dir.path().join("small.toml"), config).unwrap();
    let out = ddpm(&["train", "--config", "small.toml", "--steps", "3", "--out", "run"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("run");
    for file in ["config.toml", "metrics.jsonl", "samples/latest.png", "checkpoints/step-00000002.json", "checkpoints/step-00000003.safetensors"] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 3);

    // A second start into the same directory refuses instead of overwriting.
    let out = ddpm(&["train", "--config", "small.toml", "--steps", "3", "--out", "run"], dir.path());
    assert!(!out.status.success() && stderr(&out).contains("--resume"), "{}", stderr(&out));

    // Resume extends the run to 5 steps.
    let out = ddpm(&["train", "--resume", "run", "--steps", "5"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("at step 3"), "{}", stderr(&out));
    assert!(run.join("checkpoints/step-00000005.json").exists());

    let out = ddpm(&["sample", "--checkpoint", "run", "--num", "3", "--steps", "2", "--out", "grid.png", "--out-dir", "imgs", "--device", "cpu"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let grid = image::open(dir.path().join("grid.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 30 + 2, 2 * 30 + 2));
    for i in 0..3 {
        let img = image::open(dir.path().join(format!("imgs/{i:06}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (28, 28));
    }
}
