//! Data loading throughput on synthetic sets in the common shapes: CIFAR-10 binaries, a folder
//! of 32×32 PNGs, and 256×256 JPEGs (a folder trained at 64×64 and at 256×256, and tar shards at
//! 256×256). Each figure is one epoch through the loader's worker threads with flips and colour
//! jitter, from the start of loading. Then the walk of a folder of 200,000 small files, first
//! walked and then from its kept index. Run with `cargo bench --bench data_loading`.
use std::path::Path;

use ddpm::config::{DataCache, DataFormat, ImageSize};
use ddpm::data::{worker_count, LoadOptions, LoaderOptions, Shard};

/// A photo-like test image: smooth colour gradients with a little noise.
fn picture(seed: u32, width: u32, height: u32) -> image::RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 24) as f32
    };
    let (fx, fy) = (1.0 + (seed % 7) as f32, 1.0 + (seed % 5) as f32);
    image::RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
        let wave = ((u * fx + v * fy) * std::f32::consts::PI).sin() * 60.0;
        image::Rgb([
            (100.0 + 80.0 * u + wave + noise()) as u8,
            (90.0 + 100.0 * v - wave + noise()) as u8,
            (120.0 + 50.0 * (u - v) + noise()) as u8,
        ])
    })
}

fn write_cifar(dir: &Path, per_file: u32) {
    for file in 1..=5u32 {
        let mut bytes = Vec::with_capacity(per_file as usize * 3073);
        for i in 0..per_file {
            let image = picture(file * per_file + i, 32, 32);
            bytes.push((i % 10) as u8);
            for c in 0..3 {
                bytes.extend(image.pixels().map(|p| p[c]));
            }
        }
        std::fs::write(dir.join(format!("data_batch_{file}.bin")), bytes).unwrap();
    }
}

fn write_folder(dir: &Path, count: u32, size: u32, extension: &str) {
    for i in 0..count {
        let class = dir.join(format!("class{}", i % 10));
        std::fs::create_dir_all(&class).unwrap();
        picture(i, size, size)
            .save(class.join(format!("{i:06}.{extension}")))
            .unwrap();
    }
}

/// One epoch of `path` through the loader; with `step_seconds` > 0 each batch is held that long
/// as a training step would, and the time the steps waited for data is reported.
fn measure(
    what: &str,
    path: &Path,
    format: DataFormat,
    size: i64,
    threshold: f64,
    step_seconds: f64,
    augment: bool,
) {
    let workers = worker_count(0);
    let options = LoadOptions {
        cache: DataCache::Off,
        workers,
        ..LoadOptions::at(format, 3, ImageSize::Square(size))
    };
    let loader = LoaderOptions {
        batch: 128,
        seed: 0,
        workers,
        prefetch: 4,
        shard: Shard::WHOLE,
    };
    let jitter = if augment { 0.1 } else { 0.0 };
    let r = ddpm::bench::data(Some(path), &options, loader, augment, jitter, step_seconds).unwrap();
    if step_seconds > 0.0 {
        let steps = r.images / loader.batch;
        println!(
            "RESULT bench=data-wait set={what} steps={steps} step_ms={:.1} wait_ms_first_step={:.2} wait_ms_per_later_step={:.3}",
            step_seconds * 1e3,
            (r.wait_seconds - r.wait_after_first_seconds) * 1e3,
            r.wait_after_first_seconds * 1e3 / (steps - 1) as f64
        );
        return;
    }
    println!(
        "RESULT bench=data set={what} images={} workers={workers} cpu_augmentation={augment} load_s={:.2} img_per_s={:.0} target_img_per_s={threshold:.0} {}",
        r.images,
        r.load_seconds,
        r.images_per_second,
        if r.images_per_second >= threshold { "met" } else { "MISSED" }
    );
}

/// Lists a folder of 200,000 files in 1,000 class folders: walked, then from the kept index.
fn measure_folder_scan(root: &Path) {
    let (dir, store) = (root.join("many"), root.join("index"));
    for class in 0..1000 {
        let folder = dir.join(format!("n{class:08}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..200 {
            std::fs::File::create(folder.join(format!("{i:04}.jpg"))).unwrap();
        }
    }
    // Folder times must settle before an index of them is kept.
    std::thread::sleep(std::time::Duration::from_secs(3));
    // With DDPM_BENCH_DROP_CACHES=1 (root), each listing starts from a cold page cache too.
    let drop_caches = std::env::var("DDPM_BENCH_DROP_CACHES").is_ok_and(|v| v == "1");
    let timed = || {
        if drop_caches {
            std::process::Command::new("sync").status().unwrap();
            std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache");
        }
        let start = std::time::Instant::now();
        let files = ddpm::data::image_files_kept_in(&dir, Some(&store), 10_000).unwrap();
        (files.len(), start.elapsed().as_secs_f64())
    };
    let (files, walked) = timed();
    let (_, kept) = timed();
    println!(
        "RESULT bench=folder-scan files={files} folders=1000 cold_page_cache={drop_caches} walk_s={walked:.3} kept_index_s={kept:.3} threads={}",
        worker_count(0)
    );
}

fn main() {
    let root = tempfile::tempdir().unwrap();
    let (cifar, png, jpeg) = (
        root.path().join("cifar"),
        root.path().join("png32"),
        root.path().join("jpeg256"),
    );
    for dir in [&cifar, &png, &jpeg] {
        std::fs::create_dir(dir).unwrap();
    }
    write_cifar(&cifar, 10_000);
    write_folder(&png, 10_000, 32, "png");
    write_folder(&jpeg, 2_000, 256, "jpg");
    let (samples, _) = ddpm::data::shuffled_folder(&jpeg, 0).unwrap();
    let shards = root.path().join("shards");
    ddpm::data::write_shards(&samples, &shards, "train", 500).unwrap();
    // 800 images/s per core at 256×256 keeps a 256×256 model fed from 16 cores. Flips and
    // jitter run on the GPU there, so the loader's decoding is measured without them.
    let per_core_256 = 800.0 * worker_count(0) as f64;
    // The cifar10 preset trains at about 3,000 images/s on a GPU: batches of 128 every 42.7 ms.
    let step = 128.0 / 3000.0;
    use DataFormat::{Cifar10, Folder, Shards};
    // (set, where, format, size, target img/s, step s, flips and jitter on the CPU)
    #[rustfmt::skip]
    let cases = [
        ("cifar10-binary-32", &cifar, Cifar10, 32, 50_000.0, 0.0, true),
        ("png-folder-32", &png, Folder, 32, 5_000.0, 0.0, true),
        ("jpeg-folder-256", &jpeg, Folder, 256, per_core_256, 0.0, false),
        ("jpeg-shards-256", &shards, Shards, 256, per_core_256, 0.0, false),
        ("jpeg-folder-256-to-64", &jpeg, Folder, 64, 500.0, 0.0, true),
        ("cifar10-binary-32", &cifar, Cifar10, 32, 0.0, step, true),
        ("png-folder-32", &png, Folder, 32, 0.0, step, true),
    ];
    for (what, path, format, size, target, step_seconds, augment) in cases {
        measure(what, path, format, size, target, step_seconds, augment);
    }
    measure_folder_scan(root.path());
}
