//! One client connection, served by one pool worker for its whole life:
//! read, split into lines, answer, write, until the client quits, goes
//! idle, breaks, or the broker shuts down.
//!
//! Each read is handled as a batch: consecutive `SEND`s are stored with one
//! file write and one pair of semaphore operations, consecutive `GET`s are
//! answered under one lock, and all replies of the batch leave in one
//! write. Memory per connection is bounded: a fixed read buffer and a reply
//! buffer flushed whenever it passes [`OUT_FLUSH`].

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Shared;
use super::auth::Gate;
use super::conn::{Conn, Writer};
use crate::protocol::{self, ErrorCode, Line, LineReader, Reply, Request};
use crate::sys::os;

/// Size of a connection's read buffer: many pipelined requests per read.
pub const READ_BUFFER: usize = 64 * 1024;
/// Replies are written out once this many bytes are waiting.
pub const OUT_FLUSH: usize = 64 * 1024;
/// Most messages answered by one core call, so one batch of GETs cannot
/// build a reply buffer much past [`OUT_FLUSH`].
const MAX_RUN_BYTES: usize = 256 * 1024;

enum Role {
    None,
    Producer,
    Consumer,
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    ClientClosed,
    Quit,
    Idle,
    Shutdown,
    Broken,
}

/// Serves `stream` until it ends. Never panics on anything the client
/// sends.
pub(super) fn serve(shared: &Shared, stream: TcpStream, conn_id: u64) {
    let conn = match stream.try_clone() {
        Ok(writer) => Arc::new(Conn::new(conn_id, writer)),
        Err(err) => {
            shared
                .core
                .log
                .warn(format_args!("connection {conn_id}: {err}"));
            shared.active.fetch_sub(1, Ordering::AcqRel);
            return;
        }
    };
    shared.core.conns.insert(Arc::clone(&conn));
    shared
        .core
        .counters
        .connections
        .fetch_add(1, Ordering::Relaxed);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    shared
        .core
        .log
        .info(format_args!("connection {conn_id} from {peer}"));

    let mut session = Session {
        shared,
        conn: Arc::clone(&conn),
        role: Role::None,
        reader: LineReader::new(shared.config.max_line(), READ_BUFFER),
        lines: Vec::new(),
        out: Vec::with_capacity(4096),
        authenticated: false,
    };
    let end = session.run(stream);
    session.finish(&end);

    if let Role::Consumer = &session.role {
        shared.core.unregister_consumer(&conn);
    }
    if let Role::Producer = session.role {
        shared
            .core
            .counters
            .producers
            .fetch_sub(1, Ordering::Relaxed);
    }
    shared.core.conns.remove(conn_id);
    let _ = os::shutdown(&conn.stream);
    shared
        .core
        .counters
        .connections
        .fetch_sub(1, Ordering::Relaxed);
    shared
        .core
        .log
        .info(format_args!("connection {conn_id} closed ({end:?})"));
    shared.active.fetch_sub(1, Ordering::AcqRel);
}

struct Session<'a> {
    shared: &'a Shared,
    conn: Arc<Conn>,
    role: Role,
    reader: LineReader,
    lines: Vec<Line>,
    out: Vec<u8>,
    /// The first line passed the token gate (see [`super::auth`]).
    authenticated: bool,
}

impl Session<'_> {
    fn run(&mut self, mut stream: TcpStream) -> End {
        let accepted = Instant::now();
        let mut last_line = accepted;
        let mut timeout = self.time_left(accepted, last_line);
        if stream.set_read_timeout(Some(timeout)).is_err() {
            return End::Broken;
        }
        loop {
            if self.shared.shutting_down.load(Ordering::Acquire) {
                return End::Shutdown;
            }
            let n = match stream.read(self.reader.spare()) {
                Ok(0) => {
                    return if self.shared.shutting_down.load(Ordering::Acquire) {
                        End::Shutdown
                    } else {
                        End::ClientClosed
                    };
                }
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // A read timeout: idle unless a line completed meanwhile.
                    match self.time_left(accepted, last_line) {
                        left if !left.is_zero() => {
                            timeout = set_timeout(&stream, left, timeout);
                            continue;
                        }
                        _ => return End::Idle,
                    }
                }
                Err(_) => return End::Broken,
            };
            self.reader.filled(n);
            self.lines.clear();
            while let Some(line) = self.reader.next_line() {
                self.lines.push(line);
            }
            if !self.lines.is_empty() {
                // Part of a line does not count: a client trickling bytes
                // without finishing a line is idle too.
                last_line = Instant::now();
            }
            match self.time_left(accepted, last_line) {
                left if !left.is_zero() => timeout = set_timeout(&stream, left, timeout),
                _ => return End::Idle,
            }
            if self.lines.is_empty() {
                continue;
            }
            let conn = Arc::clone(&self.conn);
            let mut writer = conn.writer();
            let lines = std::mem::take(&mut self.lines);
            let flow = self.handle(&lines, &mut writer);
            self.lines = lines;
            let written = self.flush(&mut writer).and_then(|()| writer.finish());
            if written.is_err() {
                return End::Broken;
            }
            if flow == Flow::Close {
                return End::Quit;
            }
        }
    }

    /// How long the connection may still go without a complete line
    /// (zero: it is idle now). Before registration the shorter
    /// `--register-timeout`, counted from the accept, bounds it too: a
    /// stranger that never registers cannot hold a pool worker for the
    /// whole idle timeout, whatever it sends.
    fn time_left(&self, accepted: Instant, last_line: Instant) -> Duration {
        let config = &self.shared.config;
        let idle = config.idle_timeout.saturating_sub(last_line.elapsed());
        match self.role {
            Role::None => idle.min(config.register_timeout.saturating_sub(accepted.elapsed())),
            _ => idle,
        }
    }

    /// Says goodbye where the protocol asks for it.
    fn finish(&mut self, end: &End) {
        let code = match end {
            End::Idle => {
                self.shared
                    .core
                    .counters
                    .idle_drops
                    .fetch_add(1, Ordering::Relaxed);
                ErrorCode::IdleTimeout
            }
            End::Shutdown => ErrorCode::ShuttingDown,
            _ => return,
        };
        code.write_line(&mut self.out);
        let _ = self.conn.write(&self.out);
    }

    fn flush(&mut self, writer: &mut Writer<'_>) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = writer.write(&self.out);
        self.out.clear();
        if self.out.capacity() > 4 * OUT_FLUSH {
            self.out.shrink_to(OUT_FLUSH);
        }
        result
    }

    /// The token gate on the connection's first line: `None` to handle
    /// the line as usual (no token is set), else what to do after the
    /// reply it wrote.
    fn authenticate(&mut self, line: &Line) -> Option<Flow> {
        let first = match line {
            Line::Complete(range) => Some(self.reader.bytes(range.clone())),
            Line::TooLong => None,
        };
        self.authenticated = true;
        match self.shared.access.gate(first) {
            Gate::Open => None,
            Gate::Accepted => {
                protocol::encode_reply(&mut self.out, &Reply::Auth);
                Some(Flow::Continue)
            }
            Gate::Rejected => {
                let counters = &self.shared.core.counters;
                counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                let failed = Reply::error(ErrorCode::AuthenticationFailed);
                protocol::encode_reply(&mut self.out, &failed);
                self.shared.core.log.info(format_args!(
                    "connection {}: authentication failed",
                    self.conn.id
                ));
                Some(Flow::Close)
            }
        }
    }

    /// Answers a batch of lines; runs of SENDs, ACKs and GETs go to the
    /// core as one call each.
    fn handle(&mut self, lines: &[Line], writer: &mut Writer<'_>) -> Flow {
        let mut i = 0;
        while i < lines.len() {
            if self.out.len() >= OUT_FLUSH && self.flush(writer).is_err() {
                return Flow::Close;
            }
            if !self.authenticated {
                match self.authenticate(&lines[i]) {
                    Some(Flow::Close) => return Flow::Close,
                    Some(Flow::Continue) => {
                        i += 1;
                        continue;
                    }
                    None => {}
                }
            }
            let range = match &lines[i] {
                Line::TooLong => {
                    ErrorCode::MessageTooLarge.write_line(&mut self.out);
                    i += 1;
                    continue;
                }
                Line::Complete(range) => range.clone(),
            };
            let request = protocol::parse_request(self.reader.bytes(range));
            i += match (&request, &self.role) {
                (Request::Send(_), Role::Producer) => self.send_run(&lines[i..]),
                (Request::Ack(_), Role::Consumer) => self.ack_run(&lines[i..]),
                (Request::Get, Role::Consumer) => self.get_run(&lines[i..]),
                _ => {
                    let (shared, conn) = (self.shared, &self.conn);
                    if handle_one(shared, conn, &mut self.role, &mut self.out, request)
                        == Flow::Close
                    {
                        return Flow::Close;
                    }
                    1
                }
            };
        }
        Flow::Continue
    }

    /// Most requests one core call answers, so one batch cannot build a
    /// reply buffer much past [`OUT_FLUSH`].
    fn max_run(&self) -> usize {
        (MAX_RUN_BYTES / (self.shared.config.max_msg_size + 32)).max(1)
    }

    /// Stores the run of valid SENDs at the start of `lines` (or answers
    /// the first one's error). Returns how many lines it answered.
    fn send_run(&mut self, lines: &[Line]) -> usize {
        let max_msg_size = self.shared.config.max_msg_size;
        let mut contents: Vec<&[u8]> = Vec::new();
        for line in lines.iter().take(self.max_run()) {
            match request_at(&self.reader, line) {
                Some(Request::Send(content))
                    if protocol::check_content(content, max_msg_size).is_ok() =>
                {
                    contents.push(content)
                }
                _ => break,
            }
        }
        if contents.is_empty() {
            if let Some(Request::Send(content)) = request_at(&self.reader, &lines[0])
                && let Err(code) = protocol::check_content(content, max_msg_size)
            {
                code.write_line(&mut self.out);
            }
            return 1;
        }
        let shared = self.shared;
        let stopping = || shared.shutting_down.load(Ordering::Acquire);
        shared
            .core
            .send_batch(&contents, &mut replies(&mut self.out), &stopping);
        contents.len()
    }

    /// Answers the run of ACKs at the start of `lines`.
    fn ack_run(&mut self, lines: &[Line]) -> usize {
        let ids: Vec<Option<u64>> = lines
            .iter()
            .take(self.max_run())
            .map_while(|line| match request_at(&self.reader, line) {
                Some(Request::Ack(id)) => Some(id),
                _ => None,
            })
            .collect();
        let core = &self.shared.core;
        core.ack_batch(&self.conn, &ids, &mut replies(&mut self.out));
        ids.len()
    }

    /// Answers the run of GETs at the start of `lines`.
    fn get_run(&mut self, lines: &[Line]) -> usize {
        let count = lines
            .iter()
            .take(self.max_run())
            .take_while(|line| request_at(&self.reader, line) == Some(Request::Get))
            .count();
        let core = &self.shared.core;
        core.get_batch(&self.conn, count, &mut replies(&mut self.out));
        count
    }
}

/// The request on `line`, if it is a complete line.
fn request_at<'b>(reader: &'b LineReader, line: &Line) -> Option<Request<'b>> {
    match line {
        Line::Complete(range) => Some(protocol::parse_request(reader.bytes(range.clone()))),
        Line::TooLong => None,
    }
}

/// Every request but a producer's SEND and a consumer's GET and ACK.
fn handle_one(
    shared: &Shared,
    conn: &Arc<Conn>,
    role: &mut Role,
    out: &mut Vec<u8>,
    request: Request<'_>,
) -> Flow {
    let core = &shared.core;
    let registered = !matches!(role, Role::None);
    let reply = |out: &mut Vec<u8>, reply: Reply<'_>| protocol::encode_reply(out, &reply);
    if !registered && !request.allowed_before_registration() {
        reply(out, Reply::error(ErrorCode::NotRegistered));
        return Flow::Continue;
    }
    match request {
        Request::RegisterProducer | Request::RegisterConsumer { .. } if registered => {
            reply(out, Reply::error(ErrorCode::AlreadyRegistered));
        }
        Request::RegisterProducer => {
            *role = Role::Producer;
            core.counters.producers.fetch_add(1, Ordering::Relaxed);
            reply(out, Reply::Producer);
            core.log.info(format_args!(
                "connection {} registered as producer",
                conn.id
            ));
        }
        Request::RegisterConsumer { id, ack } => {
            let registered = core.register_consumer(conn, id, ack, &mut replies(out));
            match registered {
                Ok(_) => *role = Role::Consumer,
                Err(code) => reply(out, Reply::error(code)),
            }
        }
        Request::Send(_) | Request::Get | Request::Ack(_) => {
            // A producer's SEND and a consumer's GET and ACK are handled in
            // batches; what reaches here is the wrong role.
            reply(out, Reply::error(ErrorCode::NotAllowed));
        }
        Request::Heartbeat => reply(out, Reply::Heartbeat),
        Request::Stats => {
            let mut body = Vec::with_capacity(512);
            protocol::encode_stats(&mut body, &core.stats());
            reply(out, Reply::Stats(&body));
        }
        Request::Auth(given) => {
            // A later AUTH is checked like the first; a wrong one closes.
            if !shared.access.check(given) {
                core.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                reply(out, Reply::error(ErrorCode::AuthenticationFailed));
                return Flow::Close;
            }
            reply(out, Reply::Auth);
        }
        Request::Quit => {
            reply(out, Reply::Bye);
            return Flow::Close;
        }
        Request::Invalid(code) => reply(out, Reply::error(code)),
    }
    Flow::Continue
}

/// The sink the core answers into: each typed reply encoded onto `out`.
fn replies(out: &mut Vec<u8>) -> impl FnMut(Reply<'_>) + '_ {
    move |reply| protocol::encode_reply(out, &reply)
}

/// Sets the read timeout if it differs from `current`; returns the new one.
fn set_timeout(stream: &TcpStream, wanted: Duration, current: Duration) -> Duration {
    // std refuses a zero Duration (an error, not "block forever" as a
    // zero timeval would be to the kernel), so never pass one.
    let wanted = wanted.max(Duration::from_millis(1));
    if wanted == current {
        return current;
    }
    match stream.set_read_timeout(Some(wanted)) {
        Ok(()) => wanted,
        Err(_) => current,
    }
}
