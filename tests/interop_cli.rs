//! `ddpm import`, `ddpm export` and sampling a diffusers folder, end to end through the binary.
use std::path::{Path, PathBuf};

mod common;
use common::{ddpm, stderr};

/// The committed diffusers pipeline folder made by tools/make_diffusers_fixture.py.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers/tiny-pipeline")
}

fn tensors(path: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    ddpm::checkpoint::from_safetensors(&std::fs::read(path).unwrap(), path).unwrap()
}

#[test]
fn import_sample_and_export_a_diffusers_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture();
    let fixture = fixture.to_str().unwrap();

    // Sampling reads the diffusers folder directly.
    let out = ddpm(
        &[
            "sample",
            "--checkpoint",
            fixture,
            "--num",
            "2",
            "--steps",
            "2",
            "--out",
            "direct.png",
            "--device",
            "cpu",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let grid = image::open(dir.path().join("direct.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 18 + 2, 18 + 2));

    let out = ddpm(&["import", "--from", fixture, "--out", "run"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    // The folder and its import describe the same network.
    let summary = |from: &str| {
        let out = ddpm(&["model", "--checkpoint", from], dir.path());
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        text[text.find("preset:").unwrap()..].to_string()
    };
    assert_eq!(summary(fixture), summary("run"));
    assert!(
        dir.path().join("run/config.toml").exists()
            && dir
                .path()
                .join("run/checkpoints/step-00000000.json")
                .exists()
    );
    let out = ddpm(&["import", "--from", fixture, "--out", "run"], dir.path());
    assert!(
        !out.status.success() && stderr(&out).contains("already holds checkpoints"),
        "{}",
        stderr(&out)
    );

    let out = ddpm(
        &[
            "sample",
            "--checkpoint",
            "run",
            "--num",
            "2",
            "--steps",
            "2",
            "--out",
            "imported.png",
            "--device",
            "cpu",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The same weights, noise and sampler: the same images.
    assert_eq!(image::open(dir.path().join("imported.png")).unwrap(), grid);

    let out = ddpm(
        &[
            "export",
            "--checkpoint",
            "run",
            "--format",
            "diffusers",
            "--out",
            "exported",
            "--weights",
            "raw",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for file in [
        "model_index.json",
        "unet/config.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dir.path().join("exported").join(file).exists(), "{file}");
    }
    // The float16 originals, exported as float32, keep their values and names.
    let original = tensors(&Path::new(fixture).join("unet/diffusion_pytorch_model.safetensors"));
    let exported = tensors(
        &dir.path()
            .join("exported/unet/diffusion_pytorch_model.safetensors"),
    );
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        exported.keys().collect::<Vec<_>>()
    );
    for (name, t) in &original {
        assert!(t.to_kind(tch::Kind::Float).equal(&exported[name]), "{name}");
    }
}

#[test]
fn a_folder_ddpm_cannot_compute_is_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("pipeline");
    for file in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::create_dir_all(copy.join(file).parent().unwrap()).unwrap();
        std::fs::copy(fixture().join(file), copy.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(copy.join("unet/config.json"))
        .unwrap()
        .replace("\"downsample_padding\": 1", "\"downsample_padding\": 2");
    std::fs::write(copy.join("unet/config.json"), config).unwrap();
    let out = ddpm(
        &["import", "--from", "pipeline", "--out", "run"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("downsample_padding") && stderr(&out).contains("unet/config.json"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("run").exists(), "nothing written");
}
