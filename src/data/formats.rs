//! The file formats: MNIST-style IDX, CIFAR-10/100 binaries, image files; and fitting one image
//! to the training size.
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::DynamicImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Crop;
use crate::config::{DataFormat, Split};

pub(super) static BUNDLED_IMAGES: &[u8] = include_bytes!("../../data/mnist5k-images-idx3-ubyte.gz");
pub(super) static BUNDLED_LABELS: &[u8] = include_bytes!("../../data/mnist5k-labels-idx1-ubyte.gz");

pub(super) const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "bmp", "gif"];

/// Channels and size of one image, stored CHW as u8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Shape {
    pub fn bytes(self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Same-sized planar (CHW) u8 images back to back, as IDX and CIFAR files hold them.
pub struct Records {
    pub pixels: Vec<u8>,
    pub shape: Shape,
}

impl Records {
    pub fn len(&self) -> usize {
        self.pixels.len() / self.shape.bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes record `index` at `shape` into `dst`.
    pub fn fit_into(&self, index: usize, shape: Shape, dst: &mut [u8]) {
        let n = self.shape.bytes();
        let planes = &self.pixels[index * n..(index + 1) * n];
        if shape == self.shape {
            dst.copy_from_slice(planes);
            return;
        }
        let (w, h) = (self.shape.width as u32, self.shape.height as u32);
        let image = if self.shape.channels == 1 {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, planes.to_vec()).unwrap())
        } else {
            let plane = n / 3;
            let rgb = (0..plane)
                .flat_map(|i| [planes[i], planes[plane + i], planes[2 * plane + i]])
                .collect();
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, rgb).unwrap())
        };
        fit(&image, shape, Crop::Centre, dst);
    }
}

pub fn detect_format(path: &Path) -> Result<DataFormat> {
    if !path.exists() {
        // A relative path (from a flag or a config file) is taken from the working directory.
        let from = match (path.is_relative(), std::env::current_dir()) {
            (true, Ok(cwd)) => format!(" (relative to the working directory {})", cwd.display()),
            _ => String::new(),
        };
        bail!("data path {} does not exist{from}", path.display());
    }
    if path.is_file() {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.contains("idx3-ubyte") {
            return Ok(DataFormat::Idx);
        }
        bail!("data path {} is a file whose name is not an IDX image file's (*idx3-ubyte or *idx3-ubyte.gz): give an image folder, a CIFAR-10/100 folder or an IDX file (data.format = \"idx\" reads an IDX file of another name)", path.display());
    }
    let has = |name: &str| path.join(name).exists();
    let has_idx = fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("idx3-ubyte"));
    let found: Vec<DataFormat> = [
        (
            has("data_batch_1.bin") || has("test_batch.bin"),
            DataFormat::Cifar10,
        ),
        (has("train.bin") || has("test.bin"), DataFormat::Cifar100),
        (has_idx, DataFormat::Idx),
    ]
    .into_iter()
    .filter_map(|(present, format)| present.then_some(format))
    .collect();
    match found[..] {
        [] => Ok(DataFormat::Folder),
        [format] => Ok(format),
        _ => {
            let names: Vec<String> = found.iter().map(crate::config::value_name).collect();
            bail!(
                "data folder {} holds the files of several datasets ({}): point at one dataset's own file or folder, or choose one with data.format",
                path.display(),
                names.join(", ")
            )
        }
    }
}

/// Resizes on the shorter side (Catmull-Rom filter) and cuts out `shape` (centred, or as `crop`
/// draws), converts to its channel count, and writes CHW u8 into `dst`.
pub fn fit(image: &DynamicImage, shape: Shape, crop: Crop, dst: &mut [u8]) {
    let (w, h) = (shape.width as u32, shape.height as u32);
    let resized;
    let image = match crop {
        _ if image.width() == w && image.height() == h => image,
        Crop::Centre => {
            resized = image.resize_to_fill(w, h, FilterType::CatmullRom);
            &resized
        }
        Crop::Random(seed) => {
            resized = random_crop(image, w, h, seed);
            &resized
        }
    };
    let plane = shape.height * shape.width;
    if shape.channels == 1 {
        dst.copy_from_slice(image.to_luma8().as_raw());
    } else {
        for (i, px) in image.to_rgb8().pixels().enumerate() {
            for c in 0..3 {
                dst[c * plane + i] = px[c];
            }
        }
    }
}

/// A `w`×`h` cut at a random place of `image` resized to cover it by a random factor of 1 to
/// 1.25 (scale jitter, as the ImageNet diffusion recipes' random crop does it).
fn random_crop(image: &DynamicImage, w: u32, h: u32, seed: u64) -> DynamicImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cover = (w as f64 / image.width() as f64).max(h as f64 / image.height() as f64);
    let scale = cover * rng.gen_range(1.0..=1.25);
    let (rw, rh) = (
        ((image.width() as f64 * scale).round() as u32).max(w),
        ((image.height() as f64 * scale).round() as u32).max(h),
    );
    let (x, y) = (rng.gen_range(0..=rw - w), rng.gen_range(0..=rh - h));
    image
        .resize_exact(rw, rh, FilterType::CatmullRom)
        .crop_imm(x, y, w, h)
}

pub fn gunzip(bytes: &[u8], name: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .with_context(|| format!("{} is not a valid gzip file", name.display()))?;
    Ok(out)
}

pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        gunzip(&bytes, path)
    } else {
        Ok(bytes)
    }
}

/// The IDX image files to read for `split`, told apart by MNIST's names: `train-…` for
/// training, `t10k-…` or `test-…` for test. `path` is a folder of them, or one file, which is
/// read as named (for the test split, its name must say test). In a folder, a lone file whose
/// name says no split is the training split.
pub fn idx_files(path: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let name_of = |p: &PathBuf| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let is_test = |p: &PathBuf| ["t10k", "test"].iter().any(|s| name_of(p).starts_with(s));
    let is_train = |p: &PathBuf| name_of(p).starts_with("train");
    if path.is_file() {
        let file = path.to_path_buf();
        let fits = match split {
            Split::Train => true,
            Split::Test => is_test(&file),
            Split::All => false,
        };
        if !fits {
            bail!(
                "{} is one IDX file, not the {split} split (t10k-… or test-… files are the test split): name the folder holding the split's files, or set data.split = \"train\"",
                path.display()
            );
        }
        return Ok(vec![file]);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| name_of(p).contains("idx3-ubyte"))
        .collect();
    files.sort();
    let train: Vec<PathBuf> = files.iter().filter(|p| is_train(p)).cloned().collect();
    let test: Vec<PathBuf> = files.iter().filter(|p| is_test(p)).cloned().collect();
    let chosen = match split {
        Split::Train if train.len() == 1 => train,
        Split::Train if files.len() == 1 && test.is_empty() => files.clone(),
        Split::Test if test.len() == 1 => test,
        Split::All if train.len() == 1 && test.len() == 1 => [train, test].concat(),
        _ if files.is_empty() => bail!(
            "{} holds no IDX image file (a name with idx3-ubyte, e.g. train-images-idx3-ubyte.gz)",
            path.display()
        ),
        _ => {
            let wanted = match split {
                Split::Train => "one train-… file",
                Split::Test => "one t10k-… or test-… file",
                Split::All => "one train-… and one t10k-… (or test-…) file",
            };
            bail!(
                "{} holds the IDX image files {}, and the {split} split needs {wanted}: name the file to train on as data.path",
                path.display(),
                files
                    .iter()
                    .map(name_of)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    Ok(chosen)
}

/// Parses an IDX3 unsigned-byte image file (magic 0x00000803, big-endian N, rows, cols).
pub fn parse_idx_images(mut bytes: Vec<u8>, name: &Path) -> Result<Records> {
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
    if rows == 0 || cols == 0 {
        bail!(
            "{}: IDX header says the images are {rows}×{cols}: an image needs at least one row and column",
            name.display()
        );
    }
    if expected != Some(bytes.len()) {
        bail!("{}: IDX header says {n} images of {rows}×{cols} ({} bytes expected), but the file has {} bytes", name.display(), expected.map_or("too many".into(), |e| e.to_string()), bytes.len());
    }
    bytes.drain(..16);
    Ok(Records {
        pixels: bytes,
        shape: Shape {
            channels: 1,
            height: rows,
            width: cols,
        },
    })
}

/// CIFAR-10 or CIFAR-100 (binary versions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    /// Records of 1 label byte + 3×32×32 pixels.
    Ten,
    /// Records of 2 label bytes (coarse, fine) + 3×32×32 pixels.
    Hundred,
}

pub const CIFAR_SHAPE: Shape = Shape {
    channels: 3,
    height: 32,
    width: 32,
};

impl Cifar {
    pub fn name(self) -> &'static str {
        match self {
            Cifar::Ten => "CIFAR-10",
            Cifar::Hundred => "CIFAR-100",
        }
    }

    pub(super) fn label_bytes(self) -> usize {
        match self {
            Cifar::Ten => 1,
            Cifar::Hundred => 2,
        }
    }
}

/// The batch files of `split` in `dir`, named and checked up front.
pub fn cifar_files(dir: &Path, variant: Cifar, split: Split) -> Result<Vec<PathBuf>> {
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
            "CIFAR folder {} lacks {} (the {split} split needs {})",
            dir.display(),
            missing.display(),
            names.join(", ")
        );
    }
    Ok(files)
}

/// Appends the pixels of a CIFAR binary batch (records of label byte(s) + 3×32×32 planes) to
/// `pixels`.
pub fn parse_cifar(bytes: &[u8], name: &Path, variant: Cifar, pixels: &mut Vec<u8>) -> Result<()> {
    let labels = variant.label_bytes();
    let record = labels + CIFAR_SHAPE.bytes();
    if bytes.is_empty() {
        bail!(
            "{} is empty: a {} file holds records of {record} bytes",
            name.display(),
            variant.name()
        );
    }
    if !bytes.len().is_multiple_of(record) {
        bail!("{}: {} bytes is not a whole number of {} records ({record} bytes each: {labels} label byte(s) + 3×32×32 pixels)", name.display(), bytes.len(), variant.name());
    }
    pixels.reserve(bytes.len() / record * CIFAR_SHAPE.bytes());
    for chunk in bytes.chunks_exact(record) {
        pixels.extend_from_slice(&chunk[labels..]);
    }
    Ok(())
}

/// Whether a path names an image file by its extension (what an image folder is read for).
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

/// Whether a folder's images are in colour, from the headers of its first few files (a set is
/// read as one, so a few decide; the first alone may be a grayscale one among colour photos).
pub fn any_colour(files: &[std::path::PathBuf]) -> bool {
    files.iter().take(16).any(|f| is_colour(f))
}

/// Whether an image file holds colour, read from its header (false when it cannot be read).
pub fn is_colour(path: &Path) -> bool {
    open_image(path)
        .ok()
        .and_then(|reader| reader.into_decoder().ok())
        .is_some_and(|decoder| image::ImageDecoder::color_type(&decoder).has_color())
}

/// Decodes an image file (the first frame of a GIF) and fits it to `shape` into `dst`.
pub fn decode_into(
    path: &Path,
    shape: Shape,
    crop: Crop,
    dst: &mut [u8],
) -> std::result::Result<(), String> {
    // Decoding from memory is a third faster than through a buffered file reader.
    check_image_file(path)?;
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let image = image::load_from_memory(&bytes).map_err(|e| e.to_string())?;
    fit(&image, shape, crop, dst);
    Ok(())
}

/// The largest image file read: no image comes near it, and a larger file (a misnamed archive
/// or disk image) would fill the memory before failing.
pub const MAX_IMAGE_FILE_BYTES: u64 = 512 << 20;

/// Opens an image file for decoding, with its format guessed from its first bytes.
pub fn open_image(
    path: &Path,
) -> std::result::Result<image::ImageReader<std::io::BufReader<fs::File>>, String> {
    check_image_file(path)?;
    image::ImageReader::open(path)
        .and_then(|reader| reader.with_guessed_format())
        .map_err(|e| e.to_string())
}

/// Refuses, before it is opened, what is not a regular file (a device such as /dev/zero reads
/// without end, a FIFO blocks the open until a writer comes) and a file larger than any image.
fn check_image_file(path: &Path) -> std::result::Result<(), String> {
    let metadata = fs::metadata(path).map_err(|e| e.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file (a device, FIFO or socket), so it is not read".into());
    }
    if metadata.len() > MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "{} bytes, more than the {} MiB an image file may have",
            metadata.len(),
            MAX_IMAGE_FILE_BYTES >> 20
        ));
    }
    Ok(())
}
