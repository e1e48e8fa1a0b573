//! `ddpm ema`: post-hoc EMA from a run's snapshots, end to end through the built binary.
use std::path::Path;

mod common;
use common::{ddpm, ddpm_ok, stderr};

const SMALL: &str = "[model]\nchannels = 16\n[train]\nbatch = 8\ndevice = \"cpu\"\n[sample]\nevery = 0\nsteps = 5\nnum = 4\n";

/// A 60-step run in `cwd/run` with snapshots every 10 steps (and the final one).
fn run_with_snapshots(cwd: &Path, snapshot_every: &str) {
    std::fs::write(cwd.join("small.toml"), SMALL).unwrap();
    ddpm_ok(
        &[
            "train",
            "--config",
            "small.toml",
            "--steps",
            "60",
            "--ema-snapshot-every",
            snapshot_every,
            "--out",
            "run",
        ],
        cwd,
    );
}

#[test]
fn ema_makes_a_checkpoint_of_any_reachable_width_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    run_with_snapshots(cwd, "10");
    let snapshots: Vec<_> = std::fs::read_dir(cwd.join("run/ema-snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(snapshots.len(), 6, "{snapshots:?}");

    let out = ddpm_ok(&["ema", "run", "--sigma-rel", "0.08"], cwd);
    let made = cwd.join("run/posthoc-ema/sigma_rel-0.080/step-00000060.json");
    assert!(made.is_file(), "{}", String::from_utf8_lossy(&out.stdout));
    ddpm_ok(
        &[
            "sample",
            "--checkpoint",
            made.to_str().unwrap(),
            "--num",
            "2",
            "--out",
            "made.png",
        ],
        cwd,
    );
    assert!(cwd.join("made.png").is_file());

    // Beyond what the profiles 0.05 and 0.10 reach, and beyond any power function.
    let out = ddpm(&["ema", "run", "--sigma-rel", "0.01"], cwd);
    assert!(
        !out.status.success() && stderr(&out).contains("beyond what the stored profiles reach"),
        "{}",
        stderr(&out)
    );
    let out = ddpm(&["ema", "run", "--sigma-rel", "0.5"], cwd);
    assert!(
        stderr(&out).contains("lies in (0, 0.2887]"),
        "{}",
        stderr(&out)
    );
    let out = ddpm(&["ema", "run", "--sigma-rel", "0.08", "--step", "35"], cwd);
    assert!(
        stderr(&out).contains("no snapshot of that step (it has 10, 20, 30, 40, 50, 60)"),
        "{}",
        stderr(&out)
    );

    // A damaged snapshot is named and passed over; the rest still make the EMA.
    let damaged = cwd.join("run/ema-snapshots/step-00000030.safetensors");
    let bytes = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let out = ddpm_ok(&["ema", "run", "--sigma-rel", "0.08"], cwd);
    assert!(
        stderr(&out).contains("damaged snapshot") && stderr(&out).contains("step-00000030"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ema_refuses_what_is_not_a_run_with_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let out = ddpm(&["ema", "nothing", "--sigma-rel", "0.1"], cwd);
    assert!(
        stderr(&out).contains("nothing does not exist"),
        "{}",
        stderr(&out)
    );
    std::fs::create_dir(cwd.join("pictures")).unwrap();
    let out = ddpm(&["ema", "pictures", "--sigma-rel", "0.1"], cwd);
    assert!(
        stderr(&out).contains("pictures is not a ddpm run directory"),
        "{}",
        stderr(&out)
    );
    let out = ddpm(&["ema", "pictures"], cwd);
    assert!(stderr(&out).contains("--sigma-rel"), "{}", stderr(&out));
    run_with_snapshots(cwd, "0");
    let out = ddpm(&["ema", "run", "--sigma-rel", "0.1"], cwd);
    assert!(
        !out.status.success()
            && stderr(&out).contains("has no post-hoc EMA snapshots")
            && stderr(&out).contains("--ema-snapshot-every"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ema_sweep_scores_each_width_beside_the_classic_ema() {
    let Some(inception) = common::inception() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    run_with_snapshots(cwd, "10");
    std::fs::create_dir(cwd.join("real")).unwrap();
    for i in 0..10u32 {
        image::GrayImage::from_fn(16, 16, |x, y| {
            image::Luma([((x * 37 + y * 11 + i * 53) % 251) as u8])
        })
        .save(cwd.join(format!("real/{i}.png")))
        .unwrap();
    }
    let out = ddpm_ok(
        &[
            "ema",
            "run",
            "--sweep",
            "--sigma-rels",
            "0.01,0.05,0.1",
            "--num",
            "8",
            "--batch",
            "8",
            "--real",
            "real",
            "--inception",
            inception.to_str().unwrap(),
        ],
        cwd,
    );
    assert!(
        stderr(&out).contains("passing over σ_rel [0.01]"),
        "{}",
        stderr(&out)
    );
    let sweep: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cwd.join("run/posthoc-ema/sweep.json")).unwrap(),
    )
    .unwrap();
    let widths: Vec<f64> = sweep["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p["fid"].as_f64().is_some_and(f64::is_finite), "{p}");
            p["sigma_rel"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(widths, [0.05, 0.1]);
    assert!(sweep["classic"]["fid"].as_f64().is_some_and(f64::is_finite));
    assert!(cwd.join("run/posthoc-ema/sweep.png").is_file());
    let report = std::fs::read_to_string(cwd.join("run/report.html")).unwrap();
    assert!(report.contains("Post-hoc EMA"));
}
