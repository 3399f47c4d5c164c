//! What the producer and the consumer share: where the broker is, a
//! connection that reads and writes lines with deadlines, registration,
//! and reconnection with exponential backoff and jitter.
//!
//! Invariants: every wait has a deadline (connect, read, write); a line
//! from the broker is bounded by the same limit the broker uses; nothing
//! here prints to stdout (that belongs to the programs' data).

use std::env;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cli::{UsageError, parse_number};
use crate::protocol::{self, Command, ErrorCode, Line, LineReader, Reply};
use crate::token::Token;

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply may take before the connection is considered lost:
/// longer than the longest `SEND` wait a broker may be configured with
/// (`--send-timeout` up to 60 s), so a full queue is not taken for a hang.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(75);
/// A heartbeat is sent after this long without traffic (`--heartbeat`):
/// well inside the broker's default idle timeout (300 s).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(20);
/// The shortest heartbeat period the clients adapt down to: below the
/// broker's smallest idle timeout (1 s).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(500);
/// Longest `--heartbeat` accepted, in seconds.
pub const MAX_HEARTBEAT_S: u64 = 3600;
/// Longest reply line a client accepts: the broker's largest message
/// size plus the protocol's overhead.
pub const MAX_REPLY_LINE: usize = protocol::MAX_MSG_SIZE_LIMIT as usize + protocol::LINE_OVERHEAD;

/// Host and port of the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Sent as `AUTH:<token>` first on every connection (`--token-file`).
    pub token: Option<Token>,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Endpoint {
    /// The endpoint from the options given (which win), then the
    /// environment (`BROKER_HOST`/`BROKER_PORT`, then the names in
    /// `legacy` such as the original's `SERVER_IP`/`SERVER_PORT`), then
    /// localhost:8080.
    pub fn resolve(
        host: Option<String>,
        port: Option<u16>,
        legacy: Option<(&'static str, &'static str)>,
    ) -> Result<Endpoint, UsageError> {
        let from_env = |names: &[&'static str]| {
            names.iter().find_map(|&name| {
                env::var(name)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| (name, v))
            })
        };
        let (legacy_host, legacy_port) = legacy.unwrap_or(("BROKER_HOST", "BROKER_PORT"));
        let host = host
            .or_else(|| from_env(&["BROKER_HOST", legacy_host]).map(|(_, value)| value))
            .unwrap_or_else(|| "localhost".to_string());
        let port = match port {
            Some(port) => port,
            None => match from_env(&["BROKER_PORT", legacy_port]) {
                // The error names the variable the value came from.
                Some((name, text)) => parse_number(&text, name, 1, 65535)?,
                None => 8080,
            },
        };
        Ok(Endpoint {
            host,
            port,
            token: None,
        })
    }

    /// Adds the token from `file` (`--token-file`), or else from the file
    /// named by `$BROKER_TOKEN_FILE`; neither: no token.
    pub fn with_token_file(mut self, file: Option<PathBuf>) -> Result<Endpoint, UsageError> {
        let (file, source) = match file {
            Some(file) => (file, "--token-file"),
            None => match env::var_os("BROKER_TOKEN_FILE").filter(|v| !v.is_empty()) {
                Some(file) => (PathBuf::from(file), "BROKER_TOKEN_FILE"),
                None => return Ok(self),
            },
        };
        // The broker insists on a private file; a client only reads it.
        let token =
            Token::load(&file, false).map_err(|err| UsageError(format!("{source}: {err}")))?;
        self.token = Some(token);
        Ok(self)
    }
}

/// The options both clients take: where the broker is, how long to keep
/// retrying, how often to heartbeat.
#[derive(Debug, Clone)]
pub struct CommonArgs {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub retries: Option<u32>,
    pub heartbeat: Duration,
    /// `--token-file`: the broker's `--auth-token-file` token.
    pub token_file: Option<PathBuf>,
}

impl Default for CommonArgs {
    fn default() -> CommonArgs {
        CommonArgs {
            host: None,
            port: None,
            retries: None,
            heartbeat: DEFAULT_HEARTBEAT,
            token_file: None,
        }
    }
}

impl CommonArgs {
    /// The long options (without `--`) that [`take`](Self::take) knows.
    pub const OPTIONS: [&'static str; 5] = ["host", "port", "retries", "heartbeat", "token-file"];

    /// Reads the value of the shared option `--<name>` (one of
    /// [`OPTIONS`](Self::OPTIONS)).
    pub fn take(&mut self, name: &str, parser: &mut lexopt::Parser) -> Result<(), UsageError> {
        use crate::cli::{number, string};
        match name {
            "host" => self.host = Some(string(parser, "--host")?),
            "port" => self.port = Some(number(parser, "--port", 1, 65535)?),
            "retries" => self.retries = Some(number(parser, "--retries", 0, u64::from(u32::MAX))?),
            "token-file" => self.token_file = Some(parser.value()?.into()),
            _ => {
                let seconds = number(parser, "--heartbeat", 1, MAX_HEARTBEAT_S)?;
                self.heartbeat = Duration::from_secs(seconds);
            }
        }
        Ok(())
    }
}

/// Exponential backoff with jitter: 100 ms doubling to 5 s, each wait
/// drawn between half and all of the current step.
#[derive(Debug)]
pub struct Backoff {
    step: Duration,
    attempts: u32,
    limit: Option<u32>,
    seed: u64,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    /// A backoff that gives up after `limit` attempts (`None`: never).
    pub fn new(limit: Option<u32>) -> Backoff {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Backoff {
            step: Backoff::FIRST,
            attempts: 0,
            limit,
            seed: (nanos ^ u64::from(std::process::id())) | 1,
        }
    }

    /// Attempts made since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The wait before the next attempt, or `None` when the limit is spent.
    pub fn next_wait(&mut self) -> Option<Duration> {
        if self.limit.is_some_and(|limit| self.attempts >= limit) {
            return None;
        }
        self.attempts += 1;
        // xorshift64: jitter only, no need for a real generator.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = self.step / 2;
        let jitter = Duration::from_nanos(self.seed % (half.as_nanos() as u64 + 1));
        let wait = half + jitter;
        self.step = (self.step * 2).min(Backoff::MAX);
        Some(wait)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.step = Backoff::FIRST;
        self.attempts = 0;
    }
}

/// Why talking to the broker failed.
#[derive(Debug)]
pub enum ClientError {
    /// The connection is gone or never came (retry it).
    Io(io::Error),
    /// The broker refused us with this error (retry only if it may pass).
    Refused(ErrorCode),
    /// The broker said something this client does not understand.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(err) => write!(f, "{err}"),
            ClientError::Refused(code) => {
                write!(
                    f,
                    "broker said {}",
                    protocol::reply_text(&Reply::error(*code))
                )
            }
            ClientError::Protocol(text) => write!(f, "unexpected reply: {text}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(err: io::Error) -> ClientError {
        ClientError::Io(err)
    }
}

/// A line-oriented connection to the broker.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    reader: LineReader,
    lines: std::collections::VecDeque<Vec<u8>>,
    read_timeout: Option<Duration>,
    pub out: Vec<u8>,
}

impl Connection {
    /// Connects to `endpoint` (trying each address it resolves to).
    pub fn connect(endpoint: &Endpoint) -> io::Result<Connection> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{endpoint}: no address"));
        let addresses = (endpoint.host.as_str(), endpoint.port)
            .to_socket_addrs()
            .map_err(|e| io::Error::new(e.kind(), format!("{endpoint}: {e}")))?;
        for address in addresses {
            match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
                    return Ok(Connection {
                        stream,
                        reader: LineReader::new(MAX_REPLY_LINE, 64 * 1024),
                        lines: std::collections::VecDeque::new(),
                        read_timeout: None,
                        out: Vec::with_capacity(4096),
                    });
                }
                Err(err) => last = io::Error::new(err.kind(), format!("{endpoint}: {err}")),
            }
        }
        Err(last)
    }

    /// Queues `command` for the next [`flush`](Self::flush).
    pub fn queue(&mut self, command: &Command<'_>) {
        protocol::encode_request(&mut self.out, command);
    }

    /// Writes everything queued.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let result = self.stream.write_all(&self.out);
            self.out.clear();
            result?;
        }
        Ok(())
    }

    /// Sends one request now.
    pub fn send(&mut self, command: &Command<'_>) -> io::Result<()> {
        self.queue(command);
        self.flush()
    }

    /// The next line from the broker, waiting at most until `deadline`
    /// (`Ok(None)` when it passes). A deadline already past still takes
    /// what has arrived, without blocking, so an idle client notices a
    /// close or an `ERROR:Idle timeout`. End of stream is an error.
    pub fn read_line(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        let mut polled = false;
        loop {
            if let Some(line) = self.lines.pop_front() {
                return Ok(Some(line));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let read = if left.is_zero() {
                if polled {
                    return Ok(None);
                }
                polled = true;
                self.stream.set_nonblocking(true)?;
                let read = self.stream.read(self.reader.spare());
                self.stream.set_nonblocking(false)?;
                read
            } else {
                let timeout = Some(left.max(Duration::from_millis(1)));
                if self.read_timeout != timeout {
                    self.stream.set_read_timeout(timeout)?;
                    self.read_timeout = timeout;
                }
                self.stream.read(self.reader.spare())
            };
            let n = match read {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the broker closed the connection",
                    ));
                }
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(err) => return Err(err),
            };
            self.reader.filled(n);
            while let Some(line) = self.reader.next_line() {
                match line {
                    Line::Complete(range) => {
                        self.lines.push_back(self.reader.bytes(range).to_vec())
                    }
                    Line::TooLong => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "reply line too long",
                        ));
                    }
                }
            }
        }
    }

    /// Whether a complete line has arrived and waits to be taken, so the
    /// next [`read_line`](Self::read_line) returns without reading the
    /// socket.
    pub fn has_line(&self) -> bool {
        !self.lines.is_empty()
    }

    /// Sends `request` and waits for its reply line, skipping NOTIFY
    /// pushes. An `ERROR:` reply of the protocol is `ClientError::Refused`.
    pub fn request(&mut self, request: &Command<'_>) -> Result<Vec<u8>, ClientError> {
        self.send(request)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let Some(line) = self.read_line(deadline)? else {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no reply from the broker",
                )));
            };
            match protocol::parse_reply(&line) {
                Reply::Notify(_) => continue,
                Reply::Error(Some(code), _) => return Err(ClientError::Refused(code)),
                _ => return Ok(line),
            }
        }
    }

    /// Sends `AUTH:<token>` and checks the `OK:AUTH`.
    pub fn authenticate(&mut self, token: &Token) -> Result<(), ClientError> {
        let reply = self.request(&Command::Auth(token.bytes()))?;
        if protocol::parse_reply(&reply) != Reply::Auth {
            return Err(ClientError::Protocol(
                String::from_utf8_lossy(&reply).into_owned(),
            ));
        }
        Ok(())
    }

    /// Registers as a producer.
    pub fn register_producer(&mut self) -> Result<(), ClientError> {
        let reply = self.request(&Command::RegisterProducer)?;
        if protocol::parse_reply(&reply) != Reply::Producer {
            return Err(ClientError::Protocol(
                String::from_utf8_lossy(&reply).into_owned(),
            ));
        }
        Ok(())
    }

    /// Registers as a consumer under `id` (or a new one), with explicit
    /// acknowledgements if `ack` (which needs an `id`: the broker assigns
    /// no ids in ack mode), and returns the id the broker confirmed. A
    /// NOTIFY right after it stays queued for the caller.
    pub fn register_consumer(
        &mut self,
        id: Option<&str>,
        ack: bool,
    ) -> Result<String, ClientError> {
        assert!(id.is_some() || !ack, "ack mode needs a consumer id");
        let request = Command::RegisterConsumer {
            id: id.map(str::as_bytes),
            ack,
        };
        let reply = self.request(&request)?;
        match protocol::parse_reply(&reply) {
            Reply::Consumer(id) if protocol::valid_consumer_id(id) => {
                Ok(String::from_utf8_lossy(id).into_owned())
            }
            _ => Err(ClientError::Protocol(
                String::from_utf8_lossy(&reply).into_owned(),
            )),
        }
    }

    /// `HEARTBEAT:<unix time>` (the reply comes later, like any other).
    pub fn queue_heartbeat(&mut self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.queue(&Command::Heartbeat(now));
    }

    /// Says goodbye (best effort).
    pub fn quit(mut self) {
        let _ = self.send(&Command::Quit);
        let _ = self.read_line(Instant::now() + Duration::from_secs(1));
    }
}

/// Connects and runs `setup` (registration), retrying with `backoff` on
/// failures that may pass (no connection, a lost one, `ERROR:Server is
/// full`, `ERROR:Shutting down`, `ERROR:Idle timeout`); prints one line per
/// failed attempt on stderr. Gives up when the backoff's limit is spent or
/// the next attempt would start after `give_up_at`.
pub fn connect_with_retry<T>(
    program: &str,
    endpoint: &Endpoint,
    backoff: &mut Backoff,
    give_up_at: Option<Instant>,
    mut setup: impl FnMut(&mut Connection) -> Result<T, ClientError>,
) -> Result<(Connection, T), ClientError> {
    loop {
        let attempt = Connection::connect(endpoint)
            .map_err(ClientError::Io)
            .and_then(|mut conn| {
                // AUTH first, on every connection: reconnections too.
                if let Some(token) = &endpoint.token {
                    conn.authenticate(token)?;
                }
                let value = setup(&mut conn)?;
                Ok((conn, value))
            });
        let err = match attempt {
            Ok(done) => {
                backoff.reset();
                return Ok(done);
            }
            Err(err) => err,
        };
        let retryable = match &err {
            ClientError::Io(_) => true,
            ClientError::Refused(code) => {
                matches!(
                    code,
                    ErrorCode::ServerFull | ErrorCode::ShuttingDown | ErrorCode::IdleTimeout
                )
            }
            ClientError::Protocol(_) => false,
        };
        if !retryable {
            return Err(err);
        }
        let wait = match backoff.next_wait() {
            Some(wait) if give_up_at.is_none_or(|at| Instant::now() + wait <= at) => wait,
            _ => return Err(err),
        };
        eprintln!(
            "{program}: no connection to the broker at {endpoint} ({err}); retry {} in {} ms",
            backoff.attempts(),
            wait.as_millis()
        );
        std::thread::sleep(wait);
    }
}

/// The heartbeat period to use after the broker dropped a client for
/// idleness: half the current one, down to [`MIN_HEARTBEAT`].
pub fn shorter_heartbeat(current: Duration) -> Duration {
    (current / 2).max(MIN_HEARTBEAT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut backoff = Backoff::new(Some(12));
        let mut step = Backoff::FIRST;
        for _ in 0..12 {
            let wait = backoff.next_wait().unwrap();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for step {step:?}"
            );
            step = (step * 2).min(Backoff::MAX);
        }
        assert_eq!(backoff.next_wait(), None);
        backoff.reset();
        assert!(backoff.next_wait().unwrap() <= Backoff::FIRST);
    }

    #[test]
    fn heartbeat_halves_down_to_the_minimum() {
        assert_eq!(
            shorter_heartbeat(DEFAULT_HEARTBEAT),
            Duration::from_secs(10)
        );
        let mut heartbeat = DEFAULT_HEARTBEAT;
        for _ in 0..10 {
            heartbeat = shorter_heartbeat(heartbeat);
        }
        assert_eq!(heartbeat, MIN_HEARTBEAT);
    }

    #[test]
    fn endpoint_display() {
        let endpoint = Endpoint {
            host: "::1".into(),
            port: 7,
            token: None,
        };
        assert_eq!(endpoint.to_string(), "[::1]:7");
    }
}
