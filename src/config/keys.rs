//! What a configuration key is, and the `section!` declarations that make one: a key's name,
//! flag, value in each preset, what is allowed and its help are written once, in
//! `config/mod.rs`; the section's struct, the presets, the flags, validation, `--help` and the
//! reference in docs/configuration.md are made from that.
use std::fmt::Write as _;

use clap::builder::{EnumValueParser, ValueParser};
use clap::{Arg, ArgMatches};
use serde::Serialize;

use super::{
    value_name, CifarLabel, ClassCount, CropMode, DataCache, DataFormat, DdpmVariance,
    DownsamplePadding, ImageSize, IntList, Lever, LossWeighting, LrSchedule, Precision, Prediction,
    Preset, RunConfig, SamplerKind, ScheduleKind, Split,
};

/// Declares a section of the configuration: its struct, one field per key, the section of each
/// preset, and the table of its keys (`KEYS`). Each key is
///
/// ```text
/// field: Type {
///     flag: "flag-name",                 // optional: the `ddpm train` flag
///     help: "What the key does",
///     tiny: value, mnist: value, cifar10: value,  // tiny is the base; the others optional
///     imagenet64: value, imagenet256: value,      // these inherit cifar10's, then imagenet64's
///     allowed: "text" if |v| predicate,  // optional; without `if`, a cross-key check tests it
///     limit: "text" if |v| predicate,    // optional: what a training run takes
/// }
/// ```
///
/// with serde attributes above it as on any field.
macro_rules! section {
    (
        $(#[$attr:meta])*
        pub struct $name:ident in $section:ident {
            $(
                $(#[$field_attr:meta])*
                $field:ident: $ty:ty {
                    $(flag: $flag:literal,)?
                    help: $help:literal,
                    tiny: $tiny:expr
                    $(, mnist: $mnist:expr)?
                    $(, cifar10: $cifar10:expr)?
                    $(, imagenet64: $imagenet64:expr)?
                    $(, imagenet256: $imagenet256:expr)?
                    $(, allowed: $allowed:literal $(if $ok:expr)?)?
                    $(, limit: $limit:literal if $limit_ok:expr)?
                    $(,)?
                }
            )*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $(
                #[doc = $help]
                $(#[$field_attr])*
                pub $field: $ty,
            )*
        }

        impl $name {
            /// This section of a preset.
            pub fn preset(preset: $crate::config::Preset) -> Self {
                use $crate::config::Preset;
                $name {
                    $($field: match preset {
                        Preset::Tiny => $tiny,
                        Preset::Mnist => key_pick!($tiny $(, $mnist)?),
                        Preset::Cifar10 => key_pick!($tiny $(, $cifar10)?),
                        Preset::Imagenet64 => key_pick!($tiny $(, $cifar10)? $(, $imagenet64)?),
                        Preset::Imagenet256 => {
                            key_pick!($tiny $(, $cifar10)? $(, $imagenet64)? $(, $imagenet256)?)
                        }
                    },)*
                }
            }

            /// This section's keys, in the order of the file.
            pub const KEYS: &'static [$crate::config::Key] = &[$(
                $crate::config::Key {
                    name: concat!(stringify!($section), ".", stringify!($field)),
                    flag: key_opt!($($flag)?),
                    help: $help,
                    slot: &$crate::config::keys::Field::<$ty> {
                        get: |c| &c.$section.$field,
                        get_mut: |c| &mut c.$section.$field,
                        preset: |p| $name::preset(p).$field,
                        allowed: key_opt!($($crate::config::keys::Rule::<$ty> {
                            text: $allowed,
                            ok: key_opt!($($ok)?),
                        })?),
                        limit: key_opt!($($crate::config::keys::Rule::<$ty> {
                            text: $limit,
                            ok: Some($limit_ok),
                        })?),
                    },
                },
            )*];
        }
    };
}

/// The last value given: the preset's own when it has one, else the one it inherits.
macro_rules! key_pick {
    ($last:expr) => {
        $last
    };
    ($first:expr, $($rest:expr),+) => {
        key_pick!($($rest),+)
    };
}

/// `None`, or `Some` of what is given.
macro_rules! key_opt {
    () => {
        None
    };
    ($value:expr) => {
        Some($value)
    };
}

/// A refused configuration, with the keys whose values decided it, so that a caller can tell
/// where those values came from (a flag, a file) without reading the message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that its key does not allow.
    #[error("invalid value for `{key}`: {value} (allowed: {allowed})")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
        /// The other keys that the check read (a cross-key check), e.g. `train.batch` for
        /// `train.grad_accum`.
        reads: &'static [&'static str],
    },
    /// Another check of these keys' values failed (the device, a speed lever).
    #[error("{error:#}")]
    Refused {
        keys: Vec<&'static str>,
        error: anyhow::Error,
    },
}

impl ConfigError {
    /// An error of another check, caused by the values of `keys`.
    pub fn refused(keys: Vec<&'static str>, error: anyhow::Error) -> Self {
        ConfigError::Refused { keys, error }
    }

    /// The keys whose values decided the error: the one it names first.
    pub fn keys(&self) -> Vec<&'static str> {
        match self {
            ConfigError::Invalid { key, reads, .. } => {
                std::iter::once(*key).chain(reads.iter().copied()).collect()
            }
            ConfigError::Refused { keys, .. } => keys.clone(),
        }
    }
}

/// One configuration key, as `section!` declares it.
pub struct Key {
    /// Dotted, as the TOML file nests it: `train.lr`.
    pub name: &'static str,
    /// The `ddpm train` flag, without its dashes.
    pub flag: Option<&'static str>,
    pub help: &'static str,
    pub(super) slot: &'static dyn Slot,
}

impl Key {
    /// What a value may be, as the reference and `--help` say it.
    pub fn allowed(&self) -> String {
        self.slot.allowed()
    }

    /// What a training run takes, when it takes less than `allowed`.
    pub fn limit(&self) -> Option<&'static str> {
        self.slot.limit()
    }

    /// The key's value in a preset, as a TOML file writes it.
    pub fn preset_value(&self, preset: Preset) -> String {
        self.slot.written(preset)
    }

    /// The value in each preset: one value when they agree, else each with its preset's name.
    pub fn preset_values(&self) -> String {
        let values = Preset::ALL.map(|p| self.preset_value(p));
        if values.iter().all(|v| *v == values[0]) {
            return values[0].clone();
        }
        let named: Vec<String> = Preset::ALL
            .iter()
            .zip(&values)
            .map(|(p, v)| format!("{v} ({})", p.name()))
            .collect();
        named.join(", ")
    }

    /// The field's name, which the flag shows as its value's name.
    fn field(&self) -> &'static str {
        self.name.rsplit('.').next().unwrap_or(self.name)
    }

    /// The key's command-line argument `--{flag}`.
    pub(super) fn arg(&self, flag: &'static str, switch: bool) -> Arg {
        let arg = Arg::new(flag)
            .long(flag)
            .help(format!("{} [{}]", self.help, self.name))
            .long_help(format!(
                "{} [{}]\n\nAllowed: {}{}. Default: {}.",
                self.help,
                self.name,
                self.allowed(),
                self.limit()
                    .map_or(String::new(), |l| format!("; in a training run: {l}")),
                self.preset_values()
            ));
        if switch {
            // Present: true; it takes no value.
            arg.action(clap::ArgAction::SetTrue)
        } else {
            self.slot.arg(
                arg.action(clap::ArgAction::Set)
                    .value_name(self.field().to_uppercase()),
            )
        }
    }
}

/// Every key, in the order of the file.
pub fn keys() -> impl Iterator<Item = &'static Key> {
    use super::*;
    [
        ModelConfig::KEYS,
        DiffusionConfig::KEYS,
        TrainConfig::KEYS,
        DataConfig::KEYS,
        SampleConfig::KEYS,
        CheckpointConfig::KEYS,
        FidConfig::KEYS,
        PosthocEmaConfig::KEYS,
    ]
    .into_iter()
    .flatten()
}

/// The key with this dotted name.
pub fn key(name: &str) -> Option<&'static Key> {
    keys().find(|key| key.name == name)
}

/// `text` with each configuration key it names followed by the key's `ddpm train` flag, for a
/// message shown on the command line: "lower train.lr" becomes "lower train.lr (--lr)". The
/// first mention of a key gets its flag, unless it states a value or the text already names
/// that flag.
pub fn with_flags(text: &str) -> String {
    let mut text = text.to_string();
    for key in keys() {
        let Some(flag) = key.flag else { continue };
        let flag = format!("--{flag}");
        if text.contains(&flag) {
            continue;
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        let mut named = false;
        while let Some(at) = rest.find(key.name) {
            let (before, after) = rest.split_at(at);
            let after = &after[key.name.len()..];
            out.push_str(before);
            out.push_str(key.name);
            let word = |c: char| c.is_alphanumeric() || c == '_';
            // A mention that states a value ("train.lr = 0.1") reads best as it is.
            let whole = !before.ends_with(|c: char| word(c) || c == '.' || c == '-')
                && !after.starts_with(word)
                && !after.starts_with(" = ");
            // After a name in backticks, not inside them.
            let closing = usize::from(after.starts_with('`'));
            out.push_str(&after[..closing]);
            if whole && !named {
                out.push_str(&format!(" ({flag})"));
                named = true;
            }
            rest = &after[closing..];
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// The reference of every key as a Markdown table: key, flag, value in each preset, what is
/// allowed, and what it does.
pub fn reference() -> String {
    let cell = |text: &str| text.replace('|', "\\|");
    let presets = Preset::ALL.map(|p| format!(" {} |", p.name())).concat();
    let mut table = format!("| key | flag |{presets} allowed | meaning |\n");
    table.push_str(&format!(
        "|---|---|{}---|---|\n",
        "---|".repeat(Preset::ALL.len())
    ));
    for key in keys() {
        let flag = key.flag.map_or(String::new(), |f| format!("`--{f}`"));
        let values = Preset::ALL.map(|p| format!(" `{}` |", cell(&key.preset_value(p))));
        let limit = key
            .limit()
            .map_or(String::new(), |l| format!("; in a training run: {l}"));
        let _ = writeln!(
            table,
            "| `{}` | {flag} |{} {}{} | {} |",
            key.name,
            values.concat(),
            cell(&key.allowed()),
            cell(&limit),
            cell(key.help)
        );
    }
    table
}

/// A test of a value, with what it allows in words.
pub(super) struct Rule<T: 'static> {
    pub text: &'static str,
    /// None: a check that reads other keys too tests it.
    pub ok: Option<fn(&T) -> bool>,
}

/// A key's field of type `T`: how to reach it, its value in each preset and its rules.
pub(super) struct Field<T: 'static> {
    pub get: fn(&RunConfig) -> &T,
    pub get_mut: fn(&mut RunConfig) -> &mut T,
    pub preset: fn(Preset) -> T,
    pub allowed: Option<Rule<T>>,
    /// What a training run takes (beyond `allowed`), so that every checkpoint stays readable.
    pub limit: Option<Rule<T>>,
}

/// A key's field, whatever its type.
pub(super) trait Slot {
    fn allowed(&self) -> String;
    fn limit(&self) -> Option<&'static str>;
    /// The value in `c`, checked against the type's range (TOML's integers are i64) and
    /// `allowed`.
    fn check(&self, key: &'static str, c: &RunConfig) -> Result<(), ConfigError>;
    fn check_limit(&self, key: &'static str, c: &RunConfig) -> Result<(), ConfigError>;
    /// The value in a preset, as TOML.
    fn written(&self, preset: Preset) -> String;
    /// The flag's value parser and value count.
    fn arg(&self, arg: Arg) -> Arg;
    /// Writes the flag's value, when given, into `into`; whether it was given.
    fn read(&self, matches: &ArgMatches, id: &str, into: &mut RunConfig) -> bool;
    fn copy(&self, from: &RunConfig, to: &mut RunConfig);
}

fn invalid<T: KeyValue>(key: &'static str, value: &T, allowed: String) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.show(),
        allowed,
        reads: &[],
    }
}

impl<T: KeyValue> Slot for Field<T> {
    fn allowed(&self) -> String {
        self.allowed
            .as_ref()
            .map_or_else(T::kind, |rule| rule.text.to_string())
    }

    fn limit(&self) -> Option<&'static str> {
        self.limit.as_ref().map(|rule| rule.text)
    }

    fn check(&self, key: &'static str, c: &RunConfig) -> Result<(), ConfigError> {
        let value = (self.get)(c);
        // Flags take any u64; the configuration is written as TOML, whose integers are i64.
        if !value.fits_toml() {
            return Err(invalid(key, value, format!("≤ {}", i64::MAX)));
        }
        match &self.allowed {
            Some(Rule { text, ok: Some(ok) }) if !ok(value) => {
                Err(invalid(key, value, text.to_string()))
            }
            _ => Ok(()),
        }
    }

    fn check_limit(&self, key: &'static str, c: &RunConfig) -> Result<(), ConfigError> {
        let value = (self.get)(c);
        match &self.limit {
            Some(Rule { text, ok: Some(ok) }) if !ok(value) => {
                Err(invalid(key, value, text.to_string()))
            }
            _ => Ok(()),
        }
    }

    fn written(&self, preset: Preset) -> String {
        (self.preset)(preset).written()
    }

    fn arg(&self, arg: Arg) -> Arg {
        T::flag(arg.value_parser(T::parser()))
    }

    fn read(&self, matches: &ArgMatches, id: &str, into: &mut RunConfig) -> bool {
        // Only a value from the command line: a switch has a default (false) that sets nothing.
        if matches.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
            return false;
        }
        match matches.get_one::<T>(id) {
            Some(value) => {
                *(self.get_mut)(into) = value.clone();
                true
            }
            None => false,
        }
    }

    fn copy(&self, from: &RunConfig, to: &mut RunConfig) {
        *(self.get_mut)(to) = (self.get)(from).clone();
    }
}

/// A type that a key's value has.
pub trait KeyValue: Clone + Serialize + Send + Sync + 'static {
    /// What any value of the type is, in words (for a key that declares no narrower range).
    fn kind() -> String;
    /// Reads the flag's text.
    fn parser() -> ValueParser;
    /// The value as an error message names it.
    fn show(&self) -> String;
    /// The value as a TOML file writes it.
    fn written(&self) -> String {
        toml::Value::try_from(self).map_or_else(|_| self.show(), |v| v.to_string())
    }
    /// Whether TOML, whose integers are i64, can hold the value.
    fn fits_toml(&self) -> bool {
        true
    }
    /// The flag's other settings.
    fn flag(arg: Arg) -> Arg {
        arg
    }
}

macro_rules! whole_numbers {
    ($($t:ty: $kind:literal, $max:expr;)*) => {$(
        impl KeyValue for $t {
            fn kind() -> String {
                $kind.into()
            }
            fn parser() -> ValueParser {
                clap::value_parser!($t).into()
            }
            fn show(&self) -> String {
                self.to_string()
            }
            fn fits_toml(&self) -> bool {
                (*self as i128) <= $max as i128
            }
        }
    )*};
}

whole_numbers! {
    i64: "a whole number", i64::MAX;
    u64: "a whole number ≥ 0", i64::MAX;
    usize: "a whole number ≥ 0", i64::MAX;
}

impl KeyValue for f64 {
    fn kind() -> String {
        "a number".into()
    }
    fn parser() -> ValueParser {
        clap::value_parser!(f64).into()
    }
    fn show(&self) -> String {
        self.to_string()
    }
    /// Short for the very small: `1e-8`, not `0.00000001`.
    fn written(&self) -> String {
        format!("{self:?}")
    }
}

impl KeyValue for bool {
    fn kind() -> String {
        "true or false".into()
    }
    fn parser() -> ValueParser {
        clap::value_parser!(bool)
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl KeyValue for String {
    fn kind() -> String {
        "a string".into()
    }
    fn parser() -> ValueParser {
        ValueParser::new(Utf8Text)
    }
    fn show(&self) -> String {
        format!("{self:?}")
    }
}

/// Flag text that must be UTF-8 (the configuration is TOML, which holds text only), with an
/// error that names the flag (clap's own does not).
#[derive(Clone)]
struct Utf8Text;

impl clap::builder::TypedValueParser for Utf8Text {
    type Value = String;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        value.to_str().map(str::to_owned).ok_or_else(|| {
            let flag = arg
                .and_then(Arg::get_long)
                .map_or(String::new(), |long| format!("--{long} "));
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!(
                    "{flag}{}: not valid UTF-8; the run's configuration is TOML text, so rename the path\n",
                    value.to_string_lossy()
                ),
            )
            .with_cmd(command)
        })
    }
}

impl KeyValue for Vec<i64> {
    fn kind() -> String {
        "a list of whole numbers (flag: comma-separated)".into()
    }
    fn parser() -> ValueParser {
        ValueParser::new(|text: &str| text.parse::<IntList>().map(|list| list.0))
    }
    fn show(&self) -> String {
        format!("{self:?}")
    }
}

impl KeyValue for Vec<f64> {
    fn kind() -> String {
        "a list of numbers (flag: comma-separated)".into()
    }
    fn parser() -> ValueParser {
        ValueParser::new(|text: &str| {
            text.split(',')
                .map(|x| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}")))
                .collect::<std::result::Result<Vec<f64>, String>>()
        })
    }
    fn show(&self) -> String {
        format!("{self:?}")
    }
}

impl KeyValue for ImageSize {
    fn kind() -> String {
        "N or [H, W] (flag: N or HxW)".into()
    }
    fn parser() -> ValueParser {
        ValueParser::new(|text: &str| text.parse::<ImageSize>())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl KeyValue for ClassCount {
    fn kind() -> String {
        "a whole number ≥ 0 or auto".into()
    }
    fn parser() -> ValueParser {
        ValueParser::new(|text: &str| text.parse::<ClassCount>())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// The names of an enum's values: `a, b or c`.
fn names<T: clap::ValueEnum>() -> String {
    let names: Vec<String> = T::value_variants().iter().map(value_name).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

macro_rules! value_enums {
    ($($t:ty),*) => {$(
        impl KeyValue for $t {
            fn kind() -> String {
                names::<$t>()
            }
            fn parser() -> ValueParser {
                EnumValueParser::<$t>::new().into()
            }
            fn show(&self) -> String {
                value_name(self)
            }
        }
    )*};
}

value_enums!(
    DownsamplePadding,
    ScheduleKind,
    Prediction,
    LossWeighting,
    LrSchedule,
    Precision,
    DataFormat,
    Split,
    DataCache,
    CropMode,
    CifarLabel,
    SamplerKind,
    DdpmVariance
);

impl KeyValue for Lever {
    fn kind() -> String {
        names::<Lever>()
    }
    fn parser() -> ValueParser {
        EnumValueParser::<Lever>::new().into()
    }
    fn show(&self) -> String {
        value_name(self)
    }
    /// Given alone, a lever is on.
    fn flag(arg: Arg) -> Arg {
        arg.num_args(0..=1).default_missing_value("true")
    }
}
