//! How the `ddpm` binary shows what the library reports: its `tracing` events as lines on
//! stderr (warnings start with `warning: `, data-parallel ranks other than 0 with `[rank N] `;
//! the configuration keys that warnings and notes name come with their flags),
//! and its progress events as bars on a terminal or as plain lines in a log. Lines never break a
//! bar: they are printed above it.
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ddpm::monitor::PROGRESS;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Installs the console as the process's `tracing` subscriber.
pub fn install() {
    let console = Console {
        terminal: std::io::stderr().is_terminal(),
        state: Mutex::new(State::default()),
    };
    tracing_subscriber::registry().with(console).init();
}

/// Writes one line to stderr in one write (lines of ranks sharing a terminal do not
/// interleave), ignoring failures: with stderr closed or full (a pipe whose reader has quit,
/// `2>/dev/full`), a run keeps training and checkpointing without its log.
pub fn line(text: &str) {
    let line = format!("{}{text}\n", ddpm::distributed::message_prefix());
    let _ = std::io::stderr().write_all(line.as_bytes());
}

struct Console {
    terminal: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    steps: Option<ProgressBar>,
    images: Option<ImageWork>,
}

/// Work over images under way: a bar on a terminal; in a log, a line every half minute with the
/// rate and the time left.
struct ImageWork {
    bar: Option<ProgressBar>,
    started: Instant,
    next_line: Instant,
}

const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// An event's fields as text.
#[derive(Default)]
struct Fields {
    message: String,
    kind: String,
    what: String,
    step: u64,
    total: u64,
    done: u64,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "step" => self.step = value,
            "total" => self.total = value,
            "done" => self.done = value,
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_u64(field, value.max(0) as u64)
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "kind" => self.kind = value.to_string(),
            "what" => self.what = value.to_string(),
            "message" => self.message = value.to_string(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "kind" | "what" => self.record_str(field, &format!("{value:?}")),
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for Console {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if event.metadata().target() == PROGRESS {
            return self.progress(&mut state, fields);
        }
        // Advice names the configuration keys to change: shown with their flags.
        let text = match *event.metadata().level() {
            Level::WARN | Level::ERROR => {
                format!("warning: {}", ddpm::config::with_flags(&fields.message))
            }
            Level::INFO if fields.message.starts_with("note: ") => {
                ddpm::config::with_flags(&fields.message)
            }
            Level::INFO => fields.message,
            _ => return,
        };
        state.print(&text);
    }
}

impl State {
    /// A line above the bars, if any.
    fn print(&self, text: &str) {
        match self
            .steps
            .as_ref()
            .or(self.images.as_ref().and_then(|w| w.bar.as_ref()))
        {
            Some(bar) => bar.println(format!("{}{text}", ddpm::distributed::message_prefix())),
            None => line(text),
        }
    }
}

impl Console {
    fn progress(&self, state: &mut State, f: Fields) {
        match f.kind.as_str() {
            "steps_start" if self.terminal => {
                let bar = ProgressBar::new(f.total);
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                        .expect("valid template"),
                );
                bar.set_position(f.step);
                bar.reset_eta();
                state.steps = Some(bar);
            }
            "step" => state.steps.iter().for_each(|bar| bar.set_position(f.step)),
            "record" => match &state.steps {
                Some(bar) => {
                    bar.set_position(f.step);
                    bar.set_message(f.message);
                }
                None => line(&format!("step {:>8}  {}", f.step, f.message)),
            },
            "steps_done" => {
                if let Some(bar) = state.steps.take() {
                    bar.finish();
                }
            }
            "images" => self.images(state, f),
            "images_done" => {
                if let Some(bar) = state.images.take().and_then(|w| w.bar) {
                    bar.finish_and_clear();
                }
            }
            _ => {}
        }
    }

    fn images(&self, state: &mut State, f: Fields) {
        let work = state.images.get_or_insert_with(|| {
            let started = Instant::now();
            let bar = self.terminal.then(|| {
                let bar = ProgressBar::new(f.total);
                bar.set_style(
                    ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} images  ETA {eta}")
                        .expect("valid template"),
                );
                bar.set_prefix(f.what.clone());
                bar
            });
            ImageWork {
                bar,
                started,
                next_line: started + LOG_INTERVAL,
            }
        });
        if let Some(bar) = &work.bar {
            return bar.set_position(f.done);
        }
        if f.done > 0 && f.done < f.total && Instant::now() >= work.next_line {
            work.next_line += LOG_INTERVAL;
            let rate = f.done as f64 / work.started.elapsed().as_secs_f64();
            line(&format!(
                "{}: {}/{} images ({rate:.1} images/s, about {:.0} s left)",
                f.what,
                f.done,
                f.total,
                (f.total - f.done) as f64 / rate
            ));
        }
    }
}
