//! The consumer program: registers (resuming `--id` if given), waits for
//! `NOTIFY`, fetches what is waiting with pipelined `GET`s, and prints each
//! message's content on stdout, one per line, flushed. Diagnostics go to
//! stderr, so it pipes well.
//!
//! On a lost connection it reconnects with backoff and registers again
//! under the same id, so it resumes where its cursor was. A broker that
//! crashed may hand back messages this process already printed (its saved
//! cursor lags); message ids are never reused, so those with an id at or
//! below the last one printed are skipped (and counted on stderr) rather
//! than printed twice, unless the broker's next id shows it was reset.
//! With `--count N` it never asks for more than it still wants: without
//! acknowledgements a `GET` consumes, and a message fetched and not
//! printed would be lost to this id.
//!
//! While idle it sends `HEARTBEAT:<unix time>` every `--heartbeat` seconds;
//! if the broker still drops it for idleness, it halves the period (down
//! to [`client::MIN_HEARTBEAT`]) and reconnects.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::client::{
    self, Backoff, ClientError, Connection, Endpoint, REPLY_TIMEOUT, connect_with_retry,
};
use crate::protocol::{self, ErrorCode, Reply};

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub endpoint: Endpoint,
    pub id: Option<String>,
    /// Exit after this many messages.
    pub count: Option<u64>,
    /// Exit after this long without a message.
    pub timeout: Option<Duration>,
    /// Print `<id>\t<content>` instead of the content alone.
    pub verbose: bool,
    /// `GET`s in flight at most.
    pub window: usize,
    pub retries: Option<u32>,
    /// Send a heartbeat after this long without traffic.
    pub heartbeat: Duration,
}

/// Default number of pipelined GETs.
pub const DEFAULT_WINDOW: usize = 64;

enum Next {
    Done,
    Reconnect,
}

/// What outlives a connection.
struct Progress {
    /// Messages printed.
    received: u64,
    last_message: Instant,
    /// The highest message id printed, if redeliveries are being checked.
    last_id: Option<u64>,
    heartbeat: Duration,
}

/// A run of redelivered messages skipped, reported as one stderr line.
#[derive(Default)]
struct Skipped {
    count: u64,
    first: u64,
    last: u64,
}

impl Skipped {
    fn add(&mut self, id: u64) {
        if self.count == 0 {
            self.first = id;
        }
        self.last = id;
        self.count += 1;
    }

    fn report(&mut self) {
        if self.count > 0 {
            eprintln!(
                "consumer: skipped {} message(s) redelivered after the reconnect (ids {}..{}), already printed",
                self.count, self.first, self.last
            );
            *self = Skipped::default();
        }
    }
}

/// Runs the consumer; returns the exit status.
pub fn run(options: &ConsumerOptions) -> i32 {
    let started = Instant::now();
    let mut id = options.id.clone();
    let mut backoff = Backoff::new(options.retries);
    let mut progress = Progress {
        received: 0,
        last_message: Instant::now(),
        last_id: None,
        heartbeat: options.heartbeat.max(client::MIN_HEARTBEAT),
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    loop {
        let wanted = id.clone();
        let reconnecting = progress.last_id.is_some();
        // With --timeout, stop retrying once the wait for a message is over.
        let give_up_at = options
            .timeout
            .map(|timeout| progress.last_message + timeout);
        let connected = connect_with_retry(
            "consumer",
            &options.endpoint,
            &mut backoff,
            give_up_at,
            |conn| {
                let assigned = conn.register_consumer(wanted.as_deref())?;
                let next_id = if reconnecting {
                    next_message_id(conn)?
                } else {
                    None
                };
                Ok((assigned, next_id))
            },
        );
        let (mut conn, (assigned, next_id)) = match connected {
            Ok(done) => done,
            Err(err) => {
                eprintln!("consumer: giving up: {err}");
                return 1;
            }
        };
        eprintln!("consumer: registered as consumer {assigned}");
        if let (Some(last), Some(next)) = (progress.last_id, next_id)
            && next <= last
        {
            eprintln!(
                "consumer: the broker's next message id is {next}, not past the last one printed ({last}): \
                 it was reset or lost messages, so ids are no longer checked for redelivery"
            );
            progress.last_id = None;
        }
        id = Some(assigned);
        match serve(&mut conn, options, &mut out, &mut progress) {
            Ok(Next::Done) => {
                let _ = out.flush();
                conn.quit();
                let elapsed = started.elapsed().as_secs_f64();
                if options.verbose {
                    eprintln!(
                        "consumer: received {} message(s) in {elapsed:.3} s",
                        progress.received
                    );
                }
                return 0;
            }
            Ok(Next::Reconnect) => {}
            Err(err) => {
                eprintln!("consumer: cannot write to stdout: {err}");
                return 1;
            }
        }
    }
}

/// The broker's next message id, from `STATS` (`None` if it does not say).
fn next_message_id(conn: &mut Connection) -> Result<Option<u64>, ClientError> {
    let reply = match conn.request(b"STATS") {
        Ok(reply) => reply,
        Err(ClientError::Refused(_)) => return Ok(None),
        Err(err) => return Err(err),
    };
    let Some(body) = reply.strip_prefix(b"OK:STATS:") else {
        return Ok(None);
    };
    Ok(body
        .split(|&b| b == b' ')
        .find_map(|pair| pair.strip_prefix(b"next_id="))
        .and_then(protocol::parse_u64))
}

/// One connection's life. `Err` only for stdout failures.
fn serve(
    conn: &mut Connection,
    options: &ConsumerOptions,
    out: &mut impl Write,
    progress: &mut Progress,
) -> io::Result<Next> {
    let window = options.window.max(1) as u64;
    // Replies due: to GETs, and to heartbeats.
    let mut outstanding = 0u64;
    let mut heartbeats = 0u64;
    let mut want_gets = true;
    let mut notified = false;
    let mut last_sent = Instant::now();
    // The last line received, or when a request went out with no reply
    // due: the clock for REPLY_TIMEOUT.
    let mut reply_clock = Instant::now();
    let mut skipped = Skipped::default();
    loop {
        if options
            .count
            .is_some_and(|count| progress.received >= count)
        {
            skipped.report();
            out.flush()?;
            return Ok(Next::Done);
        }
        if want_gets && outstanding == 0 {
            let remaining = options
                .count
                .map_or(u64::MAX, |count| count - progress.received);
            let n = window.min(remaining);
            for _ in 0..n {
                conn.out.extend_from_slice(b"GET\n");
            }
            if heartbeats == 0 {
                reply_clock = Instant::now();
            }
            outstanding = n;
            notified = false;
            want_gets = false;
        }
        if !conn.out.is_empty() {
            last_sent = Instant::now();
            if let Err(err) = conn.flush() {
                skipped.report();
                eprintln!("consumer: lost the connection ({err}); reconnecting");
                return Ok(Next::Reconnect);
            }
        }
        let mut deadline = last_sent + progress.heartbeat;
        if let Some(timeout) = options.timeout {
            deadline = deadline.min(progress.last_message + timeout);
        }
        let replies_due = outstanding + heartbeats > 0;
        if replies_due {
            deadline = deadline.min(reply_clock + REPLY_TIMEOUT);
        }
        out.flush()?;
        let line = match conn.read_line(deadline) {
            Ok(Some(line)) => line,
            Ok(None) => {
                if options
                    .timeout
                    .is_some_and(|timeout| progress.last_message.elapsed() >= timeout)
                {
                    skipped.report();
                    return Ok(Next::Done);
                }
                if replies_due && reply_clock.elapsed() >= REPLY_TIMEOUT {
                    skipped.report();
                    eprintln!("consumer: lost the connection (no reply in time); reconnecting");
                    return Ok(Next::Reconnect);
                }
                if last_sent.elapsed() >= progress.heartbeat {
                    if !replies_due {
                        reply_clock = Instant::now();
                    }
                    conn.queue_heartbeat();
                    heartbeats += 1;
                }
                continue;
            }
            Err(err) => {
                skipped.report();
                eprintln!("consumer: lost the connection ({err}); reconnecting");
                return Ok(Next::Reconnect);
            }
        };
        reply_clock = Instant::now();
        match protocol::parse_reply(&line) {
            Reply::Msg { id, content } => {
                outstanding = outstanding.saturating_sub(1);
                if progress.last_id.is_some_and(|last| id <= last) {
                    skipped.add(id);
                } else {
                    skipped.report();
                    if options.verbose {
                        write!(out, "{id}\t")?;
                    }
                    out.write_all(content)?;
                    out.write_all(b"\n")?;
                    progress.received += 1;
                    progress.last_message = Instant::now();
                    progress.last_id = Some(id);
                }
                if outstanding == 0 {
                    want_gets = true;
                }
            }
            Reply::Error(Some(ErrorCode::NoMessages), _) => {
                outstanding = outstanding.saturating_sub(1);
                if outstanding == 0 {
                    // Caught up: wait for a NOTIFY, unless one came while
                    // these GETs were on their way.
                    want_gets = notified;
                }
            }
            Reply::Notify(_) => {
                notified = true;
                if outstanding == 0 {
                    want_gets = true;
                }
            }
            Reply::Error(Some(code @ (ErrorCode::ShuttingDown | ErrorCode::IdleTimeout)), text) => {
                skipped.report();
                if code == ErrorCode::IdleTimeout {
                    progress.heartbeat = client::shorter_heartbeat(progress.heartbeat);
                    eprintln!(
                        "consumer: the broker dropped the idle connection; heartbeats now every {} ms",
                        progress.heartbeat.as_millis()
                    );
                }
                eprintln!(
                    "consumer: broker said ERROR:{}; reconnecting",
                    String::from_utf8_lossy(text)
                );
                return Ok(Next::Reconnect);
            }
            Reply::Ok(b"HEARTBEAT") => heartbeats = heartbeats.saturating_sub(1),
            _ => eprintln!(
                "consumer: unexpected line from the broker: {}",
                String::from_utf8_lossy(&line)
            ),
        }
    }
}
