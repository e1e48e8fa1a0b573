//! The image files under a folder: listed by a parallel walk, and kept in the cache folder so
//! that a restart or a resume on a million files does not walk them again. A kept index is used
//! while every folder it listed has the modification time it had when listed (adding, removing or
//! renaming an entry changes its folder's time).
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::formats::is_image_file;

/// Folders with fewer images are walked each time: it takes milliseconds.
const CACHED_FROM: usize = 10_000;

/// A folder whose time is this close to the walk may still change within the same tick of a
/// coarse file-system clock, unseen: such an index is not kept.
const SETTLING: Duration = Duration::from_secs(2);

/// Bumped when what is kept changes meaning.
const INDEX_VERSION: u32 = 1;

/// Every image file under `dir`, recursively, in sorted order, from the kept index when the
/// folder has not changed since it was made. The walk's warnings (folders skipped) are said
/// again when the index is reused.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let store = crate::cache::dir().ok().map(|d| d.join("folder-index"));
    image_files_kept_in(dir, store.as_deref(), CACHED_FROM)
}

/// `image_files`, keeping indexes of at least `cached_from` files in `store` (None: never).
pub fn image_files_kept_in(
    dir: &Path,
    store: Option<&Path>,
    cached_from: usize,
) -> Result<Vec<PathBuf>> {
    let root = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let kept = store.map(|s| s.join(format!("{}.json", key_of(&root))));
    if let Some(index) = kept.as_deref().and_then(|f| Index::read(f, &root)) {
        tracing::debug!(
            "image folder {}: the kept index of {} files",
            dir.display(),
            index.files.len()
        );
        return Ok(index.into_files(dir));
    }
    let started = SystemTime::now();
    let walk = Walk::new(dir, &root);
    let index = walk.run()?;
    let files = index.files_under(dir);
    if let Some(kept) = kept.filter(|_| index.files.len() >= cached_from) {
        if index.is_settled(started) {
            if let Err(e) = index.write(&kept) {
                tracing::debug!("the index of {} is not kept: {e:#}", dir.display());
            }
        }
    }
    index.warn();
    if files.is_empty() {
        bail!(
            "image folder {} holds no PNG, JPEG, WebP, BMP or GIF files",
            dir.display()
        );
    }
    Ok(files)
}

/// The name of a folder's index: its canonical path, hashed.
fn key_of(root: &Path) -> String {
    let digest = Sha256::digest(root.as_os_str().as_encoded_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a walk found, as kept: paths relative to the folder walked.
#[derive(Serialize, Deserialize)]
struct Index {
    version: u32,
    root: PathBuf,
    /// Every folder listed, with its modification time (ns since the epoch) before listing.
    folders: Vec<(PathBuf, u128)>,
    files: Vec<PathBuf>,
    warnings: Vec<String>,
    /// Whether a folder could not be listed: its later contents would go unseen.
    incomplete: bool,
}

impl Index {
    /// The kept index at `file`, when it is one of `root` and no folder of it has changed.
    fn read(file: &Path, root: &Path) -> Option<Index> {
        let index: Index = serde_json::from_slice(&fs::read(file).ok()?).ok()?;
        let unchanged = index.version == INDEX_VERSION
            && index.root == root
            && index
                .folders
                .par_iter()
                .all(|(folder, time)| modified(&root.join(folder)) == Some(*time));
        unchanged.then_some(index)
    }

    fn write(&self, file: &Path) -> Result<()> {
        let folder = file.parent().expect("an index file is in a folder");
        fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let partial = file.with_extension(format!("partial.{}", std::process::id()));
        fs::write(&partial, serde_json::to_vec(self)?)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        fs::rename(&partial, file).with_context(|| format!("cannot write {}", file.display()))
    }

    /// Whether the index may be kept: complete, and no folder changed too recently to tell.
    fn is_settled(&self, walk_started: SystemTime) -> bool {
        let since_epoch = walk_started
            .checked_sub(SETTLING)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        !self.incomplete && self.folders.iter().all(|(_, time)| *time < since_epoch)
    }

    fn warn(&self) {
        for warning in &self.warnings {
            tracing::warn!("{warning}");
        }
    }

    fn files_under(&self, dir: &Path) -> Vec<PathBuf> {
        self.files.iter().map(|f| dir.join(f)).collect()
    }

    fn into_files(self, dir: &Path) -> Vec<PathBuf> {
        self.warn();
        self.files_under(dir)
    }
}

fn modified(path: &Path) -> Option<u128> {
    let time = fs::metadata(path).ok()?.modified().ok()?;
    Some(time.duration_since(UNIX_EPOCH).ok()?.as_nanos())
}

/// A walk of one folder: real subfolders in parallel; folders reached through symbolic links
/// after all real ones, one link at a time in sorted order, so that a folder reached twice is
/// listed under the same path whatever order the file system and the threads go in.
struct Walk<'a> {
    dir: &'a Path,
    real_root: &'a Path,
    seen: Mutex<HashSet<PathBuf>>,
    warnings: Mutex<Vec<String>>,
    folders: Mutex<Vec<(PathBuf, u128)>>,
    incomplete: std::sync::atomic::AtomicBool,
}

/// What one folder and the real folders under it hold.
#[derive(Default)]
struct Listing {
    files: Vec<PathBuf>,
    links: Vec<PathBuf>,
}

impl Listing {
    fn merge(mut self, other: Listing) -> Listing {
        self.files.extend(other.files);
        self.links.extend(other.links);
        self
    }
}

impl<'a> Walk<'a> {
    fn new(dir: &'a Path, real_root: &'a Path) -> Self {
        Walk {
            dir,
            real_root,
            seen: Mutex::default(),
            warnings: Mutex::default(),
            folders: Mutex::default(),
            incomplete: Default::default(),
        }
    }

    fn run(self) -> Result<Index> {
        let mut listing = self.list(self.dir)?;
        let mut files = std::mem::take(&mut listing.files);
        let mut links = listing.links;
        while !links.is_empty() {
            links.sort();
            let mut next = Vec::new();
            for link in links {
                let found = self.visit(link);
                files.extend(found.files);
                next.extend(found.links);
            }
            links = next;
        }
        files.sort();
        let relative = |p: PathBuf| p.strip_prefix(self.dir).map(Path::to_path_buf).unwrap_or(p);
        let mut folders = self.folders.into_inner().unwrap();
        folders.sort();
        let mut warnings = self.warnings.into_inner().unwrap();
        warnings.sort();
        Ok(Index {
            version: INDEX_VERSION,
            root: self.real_root.to_path_buf(),
            folders: folders.into_iter().map(|(f, t)| (relative(f), t)).collect(),
            files: files.into_iter().map(relative).collect(),
            warnings,
            incomplete: self.incomplete.into_inner(),
        })
    }

    fn warn(&self, text: String) {
        self.warnings.lock().unwrap().push(text);
    }

    /// The files under `d` (a folder below the root) and the links met, or nothing with a
    /// warning when it is not to be read.
    fn visit(&self, d: PathBuf) -> Listing {
        // A folder reached twice (a symbolic link to a parent, or two links to one place)
        // would repeat its images; a link to a folder above the data folder would bring in
        // everything beside it.
        let real = fs::canonicalize(&d).unwrap_or_else(|_| d.clone());
        if self.real_root.starts_with(&real) {
            let target = match real == self.real_root {
                true => "the data folder itself".to_string(),
                false => format!("{}, which holds the data folder", real.display()),
            };
            self.warn(format!("skipping {}: a link to {target}", d.display()));
            return Listing::default();
        }
        if !self.seen.lock().unwrap().insert(real) {
            self.warn(format!(
                "skipping {}: a link to a folder already read",
                d.display()
            ));
            return Listing::default();
        }
        if is_run_directory(&d) {
            self.warn(format!(
                "skipping {}: a ddpm run directory (its grids and plots are not training data)",
                d.display()
            ));
            return Listing::default();
        }
        self.list(&d).unwrap_or_else(|e| {
            self.warn(format!("skipping {}: cannot list it: {e:#}", d.display()));
            self.incomplete
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Listing::default()
        })
    }

    /// The entries of `d`, with its real subfolders visited in parallel.
    fn list(&self, d: &Path) -> Result<Listing> {
        let time = modified(d).unwrap_or(0);
        let entries = fs::read_dir(d).with_context(|| format!("cannot list {}", d.display()))?;
        let mut here = Listing::default();
        let mut folders = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", d.display()))?;
            let path = entry.path();
            // The entry's type comes with the listing on most file systems: no call per file.
            let kind = entry
                .file_type()
                .with_context(|| format!("cannot read the type of {}", path.display()))?;
            if kind.is_dir() {
                folders.push(path);
            } else if kind.is_symlink() && path.is_dir() {
                here.links.push(path);
            } else if is_image_file(&path) {
                here.files.push(path);
            }
        }
        self.folders.lock().unwrap().push((d.to_path_buf(), time));
        Ok(folders
            .into_par_iter()
            .map(|f| self.visit(f))
            .reduce(Listing::default, Listing::merge)
            .merge(here))
    }
}

/// What `ddpm train` writes into its run directory.
fn is_run_directory(dir: &Path) -> bool {
    dir.join("config.toml").is_file() && dir.join("samples").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets a folder's modification time (a directory opened read-only takes new times).
    fn set_time(folder: &Path, time: SystemTime) {
        fs::File::open(folder).unwrap().set_modified(time).unwrap();
    }

    fn index_files(store: &Path) -> Vec<PathBuf> {
        fs::read_dir(store)
            .map(|e| e.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_kept_index_is_used_until_a_folder_in_it_changes() {
        let data = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for class in ["a", "b"] {
            fs::create_dir(data.path().join(class)).unwrap();
            for i in 0..3 {
                fs::write(data.path().join(class).join(format!("{i}.png")), b"").unwrap();
            }
            set_time(&data.path().join(class), an_hour_ago);
        }
        set_time(data.path(), an_hour_ago);
        let walked = image_files_kept_in(data.path(), Some(store.path()), 1).unwrap();
        assert_eq!(walked.len(), 6);
        assert_eq!(index_files(store.path()).len(), 1);

        // A file added behind the index's back (its folder's time put back) goes unseen: the
        // kept index was read, not the folder.
        let a = data.path().join("a");
        fs::write(a.join("new.png"), b"").unwrap();
        set_time(&a, an_hour_ago);
        let kept = image_files_kept_in(data.path(), Some(store.path()), 1).unwrap();
        assert_eq!(kept, walked);

        // Once the folder's time moves, the folder is walked again.
        set_time(&a, an_hour_ago + Duration::from_secs(1));
        let again = image_files_kept_in(data.path(), Some(store.path()), 1).unwrap();
        assert_eq!(again.len(), 7);
        assert!(again.contains(&a.join("new.png")));
        // The new walk is kept in place of the old one.
        assert_eq!(index_files(store.path()).len(), 1);
        let kept = image_files_kept_in(data.path(), Some(store.path()), 1).unwrap();
        assert_eq!(kept, again);
    }

    #[test]
    fn small_folders_and_folders_changed_just_now_are_not_kept() {
        let data = tempfile::tempdir().unwrap();
        fs::write(data.path().join("x.png"), b"").unwrap();
        let store = tempfile::tempdir().unwrap();
        // Fewer files than indexes are kept from.
        set_time(data.path(), SystemTime::now() - Duration::from_secs(3600));
        image_files_kept_in(data.path(), Some(store.path()), 2).unwrap();
        assert!(index_files(store.path()).is_empty());
        // Changed within the file system clock's tick: a later change could go unseen.
        set_time(data.path(), SystemTime::now());
        image_files_kept_in(data.path(), Some(store.path()), 1).unwrap();
        assert!(index_files(store.path()).is_empty());
    }

    #[test]
    fn a_damaged_index_is_walked_over() {
        let data = tempfile::tempdir().unwrap();
        fs::write(data.path().join("x.png"), b"").unwrap();
        set_time(data.path(), SystemTime::now() - Duration::from_secs(3600));
        let store = tempfile::tempdir().unwrap();
        let walked = image_files_kept_in(data.path(), Some(store.path()), 1).unwrap();
        let [index] = &index_files(store.path())[..] else {
            panic!("one index kept")
        };
        fs::write(index, b"{\"version\": 1, \"root\"").unwrap();
        assert_eq!(
            image_files_kept_in(data.path(), Some(store.path()), 1).unwrap(),
            walked
        );
    }
}
