//! WebDataset tar shards: the format large image sets are distributed in. A shard is a tar file
//! whose members are grouped into samples by key (the member's path up to the first dot of its
//! file name): `n01440764_10026.jpg` and `n01440764_10026.cls` are one sample, its image and its
//! class id. Shards are indexed once at load (headers only, in parallel); an epoch then reads
//! them as streams: the shards in a seeded order, split across the processes, each process's
//! shards one after the other through a seeded shuffle buffer.
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::formats::{fit, Shape, IMAGE_EXTENSIONS, MAX_IMAGE_FILE_BYTES};
use super::Crop;

/// The shards named by `spec`: a pattern with brace ranges or lists
/// (`train-{000000..000146}.tar`), a `.tar` file, a folder of `.tar` files, or a list file with
/// one shard (or pattern) per line, relative to the list's folder (`#` starts a comment).
pub fn shard_paths(spec: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(spec);
    let shards = if spec.contains('{') {
        expand_braces(spec)?
            .into_iter()
            .map(PathBuf::from)
            .collect()
    } else if path.is_dir() {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_tar(p))
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail!("{} holds no .tar shards", path.display());
        }
        shards
    } else if is_tar(path) {
        vec![path.to_path_buf()]
    } else {
        listed_shards(path)?
    };
    if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
        bail!(
            "the shard {} named by {spec} does not exist ({} shards named)",
            missing.display(),
            shards.len()
        );
    }
    Ok(shards)
}

/// Whether `spec` names shards (and not an image folder or a file of another format): a
/// pattern, a `.tar` or `.txt` file, or a folder with `.tar` files and no image beside them.
pub fn names_shards(spec: &str) -> bool {
    let path = Path::new(spec);
    let folder_of_shards = || {
        let Ok(entries) = std::fs::read_dir(path) else {
            return false;
        };
        let names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.iter().any(|p| is_tar(p)) && !names.iter().any(|p| super::is_image_file(p))
    };
    spec.contains('{')
        || is_tar(path)
        || path.extension().is_some_and(|e| e == "txt")
        || (path.is_dir() && folder_of_shards())
}

fn is_tar(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

fn listed_shards(list: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(list)
        .with_context(|| format!("cannot read the shard list {}", list.display()))?;
    let base = list.parent().unwrap_or(Path::new("."));
    let mut shards = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if !line.is_empty() {
            shards.extend(expand_braces(line)?.into_iter().map(|s| base.join(s)));
        }
    }
    if shards.is_empty() {
        bail!("the shard list {} names no shards", list.display());
    }
    Ok(shards)
}

/// Brace expansion as shells and WebDataset do it: `{a,b}` lists and `{000..120}` ranges (zero
/// padded to the bounds' width when a bound has a leading zero), left to right.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            bail!("{pattern}: a '}}' without its '{{'");
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .with_context(|| format!("{pattern}: a '{{' without its '}}'"))?;
    let (head, inside, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let choices: Vec<String> = match inside.split_once("..") {
        Some((low, high)) => {
            let number = |s: &str| {
                s.parse::<u64>().with_context(|| {
                    format!("{pattern}: {{{inside}}} is not a range of whole numbers")
                })
            };
            let (a, b) = (number(low)?, number(high)?);
            if a > b {
                bail!("{pattern}: the range {{{inside}}} runs backwards");
            }
            let padded = low.starts_with('0') || high.starts_with('0');
            let width = if padded { low.len().max(high.len()) } else { 0 };
            (a..=b).map(|i| format!("{i:0width$}")).collect()
        }
        None => inside.split(',').map(str::to_string).collect(),
    };
    let tails = expand_braces(tail)?;
    Ok(choices
        .iter()
        .flat_map(|c| tails.iter().map(move |t| format!("{head}{c}{t}")))
        .collect())
}

/// Names the class ids of shards, one per line, beside them.
pub const CLASS_NAMES: &str = "classes.txt";

/// One sample: where its image lies in its shard, and its class id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    shard: u32,
    offset: u64,
    len: u64,
    label: Option<i64>,
}

/// The indexed shards.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<PathBuf>,
    samples: Vec<Sample>,
    /// Where each shard's samples start in `samples`, and the end.
    starts: Vec<usize>,
    /// Members and samples skipped while indexing.
    pub skipped: usize,
}

/// What indexing one shard found.
struct ShardIndex {
    samples: Vec<Sample>,
    /// What was skipped, and why.
    skipped: Vec<String>,
}

impl ShardSet {
    /// Indexes `shards` (in parallel): every sample with an image, and its `.cls` label. A
    /// corrupt member, a sample without an image or a truncated shard's tail is skipped with a
    /// warning and counted, or is an error when `strict`; a file that is not a tar at all is an
    /// error.
    pub fn index(shards: Vec<PathBuf>, strict: bool) -> Result<ShardSet> {
        let indexes = shards
            .par_iter()
            .enumerate()
            .map(|(i, shard)| index_shard(shard, i as u32))
            .collect::<Result<Vec<ShardIndex>>>()?;
        let mut set = ShardSet {
            samples: Vec::new(),
            starts: vec![0],
            skipped: 0,
            shards,
        };
        for (shard, index) in set.shards.iter().zip(indexes) {
            for why in &index.skipped {
                if strict {
                    bail!(
                        "{}: {why} (reading strictly: a damaged shard is an error)",
                        shard.display()
                    );
                }
                tracing::warn!("skipping in {}: {why}", shard.display());
            }
            set.skipped += index.skipped.len();
            set.samples.extend(index.samples);
            set.starts.push(set.samples.len());
        }
        if set.samples.is_empty() {
            bail!(
                "the {} shard(s) from {} on hold no sample with an image (.jpg, .jpeg, .png, .webp, .bmp, .gif)",
                set.shards.len(),
                set.shards[0].display()
            );
        }
        if set.skipped > 0 {
            tracing::warn!(
                "skipped {} damaged member(s) or sample(s) of {} shard(s)",
                set.skipped,
                set.shards.len()
            );
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The class names of `classes.txt` beside the first shard, when there is one.
    pub fn class_names(&self) -> Option<Vec<String>> {
        let list = self.shards[0].parent()?.join(CLASS_NAMES);
        let text = std::fs::read_to_string(list).ok()?;
        Some(text.lines().map(str::to_string).collect())
    }

    /// The class ids, when every sample has one; else why not.
    pub fn labels(&self) -> std::result::Result<Vec<i64>, String> {
        let labels: Option<Vec<i64>> = self.samples.iter().map(|s| s.label).collect();
        labels.ok_or_else(|| {
            let unlabelled = self.samples.iter().filter(|s| s.label.is_none()).count();
            match unlabelled == self.samples.len() {
                true => "the shards hold no .cls members".to_string(),
                false => format!(
                    "{unlabelled} of the {} samples in the shards have no .cls member",
                    self.samples.len()
                ),
            }
        })
    }

    /// Decodes sample `i`'s image and fits it to `shape` into `dst`.
    pub fn decode_into(
        &self,
        i: usize,
        shape: Shape,
        crop: Crop,
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        let sample = self.samples[i];
        let shard = &self.shards[sample.shard as usize];
        let mut bytes = vec![0; sample.len as usize];
        File::open(shard)
            .and_then(|f| f.read_exact_at(&mut bytes, sample.offset))
            .map_err(|e| e.to_string())?;
        let image = image::load_from_memory(&bytes).map_err(|e| e.to_string())?;
        fit(&image, shape, crop, dst);
        Ok(())
    }

    /// Sample `i` as a warning names it.
    pub fn describe(&self, i: usize) -> String {
        let sample = self.samples[i];
        format!(
            "the image at byte {} of {}",
            sample.offset,
            self.shards[sample.shard as usize].display()
        )
    }

    /// The order of epochs read `batch` images at a time by `world` processes.
    pub fn streams(&self, batch: usize, world: usize, buffer: usize) -> Result<Streams> {
        if self.shards.len() < world {
            bail!(
                "{} shard(s) cannot be split over {world} processes: each process reads its own shards, so there must be at least {world}",
                self.shards.len()
            );
        }
        // A process gets ⌊shards/world⌋ shards or one more: the fewest samples it can get.
        let mut sizes: Vec<usize> = self.starts.windows(2).map(|w| w[1] - w[0]).collect();
        sizes.sort_unstable();
        let fewest: usize = sizes[..sizes.len() / world].iter().sum();
        if world > 1 && fewest < batch / world {
            bail!(
                "the smallest {} of the {} shards hold {fewest} samples, fewer than one batch of {} per process: write larger or fewer shards, or use fewer processes",
                sizes.len() / world,
                sizes.len(),
                batch / world
            );
        }
        Ok(Streams {
            starts: self.starts.clone(),
            world,
            per_rank: batch / world,
            buffer: buffer.max(1),
        })
    }
}

/// The samples of one shard, from its headers (image bytes are not read).
fn index_shard(shard: &Path, number: u32) -> Result<ShardIndex> {
    let file =
        File::open(shard).with_context(|| format!("cannot open the shard {}", shard.display()))?;
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(ShardIndex {
            samples: Vec::new(),
            skipped: vec!["the file is empty".into()],
        });
    }
    let mut archive = tar::Archive::new(file);
    let mut entries = archive
        .entries_with_seek()
        .with_context(|| format!("cannot read the shard {}", shard.display()))?;
    let mut index = ShardIndex {
        samples: Vec::new(),
        skipped: Vec::new(),
    };
    let mut current: Option<(String, Pending)> = None;
    let mut members = 0;
    loop {
        let entry = match entries.next() {
            None => break,
            Some(Ok(entry)) => entry,
            Some(Err(e)) if members == 0 => {
                bail!("{} is not a tar file: {e}", shard.display())
            }
            Some(Err(e)) => {
                index.skipped.push(format!("the shard is damaged after its member {members}, and the rest of it is skipped: {e}"));
                break;
            }
        };
        members += 1;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (offset, len) = (entry.raw_file_position(), entry.size());
        if offset + len > size {
            index.skipped.push(format!(
                "{name} runs past the end of the file ({size} bytes): the shard is truncated"
            ));
            break;
        }
        let Some((key, extension)) = split_key(&name) else {
            continue;
        };
        if current.as_ref().is_none_or(|(k, _)| *k != key) {
            if let Some((key, pending)) = current.take() {
                pending.finish(&key, number, &mut index);
            }
            current = Some((key.to_string(), Pending::default()));
        }
        let pending = &mut current.as_mut().expect("set above").1;
        let extension = extension.to_lowercase();
        if extension == "cls" {
            let mut text = String::new();
            let read = entry.take(64).read_to_string(&mut text);
            pending.label = Some(match (read, text.trim().parse::<i64>()) {
                (Ok(_), Ok(label)) if label >= 0 => Ok(label),
                _ => Err(format!(
                    "{name} holds {:?}, not a class id (a whole number ≥ 0)",
                    text.trim()
                )),
            });
        } else if pending.image.is_none() && is_image_extension(&extension) {
            if len > MAX_IMAGE_FILE_BYTES {
                pending.damage = Some(format!("{name}: {len} bytes, more than any image"));
            }
            pending.image = Some((offset, len));
        }
    }
    if let Some((key, pending)) = current {
        pending.finish(&key, number, &mut index);
    }
    Ok(index)
}

/// A sample's members seen so far.
#[derive(Default)]
struct Pending {
    image: Option<(u64, u64)>,
    label: Option<std::result::Result<i64, String>>,
    damage: Option<String>,
}

impl Pending {
    fn finish(self, key: &str, shard: u32, index: &mut ShardIndex) {
        let label = match self.label {
            None => None,
            Some(Ok(label)) => Some(label),
            Some(Err(why)) => return index.skipped.push(why),
        };
        if let Some(why) = self.damage {
            return index.skipped.push(why);
        }
        match self.image {
            Some((offset, len)) => index.samples.push(Sample {
                shard,
                offset,
                len,
                label,
            }),
            None => index
                .skipped
                .push(format!("the sample {key} has no image member")),
        }
    }
}

/// A member's sample key and extension, split as WebDataset does: at the first dot of the
/// file name (`dir/n0144_1.jpg` → `dir/n0144_1`, `jpg`). None for a name without one.
fn split_key(name: &str) -> Option<(&str, &str)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = file_start + name[file_start..].find('.')?;
    Some((&name[..dot], &name[dot + 1..]))
}

/// Whether an extension (the last part of `input.jpg` too) is an image's.
fn is_image_extension(extension: &str) -> bool {
    let last = extension.rsplit('.').next().unwrap_or(extension);
    IMAGE_EXTENSIONS.contains(&last)
}

/// How an epoch reads indexed shards, as a function of the seed and the epoch alone:
/// - the shards are shuffled, and shard k goes to process k mod world;
/// - each process reads its shards' samples in order through a shuffle buffer of `buffer`
///   samples (each sample read swaps with a random one in the buffer);
/// - the global batch is each process's next `per_rank` samples, in rank order; with several
///   processes the epoch ends when the shortest stream has no whole batch left (the others'
///   remainders are read in later epochs, whose shards go to other processes).
#[derive(Clone, Debug)]
pub struct Streams {
    starts: Vec<usize>,
    world: usize,
    per_rank: usize,
    buffer: usize,
}

impl Streams {
    /// The sample ids of `epoch`, in global-batch order.
    pub fn epoch(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let shards = self.starts.len() - 1;
        let mut order: Vec<usize> = (0..shards).collect();
        rand::seq::SliceRandom::shuffle(
            &mut order[..],
            &mut ChaCha8Rng::seed_from_u64(crate::rng::mix(seed, &[0x5AAD, epoch])),
        );
        let streams: Vec<Vec<usize>> = (0..self.world)
            .map(|rank| {
                let samples = order
                    .iter()
                    .skip(rank)
                    .step_by(self.world)
                    .flat_map(|&s| self.starts[s]..self.starts[s + 1]);
                let seed = crate::rng::mix(seed, &[0xB0FF, epoch, rank as u64]);
                shuffle_buffer(samples, self.buffer, &mut ChaCha8Rng::seed_from_u64(seed))
            })
            .collect();
        if self.world == 1 {
            return streams.into_iter().next().expect("one stream");
        }
        let batches = streams.iter().map(Vec::len).min().unwrap_or(0) / self.per_rank;
        (0..batches)
            .flat_map(|k| {
                streams.iter().flat_map(move |s| {
                    s[k * self.per_rank..(k + 1) * self.per_rank]
                        .iter()
                        .copied()
                })
            })
            .collect()
    }
}

/// `items` through a buffer of `size`: once it is full, each item read takes the place of a
/// random one, which comes out; at the end the rest come out in random order.
fn shuffle_buffer(
    items: impl Iterator<Item = usize>,
    size: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let mut buffer = Vec::with_capacity(size);
    let mut out = Vec::new();
    for item in items {
        if buffer.len() < size {
            buffer.push(item);
            continue;
        }
        let j = rng.gen_range(0..size);
        out.push(std::mem::replace(&mut buffer[j], item));
    }
    rand::seq::SliceRandom::shuffle(&mut buffer[..], rng);
    out.extend(buffer);
    out
}

/// Writes `samples` (image file, optional class id) as shards of `per_shard` samples,
/// `{stem}-000000.tar` … in `out`, with keys `{index:08}`, the image's bytes as they are and
/// the class in `.cls`; returns the shards written.
pub fn write_shards(
    samples: &[(PathBuf, Option<i64>)],
    out: &Path,
    stem: &str,
    per_shard: usize,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    for (number, chunk) in samples.chunks(per_shard.max(1)).enumerate() {
        let path = out.join(format!("{stem}-{number:06}.tar"));
        let partial = path.with_extension("tar.partial");
        let file = File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        for (i, (image, label)) in chunk.iter().enumerate() {
            let key = format!("{:08}", number * per_shard + i);
            let extension = image
                .extension()
                .map_or("jpg".into(), |e| e.to_string_lossy().to_lowercase());
            let bytes =
                std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
            append(&mut builder, &format!("{key}.{extension}"), &bytes)?;
            if let Some(label) = label {
                append(
                    &mut builder,
                    &format!("{key}.cls"),
                    label.to_string().as_bytes(),
                )?;
            }
        }
        builder
            .into_inner()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot write {}", partial.display()))?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn append(builder: &mut tar::Builder<impl std::io::Write>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, name, bytes)
        .with_context(|| format!("cannot add {name} to a shard"))
}

#[cfg(test)]
mod tests {
    use super::super::{load, LoadOptions, Loader, LoaderOptions, Position, Shard};
    use super::*;
    use crate::config::{DataFormat, ImageSize};
    use std::sync::Arc;

    /// A PNG of one colour.
    fn png(colour: [u8; 3], width: u32, height: u32) -> Vec<u8> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(width, height, image::Rgb(colour))
            .write_to(&mut bytes, image::ImageFormat::Png)
            .unwrap();
        bytes.into_inner()
    }

    /// A tar file of `members` (name, bytes), in order.
    fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
        let mut builder = tar::Builder::new(File::create(path).unwrap());
        for (name, bytes) in members {
            append(&mut builder, name, bytes).unwrap();
        }
        builder.into_inner().unwrap();
    }

    /// `count` samples keyed `{first + i}`: a 4×4 PNG whose red value is the sample's number,
    /// and its class, number mod 3.
    fn samples(first: usize, count: usize) -> Vec<(String, Vec<u8>)> {
        (first..first + count)
            .flat_map(|i| {
                [
                    (format!("s{i:04}.png"), png([i as u8, 0, 0], 4, 4)),
                    (format!("s{i:04}.cls"), (i % 3).to_string().into_bytes()),
                ]
            })
            .collect()
    }

    fn options() -> LoadOptions {
        LoadOptions {
            shuffle_buffer: 4,
            ..LoadOptions::at(DataFormat::Auto, 3, ImageSize::Square(4))
        }
    }

    /// The red value of each image of a batch: which sample it is.
    fn reds(images: &tch::Tensor) -> Vec<u8> {
        Vec::<u8>::try_from(images.select(1, 0).select(1, 0).select(1, 0)).unwrap()
    }

    #[test]
    fn brace_patterns_expand_as_webdataset_expands_them() {
        assert_eq!(
            expand_braces("s/train-{000000..000002}.tar").unwrap(),
            [
                "s/train-000000.tar",
                "s/train-000001.tar",
                "s/train-000002.tar"
            ]
        );
        assert_eq!(
            expand_braces("{a,b}-{9..10}").unwrap(),
            ["a-9", "a-10", "b-9", "b-10"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        for (bad, says) in [
            ("x-{3..1}.tar", "runs backwards"),
            ("x-{a..c}.tar", "not a range of whole numbers"),
            ("x-{1..2.tar", "without its '}'"),
            ("x-1}.tar", "without its '{'"),
        ] {
            let e = expand_braces(bad).err().unwrap().to_string();
            assert!(e.contains(says) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn members_group_by_key_up_to_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("d/n0144_1.jpg"), Some(("d/n0144_1", "jpg")));
        assert_eq!(split_key("a.input.png"), Some(("a", "input.png")));
        assert_eq!(split_key("d.ir/x.cls"), Some(("d.ir/x", "cls")));
        assert_eq!(split_key("d.ir/noext"), None);
        assert!(is_image_extension("input.png") && !is_image_extension("json"));
    }

    #[test]
    fn the_shuffle_buffer_permutes_by_its_seed_within_its_reach() {
        let rng = |seed| ChaCha8Rng::seed_from_u64(seed);
        let items = || 0..100usize;
        let a = shuffle_buffer(items(), 10, &mut rng(1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, items().collect::<Vec<_>>());
        assert_ne!(a, items().collect::<Vec<_>>());
        assert_eq!(a, shuffle_buffer(items(), 10, &mut rng(1)));
        assert_ne!(a, shuffle_buffer(items(), 10, &mut rng(2)));
        // An item comes out at most (buffer − 1) places before its turn.
        assert!(a.iter().enumerate().all(|(place, &item)| item <= place + 9));
        assert_eq!(
            shuffle_buffer(items(), 1, &mut rng(1)),
            items().collect::<Vec<_>>()
        );
    }

    #[test]
    fn each_process_reads_only_its_own_shards_and_global_batches_take_its_rows() {
        // Shards of 3, 4, 3 and 5 samples.
        let streams = Streams {
            starts: vec![0, 3, 7, 10, 15],
            world: 2,
            per_rank: 2,
            buffer: 3,
        };
        let shard_of = |id: usize| streams.starts.iter().rposition(|&s| s <= id).unwrap();
        let mut assignments = std::collections::BTreeSet::new();
        for epoch in 0..6 {
            let order = streams.epoch(7, epoch);
            // The shortest stream (two shards, at least 6 samples) gives 3 batches of 2 per rank.
            assert!(order.len() % 4 == 0 && order.len() >= 12, "{order:?}");
            let mut unique = order.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), order.len());
            let shards_of_rank = |rank: usize| {
                let mut s: Vec<usize> = order
                    .chunks(4)
                    .flat_map(|batch| batch[rank * 2..rank * 2 + 2].iter().map(|&id| shard_of(id)))
                    .collect();
                s.sort();
                s.dedup();
                s
            };
            let (zero, one) = (shards_of_rank(0), shards_of_rank(1));
            assert!(zero.iter().all(|s| !one.contains(s)), "{zero:?} {one:?}");
            assignments.insert(zero);
            assert_eq!(order, streams.epoch(7, epoch));
        }
        assert!(
            assignments.len() > 1,
            "the shards move between processes from epoch to epoch"
        );
        // One process reads every sample each epoch.
        let whole = Streams {
            world: 1,
            ..streams
        };
        assert_eq!(whole.epoch(7, 0).len(), 15);
    }

    #[test]
    fn shards_load_from_a_pattern_a_list_or_a_folder_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        write_tar(&dir.path().join("part-0.tar"), &samples(0, 5));
        write_tar(&dir.path().join("part-1.tar"), &samples(5, 4));
        fs_write(
            &dir.path().join("list.txt"),
            "# two shards\npart-{0..1}.tar\n",
        );
        let pattern = dir.path().join("part-{0..1}.tar");
        for spec in [
            pattern.clone(),
            dir.path().join("list.txt"),
            dir.path().to_path_buf(),
        ] {
            let set = load(Some(&spec), &options()).unwrap();
            assert_eq!(set.len(), 9, "{}", spec.display());
            assert_eq!(reds(&set.all().unwrap()), (0..9).collect::<Vec<u8>>());
            let classes = set.labelling().as_ref().unwrap();
            assert_eq!(classes.labels, (0..9).map(|i| i % 3).collect::<Vec<i64>>());
            assert_eq!(classes.names, ["0", "1", "2"]);
        }
        // A pattern naming a shard that is not there.
        let e = load(Some(&dir.path().join("part-{0..2}.tar")), &options())
            .err()
            .unwrap();
        let e = format!("{e:#}");
        assert!(
            e.contains("part-2.tar") && e.contains("does not exist"),
            "{e}"
        );
        fs_write(&dir.path().join("list.txt"), "part-0.tar\nmissing.tar\n");
        let e = format!(
            "{:#}",
            load(Some(&dir.path().join("list.txt")), &options())
                .err()
                .unwrap()
        );
        assert!(
            e.contains("missing.tar") && e.contains("does not exist"),
            "{e}"
        );
    }

    fn fs_write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn damaged_shards_are_refused_or_skipped_with_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |name: &str| dir.path().join(name);
        // Not a tar at all: an error naming it.
        fs_write(&spec("text.tar"), &"not a tar file. ".repeat(64));
        let e = format!(
            "{:#}",
            load(Some(&spec("text.tar")), &options()).err().unwrap()
        );
        assert!(e.contains("text.tar is not a tar file"), "{e}");

        // A class that is not a number, a sample without an image, and a corrupt image.
        let mut members = samples(0, 4);
        members[3].1 = b"seven".to_vec();
        members.push(("lonely.cls".into(), b"1".to_vec()));
        members[4].1 = b"not a png".to_vec();
        write_tar(&spec("flawed.tar"), &members);
        let set = load(Some(&spec("flawed.tar")), &options()).unwrap();
        assert_eq!((set.len(), set.skipped()), (3, 2));
        let e = format!(
            "{:#}",
            load(
                Some(&spec("flawed.tar")),
                &LoadOptions {
                    strict: true,
                    ..options()
                }
            )
            .err()
            .unwrap()
        );
        assert!(
            e.contains("s0001.cls holds \"seven\", not a class id") || e.contains("lonely"),
            "{e}"
        );
        // The corrupt image is met when read: skipped, another image in its place.
        let batch = set.batch(&[0, 1, 2]).unwrap();
        assert_eq!(reds(&batch), [0, 3, 3]);
        assert_eq!(set.skipped(), 3);

        // A shard cut short in its third sample: the first two are kept.
        write_tar(&spec("whole.tar"), &samples(0, 4));
        let bytes = std::fs::read(spec("whole.tar")).unwrap();
        let third = bytes.windows(9).position(|w| w == b"s0002.png").unwrap();
        std::fs::write(spec("cut.tar"), &bytes[..third + 512 + 100]).unwrap();
        let set = load(Some(&spec("cut.tar")), &options()).unwrap();
        assert_eq!((set.len(), set.skipped()), (2, 1));
        // An empty shard beside it counts as one more.
        std::fs::write(spec("empty.tar"), b"").unwrap();
        fs_write(&spec("two.txt"), "cut.tar\nempty.tar\n");
        let set = load(Some(&spec("two.txt")), &options()).unwrap();
        assert_eq!((set.len(), set.skipped()), (2, 2));
        let e = format!(
            "{:#}",
            load(
                Some(&spec("cut.tar")),
                &LoadOptions {
                    strict: true,
                    ..options()
                }
            )
            .err()
            .unwrap()
        );
        assert!(e.contains("cut.tar") && e.contains("truncated"), "{e}");
    }

    /// Four shards of 6 samples each, numbered 0 to 23, loaded from `dir`.
    fn four_shards(dir: &Path) -> Arc<super::super::Dataset> {
        for shard in 0..4 {
            write_tar(&dir.join(format!("s-{shard}.tar")), &samples(shard * 6, 6));
        }
        Arc::new(load(Some(&dir.join("s-{0..3}.tar")), &options()).unwrap())
    }

    /// A loader of `set` in global batches of 4, seeded with 3.
    fn loader(
        set: &Arc<super::super::Dataset>,
        shard: Shard,
        workers: usize,
        position: Position,
    ) -> Loader {
        let options = LoaderOptions {
            batch: 4,
            seed: 3,
            workers,
            prefetch: 2,
            shard,
        };
        Loader::new(set.clone(), position, options).unwrap()
    }

    #[test]
    fn a_resumed_loader_reads_the_same_samples_whatever_its_workers() {
        let dir = tempfile::tempdir().unwrap();
        let set = four_shards(dir.path());
        let loader = |workers, position| loader(&set, Shard::WHOLE, workers, position);
        // Ten batches run across the end of the first epoch (24 samples).
        let mut straight = loader(1, Position::default());
        let whole: Vec<Vec<u8>> = (0..10)
            .map(|_| reds(&straight.next_batch().unwrap().images))
            .collect();
        let mut first = loader(3, Position::default());
        let mut read: Vec<Vec<u8>> = (0..4)
            .map(|_| reds(&first.next_batch().unwrap().images))
            .collect();
        let mut resumed = loader(2, first.position());
        read.extend((4..10).map(|_| reds(&resumed.next_batch().unwrap().images)));
        assert_eq!(read, whole);
        let mut epoch: Vec<u8> = whole[..6].concat();
        epoch.sort();
        assert_eq!(epoch, (0..24).collect::<Vec<u8>>());
        assert_ne!(whole[..6].concat(), (0..24).collect::<Vec<u8>>());
    }

    #[test]
    fn two_processes_read_disjoint_shards_that_make_up_each_global_batch() {
        let dir = tempfile::tempdir().unwrap();
        let set = four_shards(dir.path());
        let rank_reads = |rank| {
            let mut loader = loader(&set, Shard { rank, world: 2 }, 2, Position::default());
            (0..6)
                .map(|_| reds(&loader.next_batch().unwrap().images))
                .collect::<Vec<_>>()
        };
        let (zero, one) = (rank_reads(0), rank_reads(1));
        // One epoch is 6 global batches of 2 + 2: each process reads two whole shards.
        let shards_of = |batches: &[Vec<u8>]| {
            let mut shards: Vec<u8> = batches.concat().iter().map(|red| red / 6).collect();
            shards.sort();
            shards.dedup();
            shards
        };
        let (of_zero, of_one) = (shards_of(&zero), shards_of(&one));
        assert_eq!((of_zero.len(), of_one.len()), (2, 2));
        assert!(of_zero.iter().all(|s| !of_one.contains(s)));
        let mut epoch: Vec<u8> = [zero.concat(), one.concat()].concat();
        epoch.sort();
        assert_eq!(epoch, (0..24).collect::<Vec<u8>>());
    }

    #[test]
    fn random_crops_follow_the_order_and_differ_between_epochs() {
        let dir = tempfile::tempdir().unwrap();
        // A 16×8 image, red growing left to right: where a 4×4 crop is cut shows in its red.
        let wide = image::RgbImage::from_fn(16, 8, |x, _| image::Rgb([(x * 16) as u8, 0, 0]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        wide.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        write_tar(
            &dir.path().join("w.tar"),
            &[("w.png".into(), bytes.into_inner())],
        );
        let options = LoadOptions {
            crop: crate::config::CropMode::Random,
            ..options()
        };
        let set = Arc::new(load(Some(&dir.path().join("w.tar")), &options).unwrap());
        let crops = |position| {
            let options = LoaderOptions {
                batch: 1,
                seed: 0,
                workers: 1,
                prefetch: 1,
                shard: Shard::WHOLE,
            };
            let mut loader = Loader::new(set.clone(), position, options).unwrap();
            (0..8)
                .map(|_| {
                    Vec::<u8>::try_from(loader.next_batch().unwrap().images.flatten(0, -1)).unwrap()
                })
                .collect::<Vec<_>>()
        };
        let run = crops(Position::default());
        assert_eq!(run, crops(Position::default()));
        let distinct: std::collections::BTreeSet<_> = run.iter().collect();
        assert!(
            distinct.len() > 4,
            "{} different crops of 8",
            distinct.len()
        );
        // Centre crops (a grid, FID) stay centred.
        let centre = Vec::<u8>::try_from(set.batch(&[0]).unwrap().flatten(0, -1)).unwrap();
        // Halving a ramp of 16 per pixel averages pixel pairs: 32·j + 8 for the middle columns.
        assert_eq!(&centre[..4], &[72, 104, 136, 168][..]);
    }

    #[test]
    fn reads_the_shards_the_webdataset_package_writes() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webdataset");
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture.join("expected.json")).unwrap()).unwrap();
        let samples = expected["samples"].as_array().unwrap();
        let options = LoadOptions::at(DataFormat::Auto, 3, ImageSize::Square(8));
        let set = load(Some(&fixture.join("train-{000000..000001}.tar")), &options).unwrap();
        assert_eq!((set.len(), set.skipped()), (samples.len(), 0));
        let labels: Vec<i64> = samples.iter().map(|s| s["cls"].as_i64().unwrap()).collect();
        assert_eq!(set.labelling().as_ref().unwrap().labels, labels);
        // The PNGs are at the training size: their pixels come through exactly; the JPEGs of
        // another size in the same shards are fitted to it.
        let all = set.all().unwrap();
        assert_eq!(all.size(), [samples.len() as i64, 3, 8, 8]);
        for (i, sample) in samples.iter().enumerate() {
            if let Some(pixels) = sample["pixels"].as_array() {
                let pixels: Vec<u8> = pixels.iter().map(|v| v.as_u64().unwrap() as u8).collect();
                let read = Vec::<u8>::try_from(all.get(i as i64).flatten(0, -1)).unwrap();
                assert_eq!(read, pixels, "sample {}", sample["key"]);
            }
        }
    }
}
