//! The wire protocol as pure functions over bytes: line framing, request
//! parsing and reply formatting (see docs/protocol.md).
//!
//! Invariants: nothing here touches a socket or a clock; every input, however
//! hostile, yields a value (never a panic); memory is bounded by the line
//! limit the [`LineReader`] was built with, whatever the peer sends. Every
//! protocol error maps to exactly one [`ErrorCode`] and so to one fixed
//! `ERROR:` text.

use std::ops::Range;

/// Bytes allowed on a line besides the message content (`SEND:`, ids...).
pub const LINE_OVERHEAD: usize = 64;
/// The largest `--max-msg-size` any program accepts (1 MiB): it bounds
/// every line a client reads.
pub const MAX_MSG_SIZE_LIMIT: u64 = 1 << 20;

pub use crate::text::{MAX_CONSUMER_ID, parse_u64, push_u64, valid_consumer_id};

/// The fixed error texts of the protocol, one variant each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotRegistered,
    AlreadyRegistered,
    InvalidRegistration,
    UnknownCommand,
    NotAllowed,
    MessageTooLarge,
    EmptyMessage,
    QueueFull,
    NoMessages,
    UnknownMessageId,
    ServerFull,
    AuthenticationFailed,
    PersistenceFailure,
    IdleTimeout,
    ShuttingDown,
    /// A new consumer id past `--max-consumers` (the connection stays open).
    TooManyConsumers,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::NotRegistered,
        ErrorCode::AlreadyRegistered,
        ErrorCode::InvalidRegistration,
        ErrorCode::UnknownCommand,
        ErrorCode::NotAllowed,
        ErrorCode::MessageTooLarge,
        ErrorCode::EmptyMessage,
        ErrorCode::QueueFull,
        ErrorCode::NoMessages,
        ErrorCode::UnknownMessageId,
        ErrorCode::ServerFull,
        ErrorCode::AuthenticationFailed,
        ErrorCode::PersistenceFailure,
        ErrorCode::IdleTimeout,
        ErrorCode::ShuttingDown,
        ErrorCode::TooManyConsumers,
    ];

    /// The text after `ERROR:`.
    pub fn text(self) -> &'static str {
        match self {
            ErrorCode::NotRegistered => "Not registered",
            ErrorCode::AlreadyRegistered => "Already registered",
            ErrorCode::InvalidRegistration => "Invalid registration message",
            ErrorCode::UnknownCommand => "Unknown command",
            ErrorCode::NotAllowed => "Not allowed for this client type",
            ErrorCode::MessageTooLarge => "Message too large",
            ErrorCode::EmptyMessage => "Empty message",
            ErrorCode::QueueFull => "Queue full",
            ErrorCode::NoMessages => "No messages available",
            ErrorCode::UnknownMessageId => "Unknown message id",
            ErrorCode::ServerFull => "Server is full",
            ErrorCode::AuthenticationFailed => "Authentication failed",
            ErrorCode::PersistenceFailure => "Persistence failure",
            ErrorCode::IdleTimeout => "Idle timeout",
            ErrorCode::ShuttingDown => "Shutting down",
            ErrorCode::TooManyConsumers => "Too many consumers",
        }
    }

    /// Appends the whole reply line, `ERROR:<text>\n`.
    pub fn write_line(self, out: &mut Vec<u8>) {
        encode_reply(out, &Reply::error(self));
    }

    /// The code whose text is `text`, for clients reading replies.
    pub fn from_text(text: &[u8]) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.text().as_bytes() == text)
    }
}

/// One parsed request line. Borrowed parts point into the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    RegisterProducer,
    /// `id` is `None` when the broker should assign one.
    RegisterConsumer {
        id: Option<&'a [u8]>,
        ack: bool,
    },
    /// The content, not yet checked for size or emptiness (that check must
    /// come after the registration check; see [`check_content`]).
    Send(&'a [u8]),
    Get,
    /// `None` when the id is not a decimal number.
    Ack(Option<u64>),
    Heartbeat,
    Stats,
    Quit,
    Auth(&'a [u8]),
    /// A line that is no request: answer with this code.
    Invalid(ErrorCode),
}

impl Request<'_> {
    /// Whether a connection may send this before it registers.
    pub fn allowed_before_registration(&self) -> bool {
        matches!(
            self,
            Request::RegisterProducer
                | Request::RegisterConsumer { .. }
                | Request::Heartbeat
                | Request::Stats
                | Request::Quit
                | Request::Auth(_)
                | Request::Invalid(_)
        )
    }
}

/// Parses one request line (without its `\n` and optional `\r`).
pub fn parse_request(line: &[u8]) -> Request<'_> {
    if let Some(content) = line.strip_prefix(b"SEND:") {
        return Request::Send(content);
    }
    match line {
        b"GET" => return Request::Get,
        b"SEND" => return Request::Send(b""),
        b"HEARTBEAT" => return Request::Heartbeat,
        b"STATS" => return Request::Stats,
        b"QUIT" => return Request::Quit,
        _ => {}
    }
    if line.starts_with(b"HEARTBEAT:") {
        return Request::Heartbeat;
    }
    if let Some(id) = line.strip_prefix(b"ACK:") {
        return Request::Ack(parse_u64(id));
    }
    if let Some(token) = line.strip_prefix(b"AUTH:") {
        return Request::Auth(token);
    }
    if line == b"REGISTER" || line.starts_with(b"REGISTER:") {
        return parse_registration(&line[b"REGISTER".len()..]);
    }
    Request::Invalid(ErrorCode::UnknownCommand)
}

fn parse_registration(rest: &[u8]) -> Request<'_> {
    let invalid = Request::Invalid(ErrorCode::InvalidRegistration);
    match rest {
        b":PRODUCER" => Request::RegisterProducer,
        b":CONSUMER" => Request::RegisterConsumer {
            id: None,
            ack: false,
        },
        _ => {
            let Some(tail) = rest.strip_prefix(b":CONSUMER:") else {
                return invalid;
            };
            let (id, ack) = match tail.strip_suffix(b":ACK") {
                Some(id) => (id, true),
                None => (tail, false),
            };
            if valid_consumer_id(id) {
                Request::RegisterConsumer { id: Some(id), ack }
            } else {
                invalid
            }
        }
    }
}

/// Checks a `SEND` content against the message size limit.
pub fn check_content(content: &[u8], max_msg_size: usize) -> Result<(), ErrorCode> {
    if content.is_empty() {
        Err(ErrorCode::EmptyMessage)
    } else if content.len() > max_msg_size {
        Err(ErrorCode::MessageTooLarge)
    } else {
        Ok(())
    }
}

/// A reply or push: what the broker encodes with [`encode_reply`] and a
/// client decodes with [`parse_reply`]. Every reply text of the protocol
/// is spelled in this file alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `OK:MSG_ID:<id>`
    MsgId(u64),
    /// `MSG:<id>:<content>`
    Msg { id: u64, content: &'a [u8] },
    /// `NOTIFY:MESSAGES_AVAILABLE:<count>`
    Notify(u64),
    /// `ERROR:<text>`: the code if the text is one of the protocol's, and
    /// the text as sent (the broker encodes the code's text, ignoring it).
    Error(Option<ErrorCode>, &'a [u8]),
    /// `OK:PRODUCER`
    Producer,
    /// `OK:CONSUMER:<id>`
    Consumer(&'a [u8]),
    /// `OK:ACK:<id>`
    Acked(u64),
    /// `OK:HEARTBEAT`
    Heartbeat,
    /// `OK:BYE`
    Bye,
    /// `OK:AUTH`
    Auth,
    /// `OK:STATS:<key>=<value> ...` (the part after the prefix; see
    /// [`encode_stats`] and [`stats_field`]).
    Stats(&'a [u8]),
    /// Any other `OK:` reply; the bytes after `OK:`.
    Ok(&'a [u8]),
    /// A line that is none of the above.
    Other(&'a [u8]),
}

impl Reply<'_> {
    /// The reply `ERROR:<code's text>`.
    pub fn error(code: ErrorCode) -> Reply<'static> {
        Reply::Error(Some(code), b"")
    }
}

const MSG_ID: &[u8] = b"OK:MSG_ID:";
const MSG: &[u8] = b"MSG:";
const NOTIFY: &[u8] = b"NOTIFY:MESSAGES_AVAILABLE:";
const ERROR: &[u8] = b"ERROR:";
const OK: &[u8] = b"OK:";
const CONSUMER_OK: &[u8] = b"OK:CONSUMER:";
const ACKED: &[u8] = b"OK:ACK:";
const STATS_OK: &[u8] = b"OK:STATS:";

/// Appends `reply` as one line, with its `\n`.
pub fn encode_reply(out: &mut Vec<u8>, reply: &Reply<'_>) {
    let number = |out: &mut Vec<u8>, prefix: &[u8], n: u64| {
        out.extend_from_slice(prefix);
        push_u64(out, n);
    };
    match *reply {
        Reply::MsgId(id) => number(out, MSG_ID, id),
        Reply::Msg { id, content } => {
            number(out, MSG, id);
            out.push(b':');
            out.extend_from_slice(content);
        }
        Reply::Notify(count) => number(out, NOTIFY, count),
        Reply::Error(Some(code), _) => {
            out.extend_from_slice(ERROR);
            out.extend_from_slice(code.text().as_bytes());
        }
        Reply::Error(None, text) => {
            out.extend_from_slice(ERROR);
            out.extend_from_slice(text);
        }
        Reply::Producer => out.extend_from_slice(b"OK:PRODUCER"),
        Reply::Consumer(id) => {
            out.extend_from_slice(CONSUMER_OK);
            out.extend_from_slice(id);
        }
        Reply::Acked(id) => number(out, ACKED, id),
        Reply::Heartbeat => out.extend_from_slice(b"OK:HEARTBEAT"),
        Reply::Bye => out.extend_from_slice(b"OK:BYE"),
        Reply::Auth => out.extend_from_slice(b"OK:AUTH"),
        Reply::Stats(body) => {
            out.extend_from_slice(STATS_OK);
            out.extend_from_slice(body);
        }
        Reply::Ok(rest) => {
            out.extend_from_slice(OK);
            out.extend_from_slice(rest);
        }
        Reply::Other(line) => out.extend_from_slice(line),
    }
    out.push(b'\n');
}

/// `reply` as text without its newline, for diagnostics that quote what
/// the broker said.
pub fn reply_text(reply: &Reply<'_>) -> String {
    let mut line = Vec::new();
    encode_reply(&mut line, reply);
    line.pop();
    String::from_utf8_lossy(&line).into_owned()
}

/// Appends `NOTIFY:MESSAGES_AVAILABLE:<count>\n`.
pub fn write_notify(out: &mut Vec<u8>, count: u64) {
    encode_reply(out, &Reply::Notify(count));
}

/// Parses one line the broker sent.
pub fn parse_reply(line: &[u8]) -> Reply<'_> {
    if let Some(rest) = line.strip_prefix(MSG) {
        if let Some(colon) = rest.iter().position(|&b| b == b':')
            && let Some(id) = parse_u64(&rest[..colon])
        {
            return Reply::Msg {
                id,
                content: &rest[colon + 1..],
            };
        }
        return Reply::Other(line);
    }
    if let Some(count) = line.strip_prefix(NOTIFY)
        && let Some(count) = parse_u64(count)
    {
        return Reply::Notify(count);
    }
    if let Some(text) = line.strip_prefix(ERROR) {
        return Reply::Error(ErrorCode::from_text(text), text);
    }
    match line.strip_prefix(OK) {
        Some(rest) => parse_ok(line, rest),
        None => Reply::Other(line),
    }
}

fn parse_ok<'a>(line: &'a [u8], rest: &'a [u8]) -> Reply<'a> {
    let numbered = |prefix: &[u8]| line.strip_prefix(prefix).and_then(parse_u64);
    if let Some(id) = numbered(MSG_ID) {
        return Reply::MsgId(id);
    }
    if let Some(id) = numbered(ACKED) {
        return Reply::Acked(id);
    }
    if let Some(id) = line.strip_prefix(CONSUMER_OK) {
        return Reply::Consumer(id);
    }
    if let Some(body) = line.strip_prefix(STATS_OK) {
        return Reply::Stats(body);
    }
    match rest {
        b"PRODUCER" => Reply::Producer,
        b"HEARTBEAT" => Reply::Heartbeat,
        b"BYE" => Reply::Bye,
        b"AUTH" => Reply::Auth,
        _ => Reply::Ok(rest),
    }
}

/// One `STATS` value. Counters only grow (Prometheus `_total`); gauges
/// go up and down; texts are names and ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatValue<'a> {
    Counter(u64),
    Gauge(u64),
    Text(&'a str),
}

/// Appends the body of a `STATS` reply: `key=value` pairs, space separated.
pub fn encode_stats(out: &mut Vec<u8>, stats: &[(&str, StatValue<'_>)]) {
    for (i, (key, value)) in stats.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        match value {
            StatValue::Counter(n) | StatValue::Gauge(n) => push_u64(out, *n),
            StatValue::Text(text) => out.extend_from_slice(text.as_bytes()),
        }
    }
}

/// The value of `key` in a `STATS` body, if it is there.
pub fn stats_field<'a>(body: &'a [u8], key: &str) -> Option<&'a [u8]> {
    body.split(|&b| b == b' ').find_map(|pair| {
        pair.strip_prefix(key.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
    })
}

/// One request, as a client encodes it with [`encode_request`]. The
/// broker parses the same texts with [`parse_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    RegisterProducer,
    RegisterConsumer {
        id: Option<&'a [u8]>,
        ack: bool,
    },
    Send(&'a [u8]),
    Get,
    Ack(u64),
    /// `HEARTBEAT:<unix time>`
    Heartbeat(u64),
    Stats,
    Quit,
    Auth(&'a [u8]),
}

/// Appends `command` as one line, with its `\n`.
pub fn encode_request(out: &mut Vec<u8>, command: &Command<'_>) {
    match *command {
        Command::RegisterProducer => out.extend_from_slice(b"REGISTER:PRODUCER"),
        Command::RegisterConsumer { id, ack } => {
            out.extend_from_slice(b"REGISTER:CONSUMER");
            if let Some(id) = id {
                out.push(b':');
                out.extend_from_slice(id);
            }
            if ack {
                out.extend_from_slice(b":ACK");
            }
        }
        Command::Send(content) => {
            out.extend_from_slice(b"SEND:");
            out.extend_from_slice(content);
        }
        Command::Get => out.extend_from_slice(b"GET"),
        Command::Ack(id) => {
            out.extend_from_slice(b"ACK:");
            push_u64(out, id);
        }
        Command::Heartbeat(time) => {
            out.extend_from_slice(b"HEARTBEAT:");
            push_u64(out, time);
        }
        Command::Stats => out.extend_from_slice(b"STATS"),
        Command::Quit => out.extend_from_slice(b"QUIT"),
        Command::Auth(token) => {
            out.extend_from_slice(b"AUTH:");
            out.extend_from_slice(token);
        }
    }
    out.push(b'\n');
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A complete line: its bytes are `reader.bytes(range)`, without the
    /// `\n` and without a `\r` right before it.
    Complete(Range<usize>),
    /// A line passed the limit; its bytes are dropped up to its newline.
    TooLong,
}

/// Splits a byte stream into lines of bounded length, in a buffer of fixed
/// size. The owner reads into [`spare`](Self::spare), reports the count with
/// [`filled`](Self::filled), then takes lines until `next_line` says `None`.
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Where the search for `\n` resumes (bytes before it have none).
    scanned: usize,
    max_line: usize,
    discarding: bool,
}

impl LineReader {
    /// A reader for lines of at most `max_line` bytes (not counting the
    /// line end), with a buffer of `capacity` bytes (raised so that one
    /// whole line and its `\r\n` fit).
    pub fn new(max_line: usize, capacity: usize) -> LineReader {
        let capacity = capacity.max(max_line + 2);
        LineReader {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
            scanned: 0,
            max_line,
            discarding: false,
        }
    }

    /// Free space to read into; moves pending bytes to the front first
    /// when that makes room. Never empty after `next_line` returned `None`.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && (self.end == self.buf.len() || self.start == self.end) {
            self.buf.copy_within(self.start..self.end, 0);
            self.scanned -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`spare`](Self::spare).
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes of a line returned by `next_line`; valid until `spare`.
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Whether a line has started and not ended (used for idle checks).
    pub fn has_partial(&self) -> bool {
        self.start < self.end || self.discarding
    }

    /// The next line in the buffer, if a whole one (or an over-long one)
    /// is there.
    pub fn next_line(&mut self) -> Option<Line> {
        loop {
            let found = self.buf[self.scanned..self.end]
                .iter()
                .position(|&b| b == b'\n');
            match found {
                Some(offset) => {
                    let newline = self.scanned + offset;
                    let line_start = self.start;
                    self.start = newline + 1;
                    self.scanned = self.start;
                    if self.discarding {
                        self.discarding = false;
                        continue;
                    }
                    let mut line_end = newline;
                    if line_end > line_start && self.buf[line_end - 1] == b'\r' {
                        line_end -= 1;
                    }
                    if line_end - line_start > self.max_line {
                        return Some(Line::TooLong);
                    }
                    return Some(Line::Complete(line_start..line_end));
                }
                None => {
                    self.scanned = self.end;
                    if self.discarding {
                        self.start = self.end;
                        self.scanned = self.end;
                        return None;
                    }
                    // One more byte than the limit may be the `\r` of `\r\n`.
                    if self.end - self.start > self.max_line + 1 {
                        self.discarding = true;
                        self.start = self.end;
                        self.scanned = self.end;
                        return Some(Line::TooLong);
                    }
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_are_the_protocol_s() {
        let mut out = Vec::new();
        ErrorCode::QueueFull.write_line(&mut out);
        assert_eq!(out, b"ERROR:Queue full\n");
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_text(code.text().as_bytes()), Some(code));
        }
        assert_eq!(ErrorCode::from_text(b"Queue ful"), None);
    }

    #[test]
    fn parses_every_request() {
        assert_eq!(
            parse_request(b"REGISTER:PRODUCER"),
            Request::RegisterProducer
        );
        assert_eq!(
            parse_request(b"REGISTER:CONSUMER"),
            Request::RegisterConsumer {
                id: None,
                ack: false
            }
        );
        assert_eq!(
            parse_request(b"REGISTER:CONSUMER:a-b_c.9"),
            Request::RegisterConsumer {
                id: Some(b"a-b_c.9"),
                ack: false
            }
        );
        assert_eq!(
            parse_request(b"REGISTER:CONSUMER:x:ACK"),
            Request::RegisterConsumer {
                id: Some(b"x"),
                ack: true
            }
        );
        assert_eq!(parse_request(b"SEND:a:b:c"), Request::Send(b"a:b:c"));
        assert_eq!(parse_request(b"SEND:"), Request::Send(b""));
        assert_eq!(parse_request(b"SEND"), Request::Send(b""));
        assert_eq!(parse_request(b"GET"), Request::Get);
        assert_eq!(parse_request(b"ACK:42"), Request::Ack(Some(42)));
        assert_eq!(parse_request(b"ACK:4x"), Request::Ack(None));
        assert_eq!(parse_request(b"HEARTBEAT:1700000000"), Request::Heartbeat);
        assert_eq!(parse_request(b"HEARTBEAT"), Request::Heartbeat);
        assert_eq!(parse_request(b"STATS"), Request::Stats);
        assert_eq!(parse_request(b"QUIT"), Request::Quit);
        assert_eq!(parse_request(b"AUTH:s3cret"), Request::Auth(b"s3cret"));
    }

    #[test]
    fn rejects_bad_registrations_and_unknown_commands() {
        let invalid = Request::Invalid(ErrorCode::InvalidRegistration);
        for line in [
            &b"REGISTER"[..],
            b"REGISTER:",
            b"REGISTER:producer",
            b"REGISTER:PRODUCER:x",
            b"REGISTER:CONSUMER:",
            b"REGISTER:CONSUMER:a b",
            b"REGISTER:CONSUMER:a:b",
            b"REGISTER:CONSUMER::ACK",
            b"REGISTER:CONSUMER:x:ACK:ACK",
            b"REGISTER:CONSUMER:\xff",
        ] {
            assert_eq!(
                parse_request(line),
                invalid,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        let long_id = [b'a'; 65];
        let mut line = b"REGISTER:CONSUMER:".to_vec();
        line.extend_from_slice(&long_id);
        assert_eq!(parse_request(&line), invalid);
        line.pop();
        assert!(matches!(
            parse_request(&line),
            Request::RegisterConsumer { .. }
        ));
        let unknown = Request::Invalid(ErrorCode::UnknownCommand);
        for line in [
            &b""[..],
            b"get",
            b"GET ",
            b"GETX",
            b"QUIT:",
            b"STATS:x",
            b"REGISTERX",
            b" SEND:x",
        ] {
            assert_eq!(
                parse_request(line),
                unknown,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn registration_gate() {
        assert!(parse_request(b"STATS").allowed_before_registration());
        assert!(parse_request(b"HEARTBEAT:1").allowed_before_registration());
        assert!(!parse_request(b"SEND:x").allowed_before_registration());
        assert!(!parse_request(b"GET").allowed_before_registration());
        assert!(!parse_request(b"ACK:1").allowed_before_registration());
    }

    #[test]
    fn content_checks() {
        assert_eq!(check_content(b"", 4), Err(ErrorCode::EmptyMessage));
        assert_eq!(check_content(b"abcd", 4), Ok(()));
        assert_eq!(check_content(b"abcde", 4), Err(ErrorCode::MessageTooLarge));
    }

    #[test]
    fn numbers() {
        for n in [0, 1, 9, 10, 99, 100, 12345, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            assert_eq!(parse_u64(&out), Some(n));
        }
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"+1"), None);
        assert_eq!(parse_u64(b"1 "), None);
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::MsgId(7),
            Reply::Msg {
                id: 8,
                content: b"a:b",
            },
            Reply::Notify(3),
            Reply::Consumer(b"c1"),
            Reply::Producer,
            Reply::Acked(9),
            Reply::Heartbeat,
            Reply::Bye,
            Reply::Auth,
            Reply::Stats(b"a=1 b=x"),
            Reply::Ok(b"SOMETHING"),
        ];
        for reply in replies {
            let mut out = Vec::new();
            encode_reply(&mut out, &reply);
            assert_eq!(out.pop(), Some(b'\n'));
            assert_eq!(
                parse_reply(&out),
                reply,
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        for code in ErrorCode::ALL {
            let mut out = Vec::new();
            code.write_line(&mut out);
            out.pop();
            assert_eq!(
                parse_reply(&out),
                Reply::Error(Some(code), code.text().as_bytes())
            );
        }
        assert_eq!(parse_reply(b"MSG:x:y"), Reply::Other(b"MSG:x:y"));
        assert_eq!(parse_reply(b"OK:MSG_ID:x"), Reply::Ok(b"MSG_ID:x"));
        assert_eq!(parse_reply(b"hello"), Reply::Other(b"hello"));
    }

    #[test]
    fn requests_round_trip() {
        let cases: [(Command<'_>, Request<'_>); 10] = [
            (Command::RegisterProducer, Request::RegisterProducer),
            (
                Command::RegisterConsumer {
                    id: None,
                    ack: false,
                },
                Request::RegisterConsumer {
                    id: None,
                    ack: false,
                },
            ),
            (
                Command::RegisterConsumer {
                    id: Some(b"w-1"),
                    ack: true,
                },
                Request::RegisterConsumer {
                    id: Some(b"w-1"),
                    ack: true,
                },
            ),
            (Command::Send(b"a:b"), Request::Send(b"a:b")),
            (Command::Get, Request::Get),
            (Command::Ack(42), Request::Ack(Some(42))),
            (Command::Heartbeat(1_700_000_000), Request::Heartbeat),
            (Command::Stats, Request::Stats),
            (Command::Quit, Request::Quit),
            (Command::Auth(b"tok"), Request::Auth(b"tok")),
        ];
        for (command, request) in cases {
            let mut out = Vec::new();
            encode_request(&mut out, &command);
            assert_eq!(out.pop(), Some(b'\n'));
            assert_eq!(parse_request(&out), request, "{command:?}");
        }
    }

    #[test]
    fn stats_encode_and_read_back() {
        let mut body = Vec::new();
        encode_stats(
            &mut body,
            &[
                ("messages", StatValue::Gauge(3)),
                ("stored", StatValue::Counter(10)),
                ("fsync", StatValue::Text("always")),
            ],
        );
        assert_eq!(body, b"messages=3 stored=10 fsync=always");
        assert_eq!(stats_field(&body, "stored"), Some(&b"10"[..]));
        assert_eq!(stats_field(&body, "store"), None);
        assert_eq!(stats_field(&body, "fsync"), Some(&b"always"[..]));
    }

    /// Feeds `input` to a reader in chunks of `chunk` bytes and collects
    /// what it yields: `Some(line)` or `None` for too long.
    fn frame(input: &[u8], max_line: usize, capacity: usize, chunk: usize) -> Vec<Option<Vec<u8>>> {
        let mut reader = LineReader::new(max_line, capacity);
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            while let Some(line) = reader.next_line() {
                out.push(match line {
                    Line::Complete(range) => Some(reader.bytes(range).to_vec()),
                    Line::TooLong => None,
                });
            }
            if rest.is_empty() {
                return out;
            }
            let spare = reader.spare();
            assert!(!spare.is_empty());
            let n = chunk.min(spare.len()).min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            reader.filled(n);
            rest = &rest[n..];
        }
    }

    #[test]
    fn frames_lines_with_optional_cr() {
        for chunk in 1..12 {
            let got = frame(b"a\r\nbc\n\r\n\nd\re\nxyz", 8, 10, chunk);
            let want: Vec<Option<Vec<u8>>> = vec![
                Some(b"a".to_vec()),
                Some(b"bc".to_vec()),
                Some(b"".to_vec()),
                Some(b"".to_vec()),
                Some(b"d\re".to_vec()),
            ];
            assert_eq!(got, want, "chunk {chunk}");
        }
    }

    #[test]
    fn too_long_lines_are_reported_once_and_skipped() {
        for chunk in 1..40 {
            let mut input = b"ok\n".to_vec();
            input.extend_from_slice(&[b'x'; 100]);
            input.extend_from_slice(b"\nabcd\r\nabcdef\n12345\r\n");
            let got = frame(&input, 5, 16, chunk);
            let want: Vec<Option<Vec<u8>>> = vec![
                Some(b"ok".to_vec()),
                None,
                Some(b"abcd".to_vec()),
                None,
                Some(b"12345".to_vec()),
            ];
            assert_eq!(got, want, "chunk {chunk}");
        }
    }

    #[test]
    fn exhaustive_small_streams_never_panic_and_stay_bounded() {
        // Every stream of up to 7 symbols from a hostile alphabet, in every
        // chunking: the reader yields lines no longer than the limit, and
        // the concatenation of lines never invents bytes.
        let alphabet: [&[u8]; 5] = [b"\n", b"\r", b"ab", b"SEND:", b"\r\n"];
        let mut stack = vec![Vec::<u8>::new()];
        let mut count = 0;
        while let Some(prefix) = stack.pop() {
            for chunk in [1, 3, 64] {
                for line in frame(&prefix, 6, 8, chunk).into_iter().flatten() {
                    assert!(line.len() <= 6);
                    assert!(!line.contains(&b'\n'));
                    let line_request = parse_request(&line);
                    let _ = line_request.allowed_before_registration();
                }
            }
            count += 1;
            if prefix.len() < 10 {
                for symbol in alphabet {
                    let mut next = prefix.clone();
                    next.extend_from_slice(symbol);
                    stack.push(next);
                }
            }
        }
        assert!(count > 1000);
    }
}
