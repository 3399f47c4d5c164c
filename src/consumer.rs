//! The consumer program: registers (resuming `--id` if given), waits for
//! `NOTIFY`, fetches what is waiting with pipelined `GET`s, and prints each
//! message's content on stdout, one per line, flushed. Diagnostics go to
//! stderr, so it pipes well.
//!
//! With `--ack` it registers with `REGISTER:CONSUMER:<id>:ACK` and sends
//! `ACK:<id>` for a message only after its line was written to stdout and
//! stdout flushed, so `consumer --ack | program` loses nothing when the
//! consumer is killed: what it had not acknowledged the broker delivers
//! again (at least once). Acks go out in batches, one per read from the
//! socket, in the same pipeline as the `GET`s; the replies due are kept as
//! a FIFO of request kinds ([`Request`]), since `OK:ACK:<id>` replies
//! interleave with `MSG:` ones.
//!
//! On a lost connection it reconnects with backoff and registers again
//! under the same id, so it resumes where its cursor was. A broker that
//! crashed, or an ack-mode broker that took a message back, may hand out
//! again a message this process already printed. Message ids are never
//! reused, so the ids printed are remembered ([`PrintedIds`], a bounded set
//! of ranges) and a message whose id is among them is skipped (and counted
//! on stderr) rather than printed twice; in ack mode it is still
//! acknowledged, or it would come back forever. Only ids this process
//! printed are skipped, never "everything below the highest", because in
//! ack mode a lower id may legitimately arrive late (a message in flight on
//! a dead connection is released after newer ones went out). If the
//! broker's next id shows it was reset, the set is forgotten.
//!
//! With `--count N` it stops after N distinct messages printed and never
//! asks for more than it still wants: without acknowledgements a `GET`
//! consumes, and a message fetched and not printed would be lost to this
//! id. In ack mode it waits (briefly) for its last acks to be confirmed
//! before it says goodbye.
//!
//! While idle it sends `HEARTBEAT:<unix time>` every `--heartbeat` seconds;
//! if the broker still drops it for idleness, it halves the period (down
//! to [`client::MIN_HEARTBEAT`]) and reconnects.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::client::{
    self, Backoff, ClientError, Connection, Endpoint, REPLY_TIMEOUT, connect_with_retry,
};
use crate::protocol::{self, Command, ErrorCode, Reply};

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
    /// Ack mode: acknowledge each message once printed and flushed (needs
    /// `id`).
    pub ack: bool,
    /// `--exec CMD`: run CMD per message instead of printing it (see
    /// [`crate::exec`]); only a message whose CMD exits 0 counts as done.
    pub exec: Option<String>,
}

/// Default number of pipelined GETs.
pub const DEFAULT_WINDOW: usize = 64;

/// Ranges of printed ids remembered at most. One consumer alone prints a
/// few long runs; competing consumers of one id fragment them. Past the
/// bound the lowest range is forgotten, so a late redelivery of one of
/// those ids is printed again: a duplicate, never a loss.
pub const MAX_PRINTED_RANGES: usize = 4096;

/// How long a consumer that is done (`--count` reached, `--timeout`
/// passed) waits for the broker to confirm its last acks. What stays
/// unconfirmed is delivered again to the id later, so waiting longer would
/// only save duplicates.
pub const FINISH_WAIT: Duration = Duration::from_secs(5);

/// The message ids this process printed, as disjoint inclusive ranges
/// (`start -> end`), at most a given number of them.
#[derive(Debug)]
pub struct PrintedIds {
    ranges: BTreeMap<u64, u64>,
    limit: usize,
}

impl PrintedIds {
    /// An empty set that keeps at most `limit` ranges (at least one).
    pub fn new(limit: usize) -> PrintedIds {
        PrintedIds {
            ranges: BTreeMap::new(),
            limit: limit.max(1),
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        self.ranges
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &end)| id <= end)
    }

    /// Adds `id`; returns false if it was there already.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.contains(id) {
            return false;
        }
        let joins_previous = self
            .ranges
            .range(..id)
            .next_back()
            .filter(|&(_, &end)| end + 1 == id)
            .map(|(&start, _)| start);
        let joins_next = id.checked_add(1).and_then(|next| self.ranges.remove(&next));
        self.ranges
            .insert(joins_previous.unwrap_or(id), joins_next.unwrap_or(id));
        if self.ranges.len() > self.limit {
            self.ranges.pop_first();
        }
        true
    }

    /// The highest id remembered.
    pub fn max(&self) -> Option<u64> {
        self.ranges.last_key_value().map(|(_, &end)| end)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Ranges held (for tests and bounds).
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }
}

enum Next {
    Done,
    Reconnect,
}

/// What outlives a connection.
struct Progress {
    /// Distinct messages printed.
    received: u64,
    last_message: Instant,
    /// The ids printed, to skip redeliveries.
    printed: PrintedIds,
    heartbeat: Duration,
    /// Ack mode: ids printed whose ack was not confirmed when the last
    /// connection ended; acknowledged again on the next one.
    unconfirmed: Vec<u64>,
    /// Redeliveries skipped.
    skipped: u64,
    /// Acks confirmed with `OK:ACK`, and refused (`ERROR:Unknown message
    /// id`: acknowledged already, or the broker restarted since it
    /// delivered the message, which then comes again).
    acked: u64,
    ack_refused: u64,
}

impl Progress {
    fn new(heartbeat: Duration) -> Progress {
        Progress {
            received: 0,
            last_message: Instant::now(),
            printed: PrintedIds::new(MAX_PRINTED_RANGES),
            heartbeat,
            unconfirmed: Vec::new(),
            skipped: 0,
            acked: 0,
            ack_refused: 0,
        }
    }
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
                "consumer: skipped {} message(s) redelivered, already printed (ids {}..{})",
                self.count, self.first, self.last
            );
            *self = Skipped::default();
        }
    }
}

/// Runs the consumer; returns the exit status.
pub fn run(options: &ConsumerOptions) -> i32 {
    assert!(
        !options.ack || options.id.is_some(),
        "ack mode needs a consumer id"
    );
    let started = Instant::now();
    let mut id = options.id.clone();
    let mut backoff = Backoff::new(options.retries);
    let mut progress = Progress::new(options.heartbeat.max(client::MIN_HEARTBEAT));
    watch_stdout();
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    loop {
        let (mut conn, assigned) =
            match connect(options, id.as_deref(), &mut backoff, &mut progress) {
                Ok(connected) => connected,
                Err(err) => {
                    let _ = out.flush();
                    report_giving_up(options, &err);
                    return 1;
                }
            };
        id = Some(assigned);
        match serve(&mut conn, options, &mut out, &mut progress) {
            Ok(Next::Done) => {
                let _ = out.flush();
                conn.quit();
                if options.verbose {
                    print_summary(options, &progress, started);
                }
                return 0;
            }
            Ok(Next::Reconnect) => {}
            Err(err) => return stdout_failed(&err),
        }
    }
}

/// Connects and registers under `id` (or a new one), retrying with
/// `backoff`; returns the connection and the id the broker confirmed. On a
/// reconnection, forgets the ids printed before if the broker's next id
/// shows it was reset.
fn connect(
    options: &ConsumerOptions,
    id: Option<&str>,
    backoff: &mut Backoff,
    progress: &mut Progress,
) -> Result<(Connection, String), ClientError> {
    let reconnecting = !progress.printed.is_empty();
    // With --timeout, stop retrying once the wait for a message is over.
    let give_up_at = options
        .timeout
        .map(|timeout| progress.last_message + timeout);
    let (conn, (assigned, next_id)) =
        connect_with_retry("consumer", &options.endpoint, backoff, give_up_at, |conn| {
            let assigned = conn.register_consumer(id, options.ack)?;
            let next_id = if reconnecting {
                next_message_id(conn)?
            } else {
                None
            };
            Ok((assigned, next_id))
        })?;
    eprintln!(
        "consumer: registered as consumer {assigned}{}",
        if options.ack { " (ack mode)" } else { "" }
    );
    if let (Some(last), Some(next)) = (progress.printed.max(), next_id)
        && next <= last
    {
        eprintln!(
            "consumer: the broker's next message id is {next}, not past the last one printed ({last}): \
             it was reset or lost messages, so the ids printed before are forgotten"
        );
        progress.printed.clear();
    }
    Ok((conn, assigned))
}

fn report_giving_up(options: &ConsumerOptions, err: &ClientError) {
    eprintln!("consumer: giving up: {err}");
    if options.ack && matches!(err, ClientError::Refused(ErrorCode::InvalidRegistration)) {
        eprintln!(
            "consumer: an id keeps the mode it was created in: was '{}' created without --ack?",
            options.id.as_deref().unwrap_or_default()
        );
    }
}

/// The `--verbose` line at the end.
fn print_summary(options: &ConsumerOptions, progress: &Progress, started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    eprint!(
        "consumer: received {} message(s) in {elapsed:.3} s, skipped {} redelivered",
        progress.received, progress.skipped
    );
    if options.ack {
        eprint!(
            ", acked {}, acks refused {}, unconfirmed {}",
            progress.acked,
            progress.ack_refused,
            progress.unconfirmed.len()
        );
    }
    eprintln!();
}

/// Exit status when the reader of stdout went away: what a shell shows
/// for a program killed by SIGPIPE (128 + 13).
pub const EXIT_STDOUT_CLOSED: i32 = 141;

/// Says why stdout failed; returns the exit status. A reader that went
/// away ends the run as when the stdout watcher sees it first.
fn stdout_failed(err: &io::Error) -> i32 {
    if err.kind() == io::ErrorKind::BrokenPipe {
        eprintln!("consumer: the reader of stdout went away; exiting");
        return EXIT_STDOUT_CLOSED;
    }
    eprintln!("consumer: cannot write to stdout: {err}");
    1
}

/// Exits the process as soon as nobody reads stdout any more (`consumer |
/// head -3`), not at the next message, which may be hours away. A thread
/// of its own, because the main one sleeps in socket reads. What was
/// fetched and not yet written is not acknowledged, so in ack mode the
/// broker delivers it again; without ack mode it was consumed.
fn watch_stdout() {
    let spawned = std::thread::Builder::new()
        .name("stdout-watch".into())
        .stack_size(64 * 1024)
        .spawn(|| {
            if crate::sys::service::wait_output_closed(&io::stdout()).is_ok() {
                eprintln!("consumer: the reader of stdout went away; exiting");
                std::process::exit(EXIT_STDOUT_CLOSED);
            }
        });
    // Without the thread the consumer still notices at its next write.
    drop(spawned);
}

/// The broker's next message id, from `STATS` (`None` if it does not say).
fn next_message_id(conn: &mut Connection) -> Result<Option<u64>, ClientError> {
    let reply = match conn.request(&Command::Stats) {
        Ok(reply) => reply,
        Err(ClientError::Refused(_)) => return Ok(None),
        Err(err) => return Err(err),
    };
    let Reply::Stats(body) = protocol::parse_reply(&reply) else {
        return Ok(None);
    };
    Ok(protocol::stats_field(body, "next_id").and_then(protocol::parse_u64))
}

/// A request whose reply is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Get,
    Ack(u64),
    Heartbeat,
}

/// What the connection should do after a line from the broker.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    /// The connection is no use any more; the reason, for stderr.
    Reconnect(String),
}

/// One connection's conversation, apart from the socket: which replies
/// are due, what to ask next, what to print and what to acknowledge.
struct Session {
    ack: bool,
    verbose: bool,
    window: u64,
    count: Option<u64>,
    /// Requests sent whose replies are due, oldest first.
    due: VecDeque<Request>,
    gets_due: u64,
    acks_due: u64,
    /// Send a window of `GET`s once the last one is answered.
    want_gets: bool,
    /// A NOTIFY came since the last window of `GET`s went out.
    notified: bool,
    /// Ack mode: a `GET` found nothing while acks of ours were unconfirmed.
    /// The broker may have refused because too many messages were in
    /// flight (`--max-ack-pending`). It should say NOTIFY once the acks
    /// make room, but if it does not, the consumer would stall until the
    /// next message arrives; one `GET` once the acks are confirmed costs
    /// one round trip per catch-up and rules that out.
    probe: bool,
    /// Ack mode: ids printed (or skipped) whose `ACK` waits for stdout to
    /// be flushed.
    to_ack: Vec<u64>,
    /// Done: no more `GET`s; wait for the acks due, then quit.
    finishing: bool,
    skipped: Skipped,
    /// `--exec`: the command that takes each message.
    exec: Option<String>,
}

impl Session {
    fn new(options: &ConsumerOptions, progress: &mut Progress) -> Session {
        let mut session = Session {
            ack: options.ack,
            verbose: options.verbose,
            window: options.window.max(1) as u64,
            count: options.count,
            due: VecDeque::new(),
            gets_due: 0,
            acks_due: 0,
            want_gets: true,
            notified: false,
            probe: false,
            to_ack: std::mem::take(&mut progress.unconfirmed),
            finishing: false,
            skipped: Skipped::default(),
            exec: options.exec.clone(),
        };
        session.finishing = session.count_reached(progress);
        session
    }

    fn count_reached(&self, progress: &Progress) -> bool {
        self.count.is_some_and(|count| progress.received >= count)
    }

    fn push(&mut self, request: Request) {
        match request {
            Request::Get => self.gets_due += 1,
            Request::Ack(_) => self.acks_due += 1,
            Request::Heartbeat => {}
        }
        self.due.push_back(request);
    }

    /// Takes the oldest request due, which must be of the kind `is` accepts.
    fn answer(&mut self, is: impl Fn(Request) -> bool, line: &[u8]) -> Result<Request, Step> {
        match self.due.front() {
            Some(&request) if is(request) => {
                self.due.pop_front();
                match request {
                    Request::Get => self.gets_due -= 1,
                    Request::Ack(_) => self.acks_due -= 1,
                    Request::Heartbeat => {}
                }
                Ok(request)
            }
            front => Err(Step::Reconnect(format!(
                "out of step: {} in reply to {front:?}",
                String::from_utf8_lossy(line)
            ))),
        }
    }

    fn replies_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// Finished: nothing more to ask, and every ack confirmed.
    fn is_done(&self) -> bool {
        self.finishing && self.acks_due == 0 && self.to_ack.is_empty()
    }

    /// Stops asking for messages (`--timeout` passed).
    fn finish(&mut self) {
        self.finishing = true;
    }

    /// Queues in `wire` what should go to the broker now: the acks of what
    /// was printed, if stdout was `flushed` since, then a window of `GET`s
    /// or a probe.
    fn queue_requests(&mut self, progress: &Progress, flushed: bool, wire: &mut Vec<u8>) {
        if flushed {
            for id in std::mem::take(&mut self.to_ack) {
                protocol::encode_request(wire, &Command::Ack(id));
                self.push(Request::Ack(id));
            }
        }
        if self.finishing || self.gets_due > 0 {
            return;
        }
        let gets = if self.want_gets {
            let remaining = self
                .count
                .map_or(u64::MAX, |count| count - progress.received);
            self.window.min(remaining)
        } else if self.probe && self.acks_due == 0 && self.to_ack.is_empty() {
            1
        } else {
            0
        };
        if gets > 0 {
            for _ in 0..gets {
                protocol::encode_request(wire, &Command::Get);
                self.push(Request::Get);
            }
            self.want_gets = false;
            self.notified = false;
            self.probe = false;
        }
    }

    /// A heartbeat went out.
    fn heartbeat_sent(&mut self) {
        self.push(Request::Heartbeat);
    }

    /// Handles one line from the broker: prints messages to `out`
    /// (unflushed), notes what to acknowledge and what to ask next.
    /// `Err` only for stdout failures.
    fn on_line(
        &mut self,
        line: &[u8],
        progress: &mut Progress,
        out: &mut impl Write,
    ) -> io::Result<Step> {
        let step = match protocol::parse_reply(line) {
            Reply::Notify(_) => {
                self.notified = true;
                if self.gets_due == 0 {
                    self.want_gets = true;
                }
                Ok(())
            }
            Reply::Msg { id, content } => match self.answer(|r| r == Request::Get, line) {
                Ok(_) => {
                    self.on_message(id, content, progress, out)?;
                    if self.gets_due == 0 {
                        self.want_gets = true;
                    }
                    Ok(())
                }
                Err(step) => Err(step),
            },
            Reply::Error(Some(ErrorCode::NoMessages), _) => {
                self.answer(|r| r == Request::Get, line).map(|_| {
                    if self.acks_due > 0 || !self.to_ack.is_empty() {
                        self.probe = true;
                    }
                    if self.gets_due == 0 {
                        // Caught up: wait for a NOTIFY, unless one came
                        // while these GETs were on their way.
                        self.want_gets = self.notified;
                    }
                })
            }
            Reply::Acked(_) => self
                .answer(|r| matches!(r, Request::Ack(_)), line)
                .map(|_| progress.acked += 1),
            Reply::Error(Some(ErrorCode::UnknownMessageId), _) => self
                .answer(|r| matches!(r, Request::Ack(_)), line)
                .map(|_| progress.ack_refused += 1),
            Reply::Heartbeat => self.answer(|r| r == Request::Heartbeat, line).map(|_| ()),
            Reply::Error(Some(code @ (ErrorCode::ShuttingDown | ErrorCode::IdleTimeout)), text) => {
                if code == ErrorCode::IdleTimeout {
                    progress.heartbeat = client::shorter_heartbeat(progress.heartbeat);
                    eprintln!(
                        "consumer: the broker dropped the idle connection; heartbeats now every {} ms",
                        progress.heartbeat.as_millis()
                    );
                }
                Err(Step::Reconnect(format!(
                    "the broker said {}",
                    String::from_utf8_lossy(text)
                )))
            }
            _ => {
                // Some other error to some request: answered, nothing to do.
                let request = self.answer(|_| true, line);
                eprintln!(
                    "consumer: unexpected line from the broker{}: {}",
                    match request {
                        Ok(request) => format!(" in reply to {request:?}"),
                        Err(_) => String::new(),
                    },
                    String::from_utf8_lossy(line)
                );
                Ok(())
            }
        };
        Ok(step.err().unwrap_or(Step::Continue))
    }

    /// A `MSG:` reply: print it, or skip it if it was printed already.
    fn on_message(
        &mut self,
        id: u64,
        content: &[u8],
        progress: &mut Progress,
        out: &mut impl Write,
    ) -> io::Result<()> {
        if self.count_reached(progress) {
            // Not wanted any more (cannot happen with the GETs limited to
            // what is still wanted). Not acknowledged, so in ack mode the
            // broker delivers it again to the id.
            return Ok(());
        }
        if progress.printed.contains(id) {
            self.skipped.add(id);
            progress.skipped += 1;
        } else {
            self.skipped.report();
            if !self.deliver(id, content, out)? {
                // Not done: neither remembered nor acknowledged, so in ack
                // mode the broker delivers it again after its ack wait.
                return Ok(());
            }
            progress.received += 1;
            progress.last_message = Instant::now();
            progress.printed.insert(id);
            if self.count_reached(progress) {
                self.finishing = true;
            }
        }
        if self.ack {
            self.to_ack.push(id);
        }
        Ok(())
    }

    /// Prints the message, or hands it to `--exec`; false when the
    /// command failed (logged on stderr).
    fn deliver(&mut self, id: u64, content: &[u8], out: &mut impl Write) -> io::Result<bool> {
        let Some(command) = &self.exec else {
            if self.verbose {
                write!(out, "{id}\t")?;
            }
            out.write_all(content)?;
            out.write_all(b"\n")?;
            return Ok(true);
        };
        match crate::exec::run(command, id, content) {
            Ok(()) => Ok(true),
            Err(why) => {
                eprintln!(
                    "consumer: --exec failed for message {id}: {why}; {}",
                    if self.ack {
                        "not acknowledged: the broker delivers it again after its ack wait"
                    } else {
                        "without --ack it is not delivered again"
                    }
                );
                Ok(false)
            }
        }
    }

    /// The connection ends: what was printed and not confirmed, to be
    /// acknowledged on the next one.
    fn into_unconfirmed(mut self) -> Vec<u64> {
        self.skipped.report();
        let mut ids: Vec<u64> = self
            .due
            .iter()
            .filter_map(|request| match request {
                Request::Ack(id) => Some(*id),
                _ => None,
            })
            .collect();
        ids.append(&mut self.to_ack);
        ids
    }
}

/// One connection's life. `Err` only for stdout failures.
fn serve(
    conn: &mut Connection,
    options: &ConsumerOptions,
    out: &mut impl Write,
    progress: &mut Progress,
) -> io::Result<Next> {
    let mut session = Session::new(options, progress);
    let result = converse(conn, options, out, progress, &mut session);
    progress.unconfirmed = session.into_unconfirmed();
    result
}

/// The clocks of one connection's conversation.
struct Clocks {
    last_sent: Instant,
    /// The last line received, or when a request went out with no reply
    /// due: the clock for REPLY_TIMEOUT.
    reply_clock: Instant,
    finish_by: Option<Instant>,
}

impl Clocks {
    /// How long the next read may wait: until a heartbeat is due, the
    /// finish or `--timeout` passes, or a reply is late.
    fn deadline(
        &self,
        options: &ConsumerOptions,
        progress: &Progress,
        session: &Session,
    ) -> Instant {
        let mut deadline = self.last_sent + progress.heartbeat;
        if let Some(by) = self.finish_by {
            deadline = deadline.min(by);
        } else if let Some(timeout) = options.timeout {
            deadline = deadline.min(progress.last_message + timeout);
        }
        if session.replies_due() {
            deadline = deadline.min(self.reply_clock + REPLY_TIMEOUT);
        }
        deadline
    }
}

/// A lost connection: once finishing it ends the run, else a retry.
fn lost(session: &Session, why: &str) -> Next {
    if session.finishing {
        Next::Done
    } else {
        eprintln!("consumer: lost the connection ({why}); reconnecting");
        Next::Reconnect
    }
}

fn converse(
    conn: &mut Connection,
    options: &ConsumerOptions,
    out: &mut impl Write,
    progress: &mut Progress,
    session: &mut Session,
) -> io::Result<Next> {
    let now = Instant::now();
    let mut clocks = Clocks {
        last_sent: now,
        reply_clock: now,
        finish_by: None,
    };
    loop {
        if session.finishing {
            let by = *clocks
                .finish_by
                .get_or_insert_with(|| Instant::now() + FINISH_WAIT);
            if session.is_done() || Instant::now() >= by {
                out.flush()?;
                return Ok(Next::Done);
            }
        }
        // Flush stdout only when no line is waiting: one write and one
        // batch of acks per read from the socket, not one per message.
        let flushed = !conn.has_line();
        if flushed {
            out.flush()?;
        }
        let was_idle = !session.replies_due();
        session.queue_requests(progress, flushed, &mut conn.out);
        if !conn.out.is_empty() {
            let now = Instant::now();
            if was_idle {
                clocks.reply_clock = now;
            }
            clocks.last_sent = now;
            if let Err(err) = conn.flush() {
                return Ok(lost(session, &err.to_string()));
            }
        }
        let line = match conn.read_line(clocks.deadline(options, progress, session)) {
            Ok(Some(line)) => line,
            Ok(None) => match on_quiet(conn, options, out, progress, session, &mut clocks)? {
                Some(next) => return Ok(next),
                None => continue,
            },
            Err(err) => return Ok(lost(session, &err.to_string())),
        };
        clocks.reply_clock = Instant::now();
        match session.on_line(&line, progress, out)? {
            Step::Continue => {}
            Step::Reconnect(why) => return Ok(lost(session, &why)),
        }
    }
}

/// Nothing arrived before the deadline: `--timeout` may have passed, a
/// reply may be late, or a heartbeat is due. `Some` ends the conversation.
fn on_quiet(
    conn: &mut Connection,
    options: &ConsumerOptions,
    out: &mut impl Write,
    progress: &Progress,
    session: &mut Session,
    clocks: &mut Clocks,
) -> io::Result<Option<Next>> {
    if !session.finishing
        && options
            .timeout
            .is_some_and(|timeout| progress.last_message.elapsed() >= timeout)
    {
        if !options.ack {
            out.flush()?;
            return Ok(Some(Next::Done));
        }
        session.finish();
        return Ok(None);
    }
    if session.replies_due() && clocks.reply_clock.elapsed() >= REPLY_TIMEOUT {
        return Ok(Some(lost(session, "no reply in time")));
    }
    if clocks.last_sent.elapsed() >= progress.heartbeat {
        if !session.replies_due() {
            clocks.reply_clock = Instant::now();
        }
        conn.queue_heartbeat();
        session.heartbeat_sent();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(ack: bool, count: Option<u64>, window: usize) -> ConsumerOptions {
        ConsumerOptions {
            endpoint: Endpoint {
                host: "localhost".into(),
                port: 1,
                token: None,
            },
            id: Some("t".into()),
            count,
            timeout: None,
            verbose: true,
            window,
            retries: None,
            heartbeat: client::DEFAULT_HEARTBEAT,
            ack,
            exec: None,
        }
    }

    /// A session and what it printed and sent.
    struct Harness {
        session: Session,
        progress: Progress,
        stdout: Vec<u8>,
        wire: Vec<u8>,
    }

    impl Harness {
        fn new(options: &ConsumerOptions) -> Harness {
            let mut progress = Progress::new(client::DEFAULT_HEARTBEAT);
            let session = Session::new(options, &mut progress);
            Harness {
                session,
                progress,
                stdout: Vec::new(),
                wire: Vec::new(),
            }
        }

        /// What goes to the broker now, stdout flushed or not.
        fn sends(&mut self, flushed: bool) -> String {
            self.wire.clear();
            self.session
                .queue_requests(&self.progress, flushed, &mut self.wire);
            String::from_utf8(self.wire.clone()).unwrap()
        }

        fn reply(&mut self, line: &str) -> Step {
            self.session
                .on_line(line.as_bytes(), &mut self.progress, &mut self.stdout)
                .unwrap()
        }

        fn printed(&self) -> String {
            String::from_utf8(self.stdout.clone()).unwrap()
        }
    }

    #[test]
    fn printed_ids_merge_into_ranges() {
        let mut ids = PrintedIds::new(100);
        assert!(!ids.contains(1) && ids.max().is_none());
        for id in [1, 2, 3, 7, 5] {
            assert!(ids.insert(id));
        }
        assert_eq!(ids.ranges(), 3, "1..=3, 5, 7");
        assert!(!ids.insert(2));
        assert!(ids.insert(6));
        assert_eq!(ids.ranges(), 2, "1..=3, 5..=7");
        assert!(ids.insert(4));
        assert_eq!(ids.ranges(), 1);
        assert!((1..=7).all(|id| ids.contains(id)));
        assert!(!ids.contains(0) && !ids.contains(8));
        assert_eq!(ids.max(), Some(7));
        assert!(ids.insert(u64::MAX) && ids.contains(u64::MAX) && !ids.contains(u64::MAX - 1));
        ids.clear();
        assert!(ids.is_empty());
    }

    #[test]
    fn printed_ids_forget_the_lowest_range_past_the_bound() {
        let mut ids = PrintedIds::new(3);
        for id in [10, 20, 30, 40] {
            ids.insert(id);
        }
        assert_eq!(ids.ranges(), 3);
        assert!(!ids.contains(10), "forgotten: printed again, never skipped");
        assert!(ids.contains(20) && ids.contains(40));
        // Every id of a long run costs nothing.
        let mut ids = PrintedIds::new(3);
        for id in 1..=10_000 {
            ids.insert(id);
        }
        assert_eq!(ids.ranges(), 1);
    }

    #[test]
    fn plain_mode_pipelines_a_window_and_never_acks() {
        let mut h = Harness::new(&options(false, None, 3));
        assert_eq!(h.sends(true), "GET\nGET\nGET\n");
        assert_eq!(
            h.sends(true),
            "",
            "nothing more until the window is answered"
        );
        assert_eq!(h.reply("MSG:1:a"), Step::Continue);
        assert_eq!(h.reply("MSG:2:b"), Step::Continue);
        assert_eq!(h.reply("ERROR:No messages available"), Step::Continue);
        assert_eq!(h.printed(), "1\ta\n2\tb\n");
        assert_eq!(h.sends(true), "", "caught up: wait for a NOTIFY");
        assert_eq!(h.reply("NOTIFY:MESSAGES_AVAILABLE:1"), Step::Continue);
        assert_eq!(h.sends(true), "GET\nGET\nGET\n");
    }

    #[test]
    fn a_notify_during_a_window_means_fetch_again() {
        let mut h = Harness::new(&options(false, None, 2));
        h.sends(true);
        h.reply("ERROR:No messages available");
        h.reply("NOTIFY:MESSAGES_AVAILABLE:1");
        h.reply("ERROR:No messages available");
        assert_eq!(h.sends(true), "GET\nGET\n");
    }

    #[test]
    fn acks_go_out_only_after_stdout_is_flushed() {
        let mut h = Harness::new(&options(true, None, 2));
        assert_eq!(h.sends(true), "GET\nGET\n");
        h.reply("MSG:1:a");
        h.reply("MSG:2:b");
        // More lines waiting: stdout not flushed yet, so no acks, but the
        // next window goes out.
        assert_eq!(h.sends(false), "GET\nGET\n");
        assert_eq!(h.sends(true), "ACK:1\nACK:2\n");
        assert_eq!(h.sends(true), "");
        // Replies to GETs and ACKs interleave, matched in request order.
        assert_eq!(h.reply("MSG:3:c"), Step::Continue);
        assert_eq!(h.reply("ERROR:No messages available"), Step::Continue);
        assert_eq!(h.reply("OK:ACK:1"), Step::Continue);
        assert_eq!(h.reply("OK:ACK:2"), Step::Continue);
        assert_eq!(h.progress.acked, 2);
        assert_eq!(h.sends(true), "ACK:3\n");
        assert_eq!(h.reply("OK:ACK:3"), Step::Continue);
        assert_eq!(h.printed(), "1\ta\n2\tb\n3\tc\n");
    }

    #[test]
    fn redeliveries_are_skipped_but_acknowledged() {
        let mut h = Harness::new(&options(true, None, 3));
        h.sends(true);
        h.reply("MSG:5:e");
        h.reply("MSG:7:g");
        h.reply("MSG:5:e");
        assert_eq!(h.sends(true), "ACK:5\nACK:7\nACK:5\nGET\nGET\nGET\n");
        h.reply("OK:ACK:5");
        h.reply("OK:ACK:7");
        h.reply("ERROR:Unknown message id");
        assert_eq!((h.progress.acked, h.progress.ack_refused), (2, 1));
        // A lower id never printed is not a redelivery: printed.
        for line in ["MSG:6:f", "MSG:7:g", "ERROR:No messages available"] {
            assert_eq!(h.reply(line), Step::Continue, "{line}");
        }
        assert_eq!(h.printed(), "5\te\n7\tg\n6\tf\n");
        assert_eq!((h.progress.received, h.progress.skipped), (3, 2));
        assert_eq!(h.sends(true), "ACK:6\nACK:7\n");
    }

    #[test]
    fn nothing_waiting_while_acks_are_unconfirmed_probes_once_after_them() {
        let mut h = Harness::new(&options(true, None, 2));
        h.sends(true);
        h.reply("MSG:1:a");
        h.reply("ERROR:No messages available");
        assert_eq!(
            h.sends(true),
            "ACK:1\n",
            "no GET before the ack is confirmed"
        );
        h.reply("OK:ACK:1");
        assert_eq!(h.sends(true), "GET\n", "maybe the broker was at its bound");
        h.reply("ERROR:No messages available");
        assert_eq!(
            h.sends(true),
            "",
            "no acks due this time: wait for a NOTIFY"
        );
    }

    #[test]
    fn count_limits_the_gets_and_waits_for_the_last_acks() {
        let mut h = Harness::new(&options(true, Some(3), 8));
        assert_eq!(h.sends(true), "GET\nGET\nGET\n");
        h.reply("MSG:1:a");
        h.reply("MSG:1:a");
        h.reply("MSG:2:b");
        assert!(!h.session.finishing, "a skipped message does not count");
        assert_eq!(h.sends(false), "GET\n");
        h.reply("MSG:3:c");
        assert!(h.session.finishing && !h.session.is_done());
        assert_eq!(h.sends(true), "ACK:1\nACK:1\nACK:2\nACK:3\n");
        for _ in 0..3 {
            h.reply("OK:ACK:1");
            assert!(!h.session.is_done());
        }
        h.reply("OK:ACK:3");
        assert!(h.session.is_done());
        assert_eq!(h.printed(), "1\ta\n2\tb\n3\tc\n");
    }

    #[test]
    fn a_reply_out_of_step_drops_the_connection_and_keeps_the_acks() {
        let mut h = Harness::new(&options(true, None, 1));
        h.sends(true);
        h.reply("MSG:1:a");
        assert_eq!(h.sends(true), "ACK:1\nGET\n");
        assert!(matches!(h.reply("MSG:2:b"), Step::Reconnect(_)));
        let Harness {
            session,
            mut progress,
            ..
        } = h;
        progress.unconfirmed = session.into_unconfirmed();
        assert_eq!(progress.unconfirmed, vec![1]);
        // The next connection acknowledges it again first.
        let mut session = Session::new(&options(true, None, 1), &mut progress);
        let mut wire = Vec::new();
        session.queue_requests(&progress, true, &mut wire);
        assert_eq!(wire, b"ACK:1\nGET\n");
    }

    #[test]
    fn heartbeat_replies_are_matched_in_order() {
        let mut h = Harness::new(&options(false, None, 1));
        h.sends(true);
        h.session.heartbeat_sent();
        assert_eq!(h.reply("ERROR:No messages available"), Step::Continue);
        assert!(h.session.replies_due());
        assert_eq!(h.reply("OK:HEARTBEAT"), Step::Continue);
        assert!(!h.session.replies_due());
        assert!(matches!(h.reply("ERROR:Idle timeout"), Step::Reconnect(_)));
        assert!(h.progress.heartbeat < client::DEFAULT_HEARTBEAT);
    }
}
