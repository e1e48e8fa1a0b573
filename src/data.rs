//! Datasets (the bundled MNIST subset, image folders, CIFAR-10/100 binaries, MNIST-style IDX
//! files), decoded once into a u8 tensor [N, C, H, W] at the training size; the seeded,
//! resumable batch order; and on-device augmentation.
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::DynamicImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{DataFormat, ImageSize, Split};

static BUNDLED_IMAGES: &[u8] = include_bytes!("../data/mnist5k-images-idx3-ubyte.gz");

const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "bmp", "gif"];

/// Decoded training images, u8 in [0, 255], NCHW, all at the training size.
pub struct Dataset {
    pub images: Tensor,
    /// What was loaded, for logs.
    pub description: String,
    /// Unreadable files skipped while loading.
    pub skipped: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.images.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the training loop needs from the data options.
pub struct LoadOptions {
    pub format: DataFormat,
    pub channels: i64,
    pub size: ImageSize,
    /// Stop at the first unreadable image instead of skipping it.
    pub strict: bool,
    /// For CIFAR binaries.
    pub split: Split,
}

/// Loads `path` (None: the bundled set) into memory at the requested channels and size.
pub fn load(path: Option<&Path>, options: &LoadOptions) -> Result<Dataset> {
    let format = match (path, options.format) {
        (None, _) | (_, DataFormat::Bundled) => DataFormat::Bundled,
        (Some(p), DataFormat::Auto) => detect_format(p)?,
        (_, format) => format,
    };
    let (raw, description, skipped) = match format {
        DataFormat::Bundled => {
            let raw = parse_idx_images(
                &gunzip(BUNDLED_IMAGES, Path::new("bundled MNIST"))?,
                Path::new("bundled MNIST"),
            )?;
            (raw, "bundled MNIST subset (5,000 digits)".to_string(), 0)
        }
        DataFormat::Idx => {
            let file = idx_file(path.unwrap())?;
            let raw = parse_idx_images(&read_maybe_gz(&file)?, &file)?;
            (raw, format!("IDX images {}", file.display()), 0)
        }
        DataFormat::Cifar10 | DataFormat::Cifar100 => {
            let dir = path.unwrap();
            let variant = if format == DataFormat::Cifar10 {
                Cifar::Ten
            } else {
                Cifar::Hundred
            };
            let mut raw = RawImages::default();
            for file in cifar_files(dir, variant, options.split)? {
                raw.images.extend(
                    parse_cifar(
                        &fs::read(&file)
                            .with_context(|| format!("cannot read {}", file.display()))?,
                        &file,
                        variant,
                    )?
                    .images,
                );
            }
            (
                raw,
                format!(
                    "{} binaries ({:?} split) in {}",
                    variant.name(),
                    options.split,
                    dir.display()
                ),
                0,
            )
        }
        DataFormat::Folder => {
            let dir = path.unwrap();
            let (raw, skipped) = load_folder(dir, options.strict)?;
            (raw, format!("image folder {}", dir.display()), skipped)
        }
        DataFormat::Auto => unreachable!("resolved above"),
    };
    if raw.is_empty() {
        bail!("the dataset {description} holds no images");
    }
    let images = raw.to_tensor(options.channels, options.size);
    Ok(Dataset {
        images,
        description,
        skipped,
    })
}

fn detect_format(path: &Path) -> Result<DataFormat> {
    if !path.exists() {
        bail!("data path {} does not exist", path.display());
    }
    if path.is_file() {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.contains("idx3-ubyte") {
            return Ok(DataFormat::Idx);
        }
        bail!("data path {} is a file but not an IDX image file (*idx3-ubyte or *idx3-ubyte.gz); give a folder, CIFAR-10 folder or IDX file", path.display());
    }
    if path.join("data_batch_1.bin").exists() || path.join("test_batch.bin").exists() {
        return Ok(DataFormat::Cifar10);
    }
    if path.join("train.bin").exists() || path.join("test.bin").exists() {
        return Ok(DataFormat::Cifar100);
    }
    if fs::read_dir(path)?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("idx3-ubyte"))
    {
        return Ok(DataFormat::Idx);
    }
    Ok(DataFormat::Folder)
}

/// Decoded images of possibly different sizes and channel counts, before resizing.
#[derive(Default)]
pub struct RawImages {
    images: Vec<DynamicImage>,
}

impl RawImages {
    fn push(&mut self, image: DynamicImage) {
        self.images.push(image);
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Resizes each image on its shorter side and centre-crops it (Catmull-Rom filter), then
    /// converts to the requested channel count, into one u8 tensor.
    pub fn to_tensor(&self, channels: i64, size: ImageSize) -> Tensor {
        let (h, w) = (size.height() as u32, size.width() as u32);
        let per_image = (channels as u32 * h * w) as usize;
        let mut out = vec![0u8; per_image * self.images.len()];
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = self.images.len().div_ceil(workers).max(1);
        std::thread::scope(|scope| {
            for (images, dst) in self
                .images
                .chunks(chunk)
                .zip(out.chunks_mut(chunk * per_image))
            {
                scope.spawn(move || {
                    for (image, dst) in images.iter().zip(dst.chunks_mut(per_image)) {
                        fit(image, channels, h, w, dst);
                    }
                });
            }
        });
        Tensor::from_slice(&out).view([self.images.len() as i64, channels, h as i64, w as i64])
    }
}

/// Writes one image as CHW u8 at (h, w) with `channels` channels into `dst`.
fn fit(image: &DynamicImage, channels: i64, h: u32, w: u32, dst: &mut [u8]) {
    let resized;
    let image = if image.width() == w && image.height() == h {
        image
    } else {
        resized = image.resize_to_fill(w, h, FilterType::CatmullRom);
        &resized
    };
    let plane = (h * w) as usize;
    if channels == 1 {
        dst.copy_from_slice(image.to_luma8().as_raw());
    } else {
        for (i, px) in image.to_rgb8().pixels().enumerate() {
            for c in 0..3 {
                dst[c * plane + i] = px[c];
            }
        }
    }
}

fn gunzip(bytes: &[u8], name: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .with_context(|| format!("{} is not a valid gzip file", name.display()))?;
    Ok(out)
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        gunzip(&bytes, path)
    } else {
        Ok(bytes)
    }
}

/// The IDX image file to read: `path` itself, or the one `*idx3-ubyte*` file in a folder
/// (the training file when both MNIST splits are there).
fn idx_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let mut files: Vec<PathBuf> = fs::read_dir(path)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .contains("idx3-ubyte")
        })
        .collect();
    files.sort();
    let train: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .starts_with("train")
        })
        .collect();
    match (train.as_slice(), files.as_slice()) {
        ([one], _) => Ok((*one).clone()),
        (_, [one]) => Ok(one.clone()),
        _ => bail!(
            "{} holds several IDX image files ({}); name one with --data",
            path.display(),
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Parses an IDX3 unsigned-byte image file (magic 0x00000803, big-endian N, rows, cols).
pub fn parse_idx_images(bytes: &[u8], name: &Path) -> Result<RawImages> {
    if bytes.len() < 16 {
        bail!(
            "{}: IDX file too short ({} bytes; the header alone is 16)",
            name.display(),
            bytes.len()
        );
    }
    let word = |i: usize| u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
    if word(0) != 0x0803 {
        bail!("{}: IDX magic number is {:#010x}, expected 0x00000803 (unsigned-byte images with 3 dimensions)", name.display(), word(0));
    }
    let (n, rows, cols) = (word(1) as usize, word(2) as usize, word(3) as usize);
    let expected = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .and_then(|v| v.checked_add(16));
    if expected != Some(bytes.len()) || rows == 0 || cols == 0 {
        bail!("{}: IDX header says {n} images of {rows}×{cols} ({} bytes expected), but the file has {} bytes", name.display(), expected.map_or("too many".into(), |e| e.to_string()), bytes.len());
    }
    let mut raw = RawImages::default();
    for pixels in bytes[16..].chunks_exact(rows * cols) {
        raw.push(DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(cols as u32, rows as u32, pixels.to_vec()).unwrap(),
        ));
    }
    Ok(raw)
}

/// CIFAR-10 or CIFAR-100 (binary versions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    /// Records of 1 label byte + 3×32×32 pixels.
    Ten,
    /// Records of 2 label bytes (coarse, fine) + 3×32×32 pixels.
    Hundred,
}

impl Cifar {
    fn name(self) -> &'static str {
        match self {
            Cifar::Ten => "CIFAR-10",
            Cifar::Hundred => "CIFAR-100",
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Cifar::Ten => 1,
            Cifar::Hundred => 2,
        }
    }
}

/// The batch files of `split` in `dir`, named and checked up front.
fn cifar_files(dir: &Path, variant: Cifar, split: Split) -> Result<Vec<PathBuf>> {
    let (train, test): (Vec<String>, Vec<String>) = match variant {
        Cifar::Ten => (
            (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            vec!["test_batch.bin".into()],
        ),
        Cifar::Hundred => (vec!["train.bin".into()], vec!["test.bin".into()]),
    };
    let names = match split {
        Split::Train => train,
        Split::Test => test,
        Split::All => train.into_iter().chain(test).collect(),
    };
    let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        bail!(
            "CIFAR folder {} lacks {} (the {split:?} split needs {})",
            dir.display(),
            missing.display(),
            names.join(", ")
        );
    }
    Ok(files)
}

/// Parses a CIFAR binary batch: records of label byte(s) + 3072 bytes of 32×32 RGB planes.
pub fn parse_cifar(bytes: &[u8], name: &Path, variant: Cifar) -> Result<RawImages> {
    let labels = variant.label_bytes();
    let record = labels + 3 * 32 * 32;
    if bytes.is_empty() || bytes.len() % record != 0 {
        bail!("{}: {} bytes is not a whole number of {} records ({record} bytes each: {labels} label byte(s) + 3×32×32 pixels)", name.display(), bytes.len(), variant.name());
    }
    let mut raw = RawImages::default();
    for chunk in bytes.chunks_exact(record) {
        let planes = &chunk[labels..];
        let rgb: Vec<u8> = (0..1024)
            .flat_map(|i| [planes[i], planes[1024 + i], planes[2048 + i]])
            .collect();
        raw.push(DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(32, 32, rgb).unwrap(),
        ));
    }
    Ok(raw)
}

/// Every image file under `dir`, recursively, in sorted order.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| {
                IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str())
            }) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Decodes every image under `dir` (first frame of a GIF); unreadable files are reported by
/// path and skipped, or stop the load when `strict`.
fn load_folder(dir: &Path, strict: bool) -> Result<(RawImages, usize)> {
    let files = image_files(dir)?;
    if files.is_empty() {
        bail!(
            "image folder {} holds no PNG, JPEG, WebP, BMP or GIF files",
            dir.display()
        );
    }
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = files.len().div_ceil(workers);
    let decoded: Vec<Result<DynamicImage, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|f| decode(f)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("decoder thread"))
            .collect()
    });
    let mut raw = RawImages::default();
    let mut skipped = 0;
    for (file, result) in files.iter().zip(decoded) {
        match result {
            Ok(image) => raw.push(image),
            Err(why) if strict => bail!("cannot decode {}: {why}", file.display()),
            Err(why) => {
                eprintln!("warning: skipping {}: {why}", file.display());
                skipped += 1;
            }
        }
    }
    if skipped > 0 {
        eprintln!(
            "warning: skipped {skipped} unreadable file(s) of {} in {}",
            files.len(),
            dir.display()
        );
    }
    Ok((raw, skipped))
}

fn decode(path: &Path) -> std::result::Result<DynamicImage, String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    reader.decode().map_err(|e| e.to_string())
}

/// The position in the seeded epoch order: which epoch, and how many of its images are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub index: usize,
}

/// Draws batches in a shuffled order that depends only on the seed and the epoch, so a run
/// resumed from a `Position` continues the same order.
#[derive(Clone)]
pub struct Sampler {
    len: usize,
    seed: u64,
    position: Position,
    order: Vec<usize>,
}

impl Sampler {
    pub fn new(len: usize, seed: u64, position: Position) -> Self {
        let order = epoch_order(len, seed, position.epoch);
        Sampler {
            len,
            seed,
            position,
            order,
        }
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// The next `batch` indices; a batch that runs past the epoch's end continues in the next.
    pub fn next_indices(&mut self, batch: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if self.position.index == self.len {
                self.position = Position {
                    epoch: self.position.epoch + 1,
                    index: 0,
                };
                self.order = epoch_order(self.len, self.seed, self.position.epoch);
            }
            out.push(self.order[self.position.index] as i64);
            self.position.index += 1;
        }
        out
    }
}

fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(crate::rng::mix(
        seed,
        &[0xDA7A, epoch],
    )));
    order
}

/// u8 images → f32 in [−1, 1] on `device`.
pub fn to_model_space(images: &Tensor, device: Device) -> Tensor {
    images.to_device(device).to_kind(Kind::Float) / 127.5 - 1.0
}

/// Random horizontal flips and (when `jitter` > 0) brightness, contrast and saturation jitter
/// of up to ±`jitter`, drawn from libtorch's generator. x: [B, C, H, W] in [−1, 1].
pub fn augment(x: &Tensor, hflip: bool, jitter: f64) -> Tensor {
    let b = x.size()[0];
    let opts = (Kind::Float, x.device());
    let mut x = x.shallow_clone();
    if hflip {
        let flip = Tensor::rand([b, 1, 1, 1], opts).lt(0.5);
        x = x.flip([3]).where_self(&flip, &x);
    }
    if jitter > 0.0 {
        let factor = |t: Tensor| t * (2.0 * jitter) + (1.0 - jitter); // U(1 − j, 1 + j)
        let brightness = Tensor::rand([b, 1, 1, 1], opts) * (2.0 * jitter) - jitter;
        x = x + brightness;
        let mean = x.mean_dim(&[1i64, 2, 3][..], true, Kind::Float);
        x = (&x - &mean) * factor(Tensor::rand([b, 1, 1, 1], opts)) + &mean;
        if x.size()[1] == 3 {
            let gray = x.mean_dim(&[1i64][..], true, Kind::Float);
            x = (&x - &gray) * factor(Tensor::rand([b, 1, 1, 1], opts)) + &gray;
        }
        x = x.clamp(-1.0, 1.0);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(channels: i64, size: i64) -> LoadOptions {
        LoadOptions {
            format: DataFormat::Auto,
            channels,
            size: ImageSize::Square(size),
            strict: false,
            split: Split::Train,
        }
    }

    fn idx_bytes(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [0x0803u32, n, rows, cols] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        b.extend_from_slice(pixels);
        b
    }

    #[test]
    fn idx_pixels_survive_raw_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 4 * 4).map(|i| (i * 7) as u8).collect();
        let bytes = idx_bytes(2, 4, 4, &pixels);
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &bytes).unwrap();
        let gz = dir.path().join("gz");
        std::fs::create_dir(&gz).unwrap();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &bytes).unwrap();
        std::fs::write(gz.join("t10k-images-idx3-ubyte.gz"), enc.finish().unwrap()).unwrap();
        for path in [
            dir.path().join("train-images-idx3-ubyte"),
            gz.clone(),
            dir.path().to_path_buf(),
        ] {
            let d = load(Some(&path), &options(1, 4)).unwrap();
            assert_eq!(d.images.size(), vec![2, 1, 4, 4]);
            assert_eq!(
                Vec::<u8>::try_from(d.images.flatten(0, -1)).unwrap(),
                pixels,
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn idx_errors_name_file_and_expectation() {
        let dir = tempfile::tempdir().unwrap();
        let bad_magic = dir.path().join("a-idx3-ubyte");
        let mut b = idx_bytes(1, 2, 2, &[0; 4]);
        b[3] = 0x01;
        std::fs::write(&bad_magic, &b).unwrap();
        let e = format!(
            "{:#}",
            load(Some(&bad_magic), &options(1, 2)).err().unwrap()
        );
        assert!(
            e.contains("a-idx3-ubyte") && e.contains("0x00000803"),
            "{e}"
        );
        let short = dir.path().join("b-idx3-ubyte");
        std::fs::write(&short, &idx_bytes(3, 2, 2, &[0; 4])).unwrap();
        let e = format!("{:#}", load(Some(&short), &options(1, 2)).err().unwrap());
        assert!(
            e.contains("b-idx3-ubyte") && e.contains("28 bytes expected"),
            "{e}"
        );
        std::fs::write(&short, b"xx").unwrap();
        assert!(
            format!("{:#}", load(Some(&short), &options(1, 2)).err().unwrap())
                .contains("too short")
        );
    }

    #[test]
    fn cifar_records_decode_to_the_written_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = Vec::new();
        for i in 1..=5u8 {
            let mut record = vec![i]; // label
            let planes: Vec<u8> = (0..3072).map(|p| (p as u8).wrapping_mul(i)).collect();
            record.extend_from_slice(&planes);
            expected.extend_from_slice(&planes);
            std::fs::write(dir.path().join(format!("data_batch_{i}.bin")), &record).unwrap();
        }
        let d = load(Some(dir.path()), &options(3, 32)).unwrap();
        assert_eq!(d.images.size(), vec![5, 3, 32, 32]);
        assert_eq!(
            Vec::<u8>::try_from(d.images.flatten(0, -1)).unwrap(),
            expected
        );
        // The test split is missing: named.
        let test = LoadOptions {
            split: Split::Test,
            ..options(3, 32)
        };
        assert!(
            format!("{:#}", load(Some(dir.path()), &test).err().unwrap())
                .contains("test_batch.bin")
        );
        std::fs::write(dir.path().join("test_batch.bin"), vec![9u8; 3073 * 2]).unwrap();
        assert_eq!(load(Some(dir.path()), &test).unwrap().len(), 2);
        assert_eq!(
            load(
                Some(dir.path()),
                &LoadOptions {
                    split: Split::All,
                    ..options(3, 32)
                }
            )
            .unwrap()
            .len(),
            7
        );
        std::fs::write(dir.path().join("data_batch_3.bin"), vec![0u8; 3000]).unwrap();
        let e = format!(
            "{:#}",
            load(Some(dir.path()), &options(3, 32)).err().unwrap()
        );
        assert!(e.contains("data_batch_3.bin") && e.contains("3073"), "{e}");
    }

    #[test]
    fn cifar100_records_skip_both_label_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![3u8, 42];
        let planes: Vec<u8> = (0..3072).map(|p| (p % 251) as u8).collect();
        bytes.extend_from_slice(&planes);
        std::fs::write(dir.path().join("train.bin"), &bytes).unwrap();
        let d = load(Some(dir.path()), &options(3, 32)).unwrap();
        assert!(d.description.contains("CIFAR-100"), "{}", d.description);
        assert_eq!(
            Vec::<u8>::try_from(d.images.flatten(0, -1)).unwrap(),
            planes
        );
    }

    #[test]
    fn folder_decodes_png_and_jpeg_and_skips_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("class_a");
        std::fs::create_dir(&sub).unwrap();
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 30) as u8, (y * 30) as u8, 200])
        });
        img.save(sub.join("a.png")).unwrap();
        img.save(dir.path().join("b.jpg")).unwrap();
        std::fs::write(
            dir.path().join("corrupt.png"),
            b"\x89PNG\r\n\x1a\nnot really",
        )
        .unwrap();
        std::fs::write(dir.path().join("empty.jpg"), b"").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let d = load(Some(dir.path()), &options(3, 8)).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.skipped, 2);
        // The PNG is lossless: its pixels come back exactly (files are read in sorted order).
        let a = d.images.get(1);
        assert_eq!(a.int64_value(&[0, 0, 3]), 90);
        assert_eq!(a.int64_value(&[1, 5, 0]), 150);
        assert_eq!(a.int64_value(&[2, 7, 7]), 200);
        // Grayscale and resizing with a centre crop.
        let g = load(Some(dir.path()), &options(1, 4)).unwrap();
        assert_eq!(g.images.size(), vec![2, 1, 4, 4]);
        // Strict mode stops at the first bad file and names it.
        let strict = LoadOptions {
            strict: true,
            ..options(3, 8)
        };
        let e = format!("{:#}", load(Some(dir.path()), &strict).err().unwrap());
        assert!(e.contains("corrupt.png") || e.contains("empty.jpg"), "{e}");
    }

    #[test]
    fn empty_folder_and_missing_path_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            load(Some(dir.path()), &options(3, 8)).err().unwrap()
        );
        assert!(e.contains("holds no"), "{e}");
        let e = format!(
            "{:#}",
            load(Some(&dir.path().join("nope")), &options(3, 8))
                .err()
                .unwrap()
        );
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn bundled_set_loads_and_resizes() {
        let d = load(None, &options(1, 28)).unwrap();
        assert_eq!(d.images.size(), vec![5000, 1, 28, 28]);
        let rgb = load(
            None,
            &LoadOptions {
                format: DataFormat::Bundled,
                ..options(3, 32)
            },
        )
        .unwrap();
        assert_eq!(rgb.images.size(), vec![5000, 3, 32, 32]);
    }

    #[test]
    fn order_is_seeded_and_resumes_mid_epoch() {
        let mut a = Sampler::new(10, 42, Position::default());
        let first: Vec<i64> = (0..5).flat_map(|_| a.next_indices(3)).collect();
        let mut sorted = first[..10].to_vec();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..10).collect::<Vec<i64>>(),
            "an epoch visits every image once"
        );
        let mut b = Sampler::new(10, 42, Position::default());
        b.next_indices(3);
        b.next_indices(3);
        let mut resumed = Sampler::new(10, 42, b.position());
        assert_eq!(resumed.next_indices(9), first[6..15].to_vec());
        assert_ne!(
            Sampler::new(10, 43, Position::default()).next_indices(10),
            first[..10].to_vec()
        );
    }

    #[test]
    fn augmentation_keeps_shape_and_range() {
        tch::manual_seed(0);
        let x = Tensor::rand([16, 3, 8, 8], (Kind::Float, Device::Cpu)) * 2 - 1;
        let flipped = augment(&x, true, 0.0);
        assert_eq!(flipped.size(), x.size());
        // Each image is either itself or its mirror image, and some of each occur.
        let mut flips = 0;
        for i in 0..16 {
            let (xi, yi) = (x.get(i), flipped.get(i));
            if yi.equal(&xi.flip([2])) {
                flips += 1;
            } else {
                assert!(yi.equal(&xi));
            }
        }
        assert!(flips > 0 && flips < 16, "{flips}");
        let jittered = augment(&x, false, 0.1);
        assert_eq!(jittered.size(), x.size());
        assert!(
            jittered.max().double_value(&[]) <= 1.0 && jittered.min().double_value(&[]) >= -1.0
        );
        let change = (&jittered - &x).abs().mean(Kind::Float).double_value(&[]);
        assert!(change > 0.0 && change < 0.2, "{change}");
    }
}
