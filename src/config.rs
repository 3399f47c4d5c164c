//! The broker's command line: options, defaults (the original system's),
//! limits on every value, and the usage text.
//!
//! Parsing never exits the process: it returns [`Parsed`] or a
//! [`UsageError`] whose `Display` is the one-line message the binary prints
//! before the usage (exit 2). The helpers all three programs share live in
//! [`crate::cli`], so they word their errors alike.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use crate::cli::{Parsed, UsageError, number, parse_number, string};
pub use crate::protocol::MAX_MSG_SIZE_LIMIT as MAX_MSG_SIZE;

use crate::log::Level;
use crate::store::FsyncPolicy;

/// Everything the broker is started with.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub messages_file: PathBuf,
    pub port: u16,
    pub bind: IpAddr,
    pub capacity: u32,
    pub max_msg_size: usize,
    pub max_clients: usize,
    pub idle_timeout: Duration,
    pub consumer_ttl: Duration,
    pub ack_wait: Duration,
    pub max_ack_pending: usize,
    pub send_timeout: Duration,
    pub shm_key: i32,
    pub sem_key: i32,
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
    pub log_file: PathBuf,
    pub log_level: Level,
    pub repair: bool,
    /// `--auth-token-file`: where the token is (read by the binary).
    pub auth_token_file: Option<PathBuf>,
    /// The token read from it: connections must send `AUTH:<token>` first.
    pub auth_token: Option<crate::token::Token>,
    /// Without a token, serve loopback peers only (off with
    /// `--no-protected-mode`).
    pub protected_mode: bool,
    /// `--http ADDR`: where `/metrics` and `/healthz` are served.
    pub http: Option<SocketAddr>,
    /// `--inspect`: print the live queue under the keys, then exit.
    pub inspect: bool,
    /// Cursors (consumer ids) the broker keeps at most.
    pub max_consumers: usize,
    /// How long a new connection has to register before it is dropped.
    pub register_timeout: Duration,
}

impl BrokerConfig {
    /// The defaults, for `messages_file`.
    pub fn new(messages_file: PathBuf) -> BrokerConfig {
        BrokerConfig {
            messages_file,
            port: 8080,
            bind: IpAddr::from([0, 0, 0, 0]),
            capacity: 1000,
            max_msg_size: 1024,
            max_clients: 100,
            idle_timeout: Duration::from_secs(300),
            consumer_ttl: Duration::from_secs(3600),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            send_timeout: Duration::from_millis(2000),
            shm_key: 0x1234,
            sem_key: 0x5678,
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(1000),
            log_file: PathBuf::from("cola_mensajes.log"),
            log_level: Level::Info,
            repair: false,
            auth_token_file: None,
            auth_token: None,
            protected_mode: true,
            http: None,
            inspect: false,
            max_consumers: 10_000,
            register_timeout: Duration::from_secs(10),
        }
    }

    /// The longest request line accepted.
    pub fn max_line(&self) -> usize {
        self.max_msg_size + crate::protocol::LINE_OVERHEAD
    }
}

/// Largest queue capacity: a SysV semaphore counts to 32767 (SEMVMX).
pub const MAX_CAPACITY: u64 = 32767;
/// Largest message: one MiB keeps per-connection buffers and the segment
/// Most connections at once: one pool thread each.
pub const MAX_CLIENTS: u64 = 4096;
/// Most cursors: each costs a map entry and a line in the offsets file,
/// which is rewritten whole about once a second, so a million is the most
/// that stays cheap.
pub const MAX_CONSUMERS: u64 = 1_000_000;

pub const BROKER_USAGE: &str = "\
usage: broker [OPTIONS] <messages_file>
       broker --inspect [--shm-key K] [--sem-key K]

Single-host message broker: a queue in SysV shared memory, persisted to
<messages_file> (offsets in <messages_file>.offsets), served over TCP.

options:
  -p, --port N            TCP port; 0 picks a free one        [8080]
      --bind ADDR         address to listen on                [0.0.0.0]
      --capacity N        messages the queue holds (1-32767)  [1000]
      --max-msg-size N    bytes of content per message        [1024]
      --max-clients N     connections served at once          [100]
      --idle-timeout S    seconds without a request before a client is dropped [300]
      --consumer-ttl S    seconds a cursor with no connection is kept [3600]
      --ack-wait S        ack mode: seconds before redelivery [30]
      --max-ack-pending N ack mode: unacknowledged messages per consumer id [1000]
      --send-timeout MS   how long SEND waits for room in a full queue [2000]
      --shm-key K         SysV shared memory key, decimal or 0x hex [0x1234]
      --sem-key K         SysV semaphore key, decimal or 0x hex [0x5678]
      --fsync POLICY      always, interval or never           [interval]
      --fsync-interval MS for --fsync interval                [1000]
      --log-file PATH     operations log                      [cola_mensajes.log]
      --log-level L       error, warn, info or debug          [info]
      --repair            start from a damaged messages file, keeping its valid records
      --auth-token-file F require AUTH:<token> first; the token is F's first line
                          (16 bytes or more; F must not be readable by group/others)
      --no-protected-mode without a token, serve other hosts too (default: loopback only)
      --http ADDR         serve GET /metrics and /healthz on ADDR (e.g. 127.0.0.1:9100) [off]
      --inspect           print the live queue under --shm-key/--sem-key, then exit
                          (no <messages_file> needed)
      --max-consumers N   cursors (consumer ids) kept at most     [10000]
      --register-timeout S seconds a new connection has to register [10]
  -h, --help              print this help
  -V, --version           print the version
";

/// Parses the broker's arguments (without the program name).
pub fn parse_broker_args(
    args: impl IntoIterator<Item = OsString>,
) -> Result<Parsed<BrokerConfig>, UsageError> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut config = BrokerConfig::new(PathBuf::new());
    let mut file: Option<PathBuf> = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('p') | Long("port") => config.port = number(&mut parser, "--port", 0, 65535)?,
            Long("bind") => {
                let text = string(&mut parser, "--bind")?;
                config.bind = text.parse().map_err(|_| {
                    UsageError(format!(
                        "invalid value '{text}' for --bind: not an IP address"
                    ))
                })?;
            }
            Long("capacity") => {
                config.capacity = number(&mut parser, "--capacity", 1, MAX_CAPACITY)?
            }
            Long("max-msg-size") => {
                config.max_msg_size = number(&mut parser, "--max-msg-size", 1, MAX_MSG_SIZE)?
            }
            Long("max-clients") => {
                config.max_clients = number(&mut parser, "--max-clients", 1, MAX_CLIENTS)?
            }
            Long("idle-timeout") => config.idle_timeout = seconds(&mut parser, "--idle-timeout")?,
            Long("consumer-ttl") => config.consumer_ttl = seconds(&mut parser, "--consumer-ttl")?,
            Long("ack-wait") => config.ack_wait = seconds(&mut parser, "--ack-wait")?,
            Long("max-ack-pending") => {
                config.max_ack_pending = number(&mut parser, "--max-ack-pending", 1, MAX_CAPACITY)?
            }
            Long("send-timeout") => {
                config.send_timeout =
                    Duration::from_millis(number(&mut parser, "--send-timeout", 0, 60_000)?)
            }
            Long("shm-key") => config.shm_key = ipc_key(&mut parser, "--shm-key")?,
            Long("sem-key") => config.sem_key = ipc_key(&mut parser, "--sem-key")?,
            Long("fsync") => {
                let text = string(&mut parser, "--fsync")?;
                config.fsync = FsyncPolicy::from_str(&text).map_err(|()| {
                    UsageError(format!(
                        "invalid value '{text}' for --fsync: expected always, interval or never"
                    ))
                })?;
            }
            Long("fsync-interval") => {
                config.fsync_interval =
                    Duration::from_millis(number(&mut parser, "--fsync-interval", 1, 60_000)?)
            }
            Long("log-file") => config.log_file = parser.value()?.into(),
            Long("log-level") => {
                let text = string(&mut parser, "--log-level")?;
                config.log_level = Level::from_str(&text).map_err(|()| {
                    UsageError(format!(
                        "invalid value '{text}' for --log-level: expected error, warn, info or debug"
                    ))
                })?;
            }
            Long("repair") => config.repair = true,
            Long(name @ ("auth-token-file" | "no-protected-mode" | "http" | "inspect")) => {
                let name = name.to_owned();
                operator_option(&name, &mut parser, &mut config)?;
            }
            Long("max-consumers") => config.max_consumers = max_consumers(&mut parser)?,
            Long("register-timeout") => {
                config.register_timeout = seconds(&mut parser, "--register-timeout")?
            }
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Value(value) if file.is_none() => file = Some(value.into()),
            _ => return Err(arg.unexpected().into()),
        }
    }
    if config.inspect && file.is_none() {
        return Ok(Parsed::Run(config));
    }
    finish(config, file)
}

/// The checks that need the whole command line: the messages file is
/// there, and the sizes fit.
fn finish(
    mut config: BrokerConfig,
    file: Option<PathBuf>,
) -> Result<Parsed<BrokerConfig>, UsageError> {
    let Some(file) = file else {
        return Err(UsageError("missing <messages_file>".to_string()));
    };
    if file.as_os_str().is_empty() {
        return Err(UsageError("<messages_file> is empty".to_string()));
    }
    config.messages_file = file;
    check_sizes(&config, isize::MAX as u64)?;
    Ok(Parsed::Run(config))
}

/// Bytes a connection may hold in buffers besides its line: the read
/// buffer and the reply buffer before it is flushed (session.rs).
const CONNECTION_BUFFERS: u64 = 2 * 64 * 1024;

/// Checks, with checked arithmetic, that every size derived from the
/// options fits in `limit` bytes (the address space: `isize::MAX`, a
/// parameter so tests can ask what a 32-bit target would say): the shared
/// memory segment, the longest line, and the buffers of `max_clients`
/// connections beside the segment. A set that does not fit is a usage
/// error (exit 2), not a wrapped size at run time.
pub fn check_sizes(config: &BrokerConfig, limit: u64) -> Result<(), UsageError> {
    let layout = crate::queue::Layout::within(
        u64::from(config.capacity),
        config.max_msg_size as u64,
        limit,
    )
    .map_err(|err| UsageError(err.to_string()))?;
    let too_big = || {
        UsageError(format!(
            "--max-clients {} with --max-msg-size {} and --capacity {} need more memory \
             than this system's address space ({limit} bytes)",
            config.max_clients, config.max_msg_size, config.capacity
        ))
    };
    let line = (config.max_msg_size as u64)
        .checked_add(crate::protocol::LINE_OVERHEAD as u64)
        .ok_or_else(too_big)?;
    (config.max_clients as u64)
        .checked_mul(line.checked_add(CONNECTION_BUFFERS).ok_or_else(too_big)?)
        .and_then(|buffers| buffers.checked_add(layout.len as u64))
        .filter(|&total| total <= limit)
        .ok_or_else(too_big)?;
    Ok(())
}

fn max_consumers(parser: &mut lexopt::Parser) -> Result<usize, UsageError> {
    number(parser, "--max-consumers", 1, MAX_CONSUMERS)
}

fn seconds(parser: &mut lexopt::Parser, name: &str) -> Result<Duration, UsageError> {
    Ok(Duration::from_secs(number(parser, name, 1, 31 * 86_400)?))
}

/// A SysV key: decimal or `0x` hex, nonzero (0 is IPC_PRIVATE), fits in 32 bits.
fn ipc_key(parser: &mut lexopt::Parser, name: &str) -> Result<i32, UsageError> {
    let text = string(parser, name)?;
    parse_ipc_key(&text)
        .ok_or_else(|| UsageError(format!("invalid value '{text}' for {name}: expected a nonzero key, decimal or 0x hex, up to 0xffffffff")))
}

/// Parses a SysV key as [`ipc_key`] accepts it.
pub fn parse_ipc_key(text: &str) -> Option<i32> {
    let value = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
        None => text.parse::<u32>().ok()?,
    };
    (value != 0).then_some(value as i32)
}

/// The operator's options (access, monitoring, inspection), apart so the
/// main parser stays short.
fn operator_option(
    name: &str,
    parser: &mut lexopt::Parser,
    config: &mut BrokerConfig,
) -> Result<(), UsageError> {
    match name {
        "auth-token-file" => config.auth_token_file = Some(parser.value()?.into()),
        "no-protected-mode" => config.protected_mode = false,
        "http" => {
            let text = string(parser, "--http")?;
            config.http = Some(text.parse().map_err(|_| {
                UsageError(format!(
                    "invalid value '{text}' for --http: expected IP:PORT, e.g. 127.0.0.1:9100"
                ))
            })?);
        }
        _ => config.inspect = true,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed<BrokerConfig>, UsageError> {
        parse_broker_args(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_are_the_original_system_s() {
        let Parsed::Run(config) = parse(&["msgs.dat"]).unwrap() else {
            panic!()
        };
        assert_eq!(config.port, 8080);
        assert_eq!(config.capacity, 1000);
        assert_eq!(config.max_msg_size, 1024);
        assert_eq!(config.max_clients, 100);
        assert_eq!(config.shm_key, 0x1234);
        assert_eq!(config.sem_key, 0x5678);
        assert_eq!(config.log_file, PathBuf::from("cola_mensajes.log"));
        assert_eq!(config.fsync, FsyncPolicy::Interval);
    }

    #[test]
    fn options_and_errors() {
        let Parsed::Run(config) = parse(&[
            "-p",
            "0",
            "--shm-key",
            "0x10",
            "--sem-key",
            "17",
            "--fsync",
            "always",
            "f",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!((config.port, config.shm_key, config.sem_key), (0, 16, 17));
        assert_eq!(config.fsync, FsyncPolicy::Always);
        assert!(matches!(parse(&["-h"]), Ok(Parsed::Help)));
        assert!(matches!(parse(&["--version"]), Ok(Parsed::Version)));
        for bad in [
            &["--port", "70000", "f"][..],
            &["--capacity", "0", "f"],
            &["--capacity", "40000", "f"],
            &["--shm-key", "0", "f"],
            &["--fsync", "sometimes", "f"],
            &["--bogus", "f"],
            &["f", "g"],
            &[],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        for (name, value) in [("--max-consumers", "0"), ("--register-timeout", "0")] {
            assert!(parse(&[name, value, "f"]).is_err(), "{name} {value}");
        }
        let Parsed::Run(config) =
            parse(&["--max-consumers", "5", "--register-timeout", "3", "f"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(config.max_consumers, 5);
        assert_eq!(config.register_timeout, Duration::from_secs(3));
        let err = parse(&["--port", "x", "f"]).unwrap_err();
        assert!(err.0.contains("'x'") && err.0.contains("--port"), "{err}");
    }

    #[test]
    fn the_operator_s_options() {
        let Parsed::Run(config) = parse(&["f"]).unwrap() else {
            panic!()
        };
        assert!(config.protected_mode && config.http.is_none() && !config.inspect);
        let Parsed::Run(config) = parse(&[
            "--auth-token-file",
            "t",
            "--no-protected-mode",
            "--http",
            "127.0.0.1:9100",
            "f",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(config.auth_token_file, Some(PathBuf::from("t")));
        assert!(!config.protected_mode);
        assert_eq!(config.http, Some("127.0.0.1:9100".parse().unwrap()));
        // --inspect needs no messages file.
        let Parsed::Run(config) = parse(&["--inspect", "--shm-key", "0x10"]).unwrap() else {
            panic!()
        };
        assert!(config.inspect && config.shm_key == 16);
        let err = parse(&["--http", "9100", "f"]).unwrap_err();
        assert!(
            err.0.contains("'9100'") && err.0.contains("--http"),
            "{err}"
        );
        assert!(parse(&["--auth-token-file"]).is_err());
    }

    #[test]
    fn sizes_that_overflow_a_32_bit_address_space_are_refused() {
        let limit_32 = i32::MAX as u64;
        let config = |args: &[&str]| {
            let mut all = args.to_vec();
            all.push("f");
            match parse(&all).unwrap() {
                Parsed::Run(config) => config,
                _ => panic!(),
            }
        };
        // The armv7 report: 4096 slots of 1048552 + 24 bytes wrap to 2^32.
        let armv7 = config(&["--capacity", "4096", "--max-msg-size", "1048552"]);
        let err = check_sizes(&armv7, limit_32).unwrap_err();
        assert!(err.0.contains("--capacity 4096"), "{err}");
        // On this (64-bit) system the same options fit.
        assert!(check_sizes(&armv7, isize::MAX as u64).is_ok());
        // The defaults fit everywhere; the largest everything does not on 32 bits.
        assert!(check_sizes(&config(&[]), limit_32).is_ok());
        let largest = config(&[
            "--capacity",
            "32767",
            "--max-msg-size",
            "1048576",
            "--max-clients",
            "4096",
        ]);
        assert!(check_sizes(&largest, limit_32).is_err());
        let clients = config(&["--max-clients", "4096", "--max-msg-size", "1048576"]);
        let err = check_sizes(&clients, limit_32).unwrap_err();
        assert!(err.0.contains("--max-clients 4096"), "{err}");
        assert!(check_sizes(&largest, u64::MAX >> 1).is_ok());
    }
}
