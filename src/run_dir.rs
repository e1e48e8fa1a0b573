//! The run directory: everything a run writes and reads back. Opening a run (new, resumed,
//! resumed from the newest checkpoint, the checks on a new run's folder), the lock, `config.toml`, checkpoints (save, prune,
//! the newest valid one, the rollback target), `metrics.jsonl` (append, rewind), the sample
//! grids and the views built from them (animation, loss plot, report).
//!
//! Ranks other than 0 of a data-parallel run hold a view that writes nothing.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::Tensor;

use crate::checkpoint::{self, Checkpoint};
use crate::config::RunConfig;
use crate::data::Position;
use crate::posthoc_ema;
use crate::tensorboard::{self, EventFile};

/// The file a trainer holds locked in its run directory, holding its process id.
pub const LOCK_FILE: &str = ".lock";

/// Whether the run this process writes has a checkpoint on disk: what a second Ctrl-C, which
/// quits at once, can tell the user (its signal handler may only read an atomic).
pub static CHECKPOINT_ON_DISK: AtomicBool = AtomicBool::new(false);

/// What a run writes at the top of its directory.
const RUN_FILES: [&str; 6] = [
    "config.toml",
    "metrics.jsonl",
    "report.html",
    "loss.png",
    "samples",
    "checkpoints",
];

/// Why a folder cannot be opened as asked, and what would do instead; the program that
/// embeds the library words the remedies in its own terms (the `ddpm` command line: its flags).
#[derive(Debug)]
pub struct Refusal {
    pub problem: String,
    /// The ways out, the likelier first.
    pub remedies: Vec<Remedy>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Remedy {
    /// Write the run into another folder.
    ChooseAnotherFolder,
    /// Write the run into a new or empty folder.
    ChooseEmptyFolder,
    /// Resume the run in this directory.
    Resume(PathBuf),
    /// Resume the run that owns the checkpoints in the way.
    ResumeThatRun,
    /// Continue from this checkpoint into a new folder.
    ContinueIntoNewFolder(PathBuf),
    /// Start the run again from step 0 with its configuration file.
    Restart { config: PathBuf, run: PathBuf },
}

impl std::fmt::Display for Remedy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Remedy::ChooseAnotherFolder => write!(f, "choose another run directory"),
            Remedy::ChooseEmptyFolder => write!(f, "choose a new or empty folder"),
            Remedy::Resume(run) => write!(f, "resume {}", run.display()),
            Remedy::ResumeThatRun => write!(f, "resume that run itself"),
            Remedy::ContinueIntoNewFolder(from) => {
                write!(
                    f,
                    "continue from {} into a new run directory",
                    from.display()
                )
            }
            Remedy::Restart { config, run } => write!(
                f,
                "start it again from step 0 with {} into {}",
                config.display(),
                run.display()
            ),
        }
    }
}

impl Refusal {
    fn new(problem: String, remedies: Vec<Remedy>) -> anyhow::Error {
        anyhow::Error::new(Refusal { problem, remedies })
    }

    /// The problem and its remedies, each remedy worded by `word`.
    pub fn words(&self, word: impl Fn(&Remedy) -> String) -> String {
        let remedies: Vec<String> = self.remedies.iter().map(word).collect();
        format!("{}: {}", self.problem, remedies.join(", or "))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words(Remedy::to_string))
    }
}

impl std::error::Error for Refusal {}

/// A run directory opened by this process.
pub struct RunDir {
    root: PathBuf,
    /// The lock and the open metrics file; None on a view that writes nothing.
    writer: Option<Writer>,
    config: RunConfig,
    /// The names of the model's classes, by id (class-conditional models).
    classes: Vec<String>,
    /// The step whose checkpoint is on disk, if one is.
    saved_step: Option<u64>,
}

struct Writer {
    _lock: fs::File,
    metrics: fs::File,
    events: EventFile,
}

/// What the run's records say of the steps before this process took it up.
#[derive(Default)]
pub struct History {
    /// Wall time of the run up to the last record kept.
    pub seconds: f64,
    /// (step, loss) of every training record kept, oldest first.
    pub losses: Vec<(u64, f64)>,
}

impl RunDir {
    /// Takes `root` for this process at `step` (the untrained start, or a resumed checkpoint's
    /// step): creates it, locks it, records the configuration, and drops the metrics records
    /// and grids of later steps (a run that went on past the checkpoint it continues from).
    pub fn open(
        root: &Path,
        config: &RunConfig,
        classes: &[String],
        step: u64,
    ) -> Result<(Self, History)> {
        // The lock file first: it is what marks the folder as a run directory to a restart.
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create run directory {}", root.display()))?;
        let lock = lock(root)?;
        fs::create_dir_all(root.join("samples"))
            .with_context(|| format!("cannot create run directory {}", root.display()))?;
        checkpoint::write_atomic(&root.join("config.toml"), config.to_toml().as_bytes())?;
        let (metrics, history) = continue_metrics(&root.join("metrics.jsonl"), step)?;
        drop_grids_after(root, step)?;
        posthoc_ema::remove_after(&root.join(posthoc_ema::SNAPSHOT_DIR), step)?;
        let events = EventFile::create(root, Some(step))?;
        let saved = checkpoint::sidecar_path(&root.join("checkpoints"), step).is_file();
        CHECKPOINT_ON_DISK.store(has_checkpoints(root)?, Ordering::SeqCst);
        let dir = RunDir {
            root: root.to_path_buf(),
            writer: Some(Writer {
                _lock: lock,
                metrics,
                events,
            }),
            config: config.clone(),
            classes: classes.to_vec(),
            saved_step: saved.then_some(step),
        };
        Ok((dir, history))
    }

    /// The run directory as a rank other than 0 sees it: nothing is written.
    pub fn view(root: &Path, config: &RunConfig, classes: &[String]) -> Self {
        RunDir {
            root: root.to_path_buf(),
            writer: None,
            config: config.clone(),
            classes: classes.to_vec(),
            saved_step: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The names of the model's classes, by id (none: unconditional).
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }

    /// Whether this process writes the run (rank 0).
    pub fn writes(&self) -> bool {
        self.writer.is_some()
    }

    fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The sidecar of step `step`'s checkpoint.
    pub fn checkpoint_path(&self, step: u64) -> PathBuf {
        checkpoint::sidecar_path(&self.checkpoints(), step)
    }

    /// The step whose checkpoint is on disk, if one is.
    pub fn saved_step(&self) -> Option<u64> {
        self.saved_step
    }

    /// Writes the checkpoint of `step` (pruning older ones); None on a view.
    pub fn save_checkpoint(
        &mut self,
        state: &[(String, Tensor)],
        step: u64,
        position: Position,
    ) -> Result<Option<PathBuf>> {
        if !self.writes() {
            return Ok(None);
        }
        let path = checkpoint::save(
            &self.checkpoints(),
            state,
            step,
            position,
            &self.config,
            &self.classes,
        )?;
        self.saved_step = Some(step);
        CHECKPOINT_ON_DISK.store(true, Ordering::SeqCst);
        Ok(Some(path))
    }

    /// Writes the post-hoc EMA snapshot of `step` into `ema-snapshots/`; nothing on a view.
    pub fn write_ema_snapshot(&self, step: u64, tensors: &[(String, Tensor)]) -> Result<()> {
        match self.writes() {
            true => posthoc_ema::write_snapshot(
                &self.root.join(posthoc_ema::SNAPSHOT_DIR),
                step,
                tensors,
            ),
            false => Ok(()),
        }
    }

    /// The checkpoint to go back to after `bad` non-finite steps ending at `step`: the newest
    /// from before the streak, else one written during it (the same weights: skipped steps
    /// change nothing and non-finite weights are never saved). The checkpoints after it belong
    /// to the abandoned steps and are removed, so that a resume cannot take them up.
    pub fn rollback_target(&mut self, step: u64, bad: u64) -> Result<Checkpoint> {
        let last_good = step.saturating_sub(bad);
        let dir = self.checkpoints();
        let checkpoint = match Checkpoint::newest_up_to(&dir, last_good)? {
            Some(before) => before,
            None => match Checkpoint::newest_up_to(&dir, step)? {
                Some(during) => during,
                None => bail!("{bad} steps in a row had non-finite gradients (steps {} to {step}) and there is no checkpoint to roll back to; lower train.lr or check the data", last_good + 1),
            },
        };
        checkpoint::remove_after(&dir, checkpoint.sidecar.step)?;
        self.saved_step = Some(checkpoint.sidecar.step);
        Ok(checkpoint)
    }

    /// Goes back to `step` (after a rollback): the records and grids of the steps after it go,
    /// as on a resume from that step.
    pub fn rewind(&mut self, step: u64) -> Result<History> {
        let Some(writer) = &mut self.writer else {
            return Ok(History::default());
        };
        let (metrics, history) = continue_metrics(&self.root.join("metrics.jsonl"), step)?;
        writer.metrics = metrics;
        writer.events.start_at(step)?;
        drop_grids_after(&self.root, step)?;
        posthoc_ema::remove_after(&self.root.join(posthoc_ema::SNAPSHOT_DIR), step)?;
        Ok(history)
    }

    /// Appends one line to `metrics.jsonl`, and its numbers (at its `step`) to the TensorBoard
    /// events.
    pub fn append_metrics(&mut self, record: &impl Serialize) -> Result<()> {
        let Some(writer) = &mut self.writer else {
            return Ok(());
        };
        writeln!(writer.metrics, "{}", serde_json::to_string(record)?)
            .context("cannot append to metrics.jsonl")?;
        let record = serde_json::to_value(record)?;
        let step = record["step"]
            .as_u64()
            .context("a metrics record without its step")?;
        writer
            .events
            .scalars(step, &tensorboard::scalars_of(&record))
    }

    /// Writes the grid of `step` as `samples/step-N.png`, `samples/latest.png` and an image
    /// of the TensorBoard events, then refreshes the views.
    pub fn write_grid(&mut self, step: u64, grid: &image::RgbImage) -> Result<PathBuf> {
        let samples = self.root.join("samples");
        let path = samples.join(format!("step-{step:08}.png"));
        crate::monitor::save_png(grid, &path)?;
        if let Some(writer) = &mut self.writer {
            let png = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let (width, height) = grid.dimensions();
            writer
                .events
                .image("samples", step, png, (width, height, 3))?;
        }
        let latest = samples.join("latest.png");
        fs::copy(&path, &latest).with_context(|| format!("cannot write {}", latest.display()))?;
        self.refresh_views()?;
        Ok(path)
    }

    /// `samples/data.png`: what the model learns from.
    pub fn write_data_grid(&self, grid: &image::RgbImage) -> Result<()> {
        crate::monitor::save_png(grid, &self.root.join("samples").join("data.png"))
    }

    /// Rebuilds what the directory shows from what it holds: the training animation
    /// (`samples/training.gif`, every grid in order), the loss plot and `report.html`.
    fn refresh_views(&self) -> Result<()> {
        use crate::monitor;
        let samples = self.root.join("samples");
        let grids: Vec<PathBuf> = grids(&samples)?.into_iter().map(|(_, p)| p).collect();
        let frames: Vec<image::RgbImage> = grids
            .iter()
            .filter_map(|p| image::open(p).ok())
            .map(|i| i.to_rgb8())
            .collect();
        // The grids of the run's current layout (a resume may change sample.num).
        if let Some(newest) = frames.last() {
            let size = newest.dimensions();
            let same: Vec<image::RgbImage> = frames
                .iter()
                .filter(|f| f.dimensions() == size)
                .cloned()
                .collect();
            monitor::save_animation(&same, &samples.join("training.gif"), 600)?;
        }
        let metrics = self.root.join("metrics.jsonl");
        monitor::save_loss_plot(
            &monitor::read_loss_history(&metrics),
            &self.root.join("loss.png"),
        )?;
        monitor::write_report(&self.root, &self.config, grids.last())
    }
}

/// Rewrites `report.html` of the run in `root` from its files, for a process beside the
/// trainer (`ddpm watch`) that has new measurements to show.
pub fn refresh_report(root: &Path) -> Result<()> {
    let config = RunConfig::from_toml_file(&root.join("config.toml"), None)?;
    let grids = grids(&root.join("samples")).unwrap_or_default();
    crate::monitor::write_report(root, &config, grids.last().map(|(_, p)| p))
}

/// Refuses a folder that a new run must not take (`resume`: a run continued into `dir`): one
/// that holds checkpoints, files of a run's names that are not a run's, its own data, or images
/// or subfolders (a mistyped folder: its grids would mix with them). Other files (a job's log,
/// say) may share the folder.
pub fn check_new(dir: &Path, resume: Option<&Checkpoint>, data: Option<&Path>) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Refusal::new(
            format!("{} is a file, not a run directory", dir.display()),
            vec![Remedy::ChooseAnotherFolder],
        ));
    }
    // A resume in the checkpoint's own run directory continues it; into another folder, that
    // folder is checked as a new run's (its checkpoints, if any, are that resume's own).
    let in_place = resume.is_some_and(|c| {
        c.path
            .parent()
            .is_some_and(|folder| checkpoint::same_place(folder, &dir.join("checkpoints")))
    });
    if in_place || !dir.is_dir() {
        return Ok(());
    }
    if resume.is_none() && !checkpoint::list(&dir.join("checkpoints"))?.is_empty() {
        return Err(Refusal::new(
            format!("run directory {} already holds checkpoints", dir.display()),
            vec![
                Remedy::Resume(dir.to_path_buf()),
                Remedy::ChooseAnotherFolder,
            ],
        ));
    }
    if data.is_some_and(|data| checkpoint::same_place(dir, data)) {
        return Err(Refusal::new(
            format!(
                "{} is the data folder: the run's grids and plots would become training data",
                dir.display()
            ),
            vec![Remedy::ChooseAnotherFolder],
        ));
    }
    // Every run takes its directory's lock file first: without one, these files are not a run's.
    if dir.join(LOCK_FILE).exists() {
        return Ok(());
    }
    let taken: Vec<&str> = RUN_FILES
        .into_iter()
        .filter(|name| dir.join(name).exists())
        .collect();
    if !taken.is_empty() {
        return Err(Refusal::new(
            format!(
                "{} already holds {} that a run would overwrite, and is not a ddpm run directory",
                dir.display(),
                taken.join(", ")
            ),
            vec![Remedy::ChooseEmptyFolder],
        ));
    }
    let mut others: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir() || crate::data::is_image_file(path))
        .map(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            match path.is_dir() {
                true => format!("{name}/"),
                false => name.into_owned(),
            }
        })
        .collect();
    if !others.is_empty() {
        others.sort();
        let shown = others.len().min(3);
        return Err(Refusal::new(
            format!(
                "{} holds images or folders ({}{}) and is not a ddpm run directory (other files, such as a job's log, may share it)",
                dir.display(),
                others[..shown].join(", "),
                if others.len() > shown { ", …" } else { "" }
            ),
            vec![Remedy::ChooseEmptyFolder],
        ));
    }
    Ok(())
}

/// Refuses a resume that would overwrite checkpoints: into another run's directory, or from a
/// checkpoint file (`named_file`) older than the newest of its own run.
pub fn check_resume_target(checkpoint: &Checkpoint, dir: &Path, named_file: bool) -> Result<()> {
    let step = checkpoint.sidecar.step;
    let same_run = checkpoint::same_place(&of_checkpoint(&checkpoint.path), dir);
    let existing = checkpoint::list(&dir.join("checkpoints"))?;
    if !same_run && !existing.is_empty() {
        return Err(Refusal::new(
            format!(
                "{} already holds the checkpoints of another run",
                dir.display()
            ),
            vec![
                Remedy::ContinueIntoNewFolder(checkpoint.path.clone()),
                Remedy::ResumeThatRun,
            ],
        ));
    }
    let later: Vec<u64> = existing
        .iter()
        .filter(|_| named_file)
        .filter_map(|p| checkpoint::read_sidecar(p).ok())
        .map(|s| s.step)
        .filter(|&s| s > step)
        .collect();
    if !later.is_empty() {
        return Err(Refusal::new(
            format!(
                "{} holds checkpoints after step {step} (steps {later:?}) that resuming from {} would overwrite",
                dir.display(),
                checkpoint.path.display(),
            ),
            vec![
                Remedy::Resume(dir.to_path_buf()),
                Remedy::ContinueIntoNewFolder(checkpoint.path.clone()),
            ],
        ));
    }
    Ok(())
}

/// Refuses a path that is not a run directory (a folder with the `config.toml` a run writes).
pub fn require_run(run: &Path) -> Result<()> {
    if !run.is_dir() {
        bail!(
            "{} does not exist or is not a folder: give a run directory (the --out of ddpm train)",
            run.display()
        );
    }
    if !run.join("config.toml").is_file() {
        bail!(
            "{} is not a ddpm run directory (it has no config.toml)",
            run.display()
        );
    }
    Ok(())
}

/// Whether `dir` holds at least one checkpoint (valid or not).
pub fn has_checkpoints(dir: &Path) -> Result<bool> {
    Ok(!checkpoint::list(&dir.join("checkpoints"))?.is_empty())
}

/// The checkpoint a user names: a sidecar or weights file, a folder of checkpoints, or a run
/// directory (its newest valid checkpoint; damaged newer ones are passed over with a warning).
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    if !path.is_dir() {
        return Checkpoint::load(path);
    }
    let folder = match path.join("checkpoints").is_dir() {
        true => path.join("checkpoints"),
        false => path.to_path_buf(),
    };
    if !checkpoint::list(&folder)?.is_empty() {
        return Checkpoint::load(&folder);
    }
    let run = of_checkpoint(&folder);
    if let Some(pid) = training_process(&run) {
        bail!("no checkpoint found in {}: the run is still training (pid {pid}) and has not written its first one yet", folder.display());
    }
    // "no checkpoint found in …", with any saves that never finished.
    let Err(error) = Checkpoint::load(&folder) else {
        unreachable!("the folder holds no checkpoint")
    };
    match run.join("config.toml").is_file() {
        // A run stopped before its first checkpoint (or whose checkpoints were removed): its
        // configuration restarts it.
        true => Err(Refusal::new(
            format!(
                "{error}: none was written (the run stopped before its first) or they were removed"
            ),
            vec![Remedy::Restart {
                config: run.join("config.toml"),
                run,
            }],
        )),
        false => Err(error),
    }
}

/// The run directory a checkpoint path belongs to.
pub fn of_checkpoint(path: &Path) -> PathBuf {
    // `Path::parent` of a bare name is "", which names no folder: "." does.
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        parent(path)
    };
    if dir.file_name().is_some_and(|n| n == "checkpoints") {
        parent(&dir)
    } else {
        dir
    }
}

/// The settings a resume changes, as `key: old → new`; an error for those that change what
/// the network is or computes (model, noise schedule, prediction target), which the
/// checkpoint's weights would no longer fit.
pub fn resume_changes(before: &RunConfig, after: &RunConfig) -> Result<Vec<String>> {
    let changes = differences(before, after)?;
    let fixed = |key: &str| {
        key.starts_with("model.")
            || (key.starts_with("diffusion.")
                && !matches!(key, "diffusion.loss_weighting" | "diffusion.min_snr_gamma"))
    };
    let refused: Vec<_> = changes.iter().filter(|(key, _, _)| fixed(key)).collect();
    if !refused.is_empty() {
        // Every one at once, so that a user fixes them in one go.
        let list = |value: fn(&(String, String, String)) -> &String| {
            refused
                .iter()
                .map(|change| format!("{} = {}", change.0, value(change)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let keys: Vec<&str> = refused.iter().map(|change| change.0.as_str()).collect();
        bail!(
            "the checkpoint was trained with {}; it cannot be resumed with {} (a different {} needs a new run)",
            list(|change| &change.1),
            list(|change| &change.2),
            keys.join(" or ")
        );
    }
    Ok(changes
        .into_iter()
        .map(|(key, old, new)| format!("{key}: {old} → {new}"))
        .collect())
}

/// A resume takes its settings from the checkpoint and flags; the run's `config.toml` records
/// them and is rewritten. Edits made there would be lost without a word: the note says which.
pub fn unread_config_note(dir: &Path, checkpoint_config: &RunConfig) -> Option<String> {
    let file = dir.join("config.toml");
    if !file.is_file() {
        return None;
    }
    let edited = match RunConfig::from_toml_file(&file, None) {
        Err(e) => {
            let cause = e.root_cause().to_string();
            format!(
                "cannot be read ({})",
                cause.lines().next().unwrap_or_default()
            )
        }
        Ok(recorded) => {
            let changes = differences(checkpoint_config, &recorded).ok()?;
            if changes.is_empty() {
                return None;
            }
            let listed: Vec<String> = changes
                .iter()
                .map(|(key, saved, in_file)| {
                    format!("{key} = {in_file} there, {saved} in the checkpoint")
                })
                .collect();
            format!(
                "differs from the checkpoint's settings ({})",
                listed.join("; ")
            )
        }
    };
    Some(format!(
        "{} {edited}: a resume reads the checkpoint's settings and flags, not that file, which it rewrites (change a resumed run's settings with its keys' flags, e.g. train.lr)",
        file.display()
    ))
}

/// (key, old, new) for every key whose value differs between two configurations, keys dotted.
fn differences(a: &RunConfig, b: &RunConfig) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    leaf_differences(
        "",
        &toml::Value::try_from(a)?,
        &toml::Value::try_from(b)?,
        &mut out,
    );
    Ok(out)
}

fn leaf_differences(
    prefix: &str,
    a: &toml::Value,
    b: &toml::Value,
    out: &mut Vec<(String, String, String)>,
) {
    match (a, b) {
        (toml::Value::Table(ta), toml::Value::Table(tb)) => {
            let keys: std::collections::BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
            for key in keys {
                let name = match prefix {
                    "" => key.clone(),
                    _ => format!("{prefix}.{key}"),
                };
                match (ta.get(key), tb.get(key)) {
                    (Some(x), Some(y)) => leaf_differences(&name, x, y, out),
                    (x, y) => out.push((name, shown(x), shown(y))),
                }
            }
        }
        _ if a != b => out.push((prefix.to_string(), a.to_string(), b.to_string())),
        _ => {}
    }
}

fn shown(value: Option<&toml::Value>) -> String {
    value.map_or("(unset)".into(), toml::Value::to_string)
}

/// One trainer per run directory: a second one (a job started twice, a restart while the first
/// still runs) would interleave its checkpoints and metrics with the first's.
fn lock(dir: &Path) -> Result<fs::File> {
    let path = dir.join(LOCK_FILE);
    let mut file = open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            write!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(fs::TryLockError::WouldBlock) => bail!(
            "run directory {} is in use by another ddpm process (pid {}): wait for it to end, or stop it",
            dir.display(),
            lock_holder(&path)
        ),
        // Some cluster filesystems have no file locks: train unguarded rather than not at all.
        Err(fs::TryLockError::Error(e)) => {
            tracing::warn!("cannot lock {} ({e}); nothing stops a second trainer on this run directory", path.display());
            Ok(file)
        }
    }
}

/// The process id a lock file holds.
/// A lock file opened for reading and writing, created if missing and never truncated (its
/// holder's words stay until a new holder writes its own).
pub fn open_lock_file(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn lock_holder(lock: &Path) -> String {
    fs::read_to_string(lock)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The process id of the trainer that holds `dir` now, if one does.
pub fn training_process(dir: &Path) -> Option<String> {
    let path = dir.join(LOCK_FILE);
    let file = fs::File::open(&path).ok()?;
    match file.try_lock_shared() {
        // This process's own lock (a trainer reading its own run) is not another's.
        Err(fs::TryLockError::WouldBlock) => {
            Some(lock_holder(&path)).filter(|pid| *pid != std::process::id().to_string())
        }
        _ => None,
    }
}

/// Opens `metrics.jsonl` to go on after `step`: the records of later steps (and lines cut short
/// by a crash) are dropped.
fn continue_metrics(path: &Path, step: u64) -> Result<(fs::File, History)> {
    let seconds = keep_records_up_to(path, step)?;
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let losses = crate::monitor::read_loss_history(path);
    Ok((file, History { seconds, losses }))
}

/// Rewrites `metrics.jsonl` without the records after `step` (and lines cut short by a crash);
/// returns the wall time of the last record kept.
fn keep_records_up_to(path: &Path, step: u64) -> Result<f64> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0.0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = String::new();
    let mut seconds: f64 = 0.0;
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if record["step"].as_u64().is_some_and(|s| s <= step) {
            seconds = seconds.max(record["wall_seconds"].as_f64().unwrap_or(0.0));
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if kept.len() != text.len() {
        checkpoint::write_atomic(path, kept.as_bytes())?;
    }
    Ok(seconds)
}

/// The sample grids `samples/step-N.png` in `samples`, with their steps, oldest first.
fn grids(samples: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut grids: Vec<(u64, PathBuf)> = fs::read_dir(samples)
        .with_context(|| format!("cannot list {}", samples.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png") && p.is_file())
        .filter_map(|p| Some((checkpoint::step_of(&p)?, p)))
        .collect();
    grids.sort();
    Ok(grids)
}

/// Removes the grids of steps after `step`, drawn by a run that went on past the checkpoint it
/// is continued from (they are drawn again), so that the animation and `latest.png` show the
/// steps this run has.
fn drop_grids_after(run_dir: &Path, step: u64) -> Result<()> {
    let samples = run_dir.join("samples");
    if !samples.is_dir() {
        return Ok(());
    }
    let grids_then = grids(&samples)?;
    if grids_then.iter().all(|&(s, _)| s <= step) {
        return Ok(());
    }
    for (_, path) in grids_then.iter().filter(|&&(s, _)| s > step) {
        fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    let latest = samples.join("latest.png");
    match grids_then.iter().rev().find(|&&(s, _)| s <= step) {
        Some((_, newest)) => fs::copy(newest, &latest).map(drop),
        None => fs::remove_file(&latest).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        }),
    }
    .with_context(|| format!("cannot write {}", latest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{read_loss_history, Monitor};

    fn tiny() -> RunConfig {
        let mut c = RunConfig::preset("tiny").unwrap();
        c.model.channels = 8;
        c.model.image_size = crate::config::ImageSize::Square(8);
        c.model.channel_mult = vec![1, 2];
        c.train.device = "cpu".into();
        c
    }

    #[test]
    fn a_new_run_overwrites_no_other_files_and_not_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        check_new(&out, None, None).unwrap();
        std::fs::create_dir(&out).unwrap();
        // A job's log may come first.
        std::fs::write(out.join("job.log"), "started").unwrap();
        check_new(&out, None, None).unwrap();
        // Nor a folder of images (a dataset, say) or of subfolders.
        let images = dir.path().join("images");
        std::fs::create_dir_all(images.join("cats")).unwrap();
        std::fs::write(images.join("a.PNG"), "").unwrap();
        let e = format!("{:#}", check_new(&images, None, None).unwrap_err());
        assert!(
            e.contains("(a.PNG, cats/)") && e.contains("not a ddpm run"),
            "{e}"
        );
        // A resume continues in its own run directory, and checks another one as a new run's.
        let trainer = crate::train::Trainer::new(&tiny(), tch::Device::Cpu).unwrap();
        let own = dir.path().join("run");
        let state = trainer.state_tensors();
        checkpoint::save(
            &own.join("checkpoints"),
            &state,
            0,
            Position::default(),
            &trainer.config,
            &[],
        )
        .unwrap();
        let resumed = load_checkpoint(&own).unwrap();
        std::fs::create_dir(own.join("logs")).unwrap();
        check_new(&own, Some(&resumed), None).unwrap();
        let e = format!(
            "{:#}",
            check_new(&images, Some(&resumed), None).unwrap_err()
        );
        assert!(e.contains("(a.PNG, cats/)"), "{e}");
        std::fs::write(out.join("report.html"), "mine").unwrap();
        let e = format!("{:#}", check_new(&out, None, None).unwrap_err());
        assert!(
            e.contains("report.html") && e.contains("not a ddpm run"),
            "{e}"
        );
        // An earlier start that wrote no checkpoint.
        std::fs::write(out.join(LOCK_FILE), "").unwrap();
        check_new(&out, None, None).unwrap();
        // Not the data folder, however it is named.
        let e = format!(
            "{:#}",
            check_new(&out, None, Some(&out.join("."))).unwrap_err()
        );
        assert!(e.contains("data folder"), "{e}");
    }

    #[test]
    fn a_resume_lists_the_changes_and_refuses_every_network_change_at_once() {
        let before = RunConfig::preset("tiny").unwrap();
        let mut after = before.clone();
        after.train.lr *= 2.0;
        after.diffusion.loss_weighting = crate::config::LossWeighting::Snr;
        let changes = resume_changes(&before, &after).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            changes.iter().any(|c| c.starts_with("train.lr: ")),
            "{changes:?}"
        );
        after.model.channels *= 2;
        after.model.num_res_blocks += 1;
        let e = resume_changes(&before, &after).unwrap_err().to_string();
        let m = &before.model;
        assert!(
            e.contains(&format!(
                "trained with model.channels = {}, model.num_res_blocks = {};",
                m.channels, m.num_res_blocks
            )) && e.contains(&format!(
                "resumed with model.channels = {}, model.num_res_blocks = {} (",
                m.channels * 2,
                m.num_res_blocks + 1
            )) && e.contains("a different model.channels or model.num_res_blocks needs a new run"),
            "{e}"
        );
    }

    #[test]
    fn a_run_dir_rewinds_its_records_and_grids_and_keeps_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let line = |step: u64, wall: f64| {
            let loss = 1.0 / step as f64;
            format!("{{\"step\":{step},\"loss\":{loss},\"wall_seconds\":{wall}}}\n")
        };
        let fid = "{\"step\":100,\"fid\":30.0,\"wall_seconds\":61.0}\n";
        let text = [
            line(50, 30.0),
            line(100, 60.0),
            fid.into(),
            line(150, 90.0),
            "{\"step\":17".into(),
        ]
        .concat();
        fs::write(&metrics, text).unwrap();
        // Grids at steps 50, 100 and 150; latest.png is step 150's.
        let samples = dir.path().join("samples");
        fs::create_dir(&samples).unwrap();
        for step in [50u64, 100, 150] {
            fs::write(
                samples.join(format!("step-{step:08}.png")),
                step.to_string(),
            )
            .unwrap();
        }
        fs::write(samples.join("latest.png"), "150").unwrap();
        let (mut run, history) = RunDir::open(dir.path(), &tiny(), &[], 100).unwrap();
        assert_eq!(
            fs::read_to_string(&metrics).unwrap(),
            [line(50, 30.0), line(100, 60.0), fid.into()].concat()
        );
        let kept: Vec<u64> = grids(&samples).unwrap().iter().map(|g| g.0).collect();
        assert_eq!(kept, [50, 100]);
        assert_eq!(
            fs::read_to_string(samples.join("latest.png")).unwrap(),
            "100"
        );
        assert_eq!(history.seconds, 61.0);
        assert_eq!(history.losses, [(50, 1.0 / 50.0), (100, 1.0 / 100.0)]);
        // A rollback to step 50 drops the rest; appended records follow the kept ones.
        let history = run.rewind(50).unwrap();
        assert_eq!(history.losses, [(50, 1.0 / 50.0)]);
        run.append_metrics(&serde_json::json!({"step": 60, "loss": 0.5}))
            .unwrap();
        let text = fs::read_to_string(&metrics).unwrap();
        assert_eq!(
            text,
            [line(50, 30.0), "{\"loss\":0.5,\"step\":60}\n".into()].concat()
        );
        assert!(!samples.join("step-00000100.png").exists());
        // A second trainer is refused while the first holds the directory.
        let e = format!(
            "{:#}",
            RunDir::open(dir.path(), &tiny(), &[], 0).err().unwrap()
        );
        assert!(e.contains("in use by another ddpm process"), "{e}");
        drop(run);
        // From the start, no grid is left.
        RunDir::open(dir.path(), &tiny(), &[], 0).unwrap();
        assert!(grids(&samples).unwrap().is_empty());
        assert!(!samples.join("latest.png").exists());
    }

    #[test]
    fn a_rollback_rewinds_the_records_and_the_smoothed_loss() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let (mut run, history) = RunDir::open(dir.path(), &tiny(), &[], 0).unwrap();
        let mut monitor = Monitor::new(0, 400, history.seconds, &history.losses, true);
        let record = |step: u64, loss: f64| crate::monitor::MetricsRecord {
            step,
            epoch: 0,
            loss,
            loss_by_quarter: [None; 4],
            lr: 1e-4,
            grad_norm: 1.0,
            loss_scale: None,
            skipped_steps: 0,
            images_per_second: 10.0,
            data_wait_seconds: 0.0,
            device_memory_gib: None,
            wall_seconds: step as f64,
        };
        for (step, loss) in [(100, 0.5), (200, f64::NAN), (300, 0.25), (400, f64::NAN)] {
            run.append_metrics(&record(step, loss)).unwrap();
            monitor.show(&record(step, loss));
        }
        // A non-finite loss is logged as null and starts the console's average again.
        assert_eq!(
            read_loss_history(&metrics)
                .iter()
                .map(|&(step, loss)| (step, loss.is_nan()))
                .collect::<Vec<_>>(),
            [(100, false), (200, true), (300, false), (400, true)]
        );
        let history = run.rewind(300).unwrap();
        monitor.rewind(300, &history.losses);
        assert_eq!(monitor.smoothed_loss(), Some(0.25));
        run.append_metrics(&record(400, 0.125)).unwrap();
        monitor.show(&record(400, 0.125));
        let steps: Vec<u64> = read_loss_history(&metrics).iter().map(|r| r.0).collect();
        assert_eq!(steps, [100, 200, 300, 400]);
        let text = fs::read_to_string(&metrics).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(
            text.lines().last().unwrap().contains("\"loss\":0.125"),
            "{text}"
        );
        // The same history, read afresh on a resume, gives the same smoothed loss.
        drop(run);
        let (_, history) = RunDir::open(dir.path(), &tiny(), &[], 400).unwrap();
        let resumed = Monitor::new(400, 500, history.seconds, &history.losses, true);
        assert_eq!(resumed.smoothed_loss(), monitor.smoothed_loss());
    }

    #[test]
    fn the_animation_follows_the_newest_grid_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (run, _) = RunDir::open(dir.path(), &tiny(), &[], 0).unwrap();
        let samples = dir.path().join("samples");
        // A resume changed sample.num after step 1: later grids have another size.
        for (step, width) in [(1, 40), (2, 60), (3, 60)] {
            image::RgbImage::new(width, 30)
                .save(samples.join(format!("step-{step:08}.png")))
                .unwrap();
        }
        run.refresh_views().unwrap();
        let gif = fs::File::open(samples.join("training.gif")).unwrap();
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(gif)).unwrap();
        use image::AnimationDecoder;
        let frames = decoder.into_frames().collect_frames().unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].buffer().width(), 60);
        assert!(dir.path().join("report.html").is_file());
    }
}
