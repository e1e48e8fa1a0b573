//! Inputs a careless or hostile user gives: each gets a clear error or a counted skip, never an
//! abort, a hang or memory without limit.
use std::path::Path;

mod common;
use common::{ddpm, ddpm_within, one_step_run, stderr};

/// A folder of 12 small colour images.
fn image_folder(dir: &Path) -> std::path::PathBuf {
    let images = dir.join("images");
    std::fs::create_dir(&images).unwrap();
    for i in 0..12u32 {
        image::RgbImage::from_fn(12, 10, |x, y| {
            image::Rgb([(x * 20 + i) as u8, (y * 25) as u8, 90])
        })
        .save(images.join(format!("{i:02}.png")))
        .unwrap();
    }
    images
}

const SMALL: &str = "[model]\nchannels = 16\nimage_size = 8\n[train]\nbatch = 4\ndevice = \"cpu\"\n[sample]\nnum = 4\nsteps = 2\n";

#[test]
fn a_huge_batch_is_refused_before_any_file_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for batch in ["1000000000", "100000"] {
        let out = ddpm(
            &[
                "train", "--preset", "tiny", "--batch", batch, "--device", "cpu", "--out", "run",
            ],
            dir.path(),
        );
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "--batch {batch}: {log}");
        assert!(
            log.contains("train.batch") && log.contains("GiB") && !log.contains("backtrace"),
            "--batch {batch}: {log}"
        );
        assert!(
            !dir.path().join("run").exists(),
            "--batch {batch}: a run folder was left"
        );
    }
}

#[test]
fn devices_fifos_and_oversized_files_in_a_data_folder_are_skipped_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let images = image_folder(dir.path());
    std::os::unix::fs::symlink("/dev/zero", images.join("03-zero.jpg")).unwrap();
    let fifo = std::ffi::CString::new(images.join("04-x.png").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo takes a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // A sparse file larger than any image file may be.
    let big = std::fs::File::create(images.join("05-big.png")).unwrap();
    big.set_len(ddpm::data::MAX_IMAGE_FILE_BYTES + 1).unwrap();
    std::fs::write(dir.path().join("small.toml"), SMALL).unwrap();
    for cache in ["on", "off"] {
        let out = ddpm_within(
            &[
                "train",
                "--config",
                "small.toml",
                "--data",
                "images",
                "--data-cache",
                cache,
                "--steps",
                "3",
                "--out",
                cache,
            ],
            dir.path(),
            300,
        );
        let log = stderr(&out);
        assert!(out.status.success(), "--data-cache {cache}: {log}");
        for name in ["03-zero.jpg", "04-x.png"] {
            assert!(
                log.contains(&format!("skipping {}", images.join(name).display()))
                    && log.contains("not a regular file"),
                "{name}, --data-cache {cache}: {log}"
            );
        }
        assert!(
            log.contains("more than the 512 MiB an image file may have"),
            "{log}"
        );
    }
}

#[test]
fn fid_checks_every_input_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    one_step_run(SMALL, "run", dir.path());
    // 10,000 samples by default: minutes on this CPU if they came before the checks.
    let out = ddpm_within(
        &["fid", "--fake", "run", "--real", "missing"],
        dir.path(),
        60,
    );
    let log = stderr(&out);
    assert!(!out.status.success() && log.contains("missing"), "{log}");
    assert!(!log.contains("sampl"), "sampled before refusing: {log}");
    // A real set of one image is refused before any Inception pass (which needs the network:
    // without it, that is what is refused first, also before sampling).
    let one = dir.path().join("one");
    std::fs::create_dir(&one).unwrap();
    image::GrayImage::new(8, 8).save(one.join("a.png")).unwrap();
    let out = ddpm_within(&["fid", "--fake", "run", "--real", "one"], dir.path(), 60);
    let log = stderr(&out);
    assert!(!out.status.success() && !log.contains("sampl"), "{log}");
    assert!(
        log.contains("1 image") || log.contains("Inception"),
        "{log}"
    );
}

#[test]
fn a_data_path_that_is_not_utf8_is_refused_naming_the_flag() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["train", "--data"])
        .arg(std::ffi::OsStr::from_bytes(b"im\xffges"))
        .args(["--out", "run"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(
        log.contains("--data im") && log.contains("not valid UTF-8"),
        "{log}"
    );
    assert!(!dir.path().join("run").exists());
}
