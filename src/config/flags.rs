//! Configuration keys as command-line flags: `ddpm train` takes every key that declares a
//! flag (`Overrides`), and another command a chosen few (`KeyFlags`).
use std::marker::PhantomData;

use clap::{Arg, ArgMatches, Command, FromArgMatches};

use super::keys::{key, keys, Key};
use super::{positive_count, Preset, RunConfig};

/// A key's flag in a command.
#[derive(Clone, Copy)]
pub struct Flag {
    key: &'static Key,
    name: &'static str,
    switch: bool,
}

impl Flag {
    /// The flag that `ddpm train` gives the key.
    ///
    /// # Panics
    /// When no key has this name, or the key has no flag: the flags are fixed in the code.
    pub fn of(name: &str) -> Self {
        let key = key(name).unwrap_or_else(|| panic!("no configuration key is named {name}"));
        let flag = key
            .flag
            .unwrap_or_else(|| panic!("the configuration key {name} has no flag"));
        Flag {
            key,
            name: flag,
            switch: false,
        }
    }

    /// The same key under another flag.
    pub fn named(self, name: &'static str) -> Self {
        Flag { name, ..self }
    }

    /// A flag without a value that sets its (boolean) key to true.
    pub fn switch(self) -> Self {
        Flag {
            switch: true,
            ..self
        }
    }

    fn arg(&self) -> Arg {
        self.key.arg(self.name, self.switch)
    }
}

/// The flags of every key that declares one, in the order of the file.
pub fn train_flags() -> Vec<Flag> {
    keys()
        .filter_map(|key| {
            key.flag.map(|name| Flag {
                key,
                name,
                switch: false,
            })
        })
        .collect()
}

/// The values that flags gave to keys.
#[derive(Clone, Debug, PartialEq)]
pub struct FlagValues {
    /// Holds each given key's value; the other values mean nothing.
    values: Box<RunConfig>,
    /// The keys given, dotted.
    given: Vec<&'static str>,
}

impl Default for FlagValues {
    fn default() -> Self {
        FlagValues {
            values: Box::new(RunConfig::of(Preset::Tiny)),
            given: Vec::new(),
        }
    }
}

impl FlagValues {
    fn augment(command: Command, flags: &[Flag]) -> Command {
        flags
            .iter()
            .fold(command, |command, flag| command.arg(flag.arg()))
    }

    fn update(&mut self, matches: &ArgMatches, flags: &[Flag]) {
        for flag in flags {
            if flag.key.slot.read(matches, flag.name, &mut self.values)
                && !self.given.contains(&flag.key.name)
            {
                self.given.push(flag.key.name);
            }
        }
    }

    /// Sets the keys that flags gave.
    pub fn apply(&self, config: &mut RunConfig) {
        for name in &self.given {
            if let Some(key) = key(name) {
                key.slot.copy(&self.values, config);
            }
        }
    }

    /// Whether a flag gave the key (dotted) its value.
    pub fn sets(&self, key: &str) -> bool {
        self.given.contains(&key)
    }
}

/// The keys a command takes as flags.
pub trait FlagSet {
    fn flags() -> Vec<Flag>;
}

/// The flags of some keys, for a command's arguments (`#[command(flatten)]`).
#[derive(Clone, Debug, Default)]
pub struct KeyFlags<S> {
    values: FlagValues,
    set: PhantomData<S>,
}

impl<S> KeyFlags<S> {
    /// Sets the keys that flags gave.
    pub fn apply(&self, config: &mut RunConfig) {
        self.values.apply(config);
    }

    /// Whether a flag gave the key (dotted) its value.
    pub fn sets(&self, key: &str) -> bool {
        self.values.sets(key)
    }
}

impl<S: FlagSet> clap::Args for KeyFlags<S> {
    fn augment_args(command: Command) -> Command {
        FlagValues::augment(command, &S::flags())
    }
    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl<S: FlagSet> FromArgMatches for KeyFlags<S> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut values = FlagValues::default();
        values.update(matches, &S::flags());
        Ok(KeyFlags {
            values,
            set: PhantomData,
        })
    }
    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.values.update(matches, &S::flags());
        Ok(())
    }
}

/// `ddpm train`'s flags: one per key that declares one, and `--epochs`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub keys: FlagValues,
    /// The run's length in epochs over the data instead of --steps: resolved into train.steps
    /// once the data is loaded.
    pub epochs: Option<u64>,
}

impl Overrides {
    /// Applies the flags that were given (--epochs is resolved once the data is loaded).
    pub fn apply(&self, config: &mut RunConfig) {
        self.keys.apply(config);
    }

    /// Whether a flag gave the key (dotted) its value.
    pub fn sets(&self, key: &str) -> bool {
        self.keys.sets(key)
    }

    /// Parses flags as `ddpm train` does, e.g. `["--lr", "1e-4"]`.
    pub fn from_flags(flags: &[&str]) -> Result<Self, clap::Error> {
        let command = <Self as clap::Args>::augment_args(Command::new("overrides"));
        let matches = command
            .try_get_matches_from(std::iter::once("overrides").chain(flags.iter().copied()))?;
        Self::from_arg_matches(&matches)
    }
}

impl clap::Args for Overrides {
    fn augment_args(command: Command) -> Command {
        let epochs = Arg::new("epochs")
            .long("epochs")
            .value_name("EPOCHS")
            .help("Run length in epochs over the data instead of --steps (in total, from step 0, also when resuming)")
            .conflicts_with("steps")
            .value_parser(positive_count::<u64>);
        // --epochs beside --steps, whose key it sets.
        train_flags().iter().fold(command, |command, flag| {
            let command = command.arg(flag.arg());
            match flag.key.name {
                "train.steps" => command.arg(epochs.clone()),
                _ => command,
            }
        })
    }
    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl FromArgMatches for Overrides {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut overrides = Overrides::default();
        overrides.update_from_arg_matches(matches)?;
        Ok(overrides)
    }
    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.keys.update(matches, &train_flags());
        if let Some(epochs) = matches.get_one::<u64>("epochs") {
            self.epochs = Some(*epochs);
        }
        Ok(())
    }
}
