//! Checkpoints: one safetensors file (weights, EMA weights, optimizer and loss-scaler state) and
//! a JSON sidecar (step, data position, config, versions, the weights file's SHA-256).
//!
//! Both files are written to a temporary name, synced and renamed, the sidecar last: a
//! checkpoint exists only once its sidecar does, and a damaged weights file fails its checksum.
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::config::RunConfig;
use crate::data::Position;

pub const FORMAT_VERSION: u32 = 1;

/// The sidecar: everything about a checkpoint that is not a tensor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sidecar {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the data order continues.
    pub position: Position,
    pub config: RunConfig,
    pub ddpm_version: String,
    pub torch_version: String,
    /// Seconds since the Unix epoch when written.
    pub written_at: u64,
    /// File name of the weights file, beside the sidecar.
    pub tensors_file: String,
    pub tensors_sha256: String,
    /// The names of the classes of a class-conditional model, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// SHA-256 of the sidecar's own JSON without this field, so that an edited or damaged
    /// sidecar is found out. Absent from checkpoints of earlier versions, read unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_sha256: Option<String>,
}

/// The checksum of a sidecar's JSON without its own checksum, over the JSON values (keys
/// sorted) rather than the struct, so that a later version with more fields still checks
/// the sidecars written before it.
fn contents_sha256(sidecar: &serde_json::Value) -> String {
    let mut contents = sidecar.clone();
    if let Some(fields) = contents.as_object_mut() {
        fields.remove("sidecar_sha256");
    }
    sha256_hex(contents.to_string().as_bytes())
}

impl Sidecar {
    /// The class names of the checkpoint's model, by id: those recorded, numbers for the rest.
    pub fn class_names(&self) -> Vec<String> {
        let count = self.config.model.num_classes.resolved();
        (0..count)
            .map(|i| {
                self.classes
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| i.to_string())
            })
            .collect()
    }

    /// Fails when the sidecar (`json`, as read from `path`) is not as written: its checksum
    /// differs from its contents, or its data position lies outside the data it records.
    fn check_intact(&self, json: &serde_json::Value, path: &Path) -> Result<()> {
        if let Some(recorded) = &self.sidecar_sha256 {
            if *recorded != contents_sha256(json) {
                bail!("{} is damaged or was edited: its contents do not match the SHA-256 it records (change a resumed run's settings with its keys' flags, e.g. train.lr)", path.display());
            }
        }
        let p = self.position;
        if let Some(images) = p.images.filter(|&n| p.index > n) {
            bail!(
                "{} is damaged: its data position (image {} of the epoch) lies outside the {images} images it records",
                path.display(),
                p.index
            );
        }
        Ok(())
    }
}

/// The sidecar path of the checkpoint at `step` in `dir`.
pub fn sidecar_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.json"))
}

/// The name of step `step`'s weights file, beside its sidecar.
fn weights_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// Whether two paths name the same existing file or folder.
pub fn same_place(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Serialises named tensors into safetensors bytes (any device, any supported dtype).
pub fn to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Double => Dtype::F64,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Uint8 => Dtype::U8,
            other => bail!("tensor {name}: dtype {other:?} is not saved in checkpoints"),
        };
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        owned.push((
            name.clone(),
            dtype,
            t.size().iter().map(|&d| d as usize).collect(),
            bytes,
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, &None)?)
}

/// Parses safetensors bytes into CPU tensors by name; `origin` names the file in errors.
pub fn from_safetensors(bytes: &[u8], origin: &Path) -> Result<BTreeMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", origin.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::U8 => Kind::Uint8,
            other => bail!(
                "{}: tensor {name} has unsupported dtype {other:?}",
                origin.display()
            ),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder.
/// On any failure the previous file at `path` is untouched and the error names the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display());
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Bytes as lower-case hexadecimal, as checksums are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Saves a checkpoint (of a model of the classes `classes`) into `dir` and removes all but the
/// newest `checkpoint.keep` that are not pinned.
pub fn save(
    dir: &Path,
    tensors: &[(String, Tensor)],
    step: u64,
    position: Position,
    config: &RunConfig,
    classes: &[String],
) -> Result<PathBuf> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create checkpoint folder {}", dir.display()))?;
    let bytes = to_safetensors(tensors)?;
    let tensors_file = weights_name(step);
    write_atomic(&dir.join(&tensors_file), &bytes)?;
    let sidecar = Sidecar {
        format_version: FORMAT_VERSION,
        step,
        position,
        config: config.clone(),
        ddpm_version: env!("CARGO_PKG_VERSION").into(),
        torch_version: crate::ops::torch_version(),
        written_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        tensors_file,
        tensors_sha256: sha256_hex(&bytes),
        classes: classes.to_vec(),
        sidecar_sha256: None,
    };
    let sidecar = Sidecar {
        sidecar_sha256: Some(contents_sha256(&serde_json::to_value(&sidecar)?)),
        ..sidecar
    };
    let path = sidecar_path(dir, step);
    write_atomic(&path, serde_json::to_string_pretty(&sidecar)?.as_bytes())?;
    prune(
        dir,
        step,
        config.checkpoint.keep,
        config.checkpoint.pin_every,
    )?;
    Ok(path)
}

/// Sidecars in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                    && p.extension().is_some_and(|e| e == "json")
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    found.sort();
    Ok(found)
}

/// Weights files `step-N.safetensors` in `dir` without their sidecar: saves killed before they
/// finished.
fn unfinished_saves(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension().is_some_and(|e| e == "safetensors")
                && step_of(path).is_some_and(|step| !sidecar_path(dir, step).exists())
        })
        .collect();
    found.sort();
    found
}

/// The step in a file name `step-N.ext` (checkpoints, sample grids).
pub fn step_of(path: &Path) -> Option<u64> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.strip_prefix("step-"))
        .and_then(|s| s.parse::<u64>().ok())
}

/// The lock a `ddpm watch` process holds in the checkpoints folder while it follows the run;
/// it holds the watcher's [`WatchMark`].
pub const WATCH_LOCK: &str = ".watch.lock";

/// What a running `ddpm watch` has still to measure, which pruning leaves alone: the
/// checkpoints after `measured_through` whose steps are multiples of `every` (0 or 1: all).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WatchMark {
    pub pid: u32,
    pub measured_through: Option<u64>,
    pub every: u64,
}

impl WatchMark {
    pub fn wants(&self, step: u64) -> bool {
        self.measured_through.is_none_or(|done| step > done)
            && (self.every <= 1 || step.is_multiple_of(self.every))
    }
}

/// The mark of the watcher that follows the checkpoints in `dir` now (holds its lock), if one
/// does. A mark being rewritten (unreadable for a moment) wants every checkpoint. A watcher that
/// was killed holds nothing: its mark never keeps checkpoints from pruning.
pub fn running_watcher(dir: &Path) -> Option<WatchMark> {
    let path = dir.join(WATCH_LOCK);
    let file = fs::File::open(&path).ok()?;
    if !matches!(file.try_lock_shared(), Err(fs::TryLockError::WouldBlock)) {
        return None;
    }
    let unread = WatchMark {
        pid: 0,
        measured_through: None,
        every: 0,
    };
    let text = fs::read_to_string(&path).unwrap_or_default();
    Some(serde_json::from_str(&text).unwrap_or(unread))
}

/// A checkpoint is pinned by `pin_every` or by a `step-N.keep` file beside it.
fn is_pinned(sidecar: &Path, pin_every: u64) -> bool {
    let by_interval = matches!(step_of(sidecar), Some(s) if pin_every > 0 && s % pin_every == 0);
    by_interval || sidecar.with_extension("keep").exists()
}

/// Removes all but the newest `keep` unpinned checkpoints up to `step` (the one just written),
/// and the temporary files of writes that a killed process left behind. Later checkpoints are
/// ones a resume passed over as damaged: they do not count, so that they never push out good
/// ones, and are removed once checked damaged (a later one that is intact stays).
fn prune(dir: &Path, step: u64, keep: usize, pin_every: u64) -> Result<()> {
    // Leftovers of a save that was killed: a temporary file, or weights whose sidecar was never
    // written (no checkpoint without it).
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".step-") && name.ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    for weights in unfinished_saves(dir) {
        let _ = fs::remove_file(weights);
    }
    let watcher = running_watcher(dir);
    let (earlier, later): (Vec<PathBuf>, Vec<PathBuf>) = list(dir)?
        .into_iter()
        .filter(|p| !is_pinned(p, pin_every))
        .filter(|p| !step_of(p).is_some_and(|s| watcher.is_some_and(|w| w.wants(s))))
        .partition(|p| step_of(p).is_some_and(|s| s <= step));
    for old in &earlier[..earlier.len().saturating_sub(keep)] {
        remove_checkpoint(dir, old)?;
    }
    let newer_format = |p: &Path| format_version(p).is_some_and(|v| v > FORMAT_VERSION);
    for damaged in later
        .iter()
        .filter(|p| !newer_format(p) && Checkpoint::load_file(p).is_err())
    {
        remove_checkpoint(dir, damaged)?;
    }
    Ok(())
}

/// Removes the checkpoints in `dir` of steps after `step`.
pub fn remove_after(dir: &Path, step: u64) -> Result<()> {
    for later in list(dir)?
        .iter()
        .filter(|p| step_of(p).is_some_and(|s| s > step))
    {
        remove_checkpoint(dir, later)?;
    }
    Ok(())
}

/// Removes a checkpoint's weights (named by its sidecar, or by its step when the sidecar cannot
/// be read) and then its sidecar.
fn remove_checkpoint(dir: &Path, sidecar: &Path) -> Result<()> {
    let weights = match read_sidecar(sidecar) {
        Ok(s) => Some(s.tensors_file),
        Err(_) => step_of(sidecar).map(weights_name),
    };
    if let Some(weights) = weights {
        let _ = fs::remove_file(dir.join(weights));
    }
    fs::remove_file(sidecar)
        .with_context(|| format!("cannot remove old checkpoint {}", sidecar.display()))
}

/// The format version a sidecar declares, if it can be read (whatever else it holds).
fn format_version(sidecar: &Path) -> Option<u32> {
    let text = fs::read_to_string(sidecar).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["format_version"].as_u64()?.try_into().ok()
}

pub fn read_sidecar(path: &Path) -> Result<Sidecar> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read checkpoint sidecar {}", path.display()))?;
    let invalid = || format!("{} is not a valid checkpoint sidecar", path.display());
    let json: serde_json::Value = serde_json::from_str(&text).with_context(invalid)?;
    let sidecar = Sidecar::deserialize(&json).with_context(invalid)?;
    if sidecar.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} is not supported (this ddpm reads format {FORMAT_VERSION})",
            path.display(),
            sidecar.format_version
        );
    }
    sidecar.check_intact(&json, path)?;
    sidecar
        .config
        .validate()
        .with_context(|| format!("{}: the configuration it records", path.display()))?;
    Ok(sidecar)
}

/// A loaded checkpoint: its sidecar and its tensors (on the CPU).
pub struct Checkpoint {
    pub path: PathBuf,
    pub sidecar: Sidecar,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Loads a checkpoint from its sidecar, a weights file, or a folder of checkpoints (the newest
    /// valid one there; damaged newer ones are named in a warning and passed over). A run
    /// directory is read through `run_dir::load_checkpoint`, which knows its layout.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{}: no such run directory or checkpoint", path.display());
        }
        if !path.is_dir() {
            let sidecar = match path.extension().is_some_and(|e| e == "safetensors") {
                true => path.with_extension("json"),
                false => path.to_path_buf(),
            };
            return Self::load_file(&sidecar);
        }
        if list(path)?.is_empty() {
            let unfinished = unfinished_saves(path);
            let unfinished = match unfinished.first() {
                None => String::new(),
                Some(first) => format!(
                    " ({} weights file(s) without their .json sidecar, e.g. {}: saves that never finished, which cannot be resumed and which a new run replaces)",
                    unfinished.len(),
                    first.display()
                ),
            };
            bail!("no checkpoint found in {}{unfinished}", path.display());
        }
        match Self::newest_up_to(path, u64::MAX)? {
            Some(checkpoint) => Ok(checkpoint),
            None => bail!("every checkpoint in {} is damaged", path.display()),
        }
    }

    /// The newest valid checkpoint in `dir` of a step up to `step`; damaged ones are named in a
    /// warning and passed over. None if there is none.
    pub fn newest_up_to(dir: &Path, step: u64) -> Result<Option<Self>> {
        let candidates = list(dir)?;
        let eligible = candidates
            .iter()
            .rev()
            .filter(|p| step_of(p).is_some_and(|s| s <= step));
        for candidate in eligible {
            // Not damage: passing over it would let this run's saves replace it.
            if let Some(version) = format_version(candidate).filter(|&v| v > FORMAT_VERSION) {
                bail!(
                    "{} was written by a newer ddpm (checkpoint format {version}; this one reads format {FORMAT_VERSION}): use that version, or name an older checkpoint file of the run",
                    candidate.display()
                );
            }
            match Self::load_file(candidate) {
                Ok(c) => return Ok(Some(c)),
                Err(e) => {
                    tracing::warn!("skipping damaged checkpoint {}: {e:#}", candidate.display())
                }
            }
        }
        Ok(None)
    }

    /// The checkpoint of this sidecar file (its weights checked against it).
    pub fn load_file(sidecar_path: &Path) -> Result<Self> {
        let sidecar = read_sidecar(sidecar_path)?;
        // The sidecar has no checksum of its own: its step must at least be its name's.
        if let Some(named) = step_of(sidecar_path).filter(|&s| s != sidecar.step) {
            bail!(
                "{} is damaged: it records step {}, its name step {named}",
                sidecar_path.display(),
                sidecar.step
            );
        }
        let tensors_path = sidecar_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&sidecar.tensors_file);
        let bytes = fs::read(&tensors_path).with_context(|| {
            format!("cannot read checkpoint weights {}", tensors_path.display())
        })?;
        if sha256_hex(&bytes) != sidecar.tensors_sha256 {
            bail!(
                "{} is damaged: its SHA-256 does not match the one recorded in {}",
                tensors_path.display(),
                sidecar_path.display()
            );
        }
        let tensors = from_safetensors(&bytes, &tensors_path)?;
        Ok(Checkpoint {
            path: sidecar_path.to_path_buf(),
            sidecar,
            tensors,
        })
    }

    /// The tensor `name`, or an error naming the checkpoint.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("checkpoint {} lacks tensor {name}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tensors() -> Vec<(String, Tensor)> {
        vec![
            (
                "a.weight".into(),
                Tensor::randn([3, 4], (Kind::Float, Device::Cpu)),
            ),
            ("b".into(), Tensor::from_slice(&[1.5f64, -2.0])),
            ("c".into(), Tensor::from_slice(&[7i64])),
            (
                "d".into(),
                Tensor::randn([2], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16),
            ),
        ]
    }

    #[test]
    fn round_trip_restores_identical_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunConfig::preset("tiny").unwrap();
        let tensors = sample_tensors();
        let path = save(
            dir.path(),
            &tensors,
            12,
            Position {
                epoch: 3,
                index: 40,
                images: Some(50),
            },
            &config,
            &[],
        )
        .unwrap();
        let loaded = Checkpoint::load(&path).unwrap();
        assert_eq!(loaded.sidecar.step, 12);
        assert_eq!(
            loaded.sidecar.position,
            Position {
                epoch: 3,
                index: 40,
                images: Some(50),
            }
        );
        assert_eq!(loaded.sidecar.config, config);
        for (name, t) in &tensors {
            let back = loaded.tensor(name).unwrap();
            assert_eq!(back.kind(), t.kind());
            assert!(back.equal(t), "{name}");
        }
    }

    #[test]
    fn an_edited_sidecar_is_damaged_and_an_older_one_without_a_checksum_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunConfig::preset("tiny").unwrap();
        let position = Position {
            epoch: 0,
            index: 64,
            images: Some(5000),
        };
        let path = save(dir.path(), &sample_tensors(), 3, position, &config, &[]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let edit = |from: &str, to: &str| {
            assert!(text.contains(from), "{from}: {text}");
            fs::write(&path, text.replace(from, to)).unwrap();
            format!("{:#}", Checkpoint::load(&path).err().unwrap())
        };
        let lr = format!("\"lr\": {}", config.train.lr);
        let e = edit(&lr, "\"lr\": 0.5");
        assert!(e.contains("do not match the SHA-256 it records"), "{e}");
        let e = edit("\"index\": 64", "\"index\": 99999");
        assert!(e.contains("do not match"), "{e}");
        // Without a checksum (a sidecar written before there was one): read, but a position
        // outside the data is still refused.
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json.as_object_mut().unwrap().remove("sidecar_sha256");
        fs::write(&path, json.to_string()).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap().sidecar.position, position);
        json["position"]["index"] = 99999.into();
        fs::write(&path, json.to_string()).unwrap();
        let e = format!("{:#}", Checkpoint::load(&path).err().unwrap());
        assert!(e.contains("lies outside the 5000 images it records"), "{e}");
    }

    #[test]
    fn a_watcher_keeps_what_it_has_not_measured_only_while_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::preset("tiny").unwrap();
        config.checkpoint.keep = 1;
        let save_step = |step: u64| {
            save(
                dir.path(),
                &sample_tensors(),
                step,
                Position::default(),
                &config,
                &[],
            )
            .unwrap();
        };
        let steps = || -> Vec<u64> {
            list(dir.path())
                .unwrap()
                .iter()
                .filter_map(|p| step_of(p))
                .collect()
        };
        let mark = |measured_through: Option<u64>, every: u64| {
            let m = WatchMark {
                pid: 1,
                measured_through,
                every,
            };
            fs::write(
                dir.path().join(WATCH_LOCK),
                serde_json::to_string(&m).unwrap(),
            )
            .unwrap();
        };
        // A mark without a live watcher (one that was killed) keeps nothing.
        mark(None, 0);
        save_step(1);
        save_step(2);
        assert_eq!(steps(), [2]);
        let lock = fs::File::open(dir.path().join(WATCH_LOCK)).unwrap();
        lock.lock().unwrap();
        // Measured through step 2, every 4th step wanted: 3 goes, 4 stays.
        mark(Some(2), 4);
        assert_eq!(running_watcher(dir.path()).map(|w| w.every), Some(4));
        for step in 3..=6 {
            save_step(step);
        }
        assert_eq!(steps(), [4, 6]);
        // Being rewritten (empty for a moment): everything stays.
        fs::write(dir.path().join(WATCH_LOCK), b"").unwrap();
        save_step(7);
        assert_eq!(steps(), [4, 6, 7]);
        drop(lock);
        assert_eq!(running_watcher(dir.path()), None);
        save_step(8);
        assert_eq!(steps(), [8]);
    }

    #[test]
    fn keeps_the_newest_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::preset("tiny").unwrap();
        config.checkpoint.keep = 2;
        config.checkpoint.pin_every = 5;
        for step in 1..=7 {
            if step == 2 {
                fs::write(dir.path().join("step-00000002.keep"), b"").unwrap();
            }
            if step == 4 {
                // A save killed between the weights and the sidecar left weights alone.
                fs::write(dir.path().join("step-00000003.safetensors"), b"part").unwrap();
                fs::remove_file(sidecar_path(dir.path(), 3)).unwrap();
            }
            save(
                dir.path(),
                &sample_tensors(),
                step,
                Position::default(),
                &config,
                &[],
            )
            .unwrap();
        }
        let names: Vec<String> = list(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![
                "step-00000002.json",
                "step-00000005.json",
                "step-00000006.json",
                "step-00000007.json"
            ]
        );
        for gone in ["step-00000001.safetensors", "step-00000003.safetensors"] {
            assert!(!dir.path().join(gone).exists(), "{gone}");
        }
        // A save of an earlier step (a resume that passed over damaged later checkpoints) keeps
        // the newest up to its step; the later ones do not count, and go if damaged.
        config.checkpoint.keep = 1;
        fs::write(sidecar_path(dir.path(), 6), b"{\"format_version\": 1, \"st").unwrap();
        let save_at = |step: u64, config: &RunConfig| {
            save(
                dir.path(),
                &sample_tensors(),
                step,
                Position::default(),
                config,
                &[],
            )
            .unwrap()
        };
        save_at(4, &config);
        let steps: Vec<u64> = list(dir.path())
            .unwrap()
            .iter()
            .filter_map(|p| step_of(p))
            .collect();
        assert_eq!(steps, [2, 4, 5, 7]);
        assert!(!dir.path().join("step-00000006.safetensors").exists());
        // Truncate the newest weights file: loading the folder falls back to the previous one.
        let newest = dir.path().join("step-00000007.safetensors");
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let err = Checkpoint::load(&sidecar_path(dir.path(), 7))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("step-00000007.safetensors"),
            "{err:#}"
        );
        assert_eq!(Checkpoint::load(dir.path()).unwrap().sidecar.step, 5);
        // A truncated sidecar is passed over the same way.
        fs::write(sidecar_path(dir.path(), 5), b"{\"format_version\": 1, \"st").unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap().sidecar.step, 4);
        // A sidecar whose step is not its name's is damaged.
        let text = fs::read_to_string(sidecar_path(dir.path(), 4)).unwrap();
        fs::write(
            sidecar_path(dir.path(), 4),
            text.replace("\"step\": 4,", "\"step\": 40,"),
        )
        .unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap().sidecar.step, 2);
        // One from a newer ddpm is not damage: refused, and kept by saves of earlier steps.
        let newer = sidecar_path(dir.path(), 9);
        fs::write(&newer, b"{\"format_version\": 2, \"future\": true}").unwrap();
        let err = format!("{:#}", Checkpoint::load(dir.path()).err().unwrap());
        assert!(
            err.contains("step-00000009.json was written by a newer ddpm (checkpoint format 2"),
            "{err}"
        );
        save_at(8, &config);
        assert!(newer.exists());
    }

    #[test]
    fn unwritable_folder_is_named_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("x.bin");
        let err = write_atomic(&missing, b"data").unwrap_err();
        assert!(format!("{err:#}").contains("no-such-dir"), "{err:#}");
    }

    /// A tiny tmpfs. Mounting needs root: elsewhere the test says so and passes, except under CI
    /// (`CI` set), whose machines run as root and where it must run.
    struct TinyDisk(tempfile::TempDir);

    impl TinyDisk {
        fn mount(bytes: usize) -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(TinyDisk(dir))
        }
    }

    impl Drop for TinyDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_names_the_path_and_keeps_the_previous_checkpoint() {
        let Some(disk) = TinyDisk::mount(256 * 1024) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root and must run the full-disk test, but cannot mount a tmpfs"
            );
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return;
        };
        let config = RunConfig::preset("tiny").unwrap();
        let small = vec![(
            "w".to_string(),
            Tensor::ones([1000], (Kind::Float, Device::Cpu)),
        )];
        let first = save(disk.0.path(), &small, 1, Position::default(), &config, &[]).unwrap();
        let big = vec![(
            "w".to_string(),
            Tensor::ones([100_000], (Kind::Float, Device::Cpu)),
        )];
        let err = format!(
            "{:#}",
            save(disk.0.path(), &big, 2, Position::default(), &config, &[]).unwrap_err()
        );
        assert!(err.contains("step-00000002.safetensors"), "{err}");
        let back = Checkpoint::load(disk.0.path()).unwrap();
        assert_eq!(back.path, first);
        assert!(back.tensor("w").unwrap().equal(&small[0].1));
        // The failed attempt left no temporary file behind.
        let leftovers: Vec<_> = fs::read_dir(disk.0.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
