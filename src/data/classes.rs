//! Class labels, read beside the images of each source: IDX label files, the label bytes of
//! CIFAR records, and ImageFolder's one subfolder per class.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::formats::{self, Cifar};
use crate::config::CifarLabel;

/// One class id per image (in the images' order) and the classes' names, by id.
#[derive(Clone, Debug, PartialEq)]
pub struct Classes {
    pub labels: Vec<i64>,
    pub names: Vec<String>,
}

/// Why a dataset has no labels, as an error or note says it.
#[derive(Clone, Debug, PartialEq)]
pub struct Unlabelled {
    pub why: String,
    /// The layout could carry labels but is inconsistent (class subfolders with loose images
    /// beside them): a run that asks for classes, even `auto`, is refused rather than guessed.
    pub ambiguous: bool,
}

/// A dataset's labels, or why it has none. Labels are read with the images, and what is wrong
/// with them matters only to a run that asks for classes.
pub type Labelling = std::result::Result<Classes, Unlabelled>;

pub(super) fn unlabelled(why: String) -> Labelling {
    Err(Unlabelled {
        why,
        ambiguous: false,
    })
}

impl Classes {
    pub fn count(&self) -> usize {
        self.names.len()
    }

    /// Labels whose names are the ids themselves (digits, or datasets that name no classes).
    pub(super) fn numbered(labels: Vec<i64>) -> Classes {
        let count = labels.iter().max().map_or(0, |m| m + 1);
        Classes {
            labels,
            names: (0..count).map(|i| i.to_string()).collect(),
        }
    }

    /// These classes with each image `i` taking the label of `substitute(i)`: the labels of
    /// images whose place another image took.
    pub(super) fn substituted(&self, substitutes: &[(usize, usize)]) -> Classes {
        let mut labels = self.labels.clone();
        for &(i, good) in substitutes {
            labels[i] = self.labels[good];
        }
        Classes {
            labels,
            names: self.names.clone(),
        }
    }
}

/// The label file beside an IDX image file: `train-images-idx3-ubyte[.gz]` →
/// `train-labels-idx1-ubyte[.gz]` (MNIST's, Fashion-MNIST's and EMNIST's names).
fn idx_label_file(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gz").unwrap_or(name);
    let labels = stem.replace("images-idx3", "labels-idx1");
    if labels == stem {
        return None;
    }
    [labels.clone(), format!("{labels}.gz")]
        .into_iter()
        .map(|n| images.with_file_name(n))
        .find(|p| p.is_file())
}

/// Parses an IDX1 unsigned-byte label file (magic 0x00000801, big-endian N, then N bytes).
pub fn parse_idx_labels(bytes: &[u8], name: &Path) -> Result<Vec<i64>> {
    if bytes.len() < 8 {
        bail!(
            "{}: IDX label file too short ({} bytes; the header alone is 8)",
            name.display(),
            bytes.len()
        );
    }
    let word = |i: usize| u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
    if word(0) != 0x0801 {
        bail!("{}: IDX magic number is {:#010x}, expected 0x00000801 (unsigned-byte labels with 1 dimension)", name.display(), word(0));
    }
    let n = word(1) as usize;
    if bytes.len() != 8 + n {
        bail!(
            "{}: IDX header says {n} labels, but the file holds {}",
            name.display(),
            bytes.len() - 8
        );
    }
    Ok(bytes[8..].iter().map(|&b| b as i64).collect())
}

/// The labels of IDX image files `files` (holding `counts` images each), from the label file
/// beside each.
pub(super) fn read_idx(files: &[PathBuf], counts: &[usize]) -> Result<Labelling> {
    let mut labels = Vec::new();
    for (file, &count) in files.iter().zip(counts) {
        let Some(label_file) = idx_label_file(file) else {
            return Ok(unlabelled(format!(
                "{} has no label file beside it (e.g. train-labels-idx1-ubyte.gz)",
                file.display()
            )));
        };
        let part = parse_idx_labels(&formats::read_maybe_gz(&label_file)?, &label_file)?;
        if part.len() != count {
            bail!(
                "{} holds {} labels but its images {} hold {count} images",
                label_file.display(),
                part.len(),
                file.display()
            );
        }
        labels.extend(part);
    }
    Ok(Ok(Classes::numbered(labels)))
}

/// The labels of the bundled digits.
pub(super) fn bundled() -> Result<Classes> {
    let name = Path::new("bundled MNIST labels");
    let bytes = formats::gunzip(formats::BUNDLED_LABELS, name)?;
    Ok(Classes::numbered(parse_idx_labels(&bytes, name)?))
}

/// CIFAR-10's classes, in label order (as its batches.meta.txt lists them).
const CIFAR10_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

impl CifarLabel {
    /// How many classes the label has in `variant`, and the file that names them.
    fn classes(self, variant: Cifar) -> (i64, &'static str) {
        match (variant, self) {
            (Cifar::Ten, _) => (10, "batches.meta.txt"),
            (Cifar::Hundred, CifarLabel::Fine) => (100, "fine_label_names.txt"),
            (Cifar::Hundred, CifarLabel::Coarse) => (20, "coarse_label_names.txt"),
        }
    }
}

/// The label of each record of the CIFAR batch file `file` (already checked by `parse_cifar`).
pub(super) fn cifar_labels(
    bytes: &[u8],
    file: &Path,
    variant: Cifar,
    which: CifarLabel,
) -> Result<Vec<i64>> {
    let record = variant.label_bytes() + formats::CIFAR_SHAPE.bytes();
    let at = match (variant, which) {
        (Cifar::Ten, _) | (Cifar::Hundred, CifarLabel::Coarse) => 0,
        (Cifar::Hundred, CifarLabel::Fine) => 1,
    };
    let labels: Vec<i64> = bytes.chunks_exact(record).map(|r| r[at] as i64).collect();
    let (count, _) = which.classes(variant);
    if let Some((i, label)) = labels.iter().enumerate().find(|(_, &l)| l >= count) {
        bail!(
            "{}: record {i} has label {label}, but {} has {count} classes: is it another dataset's file?",
            file.display(),
            variant.name()
        );
    }
    Ok(labels)
}

/// The classes of a CIFAR folder's `labels`, named by the folder's names file when it has one
/// (`batches.meta.txt`, `fine_label_names.txt`, `coarse_label_names.txt`), else by CIFAR-10's
/// known names or by number.
pub(super) fn cifar_classes(
    dir: &Path,
    variant: Cifar,
    which: CifarLabel,
    labels: Vec<i64>,
) -> Classes {
    let (count, file) = which.classes(variant);
    let listed: Vec<String> = std::fs::read_to_string(dir.join(file))
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let names = match () {
        _ if listed.len() == count as usize => listed,
        _ if variant == Cifar::Ten => CIFAR10_NAMES.map(String::from).to_vec(),
        _ => (0..count).map(|i| i.to_string()).collect(),
    };
    Classes { labels, names }
}

/// ImageFolder's classes: each image's class is the subfolder of `dir` it lies in, the names
/// being the subfolders' names in sorted order. `files` are sorted, as `image_files` lists them.
pub(super) fn folder_classes(dir: &Path, files: &[PathBuf]) -> Labelling {
    let class_of = |file: &PathBuf| -> Option<String> {
        let relative = file.strip_prefix(dir).ok()?;
        let mut parts = relative.components();
        let first = parts.next()?;
        parts
            .next()
            .map(|_| first.as_os_str().to_string_lossy().into_owned())
    };
    let classes: Vec<Option<String>> = files.iter().map(class_of).collect();
    let loose: Vec<&PathBuf> = files
        .iter()
        .zip(&classes)
        .filter(|(_, c)| c.is_none())
        .map(|(f, _)| f)
        .collect();
    let mut names: Vec<String> = classes.iter().flatten().cloned().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return unlabelled(format!(
            "image folder {} has no class subfolders (one folder of images per class)",
            dir.display()
        ));
    }
    if !loose.is_empty() {
        return Err(Unlabelled {
            why: format!(
                "image folder {} has {} image(s) at its top level (e.g. {}) beside the class subfolders {}: put each image in its class's folder, or train unconditionally (model.num_classes = 0)",
                dir.display(),
                loose.len(),
                loose[0].display(),
                shown_names(&names)
            ),
            ambiguous: true,
        });
    }
    warn_of_empty_class_folders(dir, &names);
    let labels = classes
        .iter()
        .map(|c| names.binary_search(c.as_ref().unwrap()).unwrap() as i64)
        .collect();
    Ok(Classes { labels, names })
}

/// A subfolder without images is not a class: said, since the user may have meant one.
fn warn_of_empty_class_folders(dir: &Path, names: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut empty: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| names.binary_search(name).is_err())
        .collect();
    empty.sort();
    for name in empty {
        tracing::warn!(
            "{} holds no images, so it is not one of the {} classes",
            dir.join(name).display(),
            names.len()
        );
    }
}

/// Class names as a message lists them: all of a few, the first ones of many.
pub fn shown_names(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let listed = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    match names.len() > SHOWN {
        true => format!("{listed}, … ({} in all)", names.len()),
        false => listed,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load, Dataset, LoadOptions};
    use crate::config::{CifarLabel, ClassCount, DataCache, DataFormat, ImageSize};
    use std::path::Path;

    fn options(channels: i64, size: i64) -> LoadOptions {
        LoadOptions {
            workers: 2,
            ..LoadOptions::at(DataFormat::Auto, channels, ImageSize::Square(size))
        }
    }

    fn labels_of(d: &Dataset) -> Vec<i64> {
        let all: Vec<i64> = (0..d.len() as i64).collect();
        Vec::<i64>::try_from(d.examples(&all, 0).unwrap().labels.unwrap()).unwrap()
    }

    fn idx(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn idx_labels_come_from_the_file_beside_the_images_and_must_count_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(&images, idx(0x0803, &[3, 2, 2], &[0; 12])).unwrap();
        // No label file: unlabelled, and a run that asks for classes is told why.
        let mut d = load(Some(&images), &options(1, 2)).unwrap();
        assert!(d
            .labelling()
            .as_ref()
            .unwrap_err()
            .why
            .contains("no label file"));
        let e = format!("{:#}", d.condition_on(ClassCount::Count(10)).unwrap_err());
        assert!(
            e.contains("model.num_classes = 10") && e.contains("train-images-idx3-ubyte"),
            "{e}"
        );
        // auto: unconditional, with a note.
        let mut d = load(Some(&images), &options(1, 2)).unwrap();
        assert!(d.condition_on(ClassCount::Auto).unwrap().is_empty());
        let labels = dir.path().join("train-labels-idx1-ubyte");
        std::fs::write(&labels, idx(0x0801, &[3], &[7, 0, 2])).unwrap();
        let mut d = load(Some(&images), &options(1, 2)).unwrap();
        assert_eq!(labels_of(&d), [7, 0, 2]);
        let names = d.condition_on(ClassCount::Auto).unwrap();
        assert_eq!(names.len(), 8);
        assert_eq!(names[7], "7");
        // A label at or above the classes asked for.
        let mut d = load(Some(&images), &options(1, 2)).unwrap();
        let e = format!("{:#}", d.condition_on(ClassCount::Count(5)).unwrap_err());
        assert!(
            e.contains("labels up to 7") && e.contains("model.num_classes = 5"),
            "{e}"
        );
        // Unconditional: the labels are dropped, batches carry none.
        let mut d = load(Some(&images), &options(1, 2)).unwrap();
        assert!(d.condition_on(ClassCount::Count(0)).unwrap().is_empty());
        assert!(d.examples(&[0], 0).unwrap().labels.is_none());
        // A label file of another length.
        std::fs::write(&labels, idx(0x0801, &[2], &[1, 2])).unwrap();
        let e = format!("{:#}", load(Some(&images), &options(1, 2)).err().unwrap());
        assert!(
            e.contains("train-labels-idx1-ubyte")
                && e.contains("2 labels")
                && e.contains("3 images"),
            "{e}"
        );
    }

    #[test]
    fn the_bundled_digits_carry_their_labels() {
        let d = load(None, &options(1, 28)).unwrap();
        let labels = labels_of(&d);
        assert_eq!(labels.len(), 5000);
        let mut counts = [0; 10];
        labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().all(|&c| c > 400), "{counts:?}");
    }

    fn cifar_record(labels: &[u8], fill: u8) -> Vec<u8> {
        let mut r = labels.to_vec();
        r.extend(std::iter::repeat_n(fill, 3072));
        r
    }

    #[test]
    fn cifar_labels_and_names_and_a_file_of_another_dataset() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=5u8 {
            std::fs::write(
                dir.path().join(format!("data_batch_{i}.bin")),
                [cifar_record(&[i], 0), cifar_record(&[9], 1)].concat(),
            )
            .unwrap();
        }
        let mut d = load(Some(dir.path()), &options(3, 32)).unwrap();
        assert_eq!(labels_of(&d), [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]);
        let names = d.condition_on(ClassCount::Auto).unwrap();
        assert_eq!(
            (names[0].as_str(), names[9].as_str()),
            ("airplane", "truck")
        );
        // A label CIFAR-10 does not have: named by file and record.
        std::fs::write(dir.path().join("data_batch_4.bin"), cifar_record(&[10], 0)).unwrap();
        let e = format!(
            "{:#}",
            load(Some(dir.path()), &options(3, 32)).err().unwrap()
        );
        assert!(
            e.contains("data_batch_4.bin") && e.contains("record 0") && e.contains("label 10"),
            "{e}"
        );

        // CIFAR-100: fine labels by default, coarse as asked; names from its files.
        let hundred = tempfile::tempdir().unwrap();
        let records = [cifar_record(&[3, 71], 0), cifar_record(&[19, 99], 0)].concat();
        std::fs::write(hundred.path().join("train.bin"), &records).unwrap();
        let coarse_names: String = (0..20).map(|i| format!("super{i}\n")).collect();
        std::fs::write(hundred.path().join("coarse_label_names.txt"), coarse_names).unwrap();
        let fine = load(Some(hundred.path()), &options(3, 32)).unwrap();
        assert_eq!(labels_of(&fine), [71, 99]);
        let mut coarse = load(
            Some(hundred.path()),
            &LoadOptions {
                cifar100_labels: CifarLabel::Coarse,
                ..options(3, 32)
            },
        )
        .unwrap();
        assert_eq!(labels_of(&coarse), [3, 19]);
        let names = coarse.condition_on(ClassCount::Auto).unwrap();
        assert_eq!((names.len(), names[19].as_str()), (20, "super19"));
        // A CIFAR-100 file read as CIFAR-10 is refused by its size.
        std::fs::write(dir.path().join("data_batch_1.bin"), &records).unwrap();
        let e = format!(
            "{:#}",
            load(Some(dir.path()), &options(3, 32)).err().unwrap()
        );
        assert!(
            e.contains("data_batch_1.bin") && e.contains("CIFAR-10"),
            "{e}"
        );
    }

    fn png(path: &Path, red: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([red, 0, 0]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn folder_classes_are_the_sorted_subfolders_and_follow_substituted_images() {
        let dir = tempfile::tempdir().unwrap();
        png(&dir.path().join("dogs/a.png"), 40);
        png(&dir.path().join("cats/b.png"), 80);
        std::fs::write(dir.path().join("cats/broken.png"), b"not a png").unwrap();
        png(&dir.path().join("cats/c.png"), 120);
        png(&dir.path().join("cats/kittens/d.png"), 160);
        for cache in [DataCache::On, DataCache::Off] {
            let mut d = load(
                Some(dir.path()),
                &LoadOptions {
                    cache,
                    ..options(3, 4)
                },
            )
            .unwrap();
            assert_eq!(d.condition_on(ClassCount::Auto).unwrap(), ["cats", "dogs"]);
            // cats/b, cats/broken (→ cats/c), cats/c, cats/kittens/d, dogs/a
            let all: Vec<i64> = (0..5).collect();
            let examples = d.examples(&all, 0).unwrap();
            let reds: Vec<i64> = (0..5)
                .map(|i| examples.images.int64_value(&[i, 0, 0, 0]))
                .collect();
            assert_eq!(reds, [80, 120, 120, 160, 40], "{cache:?}");
            assert_eq!(
                Vec::<i64>::try_from(examples.labels.unwrap()).unwrap(),
                [0, 0, 0, 0, 1],
                "{cache:?}"
            );
        }
        // An image beside the class folders: refused for a conditional run, even auto.
        png(&dir.path().join("loose.png"), 200);
        let mut d = load(Some(dir.path()), &options(3, 4)).unwrap();
        let e = format!("{:#}", d.condition_on(ClassCount::Auto).unwrap_err());
        assert!(
            e.contains("loose.png") && e.contains("\"cats\", \"dogs\""),
            "{e}"
        );
        // ... and fine for an unconditional one.
        let mut d = load(Some(dir.path()), &options(3, 4)).unwrap();
        assert!(d.condition_on(ClassCount::Count(0)).unwrap().is_empty());
        // A folder of loose images only has no classes.
        let flat = tempfile::tempdir().unwrap();
        png(&flat.path().join("x.png"), 0);
        let mut d = load(Some(flat.path()), &options(3, 4)).unwrap();
        assert!(d.condition_on(ClassCount::Auto).unwrap().is_empty());
    }
}
