//! Class-conditional models end to end: labels from the data into the checkpoint, `--class`
//! and `--guidance` when sampling, and the inputs that must be refused before any work.
use std::path::Path;

mod common;
use common::{ddpm, ddpm_ok, one_step_run, stderr};

const SMALL: &str = "[model]\nchannels = 16\nimage_size = 8\n[train]\nbatch = 4\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\n";
const SMALL_DIGITS: &str = "[model]\nnum_classes = \"auto\"\nchannels = 16\nimage_size = 8\n[train]\nbatch = 4\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\n";

fn fails_saying(args: &[&str], dir: &Path, words: &[&str]) {
    let out = ddpm(args, dir);
    let log = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded: {log}");
    assert!(!log.contains("panicked"), "{args:?}: {log}");
    for w in words {
        assert!(log.contains(w), "{args:?}: no {w:?} in {log}");
    }
}

const SAMPLE: [&str; 7] = [
    "sample",
    "--checkpoint",
    "run",
    "--num",
    "4",
    "--device",
    "cpu",
];

fn sample_with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [&SAMPLE[..], extra].concat()
}

#[test]
fn a_digits_model_samples_the_classes_asked_for_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    one_step_run(SMALL_DIGITS, "run", dir.path());
    let sidecar =
        std::fs::read_to_string(dir.path().join("run/checkpoints/step-00000001.json")).unwrap();
    assert!(
        sidecar.contains("\"num_classes\": 10") && sidecar.contains("\"classes\""),
        "{sidecar}"
    );
    ddpm_ok(
        &sample_with(&["--class", "3", "--class", "7", "--out-dir", "picked"]),
        dir.path(),
    );
    let csv = std::fs::read_to_string(dir.path().join("picked/labels.csv")).unwrap();
    assert_eq!(
        csv,
        "file,class_id,class_name\n000000.png,3,3\n000001.png,3,3\n000002.png,7,7\n000003.png,7,7\n"
    );
    // A grid of every class, guided.
    ddpm_ok(
        &sample_with(&["--guidance", "3", "--out", "all.png"]),
        dir.path(),
    );
    assert!(image::open(dir.path().join("all.png")).is_ok());
    fails_saying(
        &sample_with(&["--class", "12", "--out", "a.png"]),
        dir.path(),
        &["--class 12", "10 classes"],
    );
    fails_saying(
        &sample_with(&["--class", "seven", "--out", "a.png"]),
        dir.path(),
        &["\"seven\"", "\"0\", \"1\""],
    );
    fails_saying(
        &sample_with(&["--guidance", "200", "--out", "a.png"]),
        dir.path(),
        &["sample.guidance"],
    );
    // Nothing was written by the refused commands.
    assert!(!dir.path().join("a.png").exists());
    // A resume cannot change the number of classes.
    fails_saying(
        &[
            "train",
            "--resume",
            "run",
            "--num-classes",
            "5",
            "--steps",
            "2",
        ],
        dir.path(),
        &["model.num_classes"],
    );
}

#[test]
fn an_unconditional_model_takes_no_class_and_no_guidance() {
    let dir = tempfile::tempdir().unwrap();
    one_step_run(SMALL, "run", dir.path());
    fails_saying(
        &sample_with(&["--class", "1", "--out", "a.png"]),
        dir.path(),
        &["--class 1", "unconditional"],
    );
    fails_saying(
        &sample_with(&["--guidance", "2", "--out", "a.png"]),
        dir.path(),
        &["sample.guidance", "--guidance", "unconditional"],
    );
    fails_saying(
        &[
            "train",
            "--preset",
            "tiny",
            "--guidance",
            "2",
            "--out",
            "new",
        ],
        dir.path(),
        &["sample.guidance", "model.num_classes"],
    );
    assert!(!dir.path().join("new").exists());
}

fn png(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([shade, 90, 200 - shade]))
        .save(path)
        .unwrap();
}

#[test]
fn an_image_folder_trains_on_its_class_folders_and_refuses_loose_images_beside_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pets");
    for i in 0..4u8 {
        png(&data.join(format!("dogs/{i}.png")), i * 10);
        png(&data.join(format!("cats/{i}.png")), 100 + i * 10);
    }
    std::fs::write(
        dir.path().join("small.toml"),
        format!("{SMALL_DIGITS}[data]\npath = \"pets\"\n")
            .replace("image_size = 8\n", "image_size = 8\nin_channels = 3\n"),
    )
    .unwrap();
    let train = [
        "train",
        "--config",
        "small.toml",
        "--steps",
        "1",
        "--sample-every",
        "0",
        "--out",
    ];
    ddpm_ok(&[&train[..], &["run"]].concat(), dir.path());
    ddpm_ok(
        &sample_with(&["--class", "cats", "--out-dir", "cats"]),
        dir.path(),
    );
    let csv = std::fs::read_to_string(dir.path().join("cats/labels.csv")).unwrap();
    assert!(csv.ends_with("000003.png,0,cats\n"), "{csv}");
    fails_saying(
        &sample_with(&["--class", "birds", "--out", "b.png"]),
        dir.path(),
        &["\"birds\"", "\"cats\", \"dogs\""],
    );
    // A loose image beside the class folders: refused, naming it, before the run starts.
    png(&data.join("stray.png"), 50);
    fails_saying(
        &[&train[..], &["second"]].concat(),
        dir.path(),
        &["stray.png", "model.num_classes"],
    );
    assert!(!dir.path().join("second").exists());
}
