//! ddpm: train, sample and evaluate DDPM image diffusion models on libtorch.
//!
//! One module per concept; `train` sits on top and nothing below it knows about it.
/// `eprintln!` that cannot stop the program: with stderr closed or full (a pipe whose reader
/// has quit, `2>/dev/full`), a run keeps training and checkpointing without its log.
/// Messages of data-parallel ranks other than 0 start with `[rank N] `. Each line goes out in
/// one write, so lines of ranks sharing a terminal do not interleave.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!(
            "{}{}\n",
            $crate::distributed::message_prefix(),
            format_args!($($arg)*)
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// The error of long work (sampling, Inception features) abandoned because a stop was asked
/// for: callers tell it apart from a failure.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Fails with [`Interrupted`] once `stop` (set by a signal handler) is set; `None` never stops.
pub fn check_stop(stop: Option<&std::sync::atomic::AtomicBool>) -> Result<(), Interrupted> {
    match stop.is_some_and(|flag| flag.load(std::sync::atomic::Ordering::SeqCst)) {
        true => Err(Interrupted),
        false => Ok(()),
    }
}

pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod cuda_graph;
pub mod data;
pub mod device;
pub mod distributed;
pub mod eval;
pub mod interop;
pub mod model;
pub mod monitor;
pub mod objective;
pub mod ops;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod train;
