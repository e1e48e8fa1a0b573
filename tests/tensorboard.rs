//! The TensorBoard events a run writes, read back by TensorBoard's own reader (the `tensorboard`
//! Python package, through tools/read_tensorboard.py).
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::ddpm_ok;

/// The tool scripts' Python (tools/python_env.sh), when it has `tensorboard`.
fn tools_python() -> Option<PathBuf> {
    let python = ddpm::cache::dir().unwrap().join("tools-venv/bin/python");
    let usable = Command::new(&python)
        .args(["-c", "import tensorboard"])
        .output()
        .is_ok_and(|o| o.status.success());
    common::installed(python, usable, "run tools/python_env.sh")
}

fn read_events(python: &Path, run: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/read_tensorboard.py");
    let out = Command::new(python).arg(script).arg(run).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tensorboard_reads_the_runs_records_and_grids_once_each_across_a_resume() {
    let Some(python) = tools_python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = "[model]\nchannels = 16\n[train]\nbatch = 8\nlog_every = 2\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\nevery = 3\n[checkpoint]\nevery = 3\nkeep = 5\n";
    std::fs::write(dir.path().join("small.toml"), config).unwrap();
    let args = [
        "train",
        "--config",
        "small.toml",
        "--steps",
        "6",
        "--out",
        "run",
    ];
    ddpm_ok(&args, dir.path());
    let run = dir.path().join("run");
    // Back to step 3, as after losing the later checkpoint: the resumed run writes steps 4 to 6
    // again, and the events of the first pass after step 3 must not count twice.
    for file in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let path = file.unwrap().path();
        if path.to_string_lossy().contains("00000006") {
            std::fs::remove_file(path).unwrap();
        }
    }
    ddpm_ok(&["train", "--resume", "run"], dir.path());

    let events = read_events(&python, &run);
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r.get("loss").is_some())
        .collect();
    let logged: Vec<(u64, f64)> = metrics
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(logged.iter().map(|l| l.0).collect::<Vec<_>>(), [2, 4, 6]);
    let loss: Vec<(u64, f64)> = events["scalars"]["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap()))
        .collect();
    assert_eq!(loss.len(), logged.len(), "{loss:?} against {logged:?}");
    for ((step, value), (want_step, want)) in loss.iter().zip(&logged) {
        // Stored as f32.
        assert!(
            step == want_step && (value - want).abs() <= want.abs() * 1e-6,
            "{loss:?} against {logged:?}"
        );
    }
    for tag in ["lr", "grad_norm", "images_per_second", "loss_by_quarter/0"] {
        assert!(events["scalars"][tag].is_array(), "{tag}: {events}");
    }
    // A grid at steps 3 and 6 (its pixels as the PNG holds them), once each.
    let grids: Vec<u64> = events["images"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(grids, [3, 6], "{events}");
    let png = image::open(run.join("samples/latest.png")).unwrap();
    let last = &events["images"]["samples"][1];
    assert_eq!(
        (last[1].as_u64(), last[2].as_u64()),
        (Some(png.width() as u64), Some(png.height() as u64))
    );
}
