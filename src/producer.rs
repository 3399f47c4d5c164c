//! The producer program: interactive (a prompt, one message per line, `q`
//! quits), piped (`cat file | producer`) or automatic (`-n COUNT -i MS`).
//!
//! Every message stays in memory until the broker acknowledges it with
//! `OK:MSG_ID`; on a lost connection the producer reconnects with backoff,
//! registers again and resends what was not acknowledged (at least once: a
//! resent message may be stored twice). `ERROR:Queue full` and
//! `ERROR:Persistence failure` are retried after a backoff, never dropped;
//! messages waiting to be (re)sent are kept in the order they were read,
//! though a retried message may be stored after ones sent behind it.
//! Memory is bounded by the window of messages in flight, the bounded
//! channel from the stdin reader and the longest input line read.
//!
//! While idle it sends `HEARTBEAT:<unix time>` every `--heartbeat` seconds;
//! if the broker still drops it for idleness, it halves the period (down
//! to [`client::MIN_HEARTBEAT`]), reconnects and carries on.

use std::collections::VecDeque;
use std::io::{self, BufRead, IsTerminal, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::client::{
    self, Backoff, ClientError, Connection, Endpoint, REPLY_TIMEOUT, connect_with_retry,
};
use crate::protocol::{self, Command, ErrorCode, Reply};

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    pub endpoint: Endpoint,
    /// Automatic mode: how many messages.
    pub count: Option<u64>,
    /// Automatic mode: pause between messages (zero: as fast as the window allows).
    pub interval: Duration,
    /// Messages in flight at most.
    pub window: usize,
    /// Automatic mode: pad contents to this many bytes.
    pub size: usize,
    /// Reconnection attempts before giving up (`None`: forever).
    pub retries: Option<u32>,
    /// Print each acknowledged message's id on stdout.
    pub print_ids: bool,
    /// Send a heartbeat after this long without traffic.
    pub heartbeat: Duration,
}

/// Default number of messages in flight.
pub const DEFAULT_WINDOW: usize = 64;
/// Largest window accepted.
pub const MAX_WINDOW: u64 = 4096;
/// Lines the stdin reader may read ahead of the sender.
const STDIN_AHEAD: usize = 1024;
/// Longest input line kept: the largest message any broker accepts. A
/// longer line is reported and skipped, not held in memory.
const MAX_INPUT_LINE: usize = protocol::MAX_MSG_SIZE_LIMIT as usize;

#[derive(Debug)]
struct Message {
    seq: u64,
    content: Vec<u8>,
    sent_at: Instant,
    /// Times it was written to a connection.
    attempts: u32,
}

#[derive(Debug)]
enum InFlight {
    Message(Message),
    Heartbeat,
}

/// What happened to a message.
#[derive(Debug)]
pub enum Event {
    Acked {
        seq: u64,
        id: u64,
        latency: Duration,
    },
    Rejected {
        seq: u64,
        error: String,
    },
}

/// Sends messages over a connection that it keeps alive.
pub struct Sender {
    endpoint: Endpoint,
    backoff: Backoff,
    conn: Option<Connection>,
    /// Messages not on the wire, in `seq` order.
    waiting: VecDeque<Message>,
    /// Requests whose replies are due, in the order they were sent.
    in_flight: VecDeque<InFlight>,
    window: usize,
    /// Queue full or persistence failure: do not send before this.
    retry_at: Option<Instant>,
    retry_backoff: Backoff,
    heartbeat: Duration,
    last_traffic: Instant,
    /// The last reply, or the moment a request went out on an idle
    /// connection: the clock for [`REPLY_TIMEOUT`].
    last_reply: Instant,
    /// Messages written to the broker at least once.
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    /// Writes of a message after its first (after a lost connection or a
    /// full queue).
    pub resent: u64,
}

impl Sender {
    pub fn new(
        endpoint: Endpoint,
        window: usize,
        retries: Option<u32>,
        heartbeat: Duration,
    ) -> Sender {
        Sender {
            endpoint,
            backoff: Backoff::new(retries),
            conn: None,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            window: window.max(1),
            retry_at: None,
            retry_backoff: Backoff::new(None),
            heartbeat: heartbeat.max(client::MIN_HEARTBEAT),
            last_traffic: Instant::now(),
            last_reply: Instant::now(),
            sent: 0,
            acked: 0,
            errors: 0,
            resent: 0,
        }
    }

    /// Queues a message for sending; `seq` grows from call to call.
    pub fn push(&mut self, seq: u64, content: Vec<u8>) {
        debug_assert!(self.waiting.back().is_none_or(|last| last.seq < seq));
        self.waiting.push_back(Message {
            seq,
            content,
            sent_at: Instant::now(),
            attempts: 0,
        });
    }

    /// Messages queued or in flight.
    pub fn pending(&self) -> usize {
        self.waiting.len()
            + self
                .in_flight
                .iter()
                .filter(|f| matches!(f, InFlight::Message(_)))
                .count()
    }

    /// Whether another message would be sent at once.
    pub fn has_room(&self) -> bool {
        self.pending() < self.window
    }

    /// Connects (first time or after a loss), registering as a producer.
    fn ensure_connected(&mut self) -> Result<(), ClientError> {
        if self.conn.is_none() {
            let (conn, ()) = connect_with_retry(
                "producer",
                &self.endpoint,
                &mut self.backoff,
                None,
                |conn| conn.register_producer(),
            )?;
            self.conn = Some(conn);
            self.last_traffic = Instant::now();
            self.last_reply = Instant::now();
        }
        Ok(())
    }

    /// The connection broke: what was in flight goes back in the queue,
    /// to be resent after reconnecting.
    fn lose_connection(&mut self, why: &str) {
        if self.conn.take().is_some() {
            eprintln!(
                "producer: lost the connection to {} ({why}); reconnecting",
                self.endpoint
            );
        }
        while let Some(item) = self.in_flight.pop_front() {
            if let InFlight::Message(message) = item {
                self.requeue(message);
            }
        }
    }

    /// Puts `message` back among the waiting ones, in `seq` order (a
    /// second refusal in the same window must not overtake the first).
    /// Messages sent after it stay in flight: their replies are coming.
    fn requeue(&mut self, message: Message) {
        let at = self
            .waiting
            .partition_point(|waiting| waiting.seq < message.seq);
        self.waiting.insert(at, message);
    }

    /// Sends what the window allows, then handles replies until `deadline`
    /// or until something happened. Returns what happened to messages.
    pub fn step(&mut self, deadline: Instant, events: &mut Vec<Event>) -> Result<(), ClientError> {
        self.ensure_connected()?;
        let now = Instant::now();
        let may_send = self.retry_at.is_none_or(|at| now >= at);
        let was_idle = self.in_flight.is_empty();
        let conn = self.conn.as_mut().expect("connected");
        let mut in_flight_messages = self
            .in_flight
            .iter()
            .filter(|f| matches!(f, InFlight::Message(_)))
            .count();
        if may_send {
            self.retry_at = None;
            while in_flight_messages < self.window {
                let Some(mut message) = self.waiting.pop_front() else {
                    break;
                };
                conn.queue(&Command::Send(&message.content));
                message.sent_at = now;
                if message.attempts == 0 {
                    self.sent += 1;
                } else {
                    self.resent += 1;
                }
                message.attempts += 1;
                self.in_flight.push_back(InFlight::Message(message));
                in_flight_messages += 1;
            }
        }
        if self.in_flight.is_empty() && now.duration_since(self.last_traffic) >= self.heartbeat {
            conn.queue_heartbeat();
            self.in_flight.push_back(InFlight::Heartbeat);
        }
        if was_idle && !self.in_flight.is_empty() {
            // The reply clock starts now, not at a reply long ago.
            self.last_reply = now;
        }
        if !conn.out.is_empty() {
            self.last_traffic = now;
            if let Err(err) = conn.flush() {
                self.lose_connection(&err.to_string());
                return Ok(());
            }
        }
        if self.in_flight.is_empty() {
            // Nothing to wait for: sleep until the deadline, watching the
            // connection for a close or an unsolicited error.
            let deadline = deadline.min(self.last_traffic + self.heartbeat);
            return self.read_replies(deadline, events);
        }
        let deadline = match self.retry_at {
            Some(at) => deadline.min(at),
            None => deadline,
        };
        self.read_replies(deadline, events)
    }

    fn read_replies(
        &mut self,
        deadline: Instant,
        events: &mut Vec<Event>,
    ) -> Result<(), ClientError> {
        let mut wait_until = deadline;
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(());
            };
            let line = match conn.read_line(wait_until) {
                Ok(Some(line)) => line,
                Ok(None) => {
                    if !self.in_flight.is_empty() && self.last_reply.elapsed() >= REPLY_TIMEOUT {
                        self.lose_connection("no reply in time");
                    }
                    return Ok(());
                }
                Err(err) => {
                    self.lose_connection(&err.to_string());
                    return Ok(());
                }
            };
            self.last_reply = Instant::now();
            // After the first line, only take what is already there.
            wait_until = Instant::now();
            match protocol::parse_reply(&line) {
                Reply::Notify(_) => continue,
                Reply::Error(
                    Some(code @ (ErrorCode::ShuttingDown | ErrorCode::IdleTimeout)),
                    text,
                ) => {
                    if code == ErrorCode::IdleTimeout {
                        self.heartbeat = client::shorter_heartbeat(self.heartbeat);
                        eprintln!(
                            "producer: the broker dropped the idle connection; heartbeats now every {} ms",
                            self.heartbeat.as_millis()
                        );
                    }
                    let why = format!("the broker said {}", String::from_utf8_lossy(text));
                    self.lose_connection(&why);
                    return Ok(());
                }
                reply => self.handle_reply(reply, &line, events),
            }
        }
    }

    fn handle_reply(&mut self, reply: Reply<'_>, line: &[u8], events: &mut Vec<Event>) {
        let Some(front) = self.in_flight.pop_front() else {
            eprintln!(
                "producer: unexpected line from the broker: {}",
                String::from_utf8_lossy(line)
            );
            return;
        };
        let message = match front {
            InFlight::Heartbeat => return,
            InFlight::Message(message) => message,
        };
        match reply {
            Reply::MsgId(id) => {
                self.acked += 1;
                self.retry_backoff.reset();
                events.push(Event::Acked {
                    seq: message.seq,
                    id,
                    latency: message.sent_at.elapsed(),
                });
            }
            Reply::Error(Some(ErrorCode::QueueFull | ErrorCode::PersistenceFailure), text) => {
                // Keep it, in order, and back off before sending again. The
                // other messages of the window are likely refused too: one
                // backoff step per round, not one per refusal.
                let now = Instant::now();
                if self.retry_at.is_none_or(|at| at <= now) {
                    let wait = self.retry_backoff.next_wait().unwrap_or(Backoff::MAX);
                    let attempts = self.retry_backoff.attempts();
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        eprintln!(
                            "producer: broker said {}; retrying in {} ms",
                            protocol::reply_text(&Reply::Error(None, text)),
                            wait.as_millis()
                        );
                    }
                    self.retry_at = Some(now + wait);
                }
                self.requeue(message);
            }
            Reply::Error(_, text) => {
                self.errors += 1;
                let error = String::from_utf8_lossy(text).into_owned();
                events.push(Event::Rejected {
                    seq: message.seq,
                    error,
                });
            }
            _ => {
                self.errors += 1;
                let error = format!("unexpected reply {}", String::from_utf8_lossy(line));
                events.push(Event::Rejected {
                    seq: message.seq,
                    error,
                });
            }
        }
    }

    /// Says goodbye to the broker.
    pub fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.quit();
        }
    }
}

/// The final line on stderr.
fn summary(sender: &Sender, started: Instant, latencies: &mut Latencies) {
    let elapsed = started.elapsed().as_secs_f64();
    let rate = if elapsed > 0.0 {
        sender.acked as f64 / elapsed
    } else {
        0.0
    };
    eprintln!(
        "producer: sent {}, acknowledged {}, errors {}, resent {}, elapsed {elapsed:.3} s, {rate:.0} msgs/s{}",
        sender.sent,
        sender.acked,
        sender.errors,
        sender.resent,
        latencies.describe()
    );
}

/// Send-to-acknowledgement times of the first [`Latencies::LIMIT`]
/// messages, in microseconds, for the summary's percentiles.
#[derive(Debug, Default)]
pub struct Latencies {
    samples: Vec<u32>,
}

impl Latencies {
    /// Samples kept at most (4 MB).
    pub const LIMIT: usize = 1 << 20;

    pub fn add(&mut self, latency: Duration) {
        if self.samples.len() < Latencies::LIMIT {
            self.samples
                .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }

    /// The `q` quantile (0 to 1) in microseconds; sorts the samples.
    pub fn quantile(&mut self, q: f64) -> Option<u32> {
        if self.samples.is_empty() {
            return None;
        }
        self.samples.sort_unstable();
        let rank = ((self.samples.len() as f64 * q).ceil() as usize).clamp(1, self.samples.len());
        Some(self.samples[rank - 1])
    }

    /// `, ack latency p50 .. p99 .. p99.9 .. us`, or nothing without samples.
    fn describe(&mut self) -> String {
        match (
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
        ) {
            (Some(p50), Some(p99), Some(p999)) => {
                format!(", ack latency p50 {p50} us p99 {p99} us p99.9 {p999} us")
            }
            _ => String::new(),
        }
    }
}

fn report(
    events: &mut Vec<Event>,
    print_ids: bool,
    out: &mut impl Write,
    latencies: &mut Latencies,
) -> io::Result<()> {
    for event in events.drain(..) {
        match event {
            Event::Acked { seq, id, latency } => {
                latencies.add(latency);
                if print_ids {
                    writeln!(out, "message {seq} stored with id {id}")?;
                }
            }
            Event::Rejected { seq, error } => {
                eprintln!("producer: message {seq} rejected: {error}")
            }
        }
    }
    out.flush()
}

/// Automatic mode: `count` numbered messages, `interval` apart.
pub fn run_automatic(options: &ProducerOptions, count: u64) -> i32 {
    let started = Instant::now();
    let mut sender = Sender::new(
        options.endpoint.clone(),
        options.window,
        options.retries,
        options.heartbeat,
    );
    let mut events = Vec::new();
    let mut latencies = Latencies::default();
    let mut stdout = io::stdout().lock();
    let mut next = 1u64;
    let mut next_at = Instant::now();
    while next <= count || sender.pending() > 0 {
        let now = Instant::now();
        while next <= count && sender.has_room() && now >= next_at {
            sender.push(next, numbered_content(next, options.size));
            next += 1;
            if !options.interval.is_zero() {
                next_at += options.interval;
                break;
            }
        }
        let deadline = if next <= count && !options.interval.is_zero() {
            next_at.max(now)
        } else {
            now + Duration::from_millis(200)
        };
        if let Err(err) = sender.step(deadline, &mut events) {
            eprintln!("producer: giving up: {err}");
            summary(&sender, started, &mut latencies);
            return 1;
        }
        if report(&mut events, options.print_ids, &mut stdout, &mut latencies).is_err() {
            return 1;
        }
    }
    summary(&sender, started, &mut latencies);
    let ok = sender.acked == count && sender.errors == 0;
    sender.close();
    if ok { 0 } else { 1 }
}

/// `msg-<n>` with `n` zero-padded, then dots up to `size` bytes.
pub fn numbered_content(n: u64, size: usize) -> Vec<u8> {
    let mut content = format!("msg-{n:08}").into_bytes();
    if content.len() < size {
        content.resize(size, b'.');
    }
    content
}

enum Input {
    Line(Vec<u8>),
    /// A line longer than [`MAX_INPUT_LINE`], skipped.
    TooLong,
    End,
}

/// Reads one line into `line`, without its `\n` nor a `\r` right before
/// it, keeping at most `max` bytes. Returns `None` at the end of input,
/// else whether the line was longer than `max` (the excess is dropped).
fn read_input_line(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<bool>> {
    line.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if buf.is_empty() {
            break;
        }
        any = true;
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        // One byte past `max` may be the `\r` of a CRLF ending.
        let room = (max + 1).saturating_sub(line.len());
        too_long |= chunk.len() > room;
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = newline.map_or(buf.len(), |at| at + 1);
        input.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(too_long || line.len() > max))
}

/// Interactive or piped mode: one message per line of stdin.
pub fn run_lines(options: &ProducerOptions) -> i32 {
    let started = Instant::now();
    let terminal = io::stdin().is_terminal();
    let (tx, rx) = mpsc::sync_channel::<Input>(STDIN_AHEAD);
    // The reader thread ends at end of input or `q`, and is joined then;
    // the main thread never blocks on stdin, so it can heartbeat while a
    // person thinks. When the program gives up on the broker it exits
    // without joining: the reader may be blocked in a read of the terminal.
    let reader = match spawn_stdin_reader(tx) {
        Ok(reader) => reader,
        Err(err) => {
            eprintln!("producer: cannot start the stdin reader: {err}");
            return 1;
        }
    };
    let window = if terminal { 1 } else { options.window };
    let mut sender = Sender::new(
        options.endpoint.clone(),
        window,
        options.retries,
        options.heartbeat,
    );
    let mut events = Vec::new();
    let mut latencies = Latencies::default();
    let mut stdout = io::stdout().lock();
    let mut input = LineInput {
        rx,
        seq: 0,
        done: false,
        prompted: false,
    };
    if terminal {
        eprintln!("producer: one message per line; 'q' on its own line quits");
    }
    loop {
        if terminal && !input.prompted && sender.pending() == 0 && !input.done {
            let _ = write!(stdout, "> ");
            let _ = stdout.flush();
            input.prompted = true;
        }
        input.take(&mut sender);
        if input.done && sender.pending() == 0 {
            break;
        }
        let deadline =
            Instant::now() + Duration::from_millis(if sender.pending() > 0 { 200 } else { 0 });
        if let Err(err) = sender.step(deadline, &mut events) {
            eprintln!("producer: giving up: {err}");
            summary(&sender, started, &mut latencies);
            return 1;
        }
        let print_ids = terminal || options.print_ids;
        if report(&mut events, print_ids, &mut stdout, &mut latencies).is_err() {
            return 1;
        }
    }
    let _ = reader.join();
    if !terminal {
        summary(&sender, started, &mut latencies);
    }
    let ok = sender.acked == input.seq && sender.errors == 0;
    sender.close();
    if ok { 0 } else { 1 }
}

/// The thread that reads stdin, one line at a time, into `tx`.
fn spawn_stdin_reader(tx: mpsc::SyncSender<Input>) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let stdin = io::stdin();
            let mut input = stdin.lock();
            let mut line = Vec::new();
            loop {
                let item = match read_input_line(&mut input, &mut line, MAX_INPUT_LINE) {
                    Ok(None) => break,
                    Err(err) => {
                        eprintln!("producer: cannot read stdin: {err}");
                        break;
                    }
                    Ok(Some(true)) => Input::TooLong,
                    Ok(Some(false)) if line == b"q" => break,
                    Ok(Some(false)) => Input::Line(line.clone()),
                };
                if tx.send(item).is_err() {
                    return;
                }
            }
            let _ = tx.send(Input::End);
        })
}

/// The lines the stdin thread passes on, numbered as they are taken.
struct LineInput {
    rx: mpsc::Receiver<Input>,
    seq: u64,
    done: bool,
    prompted: bool,
}

impl LineInput {
    /// Takes input while the sender's window has room (waiting a little
    /// for it only when nothing is in flight).
    fn take(&mut self, sender: &mut Sender) {
        while !self.done && sender.has_room() {
            let wait = if sender.pending() == 0 {
                Duration::from_millis(200)
            } else {
                Duration::ZERO
            };
            match self.rx.recv_timeout(wait) {
                Ok(Input::Line(line)) => {
                    self.prompted = false;
                    if line.is_empty() {
                        continue;
                    }
                    self.seq += 1;
                    sender.push(self.seq, line);
                }
                Ok(Input::TooLong) => {
                    self.prompted = false;
                    self.seq += 1;
                    sender.errors += 1;
                    eprintln!(
                        "producer: message {} rejected: longer than {MAX_INPUT_LINE} bytes, not sent",
                        self.seq
                    );
                }
                Ok(Input::End) | Err(RecvTimeoutError::Disconnected) => self.done = true,
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<(Vec<u8>, bool)> {
        let mut input = io::BufReader::with_capacity(3, input);
        let mut line = Vec::new();
        let mut out = Vec::new();
        while let Some(too_long) = read_input_line(&mut input, &mut line, max).unwrap() {
            out.push((line.clone(), too_long));
        }
        out
    }

    #[test]
    fn input_lines_are_split_stripped_and_bounded() {
        let got = lines(b"ab\r\n\ncdef\r\nabcdefgh\nlast", 4);
        let want: Vec<(Vec<u8>, bool)> = vec![
            (b"ab".to_vec(), false),
            (b"".to_vec(), false),
            (b"cdef".to_vec(), false),
            (b"abcde".to_vec(), true),
            (b"last".to_vec(), false),
        ];
        assert_eq!(got, want);
        assert_eq!(lines(b"abcde\n", 4), vec![(b"abcde".to_vec(), true)]);
        assert_eq!(lines(b"\xff:\r\n", 4), vec![(b"\xff:".to_vec(), false)]);
        assert!(lines(b"", 4).is_empty());
    }

    #[test]
    fn numbered_contents_pad_to_size() {
        assert_eq!(numbered_content(7, 0), b"msg-00000007");
        assert_eq!(numbered_content(7, 15), b"msg-00000007...");
    }
}
