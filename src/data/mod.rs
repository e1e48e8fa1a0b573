//! Training images: the sources (the bundled MNIST subset, image folders, CIFAR-10/100
//! binaries, MNIST-style IDX files), the optional in-memory cache of decoded images, the seeded
//! resumable batch order, the threaded prefetching loader, and on-device augmentation.
mod classes;
mod folder_index;
mod formats;
mod loader;
mod shards;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{
    CifarLabel, ClassCount, CropMode, DataCache, DataFormat, ImageSize, RunConfig, Split,
};
pub use classes::{parse_idx_labels, shown_names, Classes, Labelling, Unlabelled};
pub use folder_index::{image_files, image_files_kept_in};
pub use formats::{
    any_colour, fit, is_image_file, open_image, parse_cifar, parse_idx_images, Cifar, Records,
    Shape, MAX_IMAGE_FILE_BYTES,
};
pub use loader::{Loader, LoaderOptions, Shard};
pub use shards::{expand_braces, shard_paths, write_shards, ShardSet, Streams, CLASS_NAMES};

/// What to load and how.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub format: DataFormat,
    pub channels: i64,
    pub size: ImageSize,
    /// Stop at the first unreadable image instead of skipping it.
    pub strict: bool,
    /// For CIFAR binaries.
    pub split: Split,
    /// Whether image files are decoded once into memory or at every epoch.
    pub cache: DataCache,
    /// Threads for decoding; 0: one per core.
    pub workers: usize,
    /// Which CIFAR-100 label is the class.
    pub cifar100_labels: CifarLabel,
    /// Where the training square is cut from images read as files or from shards.
    pub crop: CropMode,
    /// Samples in each process's shuffle buffer when reading shards.
    pub shuffle_buffer: usize,
}

impl LoadOptions {
    /// The options of a training run.
    pub fn of(config: &RunConfig, strict: bool) -> Self {
        LoadOptions {
            format: config.data.format,
            channels: config.model.in_channels,
            size: config.model.image_size,
            strict,
            split: config.data.split,
            cache: config.data.cache,
            workers: config.data.workers,
            cifar100_labels: config.data.cifar100_labels,
            crop: config.data.crop,
            shuffle_buffer: config.data.shuffle_buffer,
        }
    }

    /// Reading `format` at `channels` and `size`, the rest as a run's defaults.
    pub fn at(format: DataFormat, channels: i64, size: ImageSize) -> Self {
        LoadOptions {
            format,
            channels,
            size,
            strict: false,
            split: Split::Train,
            cache: DataCache::Auto,
            workers: 0,
            cifar100_labels: CifarLabel::default(),
            crop: CropMode::Center,
            shuffle_buffer: 1,
        }
    }

    fn shape(&self) -> Shape {
        Shape {
            channels: self.channels as usize,
            height: self.size.height() as usize,
            width: self.size.width() as usize,
        }
    }
}

/// `configured` threads, or one per core when 0.
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A training set: u8 images at the training size, decoded in memory or read from files on
/// demand.
pub struct Dataset {
    images: Images,
    shape: Shape,
    /// What was loaded, for logs.
    pub description: String,
    strict: bool,
    /// Files that could not be decoded, by index (when read on demand) ...
    unreadable: Mutex<BTreeSet<usize>>,
    /// ... and how many were dropped while decoding into memory.
    skipped_at_load: usize,
    labelling: Labelling,
    crop: CropMode,
    shuffle_buffer: usize,
}

/// Where the training square is cut from an image resized to cover it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crop {
    Centre,
    /// With scale jitter at a random place, drawn from this seed.
    Random(u64),
}

/// The order of an epoch's images.
#[derive(Clone, Debug)]
pub enum Order {
    /// A seeded permutation of the dataset's images.
    Shuffled(usize),
    /// Shards read as streams, split across processes.
    Streams { images: usize, streams: Streams },
}

impl Order {
    /// The images of the dataset ordered.
    fn images(&self) -> usize {
        match self {
            Order::Shuffled(images) | Order::Streams { images, .. } => *images,
        }
    }

    fn epoch(&self, seed: u64, epoch: u64) -> Vec<usize> {
        match self {
            Order::Shuffled(len) => {
                let mut order: Vec<usize> = (0..*len).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(crate::rng::mix(
                    seed,
                    &[0xDA7A, epoch],
                )));
                order
            }
            Order::Streams { streams, .. } => streams.epoch(seed, epoch),
        }
    }
}

/// Images [B, C, H, W] (u8, CPU) with their class ids [B] (i64, CPU) when the data has classes.
pub struct Examples {
    pub images: Tensor,
    pub labels: Option<Tensor>,
}

enum Images {
    /// N images of `shape`, back to back, CHW.
    Decoded(Vec<u8>),
    /// Image files decoded when a batch needs them.
    Files(Vec<PathBuf>),
    /// Samples of tar shards decoded when a batch needs them.
    Shards(ShardSet),
}

impl Images {
    /// Decodes image `i` of a set read on demand into `dst`.
    fn decode(
        &self,
        i: usize,
        shape: Shape,
        crop: Crop,
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        match self {
            Images::Decoded(_) => unreachable!("decoded images are copied, not decoded"),
            Images::Files(files) => formats::decode_into(&files[i], shape, crop, dst),
            Images::Shards(set) => set.decode_into(i, shape, crop, dst),
        }
    }

    /// Image `i`, as a warning names it.
    fn describe(&self, i: usize) -> String {
        match self {
            Images::Decoded(_) => format!("image {i}"),
            Images::Files(files) => files[i].display().to_string(),
            Images::Shards(set) => set.describe(i),
        }
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        match &self.images {
            Images::Decoded(pixels) => pixels.len() / self.shape.bytes(),
            Images::Files(files) => files.len(),
            Images::Shards(set) => set.len(),
        }
    }

    /// The order of epochs read `batch` images at a time (a global batch) by `world`
    /// processes.
    pub fn order(&self, batch: usize, world: usize) -> Result<Order> {
        Ok(match &self.images {
            Images::Shards(set) => Order::Streams {
                images: set.len(),
                streams: set.streams(batch, world, self.shuffle_buffer)?,
            },
            _ => Order::Shuffled(self.len()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Whether the decoded images are held in memory.
    pub fn is_cached(&self) -> bool {
        matches!(self.images, Images::Decoded(_))
    }

    /// Unreadable files met so far (skipped at load or while reading batches).
    pub fn skipped(&self) -> usize {
        self.skipped_at_load + self.unreadable.lock().unwrap().len()
    }

    /// The data's classes, or why it has none.
    pub fn labelling(&self) -> &Labelling {
        &self.labelling
    }

    /// Keeps the labels a model of `requested` classes is trained on, and returns the names
    /// of its classes (none: unconditional). `auto` takes the data's classes, or none where the
    /// data has no labels (said in a note); a number needs labels below it. Labels the model
    /// does not use are dropped, so batches carry none.
    pub fn condition_on(&mut self, requested: ClassCount) -> Result<Vec<String>> {
        let key = "model.num_classes";
        let labelling = std::mem::replace(
            &mut self.labelling,
            classes::unlabelled(format!("{key} = 0")),
        );
        let classes = match (requested, labelling) {
            (ClassCount::Count(0), _) => return Ok(Vec::new()),
            (
                ClassCount::Auto,
                Err(Unlabelled {
                    why,
                    ambiguous: false,
                }),
            ) => {
                tracing::info!("note: {key} = auto: {why}, so the model is unconditional");
                return Ok(Vec::new());
            }
            (_, Err(Unlabelled { why, .. })) => {
                bail!("{key} = {requested} trains on labelled images, and {why}")
            }
            (_, Ok(classes)) => classes,
        };
        let count = match requested {
            ClassCount::Count(n) => n,
            ClassCount::Auto => classes.count(),
        };
        if let Some(&label) = classes
            .labels
            .iter()
            .max()
            .filter(|&&l| l as usize >= count)
        {
            bail!(
                "{} has labels up to {label} ({} classes: {}), more than {key} = {count}",
                self.description,
                classes.count(),
                shown_names(&classes.names)
            );
        }
        let names = (0..count)
            .map(|i| {
                classes
                    .names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| i.to_string())
            })
            .collect();
        self.labelling = Ok(classes);
        Ok(names)
    }

    /// Images `indices` with their labels (the labels of the images that took the places of
    /// unreadable ones); random crops (`data.crop = random`) are drawn from `draw`.
    pub fn examples(&self, indices: &[i64], draw: u64) -> Result<Examples> {
        let (images, read) = self.read(indices, Some(draw))?;
        let labels = self.labelling.as_ref().ok().map(|classes| {
            Tensor::from_slice(
                &read
                    .iter()
                    .map(|&i| classes.labels[i])
                    .collect::<Vec<i64>>(),
            )
        });
        Ok(Examples { images, labels })
    }

    /// Images `indices` as u8 [B, C, H, W] on the CPU.
    pub fn batch(&self, indices: &[i64]) -> Result<Tensor> {
        Ok(self.read(indices, None)?.0)
    }

    /// Images `indices`, and the index of the image read for each; centre crops without
    /// `draw`.
    fn read(&self, indices: &[i64], draw: Option<u64>) -> Result<(Tensor, Vec<usize>)> {
        let n = self.shape.bytes();
        // An allocation that fails is an error in words, not an abort.
        let bytes = n.saturating_mul(indices.len());
        let mut out = Vec::new();
        out.try_reserve_exact(bytes).map_err(|_| {
            anyhow::anyhow!(
                "cannot allocate {bytes} bytes for a batch of {} images: lower train.batch",
                indices.len()
            )
        })?;
        out.resize(bytes, 0);
        let read = indices
            .iter()
            .zip(out.chunks_mut(n))
            .enumerate()
            .map(|(row, (&index, dst))| {
                let crop = match (self.crop, draw) {
                    (CropMode::Random, Some(draw)) => {
                        Crop::Random(crate::rng::mix(draw, &[row as u64]))
                    }
                    _ => Crop::Centre,
                };
                self.read_into(index as usize, crop, dst)
            })
            .collect::<Result<Vec<usize>>>()?;
        Ok((self.to_tensor(&out), read))
    }

    /// Every image, as u8 [N, C, H, W] on the CPU.
    pub fn all(&self) -> Result<Tensor> {
        match &self.images {
            Images::Decoded(pixels) => Ok(self.to_tensor(pixels)),
            _ => self.batch(&(0..self.len() as i64).collect::<Vec<_>>()),
        }
    }

    fn to_tensor(&self, pixels: &[u8]) -> Tensor {
        let s = self.shape;
        Tensor::from_slice(pixels).view([
            (pixels.len() / s.bytes()) as i64,
            s.channels as i64,
            s.height as i64,
            s.width as i64,
        ])
    }

    /// Writes image `index` into `dst` and returns the index of the image written. An
    /// unreadable file is reported once and replaced by the next readable one (so the order
    /// stays a function of the seed), or is an error when strict.
    fn read_into(&self, index: usize, crop: Crop, dst: &mut [u8]) -> Result<usize> {
        if let Images::Decoded(pixels) = &self.images {
            dst.copy_from_slice(&pixels[index * dst.len()..(index + 1) * dst.len()]);
            return Ok(index);
        }
        let count = self.len();
        for i in (index..count).chain(0..index) {
            if self.unreadable.lock().unwrap().contains(&i) {
                continue;
            }
            match self.images.decode(i, self.shape, crop, dst) {
                Ok(()) => return Ok(i),
                Err(why) if self.strict => {
                    bail!(
                        "cannot decode {}: {why} (reading strictly: an unreadable image is an error)",
                        self.images.describe(i)
                    )
                }
                Err(why) => {
                    if self.unreadable.lock().unwrap().insert(i) {
                        tracing::warn!("skipping {}: {why}", self.images.describe(i));
                    }
                }
            }
        }
        bail!("none of the {count} images could be decoded")
    }
}

/// Loads `path` (None: the bundled set) at the requested channels and size: record formats and
/// cached folders are decoded into memory now, other folders when batches are read.
pub fn load(path: Option<&Path>, options: &LoadOptions) -> Result<Dataset> {
    let format = resolve_format(path, options)?;
    match (format, path) {
        (DataFormat::Bundled, _) => {
            let name = Path::new("bundled MNIST");
            let records =
                formats::parse_idx_images(formats::gunzip(formats::BUNDLED_IMAGES, name)?, name)?;
            let classes = classes::bundled()?;
            from_records(
                records,
                "the bundled MNIST digits".into(),
                Ok(classes),
                options,
            )
        }
        (DataFormat::Idx, Some(path)) => {
            let (records, description, labelling) = read_idx(path, options.split)?;
            from_records(records, description, labelling, options)
        }
        (DataFormat::Cifar10 | DataFormat::Cifar100, Some(dir)) => {
            let variant = match format {
                DataFormat::Cifar10 => Cifar::Ten,
                _ => Cifar::Hundred,
            };
            let (records, description, classes) =
                read_cifar(dir, variant, options.split, options.cifar100_labels)?;
            from_records(records, description, Ok(classes), options)
        }
        (DataFormat::Folder, Some(dir)) => load_folder(dir, options),
        (DataFormat::Shards, Some(spec)) => load_shards(spec, options),
        _ => unreachable!("resolve_format gives a path to every format but the bundled one"),
    }
}

/// The format to read: the one asked for, or the one the files found tell.
fn resolve_format(path: Option<&Path>, options: &LoadOptions) -> Result<DataFormat> {
    let format = match (path, options.format) {
        (None, DataFormat::Auto | DataFormat::Bundled) => DataFormat::Bundled,
        (None, format) => bail!(
            "data.format = \"{}\" needs data.path; for the bundled digits, data.format = \"bundled\"",
            crate::config::value_name(&format)
        ),
        (Some(p), DataFormat::Bundled) => bail!(
            "data.format = \"bundled\" trains on the bundled digits and would ignore data.path ({}): drop one of the two",
            p.display()
        ),
        (Some(p), DataFormat::Auto) if p.to_str().is_some_and(shards::names_shards) => {
            DataFormat::Shards
        }
        (Some(p), DataFormat::Auto) => formats::detect_format(p)?,
        (_, format) => format,
    };
    let read_as_files = matches!(format, DataFormat::Folder | DataFormat::Shards);
    if options.crop == CropMode::Random && !read_as_files {
        bail!(
            "data.crop = random cuts from image files and shards; {} is decoded once at the training size",
            path.map_or("the bundled set".into(), |p| p.display().to_string())
        );
    }
    if options.split != Split::Train && (read_as_files || format == DataFormat::Bundled) {
        bail!(
            "data.split = {} applies to CIFAR binaries and MNIST IDX files; {} has no split",
            options.split,
            path.map_or("the bundled set".into(), |p| p.display().to_string())
        );
    }
    Ok(format)
}

impl Dataset {
    fn new(
        images: Images,
        description: String,
        labelling: Labelling,
        options: &LoadOptions,
        skipped: usize,
    ) -> Self {
        Dataset {
            images,
            shape: options.shape(),
            description,
            strict: options.strict,
            unreadable: Mutex::default(),
            skipped_at_load: skipped,
            labelling,
            crop: options.crop,
            shuffle_buffer: options.shuffle_buffer,
        }
    }
}

/// A dataset of decoded records, fitted to the requested shape.
fn from_records(
    records: Records,
    description: String,
    labelling: Labelling,
    options: &LoadOptions,
) -> Result<Dataset> {
    let shape = options.shape();
    if records.pixels.is_empty() {
        bail!("the dataset {description} holds no images");
    }
    if records.shape.channels == 3 && shape.channels == 1 {
        note_grayscale(&description);
    }
    let pixels = if records.shape == shape {
        records.pixels
    } else {
        check_fits_in_memory(records.len(), shape, &description)?;
        let workers = worker_count(options.workers);
        decode_all(records.len(), shape, workers, |i, dst| {
            records.fit_into(i, shape, dst);
            Ok(())
        })
        .0
    };
    Ok(Dataset::new(
        Images::Decoded(pixels),
        description,
        labelling,
        options,
        0,
    ))
}

/// The images of a file or folder of IDX files (one split), all of one size, and their labels.
fn read_idx(path: &Path, split: Split) -> Result<(Records, String, Labelling)> {
    let files = formats::idx_files(path, split)?;
    let mut all: Option<Records> = None;
    let mut counts = Vec::new();
    for file in &files {
        let part = formats::parse_idx_images(formats::read_maybe_gz(file)?, file)?;
        counts.push(part.len());
        match &mut all {
            None => all = Some(part),
            Some(all) if all.shape == part.shape => all.pixels.extend(part.pixels),
            Some(all) => bail!(
                "{} holds {}×{} images, unlike the {}×{} of {}",
                file.display(),
                part.shape.height,
                part.shape.width,
                all.shape.height,
                all.shape.width,
                files[0].display()
            ),
        }
    }
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Ok((
        all.expect("idx_files names at least one file"),
        format!("IDX images {}", names.join(" + ")),
        classes::read_idx(&files, &counts)?,
    ))
}

/// The images of a folder of CIFAR binaries (one split), and their classes.
fn read_cifar(
    dir: &Path,
    variant: Cifar,
    split: Split,
    which: CifarLabel,
) -> Result<(Records, String, Classes)> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for file in formats::cifar_files(dir, variant, split)? {
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        formats::parse_cifar(&bytes, &file, variant, &mut pixels)?;
        labels.extend(classes::cifar_labels(&bytes, &file, variant, which)?);
    }
    let description = format!(
        "{} binaries ({split} split) in {}",
        variant.name(),
        dir.display()
    );
    let shape = formats::CIFAR_SHAPE;
    let classes = classes::cifar_classes(dir, variant, which, labels);
    Ok((Records { pixels, shape }, description, classes))
}

/// A folder of images: decoded now when cached, else as batches are read. Unreadable files are
/// skipped with a warning (their places show others), or stop the load when strict.
fn load_folder(dir: &Path, options: &LoadOptions) -> Result<Dataset> {
    let shape = options.shape();
    let files = image_files(dir)?;
    let description = format!("image folder {}", dir.display());
    if shape.channels == 1 && formats::any_colour(&files) {
        note_grayscale(&description);
    }
    let labelling = classes::folder_classes(dir, &files);
    if !should_cache(options, files.len())? {
        return Ok(Dataset::new(
            Images::Files(files),
            description,
            labelling,
            options,
            0,
        ));
    }
    check_fits_in_memory(files.len(), shape, &description)?;
    let workers = worker_count(options.workers);
    let (pixels, failed) = decode_all(files.len(), shape, workers, |i, dst| {
        formats::decode_into(&files[i], shape, Crop::Centre, dst)
    });
    if let Some((i, why)) = failed.first().filter(|_| options.strict) {
        bail!(
            "cannot decode {}: {why} (reading strictly: an unreadable image is an error)",
            files[*i].display()
        );
    }
    for (i, why) in &failed {
        tracing::warn!("skipping {}: {why}", files[*i].display());
    }
    if failed.len() == files.len() {
        bail!(
            "none of the {} image files in {} could be decoded",
            files.len(),
            dir.display()
        );
    }
    if !failed.is_empty() {
        tracing::warn!(
            "skipped {} unreadable file(s) of {} in {}",
            failed.len(),
            files.len(),
            dir.display()
        );
    }
    let substitutes = substitutes(files.len(), &failed);
    let pixels = substitute_failed(pixels, shape.bytes(), &substitutes);
    let labelling = labelling.map(|classes| classes.substituted(&substitutes));
    Ok(Dataset::new(
        Images::Decoded(pixels),
        description,
        labelling,
        options,
        failed.len(),
    ))
}

fn note_grayscale(description: &str) {
    // Said the same way to training and to FID (whose fake images set the channels).
    tracing::info!("note: {description} is in colour and is read in grayscale, at the model's 1 channel (a model with model.in_channels = 3 keeps the colour)");
}

/// Whether `count` images are decoded once into memory.
fn should_cache(options: &LoadOptions, count: usize) -> Result<bool> {
    let random_crop = options.crop == CropMode::Random;
    Ok(match options.cache {
        DataCache::On if random_crop => bail!(
            "data.cache = on keeps images decoded once, and data.crop = random cuts them anew at every epoch: set data.cache = auto or off"
        ),
        DataCache::On => true,
        DataCache::Off => false,
        DataCache::Auto if random_crop => false,
        DataCache::Auto => {
            // Unknown memory: a cache of up to 4 GiB, which most machines hold.
            let memory = crate::device::available_host_memory().unwrap_or(8 << 30);
            (count * options.shape().bytes()) as u64
                <= memory / 2 / crate::device::local_processes()
        }
    })
}

/// Indexed WebDataset shards, decoded as batches are read. Class names come from a
/// `classes.txt` beside the first shard (line i names class i), as `ddpm shards` writes it.
fn load_shards(spec: &Path, options: &LoadOptions) -> Result<Dataset> {
    let text = spec
        .to_str()
        .with_context(|| format!("the shard path {} is not UTF-8", spec.display()))?;
    let set = ShardSet::index(shards::shard_paths(text)?, options.strict)?;
    let labelling = match set.labels() {
        Ok(labels) => {
            let mut classes = Classes::numbered(labels);
            let named = set
                .class_names()
                .filter(|names| names.len() >= classes.count());
            classes.names = named.unwrap_or(classes.names);
            Ok(classes)
        }
        Err(why) => classes::unlabelled(why),
    };
    let description = format!(
        "{} WebDataset shard(s) {}",
        set.shard_count(),
        spec.display()
    );
    let skipped = set.skipped;
    Ok(Dataset::new(
        Images::Shards(set),
        description,
        labelling,
        options,
        skipped,
    ))
}

/// An image folder's files, with their classes when it has one subfolder per class, in a
/// seeded shuffled order; and the classes' names. What `ddpm shards` writes.
pub fn shuffled_folder(
    dir: &Path,
    seed: u64,
) -> Result<(Vec<(PathBuf, Option<i64>)>, Vec<String>)> {
    let files = image_files(dir)?;
    let (labels, names) = match classes::folder_classes(dir, &files) {
        Ok(classes) => (
            classes.labels.into_iter().map(Some).collect(),
            classes.names,
        ),
        Err(Unlabelled {
            why,
            ambiguous: true,
        }) => bail!(why),
        Err(_) => (vec![None; files.len()], Vec::new()),
    };
    let mut samples: Vec<(PathBuf, Option<i64>)> = files.into_iter().zip(labels).collect();
    samples.shuffle(&mut ChaCha8Rng::seed_from_u64(crate::rng::mix(
        seed,
        &[0x5A4D],
    )));
    Ok((samples, names))
}

/// Fails, before allocating, when `count` decoded images of `shape` would not fit in the
/// available memory.
fn check_fits_in_memory(count: usize, shape: Shape, description: &str) -> Result<()> {
    let needed = count as u64 * shape.bytes() as u64;
    let Some(available) = crate::device::available_host_memory()
        .map(|bytes| bytes / crate::device::local_processes())
    else {
        return Ok(());
    };
    if needed > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        bail!(
            "{count} images of {description} at {}×{}×{} take {:.1} GiB in memory, more than the {:.1} GiB available: lower model.image_size",
            shape.channels,
            shape.height,
            shape.width,
            gib(needed),
            gib(available)
        );
    }
    Ok(())
}

/// Fills `count` images of `shape` with `read` on `workers` threads; returns the pixels and the
/// images that failed, with why, in index order.
fn decode_all(
    count: usize,
    shape: Shape,
    workers: usize,
    read: impl Fn(usize, &mut [u8]) -> std::result::Result<(), String> + Sync,
) -> (Vec<u8>, Vec<(usize, String)>) {
    let n = shape.bytes();
    let mut pixels = vec![0u8; n * count];
    let chunk = count.div_ceil(workers).max(1);
    let read = &read;
    let failed = std::thread::scope(|scope| {
        let handles: Vec<_> = pixels
            .chunks_mut(chunk * n)
            .enumerate()
            .map(|(part, dst)| {
                scope.spawn(move || {
                    let first = part * chunk;
                    dst.chunks_mut(n)
                        .enumerate()
                        .filter_map(|(j, image)| {
                            read(first + j, image).err().map(|why| (first + j, why))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("decoder thread"))
            .collect()
    });
    (pixels, failed)
}

/// (failed image, the next readable one that takes its place), as reading on demand does: a
/// folder has as many images (and the same order) whether it is cached or not.
fn substitutes(count: usize, failed: &[(usize, String)]) -> Vec<(usize, usize)> {
    let bad: BTreeSet<usize> = failed.iter().map(|(i, _)| *i).collect();
    bad.iter()
        .map(|&i| {
            let good = (i + 1..count)
                .chain(0..i)
                .find(|j| !bad.contains(j))
                .expect("at least one image decoded");
            (i, good)
        })
        .collect()
}

/// `pixels` (images of `n` bytes) with each failed image replaced by its substitute.
fn substitute_failed(mut pixels: Vec<u8>, n: usize, substitutes: &[(usize, usize)]) -> Vec<u8> {
    for &(i, good) in substitutes {
        pixels.copy_within(good * n..(good + 1) * n, i * n);
    }
    pixels
}

/// The position in the seeded epoch order: which epoch, and how many of its images are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub index: usize,
    /// The size of the dataset the order is of: a resume on data of another size continues in
    /// another order. None in checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<usize>,
}

/// Draws batches in an order that depends only on the seed and the epoch, so a run resumed
/// from a `Position` continues the same order.
#[derive(Clone)]
pub struct Sampler {
    plan: Order,
    seed: u64,
    position: Position,
    order: Vec<usize>,
}

impl Sampler {
    /// Continues from `position`; one past the end of a (smaller) epoch starts the next one.
    pub fn new(plan: Order, seed: u64, mut position: Position) -> Self {
        let order = plan.epoch(seed, position.epoch);
        position.index = position.index.min(order.len());
        position.images = Some(plan.images());
        Sampler {
            plan,
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
            if self.position.index == self.order.len() {
                self.position = Position {
                    epoch: self.position.epoch + 1,
                    index: 0,
                    images: Some(self.plan.images()),
                };
                self.order = self.plan.epoch(self.seed, self.position.epoch);
            }
            out.push(self.order[self.position.index] as i64);
            self.position.index += 1;
        }
        out
    }
}

/// u8 images → f32 in [−1, 1] on `device`.
pub fn to_model_space(images: &Tensor, device: Device) -> Tensor {
    let mut x = to_device_queued(images, device).to_kind(Kind::Float);
    let _ = x.g_mul_scalar_(1.0 / 127.5).g_sub_scalar_(1.0);
    x
}

/// Images in [−1, 1] → u8 on the CPU, rounded: how samples are written as PNGs (and scored, so
/// that a checkpoint scores as the folder of its samples would).
pub fn from_model_space(images: &Tensor) -> Tensor {
    ((images.to_device(Device::Cpu).to_kind(Kind::Float) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
}

/// `tensor` on `device`. To a CUDA device through page-locked memory, so that the copy is queued
/// behind the work already queued instead of waiting for it: a plain copy from pageable memory
/// synchronises the stream, which left the device idle while each training step was queued.
fn to_device_queued(tensor: &Tensor, device: Device) -> Tensor {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Set once pinning has failed: it is not tried again, and the note is said once.
    static UNPINNED: AtomicBool = AtomicBool::new(false);
    if !device.is_cuda() || UNPINNED.load(Ordering::Relaxed) {
        return tensor.to_device(device);
    }
    match crate::ops::pinned(tensor) {
        Ok(pinned) => pinned.to_device_(device, pinned.kind(), true, false),
        Err(error) => {
            if !UNPINNED.swap(true, Ordering::Relaxed) {
                tracing::info!("note: batches go to the device without page-locked memory, each copy waiting for the device: {error:#}");
            }
            tensor.to_device(device)
        }
    }
}

/// Random horizontal flips and (when `jitter` > 0) brightness, contrast and saturation jitter
/// of up to ±`jitter`, drawn from libtorch's generator. x: [B, C, H, W] in [−1, 1].
pub fn augment(x: &Tensor, hflip: bool, jitter: f64) -> Tensor {
    augment_share(x, hflip, jitter, Shard::WHOLE)
}

/// `augment` for this shard's rows of a global batch: the random values are drawn for the whole
/// global batch and the shard's rows used, so every image is augmented as in one process.
pub fn augment_share(x: &Tensor, hflip: bool, jitter: f64, shard: Shard) -> Tensor {
    let b = x.size()[0];
    let opts = (Kind::Float, x.device());
    let per_image = || {
        Tensor::rand([b * shard.world as i64, 1, 1, 1], opts).narrow(0, b * shard.rank as i64, b)
    };
    let mut x = x.shallow_clone();
    if hflip {
        // lerp with a 0/1 weight returns either end exactly, and is cheaper than `where`.
        let flip = per_image().lt(0.5).to_kind(Kind::Float);
        x = x.lerp_tensor(&x.flip([3]), &flip);
    }
    if jitter > 0.0 {
        // Brightness: + β; contrast: c·(· − image mean) + image mean; saturation:
        // s·(· − pixel gray) + pixel gray, in that order. Composed, they are one affine map
        //   s·c·x + c·(1 − s)·gray(x) + (1 − c)·mean(x + β) + c·β
        // so the image is read twice and written once instead of once per operation.
        let factor = |t: Tensor| t * (2.0 * jitter) + (1.0 - jitter); // U(1 − j, 1 + j)
        let brightness = per_image() * (2.0 * jitter) - jitter;
        let contrast = factor(per_image());
        let image_mean = |t: &Tensor| t.mean_dim(&[1i64, 2, 3][..], true, Kind::Float);
        let offset = |mean: Tensor| -> Tensor {
            let kept: Tensor = 1.0 - &contrast;
            kept * (mean + &brightness) + &contrast * &brightness
        };
        let mut out: Tensor = if x.size()[1] == 3 {
            let saturation = factor(per_image());
            let gray = x.mean_dim(&[1i64][..], true, Kind::Float);
            let per_pixel: Tensor =
                &gray * (&contrast * (1.0 - &saturation)) + offset(image_mean(&gray));
            per_pixel.addcmul(&x, &(&saturation * &contrast))
        } else {
            offset(image_mean(&x)).addcmul(&x, &contrast)
        };
        x = out.clamp_(-1.0, 1.0);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Needs a CUDA device (tools/gpu-check.sh runs the ignored tests there).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn images_reach_a_cuda_device_as_on_the_cpu_whatever_their_source_does_next() {
        assert!(tch::Cuda::is_available(), "no CUDA device");
        let device = Device::Cuda(0);
        // Queued behind a long computation, so that the first copy has not run when the source
        // changes and the next batch goes through page-locked memory (which must not be the
        // first one's buffer while its copy waits).
        let busy = Tensor::randn([4096, 4096], (Kind::Float, device));
        let _ = busy.matmul(&busy).matmul(&busy).matmul(&busy);
        let shape = [64, 3, 32, 32];
        let mut first = Tensor::randint(256, shape, (Kind::Uint8, Device::Cpu));
        let second = Tensor::randint(256, shape, (Kind::Uint8, Device::Cpu));
        let expected = [first.copy(), second.copy()].map(|x| to_model_space(&x, Device::Cpu));
        let on_device = [&first, &second].map(|x| to_model_space(x, device));
        let _ = first.fill_(0);
        for (got, want) in on_device.iter().zip(&expected) {
            assert!(got.to_device(Device::Cpu).equal(want));
        }
    }

    fn options(channels: i64, size: i64) -> LoadOptions {
        LoadOptions {
            workers: 2,
            ..LoadOptions::at(DataFormat::Auto, channels, ImageSize::Square(size))
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
        // A lone file whose name says no split is the training split.
        std::fs::write(gz.join("images-idx3-ubyte.gz"), enc.finish().unwrap()).unwrap();
        for path in [
            dir.path().join("train-images-idx3-ubyte"),
            gz.clone(),
            dir.path().to_path_buf(),
        ] {
            let d = load(Some(&path), &options(1, 4)).unwrap();
            assert_eq!(d.all().unwrap().size(), vec![2, 1, 4, 4]);
            assert_eq!(
                Vec::<u8>::try_from(d.all().unwrap().flatten(0, -1)).unwrap(),
                pixels,
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn idx_folder_splits_follow_mnist_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(&train, idx_bytes(2, 4, 4, &[10; 32])).unwrap();
        let split = |split| LoadOptions {
            split,
            ..options(1, 4)
        };
        let error = |path: &Path, options: &LoadOptions| {
            format!("{:#}", load(Some(path), options).err().unwrap())
        };
        // Only the training file: the test split names what it lacks.
        let e = error(dir.path(), &split(Split::Test));
        assert!(
            e.contains("t10k-") && e.contains("train-images-idx3-ubyte"),
            "{e}"
        );
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx_bytes(3, 4, 4, &[200; 48]),
        )
        .unwrap();
        let mean_of = |split_| {
            let d = load(Some(dir.path()), &split(split_)).unwrap();
            let all = d.all().unwrap();
            (
                all.size()[0],
                all.to_kind(tch::Kind::Float).mean(None).double_value(&[]),
            )
        };
        assert_eq!(mean_of(Split::Train), (2, 10.0));
        assert_eq!(mean_of(Split::Test), (3, 200.0));
        assert_eq!(mean_of(Split::All), (5, (2.0 * 10.0 + 3.0 * 200.0) / 5.0));
        // A named file is read as named; a split its name contradicts is refused, not ignored.
        let test_file = dir.path().join("t10k-images-idx3-ubyte");
        assert_eq!(load(Some(&train), &split(Split::Train)).unwrap().len(), 2);
        assert_eq!(
            load(Some(&test_file), &split(Split::Test)).unwrap().len(),
            3
        );
        let e = error(&train, &split(Split::Test));
        assert!(e.contains("not the test split"), "{e}");
        let e = error(&test_file, &split(Split::All));
        assert!(e.contains("not the all split"), "{e}");
        // A folder holding only the test file has no training split.
        let only_test = tempfile::tempdir().unwrap();
        std::fs::copy(&test_file, only_test.path().join("t10k-images-idx3-ubyte")).unwrap();
        let e = error(only_test.path(), &split(Split::Train));
        assert!(e.contains("the train split needs one train-"), "{e}");
        assert_eq!(
            load(Some(only_test.path()), &split(Split::Test))
                .unwrap()
                .len(),
            3
        );
        // Splits of images of different sizes do not mix.
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx_bytes(1, 2, 2, &[0; 4]),
        )
        .unwrap();
        let e = error(dir.path(), &split(Split::All));
        assert!(
            e.contains("t10k-images-idx3-ubyte") && e.contains("2×2"),
            "{e}"
        );
    }

    #[test]
    fn a_folder_holding_two_datasets_is_not_guessed_between() {
        let dir = tempfile::tempdir().unwrap();
        let idx = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(&idx, idx_bytes(2, 2, 2, &[7; 8])).unwrap();
        // One CIFAR-10 record: a label byte and 3×32×32 pixels.
        std::fs::write(dir.path().join("data_batch_1.bin"), vec![1; 1 + 3072]).unwrap();
        let e = format!(
            "{:#}",
            load(Some(dir.path()), &options(1, 2)).err().unwrap()
        );
        assert!(
            e.contains("cifar10, idx") && e.contains("data.format"),
            "{e}"
        );
        let idx_only = LoadOptions {
            format: DataFormat::Idx,
            ..options(1, 2)
        };
        assert_eq!(load(Some(dir.path()), &idx_only).unwrap().len(), 2);
    }

    #[test]
    fn settings_that_would_be_ignored_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::new(4, 4)
            .save(dir.path().join("a.png"))
            .unwrap();
        let test_split = LoadOptions {
            split: Split::Test,
            ..options(1, 4)
        };
        let e = format!("{:#}", load(None, &test_split).err().unwrap());
        assert!(
            e.contains("data.split = test") && e.contains("bundled"),
            "{e}"
        );
        let e = format!("{:#}", load(Some(dir.path()), &test_split).err().unwrap());
        assert!(e.contains("has no split"), "{e}");
        let bundled = LoadOptions {
            format: DataFormat::Bundled,
            ..options(1, 4)
        };
        let e = format!("{:#}", load(Some(dir.path()), &bundled).err().unwrap());
        assert!(e.contains("data.path") && e.contains("bundled"), "{e}");
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
        std::fs::write(&short, idx_bytes(3, 2, 2, &[0; 4])).unwrap();
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
        assert_eq!(d.all().unwrap().size(), vec![5, 3, 32, 32]);
        assert_eq!(
            Vec::<u8>::try_from(d.all().unwrap().flatten(0, -1)).unwrap(),
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
            Vec::<u8>::try_from(d.all().unwrap().flatten(0, -1)).unwrap(),
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
        // Sorted: b.jpg, class_a/a.png, corrupt.png, empty.jpg; each bad file is replaced by
        // the next readable one, wrapping around (so cached and streamed sets agree).
        assert_eq!(d.len(), 4);
        assert_eq!(d.skipped(), 2);
        let all = d.all().unwrap();
        assert!(all.get(2).equal(&all.get(0)) && all.get(3).equal(&all.get(0)));
        // The PNG is lossless: its pixels come back exactly.
        let a = all.get(1);
        assert_eq!(a.int64_value(&[0, 0, 3]), 90);
        assert_eq!(a.int64_value(&[1, 5, 0]), 150);
        assert_eq!(a.int64_value(&[2, 7, 7]), 200);
        // Grayscale and resizing with a centre crop.
        let g = load(Some(dir.path()), &options(1, 4)).unwrap();
        assert_eq!(g.all().unwrap().size(), vec![4, 1, 4, 4]);
        // Strict mode stops at the first bad file and names it.
        let strict = LoadOptions {
            strict: true,
            ..options(3, 8)
        };
        let e = format!("{:#}", load(Some(dir.path()), &strict).err().unwrap());
        assert!(e.contains("corrupt.png") || e.contains("empty.jpg"), "{e}");
    }

    #[test]
    fn folder_reads_webp_bmp_and_the_first_gif_frame() {
        let dir = tempfile::tempdir().unwrap();
        let image =
            image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        image.save(dir.path().join("a.bmp")).unwrap();
        image.save(dir.path().join("b.webp")).unwrap();
        // A two-frame GIF whose first frame is the image and whose second is black.
        let mut gif = Vec::new();
        {
            let mut encoder = image::codecs::gif::GifEncoder::new(&mut gif);
            let rgba = image::DynamicImage::ImageRgb8(image.clone()).to_rgba8();
            let black = image::RgbaImage::from_pixel(6, 4, image::Rgba([0, 0, 0, 255]));
            encoder
                .encode_frames([image::Frame::new(rgba), image::Frame::new(black)])
                .unwrap();
        }
        std::fs::write(dir.path().join("c.gif"), gif).unwrap();
        let d = load(
            Some(dir.path()),
            &LoadOptions {
                size: ImageSize::Rect([4, 6]),
                ..options(3, 4)
            },
        )
        .unwrap();
        assert_eq!(d.skipped(), 0);
        let all = d.all().unwrap();
        assert_eq!(all.size(), [3, 3, 4, 6]);
        let expected = Tensor::from_slice(
            &(0..3)
                .flat_map(|c| {
                    (0..4)
                        .flat_map(move |y| (0..6).map(move |x| [x as u8 * 40, y as u8 * 60, 7][c]))
                })
                .collect::<Vec<u8>>(),
        )
        .view([3, 4, 6]);
        // BMP and lossless WebP exactly; the GIF's palette within a few levels.
        assert!(all.get(0).equal(&expected), "bmp");
        assert!(all.get(1).equal(&expected), "webp");
        let gif_error = (all.get(2).to_kind(Kind::Int) - expected.to_kind(Kind::Int))
            .abs()
            .max()
            .int64_value(&[]);
        assert!(gif_error <= 8, "gif differs by {gif_error}");
    }

    #[test]
    fn folder_scan_skips_link_loops_and_run_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = &dir.path().join("data");
        let png = |path: &Path| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::GrayImage::new(4, 4).save(path).unwrap();
        };
        png(&root.join("a.png"));
        png(&root.join("nested/b.png"));
        // A link back to the root: followed once, it would repeat every image.
        std::os::unix::fs::symlink(root, root.join("nested/loop")).unwrap();
        // A link above the root: it would bring in the images beside the data folder.
        png(&dir.path().join("outside/o.png"));
        std::os::unix::fs::symlink(dir.path(), root.join("nested/up")).unwrap();
        // A link to a real folder, listed under the folder's own path whichever comes first.
        png(&root.join("zz/c.png"));
        std::os::unix::fs::symlink(root.join("zz"), root.join("aa-link")).unwrap();
        // A run directory trained on this folder: its grids are not data.
        png(&root.join("run/samples/latest.png"));
        std::fs::write(root.join("run/config.toml"), "").unwrap();
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files
                .iter()
                .map(|f| f.strip_prefix(root).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(
            names(image_files(root).unwrap()),
            ["a.png", "nested/b.png", "zz/c.png"]
        );
    }

    #[test]
    fn colour_is_read_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let (rgb, gray, text) = (
            dir.path().join("rgb.png"),
            dir.path().join("gray.png"),
            dir.path().join("text.png"),
        );
        image::RgbImage::new(3, 2).save(&rgb).unwrap();
        image::GrayImage::new(3, 2).save(&gray).unwrap();
        std::fs::write(&text, "not an image").unwrap();
        assert!(formats::is_colour(&rgb));
        assert!(!formats::is_colour(&gray) && !formats::is_colour(&text));
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
        assert_eq!(d.all().unwrap().size(), vec![5000, 1, 28, 28]);
        let rgb = load(
            None,
            &LoadOptions {
                format: DataFormat::Bundled,
                ..options(3, 32)
            },
        )
        .unwrap();
        assert_eq!(rgb.all().unwrap().size(), vec![5000, 3, 32, 32]);
    }

    #[test]
    fn order_is_seeded_and_resumes_mid_epoch() {
        let mut a = Sampler::new(Order::Shuffled(10), 42, Position::default());
        let first: Vec<i64> = (0..5).flat_map(|_| a.next_indices(3)).collect();
        let mut sorted = first[..10].to_vec();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..10).collect::<Vec<i64>>(),
            "an epoch visits every image once"
        );
        let mut b = Sampler::new(Order::Shuffled(10), 42, Position::default());
        b.next_indices(3);
        b.next_indices(3);
        let mut resumed = Sampler::new(Order::Shuffled(10), 42, b.position());
        assert_eq!(resumed.next_indices(9), first[6..15].to_vec());
        assert_ne!(
            Sampler::new(Order::Shuffled(10), 43, Position::default()).next_indices(10),
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

    #[test]
    fn jitter_equals_brightness_then_contrast_then_saturation() {
        let _rng = crate::rng::exclusive();
        let j = 0.3;
        for channels in [1, 3] {
            tch::manual_seed(5);
            let x = Tensor::rand([6, channels, 5, 4], (Kind::Float, Device::Cpu)) * 1.6 - 0.8;
            tch::manual_seed(11);
            let fused = augment(&x, false, j);
            // The same draws, applied one operation at a time in f64.
            tch::manual_seed(11);
            let draw =
                || Tensor::rand([6, 1, 1, 1], (Kind::Float, Device::Cpu)).to_kind(Kind::Double);
            let brightness = draw() * (2.0 * j) - j;
            let contrast = draw() * (2.0 * j) + (1.0 - j);
            let x = x.to_kind(Kind::Double) + brightness;
            let mean = x.mean_dim(&[1i64, 2, 3][..], true, Kind::Double);
            let mut y = (&x - &mean) * contrast + &mean;
            if channels == 3 {
                let saturation = draw() * (2.0 * j) + (1.0 - j);
                let gray = y.mean_dim(&[1i64][..], true, Kind::Double);
                y = (&y - &gray) * saturation + &gray;
            }
            let expected = y.clamp(-1.0, 1.0);
            let error = (fused.to_kind(Kind::Double) - expected)
                .abs()
                .max()
                .double_value(&[]);
            assert!(error < 1e-6, "{channels} channel(s): {error}");
        }
    }

    /// A folder of 6 PNGs (distinct solid colours, in sorted order) plus a corrupt PNG and an
    /// empty JPEG sorted between them.
    fn folder_with_bad_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..6u8 {
            image::RgbImage::from_pixel(4, 4, image::Rgb([i * 40, 0, 0]))
                .save(dir.path().join(format!("img{i}.png")))
                .unwrap();
        }
        std::fs::write(dir.path().join("img1b.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
        std::fs::write(dir.path().join("img4b.jpg"), b"").unwrap();
        dir
    }

    /// The red value of each image, which names the file it came from.
    fn reds(images: &Tensor) -> Vec<i64> {
        (0..images.size()[0])
            .map(|i| images.int64_value(&[i, 0, 0, 0]) / 40)
            .collect()
    }

    #[test]
    fn streamed_folder_skips_bad_files_like_the_cache_does() {
        let dir = folder_with_bad_files();
        let streamed = load(
            Some(dir.path()),
            &LoadOptions {
                cache: DataCache::Off,
                ..options(3, 4)
            },
        )
        .unwrap();
        assert!(!streamed.is_cached());
        assert_eq!(streamed.len(), 8, "files are only listed, not decoded");
        // A bad file is replaced by the next readable one.
        let batch = streamed.batch(&[0, 2, 5, 6]).unwrap();
        assert_eq!(reds(&batch), vec![0, 2, 4, 5]);
        assert_eq!(streamed.skipped(), 2);
        let cached = load(
            Some(dir.path()),
            &LoadOptions {
                cache: DataCache::On,
                ..options(3, 4)
            },
        )
        .unwrap();
        assert!(cached.is_cached());
        assert_eq!(cached.skipped(), 2);
        assert_eq!(reds(&cached.all().unwrap()), vec![0, 1, 2, 2, 3, 4, 5, 5]);
        assert!(cached.all().unwrap().equal(&streamed.all().unwrap()));
        // Strict: the bad file stops the read, named.
        let strict = load(
            Some(dir.path()),
            &LoadOptions {
                cache: DataCache::Off,
                strict: true,
                ..options(3, 4)
            },
        )
        .unwrap();
        let e = format!("{:#}", strict.batch(&[0, 2]).err().unwrap());
        assert!(
            e.contains("img1b.png") && e.contains("reading strictly"),
            "{e}"
        );
    }

    fn loader_batches(
        dataset: &Arc<Dataset>,
        position: Position,
        options: LoaderOptions,
        n: usize,
    ) -> Vec<Vec<i64>> {
        let mut loader = Loader::new(dataset.clone(), position, options).unwrap();
        (0..n)
            .map(|_| reds(&loader.next_batch().unwrap().images))
            .collect()
    }

    #[test]
    fn loader_follows_the_seeded_order_with_any_number_of_workers() {
        let dir = folder_with_bad_files();
        std::fs::remove_file(dir.path().join("img1b.png")).unwrap();
        std::fs::remove_file(dir.path().join("img4b.jpg")).unwrap();
        let dataset = Arc::new(
            load(
                Some(dir.path()),
                &LoadOptions {
                    cache: DataCache::Off,
                    ..options(3, 4)
                },
            )
            .unwrap(),
        );
        let options = |workers, shard| LoaderOptions {
            batch: 4,
            seed: 7,
            workers,
            prefetch: 2,
            shard,
        };
        let mut sampler = Sampler::new(Order::Shuffled(6), 7, Position::default());
        let expected: Vec<Vec<i64>> = (0..5).map(|_| sampler.next_indices(4)).collect();
        for workers in [1, 3] {
            assert_eq!(
                loader_batches(
                    &dataset,
                    Position::default(),
                    options(workers, Shard::WHOLE),
                    5
                ),
                expected,
                "{workers} worker(s)"
            );
        }
        // Resuming from the position after two batches continues the same order.
        let mut loader = Loader::new(
            dataset.clone(),
            Position::default(),
            options(2, Shard::WHOLE),
        )
        .unwrap();
        for _ in 0..2 {
            assert_eq!(loader.next_batch().unwrap().images.size(), [4, 3, 4, 4]);
        }
        assert_eq!(
            loader.position(),
            Position {
                epoch: 1,
                index: 2,
                images: Some(dataset.len())
            }
        );
        assert_eq!(
            loader_batches(&dataset, loader.position(), options(2, Shard::WHOLE), 3),
            expected[2..]
        );
        // Two ranks read the two halves of every global batch.
        let halves: Vec<Vec<Vec<i64>>> = (0..2)
            .map(|rank| {
                loader_batches(
                    &dataset,
                    Position::default(),
                    options(2, Shard { rank, world: 2 }),
                    5,
                )
            })
            .collect();
        for (k, global) in expected.iter().enumerate() {
            assert_eq!(
                [halves[0][k].clone(), halves[1][k].clone()].concat(),
                *global
            );
        }
    }
}
