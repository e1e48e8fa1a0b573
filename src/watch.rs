//! Measuring a run from beside it: `ddpm watch` follows a run directory from another process
//! (on the same machine or another, on a GPU or the CPU) and measures each new checkpoint, FID
//! and precision/recall of samples of its EMA weights, into `eval.jsonl`. The trainer never waits
//! for it. A checkpoint is read only once its sidecar is written (the sidecar comes last), and
//! is kept from pruning until measured: the watcher's lock file holds its [`WatchMark`] (what
//! it has measured), which the trainer's pruning honours while the lock is held. Restarted, the
//! watcher goes on with the first checkpoint `eval.jsonl` does not have.
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::checkpoint::{self, Checkpoint, WatchMark};
use crate::config::SampleConfig;
use crate::eval::{Inception, Statistics};
use crate::tensorboard::EventFile;

/// The file the measurements go to, one line per checkpoint.
pub const EVAL_FILE: &str = "eval.jsonl";
/// Neighbours of improved precision and recall, as Kynkäänniemi et al. use.
pub const PRECISION_RECALL_K: usize = 3;

/// One line of `eval.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub fid: f64,
    pub precision: f64,
    pub recall: f64,
    /// Images sampled (and real images of precision/recall).
    pub images: usize,
    /// Seconds the measurement took (sampling and Inception).
    pub seconds: f64,
}

pub struct WatchOptions {
    /// Measure only the checkpoints of steps that are multiples of this (0 or 1: each one).
    pub every: u64,
    /// Measure what is there and end, rather than follow the run until it ends.
    pub once: bool,
    /// Images sampled per checkpoint, and real images of precision/recall.
    pub num: usize,
    /// Images per forward pass (sampling and Inception).
    pub batch: usize,
    pub seed: u64,
    pub device: Device,
    /// How often to look for new checkpoints.
    pub poll: Duration,
}

/// What the real images give every measurement: their statistics (all of them) and the
/// features of `num` of them (precision and recall compare sets of equal size).
pub struct RealSet {
    pub statistics: Statistics,
    pub features: Tensor,
}

/// What a watch did.
#[derive(Debug, Default)]
pub struct WatchSummary {
    pub measured: Vec<EvalRecord>,
    /// Checkpoints that vanished or were damaged before they could be measured.
    pub missed: Vec<(u64, String)>,
}

/// A run directory followed by this process, which holds its watch lock.
pub struct Watcher {
    run: PathBuf,
    checkpoints: PathBuf,
    /// The watch lock, holding the mark.
    lock: fs::File,
    mark: WatchMark,
    measured: BTreeSet<u64>,
    events: EventFile,
}

impl Watcher {
    /// Takes `run` for this watcher: a run directory (its `config.toml`), one watcher at a time.
    /// From here on, the checkpoints it has not measured (of steps that are multiples of
    /// `every`) stay until it has.
    pub fn open(run: &Path, every: u64) -> Result<Self> {
        crate::run_dir::require_run(run)?;
        let checkpoints = run.join("checkpoints");
        fs::create_dir_all(&checkpoints)
            .with_context(|| format!("cannot create {}", checkpoints.display()))?;
        let lock = take_watch_lock(&checkpoints)?;
        let measured: BTreeSet<u64> = read_records(&run.join(EVAL_FILE))?
            .iter()
            .map(|r| r.step)
            .collect();
        let mut watcher = Watcher {
            run: run.to_path_buf(),
            checkpoints,
            lock,
            mark: WatchMark {
                pid: std::process::id(),
                measured_through: measured.last().copied(),
                every,
            },
            measured,
            events: EventFile::create(run, None)?,
        };
        watcher.write_mark()?;
        Ok(watcher)
    }

    /// Rewrites the mark in the lock file (in place: the lock stays held).
    fn write_mark(&mut self) -> Result<()> {
        use std::io::Seek;
        let text = serde_json::to_string(&self.mark)?;
        let path = self.checkpoints.join(checkpoint::WATCH_LOCK);
        (|| -> std::io::Result<()> {
            self.lock.set_len(0)?;
            self.lock.rewind()?;
            self.lock.write_all(text.as_bytes())
        })()
        .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Measures each checkpoint of the run not yet measured, oldest first, and (unless
    /// `once`) goes on with new ones until the run is no longer training and all are measured,
    /// or `stop` is set.
    pub fn follow(
        &mut self,
        inception: &Inception,
        real: &RealSet,
        options: &WatchOptions,
        settings: impl Fn(&Checkpoint) -> Result<SampleConfig>,
        stop: &AtomicBool,
    ) -> Result<WatchSummary> {
        let mut summary = WatchSummary::default();
        let mut missed: BTreeSet<u64> = BTreeSet::new();
        loop {
            crate::check_stop(Some(stop))?;
            // Whether the trainer runs, asked before listing: a checkpoint it writes after this
            // is found on the next pass, and a run that has ended has written its last.
            let training = crate::run_dir::training_process(&self.run).is_some();
            let pending = self.pending(options.every, &missed)?;
            let Some(&(step, ref sidecar)) = pending.first() else {
                if options.once || !training {
                    return Ok(summary);
                }
                wait(options.poll, stop);
                continue;
            };
            match self.measure(sidecar, inception, real, options, &settings, stop) {
                Ok(record) => {
                    self.record(&record)?;
                    summary.measured.push(record);
                }
                Err(e) if e.is::<crate::Interrupted>() => return Err(e),
                Err(e) => {
                    let why = match sidecar.exists() {
                        true => format!("{e:#}"),
                        false => "it was removed before it could be measured".to_string(),
                    };
                    tracing::warn!("checkpoint of step {step} not measured: {why}");
                    missed.insert(step);
                    summary.missed.push((step, why));
                }
            }
            self.mark.measured_through = Some(step);
            self.write_mark()?;
        }
    }

    /// The checkpoints to measure, oldest first.
    fn pending(&self, every: u64, missed: &BTreeSet<u64>) -> Result<Vec<(u64, PathBuf)>> {
        let mut pending = Vec::new();
        for sidecar in checkpoint::list(&self.checkpoints)? {
            let Some(step) = checkpoint::step_of(&sidecar) else {
                continue;
            };
            if self.measured.contains(&step)
                || missed.contains(&step)
                || (every > 1 && !step.is_multiple_of(every))
            {
                continue;
            }
            pending.push((step, sidecar));
        }
        pending.sort_by_key(|(step, _)| *step);
        Ok(pending)
    }

    fn measure(
        &self,
        sidecar: &Path,
        inception: &Inception,
        real: &RealSet,
        options: &WatchOptions,
        settings: &impl Fn(&Checkpoint) -> Result<SampleConfig>,
        stop: &AtomicBool,
    ) -> Result<EvalRecord> {
        let started = Instant::now();
        let checkpoint = Checkpoint::load_file(sidecar)?;
        let step = checkpoint.sidecar.step;
        tracing::info!(
            "measuring the checkpoint of step {step} ({} images)…",
            options.num
        );
        let settings = settings(&checkpoint)?;
        let images = crate::train::sample_checkpoint(
            &checkpoint,
            &settings,
            (options.num, options.batch),
            options.seed,
            options.device,
            Some(stop),
        )?;
        let features = inception.all_features(&images, options.batch, "fake", Some(stop))?;
        let fid =
            crate::eval::frechet_distance(&real.statistics, &Statistics::of_features(&features)?)?;
        let (precision, recall) =
            crate::eval::precision_recall(&real.features, &features, PRECISION_RECALL_K)?;
        Ok(EvalRecord {
            step,
            fid,
            precision,
            recall,
            images: options.num,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Appends the record to `eval.jsonl` and the TensorBoard events, and rewrites the report.
    fn record(&mut self, record: &EvalRecord) -> Result<()> {
        let path = self.run.join(EVAL_FILE);
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(record)?)
            .with_context(|| format!("cannot append to {}", path.display()))?;
        let scalars = [
            ("watch/fid", record.fid),
            ("watch/precision", record.precision),
            ("watch/recall", record.recall),
        ]
        .map(|(tag, v)| (tag.to_string(), v));
        self.events.scalars(record.step, &scalars)?;
        self.measured.insert(record.step);
        tracing::info!(
            "step {}: FID@{} {:.2}, precision {:.3}, recall {:.3} ({:.0} s)",
            record.step,
            crate::monitor::count_label(record.images),
            record.fid,
            record.precision,
            record.recall,
            record.seconds
        );
        crate::run_dir::refresh_report(&self.run)
    }
}

/// The records of `eval.jsonl` (none when there is no file yet); a damaged line is an error
/// naming it, as a watcher cannot tell what it measured.
pub fn read_records(path: &Path) -> Result<Vec<EvalRecord>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| {
                format!(
                    "{} line {} is not a measurement record",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

fn take_watch_lock(checkpoints: &Path) -> Result<fs::File> {
    let path = checkpoints.join(checkpoint::WATCH_LOCK);
    let file = crate::run_dir::open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another ddpm watch (pid {}) follows {} already: one watcher per run",
            checkpoint::running_watcher(checkpoints)
                .map_or("unknown".into(), |w| w.pid.to_string()),
            checkpoints.parent().unwrap_or(checkpoints).display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Sleeps `poll`, waking early once `stop` is set.
fn wait(poll: Duration, stop: &AtomicBool) {
    let until = Instant::now() + poll;
    while Instant::now() < until && crate::check_stop(Some(stop)).is_ok() {
        std::thread::sleep(Duration::from_millis(100).min(poll));
    }
}
