//! ddpm: train, sample and evaluate DDPM image diffusion models on libtorch.
//!
//! One module per concept; `train` sits on top and nothing below it knows about it. The library
//! prints nothing: it reports through `tracing` (progress under the target
//! [`monitor::PROGRESS`]), and the program that embeds it chooses how to show that.
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

thread_local! {
    /// Set while `catch_panics` runs on this thread: the panic hook stays quiet, as the panic
    /// becomes an error that is reported where it is handled.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where the panic that `catch_panics` is catching was raised (file:line, and the stack
    /// when RUST_BACKTRACE asks for it), kept by the panic hook for its error.
    static RAISED_AT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Runs `f`, turning a panic (tch reports libtorch errors, out-of-memory among them, by
/// panicking) into an error: libtorch's message without its C++ frames, or for any other
/// panic its message and where it was raised.
pub fn catch_panics<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let was = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(was));
    result.unwrap_or_else(|payload| {
        let raised_at = RAISED_AT.with(|r| r.take());
        Err(panic_error(payload, &raised_at))
    })
}

/// Installs a panic hook that is silent inside `catch_panics` (the panic becomes an error
/// there, which says where it was raised) and otherwise the default one.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !CATCHING.with(|c| c.get()) {
            return default(info);
        }
        let mut at = info.location().map_or(String::new(), |l| l.to_string());
        let stack = std::backtrace::Backtrace::capture();
        if stack.status() == std::backtrace::BacktraceStatus::Captured {
            at.push_str(&format!("\n{stack}"));
        }
        RAISED_AT.with(|r| *r.borrow_mut() = at);
    }));
}

/// An error's message with its causes, as shown to the user: a libtorch error carries the C++
/// stack of where it was raised ("Exception raised from …" and a frame list), and what it says
/// comes first and is all the user needs.
pub fn error_text(error: &anyhow::Error) -> String {
    without_libtorch_stack(&format!("{error:#}"))
}

/// `text` up to the C++ stack a libtorch error carries.
pub fn without_libtorch_stack(text: &str) -> String {
    match text.split_once("\nException raised from") {
        Some((said, _)) => said.to_string(),
        None => text.to_string(),
    }
}

/// A panic's message, when it has one.
fn payload_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// The error of a panic: for a libtorch error unwrapped by tch, libtorch's own words (where
/// in tch it was unwrapped tells the user nothing); for any other, its message and `raised_at`.
pub fn panic_error(payload: Box<dyn std::any::Any + Send>, raised_at: &str) -> anyhow::Error {
    let text = payload_text(payload.as_ref()).unwrap_or("unknown panic");
    match text.split_once("Torch(\"") {
        Some((_, torch)) => {
            // The error is shown as Rust's debug string, escapes and all.
            let torch = torch.strip_suffix("\")").unwrap_or(torch);
            let said = ["\\nframe #", "\\nException raised from"]
                .iter()
                .fold(torch, |said, end| said.split(end).next().unwrap_or(said));
            let said = said
                .replace("\\n", " ")
                .replace("\\\"", "\"")
                .replace("\\\\", "\\");
            anyhow::anyhow!("libtorch: {said}")
        }
        None if raised_at.is_empty() => anyhow::anyhow!("{text}"),
        None => anyhow::anyhow!("{text} (raised at {raised_at})"),
    }
}

pub mod bench;
pub mod cache;
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
pub mod nearest;
pub mod objective;
pub mod ops;
pub mod posthoc_ema;
pub mod recompute;
pub mod rng;
pub mod run_dir;
pub mod sampler;
pub mod schedule;
pub mod tensorboard;
pub mod train;
pub mod watch;

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    #[test]
    fn a_libtorch_panic_becomes_an_error_in_libtorch_words() {
        let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let e = super::catch_panics(|| Ok(a.matmul(&a)))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("libtorch: mat1 and mat2 shapes cannot be multiplied")
                && !e.contains("frame #")
                && !e.contains("\\n"),
            "{e}"
        );
        let debug = r#"called `Result::unwrap()` on an `Err` value: Torch("\"addmm\" not implemented for 'Half'\nException raised from addmm at x.cpp")"#;
        let e = super::panic_error(Box::new(debug.to_string()), "x.rs:1:1").to_string();
        assert_eq!(e, "libtorch: \"addmm\" not implemented for 'Half'");
        let e = super::catch_panics(|| -> anyhow::Result<()> { panic!("shape mismatch") });
        assert_eq!(e.unwrap_err().to_string(), "shape mismatch");
        // With the hook installed, a panic that is not libtorch's says where it was raised.
        super::install_panic_hook();
        let e = super::catch_panics(|| -> anyhow::Result<()> { panic!("a bug") });
        let e = e.unwrap_err().to_string();
        assert!(e.starts_with("a bug (raised at src/lib.rs:"), "{e}");
        // An error returned by libtorch (not raised as a panic) keeps its words, not its stack.
        let e = a.f_matmul(&a).unwrap_err();
        let text = super::error_text(&anyhow::Error::from(e).context("step 3"));
        assert!(
            text.starts_with("step 3: ")
                && text.contains("cannot be multiplied")
                && !text.contains("Exception raised"),
            "{text}"
        );
    }
}
