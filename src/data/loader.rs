//! Batches read ahead of the training step by worker threads, handed out in the seeded order
//! whatever the number of workers.
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};

use super::{Dataset, Examples, Position, Sampler};

/// This process's part of each global batch in data-parallel training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's slice of a global batch (the batch divides evenly; checked by the caller).
    fn of<'a>(&self, global: &'a [i64]) -> &'a [i64] {
        let per_rank = global.len() / self.world;
        &global[self.rank * per_rank..(self.rank + 1) * per_rank]
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LoaderOptions {
    /// Images per global batch.
    pub batch: usize,
    pub seed: u64,
    pub workers: usize,
    /// Batches read ahead at most (at least one per worker, so that every worker can decode).
    pub prefetch: usize,
    pub shard: Shard,
}

impl LoaderOptions {
    /// A training run's loader: its batch, seed and `data.workers`/`data.prefetch`.
    pub fn of(config: &crate::config::RunConfig, shard: Shard) -> Self {
        LoaderOptions {
            batch: config.train.batch,
            seed: config.train.seed,
            workers: super::worker_count(config.data.workers),
            prefetch: config.data.prefetch,
            shard,
        }
    }
}

/// Hands out u8 batches [B, C, H, W], with their labels, in the order of a `Sampler`, read by
/// worker threads.
pub struct Loader {
    shared: Arc<Shared>,
    results: mpsc::Receiver<(u64, Result<Batch>)>,
    /// Batches that arrived before their turn.
    early: BTreeMap<u64, Result<Batch>>,
    next: u64,
    position: Position,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    dataset: Arc<Dataset>,
    options: LoaderOptions,
    dispatch: Mutex<Dispatch>,
    room: Condvar,
}

struct Dispatch {
    order: Sampler,
    /// Batches given to workers, and batches handed out to the caller.
    issued: u64,
    consumed: u64,
    stopping: bool,
}

struct Batch {
    examples: Examples,
    /// The order's position after this batch.
    position: Position,
}

impl Loader {
    /// Starts reading at `position` of the order seeded by `options.seed`.
    pub fn new(
        dataset: Arc<Dataset>,
        position: Position,
        mut options: LoaderOptions,
    ) -> Result<Self> {
        let order = dataset.order(options.batch, options.shard.world)?;
        options.workers = options.workers.max(1);
        options.prefetch = options.prefetch.max(options.workers);
        let shared = Arc::new(Shared {
            options,
            dispatch: Mutex::new(Dispatch {
                order: Sampler::new(order, options.seed, position),
                issued: 0,
                consumed: 0,
                stopping: false,
            }),
            dataset,
            room: Condvar::new(),
        });
        let (sender, results) = mpsc::channel();
        let threads = (0..options.workers)
            .map(|_| {
                let shared = shared.clone();
                let sender = sender.clone();
                std::thread::spawn(move || shared.work(sender))
            })
            .collect();
        Ok(Loader {
            shared,
            results,
            early: BTreeMap::new(),
            next: 0,
            position,
            threads,
        })
    }

    /// The next batch (this shard's part of it).
    pub fn next_batch(&mut self) -> Result<Examples> {
        let batch = loop {
            if let Some(batch) = self.early.remove(&self.next) {
                break batch;
            }
            let (k, batch) = self
                .results
                .recv()
                .map_err(|_| anyhow!("the data loader's threads stopped"))?;
            self.early.insert(k, batch);
        };
        self.next += 1;
        self.shared.dispatch().consumed += 1;
        // One batch of room: wake one worker.
        self.shared.room.notify_one();
        let batch = batch?;
        self.position = batch.position;
        Ok(batch.examples)
    }

    /// Where the order stands after the batches handed out so far: what a checkpoint stores.
    pub fn position(&self) -> Position {
        self.position
    }
}

impl Shared {
    /// The dispatch state; a worker that panicked does not hold it while it changes it, so a
    /// poisoned lock still guards consistent values.
    fn dispatch(&self) -> MutexGuard<'_, Dispatch> {
        self.dispatch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn work(&self, sender: mpsc::Sender<(u64, Result<Batch>)>) {
        loop {
            let (k, indices, draw, position) = {
                let mut d = self.dispatch();
                while !d.stopping && d.issued - d.consumed >= self.options.prefetch as u64 {
                    d = self.room.wait(d).unwrap_or_else(PoisonError::into_inner);
                }
                if d.stopping {
                    return;
                }
                // The batch's random crops follow from where it is in the order.
                let at = d.order.position();
                let draw = crate::rng::mix(
                    self.options.seed,
                    &[
                        0xC409,
                        at.epoch,
                        at.index as u64,
                        self.options.shard.rank as u64,
                    ],
                );
                let global = d.order.next_indices(self.options.batch);
                let indices = self.options.shard.of(&global).to_vec();
                d.issued += 1;
                (d.issued - 1, indices, draw, d.order.position())
            };
            // A decoder that panics fails this batch, not the whole loader (whose other batches
            // would then wait for it forever).
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.dataset.examples(&indices, draw)
            }));
            let batch = match read {
                Ok(read) => read.map(|examples| Batch { examples, position }),
                Err(_) => Err(anyhow!(
                    "reading a batch of images {indices:?} panicked (a decoder bug, see above)"
                )),
            };
            if sender.send((k, batch)).is_err() {
                return;
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.dispatch().stopping = true;
        self.shared.room.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
