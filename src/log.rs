//! The broker's operations log: one line per event, `TIME LEVEL message`,
//! appended to the log file; warnings and errors also go to stderr so a
//! person running the broker by hand sees them.
//!
//! The logger is a plain value shared by reference (no global state). A
//! failing log write is ignored: losing a log line must never stop the
//! broker from serving.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How much the log says, least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

impl FromStr for Level {
    type Err = ();
    fn from_str(text: &str) -> Result<Level, ()> {
        match text {
            "error" => Ok(Level::Error),
            "warn" => Ok(Level::Warn),
            "info" => Ok(Level::Info),
            "debug" => Ok(Level::Debug),
            _ => Err(()),
        }
    }
}

/// The log sink.
#[derive(Debug)]
pub struct Logger {
    level: Level,
    file: Option<Mutex<File>>,
    /// Where `file` was opened, for [`Logger::reopen`].
    path: Option<PathBuf>,
}

impl Logger {
    /// Appends to `path` (created 0600 if missing).
    pub fn open(path: &Path, level: Level) -> io::Result<Logger> {
        Ok(Logger {
            level,
            file: Some(Mutex::new(open_append(path)?)),
            path: Some(path.to_path_buf()),
        })
    }

    /// Opens the log file's path again and writes there from now on: after
    /// logrotate renamed the file (SIGHUP), so no `copytruncate` is needed.
    /// On failure the old file stays in use. Returns the path reopened.
    pub fn reopen(&self) -> io::Result<Option<&Path>> {
        let (Some(file), Some(path)) = (&self.file, &self.path) else {
            return Ok(None);
        };
        let new = open_append(path)?;
        *file.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = new;
        Ok(Some(path))
    }

    /// A logger that writes warnings and errors to stderr only.
    pub fn stderr_only(level: Level) -> Logger {
        Logger {
            level,
            file: None,
            path: None,
        }
    }

    /// Whether lines at `level` are written.
    pub fn enabled(&self, level: Level) -> bool {
        level <= self.level
    }

    pub fn log(&self, level: Level, message: fmt::Arguments<'_>) {
        self.write(level, message, level <= Level::Warn);
    }

    /// Logs to the file only: for a message the caller prints itself.
    pub fn file_only(&self, level: Level, message: fmt::Arguments<'_>) {
        self.write(level, message, false);
    }

    fn write(&self, level: Level, message: fmt::Arguments<'_>, to_stderr: bool) {
        if !self.enabled(level) {
            return;
        }
        let line = format!(
            "{} {} {}\n",
            utc_timestamp(SystemTime::now()),
            level.name(),
            message
        );
        if to_stderr {
            let _ = io::stderr().write_all(line.as_bytes());
        }
        if let Some(file) = &self.file {
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let _ = file.write_all(line.as_bytes());
        }
    }

    pub fn error(&self, message: fmt::Arguments<'_>) {
        self.log(Level::Error, message)
    }
    pub fn warn(&self, message: fmt::Arguments<'_>) {
        self.log(Level::Warn, message)
    }
    pub fn info(&self, message: fmt::Arguments<'_>) {
        self.log(Level::Info, message)
    }
    pub fn debug(&self, message: fmt::Arguments<'_>) {
        self.log(Level::Debug, message)
    }
}

/// Opens `path` for appending, created 0600 if missing.
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open log file {}: {e}", path.display())))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for `time`, computed by hand (no time crate).
pub fn utc_timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_923_273);
        assert_eq!(utc_timestamp(t), "2026-11-29T03:34:33Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_timestamp(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn levels() {
        assert!(Level::Error < Level::Debug);
        assert_eq!("warn".parse::<Level>(), Ok(Level::Warn));
        assert!("loud".parse::<Level>().is_err());
    }
}
