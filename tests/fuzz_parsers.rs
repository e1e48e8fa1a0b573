//! Property-based fuzzing of every parser that reads user files: IDX, CIFAR, image folders,
//! the TOML configuration and checkpoint sidecars/weights. None may panic on any input; bad
//! input must come back as an error. Raise the case count with PROPTEST_CASES=N.
use std::path::Path;

use ddpm::checkpoint::{from_safetensors, read_sidecar};
use ddpm::config::{DataCache, DataFormat, ImageSize, RunConfig};
use ddpm::data::{load, parse_cifar, parse_idx_images, LoadOptions};
use proptest::prelude::*;

/// PROPTEST_CASES if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn idx_header(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    [0x0803u32, n, rows, cols]
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(512), ..ProptestConfig::default() })]

    #[test]
    fn idx_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_idx_images(bytes, Path::new("fuzz.idx"));
    }

    #[test]
    fn idx_parser_checks_sizes(n in 0u32..5, rows in 0u32..40, cols in 0u32..40, extra in -3i64..3) {
        let mut bytes = idx_header(n, rows, cols);
        let expected = (n * rows * cols) as i64;
        let body = (expected + extra).max(0);
        bytes.extend(std::iter::repeat_n(7u8, body as usize));
        let parsed = parse_idx_images(bytes, Path::new("fuzz.idx"));
        prop_assert_eq!(parsed.is_ok(), body == expected && rows > 0 && cols > 0);
        if let Ok(images) = parsed {
            prop_assert_eq!(images.len(), n as usize);
        }
    }

    #[test]
    fn idx_header_with_huge_dimensions_is_an_error(n in any::<u32>(), rows in any::<u32>(), cols in any::<u32>()) {
        let bytes = idx_header(n, rows, cols);
        let parsed = parse_idx_images(bytes, Path::new("fuzz.idx"));
        prop_assert!(parsed.is_err() || n == 0 || rows == 0 || cols == 0);
    }

    #[test]
    fn cifar_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..8000)) {
        let mut pixels = Vec::new();
        let parsed = parse_cifar(&bytes, Path::new("fuzz.bin"), ddpm::data::Cifar::Ten, &mut pixels);
        prop_assert_eq!(parsed.is_ok(), !bytes.is_empty() && bytes.len() % 3073 == 0);
        prop_assert_eq!(pixels.len(), if parsed.is_ok() { bytes.len() / 3073 * 3072 } else { 0 });
    }

    #[test]
    fn config_parser_never_panics(text in "\\PC{0,200}") {
        let _ = RunConfig::from_toml_str(&text, None).map(|c| c.validate());
    }

    #[test]
    fn config_values_of_any_type_are_rejected_or_validated(
        section in prop::sample::select(vec!["model", "diffusion", "train", "data", "sample", "checkpoint"]),
        key in prop::sample::select(vec!["channels", "timesteps", "lr", "batch", "steps", "every", "keep", "eta", "dropout", "ema_decay", "image_size", "path", "hflip", "nonsense"]),
        value in prop::sample::select(vec!["0", "-1", "1e309", "\"x\"", "[1, 2]", "true", "0.5", "99999999999999999999", "nan", "inf", "{ a = 1 }"]),
    ) {
        let text = format!("[{section}]\n{key} = {value}\n");
        if let Ok(config) = RunConfig::from_toml_str(&text, None) {
            let _ = config.validate();
        }
    }

    #[test]
    fn sidecar_and_weights_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let dir = tempfile::tempdir().unwrap();
        let sidecar = dir.path().join("step-00000001.json");
        std::fs::write(&sidecar, &bytes).unwrap();
        prop_assert!(read_sidecar(&sidecar).is_err() || serde_json::from_slice::<serde_json::Value>(&bytes).is_ok());
        let _ = from_safetensors(&bytes, Path::new("fuzz.safetensors"));
    }

    #[test]
    fn weights_with_a_valid_header_but_wrong_lengths_are_errors(len in 0usize..64, claimed in 0usize..64) {
        let header = format!("{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{claimed}],\"data_offsets\":[0,{}]}}}}", len * 4);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, len * 4));
        let parsed = from_safetensors(&bytes, Path::new("fuzz.safetensors"));
        prop_assert_eq!(parsed.is_ok(), len == claimed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// Random bytes (and truncated real images) under image extensions are skipped, never fatal.
    #[test]
    fn image_folder_loader_skips_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..200) {
        let dir = tempfile::tempdir().unwrap();
        let image = image::RgbImage::from_pixel(6, 6, image::Rgb([10, 20, 30]));
        image.save(dir.path().join("good.png")).unwrap();
        let png = std::fs::read(dir.path().join("good.png")).unwrap();
        std::fs::write(dir.path().join("cut.png"), &png[..cut.min(png.len() - 1)]).unwrap();
        for ext in ["png", "jpg", "webp", "bmp", "gif"] {
            std::fs::write(dir.path().join(format!("garbage.{ext}")), &garbage).unwrap();
        }
        let options = LoadOptions { cache: DataCache::On, workers: 2, ..LoadOptions::at(DataFormat::Folder, 3, ImageSize::Square(4)) };
        let dataset = load(Some(dir.path()), &options).unwrap();
        // Every file keeps its place (an unreadable one shows the next readable image).
        prop_assert_eq!(dataset.len(), 7);
        prop_assert!(dataset.skipped() <= 6);
        // Decoded on demand instead: the same files are skipped, none fatal.
        let streamed = load(Some(dir.path()), &LoadOptions { cache: DataCache::Off, ..options }).unwrap();
        prop_assert!(streamed.all().unwrap().equal(&dataset.all().unwrap()));
        prop_assert_eq!(streamed.skipped(), dataset.skipped());
    }
}
