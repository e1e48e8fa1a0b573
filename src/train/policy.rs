//! What the loop does when things go wrong: why it stopped ([`Stop`]), the one failure boundary
//! that saves and reports ([`FailureBoundary`]), when a signal ends it ([`Signals`]), and
//! rollbacks after persistent non-finite gradients ([`Rollbacks`]).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::step::Trainer;
use crate::data::Position;
use crate::monitor::Monitor;
use crate::run_dir::RunDir;

/// Why training ended before its last step.
#[derive(Debug)]
pub enum Stop {
    /// A signal asked for it: the last finished step is saved and the run exits as interrupted.
    Interrupted,
    /// A failure that leaves the weights as they were after the last step (unreadable data, a
    /// lost rank, no device memory left, an unwritable grid): they are saved if new.
    Failed(anyhow::Error),
    /// A failure after which the state is not to be saved (the final save itself, a rollback
    /// with nothing to return to).
    Abandoned(anyhow::Error),
}

impl Stop {
    /// A failure after which the state of the last step is saved (unless a signal was its
    /// cause): the loop marks these where they can happen.
    pub fn failed(error: anyhow::Error) -> Self {
        match error.is::<crate::Interrupted>() {
            true => Stop::Interrupted,
            false => Stop::Failed(error),
        }
    }
}

/// Any other error stops the run without a save (setting it up, a periodic checkpoint that
/// cannot be written, a rollback), unless a signal was its cause.
impl From<anyhow::Error> for Stop {
    fn from(error: anyhow::Error) -> Self {
        match error.is::<crate::Interrupted>() {
            true => Stop::Interrupted,
            false => Stop::Abandoned(error),
        }
    }
}

impl From<crate::Interrupted> for Stop {
    fn from(_: crate::Interrupted) -> Self {
        Stop::Interrupted
    }
}

/// The stop flag that SIGINT/SIGTERM set, and how this run reads it.
pub struct Signals {
    flag: Arc<AtomicBool>,
    /// Several ranks stop together, after a logged step they agree on.
    ranks: bool,
}

impl Signals {
    pub fn new(flag: Arc<AtomicBool>, ranks: bool) -> Self {
        Signals { flag, ranks }
    }

    /// Whether to stop after the step just done; ranks agree on logged steps only, which keeps
    /// the host-device round trip off the others.
    pub fn stop_after_step(&self, trainer: &Trainer, logged: bool) -> Result<bool> {
        let asked = self.flag.load(Ordering::SeqCst);
        match trainer.group() {
            Some(group) if logged => group.any(asked),
            Some(_) => Ok(false),
            None => Ok(asked),
        }
    }

    /// The flag that abandons a grid or FID measurement under way: a single process stops as
    /// soon as a signal comes; ranks only stop together, after a logged step.
    pub fn abandon(&self) -> Option<&AtomicBool> {
        (!self.ranks).then_some(&*self.flag)
    }

    /// Fails with [`Stop::Interrupted`] once a single process was asked to stop.
    pub fn check(&self) -> Result<(), Stop> {
        crate::check_stop(self.abandon()).map_err(Stop::from)
    }

    /// A job's outcome as the loop sees it: after a signal, whatever the job did, the run stops
    /// as interrupted (its step is saved already, or is by the boundary).
    pub fn outcome<T>(&self, result: Result<T>) -> Result<T, Stop> {
        self.check()?;
        result.map_err(Stop::failed)
    }
}

const MAX_ROLLBACKS: u32 = 5;

/// After `train.max_bad_steps` non-finite steps in a row: back to a checkpoint from before
/// them, with the learning rate lowered by `train.rollback_lr_factor` (compounding).
pub struct Rollbacks {
    done: u32,
}

impl Rollbacks {
    pub fn new() -> Self {
        Rollbacks { done: 0 }
    }

    /// Whether the steps up to now call for a rollback. Every rank sees the same averaged
    /// gradients, so all decide alike.
    pub fn due(&self, trainer: &Trainer) -> bool {
        let limit = trainer.config.train.max_bad_steps;
        limit > 0 && trainer.consecutive_skipped_steps() >= limit
    }

    /// Rolls back (rank 0 reloads, the others follow) and returns the data position to go on
    /// from.
    pub fn roll_back(
        &mut self,
        trainer: &mut Trainer,
        run: &mut RunDir,
        monitor: &mut Monitor,
        position: Position,
    ) -> Result<Position, Stop> {
        self.done += 1;
        let mut position = position;
        if run.writes() {
            position = self.reload(trainer, run).map_err(Stop::Abandoned)?;
            let history = run.rewind(trainer.step)?;
            monitor.rewind(trainer.step, &history.losses);
        }
        Ok(trainer.sync_from_leader(position)?)
    }

    fn reload(&self, trainer: &mut Trainer, run: &mut RunDir) -> Result<Position> {
        let step = trainer.step;
        let bad = trainer.consecutive_skipped_steps();
        if self.done > MAX_ROLLBACKS {
            bail!("gradients are still non-finite after {MAX_ROLLBACKS} rollbacks (step {step}); lower train.lr or check the data");
        }
        let checkpoint = run.rollback_target(step, bad)?;
        // The scale goes on falling with each rollback (the checkpoint holds the one of its step).
        let lr_scale = trainer.lr_scale * trainer.config.train.rollback_lr_factor;
        trainer.load_state(&checkpoint)?;
        trainer.lr_scale = lr_scale;
        tracing::warn!("{bad} steps in a row had non-finite gradients at step {step}; rolled back to step {} ({}) with the learning rate scaled by {lr_scale}", trainer.step, checkpoint.path.display());
        Ok(checkpoint.sidecar.position)
    }
}

/// Writes a checkpoint of the trainer's state at `position` (and the post-hoc EMA snapshot). Gradients are checked at every
/// step, but an update can still overflow: a checkpoint must hold usable weights, as resumes and
/// rollbacks trust it.
pub fn save(trainer: &Trainer, run: &mut RunDir, position: Position) -> Result<Option<PathBuf>> {
    if !trainer.weights_are_finite() {
        bail!(
            "the weights are not finite at step {}: not saved as a checkpoint (lower train.lr)",
            trainer.step
        );
    }
    // The snapshot first: a checkpoint of step N then implies one of N.
    if let Some(snapshot) = trainer.ema_snapshot() {
        run.write_ema_snapshot(trainer.step, &snapshot)?;
    }
    run.save_checkpoint(&trainer.state_tensors(), trainer.step, position)
}

/// What a finished (or interrupted) run leaves behind.
pub struct RunSummary {
    /// None on ranks other than 0, which write nothing.
    pub final_checkpoint: Option<PathBuf>,
    /// None when interrupted: sampling would delay the exit.
    pub final_grid: Option<PathBuf>,
    /// The step it ended at, and the one this process started from.
    pub steps: u64,
    pub first_step: u64,
    /// The run's length (`train.steps`): more than `steps` when it stopped early.
    pub total_steps: u64,
    /// Time this process spent, from the start of training.
    pub seconds: f64,
    pub interrupted: bool,
}

impl RunSummary {
    /// A run already at the step it stops at.
    pub fn untrained(step: u64, total_steps: u64) -> Self {
        RunSummary {
            final_checkpoint: None,
            final_grid: None,
            steps: step,
            first_step: step,
            total_steps,
            seconds: 0.0,
            interrupted: false,
        }
    }
}

/// Where every way out of the loop passes: it writes a checkpoint if steps were trained since
/// the last one, says what became of the run, and gives the summary or the error.
pub struct FailureBoundary {
    pub first_step: u64,
}

impl FailureBoundary {
    pub fn close(
        &self,
        outcome: Result<Option<PathBuf>, Stop>,
        trainer: &Trainer,
        run: &mut RunDir,
        position: Position,
        monitor: &Monitor,
    ) -> Result<RunSummary> {
        monitor.finish();
        let final_grid = match outcome {
            Ok(grid) => grid,
            Err(Stop::Interrupted) => return self.interrupted(trainer, run, position, monitor),
            Err(Stop::Failed(e)) => return Err(self.failed(trainer, run, position, e)),
            Err(Stop::Abandoned(e)) => return Err(e),
        };
        Ok(RunSummary {
            final_checkpoint: run.saved_step().map(|s| run.checkpoint_path(s)),
            final_grid,
            ..self.summary(trainer, monitor, false)
        })
    }

    fn summary(&self, trainer: &Trainer, monitor: &Monitor, interrupted: bool) -> RunSummary {
        RunSummary {
            final_checkpoint: None,
            final_grid: None,
            steps: trainer.step,
            first_step: self.first_step,
            total_steps: trainer.config.train.steps,
            seconds: monitor.session_seconds(),
            interrupted,
        }
    }

    /// Stops with a checkpoint of the last finished step (written now, unless it already is);
    /// before the first step there is nothing to save.
    fn interrupted(
        &self,
        trainer: &Trainer,
        run: &mut RunDir,
        position: Position,
        monitor: &Monitor,
    ) -> Result<RunSummary> {
        let step = trainer.step;
        let path = match run.saved_step() == Some(step) {
            true => Some(run.checkpoint_path(step)),
            false if step == 0 => None,
            false => save(trainer, run, position)?,
        };
        let dir = run.path().display();
        match &path {
            None if step == 0 && run.writes() => tracing::info!("interrupted before the first step: nothing was trained or saved; the same command starts the run again"),
            None => {}
            // Every step is done: only the final grid is skipped.
            Some(_) if step >= trainer.config.train.steps => tracing::info!(
                "interrupted before the final grid: all {step} steps are done; `ddpm sample --checkpoint {dir}` makes samples"
            ),
            Some(path) => tracing::info!("interrupted after step {step}: checkpoint {} written; continue with `ddpm train --resume {dir}`", path.display()),
        }
        Ok(RunSummary {
            final_checkpoint: path,
            ..self.summary(trainer, monitor, true)
        })
    }

    /// The error, with what became of the run: the cause first, then where it stopped and
    /// where it can resume from.
    fn failed(
        &self,
        trainer: &Trainer,
        run: &mut RunDir,
        position: Position,
        error: anyhow::Error,
    ) -> anyhow::Error {
        let step = trainer.step;
        if !run.writes() || step == 0 {
            return error;
        }
        let stopped = |outcome: String| anyhow!("{}; {outcome}", crate::error_text(&error));
        if run.saved_step() == Some(step) {
            return stopped(format!(
                "training stopped at step {step}; its checkpoint {} is saved",
                run.checkpoint_path(step).display()
            ));
        }
        let newest = run.saved_step();
        match save(trainer, run, position) {
            Ok(path) => stopped(format!(
                "training stopped at step {step}; checkpoint {} written",
                path.unwrap_or_default().display()
            )),
            Err(save_error) => {
                let newest = match newest {
                    None => String::new(),
                    Some(saved) => format!(
                        "; resume from {}, the newest",
                        run.checkpoint_path(saved).display()
                    ),
                };
                stopped(format!(
                    "training stopped at step {step}, and its checkpoint could not be \
                     written either ({}){newest}",
                    crate::error_text(&save_error)
                ))
            }
        }
    }
}
