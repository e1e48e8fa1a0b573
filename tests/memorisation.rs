//! `ddpm nearest`, the memorisation check, through the built binary.
mod common;
use common::{ddpm, ddpm_ok, stderr};

/// An image of independent noise per `seed` (splitmix64 of the seed and the pixel).
fn noise(seed: u32) -> image::GrayImage {
    image::GrayImage::from_fn(16, 16, |x, y| {
        let mut z =
            ((seed as u64) << 16 | (y as u64) << 8 | x as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        image::Luma([((z ^ (z >> 31)) >> 56) as u8])
    })
}

#[test]
fn copies_of_training_images_are_flagged_and_new_images_are_not() {
    let Some(inception) = common::inception() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for folder in ["train", "held", "fake"] {
        std::fs::create_dir(dir.path().join(folder)).unwrap();
    }
    for i in 0..10 {
        noise(i)
            .save(dir.path().join(format!("train/{i}.png")))
            .unwrap();
    }
    for i in 0..8 {
        noise(100 + i)
            .save(dir.path().join(format!("held/{i}.png")))
            .unwrap();
    }
    // Two copies of training images among four new ones.
    noise(3).save(dir.path().join("fake/a.png")).unwrap();
    noise(7).save(dir.path().join("fake/b.png")).unwrap();
    for i in 0..4 {
        noise(200 + i)
            .save(dir.path().join(format!("fake/c{i}.png")))
            .unwrap();
    }
    let inception = inception.to_string_lossy().into_owned();
    let args = [
        "nearest",
        "--fake",
        "fake",
        "--train",
        "train",
        "--held-out",
        "held",
        "--inception",
        &inception,
        "--out",
        "check",
    ];
    let out = ddpm_ok(&args, dir.path());
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("2 of 6 generated images are nearer a training image than any of 8 held-out images comes (2 in Inception features, 2 in pixels)"), "{line}");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("check/nearest.json")).unwrap(),
    )
    .unwrap();
    let flagged: Vec<(u64, u64)> = summary["flagged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["generated"].as_u64().unwrap(),
                f["nearest_in_pixels"]["index"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut flagged = flagged;
    flagged.sort();
    assert_eq!(flagged, [(0, 3), (1, 7)], "{summary}");
    // Rows of three images, nearest first: 6 rows of 16×16 with a 2-pixel border.
    let grid = image::open(dir.path().join("check/nearest.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (3 * 18 + 2, 6 * 18 + 2));
    // A folder of images needs its training images named.
    let out = ddpm(
        &["nearest", "--fake", "fake", "--held-out", "held"],
        dir.path(),
    );
    assert!(
        !out.status.success() && stderr(&out).contains("name the training images with --train"),
        "{}",
        stderr(&out)
    );
}
