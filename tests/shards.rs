//! End to end: an image folder written as WebDataset shards by `ddpm shards`, trained on
//! class-conditionally, interrupted and resumed from them.
mod common;

use common::{ddpm, ddpm_ok, stderr};

/// `count` 8×8 PNGs of one colour in `dir/class`.
fn class_folder(dir: &std::path::Path, class: &str, colour: [u8; 3], count: usize) {
    let folder = dir.join(class);
    std::fs::create_dir_all(&folder).unwrap();
    for i in 0..count {
        image::RgbImage::from_pixel(8, 8, image::Rgb(colour))
            .save(folder.join(format!("{i}.png")))
            .unwrap();
    }
}

#[test]
fn a_class_folder_becomes_shards_that_train_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let photos = cwd.join("photos");
    class_folder(&photos, "red", [200, 0, 0], 6);
    class_folder(&photos, "green", [0, 200, 0], 6);
    class_folder(&photos, "blue", [0, 0, 200], 6);
    std::fs::create_dir(photos.join("empty")).unwrap();

    let out = ddpm_ok(
        &["shards", "photos", "--out", "shards", "--per-shard", "5"],
        cwd,
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("wrote 18 images of 3 classes as 4 shard(s)")
            && said.contains("train-{000000..000003}.tar"),
        "{said}"
    );
    let warned = stderr(&out);
    assert!(warned.contains("empty holds no images"), "{warned}");
    assert_eq!(
        std::fs::read_to_string(cwd.join("shards/classes.txt")).unwrap(),
        "blue\ngreen\nred\n"
    );
    // Written again into the same folder, old and new shards would be read together.
    let again = ddpm(&["shards", "photos", "--out", "shards"], cwd);
    assert!(!again.status.success() && stderr(&again).contains("already holds 4 .tar file(s)"));

    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            "shards/train-{000000..000003}.tar",
            "--num-classes",
            "auto",
            "--channels",
            "3",
            "--image-size",
            "8",
            "--batch",
            "4",
            "--steps",
            "6",
            "--sample-every",
            "0",
            "--sample-num",
            "3",
            "--sample-steps",
            "2",
            "--shuffle-buffer",
            "3",
            "--out",
            "run",
        ];
        args.extend_from_slice(extra);
        ddpm(&args, cwd)
    };
    let first = train(&["--stop-at", "3"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let told = format!(
        "{}{}",
        String::from_utf8_lossy(&first.stdout),
        stderr(&first)
    );
    assert!(told.contains("4 WebDataset shard(s)"), "{told}");
    let resumed = ddpm(&["train", "--resume", "run"], cwd);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let metrics = std::fs::read_to_string(cwd.join("run/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":6"), "{metrics}");

    // A pattern naming a shard that is not there stops before training, naming it.
    let missing = ddpm(
        &[
            "train",
            "--data",
            "shards/train-{000000..000009}.tar",
            "--out",
            "other",
        ],
        cwd,
    );
    let e = stderr(&missing);
    assert!(
        !missing.status.success() && e.contains("train-000004.tar") && e.contains("does not exist"),
        "{e}"
    );
}
