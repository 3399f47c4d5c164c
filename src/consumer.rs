//! The consumer program: registers (resuming `--id` if given), waits for
//! `NOTIFY`, fetches what is waiting with pipelined `GET`s, and prints each
//! message's content on stdout, one per line, flushed. Diagnostics go to
//! stderr, so it pipes well.
//!
//! On a lost connection it reconnects with backoff and registers again
//! under the same id, so it resumes where its cursor was. With `--count N`
//! it never asks for more than it still wants: without acknowledgements a
//! `GET` consumes, and a message fetched and not printed would be lost to
//! this id.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::client::{Backoff, Connection, Endpoint, HEARTBEAT_EVERY, connect_with_retry};
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
}

/// Default number of pipelined GETs.
pub const DEFAULT_WINDOW: usize = 64;

enum Next {
    Done,
    Reconnect,
}

/// Runs the consumer; returns the exit status.
pub fn run(options: &ConsumerOptions) -> i32 {
    let started = Instant::now();
    let mut id = options.id.clone();
    let mut backoff = Backoff::new(options.retries);
    let mut received = 0u64;
    let mut last_message = Instant::now();
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    loop {
        let wanted = id.clone();
        let connected = connect_with_retry("consumer", &options.endpoint, &mut backoff, |conn| {
            conn.register_consumer(wanted.as_deref())
        });
        let (mut conn, assigned) = match connected {
            Ok(done) => done,
            Err(err) => {
                eprintln!("consumer: giving up: {err}");
                return 1;
            }
        };
        eprintln!("consumer: registered as consumer {assigned}");
        id = Some(assigned);
        let session = serve(&mut conn, options, &mut out, &mut received, &mut last_message);
        match session {
            Ok(Next::Done) => {
                let _ = out.flush();
                conn.quit();
                let elapsed = started.elapsed().as_secs_f64();
                if options.verbose {
                    eprintln!("consumer: received {received} message(s) in {elapsed:.3} s");
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

/// One connection's life. `Err` only for stdout failures.
fn serve(
    conn: &mut Connection,
    options: &ConsumerOptions,
    out: &mut impl Write,
    received: &mut u64,
    last_message: &mut Instant,
) -> io::Result<Next> {
    let window = options.window.max(1) as u64;
    let mut outstanding = 0u64;
    let mut want_gets = true;
    let mut notified = false;
    let mut last_sent = Instant::now();
    loop {
        if let Some(count) = options.count {
            if *received >= count {
                out.flush()?;
                return Ok(Next::Done);
            }
        }
        if want_gets && outstanding == 0 {
            let remaining = options.count.map_or(u64::MAX, |count| count - *received);
            let n = window.min(remaining);
            for _ in 0..n {
                conn.out.extend_from_slice(b"GET\n");
            }
            outstanding = n;
            notified = false;
            want_gets = false;
        }
        if !conn.out.is_empty() {
            last_sent = Instant::now();
            if let Err(err) = conn.flush() {
                eprintln!("consumer: lost the connection ({err}); reconnecting");
                return Ok(Next::Reconnect);
            }
        }
        let mut deadline = last_sent + HEARTBEAT_EVERY;
        if let Some(timeout) = options.timeout {
            deadline = deadline.min(*last_message + timeout);
        }
        out.flush()?;
        let line = match conn.read_line(deadline) {
            Ok(Some(line)) => line,
            Ok(None) => {
                if options.timeout.is_some_and(|timeout| last_message.elapsed() >= timeout) {
                    return Ok(Next::Done);
                }
                if last_sent.elapsed() >= HEARTBEAT_EVERY {
                    conn.queue_heartbeat();
                }
                continue;
            }
            Err(err) => {
                eprintln!("consumer: lost the connection ({err}); reconnecting");
                return Ok(Next::Reconnect);
            }
        };
        match protocol::parse_reply(&line) {
            Reply::Msg { id, content } => {
                outstanding = outstanding.saturating_sub(1);
                if options.verbose {
                    write!(out, "{id}\t")?;
                }
                out.write_all(content)?;
                out.write_all(b"\n")?;
                *received += 1;
                *last_message = Instant::now();
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
            Reply::Error(Some(ErrorCode::ShuttingDown | ErrorCode::IdleTimeout), text) => {
                eprintln!("consumer: broker said ERROR:{}; reconnecting", String::from_utf8_lossy(text));
                return Ok(Next::Reconnect);
            }
            Reply::Ok(b"HEARTBEAT") => {}
            _ => eprintln!("consumer: unexpected line from the broker: {}", String::from_utf8_lossy(&line)),
        }
    }
}
