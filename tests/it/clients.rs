//! The producer and consumer programs, end to end: the real binaries
//! against a real broker on its own port, keys and files. Piped input,
//! automatic mode, byte-for-byte delivery, the consumer's options, help and
//! bad options, the environment, reconnection across SIGKILLed brokers,
//! refusals (`Server is full`, `Queue full`) and heartbeats under a short
//! idle timeout.
//!
//! Long-running clients are [`Running`] guards: threads collect their
//! output, waits on it are bounded by [`WAIT`], and dropping the guard
//! kills the process, also when the test fails. Nothing here sleeps to wait
//! for readiness; the one deliberate sleep is the idle spell the heartbeat
//! test is about. Timing checks are lower bounds only.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::*;

/// What a running program printed so far.
#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

type Shared = Arc<(Mutex<Captured>, Condvar)>;

/// A client program running in the background, its output collected by
/// two threads. Dropping it kills the process.
struct Running {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    captured: Shared,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Starts `program` with `args` and only the broker variables in `env`
    /// (the test's own environment is not inherited for those).
    fn start<S: AsRef<OsStr>>(program: &str, args: &[S], env: &[(&str, &str)]) -> Running {
        let mut command = client_command(program, args, env);
        command.stdin(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {program}: {err}"));
        let captured: Shared = Arc::default();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let readers = vec![
            collect(stdout, &captured, false),
            collect(stderr, &captured, true),
        ];
        let name = format!(
            "{program} {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        Running {
            name,
            stdin: child.stdin.take(),
            child: Some(child),
            captured,
            readers,
        }
    }

    fn write_stdin(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .expect("write to the program's stdin");
    }

    fn stdout(&self) -> Vec<u8> {
        lock(&self.captured).stdout.clone()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&lock(&self.captured).stderr).into_owned()
    }

    /// Waits, at most [`WAIT`], until `check(stdout, stderr)` holds.
    fn wait_for(&self, what: &str, check: impl Fn(&[u8], &str) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut captured = lock(&self.captured);
        loop {
            if check(&captured.stdout, &String::from_utf8_lossy(&captured.stderr)) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(captured);
                panic!(
                    "timed out waiting for {what} from `{}`\nstdout:\n{}\nstderr:\n{}",
                    self.name,
                    text(&self.stdout()),
                    self.stderr()
                );
            }
            captured = self
                .captured
                .1
                .wait_timeout(captured, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Closes stdin, waits at most `limit` for the exit and returns all
    /// the program printed.
    fn finish(mut self, limit: Duration) -> Output {
        drop(self.stdin.take());
        let mut child = self.child.take().unwrap();
        let status = match wait_child(&mut child, limit) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                let output = self.output(status);
                panic!("`{}` ran past {limit:?}:\n{}", self.name, show(&output));
            }
        };
        self.output(status)
    }

    fn output(&mut self, status: std::process::ExitStatus) -> Output {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let captured = lock(&self.captured);
        Output {
            status,
            stdout: captured.stdout.clone(),
            stderr: captured.stderr.clone(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "`{}` killed; stdout:\n{}\nstderr:\n{}",
                    self.name,
                    String::from_utf8_lossy(&self.stdout()),
                    self.stderr()
                );
            }
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// The captured output, also after a panic elsewhere poisoned the lock.
fn lock(captured: &Shared) -> MutexGuard<'_, Captured> {
    captured
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A thread that appends what `pipe` yields to the captured output.
fn collect(
    mut pipe: impl Read + Send + 'static,
    captured: &Shared,
    stderr: bool,
) -> JoinHandle<()> {
    let captured = Arc::clone(captured);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut guard = lock(&captured);
            if stderr {
                &mut guard.stderr
            } else {
                &mut guard.stdout
            }
            .extend_from_slice(&buf[..n]);
            captured.1.notify_all();
        }
    })
}

/// `--host 127.0.0.1 --port <broker's>` followed by `extra`.
fn at(broker: &Broker, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--host".to_string(),
        "127.0.0.1".to_string(),
        "--port".to_string(),
        broker.port.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs a client to completion (bounded) against `broker`.
fn run_at(program: &str, broker: &Broker, extra: &[&str], stdin: &[u8]) -> Output {
    let args = at(broker, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(program, &args, &[], stdin)
}

/// The lines of a program's output, without their `\n`.
fn lines(bytes: &[u8]) -> Vec<&[u8]> {
    match bytes.strip_suffix(b"\n") {
        Some(body) => body.split(|&b| b == b'\n').collect(),
        None if bytes.is_empty() => Vec::new(),
        None => bytes.split(|&b| b == b'\n').collect(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The content of automatic message `n`.
fn numbered(n: u64) -> String {
    format!("msg-{n:08}")
}

/// A port nothing listens on (one the kernel just handed out and took back).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn assert_success(output: &Output, what: &str) {
    assert!(output.status.success(), "{what}:\n{}", show(output));
}

#[test]
fn piped_lines_are_sent_until_q_and_summarized() {
    let dir = TestDir::new("cl-piped");
    let broker = Broker::start(&dir, &[]);
    let producer = run_at("producer", &broker, &[], b"a\nb:c\n\nq\nnot sent\n");
    assert_success(&producer, "producer");
    assert!(
        text(&producer.stderr).contains("sent 2, acknowledged 2, errors 0"),
        "{}",
        show(&producer)
    );
    assert!(
        producer.stdout.is_empty(),
        "no prompt or ids with a pipe:\n{}",
        show(&producer)
    );
    assert_eq!(broker.stat("next_id"), 3, "exactly two messages stored");
    let consumer = run_at("consumer", &broker, &["--id", "p", "--count", "2"], b"");
    assert_success(&consumer, "consumer");
    assert_eq!(text(&consumer.stdout), "a\nb:c\n");

    // End of input without `q`, and a last line without its newline.
    let producer = run_at("producer", &broker, &[], b"x\ny");
    assert_success(&producer, "producer without q");
    assert!(
        text(&producer.stderr).contains("sent 2, acknowledged 2, errors 0"),
        "{}",
        show(&producer)
    );
    let consumer = run_at("consumer", &broker, &["--id", "p", "--count", "2"], b"");
    assert_success(&consumer, "consumer");
    assert_eq!(text(&consumer.stdout), "x\ny\n");
}

#[test]
fn a_rejected_message_makes_the_exit_status_1() {
    let dir = TestDir::new("cl-rejected");
    let broker = Broker::start(&dir, &["--max-msg-size", "16"]);
    let long = "x".repeat(40);
    let input = format!("short\n{long}\nalso short\n");
    let producer = run_at("producer", &broker, &[], input.as_bytes());
    assert_eq!(producer.status.code(), Some(1), "{}", show(&producer));
    let stderr = text(&producer.stderr);
    assert!(
        stderr.contains("message 2 rejected: Message too large"),
        "{stderr}"
    );
    assert!(
        stderr.contains("sent 3, acknowledged 2, errors 1"),
        "{stderr}"
    );
    let consumer = run_at("consumer", &broker, &["--id", "r", "--count", "2"], b"");
    assert_success(&consumer, "consumer");
    assert_eq!(text(&consumer.stdout), "short\nalso short\n");
}

#[test]
fn contents_arrive_byte_for_byte() {
    let dir = TestDir::new("cl-bytes");
    let broker = Broker::start(&dir, &[]);
    let contents: Vec<&[u8]> = vec![
        b"colons:in:the:middle:",
        b":leading colon",
        b"  spaces  inside and around  ",
        "ñandú, 日本語, 🚀".as_bytes(),
        b"raw \xff\xfe bytes \x80\x00 end",
        b"tab\there",
        b"q ",
        b"SEND:looks like a command",
        b"crlf line",
    ];
    let mut input = Vec::new();
    for content in &contents {
        input.extend_from_slice(content);
        // The last one ends CRLF: its `\r` is not content.
        input.extend_from_slice(if content == b"crlf line" {
            b"\r\n"
        } else {
            b"\n"
        });
    }
    let producer = run_at("producer", &broker, &[], &input);
    assert_success(&producer, "producer");
    let count = contents.len().to_string();
    let consumer = run_at("consumer", &broker, &["--count", &count], b"");
    assert_success(&consumer, "consumer");
    assert_eq!(lines(&consumer.stdout), contents, "{}", show(&consumer));
}

#[test]
fn automatic_mode_paces_numbered_messages_and_summarizes() {
    let dir = TestDir::new("cl-auto");
    let broker = Broker::start(&dir, &[]);
    let started = Instant::now();
    let producer = run_at("producer", &broker, &["-n", "5", "-i", "100"], b"");
    let elapsed = started.elapsed();
    assert_success(&producer, "producer");
    assert!(
        elapsed >= Duration::from_millis(400),
        "5 messages 100 ms apart took {elapsed:?}"
    );
    let summary = text(&producer.stderr);
    let summary = summary.lines().last().unwrap_or("");
    for part in [
        "sent 5",
        "acknowledged 5",
        "errors 0",
        "elapsed ",
        " s, ",
        "msgs/s",
    ] {
        assert!(summary.contains(part), "summary lacks {part:?}: {summary}");
    }
    let consumer = run_at("consumer", &broker, &["--id", "a", "--count", "5"], b"");
    assert_success(&consumer, "consumer");
    let want: Vec<String> = (1..=5).map(numbered).collect();
    assert_eq!(
        lines(&consumer.stdout),
        want.iter().map(|s| s.as_bytes()).collect::<Vec<_>>()
    );
}

#[test]
fn automatic_mode_fills_a_window_and_pads() {
    let dir = TestDir::new("cl-window");
    let broker = Broker::start(&dir, &[]);
    let producer = run_at(
        "producer",
        &broker,
        &["-n", "500", "-i", "0", "--window", "32"],
        b"",
    );
    assert_success(&producer, "producer");
    assert!(
        text(&producer.stderr).contains("sent 500, acknowledged 500, errors 0"),
        "{}",
        show(&producer)
    );
    let consumer = run_at("consumer", &broker, &["--id", "w", "--count", "500"], b"");
    assert_success(&consumer, "consumer");
    let want: Vec<String> = (1..=500).map(numbered).collect();
    assert_eq!(
        lines(&consumer.stdout),
        want.iter().map(|s| s.as_bytes()).collect::<Vec<_>>()
    );

    let producer = run_at(
        "producer",
        &broker,
        &["-n", "3", "-i", "0", "--size", "100"],
        b"",
    );
    assert_success(&producer, "producer --size");
    let consumer = run_at("consumer", &broker, &["--id", "w", "--count", "3"], b"");
    assert_success(&consumer, "consumer");
    let got = lines(&consumer.stdout);
    assert_eq!(got.len(), 3, "{}", show(&consumer));
    for (n, line) in (1..).zip(got) {
        let prefix = numbered(n);
        assert_eq!(line.len(), 100, "{}", text(line));
        assert!(line.starts_with(prefix.as_bytes()), "{}", text(line));
        assert!(
            line[prefix.len()..].iter().all(|&b| b == b'.'),
            "{}",
            text(line)
        );
    }
}

#[test]
fn consumer_count_timeout_verbose_and_id() {
    let dir = TestDir::new("cl-consumer");
    let broker = Broker::start(&dir, &[]);
    // Register the cursors first, so every id sees all ten messages.
    for id in ["shared", "v"] {
        let mut client = broker.consumer(id);
        client.send("QUIT");
    }
    let input: String = (1..=10).map(|n| format!("m{n}\n")).collect();
    assert_success(
        &run_at("producer", &broker, &[], input.as_bytes()),
        "producer",
    );

    // --count 4 takes four and leaves the rest to the same id.
    let first = run_at(
        "consumer",
        &broker,
        &["--id", "shared", "--count", "4"],
        b"",
    );
    assert_success(&first, "consumer --count 4");
    assert_eq!(text(&first.stdout), "m1\nm2\nm3\nm4\n");
    assert!(
        text(&first.stderr).contains("registered as consumer shared"),
        "{}",
        show(&first)
    );
    let started = Instant::now();
    let rest = run_at(
        "consumer",
        &broker,
        &["--id", "shared", "--timeout", "1"],
        b"",
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_success(&rest, "consumer --timeout 1");
    assert_eq!(text(&rest.stdout), "m5\nm6\nm7\nm8\nm9\nm10\n");

    // --verbose: the message id, a tab, the content.
    let verbose = run_at(
        "consumer",
        &broker,
        &["--id", "v", "--count", "2", "--verbose"],
        b"",
    );
    assert_success(&verbose, "consumer --verbose");
    assert_eq!(text(&verbose.stdout), "1\tm1\n2\tm2\n");

    // Without --id the broker assigns one, reported on stderr.
    let fresh = run_at("consumer", &broker, &["--timeout", "1"], b"");
    assert_success(&fresh, "consumer without --id");
    let stderr = text(&fresh.stderr);
    let assigned = stderr
        .lines()
        .find_map(|line| line.strip_prefix("consumer: registered as consumer "))
        .unwrap_or_else(|| panic!("no assigned id:\n{stderr}"));
    assert!(
        !assigned.is_empty()
            && assigned
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "{assigned:?}"
    );
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    for program in ["producer", "consumer"] {
        for flag in ["-h", "--help"] {
            let output = run(program, &[flag], &[], b"");
            assert_success(&output, &format!("{program} {flag}"));
            let help = text(&output.stdout);
            assert!(help.starts_with(&format!("usage: {program}")), "{help}");
            for option in ["--host", "--port", "--retries", "--heartbeat", "--help"] {
                assert!(
                    help.contains(option),
                    "{program} help lacks {option}:\n{help}"
                );
            }
            assert!(output.stderr.is_empty(), "{}", show(&output));
        }
    }
    let help = text(&run("producer", &["--help"], &[], b"").stdout);
    for option in ["--count", "--interval", "--window", "--size"] {
        assert!(help.contains(option), "producer help lacks {option}");
    }
    let help = text(&run("consumer", &["--help"], &[], b"").stdout);
    for option in ["--id", "--count", "--timeout", "--verbose"] {
        assert!(help.contains(option), "consumer help lacks {option}");
    }
}

#[test]
fn bad_options_exit_2_with_one_line_and_the_usage() {
    // Program, arguments, environment, what the error line must name.
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [(&'a str, &'a str)],
        &'a [&'a str],
    );
    let cases: &[Case] = &[
        ("producer", &["--window", "0"], &[], &["--window", "'0'"]),
        ("producer", &["-n", "x"], &[], &["--count", "'x'"]),
        ("producer", &["-n", "0"], &[], &["--count", "'0'"]),
        ("producer", &["-i", "soon"], &[], &["--interval", "'soon'"]),
        ("producer", &["--port", "0"], &[], &["--port", "'0'"]),
        (
            "producer",
            &["--port", "65536"],
            &[],
            &["--port", "'65536'"],
        ),
        (
            "producer",
            &["--heartbeat", "0"],
            &[],
            &["--heartbeat", "'0'"],
        ),
        ("producer", &["--frobnicate"], &[], &["--frobnicate"]),
        ("producer", &["--port"], &[], &["--port"]),
        ("producer", &["extra"], &[], &["extra"]),
        (
            "producer",
            &[],
            &[("BROKER_PORT", "eighty")],
            &["BROKER_PORT", "'eighty'"],
        ),
        ("consumer", &["--id", "bad id"], &[], &["--id", "'bad id'"]),
        ("consumer", &["--id", ""], &[], &["--id"]),
        ("consumer", &["--count", "0"], &[], &["--count", "'0'"]),
        ("consumer", &["--timeout", "x"], &[], &["--timeout", "'x'"]),
        ("consumer", &["--window", "0"], &[], &["--window", "'0'"]),
        ("consumer", &["--port", "0"], &[], &["--port", "'0'"]),
        ("consumer", &["-x"], &[], &["-x"]),
        (
            "consumer",
            &[],
            &[("SERVER_PORT", "0")],
            &["SERVER_PORT", "'0'"],
        ),
    ];
    for (program, args, env, named) in cases {
        let output = run(program, args, env, b"");
        let stderr = text(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{program} {args:?} {env:?}\n{}",
            show(&output)
        );
        assert!(
            output.stdout.is_empty(),
            "{program} {args:?}: stdout\n{}",
            show(&output)
        );
        let mut stderr_lines = stderr.lines();
        let first = stderr_lines.next().unwrap_or("");
        assert!(
            first.starts_with(&format!("{program}: ")),
            "{program} {args:?}: {first}"
        );
        for name in *named {
            assert!(
                first.contains(name),
                "{program} {args:?}: {first:?} does not name {name}"
            );
        }
        assert_eq!(
            stderr_lines.next(),
            Some(""),
            "{program} {args:?}: the error is one line\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("usage: {program}")),
            "{program} {args:?}: no usage\n{stderr}"
        );
    }
}

#[test]
fn environment_points_the_clients_and_options_win() {
    let dir = TestDir::new("cl-env");
    let broker = Broker::start(&dir, &[]);
    let port = broker.port.to_string();
    let dead = closed_port().to_string();
    // The cursor exists before anything is sent, so it sees every message.
    broker.consumer("e").send("QUIT");
    // --retries 0: a wrong endpoint fails fast instead of retrying.
    let consume_one = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--id", "e", "--count", "1", "--retries", "0"];
        all.extend_from_slice(args);
        let output = run("consumer", &all, env, b"");
        assert_success(&output, &format!("consumer {args:?} {env:?}"));
        text(&output.stdout)
    };

    let broker_env = [("BROKER_HOST", "127.0.0.1"), ("BROKER_PORT", port.as_str())];
    let producer = run("producer", &["--retries", "0"], &broker_env, b"one\n");
    assert_success(&producer, "producer with BROKER_HOST/BROKER_PORT");
    assert_eq!(consume_one(&[], &broker_env), "one\n");

    let producer = run("producer", &["--retries", "0"], &broker_env, b"two\n");
    assert_success(&producer, "producer");
    let server_env = [("SERVER_IP", "127.0.0.1"), ("SERVER_PORT", port.as_str())];
    assert_eq!(consume_one(&[], &server_env), "two\n");

    // BROKER_* before SERVER_*, and options before both.
    let producer = run("producer", &["--retries", "0"], &broker_env, b"three\n");
    assert_success(&producer, "producer");
    let mixed = [
        ("BROKER_HOST", "127.0.0.1"),
        ("BROKER_PORT", port.as_str()),
        ("SERVER_IP", "127.0.0.2"),
        ("SERVER_PORT", dead.as_str()),
    ];
    assert_eq!(consume_one(&[], &mixed), "three\n");

    let wrong = [
        ("BROKER_HOST", "127.0.0.2"),
        ("BROKER_PORT", dead.as_str()),
        ("SERVER_IP", "127.0.0.2"),
        ("SERVER_PORT", dead.as_str()),
    ];
    let options = ["--host", "127.0.0.1", "--port", port.as_str()];
    let producer = run(
        "producer",
        &[&options[..], &["--retries", "0"]].concat(),
        &wrong,
        b"four\n",
    );
    assert_success(&producer, "producer with options over a wrong environment");
    assert_eq!(consume_one(&options, &wrong), "four\n");

    // And the wrong environment alone does fail.
    let producer = run("producer", &["--retries", "0"], &wrong, b"five\n");
    assert_eq!(producer.status.code(), Some(1), "{}", show(&producer));
}

#[test]
fn producer_and_consumer_survive_broker_crashes() {
    let dir = TestDir::new("cl-crash");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    let consumer = Running::start(
        "consumer",
        &at(&broker, &["--id", "r", "--count", "300"]),
        &[],
    );
    let producer = Running::start("producer", &at(&broker, &["-n", "300", "-i", "5"]), &[]);
    for printed in [60, 160] {
        consumer.wait_for(&format!("{printed} lines"), |stdout, _| {
            lines(stdout).len() >= printed
        });
        broker.kill();
        broker.restart();
    }
    let produced = producer.finish(WAIT);
    let consumed = consumer.finish(WAIT);
    assert_success(&produced, "producer");
    assert_success(&consumed, "consumer");
    let producer_log = text(&produced.stderr);
    let consumer_log = text(&consumed.stderr);
    assert!(
        producer_log.contains("acknowledged 300, errors 0"),
        "{producer_log}"
    );
    assert!(
        producer_log.contains("reconnecting"),
        "no reconnect line:\n{producer_log}"
    );
    assert!(
        consumer_log.contains("reconnecting"),
        "no reconnect line:\n{consumer_log}"
    );
    assert!(
        consumer_log.matches("registered as consumer r").count() >= 2,
        "{consumer_log}"
    );
    let printed = lines(&consumed.stdout);
    assert_eq!(printed.len(), 300, "{}", show(&consumed));

    // A message the producer resent may be stored twice, so 300 lines may
    // hold a duplicate and leave a message for later: drain what is left.
    let seen: BTreeSet<&[u8]> = printed.iter().copied().collect();
    let duplicates = printed.len() - seen.len();
    let resent: usize = producer_log
        .lines()
        .last()
        .and_then(|summary| {
            summary
                .split(", ")
                .find_map(|part| part.strip_prefix("resent "))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resent count in the summary:\n{producer_log}"));
    // Redeliveries of the same stored message are skipped by the consumer:
    // only the producer's resends can show twice.
    assert!(
        duplicates <= resent,
        "{duplicates} duplicates but only {resent} resent\n{consumer_log}"
    );
    let drained = run_at("consumer", &broker, &["--id", "r", "--timeout", "1"], b"");
    assert_success(&drained, "draining consumer");
    let mut all: BTreeSet<Vec<u8>> = seen.iter().map(|line| line.to_vec()).collect();
    all.extend(lines(&drained.stdout).into_iter().map(<[u8]>::to_vec));
    let missing: Vec<String> = (1..=300)
        .map(numbered)
        .filter(|content| !all.contains(content.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "never delivered: {missing:?}\nconsumer:\n{consumer_log}\nproducer:\n{producer_log}"
    );
}

#[test]
fn retries_are_bounded_with_a_line_per_attempt() {
    let port = closed_port().to_string();
    for (program, extra) in [("producer", &["-n", "1"][..]), ("consumer", &[][..])] {
        let args = [
            &[
                "--host",
                "127.0.0.1",
                "--port",
                port.as_str(),
                "--retries",
                "2",
            ][..],
            extra,
        ]
        .concat();
        let started = Instant::now();
        let output = run(program, &args, &[], b"");
        // Waits of 50-100 ms, then 100-200 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{program}: no backoff"
        );
        assert_eq!(
            output.status.code(),
            Some(1),
            "{program}\n{}",
            show(&output)
        );
        let stderr = text(&output.stderr);
        let retries: Vec<&str> = stderr
            .lines()
            .filter(|line| line.contains("; retry "))
            .collect();
        assert_eq!(
            retries.len(),
            2,
            "{program}: one line per failed attempt\n{stderr}"
        );
        assert!(
            retries[0].contains("retry 1 in ") && retries[1].contains("retry 2 in "),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("{program}: giving up")),
            "{stderr}"
        );
        assert!(output.stdout.is_empty(), "{}", show(&output));
    }
}

#[test]
fn server_full_is_retried_with_backoff_not_spun_on() {
    let dir = TestDir::new("cl-full");
    let broker = Broker::start(&dir, &["--max-clients", "2"]);
    let mut held = broker.producer();
    let other = broker.producer();
    let consumer = Running::start(
        "consumer",
        &at(&broker, &["--id", "f", "--count", "1"]),
        &[],
    );
    consumer.wait_for("two refusals", |_, stderr| stderr.contains("retry 2 in "));
    drop(other);
    consumer.wait_for("registration", |_, stderr| {
        stderr.contains("registered as consumer f")
    });
    held.expect("SEND:in at last", "OK:MSG_ID:1");
    let output = consumer.finish(WAIT);
    assert_success(&output, "consumer");
    assert_eq!(text(&output.stdout), "in at last\n");
    let stderr = text(&output.stderr);
    let attempts = stderr
        .lines()
        .filter(|line| line.contains("; retry "))
        .count() as u64;
    assert!(stderr.contains("Server is full"), "{stderr}");
    held.send("STATS");
    let refused = stat_value(&held.reply(), "refused_full");
    assert_eq!(
        refused, attempts,
        "each refusal is one attempt with one line:\n{stderr}"
    );
}

#[test]
fn queue_full_is_retried_until_a_consumer_makes_room() {
    let dir = TestDir::new("cl-queue-full");
    let broker = Broker::start(&dir, &["--capacity", "5", "--send-timeout", "100"]);
    let producer = Running::start("producer", &at(&broker, &["-n", "20", "-i", "0"]), &[]);
    producer.wait_for("a Queue full", |_, stderr| {
        stderr.contains("ERROR:Queue full")
    });
    let consumer = run_at("consumer", &broker, &["--id", "q", "--count", "20"], b"");
    assert_success(&consumer, "consumer");
    let produced = producer.finish(WAIT);
    assert_success(&produced, "producer");
    assert!(
        text(&produced.stderr).contains("sent 20, acknowledged 20, errors 0"),
        "{}",
        show(&produced)
    );
    let got: Vec<&[u8]> = lines(&consumer.stdout);
    let unique: BTreeSet<&[u8]> = got.iter().copied().collect();
    let want: Vec<String> = (1..=20).map(numbered).collect();
    assert_eq!(got.len(), 20, "{}", show(&consumer));
    assert_eq!(
        unique,
        want.iter().map(|s| s.as_bytes()).collect::<BTreeSet<_>>()
    );
}

#[test]
fn idle_clients_heartbeat_through_a_short_idle_timeout() {
    let dir = TestDir::new("cl-heartbeat");
    let broker = Broker::start(&dir, &["--idle-timeout", "2"]);
    let consumer = Running::start(
        "consumer",
        &at(&broker, &["--id", "hb", "--count", "1", "--heartbeat", "1"]),
        &[],
    );
    let mut producer = Running::start("producer", &at(&broker, &["--heartbeat", "1"]), &[]);
    consumer.wait_for("registration", |_, stderr| {
        stderr.contains("registered as consumer hb")
    });
    // The idle spell this test is about: well past the idle timeout.
    std::thread::sleep(Duration::from_secs(5));
    producer.write_stdin(b"after idling\nq\n");
    let produced = producer.finish(WAIT);
    let consumed = consumer.finish(WAIT);
    assert_success(&produced, "producer");
    assert_success(&consumed, "consumer");
    assert_eq!(text(&consumed.stdout), "after idling\n");
    for output in [&produced, &consumed] {
        let stderr = text(&output.stderr);
        assert!(
            !stderr.contains("lost the connection") && !stderr.contains("dropped"),
            "{stderr}"
        );
    }
    assert_eq!(
        text(&consumed.stderr)
            .matches("registered as consumer")
            .count(),
        1
    );
    assert!(text(&produced.stderr).contains("sent 1, acknowledged 1, errors 0, resent 0"));
    assert_eq!(broker.stat("idle_drops"), 0);
}

#[test]
fn without_heartbeat_option_the_producer_adapts_to_the_idle_timeout() {
    let dir = TestDir::new("cl-adapt");
    let broker = Broker::start(&dir, &["--idle-timeout", "1"]);
    broker.consumer("ad").send("QUIT");
    let mut producer = Running::start("producer", &at(&broker, &[]), &[]);
    // 20 s halves to 10, 5, 2.5, 1.25, then 0.625 s: under the broker's 1 s.
    producer.wait_for("the heartbeat to adapt", |_, stderr| {
        stderr.contains("heartbeats now every 625 ms")
    });
    producer.write_stdin(b"still here\nq\n");
    let produced = producer.finish(WAIT);
    assert_success(&produced, "producer");
    assert!(
        text(&produced.stderr).contains("acknowledged 1, errors 0"),
        "{}",
        show(&produced)
    );
    let consumer = run_at("consumer", &broker, &["--id", "ad", "--count", "1"], b"");
    assert_success(&consumer, "consumer");
    assert_eq!(text(&consumer.stdout), "still here\n");
}
