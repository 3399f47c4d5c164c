//! Command-line helpers every program shares: the error a bad command line
//! gets, what a command line asks for, and value parsing that quotes the
//! bad input, so all three programs word their errors alike. Knows nothing
//! of the broker or its files.

use std::fmt;

/// A bad command line: the one-line message to print before the usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl From<lexopt::Error> for UsageError {
    fn from(err: lexopt::Error) -> UsageError {
        UsageError(err.to_string())
    }
}

/// What a command line asks for.
#[derive(Debug)]
pub enum Parsed<T> {
    Run(T),
    Help,
    Version,
}

/// The option's value as UTF-8 text.
pub fn string(parser: &mut lexopt::Parser, name: &str) -> Result<String, UsageError> {
    parser
        .value()?
        .into_string()
        .map_err(|raw| UsageError(format!("invalid value {raw:?} for {name}: not UTF-8")))
}

/// The option's value as a whole number in `min..=max`.
pub fn number<T: TryFrom<u64>>(
    parser: &mut lexopt::Parser,
    name: &str,
    min: u64,
    max: u64,
) -> Result<T, UsageError> {
    let text = string(parser, name)?;
    parse_number(&text, name, min, max)
}

/// `text` as a whole number in `min..=max`, or an error that quotes it.
pub fn parse_number<T: TryFrom<u64>>(
    text: &str,
    name: &str,
    min: u64,
    max: u64,
) -> Result<T, UsageError> {
    let bad = || {
        UsageError(format!(
            "invalid value '{text}' for {name}: expected a whole number from {min} to {max}"
        ))
    };
    let value: u64 = text.parse().map_err(|_| bad())?;
    if value < min || value > max {
        return Err(bad());
    }
    T::try_from(value).map_err(|_| bad())
}
