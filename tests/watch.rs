//! `ddpm watch` beside a training run, end to end through the built binary.
use std::path::Path;
use std::process::{Command, Stdio};

mod common;
use common::{ddpm, ddpm_ok, stderr};

fn eval_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("eval.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn watch_refuses_what_is_not_a_run_and_a_second_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let out = ddpm(&["watch", "nothing", "--once"], dir.path());
    assert!(
        !out.status.success() && stderr(&out).contains("nothing does not exist"),
        "{}",
        stderr(&out)
    );
    std::fs::create_dir(dir.path().join("pictures")).unwrap();
    let out = ddpm(&["watch", "pictures", "--once"], dir.path());
    assert!(
        stderr(&out).contains("pictures is not a ddpm run directory"),
        "{}",
        stderr(&out)
    );
    common::one_step_run(
        "[model]\nchannels = 16\n[train]\nbatch = 4\ndevice = \"cpu\"\n",
        "run",
        dir.path(),
    );
    let lock_path = dir.path().join("run/checkpoints/.watch.lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    lock.lock().unwrap();
    std::fs::write(
        &lock_path,
        r#"{"pid":4242,"measured_through":null,"every":0}"#,
    )
    .unwrap();
    let out = ddpm(&["watch", "run", "--once"], dir.path());
    assert!(
        !out.status.success() && stderr(&out).contains("another ddpm watch (pid 4242) follows"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn watch_measures_every_checkpoint_of_a_run_beside_it_and_resumes_where_it_stopped() {
    let Some(inception) = common::inception() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Real images: noise at the model's 16×16 in grayscale.
    std::fs::create_dir(dir.path().join("real")).unwrap();
    for i in 0..10u32 {
        image::GrayImage::from_fn(16, 16, |x, y| {
            image::Luma([((x * 37 + y * 11 + i * 53) % 251) as u8])
        })
        .save(dir.path().join(format!("real/{i}.png")))
        .unwrap();
    }
    // keep = 1: the trainer would keep only its newest checkpoint without a watcher.
    let config = "[model]\nchannels = 16\n[train]\nbatch = 8\ndevice = \"cpu\"\n[sample]\nevery = 0\nsteps = 5\n[checkpoint]\nevery = 5\nkeep = 1\n";
    std::fs::write(dir.path().join("small.toml"), config).unwrap();
    ddpm_ok(
        &[
            "train",
            "--config",
            "small.toml",
            "--steps",
            "5",
            "--out",
            "run",
        ],
        dir.path(),
    );
    let run = dir.path().join("run");
    let inception = inception.to_string_lossy().into_owned();
    let watch = |extra: &[&str]| {
        let mut args = vec![
            "watch",
            "run",
            "--num",
            "8",
            "--batch",
            "8",
            "--real",
            "real",
            "--inception",
            &inception,
            "--poll-seconds",
            "0.2",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let watcher = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(watch(&[]))
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the watcher holds the run (its mark is written), the training goes on to step 20.
    let pid = watcher.id();
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(run.join("checkpoints/.watch.lock"))
        .is_ok_and(|t| t.contains(&format!("\"pid\":{pid}")))
    {
        assert!(
            started.elapsed().as_secs() < 120,
            "the watcher never took the run"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ddpm_ok(&["train", "--resume", "run", "--steps", "20"], dir.path());
    let out = watcher.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Every checkpoint was measured, none lost to pruning, each once.
    assert_eq!(eval_steps(&run), [5, 10, 15, 20], "{}", stderr(&out));
    let record: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("eval.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    for key in ["fid", "precision", "recall"] {
        assert!(record[key].as_f64().is_some_and(f64::is_finite), "{record}");
    }
    assert!(std::fs::read_to_string(run.join("report.html"))
        .unwrap()
        .contains("Measured beside training"));

    // Stopped with one left unmeasured, it measures that one only; a damaged one is named and
    // passed over.
    let lines: Vec<String> = std::fs::read_to_string(run.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    std::fs::write(
        run.join("eval.jsonl"),
        format!("{}\n{}\n", lines[0], lines[3]),
    )
    .unwrap();
    std::fs::write(
        run.join("checkpoints/step-00000010.safetensors"),
        b"damaged",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(watch(&["--once"]))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checkpoint of step 10 not measured"),
        "{}",
        stderr(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("measured 1 checkpoint(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(eval_steps(&run), [5, 20, 15]);
}
