//! Crash torture, end to end: the real broker, pipelined producers
//! (`--print-ids`) and an ack-mode consumer (`--ack --verbose`), with
//! SIGKILL at pseudo-random moments; first the broker (once with `--fsync
//! always`, once with the default policy: a process crash must lose
//! nothing under either, because the record is written before the OK),
//! then the consumer. Every id a producer saw `OK:MSG_ID` for must come
//! out of the consumer, an id must never stand for two contents, and the
//! consumer's ids must have no gap.
//!
//! Each producer pads its contents to a size of its own (`--size`), so a
//! content names the producer and the message; ids are checked per id, not
//! per content (a message resent after a crash may be stored twice, under
//! two ids, which is allowed: at least once).
//!
//! The randomness is a xorshift seeded from the clock, printed so a failure
//! can be replayed with `TORTURE_SEED=<seed>` (the choices repeat; the
//! timing of course does not). Every wait is bounded; the only sleeps are
//! the random delays before a kill, which are the point. Every process is
//! a [`Proc`] guard, killed when dropped, also when the test fails; the
//! broker is the harness's [`Broker`] guard.
//!
//! Last, the ground the torture stands on, without kills: `consumer --ack`
//! needs `--id`, and with `--count` it exits only once its acks are
//! confirmed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mensajeria::producer::numbered_content;

use crate::util::*;

/// Kills per test.
const CYCLES: usize = 8;
/// Producers started per cycle (they run on into the next cycles if they
/// must).
const PRODUCERS_PER_CYCLE: usize = 2;
/// Messages each producer sends, as fast as a window of 64 allows.
const PER_PRODUCER: u64 = 3000;
/// Producer `k` pads its contents to `SIZE_BASE + k` bytes (the bare
/// content, `msg-<8 digits>`, is 12).
const SIZE_BASE: usize = 13;
/// A kill comes after a random delay in this range (milliseconds), or
/// earlier once a random number of lines was seen.
const DELAY_MS: (u64, u64) = (50, 400);
/// Longest the end of a run may take: producers finishing after the last
/// restart, the consumer draining.
const FINISH: Duration = Duration::from_secs(60);
/// Room for a consumer that lags while it skips redeliveries, so the
/// producers seldom meet `Queue full` (and its backoff of seconds).
const BROKER_OPTIONS: &[&str] = &["--capacity", "5000", "--max-msg-size", "64"];

/// xorshift64: enough to pick delays and thresholds.
struct Rng(u64);

impl Rng {
    /// Seeded from `TORTURE_SEED` if set, else from the clock; returns the
    /// seed too, to print.
    fn new() -> (Rng, u64) {
        let seed = std::env::var("TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1);
                nanos ^ u64::from(std::process::id()).rotate_left(32)
            });
        (Rng(seed.max(1)), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// What one process printed so far.
#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Complete lines on stdout.
    lines: usize,
}

/// The output of every process of a test, and a condition variable
/// signalled whenever any of them prints, so a test can wait for a
/// condition over all of them without polling.
#[derive(Default)]
struct Hub {
    outputs: Mutex<Vec<Captured>>,
    changed: Condvar,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Vec<Captured>> {
        self.outputs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `check` holds, at most `limit`; returns whether it held.
    fn wait_until(&self, limit: Duration, mut check: impl FnMut(&[Captured]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut outputs = self.lock();
        loop {
            if check(&outputs) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            outputs = self
                .changed
                .wait_timeout(outputs, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// A client process whose output goes to the [`Hub`]. Dropping it kills
/// the process (SIGKILL) and reaps it.
struct Proc {
    name: String,
    child: Option<Child>,
    hub: Arc<Hub>,
    /// Its place in the hub's outputs.
    index: usize,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn start(hub: &Arc<Hub>, program: &str, args: &[String]) -> Proc {
        let mut command = client_command(program, args, &[]);
        command.stdin(Stdio::null());
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {program}: {err}"));
        let index = {
            let mut outputs = hub.lock();
            outputs.push(Captured::default());
            outputs.len() - 1
        };
        let readers = vec![
            collect(child.stdout.take().unwrap(), hub, index, false),
            collect(child.stderr.take().unwrap(), hub, index, true),
        ];
        Proc {
            name: format!("{program} {}", args.join(" ")),
            child: Some(child),
            hub: Arc::clone(hub),
            index,
            readers,
        }
    }

    /// SIGKILL, then reaps it and collects the rest of its output.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Waits at most `limit` for the exit (then all output is collected).
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = wait_child(self.child.as_mut().expect("running"), limit)?;
        self.child = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Some(status)
    }

    fn lines(&self) -> usize {
        self.hub.lock()[self.index].lines
    }

    fn stdout(&self) -> Vec<u8> {
        self.hub.lock()[self.index].stdout.clone()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.hub.lock()[self.index].stderr).into_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let running = self.child.is_some();
        self.kill();
        if running && std::thread::panicking() {
            eprintln!("`{}` killed; stderr:\n{}", self.name, tail(&self.stderr()));
        }
    }
}

/// The last few thousand bytes of a long text.
fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(4000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// A thread that appends what `pipe` yields to output `index` of the hub.
fn collect(
    mut pipe: impl Read + Send + 'static,
    hub: &Arc<Hub>,
    index: usize,
    stderr: bool,
) -> JoinHandle<()> {
    let hub = Arc::clone(hub);
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut outputs = hub.lock();
            let captured = &mut outputs[index];
            if stderr {
                captured.stderr.extend_from_slice(&buf[..n]);
            } else {
                captured.stdout.extend_from_slice(&buf[..n]);
                captured.lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
            }
            drop(outputs);
            hub.changed.notify_all();
        }
    })
}

fn endpoint(broker: &Broker) -> Vec<String> {
    vec![
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        broker.port.to_string(),
    ]
}

/// Producer number `k` of the test: `PER_PRODUCER` messages as fast as a
/// window of 64 allows, padded to its own size.
fn start_producer(hub: &Arc<Hub>, broker: &Broker, k: usize) -> Proc {
    let mut args: Vec<String> = [
        "-n",
        &PER_PRODUCER.to_string(),
        "-i",
        "0",
        "--window",
        "64",
        "--size",
        &(SIZE_BASE + k).to_string(),
        "--print-ids",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(endpoint(broker));
    Proc::start(hub, "producer", &args)
}

fn start_consumer(hub: &Arc<Hub>, broker: &Broker) -> Proc {
    let mut args: Vec<String> = ["--ack", "--id", "t", "--verbose"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(endpoint(broker));
    Proc::start(hub, "consumer", &args)
}

/// The complete lines of `bytes` (a process killed mid-write may leave a
/// partial last line: its message was not acknowledged, so it comes again).
fn complete_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let end = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    bytes[..end]
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
}

/// A consumer's `--verbose` line: `<id>\t<content>`.
fn parse_printed(line: &[u8]) -> Option<(u64, &[u8])> {
    let tab = line.iter().position(|&b| b == b'\t')?;
    let id = std::str::from_utf8(&line[..tab]).ok()?.parse().ok()?;
    Some((id, &line[tab + 1..]))
}

/// A producer's `--print-ids` line: `message <seq> stored with id <id>`.
fn parse_acked(line: &[u8]) -> Option<(u64, u64)> {
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("message ")?;
    let (seq, id) = rest.split_once(" stored with id ")?;
    Some((seq.parse().ok()?, id.parse().ok()?))
}

/// Which producer and message a content is, if it is one of ours.
fn parse_content(content: &[u8]) -> Option<(usize, u64)> {
    let producer = content.len().checked_sub(SIZE_BASE)?;
    let seq: u64 = std::str::from_utf8(content.get(4..12)?)
        .ok()?
        .parse()
        .ok()?;
    (content == numbered_content(seq, SIZE_BASE + producer).as_slice()).then_some((producer, seq))
}

/// Waits until the consumers' output (all runs together) holds every id
/// in `1..=stored`; returns whether it did within [`FINISH`].
fn wait_for_drain(hub: &Hub, consumers: &[usize], stored: u64) -> bool {
    let mut seen = BTreeSet::new();
    let mut parsed = vec![0usize; consumers.len()];
    hub.wait_until(FINISH, |outputs| {
        for (done, &index) in parsed.iter_mut().zip(consumers) {
            let stdout = &outputs[index].stdout;
            let end = stdout
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |at| at + 1);
            if end > *done {
                for line in complete_lines(&stdout[*done..end]) {
                    if let Some((id, _)) = parse_printed(line) {
                        seen.insert(id);
                    }
                }
                *done = end;
            }
        }
        seen.len() as u64 >= stored && seen.range(1..=stored).count() as u64 == stored
    })
}

/// Everything the run printed, checked.
#[derive(Default)]
struct Ledger {
    /// (id, producer, message number): every `OK:MSG_ID` a producer saw.
    acks: Vec<(u64, usize, u64)>,
    /// id -> (producer, message number): the first ack of each id.
    acked: BTreeMap<u64, (usize, u64)>,
    /// id -> content, from the consumers' output.
    printed: BTreeMap<u64, Vec<u8>>,
    /// Lines the consumers printed.
    delivered: u64,
    problems: Vec<String>,
}

impl Ledger {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 50 {
            self.problems.push(text);
        }
    }

    fn add_producer(&mut self, producer: usize, stdout: &[u8]) {
        let mut lines = 0;
        for line in complete_lines(stdout) {
            let Some((seq, id)) = parse_acked(line) else {
                self.problem(format!(
                    "producer {producer}: unexpected line {:?}",
                    String::from_utf8_lossy(line)
                ));
                continue;
            };
            lines += 1;
            self.acks.push((id, producer, seq));
            match self.acked.get(&id) {
                Some(&(first, first_seq)) => self.problem(format!(
                    "id {id} acknowledged twice: to producer {first} for message {first_seq}, \
                     to producer {producer} for message {seq}"
                )),
                None => {
                    self.acked.insert(id, (producer, seq));
                }
            }
        }
        if lines != PER_PRODUCER {
            self.problem(format!(
                "producer {producer} printed {lines} acks, not {PER_PRODUCER}"
            ));
        }
    }

    fn add_consumer(&mut self, run: usize, stdout: &[u8]) {
        for line in complete_lines(stdout) {
            let Some((id, content)) = parse_printed(line) else {
                self.problem(format!(
                    "consumer run {run}: unexpected line {:?}",
                    String::from_utf8_lossy(line)
                ));
                continue;
            };
            self.delivered += 1;
            if parse_content(content).is_none() {
                self.problem(format!(
                    "consumer run {run}: id {id} has a content no producer sent: {:?}",
                    String::from_utf8_lossy(content)
                ));
            }
            match self.printed.get(&id) {
                Some(before) if before != content => {
                    let text = format!(
                        "id {id} reused: printed as {:?} and as {:?}",
                        String::from_utf8_lossy(before),
                        String::from_utf8_lossy(content)
                    );
                    self.problem(text);
                }
                Some(_) => {}
                None => {
                    self.printed.insert(id, content.to_vec());
                }
            }
        }
    }

    /// Checks acks against deliveries; returns the ids of the acknowledged
    /// messages not delivered under their id with their content.
    fn check(&mut self, stored: u64) -> Vec<u64> {
        let mut lost = Vec::new();
        let mut mismatches = Vec::new();
        for &(id, producer, seq) in &self.acks {
            match self.printed.get(&id) {
                None => lost.push(id),
                Some(content) if *content != numbered_content(seq, SIZE_BASE + producer) => {
                    lost.push(id);
                    mismatches.push(format!(
                        "id {id} was message {seq} of producer {producer}, printed as {:?}",
                        String::from_utf8_lossy(content)
                    ));
                }
                Some(_) => {}
            }
        }
        for text in mismatches {
            self.problem(text);
        }
        let max = self.printed.last_key_value().map_or(0, |(&id, _)| id);
        if self.printed.len() as u64 != max
            || self
                .printed
                .first_key_value()
                .is_some_and(|(&id, _)| id != 1)
        {
            let gaps: Vec<u64> = (1..=max)
                .filter(|id| !self.printed.contains_key(id))
                .take(20)
                .collect();
            self.problem(format!(
                "the consumer's ids are not 1..={max}: missing {gaps:?}"
            ));
        }
        if max != stored {
            self.problem(format!(
                "the broker stored {stored} messages, the consumer's last id is {max}"
            ));
        }
        lost
    }
}

/// What a torture run ends with: producers finished, consumer drained.
struct Run {
    what: String,
    hub: Arc<Hub>,
    producers: Vec<Proc>,
    consumers: Vec<Proc>,
    kills: usize,
}

impl Run {
    fn new(what: String, hub: &Arc<Hub>) -> Run {
        Run {
            what,
            hub: Arc::clone(hub),
            producers: Vec::new(),
            consumers: Vec::new(),
            kills: 0,
        }
    }

    /// Lines all producers printed so far.
    fn acks_seen(&self) -> usize {
        self.producers.iter().map(Proc::lines).sum()
    }

    fn start_producers(&mut self, broker: &Broker) {
        for _ in 0..PRODUCERS_PER_CYCLE {
            let k = self.producers.len();
            self.producers.push(start_producer(&self.hub, broker, k));
        }
    }

    /// Waits for the producers and the consumer, checks everything and
    /// prints the figures. Returns (delivered, duplicates).
    fn finish(mut self, broker: &Broker) -> (u64, u64) {
        for producer in &mut self.producers {
            let status = producer.wait(FINISH).unwrap_or_else(|| {
                panic!(
                    "{}: `{}` did not finish within {FINISH:?}",
                    self.what, producer.name
                )
            });
            assert!(
                status.success(),
                "{}: `{}` failed: {status}\nstderr:\n{}",
                self.what,
                producer.name,
                tail(&producer.stderr())
            );
        }
        let stored = broker.stat("next_id") - 1;
        let indexes: Vec<usize> = self.consumers.iter().map(|c| c.index).collect();
        let drained = wait_for_drain(&self.hub, &indexes, stored);
        for consumer in &mut self.consumers {
            consumer.kill();
        }
        let mut ledger = Ledger::default();
        for (k, producer) in self.producers.iter().enumerate() {
            ledger.add_producer(k, &producer.stdout());
        }
        for (run, consumer) in self.consumers.iter().enumerate() {
            ledger.add_consumer(run, &consumer.stdout());
        }
        let lost = ledger.check(stored);
        let sent = PER_PRODUCER * self.producers.len() as u64;
        let duplicates = ledger.delivered - ledger.printed.len() as u64;
        eprintln!(
            "torture [{}]: cycles {}, messages sent {sent}, acknowledged {}, stored {stored}, \
             delivered {} ({} distinct), duplicates {duplicates}, lost {}",
            self.what,
            self.kills,
            ledger.acks.len(),
            ledger.delivered,
            ledger.printed.len(),
            lost.len()
        );
        let mut report = String::new();
        if !drained {
            let _ = writeln!(
                report,
                "the consumer did not deliver all {stored} stored messages within {FINISH:?}"
            );
        }
        if !lost.is_empty() {
            let _ = writeln!(
                report,
                "{} acknowledged message(s) never delivered, first ids {:?}",
                lost.len(),
                &lost[..lost.len().min(20)]
            );
        }
        for problem in &ledger.problems {
            let _ = writeln!(report, "{problem}");
        }
        if !report.is_empty() {
            let consumers: String = self
                .consumers
                .iter()
                .enumerate()
                .map(|(run, c)| format!("consumer run {run} stderr:\n{}\n", tail(&c.stderr())))
                .collect();
            panic!("{}:\n{report}{consumers}", self.what);
        }
        (ledger.delivered, duplicates)
    }
}

fn random_delay(rng: &mut Rng) -> Duration {
    Duration::from_millis(rng.between(DELAY_MS.0, DELAY_MS.1))
}

/// Broker SIGKILLed at random moments while producers send and an
/// ack-mode consumer receives; restarted on the same files, keys and port.
fn broker_crash_torture(fsync: Option<&str>) {
    let what = format!(
        "broker kills, fsync {}",
        fsync.unwrap_or("interval (default)")
    );
    let (mut rng, seed) = Rng::new();
    eprintln!("torture [{what}]: seed {seed} (TORTURE_SEED={seed} repeats the choices)");
    let dir = TestDir::new("torture-broker");
    let mut options = BROKER_OPTIONS.to_vec();
    if let Some(policy) = fsync {
        options.extend(["--fsync", policy]);
    }
    let mut broker = Broker::start(&dir, &options);
    let hub = Arc::new(Hub::default());
    let mut run = Run::new(what, &hub);
    run.consumers.push(start_consumer(&hub, &broker));
    for _ in 0..CYCLES {
        run.start_producers(&broker);
        // Kill while this cycle's producers are at it: after a random
        // delay, or once a random share of their acks came back.
        let target = run.acks_seen()
            + rng.between(1, PER_PRODUCER * PRODUCERS_PER_CYCLE as u64 - 1) as usize;
        let indexes: Vec<usize> = run.producers.iter().map(|p| p.index).collect();
        let started = Instant::now();
        hub.wait_until(random_delay(&mut rng), |outputs| {
            indexes.iter().map(|&i| outputs[i].lines).sum::<usize>() >= target
        });
        eprintln!(
            "torture [{}]: kill {} after {} ms, {} acks seen",
            run.what,
            run.kills + 1,
            started.elapsed().as_millis(),
            run.acks_seen()
        );
        broker.kill();
        broker.restart();
        run.kills += 1;
    }
    let (_, duplicates) = run.finish(&broker);
    // One consumer process throughout: it skips what it printed before a
    // crash, however often the broker delivers it again.
    assert_eq!(duplicates, 0, "one consumer process printed duplicates");
}

#[test]
fn broker_crashes_lose_nothing_with_fsync_always() {
    broker_crash_torture(Some("always"));
}

#[test]
fn broker_crashes_lose_nothing_with_the_default_fsync_policy() {
    broker_crash_torture(None);
}

/// The consumer SIGKILLed mid-stream, several times, and started again
/// with the same id: the union of its runs covers every acknowledged id.
#[test]
fn consumer_kills_lose_nothing() {
    let what = "consumer kills".to_string();
    let (mut rng, seed) = Rng::new();
    eprintln!("torture [{what}]: seed {seed} (TORTURE_SEED={seed} repeats the choices)");
    let dir = TestDir::new("torture-consumer");
    let broker = Broker::start(&dir, BROKER_OPTIONS);
    let hub = Arc::new(Hub::default());
    let mut run = Run::new(what, &hub);
    run.consumers.push(start_consumer(&hub, &broker));
    for _ in 0..CYCLES {
        run.start_producers(&broker);
        let current = run.consumers.last_mut().expect("a consumer");
        let index = current.index;
        let target = current.lines()
            + rng.between(1, PER_PRODUCER * PRODUCERS_PER_CYCLE as u64 - 1) as usize;
        let started = Instant::now();
        hub.wait_until(random_delay(&mut rng), |outputs| {
            outputs[index].lines >= target
        });
        current.kill();
        eprintln!(
            "torture [{}]: kill {} after {} ms, {} acks seen, {} lines printed by this run",
            run.what,
            run.kills + 1,
            started.elapsed().as_millis(),
            run.acks_seen(),
            run.consumers.last().map_or(0, Proc::lines)
        );
        run.kills += 1;
        run.consumers.push(start_consumer(&hub, &broker));
    }
    let (delivered, _) = run.finish(&broker);
    assert!(delivered > 0);
}

/// `--ack` without kills, the ground the torture stands on: it needs
/// `--id`; with `--count` the consumer exits only once its acks are
/// confirmed, so the next run of the id starts right after what was
/// printed, with nothing in flight; and an id created without `--ack`
/// refuses it with a hint.
#[test]
fn ack_mode_consumer_needs_an_id_and_confirms_its_acks_before_exiting() {
    let usage = run("consumer", &["--ack"], &[], b"");
    assert_eq!(usage.status.code(), Some(2), "{}", show(&usage));
    assert!(
        String::from_utf8_lossy(&usage.stderr).starts_with("consumer: --ack needs --id"),
        "{}",
        show(&usage)
    );

    let dir = TestDir::new("torture-ack-count");
    let broker = Broker::start(&dir, &[]);
    let at = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(endpoint(&broker));
        args
    };
    let run_at = |program: &str, extra: &[&str]| {
        let args = at(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(program, &args, &[], b"")
    };
    let produced = run_at("producer", &["-n", "10", "-i", "0"]);
    assert!(produced.status.success(), "{}", show(&produced));
    let mut printed = Vec::new();
    for count in ["4", "6"] {
        let consumed = run_at("consumer", &["--ack", "--id", "a", "--count", count, "-v"]);
        assert!(consumed.status.success(), "{}", show(&consumed));
        let log = String::from_utf8_lossy(&consumed.stderr);
        assert!(
            log.contains(&format!("acked {count}, acks refused 0, unconfirmed 0")),
            "{log}"
        );
        printed.extend(
            complete_lines(&consumed.stdout).map(|line| String::from_utf8_lossy(line).into_owned()),
        );
    }
    let want: Vec<String> = (1..=10).map(|n| format!("{n}\tmsg-{n:08}")).collect();
    assert_eq!(printed, want);
    assert_eq!(broker.stat("in_flight"), 0);
    assert_eq!(broker.stat("acked"), 10);

    let plain = run_at("consumer", &["--id", "p", "--timeout", "1"]);
    assert!(plain.status.success(), "{}", show(&plain));
    let refused = run_at("consumer", &["--id", "p", "--ack", "--retries", "0"]);
    assert_eq!(refused.status.code(), Some(1), "{}", show(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("created without --ack"),
        "{}",
        show(&refused)
    );
}
