//! `consumer --to-nats`: forwards our broker's queue into a NATS JetStream
//! stream, exactly once. It registers in ack mode, publishes each message
//! with `HPUB` and the header `Nats-Msg-Id: <instance>-<msg_id>` (the
//! broker's stable instance id, from `STATS`), and acknowledges a message
//! to our broker only once JetStream's PubAck said it is stored
//! (`"duplicate":true` counts: it was stored before).
//!
//! Exactly once rests on two things. Within the stream's duplicate window
//! JetStream drops a repeated `Nats-Msg-Id` itself. Beyond it, at the
//! start of every connection cycle the forwarder reads the last message
//! stored on its subject (`$JS.API.STREAM.MSG.GET` with `last_by_subj`),
//! takes the message id out of its `Nats-Msg-Id`, and skips (acking to our
//! broker) every message at or below it: a broker redelivers from its last
//! saved floor after a crash, in order, so everything at or below the last
//! stored id is already in the stream. Publishes go out in id order on one
//! connection and JetStream stores them in that order, so the stream
//! never has a gap below its last message.
//!
//! The shape follows `consumer.rs`: [`Pipeline`] decides (which `GET`s,
//! `ACK`s and `HPUB`s to send, what a reply means) and does no I/O, with
//! table-driven tests; the rest is a thin shell. The shell runs one
//! *cycle* per pair of connections (broker and NATS): connect both, make
//! sure the stream exists and covers the subject, read where to resume,
//! then pump. Any loss on either side ends the cycle; both connections are
//! dropped (our broker then takes back what was unacknowledged) and the
//! next cycle starts after a backoff with jitter. During a cycle one
//! thread does all the I/O: it writes what the pipeline queued for each
//! side, waits in `poll(2)` until either socket has bytes (or a tick
//! passes, for the timers), and feeds what it reads to the pipeline
//! straight from its read buffers. (It used two reader threads and a
//! channel before; one thread with `poll` spends about a quarter less CPU
//! per message, with a third of the context switches, measured: CPU that
//! nats-server and the broker, on a small board, can use.)
//!
//! It deliberately does not batch publishes into one JetStream request
//! (there is no such API), keep state on disk (the stream and our broker
//! hold all of it), or speak TLS (run a NATS leaf node beside it).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::client::{self, Backoff, Endpoint};
use crate::nats::{self, Auth, Json, Msg, Op};
use crate::protocol::{self, Command, ErrorCode, Line, LineReader, Reply};
use crate::sys::os;

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// Our broker.
    pub endpoint: Endpoint,
    /// The consumer id (ack mode) whose cursor the forwarder moves.
    pub id: String,
    pub nats: nats::Url,
    /// A file holding the NATS token (`--nats-token-file`).
    pub token_file: Option<PathBuf>,
    pub subject: String,
    pub stream: String,
    /// Publishes (and `GET`s) in flight at most.
    pub window: usize,
    pub retries: Option<u32>,
    pub heartbeat: Duration,
    /// `--count`: stop once this many messages are in the stream and
    /// acknowledged to our broker (forwarded, or found there already).
    pub count: Option<u64>,
}

/// Default `--window`.
pub const DEFAULT_WINDOW: usize = 256;
/// The duplicate window of a stream the forwarder creates: JetStream's
/// own default, and what the issue asks as a floor.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// A PING to NATS after this long without hearing from it...
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// ...and the connection is taken for dead when this many go unanswered.
pub const MAX_PINGS_OUT: u32 = 2;
/// How long the oldest publish may wait for its PubAck while the server
/// still answers PINGs (a stream without a leader, a stalled store)
/// before the connection is dropped and the publishes retried.
pub const PUBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one JetStream API request (or the handshake) may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// On SIGINT/SIGTERM: how long to wait for the PubAcks in flight, and then
/// for our broker to confirm the acks.
pub const STOP_WAIT: Duration = Duration::from_secs(5);
/// A cycle that lasts this long counts as a success for the backoff even
/// when it moved nothing (an idle forwarder whose server restarted).
const HEALTHY_CYCLE: Duration = Duration::from_secs(10);
/// Longest time the main loop sleeps without looking at its timers and
/// the stop flag.
const TICK: Duration = Duration::from_millis(100);

/// A request to our broker whose reply is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Get,
    Ack,
    Heartbeat,
}

/// What a cycle should do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Drop both connections and start a new cycle after a backoff.
    Reconnect(String),
    /// Give up: one line on stderr, exit 1.
    Fatal(String),
}

/// What outlives a cycle.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    /// Messages JetStream acknowledged as newly stored.
    pub forwarded: u64,
    /// Messages JetStream acknowledged as duplicates (within its window).
    pub duplicates: u64,
    /// Redelivered messages skipped because the stream already held them.
    pub skipped: u64,
    /// The highest message id known to be in the stream.
    pub stored: u64,
    /// The broker instance `stored` belongs to.
    pub instance: String,
}

impl Totals {
    /// Messages in the stream and acknowledged (or about to be) to our
    /// broker: forwarded, dropped by JetStream as duplicates, or skipped
    /// because the stream held them.
    pub fn settled(&self) -> u64 {
        self.forwarded + self.duplicates + self.skipped
    }
}

/// One cycle's conversation with both sides, apart from the sockets.
pub struct Pipeline {
    window: usize,
    /// `<instance>-`, the prefix of every `Nats-Msg-Id`.
    id_prefix: Vec<u8>,
    subject: String,
    /// `_INBOX.<random>.`: PubAck replies come to this plus the sequence
    /// modulo `reply_slots`.
    inbox: String,
    /// Distinct reply subjects, 2 x window: more than can be in flight, so
    /// each publish in flight has its own, and few enough that the server's
    /// subject cache keeps them (a fresh subject per publish costs
    /// nats-server about a quarter more CPU per message, measured).
    reply_slots: u64,
    due: VecDeque<Request>,
    gets_due: usize,
    acks_due: usize,
    /// Our broker said `No messages available` last (and no NOTIFY or
    /// message came since): wait for a NOTIFY.
    drained: bool,
    /// A `GET` found nothing while messages of ours were unacknowledged:
    /// the broker may have been at `--max-ack-pending`, so ask once more
    /// when they are acknowledged.
    probe: bool,
    /// Publishes whose PubAck is due, oldest first: (sequence, message id).
    in_flight: VecDeque<(u64, u64)>,
    /// Messages taken from our broker, to publish once the window has
    /// room: (message id, content).
    ready: VecDeque<(u64, Vec<u8>)>,
    next_sequence: u64,
    /// The highest message id made ready in this cycle.
    newest_taken: u64,
    /// Scratch for one publish's reply subject and `Nats-Msg-Id`, kept to
    /// spare two allocations per message.
    reply: Vec<u8>,
    msg_id: Vec<u8>,
    /// Ids stored in JetStream, to acknowledge to our broker.
    to_ack: Vec<u64>,
    stopping: bool,
    /// `--count`: messages to settle in all (across cycles) before stopping.
    limit: Option<u64>,
    pub totals: Totals,
}

impl Pipeline {
    /// A pipeline that resumes after `totals.stored`.
    pub fn new(
        window: usize,
        instance: &str,
        subject: &str,
        inbox: &str,
        totals: Totals,
    ) -> Pipeline {
        Pipeline {
            window: window.max(1),
            id_prefix: format!("{instance}-").into_bytes(),
            subject: subject.to_string(),
            inbox: format!("{inbox}."),
            reply_slots: 2 * window.max(1) as u64,
            due: VecDeque::new(),
            gets_due: 0,
            acks_due: 0,
            drained: false,
            probe: false,
            in_flight: VecDeque::new(),
            ready: VecDeque::new(),
            next_sequence: 1,
            newest_taken: 0,
            reply: Vec::new(),
            msg_id: Vec::new(),
            to_ack: Vec::new(),
            stopping: false,
            limit: None,
            totals,
        }
    }

    /// Stops once `count` messages in all (these totals included) are
    /// settled, and never takes more than that from our broker.
    pub fn with_limit(mut self, count: Option<u64>) -> Pipeline {
        self.limit = count;
        self.check_limit();
        self
    }

    /// Stops taking once the `--count` is reached.
    fn check_limit(&mut self) {
        if self
            .limit
            .is_some_and(|limit| self.totals.settled() >= limit)
        {
            self.stopping = true;
        }
    }

    /// Whether the pipeline stopped taking (a signal or `--count`).
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Queues in `wire` what our broker should get now: the acks of what
    /// JetStream stored, then `GET`s up to the window.
    pub fn queue_broker(&mut self, wire: &mut Vec<u8>) {
        for id in std::mem::take(&mut self.to_ack) {
            protocol::encode_request(wire, &Command::Ack(id));
            self.due.push_back(Request::Ack);
            self.acks_due += 1;
        }
        if self.stopping {
            return;
        }
        // Up to a window of publishes in flight, and as many GETs again
        // on their way, so that JetStream always has a full window while
        // the broker's round trip overlaps it. Messages taken and not
        // acknowledged stay under 2 x window (below the broker's default
        // --max-ack-pending, 1000, for the default window).
        let busy = self.gets_due + self.in_flight.len() + self.ready.len();
        let mut gets = if self.drained {
            0
        } else {
            (2 * self.window)
                .saturating_sub(busy)
                .min(self.window.saturating_sub(self.gets_due))
        };
        if self.drained && self.probe && self.gets_due == 0 && self.unacked() == 0 {
            gets = 1;
            self.probe = false;
        }
        if let Some(limit) = self.limit {
            // Never take a message the count has no room for.
            let taken = self.totals.settled() + (self.in_flight.len() + self.ready.len()) as u64;
            let room = limit.saturating_sub(taken + self.gets_due as u64);
            gets = gets.min(usize::try_from(room).unwrap_or(usize::MAX));
        }
        for _ in 0..gets {
            protocol::encode_request(wire, &Command::Get);
            self.due.push_back(Request::Get);
            self.gets_due += 1;
        }
    }

    /// Messages taken from our broker and not yet acknowledged to it.
    fn unacked(&self) -> usize {
        self.in_flight.len() + self.ready.len() + self.to_ack.len() + self.acks_due
    }

    /// A heartbeat went out to our broker.
    pub fn heartbeat_sent(&mut self) {
        self.due.push_back(Request::Heartbeat);
    }

    /// Whether replies from our broker are due.
    pub fn broker_replies_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// Stops taking messages; what is in flight still completes.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// Stopping, and nothing left in flight on either side.
    pub fn settled(&self) -> bool {
        self.stopping
            && self.in_flight.is_empty()
            && self.ready.is_empty()
            && self.to_ack.is_empty()
            && self.acks_due == 0
    }

    /// PubAcks due.
    pub fn publishes_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn answer(&mut self, kind: Request, line: &[u8]) -> Result<(), Verdict> {
        if self.due.front() != Some(&kind) {
            return Err(Verdict::Reconnect(format!(
                "out of step with the broker: '{}' in reply to {:?}",
                String::from_utf8_lossy(line),
                self.due.front()
            )));
        }
        self.due.pop_front();
        match kind {
            Request::Get => self.gets_due -= 1,
            Request::Ack => self.acks_due -= 1,
            Request::Heartbeat => {}
        }
        Ok(())
    }

    /// One line from our broker.
    pub fn on_broker_line(&mut self, line: &[u8]) -> Verdict {
        let result = match protocol::parse_reply(line) {
            Reply::Notify(_) => {
                self.drained = false;
                Ok(())
            }
            Reply::Msg { id, content } => self.answer(Request::Get, line).map(|()| {
                self.drained = false;
                self.on_message(id, content);
            }),
            Reply::Error(Some(ErrorCode::NoMessages), _) => {
                self.answer(Request::Get, line).map(|()| {
                    self.drained = true;
                    self.probe = self.unacked() > 0;
                })
            }
            Reply::Acked(_) => self.answer(Request::Ack, line),
            // Acknowledged already (a redelivery acked twice): harmless.
            Reply::Error(Some(ErrorCode::UnknownMessageId), _) => self.answer(Request::Ack, line),
            Reply::Heartbeat => self.answer(Request::Heartbeat, line),
            Reply::Error(_, text) => Err(Verdict::Reconnect(format!(
                "the broker refused: {}",
                String::from_utf8_lossy(text)
            ))),
            _ => Err(Verdict::Reconnect(format!(
                "unexpected line from the broker: '{}'",
                String::from_utf8_lossy(line)
            ))),
        };
        result.err().unwrap_or(Verdict::Continue)
    }

    /// A message from our broker: skip it if the stream has it, ignore it
    /// if it is on its way already (the ack wait passed and the broker sent
    /// it again; the PubAck due will acknowledge it), else make it ready.
    fn on_message(&mut self, id: u64, content: &[u8]) {
        if self.stopping {
            // Not published and not acknowledged: our broker keeps it.
            return;
        }
        if id <= self.totals.stored {
            self.totals.skipped += 1;
            self.to_ack.push(id);
            self.check_limit();
            return;
        }
        // The broker hands out ids in order, so a new message is almost
        // always above every one taken; only a redelivery needs the look
        // through what is on its way (up to 2 x window entries).
        let on_its_way = id <= self.newest_taken
            && (self.in_flight.iter().any(|&(_, pending)| pending == id)
                || self.ready.iter().any(|(pending, _)| *pending == id));
        if !on_its_way {
            self.newest_taken = self.newest_taken.max(id);
            self.ready.push_back((id, content.to_vec()));
        }
    }

    /// Queues in `wire` the `HPUB`s the window has room for, in id order
    /// of arrival, each with its own reply subject on our inbox.
    pub fn queue_nats(&mut self, wire: &mut Vec<u8>) {
        while self.in_flight.len() < self.window {
            let Some((id, content)) = self.ready.pop_front() else {
                break;
            };
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            self.reply.clear();
            self.reply.extend_from_slice(self.inbox.as_bytes());
            protocol::push_u64(&mut self.reply, sequence % self.reply_slots);
            self.msg_id.clear();
            self.msg_id.extend_from_slice(&self.id_prefix);
            protocol::push_u64(&mut self.msg_id, id);
            nats::push_hpub_with_id(wire, &self.subject, &self.reply, &self.msg_id, &content);
            self.in_flight.push_back((sequence, id));
        }
    }

    /// A message on our inbox: the PubAck of the oldest publish in flight.
    pub fn on_puback(&mut self, msg: &Msg) -> Verdict {
        let sequence = msg
            .subject
            .strip_prefix(self.inbox.as_bytes())
            .and_then(protocol::parse_u64);
        let Some(&(expected, id)) = self.in_flight.front() else {
            return Verdict::Continue; // a late reply from before a stop: nothing waits for it
        };
        if sequence != Some(expected % self.reply_slots) {
            return Verdict::Reconnect(format!(
                "PubAck out of order: for {} while {expected} was due",
                String::from_utf8_lossy(&msg.subject)
            ));
        }
        if let Some(status) = msg.headers.as_deref().and_then(nats::header_status) {
            // 503: no responders, the stream is not there (yet); retry.
            return Verdict::Reconnect(format!("publish answered with status {status}"));
        }
        let duplicate = match nats::quick_puback(&msg.payload) {
            Some(duplicate) => duplicate,
            None => match self.puback_json(&msg.payload) {
                Ok(duplicate) => duplicate,
                Err(verdict) => return verdict,
            },
        };
        self.in_flight.pop_front();
        if duplicate {
            self.totals.duplicates += 1;
        } else {
            self.totals.forwarded += 1;
        }
        self.totals.stored = self.totals.stored.max(id);
        self.to_ack.push(id);
        self.check_limit();
        Verdict::Continue
    }

    /// A PubAck the quick reader did not take: whether it says duplicate,
    /// or what its error means.
    fn puback_json(&self, payload: &[u8]) -> Result<bool, Verdict> {
        let Some(json) = Json::parse(payload) else {
            return Err(Verdict::Reconnect(format!(
                "PubAck is not JSON: '{}'",
                String::from_utf8_lossy(payload)
            )));
        };
        if let Some(error) = json.get("error") {
            return Err(api_error_verdict("publish", error));
        }
        Ok(json.get("duplicate").and_then(Json::as_bool) == Some(true))
    }
}

/// A JetStream API error (`{"code":…,"err_code":…,"description":…}`):
/// server-side trouble (5xx) may pass, so retry; anything else (no such
/// stream, a wrong configuration, a limit) will not, so give up.
fn api_error_verdict(what: &str, error: &Json) -> Verdict {
    let code = error.get("code").and_then(Json::as_u64).unwrap_or(0);
    let err_code = error.get("err_code").and_then(Json::as_u64).unwrap_or(0);
    let description = error
        .get("description")
        .and_then(Json::as_str)
        .unwrap_or("no description");
    let text =
        format!("JetStream refused the {what}: {description} (code {code}, err_code {err_code})");
    if code >= 500 {
        Verdict::Reconnect(text)
    } else {
        Verdict::Fatal(text)
    }
}

/// A `-ERR` from the NATS server: authorization and permission errors and
/// an oversized payload will not pass by retrying; the rest (stale
/// connection, slow consumer, too many connections) may.
pub fn server_error_verdict(text: &str) -> Verdict {
    let lower = text.to_ascii_lowercase();
    let permanent = [
        "authorization",
        "authentication",
        "permissions",
        "maximum payload",
        "user authentication",
    ]
    .iter()
    .any(|word| lower.contains(word));
    let text = format!("the NATS server said -ERR '{text}'");
    if permanent {
        Verdict::Fatal(text)
    } else {
        Verdict::Reconnect(text)
    }
}

/// The message id in a `Nats-Msg-Id` value `<instance>-<id>`, if it is
/// this instance's.
pub fn own_message_id(value: &[u8], instance: &str) -> Option<u64> {
    value
        .strip_prefix(instance.as_bytes())
        .and_then(|rest| rest.strip_prefix(b"-"))
        .and_then(protocol::parse_u64)
}

/// Runs the forwarder until SIGINT/SIGTERM; returns the exit status.
pub fn run(options: &ForwardOptions) -> i32 {
    let started = Instant::now();
    if let Err(err) = os::block_termination_signals() {
        eprintln!("consumer: cannot block SIGINT/SIGTERM: {err}");
        return 1;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let signals = {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        std::thread::Builder::new()
            .name("signals".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some(signal) = os::wait_termination(Duration::from_millis(200)) {
                        eprintln!("consumer: {signal}: finishing the publishes in flight");
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
    };
    let mut totals = Totals::default();
    let status = match &signals {
        Ok(_) => forward(options, &stop, &mut totals),
        Err(err) => Err(format!("cannot start the signal thread: {err}")),
    };
    let elapsed = started.elapsed();
    // The signal thread waits in slices of 200 ms; it is not joined (it
    // holds nothing, and the process exit ends it), so the exit does not
    // wait for its slice to end.
    done.store(true, Ordering::Relaxed);
    drop(signals);
    let code = match status {
        Ok(()) => 0,
        Err(why) => {
            eprintln!("consumer: {why}");
            1
        }
    };
    summary(&totals, elapsed);
    code
}

fn summary(totals: &Totals, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    let moved = totals.forwarded + totals.duplicates;
    eprintln!(
        "consumer: forwarded {}, duplicates skipped {} ({} already in the stream, {} dropped by JetStream), \
         elapsed {seconds:.3} s, {:.0} msgs/s",
        totals.forwarded,
        totals.skipped + totals.duplicates,
        totals.skipped,
        totals.duplicates,
        moved as f64 / seconds.max(1e-9)
    );
}

/// Cycles until stopped (`Ok`) or a permanent error; `totals` keeps
/// what was done either way, for the summary.
fn forward(options: &ForwardOptions, stop: &AtomicBool, totals: &mut Totals) -> Result<(), String> {
    let auth = auth(options)?;
    let mut backoff = Backoff::new(options.retries);
    while !stop.load(Ordering::Relaxed) {
        let verdict = match cycle(options, &auth, stop, totals, &mut backoff) {
            Ok(()) => return Ok(()),
            Err(verdict) => verdict,
        };
        let why = match verdict {
            Verdict::Fatal(why) => return Err(why),
            Verdict::Reconnect(why) => why,
            Verdict::Continue => "cycle ended".into(),
        };
        let Some(wait) = backoff.next_wait() else {
            return Err(format!(
                "giving up after {} attempts: {why}",
                backoff.attempts()
            ));
        };
        eprintln!("consumer: {why}; reconnecting in {} ms", wait.as_millis());
        let until = Instant::now() + wait;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
        }
    }
    Ok(())
}

/// The credentials: the token file wins over a user in the URL.
fn auth(options: &ForwardOptions) -> Result<Auth, String> {
    if let Some(path) = &options.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read --nats-token-file {}: {err}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("--nats-token-file {} is empty", path.display()));
        }
        return Ok(Auth::Token(token.to_string()));
    }
    Ok(match (&options.nats.user, &options.nats.pass) {
        (Some(user), Some(pass)) => Auth::UserPass(user.clone(), pass.clone()),
        _ => Auth::None,
    })
}

/// 64 random bits as hex, for the inbox (never reused across cycles, so a
/// late PubAck of an old cycle is never taken for a new one's).
fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:016x}",
        u64::from_le_bytes(bytes) ^ nanos ^ u64::from(std::process::id())
    )
}

/// One pair of connections, from connecting to losing one of them (`Err`)
/// or a clean stop (`Ok`).
fn cycle(
    options: &ForwardOptions,
    auth: &Auth,
    stop: &AtomicBool,
    totals: &mut Totals,
    backoff: &mut Backoff,
) -> Result<(), Verdict> {
    let (broker, instance) = BrokerWire::connect(options)?;
    eprintln!(
        "consumer: connected to the broker at {} as consumer {} (ack mode), broker instance {instance}",
        options.endpoint, options.id
    );
    let mut nats = NatsWire::connect(&options.nats, auth, &options.id)?;
    let inbox = format!("_INBOX.{}", random_hex());
    let mut sub = Vec::new();
    nats::push_sub(&mut sub, &format!("{inbox}.>"), 1);
    nats.write(&sub)?;
    ensure_stream(&mut nats, options, &inbox)?;
    let last = last_stored(&mut nats, options, &inbox, &instance)?;
    eprintln!(
        "consumer: resuming after id {last} (the last message of ours on {} in stream {})",
        options.subject, options.stream
    );
    if totals.instance != instance {
        // Another broker (its files replaced): its ids are its own, so
        // what the last one stored says nothing about them.
        if !totals.instance.is_empty() {
            eprintln!(
                "consumer: warning: the broker's instance changed from {} to {instance}",
                totals.instance
            );
        }
        totals.instance = instance.clone();
        totals.stored = 0;
    }
    totals.stored = totals.stored.max(last);
    let (started, settled_before) = (Instant::now(), totals.settled());
    let mut pipeline = Pipeline::new(
        options.window,
        &instance,
        &options.subject,
        &inbox,
        totals.clone(),
    )
    .with_limit(options.count);
    let outcome = pump_and_close(&mut pipeline, broker, nats, options, stop);
    *totals = pipeline.totals.clone();
    // A cycle that moved messages, or held for a while, was a success: the
    // next loss starts the backoff afresh. One that failed at once (a
    // stream that refuses every publish, say) lets it grow, so that a
    // lasting refusal is retried every few seconds, not every 100 ms.
    if totals.settled() > settled_before || started.elapsed() >= HEALTHY_CYCLE {
        backoff.reset();
    }
    outcome
}

/// Pumps, then on a clean stop says goodbye to the broker; both
/// connections close as the wires are dropped.
fn pump_and_close(
    pipeline: &mut Pipeline,
    mut broker: BrokerWire,
    mut nats: NatsWire,
    options: &ForwardOptions,
    stop: &AtomicBool,
) -> Result<(), Verdict> {
    let outcome = pump(pipeline, &mut broker, &mut nats, options.heartbeat, stop);
    let mut last = Vec::new();
    if outcome.is_err() {
        // The cycle ends on an error, maybe in the same read as PubAcks
        // that came before it: acknowledge what JetStream stored, if the
        // broker still listens, so it is not delivered again for nothing.
        pipeline.stop();
        pipeline.queue_broker(&mut last);
    } else {
        protocol::encode_request(&mut last, &Command::Quit);
    }
    let _ = broker.stream.write_all(&last);
    outcome
}

/// Timers of one cycle's pump.
struct Clocks {
    nats_heard: Instant,
    pinged: Instant,
    pings_out: u32,
    /// The last PubAck, or when the window was last empty.
    puback_heard: Instant,
    broker_heard: Instant,
    broker_sent: Instant,
    stop_by: Option<Instant>,
}

/// Moves messages until a connection is lost (`Err`) or, once `stop` is
/// set or `--count` reached, the publishes in flight are acknowledged
/// (`Ok`). One thread: it writes what the pipeline queued, then waits in
/// `poll(2)` until either socket has something to read (or a tick passes,
/// for the timers and the stop flag), and reads from the ones that do.
/// Both sockets stay blocking: `poll` said there are bytes, so a read
/// returns at once with what is there.
fn pump(
    pipeline: &mut Pipeline,
    broker: &mut BrokerWire,
    nats: &mut NatsWire,
    heartbeat: Duration,
    stop: &AtomicBool,
) -> Result<(), Verdict> {
    let now = Instant::now();
    let mut clocks = Clocks {
        nats_heard: now,
        pinged: now,
        pings_out: 0,
        puback_heard: now,
        broker_heard: now,
        broker_sent: now,
        stop_by: None,
    };
    let (mut to_broker, mut to_nats) = (
        Vec::with_capacity(64 * 1024),
        Vec::with_capacity(256 * 1024),
    );
    // A bound on each read, should `poll` ever report a socket ready that
    // has nothing after all; the requests before left shorter ones.
    for stream in [&broker.stream, &nats.stream] {
        stream
            .set_read_timeout(Some(API_TIMEOUT))
            .map_err(|err| Verdict::Reconnect(err.to_string()))?;
    }
    loop {
        if (stop.load(Ordering::Relaxed) || pipeline.stopping()) && clocks.stop_by.is_none() {
            if !stop.load(Ordering::Relaxed) {
                eprintln!("consumer: --count reached: finishing the publishes in flight");
            }
            pipeline.stop();
            clocks.stop_by = Some(Instant::now() + STOP_WAIT);
        }
        if let Some(by) = clocks.stop_by
            && (pipeline.settled() || Instant::now() >= by)
        {
            return Ok(());
        }
        let was_awaiting = pipeline.broker_replies_due();
        pipeline.queue_nats(&mut to_nats);
        pipeline.queue_broker(&mut to_broker);
        if !was_awaiting && pipeline.broker_replies_due() {
            // Nothing was awaited until now: the reply clock starts here,
            // not at the last word the broker said before a quiet spell.
            clocks.broker_heard = Instant::now();
        }
        timers(
            pipeline,
            &mut clocks,
            heartbeat,
            &mut to_broker,
            &mut to_nats,
        )?;
        flush(&mut clocks, broker, nats, &mut to_broker, &mut to_nats)?;
        let [from_broker, from_nats] = os::wait_readable([&broker.stream, &nats.stream], TICK)
            .map_err(|err| Verdict::Reconnect(format!("poll: {err}")))?;
        if from_broker {
            clocks.broker_heard = Instant::now();
            broker.read_lines(|line| pipeline.on_broker_line(line))?;
        }
        if from_nats {
            clocks.nats_heard = Instant::now();
            clocks.pings_out = 0;
            nats.read_ops(|op| on_nats_op(pipeline, op, &mut clocks, &mut to_nats))?;
        }
    }
}

/// Writes what is queued for each side.
fn flush(
    clocks: &mut Clocks,
    broker: &mut BrokerWire,
    nats: &mut NatsWire,
    to_broker: &mut Vec<u8>,
    to_nats: &mut Vec<u8>,
) -> Result<(), Verdict> {
    let io_error = |side: &str, err: io::Error| Verdict::Reconnect(format!("lost {side}: {err}"));
    if !to_nats.is_empty() {
        nats.stream
            .write_all(to_nats)
            .map_err(|err| io_error("NATS", err))?;
        to_nats.clear();
    }
    if !to_broker.is_empty() {
        broker
            .stream
            .write_all(to_broker)
            .map_err(|err| io_error("the broker", err))?;
        to_broker.clear();
        clocks.broker_sent = Instant::now();
    }
    Ok(())
}

/// One operation from the NATS server.
fn on_nats_op(
    pipeline: &mut Pipeline,
    op: Op,
    clocks: &mut Clocks,
    to_nats: &mut Vec<u8>,
) -> Verdict {
    match op {
        Op::Msg(msg) => {
            clocks.puback_heard = clocks.nats_heard;
            pipeline.on_puback(&msg)
        }
        Op::Ping => {
            to_nats.extend_from_slice(b"PONG\r\n");
            Verdict::Continue
        }
        Op::Err(text) => server_error_verdict(&text),
        Op::Info(_) | Op::Pong | Op::Ok => Verdict::Continue,
    }
}

/// PINGs to NATS and heartbeats to our broker while quiet; a side that
/// stays silent too long is taken for dead.
fn timers(
    pipeline: &mut Pipeline,
    clocks: &mut Clocks,
    heartbeat: Duration,
    to_broker: &mut Vec<u8>,
    to_nats: &mut Vec<u8>,
) -> Result<(), Verdict> {
    let now = Instant::now();
    if now.duration_since(clocks.nats_heard) >= PING_INTERVAL
        && now.duration_since(clocks.pinged) >= PING_INTERVAL
    {
        if clocks.pings_out >= MAX_PINGS_OUT {
            return Err(Verdict::Reconnect(format!(
                "the NATS server did not answer {MAX_PINGS_OUT} PINGs"
            )));
        }
        to_nats.extend_from_slice(b"PING\r\n");
        clocks.pings_out += 1;
        clocks.pinged = now;
    }
    if pipeline.publishes_in_flight() == 0 {
        clocks.puback_heard = now;
    } else if now.duration_since(clocks.puback_heard) >= PUBACK_TIMEOUT {
        return Err(Verdict::Reconnect(format!(
            "no PubAck from JetStream in {} s",
            PUBACK_TIMEOUT.as_secs()
        )));
    }
    if pipeline.broker_replies_due()
        && now.duration_since(clocks.broker_heard) >= client::REPLY_TIMEOUT
    {
        return Err(Verdict::Reconnect(
            "no reply from the broker in time".into(),
        ));
    }
    if now.duration_since(clocks.broker_sent) >= heartbeat {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        protocol::encode_request(to_broker, &Command::Heartbeat(unix));
        if !pipeline.broker_replies_due() {
            clocks.broker_heard = now;
        }
        pipeline.heartbeat_sent();
    }
    Ok(())
}

/// Connects a TCP stream to `host:port` within [`client::CONNECT_TIMEOUT`].
fn connect_tcp(host: &str, port: u16, what: &str) -> Result<TcpStream, Verdict> {
    let fail = |err: io::Error| {
        Verdict::Reconnect(format!("cannot connect to {what} at {host}:{port}: {err}"))
    };
    let mut last = None;
    for address in (host, port).to_socket_addrs().map_err(fail)? {
        match TcpStream::connect_timeout(&address, client::CONNECT_TIMEOUT) {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(fail)?;
                stream
                    .set_write_timeout(Some(client::REPLY_TIMEOUT))
                    .map_err(fail)?;
                return Ok(stream);
            }
            Err(err) => last = Some(err),
        }
    }
    Err(fail(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no address")
    })))
}

/// Our broker's side of a cycle.
struct BrokerWire {
    stream: TcpStream,
    reader: LineReader,
}

impl BrokerWire {
    /// Connects, registers in ack mode and reads the broker's instance id.
    fn connect(options: &ForwardOptions) -> Result<(BrokerWire, String), Verdict> {
        let endpoint = &options.endpoint;
        let stream = connect_tcp(&endpoint.host, endpoint.port, "the broker")?;
        let mut wire = BrokerWire {
            stream,
            reader: LineReader::new(client::MAX_REPLY_LINE, 64 * 1024),
        };
        // A broker with --auth-token-file wants AUTH first, every cycle.
        if let Some(token) = &endpoint.token {
            let reply = wire.request(&Command::Auth(token.bytes()))?;
            if protocol::parse_reply(&reply) != Reply::Auth {
                return Err(Verdict::Fatal(format!(
                    "the broker refused the token of --token-file/BROKER_TOKEN_FILE ('{}')",
                    String::from_utf8_lossy(&reply)
                )));
            }
        }
        let register = Command::RegisterConsumer {
            id: Some(options.id.as_bytes()),
            ack: true,
        };
        let reply = wire.request(&register)?;
        match protocol::parse_reply(&reply) {
            Reply::Consumer(_) => {}
            Reply::Error(Some(ErrorCode::InvalidRegistration), _) => {
                return Err(Verdict::Fatal(format!(
                    "the broker refused ack mode for '{}': an id keeps the mode it was created in \
                     (was it created without --ack?)",
                    options.id
                )));
            }
            _ => {
                return Err(Verdict::Reconnect(format!(
                    "registration answered '{}'",
                    String::from_utf8_lossy(&reply)
                )));
            }
        }
        let stats = wire.request(&Command::Stats)?;
        let instance = match protocol::parse_reply(&stats) {
            Reply::Stats(body) => protocol::stats_field(body, "instance"),
            _ => None,
        }
        .map(|id| String::from_utf8_lossy(id).into_owned())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            Verdict::Fatal(
                "the broker does not report its instance id: it is too old to forward from".into(),
            )
        })?;
        Ok((wire, instance))
    }

    /// Sends `command` and waits (bounded) for its reply, skipping
    /// NOTIFYs.
    fn request(&mut self, command: &Command<'_>) -> Result<Vec<u8>, Verdict> {
        let lost = |err: io::Error| Verdict::Reconnect(format!("lost the broker: {err}"));
        let mut request = Vec::new();
        protocol::encode_request(&mut request, command);
        self.stream.write_all(&request).map_err(lost)?;
        self.stream
            .set_read_timeout(Some(API_TIMEOUT))
            .map_err(lost)?;
        loop {
            while let Some(next) = self.reader.next_line() {
                let Line::Complete(range) = next else {
                    return Err(Verdict::Reconnect("reply line too long".into()));
                };
                let reply = self.reader.bytes(range).to_vec();
                if !matches!(protocol::parse_reply(&reply), Reply::Notify(_)) {
                    return Ok(reply);
                }
            }
            match self.stream.read(self.reader.spare()) {
                Ok(0) => return Err(lost(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.reader.filled(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(lost(err)),
            }
        }
    }

    /// One read (the caller's `poll` said there is something), then every
    /// complete line to `on_line`, straight from the read buffer; the
    /// first verdict other than `Continue` ends the cycle.
    fn read_lines(&mut self, mut on_line: impl FnMut(&[u8]) -> Verdict) -> Result<(), Verdict> {
        let lost = |why: String| Verdict::Reconnect(format!("lost the broker: {why}"));
        match self.stream.read(self.reader.spare()) {
            Ok(0) => return Err(lost("it closed the connection".into())),
            Ok(n) => self.reader.filled(n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(lost(err.to_string())),
        }
        while let Some(next) = self.reader.next_line() {
            let Line::Complete(range) = next else {
                return Err(lost("reply line too long".into()));
            };
            match on_line(self.reader.bytes(range)) {
                Verdict::Continue => {}
                verdict => return Err(verdict),
            }
        }
        Ok(())
    }
}

/// The NATS side of a cycle.
struct NatsWire {
    stream: TcpStream,
    buf: Vec<u8>,
    requests: u64,
}

impl NatsWire {
    /// Connects, reads INFO, sends CONNECT and a PING, and waits for the
    /// PONG: the server answers `-ERR` first if it refuses us.
    fn connect(url: &nats::Url, auth: &Auth, id: &str) -> Result<NatsWire, Verdict> {
        let stream = connect_tcp(&url.host, url.port, "NATS")?;
        let mut wire = NatsWire {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            requests: 0,
        };
        let deadline = Instant::now() + API_TIMEOUT;
        let Op::Info(info) = wire.next_op(deadline)? else {
            return Err(Verdict::Reconnect("NATS did not start with INFO".into()));
        };
        let info = Json::parse(&info).unwrap_or(Json::Null);
        if info.get("headers").and_then(Json::as_bool) != Some(true) {
            return Err(Verdict::Fatal(
                "the NATS server does not support headers (needs 2.2 or newer)".into(),
            ));
        }
        let mut hello = nats::connect_line(auth, &format!("mensajeria forwarder {id}"));
        hello.extend_from_slice(b"PING\r\n");
        wire.write(&hello)?;
        loop {
            match wire.next_op(deadline)? {
                Op::Pong => break,
                Op::Err(text) => return Err(server_error_verdict(&text)),
                Op::Ping => wire.write(b"PONG\r\n")?,
                _ => {}
            }
        }
        eprintln!(
            "consumer: connected to NATS at {}:{} (server {} {})",
            url.host,
            url.port,
            info.get("server_name")
                .and_then(Json::as_str)
                .unwrap_or("?"),
            info.get("version").and_then(Json::as_str).unwrap_or("?")
        );
        Ok(wire)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Verdict> {
        self.stream
            .write_all(bytes)
            .map_err(|err| Verdict::Reconnect(format!("lost NATS: {err}")))
    }

    /// The next operation, waiting until `deadline`.
    fn next_op(&mut self, deadline: Instant) -> Result<Op, Verdict> {
        let lost = |why: String| Verdict::Reconnect(format!("lost NATS: {why}"));
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((op, used)) =
                nats::parse_op(&self.buf).map_err(|err| lost(err.to_string()))?
            {
                self.buf.drain(..used);
                return Ok(op);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(lost("no answer in time".into()));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|err| lost(err.to_string()))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(lost("the server closed the connection".into())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(lost(err.to_string())),
            }
        }
    }

    /// A JetStream API request: publishes `payload` to `subject` with a
    /// reply subject of our inbox and waits for the answer's payload
    /// (parsed as JSON).
    fn request(&mut self, subject: &str, payload: &[u8], inbox: &str) -> Result<Json, Verdict> {
        self.requests += 1;
        let reply = format!("{inbox}.api.{}", self.requests);
        let mut out = Vec::new();
        nats::push_pub(&mut out, subject, &reply, payload);
        self.write(&out)?;
        let deadline = Instant::now() + API_TIMEOUT;
        loop {
            match self.next_op(deadline)? {
                Op::Msg(msg) if msg.subject == reply.as_bytes() => {
                    if msg.headers.as_deref().and_then(nats::header_status) == Some(503) {
                        return Err(Verdict::Reconnect(format!(
                            "no JetStream answers {subject} (no responders): is the server started with -js?"
                        )));
                    }
                    return Json::parse(&msg.payload).ok_or_else(|| {
                        Verdict::Reconnect(format!("{subject} answered with something not JSON"))
                    });
                }
                Op::Ping => self.write(b"PONG\r\n")?,
                Op::Err(text) => return Err(server_error_verdict(&text)),
                _ => {}
            }
        }
    }

    /// One read (the caller's `poll` said there is something), then every
    /// complete operation to `on_op`; the first verdict other than
    /// `Continue` ends the cycle.
    fn read_ops(&mut self, mut on_op: impl FnMut(Op) -> Verdict) -> Result<(), Verdict> {
        let lost = |why: String| Verdict::Reconnect(format!("lost NATS: {why}"));
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => return Err(lost("the server closed the connection".into())),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(lost(err.to_string())),
        }
        let mut used = 0;
        let mut outcome = Ok(());
        while let Some((op, n)) =
            nats::parse_op(&self.buf[used..]).map_err(|err| lost(err.to_string()))?
        {
            used += n;
            match on_op(op) {
                Verdict::Continue => {}
                verdict => {
                    outcome = Err(verdict);
                    break;
                }
            }
        }
        self.buf.drain(..used);
        outcome
    }
}

/// Makes sure the stream exists (creating it if not) and covers the
/// subject.
fn ensure_stream(
    nats: &mut NatsWire,
    options: &ForwardOptions,
    inbox: &str,
) -> Result<(), Verdict> {
    let stream = &options.stream;
    let info = nats.request(&nats::stream_api_subject("INFO", stream), b"", inbox)?;
    let info = match info.get("error") {
        Some(error) if error.get("err_code").and_then(Json::as_u64) == Some(10059) => {
            let created = create_stream(nats, options, inbox)?;
            eprintln!(
                "consumer: stream {stream} created (subject {}, file storage, duplicate window {} s)",
                options.subject,
                DUPLICATE_WINDOW.as_secs()
            );
            created
        }
        Some(error) => return Err(api_error_verdict("stream lookup", error)),
        None => info,
    };
    let subjects: Vec<&str> = info
        .path("config.subjects")
        .and_then(Json::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(Json::as_str)
        .collect();
    if !subjects
        .iter()
        .any(|pattern| nats::subject_matches(pattern, &options.subject))
    {
        return Err(Verdict::Fatal(format!(
            "stream {stream} does not cover subject {} (its subjects: {}); use another --stream or add the subject to it",
            options.subject,
            if subjects.is_empty() {
                "none".to_string()
            } else {
                subjects.join(", ")
            }
        )));
    }
    Ok(())
}

fn create_stream(
    nats: &mut NatsWire,
    options: &ForwardOptions,
    inbox: &str,
) -> Result<Json, Verdict> {
    let mut config = String::from("{\"name\":");
    nats::push_json_string(&mut config, &options.stream);
    config.push_str(",\"subjects\":[");
    nats::push_json_string(&mut config, &options.subject);
    config.push_str(&format!(
        "],\"retention\":\"limits\",\"storage\":\"file\",\"discard\":\"old\",\"num_replicas\":1,\
         \"max_msgs\":-1,\"max_bytes\":-1,\"max_age\":0,\"max_consumers\":-1,\"duplicate_window\":{}}}",
        DUPLICATE_WINDOW.as_nanos()
    ));
    let subject = nats::stream_api_subject("CREATE", &options.stream);
    let reply = nats.request(&subject, config.as_bytes(), inbox)?;
    match reply.get("error") {
        Some(error) => Err(api_error_verdict("stream creation", error)),
        None => Ok(reply),
    }
}

/// The message id of the last message of ours stored on the subject (0 if
/// none).
fn last_stored(
    nats: &mut NatsWire,
    options: &ForwardOptions,
    inbox: &str,
    instance: &str,
) -> Result<u64, Verdict> {
    let mut query = String::from("{\"last_by_subj\":");
    nats::push_json_string(&mut query, &options.subject);
    query.push('}');
    let subject = nats::msg_get_subject(&options.stream);
    let reply = nats.request(&subject, query.as_bytes(), inbox)?;
    match resume_point(&reply, instance)? {
        Resume::After(id) => Ok(id),
        Resume::Foreign(value) => {
            eprintln!(
                "consumer: warning: the last message on {} (Nats-Msg-Id '{value}') is not from this \
                 broker (instance {instance}); one subject per broker: relying on the duplicate window alone",
                options.subject
            );
            Ok(0)
        }
    }
}

/// Where to resume, from the answer to a `last_by_subj` read.
#[derive(Debug, PartialEq, Eq)]
enum Resume {
    /// Everything of ours up to this id is in the stream (0: nothing yet).
    After(u64),
    /// The last message is not ours (this `Nats-Msg-Id`, maybe empty).
    Foreign(String),
}

fn resume_point(reply: &Json, instance: &str) -> Result<Resume, Verdict> {
    if let Some(error) = reply.get("error") {
        // 10037: no message on that subject yet.
        if error.get("err_code").and_then(Json::as_u64) == Some(10037) {
            return Ok(Resume::After(0));
        }
        return Err(api_error_verdict("read of the last message", error));
    }
    let headers = reply
        .path("message.hdrs")
        .and_then(Json::as_str)
        .and_then(|text| nats::base64_decode(text.as_bytes()))
        .unwrap_or_default();
    let value = nats::header_value(&headers, "Nats-Msg-Id").unwrap_or_default();
    Ok(match own_message_id(value, instance) {
        Some(id) => Resume::After(id),
        None => Resume::Foreign(String::from_utf8_lossy(value).into_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INBOX: &str = "_INBOX.t";

    fn pipeline(window: usize, stored: u64) -> Pipeline {
        let totals = Totals {
            stored,
            ..Totals::default()
        };
        Pipeline::new(window, "ab12", "edge.a", INBOX, totals)
    }

    fn broker(p: &mut Pipeline) -> String {
        let mut wire = Vec::new();
        p.queue_broker(&mut wire);
        String::from_utf8(wire).unwrap()
    }

    /// Feeds broker lines; returns the HPUBs' message ids, in order.
    fn lines(p: &mut Pipeline, lines: &[&str]) -> Vec<String> {
        let mut nats = Vec::new();
        for line in lines {
            assert_eq!(
                p.on_broker_line(line.as_bytes()),
                Verdict::Continue,
                "{line}"
            );
        }
        p.queue_nats(&mut nats);
        let text = String::from_utf8(nats).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("Nats-Msg-Id: "))
            .map(str::to_string)
            .collect()
    }

    fn puback(sequence: u64, body: &str) -> Msg {
        Msg {
            subject: format!("{INBOX}.{sequence}").into_bytes(),
            sid: 1,
            reply: None,
            headers: None,
            payload: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn publishes_in_order_and_acks_only_after_the_puback() {
        let mut p = pipeline(3, 0);
        assert_eq!(broker(&mut p), "GET\nGET\nGET\n");
        assert_eq!(broker(&mut p), "", "a window of GETs is on its way");
        assert_eq!(lines(&mut p, &["MSG:1:a", "MSG:2:b"]), ["ab12-1", "ab12-2"]);
        assert_eq!(broker(&mut p), "GET\nGET\n", "GETs ahead of the publishes");
        assert_eq!(
            broker(&mut p),
            "",
            "two publishes and three GETs: 2 x window less one"
        );
        assert_eq!(
            p.on_puback(&puback(1, r#"{"stream":"S","seq":1}"#)),
            Verdict::Continue
        );
        assert_eq!(broker(&mut p), "ACK:1\n", "a window of GETs still due");
        assert_eq!(
            p.on_puback(&puback(2, r#"{"stream":"S","seq":2,"duplicate":true}"#)),
            Verdict::Continue
        );
        assert_eq!(broker(&mut p), "ACK:2\n");
        assert_eq!(
            (p.totals.forwarded, p.totals.duplicates, p.totals.stored),
            (1, 1, 2)
        );
    }

    #[test]
    fn publishes_never_exceed_the_window() {
        let mut p = pipeline(2, 0);
        assert_eq!(broker(&mut p), "GET\nGET\n");
        assert_eq!(lines(&mut p, &["MSG:1:a", "MSG:2:b"]), ["ab12-1", "ab12-2"]);
        assert_eq!(broker(&mut p), "GET\nGET\n");
        assert_eq!(
            lines(&mut p, &["MSG:3:c", "MSG:4:d"]),
            Vec::<String>::new(),
            "held back"
        );
        assert_eq!(p.publishes_in_flight(), 2);
        assert_eq!(broker(&mut p), "", "2 x window taken and not acknowledged");
        p.on_puback(&puback(1, "{}"));
        assert_eq!(lines(&mut p, &[]), ["ab12-3"]);
        assert_eq!(broker(&mut p), "ACK:1\nGET\n");
    }

    #[test]
    fn reply_subjects_cycle_over_twice_the_window() {
        let mut p = pipeline(1, 0);
        assert_eq!(broker(&mut p), "GET\n");
        let mut replies = vec!["MSG:1:x".to_string()];
        for id in 1..=3u64 {
            let lines_now: Vec<&str> = replies.iter().map(String::as_str).collect();
            assert_eq!(lines(&mut p, &lines_now), [format!("ab12-{id}")]);
            // Publish `id` went out with reply slot id % 2.
            let wrong = p.on_puback(&puback((id + 1) % 2, "{}"));
            assert!(matches!(wrong, Verdict::Reconnect(_)), "id {id}");
            assert_eq!(p.on_puback(&puback(id % 2, "{}")), Verdict::Continue);
            assert_eq!(broker(&mut p), format!("ACK:{id}\nGET\n"));
            replies = vec![format!("OK:ACK:{id}"), format!("MSG:{}:x", id + 1)];
        }
        assert_eq!(p.totals.stored, 3);
    }

    #[test]
    fn hpub_carries_the_content_byte_for_byte() {
        let mut p = pipeline(1, 0);
        broker(&mut p);
        let mut nats = Vec::new();
        p.on_broker_line(b"MSG:9:x:y \xff");
        p.queue_nats(&mut nats);
        assert!(nats.starts_with(b"HPUB edge.a _INBOX.t.1 "));
        assert!(nats.ends_with(b"Nats-Msg-Id: ab12-9\r\n\r\nx:y \xff\r\n"));
    }

    #[test]
    fn what_the_stream_holds_is_skipped_and_acked() {
        let mut p = pipeline(4, 5);
        broker(&mut p);
        assert_eq!(
            lines(&mut p, &["MSG:4:d", "MSG:5:e", "MSG:6:f"]),
            ["ab12-6"]
        );
        assert_eq!(p.totals.skipped, 2);
        assert_eq!(broker(&mut p), "ACK:4\nACK:5\nGET\nGET\nGET\n");
    }

    #[test]
    fn a_redelivery_of_a_publish_in_flight_waits_for_its_puback() {
        let mut p = pipeline(4, 0);
        broker(&mut p);
        assert_eq!(lines(&mut p, &["MSG:1:a", "MSG:1:a"]), ["ab12-1"]);
        p.on_puback(&puback(1, r#"{"seq":1}"#));
        assert_eq!(broker(&mut p), "ACK:1\nGET\nGET\n", "two GETs still due");
    }

    #[test]
    fn no_messages_waits_for_a_notify_and_probes_once_after_the_acks() {
        let mut p = pipeline(2, 0);
        broker(&mut p);
        lines(&mut p, &["MSG:1:a", "ERROR:No messages available"]);
        assert_eq!(broker(&mut p), "", "drained: wait");
        p.on_puback(&puback(1, r#"{"seq":1}"#));
        assert_eq!(
            broker(&mut p),
            "ACK:1\n",
            "no GET before the ack is confirmed"
        );
        lines(&mut p, &["OK:ACK:1"]);
        assert_eq!(
            broker(&mut p),
            "GET\n",
            "the broker may have been at its bound"
        );
        lines(&mut p, &["ERROR:No messages available"]);
        assert_eq!(broker(&mut p), "", "nothing unacked: wait for the NOTIFY");
        lines(&mut p, &["NOTIFY:MESSAGES_AVAILABLE:3"]);
        assert_eq!(broker(&mut p), "GET\nGET\n");
    }

    #[test]
    fn replies_are_matched_in_request_order() {
        let mut p = pipeline(1, 0);
        broker(&mut p);
        p.heartbeat_sent();
        assert!(matches!(
            p.on_broker_line(b"OK:HEARTBEAT"),
            Verdict::Reconnect(_)
        ));
        let mut p = pipeline(1, 0);
        broker(&mut p);
        for line in ["OK:ACK:3", "ERROR:Shutting down", "garbage"] {
            assert!(
                matches!(p.on_broker_line(line.as_bytes()), Verdict::Reconnect(_)),
                "{line}"
            );
        }
    }

    #[test]
    fn puback_errors_are_transient_or_permanent() {
        let cases = [
            (
                r#"{"error":{"code":503,"err_code":10008,"description":"temporarily unavailable"}}"#,
                false,
            ),
            (
                r#"{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}"#,
                true,
            ),
            ("not json", false),
        ];
        for (body, fatal) in cases {
            let mut p = pipeline(1, 0);
            broker(&mut p);
            lines(&mut p, &["MSG:1:a"]);
            let verdict = p.on_puback(&puback(1, body));
            assert_eq!(
                matches!(verdict, Verdict::Fatal(_)),
                fatal,
                "{body}: {verdict:?}"
            );
            assert_ne!(verdict, Verdict::Continue);
            assert!(!broker(&mut p).contains("ACK"), "{body}: nothing acked");
        }
        let mut p = pipeline(2, 0);
        broker(&mut p);
        lines(&mut p, &["MSG:1:a", "MSG:2:b"]);
        assert!(
            matches!(p.on_puback(&puback(2, "{}")), Verdict::Reconnect(_)),
            "out of order"
        );
        let mut status = puback(1, "");
        status.headers = Some(b"NATS/1.0 503\r\n\r\n".to_vec());
        assert!(
            matches!(p.on_puback(&status), Verdict::Reconnect(_)),
            "no responders"
        );
    }

    #[test]
    fn server_errors() {
        let cases = [
            ("Authorization Violation", true),
            ("Permissions Violation for Publish to \"edge.a\"", true),
            ("Maximum Payload Violation", true),
            ("Stale Connection", false),
            ("Slow Consumer", false),
        ];
        for (text, fatal) in cases {
            assert_eq!(
                matches!(server_error_verdict(text), Verdict::Fatal(_)),
                fatal,
                "{text}"
            );
        }
    }

    #[test]
    fn stop_waits_for_the_pubacks_in_flight_and_publishes_nothing_new() {
        let mut p = pipeline(3, 0);
        broker(&mut p);
        lines(&mut p, &["MSG:1:a"]);
        p.stop();
        assert!(!p.settled());
        assert_eq!(
            lines(&mut p, &["MSG:2:b"]),
            Vec::<String>::new(),
            "left to the broker"
        );
        p.on_puback(&puback(1, r#"{"seq":1}"#));
        assert_eq!(broker(&mut p), "ACK:1\n", "no more GETs");
        lines(&mut p, &["ERROR:No messages available", "OK:ACK:1"]);
        assert!(p.settled());
    }

    #[test]
    fn count_takes_no_more_than_it_needs_and_then_stops() {
        // --count 3, window 2; the stream holds id 1 already.
        let mut p = pipeline(2, 1).with_limit(Some(3));
        assert_eq!(broker(&mut p), "GET\nGET\n");
        assert_eq!(lines(&mut p, &["MSG:1:a", "MSG:2:b"]), ["ab12-2"]);
        assert_eq!(
            broker(&mut p),
            "ACK:1\nGET\n",
            "1 skipped + 1 in flight: room for one"
        );
        assert_eq!(lines(&mut p, &["OK:ACK:1", "MSG:3:c"]), ["ab12-3"]);
        assert_eq!(broker(&mut p), "", "the count is all taken");
        p.on_puback(&puback(1, r#"{"seq":1}"#));
        assert!(!p.stopping(), "2 of 3 settled");
        p.on_puback(&puback(2, r#"{"seq":2}"#));
        assert!(p.stopping(), "3 of 3 settled");
        assert_eq!(broker(&mut p), "ACK:2\nACK:3\n");
        lines(&mut p, &["OK:ACK:2", "OK:ACK:3"]);
        assert!(p.settled());
    }

    #[test]
    fn a_count_reached_in_an_earlier_cycle_stops_at_once() {
        let totals = Totals {
            forwarded: 5,
            ..Totals::default()
        };
        let mut p = Pipeline::new(4, "ab12", "edge.a", INBOX, totals).with_limit(Some(5));
        assert!(p.stopping() && p.settled());
        assert_eq!(broker(&mut p), "");
    }

    #[test]
    fn the_resume_point_comes_from_the_last_message_header() {
        // "NATS/1.0\r\nNats-Msg-Id: ab12-42\r\n\r\n", and one from another broker.
        let ours = r#"{"message":{"subject":"edge.a","seq":9,"hdrs":"TkFUUy8xLjANCk5hdHMtTXNnLUlkOiBhYjEyLTQyDQoNCg==","data":"eA=="}}"#;
        let theirs = r#"{"message":{"subject":"edge.a","seq":9,"hdrs":"TkFUUy8xLjANCk5hdHMtTXNnLUlkOiBmZjAwLTQyDQoNCg=="}}"#;
        let cases: [(&str, Result<Resume, bool>); 5] = [
            (ours, Ok(Resume::After(42))),
            (theirs, Ok(Resume::Foreign("ff00-42".into()))),
            (
                r#"{"message":{"subject":"edge.a","seq":9}}"#,
                Ok(Resume::Foreign(String::new())),
            ),
            (
                r#"{"error":{"code":404,"err_code":10037,"description":"no message found"}}"#,
                Ok(Resume::After(0)),
            ),
            (
                r#"{"error":{"code":404,"err_code":10059,"description":"stream not found"}}"#,
                Err(true),
            ),
        ];
        for (reply, want) in cases {
            let got = resume_point(&Json::parse(reply.as_bytes()).unwrap(), "ab12");
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{reply}"),
                (Err(verdict), Err(fatal)) => {
                    assert_eq!(matches!(verdict, Verdict::Fatal(_)), fatal, "{reply}")
                }
                (got, want) => panic!("{reply}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn own_message_ids() {
        assert_eq!(own_message_id(b"ab12-77", "ab12"), Some(77));
        assert_eq!(own_message_id(b"ff00-77", "ab12"), None);
        assert_eq!(own_message_id(b"ab12-", "ab12"), None);
        assert_eq!(own_message_id(b"ab1277", "ab12"), None);
    }
}
