//! `consumer --to-nats` against real `nats-server -js` processes (Debian
//! package `nats-server`): the stream must hold exactly the messages sent,
//! once each, in order, byte for byte, after forwarder kills, a broker
//! kill, a NATS server stopped and started again on its store, and a
//! restart after the duplicate window passed. The stream is read back with
//! a minimal NATS client of the tests' own (`NatsClient`, plain
//! `TcpStream`), not with the code under test.
//!
//! A missing `nats-server` fails these tests with a message naming the
//! package; they never skip. Every server gets its own store directory
//! and a port the kernel picked (`-p -1`, read from its log on stderr).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::util::{Broker, TestDir, WAIT, client_command, eventually, stat_value, wait_child};

/// A `nats-server -js` of the test's own, killed when dropped.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    args: Vec<String>,
}

impl NatsServer {
    fn start(dir: &TestDir, args: &[&str]) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: 0,
            store: dir.join("jetstream"),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        server.launch(None);
        server
    }

    /// Starts the server (on `port`, or one the kernel picks) and waits for
    /// its "Server is ready" line on stderr.
    fn launch(&mut self, port: Option<u16>) {
        let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
        let spawned = Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(&self.store)
            .args(["-p", &port_arg, "-a", "127.0.0.1"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => panic!(
                "cannot run nats-server ({err}): install the Debian package 'nats-server' \
                 (apt-get install -y nats-server); ./build.sh test does that when run as root"
            ),
        };
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Drains the log for the server's whole life, so it never blocks on
        // a full pipe; the test only looks at the first lines.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("nats-server did not get ready:\n{}", seen.join("\n")));
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                self.port = rest.rsplit(':').next().unwrap().trim().parse().unwrap();
            }
            if line.contains("Server is ready") {
                assert_ne!(self.port, 0, "no port in the log:\n{}", seen.join("\n"));
                return;
            }
            seen.push(line);
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (a clean stop: JetStream flushes its store), bounded.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            mensajeria::sys::os::request_stop(child.id(), false).unwrap();
            if wait_child(&mut child, WAIT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server did not stop within {WAIT:?}");
            }
        }
    }

    /// Starts again on the same store and port.
    fn restart(&mut self) {
        assert!(self.child.is_none());
        let port = self.port;
        self.launch(Some(port));
    }

    fn client(&self) -> NatsClient {
        NatsClient::connect(self.port, "")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The tests' own NATS client: CONNECT, requests with a reply inbox.
struct NatsClient {
    stream: TcpStream,
    buf: Vec<u8>,
    next: u64,
}

impl NatsClient {
    fn connect(port: u16, auth_json: &str) -> NatsClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut client = NatsClient {
            stream,
            buf: Vec::new(),
            next: 0,
        };
        let info = client.control_line();
        assert!(info.starts_with("INFO "), "{info}");
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"headers\":true,\"no_responders\":true{auth_json}}}\r\nPING\r\n"
        );
        client.stream.write_all(connect.as_bytes()).unwrap();
        loop {
            match client.control_line().as_str() {
                "PONG" => break,
                "PING" => client.stream.write_all(b"PONG\r\n").unwrap(),
                other => panic!("NATS said {other}"),
            }
        }
        client.stream.write_all(b"SUB _INBOX.test.> 1\r\n").unwrap();
        client
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).expect("NATS read");
        assert!(n > 0, "NATS closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    fn control_line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return line;
            }
            self.fill();
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n + 2 {
            self.fill();
        }
        let bytes = self.buf[..n].to_vec();
        self.buf.drain(..n + 2);
        bytes
    }

    /// Sends many requests at once; returns the replies' payloads in order.
    fn requests(&mut self, requests: &[(String, String)]) -> Vec<String> {
        let first = self.next;
        let mut out = Vec::new();
        for (subject, payload) in requests {
            out.extend_from_slice(
                format!(
                    "PUB {subject} _INBOX.test.{} {}\r\n{payload}\r\n",
                    self.next,
                    payload.len()
                )
                .as_bytes(),
            );
            self.next += 1;
        }
        self.stream.write_all(&out).unwrap();
        let mut replies = vec![None; requests.len()];
        let mut got = 0;
        while got < requests.len() {
            let line = self.control_line();
            let fields: Vec<&str> = line.split(' ').collect();
            let body = match fields[0] {
                "PING" => {
                    self.stream.write_all(b"PONG\r\n").unwrap();
                    continue;
                }
                "MSG" => self.take(fields[fields.len() - 1].parse().unwrap()),
                "HMSG" => {
                    let body = self.take(fields[fields.len() - 1].parse().unwrap());
                    let headers: usize = fields[fields.len() - 2].parse().unwrap();
                    body[headers..].to_vec()
                }
                _ => continue,
            };
            let n: u64 = fields[1].rsplit('.').next().unwrap().parse().unwrap();
            replies[(n - first) as usize] = Some(String::from_utf8(body).unwrap());
            got += 1;
        }
        replies.into_iter().map(Option::unwrap).collect()
    }

    fn request(&mut self, subject: &str, payload: &str) -> String {
        self.requests(&[(subject.to_string(), payload.to_string())])
            .remove(0)
    }

    /// Messages in the stream (`state.messages`).
    fn count(&mut self, stream: &str) -> u64 {
        let info = self.request(&format!("$JS.API.STREAM.INFO.{stream}"), "");
        if info.contains("\"error\"") {
            return 0;
        }
        json_u64(&info, "state", "messages").unwrap_or_else(|| panic!("{info}"))
    }

    /// Every message of the stream, in order: (Nats-Msg-Id, payload).
    fn messages(&mut self, stream: &str) -> Vec<(String, Vec<u8>)> {
        let info = self.request(&format!("$JS.API.STREAM.INFO.{stream}"), "");
        let last = json_u64(&info, "state", "last_seq").unwrap();
        let mut all = Vec::new();
        let subject = format!("$JS.API.STREAM.MSG.GET.{stream}");
        let seqs: Vec<u64> = (1..=last).collect();
        for chunk in seqs.chunks(500) {
            let requests: Vec<(String, String)> = chunk
                .iter()
                .map(|seq| (subject.clone(), format!("{{\"seq\":{seq}}}")))
                .collect();
            for reply in self.requests(&requests) {
                let headers = base64(json_string(&reply, "hdrs").unwrap_or_default());
                let headers = String::from_utf8(headers).unwrap();
                let id = headers
                    .lines()
                    .find_map(|l| l.strip_prefix("Nats-Msg-Id: "))
                    .unwrap_or_else(|| panic!("no Nats-Msg-Id in {reply}"))
                    .to_string();
                all.push((id, base64(json_string(&reply, "data").unwrap_or_default())));
            }
        }
        all
    }
}

/// The number after `"key":` following `"anchor"` in a JSON text.
fn json_u64(text: &str, anchor: &str, key: &str) -> Option<u64> {
    let from = text.find(&format!("\"{anchor}\""))?;
    let rest = &text[from..];
    let at = rest.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = rest[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The string after `"key":"` (base64 never holds quotes or escapes).
fn json_string<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = text[at..].find('"')?;
    Some(&text[at..at + end])
}

fn base64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c).expect("base64") as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// Contents with the awkward bytes the protocol allows: colons, spaces,
/// non-UTF-8, and sizes from 1 byte up.
fn contents(count: usize, seed: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut c = format!("m{seed}-{i}:a b:").into_bytes();
            c.extend(std::iter::repeat_n(b'.', (i * 7) % 90));
            c.push(0xff);
            c.push(b'\t');
            c
        })
        .collect()
}

/// Sends every content through a raw producer connection, pipelined.
fn send_all(broker: &Broker, contents: &[Vec<u8>]) {
    send_on(&mut broker.producer(), contents);
}

/// Sends every content on a registered producer connection, pipelined.
fn send_on(producer: &mut crate::util::Client, contents: &[Vec<u8>]) {
    for chunk in contents.chunks(256) {
        let mut out = Vec::new();
        for content in chunk {
            out.extend_from_slice(b"SEND:");
            out.extend_from_slice(content);
            out.push(b'\n');
        }
        producer.send_bytes(&out);
        for _ in chunk {
            let reply = producer.line();
            assert!(reply.starts_with("OK:MSG_ID:"), "{reply}");
        }
    }
}

/// A forwarder process, its stderr in a file; killed when dropped.
struct Forwarder {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Forwarder {
    fn start(dir: &TestDir, broker: &Broker, url: &str, args: &[&str]) -> Forwarder {
        let stderr = dir.join(&format!("forwarder-{}.stderr", rand_suffix()));
        let port = broker.port.to_string();
        let mut all = vec!["--host", "127.0.0.1", "--port", &port, "--to-nats", url];
        all.extend_from_slice(args);
        let mut command = client_command("consumer", &all, &[]);
        command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        Forwarder {
            child: Some(command.spawn().unwrap()),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and the exit status, bounded.
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        mensajeria::sys::os::request_stop(child.id(), false).unwrap();
        wait_child(&mut child, WAIT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("forwarder did not stop:\n{}", self.stderr())
        })
    }

    /// Waits (bounded) for it to exit by itself.
    fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_child(&mut child, WAIT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("forwarder did not exit:\n{}", self.stderr())
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.kill();
    }
}

fn rand_suffix() -> u128 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    u128::from(N.fetch_add(1, Ordering::Relaxed))
}

fn instance(broker: &Broker) -> String {
    let mut client = broker.connect();
    client.send("STATS");
    let line = client.line();
    let _ = stat_value(&line, "next_id");
    line.split(' ')
        .find_map(|pair| pair.strip_prefix("instance="))
        .unwrap_or_else(|| panic!("no instance in {line}"))
        .to_string()
}

/// The stream holds exactly `expected`, once each, in order, byte for byte.
fn assert_exactly_once(nats: &mut NatsClient, stream: &str, instance: &str, expected: &[Vec<u8>]) {
    let messages = nats.messages(stream);
    assert_eq!(messages.len(), expected.len(), "message count in {stream}");
    for (i, ((id, data), want)) in messages.iter().zip(expected).enumerate() {
        assert_eq!(
            id,
            &format!("{instance}-{}", i + 1),
            "message {} of {stream}",
            i + 1
        );
        assert_eq!(data, want, "content of message {}", i + 1);
    }
}

fn wait_count(nats: &mut NatsClient, stream: &str, at_least: u64, forwarder: &Forwarder) {
    let deadline = Instant::now() + WAIT;
    loop {
        if nats.count(stream) >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not reach {at_least} messages:\n{}",
            forwarder.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The end of a scenario: the stream holds as many as `expected` and the
/// broker has every one acknowledged; SIGTERM then ends the forwarder with
/// status 0, and the stream holds `expected` exactly once, in order.
/// Returns the forwarder's stderr, for checks of its own.
fn finish(
    forwarder: &mut Forwarder,
    nats: &mut NatsClient,
    broker: &Broker,
    stream: &str,
    expected: &[Vec<u8>],
) -> String {
    wait_count(nats, stream, expected.len() as u64, forwarder);
    eventually("every message acknowledged to the broker", || {
        broker.stat("messages") == 0
    });
    let status = forwarder.terminate();
    let stderr = forwarder.stderr();
    assert!(status.success(), "{status}\n{stderr}");
    assert_exactly_once(nats, stream, &instance(broker), expected);
    stderr
}

/// The broker's instance file exists, mode 0600.
fn assert_instance_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", path.display());
}

#[test]
fn nats_forward_exactly_once_through_forwarder_kills() {
    let dir = TestDir::new("nats-kills");
    let broker = Broker::start(&dir, &["--capacity", "32767"]);
    let server = NatsServer::start(&dir, &[]);
    let mut nats = server.client();
    let sent = contents(12_000, 1);
    send_all(&broker, &sent);
    let args = ["--id", "fwd", "--subject", "edge.kills", "--window", "32"];
    for threshold in [1_000, 4_000, 8_000] {
        let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
        wait_count(&mut nats, "edge_kills", threshold, &forwarder);
        forwarder.kill();
        // For the record (cargo test -- --nocapture): where the kill landed.
        eprintln!(
            "forwarder killed with {} of {} in the stream",
            nats.count("edge_kills"),
            sent.len()
        );
    }
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    let stderr = finish(&mut forwarder, &mut nats, &broker, "edge_kills", &sent);
    assert!(stderr.contains("resuming after id "), "{stderr}");
    assert!(stderr.contains("consumer: forwarded "), "{stderr}");
    assert!(stderr.contains("msgs/s"), "{stderr}");
    assert_instance_file(&dir.join("messages.dat.instance"));
}

#[test]
fn nats_forward_survives_a_broker_kill_and_a_nats_restart() {
    let dir = TestDir::new("nats-restarts");
    let mut broker = Broker::start(&dir, &["--capacity", "32767"]);
    let mut server = NatsServer::start(&dir, &[]);
    let first = contents(6_000, 2);
    send_all(&broker, &first);
    let args = [
        "--id",
        "fwd",
        "--subject",
        "edge.restarts",
        "--window",
        "32",
    ];
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    let mut nats = server.client();
    wait_count(&mut nats, "edge_restarts", 2_000, &forwarder);
    broker.kill();
    broker.restart();
    wait_count(&mut nats, "edge_restarts", first.len() as u64, &forwarder);
    drop(nats);
    // NATS away: the backlog builds up in our broker, and the forwarder
    // fails to reach NATS at least once before it comes back.
    let reconnects = |f: &Forwarder| f.stderr().matches("reconnecting in").count();
    let before = reconnects(&forwarder);
    server.stop();
    let second = contents(3_000, 3);
    send_all(&broker, &second);
    eventually("the forwarder failing to reach NATS", || {
        reconnects(&forwarder) >= before + 2
    });
    assert!(
        forwarder.stderr().contains("cannot connect to NATS"),
        "{}",
        forwarder.stderr()
    );
    server.restart();
    let mut nats = server.client();
    let all: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    finish(&mut forwarder, &mut nats, &broker, "edge_restarts", &all);
}

#[test]
fn nats_forward_skips_what_the_stream_holds_after_the_duplicate_window() {
    let dir = TestDir::new("nats-window");
    let mut broker = Broker::start(&dir, &["--capacity", "32767"]);
    let server = NatsServer::start(&dir, &[]);
    let mut nats = server.client();
    // A stream of the test's own: a wildcard subject and a one-second
    // duplicate window, so JetStream's own deduplication is over by the
    // time the forwarder comes back.
    let created = nats.request(
        "$JS.API.STREAM.CREATE.DW",
        r#"{"name":"DW","subjects":["edge.*"],"storage":"file","retention":"limits","discard":"old","num_replicas":1,"duplicate_window":1000000000}"#,
    );
    assert!(!created.contains("\"error\""), "{created}");
    let sent = contents(6_000, 4);
    send_all(&broker, &sent);
    let args = [
        "--id",
        "fwd",
        "--subject",
        "edge.dw",
        "--stream",
        "DW",
        "--window",
        "32",
    ];
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    wait_count(&mut nats, "DW", 2_000, &forwarder);
    // Both die: the broker redelivers from its last saved floor, which
    // lags what the forwarder had acked.
    forwarder.kill();
    broker.kill();
    let held = nats.count("DW");
    eprintln!(
        "forwarder and broker killed with {held} of {} in the stream",
        sent.len()
    );
    // The scenario needs the window to pass; this is not a readiness wait.
    std::thread::sleep(Duration::from_millis(2_500));
    broker.restart();
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    let stderr = finish(&mut forwarder, &mut nats, &broker, "DW", &sent);
    assert!(
        stderr.contains(&format!("resuming after id {held}")),
        "{held}\n{stderr}"
    );
    assert!(!stderr.contains("stream DW created"), "{stderr}");
    eprintln!("{stderr}");
    // A subject the stream does not cover: a clear refusal, exit 1.
    let mut wrong = Forwarder::start(
        &dir,
        &broker,
        &server.url(),
        &[
            "--id",
            "other",
            "--subject",
            "elsewhere.x",
            "--stream",
            "DW",
        ],
    );
    let status = wrong.wait();
    let stderr = wrong.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stream DW does not cover subject elsewhere.x (its subjects: edge.*)"),
        "{stderr}"
    );
}

#[test]
fn nats_forward_authenticates_with_user_password_or_token() {
    let dir = TestDir::new("nats-auth");
    let broker = Broker::start(&dir, &[]);
    // Both ids exist before anything is consumed, so each gets every message.
    for id in ["fwd", "fwd2"] {
        let mut client = broker.connect();
        client.expect(
            &format!("REGISTER:CONSUMER:{id}:ACK"),
            &format!("OK:CONSUMER:{id}"),
        );
    }
    let sent = contents(50, 5);
    send_all(&broker, &sent);
    let server = NatsServer::start(&dir, &["--user", "edge", "--pass", "s3cret"]);
    let url = format!("nats://edge:wrong@127.0.0.1:{}", server.port);
    let mut refused = Forwarder::start(
        &dir,
        &broker,
        &url,
        &["--id", "fwd", "--subject", "edge.auth"],
    );
    let status = refused.wait();
    let stderr = refused.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Authorization Violation"), "{stderr}");
    let url = format!("nats://edge:s3cret@127.0.0.1:{}", server.port);
    let mut forwarder = Forwarder::start(
        &dir,
        &broker,
        &url,
        &["--id", "fwd", "--subject", "edge.auth"],
    );
    let mut nats = NatsClient::connect(server.port, r#","user":"edge","pass":"s3cret""#);
    wait_count(&mut nats, "edge_auth", sent.len() as u64, &forwarder);
    assert!(forwarder.terminate().success());
    assert_exactly_once(&mut nats, "edge_auth", &instance(&broker), &sent);
    drop(server);

    let token_dir = TestDir::new("nats-token");
    let server = NatsServer::start(&token_dir, &["--auth", "t0ken"]);
    let token_file = token_dir.join("token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let token_path = token_file.to_str().unwrap();
    let mut forwarder = Forwarder::start(
        &token_dir,
        &broker,
        &server.url(),
        &[
            "--id",
            "fwd2",
            "--subject",
            "edge.token",
            "--nats-token-file",
            token_path,
        ],
    );
    let mut nats = NatsClient::connect(server.port, r#","auth_token":"t0ken""#);
    wait_count(&mut nats, "edge_token", sent.len() as u64, &forwarder);
    assert!(forwarder.terminate().success());
    assert_exactly_once(&mut nats, "edge_token", &instance(&broker), &sent);
}

/// A broker started with `--auth-token-file`: the forwarder sends the
/// token of `--token-file` first (issue 10), and forwards as usual.
#[test]
fn nats_forward_sends_the_broker_token_first() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("nats-broker-token");
    let token = dir.join("token");
    std::fs::write(&token, "forwarder-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token = token.to_str().unwrap().to_string();
    let broker = Broker::start(&dir, &["--auth-token-file", &token]);
    let authed = || {
        let mut client = broker.connect();
        client.expect("AUTH:forwarder-token-0123456789", "OK:AUTH");
        client
    };
    let mut producer = authed();
    producer.expect("REGISTER:PRODUCER", "OK:PRODUCER");
    let sent: Vec<Vec<u8>> = (1..=3).map(|n| format!("tok-{n}").into_bytes()).collect();
    for (n, content) in sent.iter().enumerate() {
        let content = String::from_utf8_lossy(content);
        producer.expect(&format!("SEND:{content}"), &format!("OK:MSG_ID:{}", n + 1));
    }
    let mut stats = authed();
    stats.send("STATS");
    let line = stats.line();
    let instance = line
        .split(' ')
        .find_map(|pair| pair.strip_prefix("instance="))
        .unwrap_or_else(|| panic!("no instance in {line}"))
        .to_string();
    let server = NatsServer::start(&dir, &[]);
    let mut nats = server.client();
    let args = [
        "--id",
        "fwd",
        "--subject",
        "edge.token",
        "--token-file",
        &token,
    ];
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    wait_count(&mut nats, "edge_token", 3, &forwarder);
    assert!(forwarder.terminate().success(), "{}", forwarder.stderr());
    assert_exactly_once(&mut nats, "edge_token", &instance, &sent);
}

/// `--count N`: the forwarder exits 0 by itself once N messages are in the
/// stream and acknowledged; the rest stays in our broker for the next run.
#[test]
fn nats_forward_count_exits_once_that_many_are_stored() {
    let dir = TestDir::new("nats-count");
    let broker = Broker::start(&dir, &[]);
    let server = NatsServer::start(&dir, &[]);
    let mut nats = server.client();
    let sent = contents(300, 6);
    send_all(&broker, &sent);
    let run = |count: &str| {
        let args = ["--id", "fwd", "--subject", "edge.count", "--count", count];
        let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
        let status = forwarder.wait();
        let stderr = forwarder.stderr();
        assert!(status.success(), "{status}\n{stderr}");
        assert!(
            stderr.contains(&format!("consumer: forwarded {count},")),
            "{stderr}"
        );
        assert!(stderr.contains("--count reached"), "{stderr}");
    };
    run("200");
    assert_eq!(nats.count("edge_count"), 200);
    eventually("the first 200 acknowledged to the broker", || {
        broker.stat("messages") == 100
    });
    run("100");
    assert_exactly_once(&mut nats, "edge_count", &instance(&broker), &sent);
    eventually("every message acknowledged to the broker", || {
        broker.stat("messages") == 0
    });
}

/// A user who may not publish on the subject: NATS answers `-ERR
/// 'Permissions Violation ...'`, which retrying cannot mend: one line and
/// exit 1, and our broker still holds every message.
#[test]
fn nats_forward_stops_on_a_permissions_violation() {
    let dir = TestDir::new("nats-permissions");
    let broker = Broker::start(&dir, &[]);
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        "authorization {\n  users = [\n    { user: edge, password: s3cret, permissions: {\n      \
         publish: { allow: [\"$JS.API.>\", \"edge.allowed\"] },\n      \
         subscribe: { allow: [\"_INBOX.>\"] } } }\n  ]\n}\n",
    )
    .unwrap();
    let server = NatsServer::start(&dir, &["-c", config.to_str().unwrap()]);
    let sent = contents(20, 7);
    send_all(&broker, &sent);
    let url = format!("nats://edge:s3cret@127.0.0.1:{}", server.port);
    let args = ["--id", "fwd", "--subject", "edge.denied"];
    let mut forwarder = Forwarder::start(&dir, &broker, &url, &args);
    let status = forwarder.wait();
    let stderr = forwarder.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Permissions Violation for Publish to \"edge.denied\""),
        "{stderr}"
    );
    assert!(!stderr.contains("reconnecting"), "not retried:\n{stderr}");
    assert_eq!(
        broker.stat("messages"),
        sent.len() as u64,
        "nothing acknowledged"
    );
}

/// Sends `signal` (STOP, CONT) to `pid` with the shell's `kill`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill -{signal} {pid}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A server that stops answering without closing the connection (SIGSTOP:
/// a hung host, a cable pulled behind a NAT): the forwarder's own PINGs go
/// unanswered, it drops the connection and reconnects with backoff; once
/// the server runs again everything is in the stream exactly once.
#[test]
fn nats_forward_detects_a_silent_server_and_resumes() {
    let dir = TestDir::new("nats-silent");
    let broker = Broker::start(&dir, &[]);
    let server = NatsServer::start(&dir, &[]);
    let pid = server.child.as_ref().unwrap().id();
    let mut nats = server.client();
    let first = contents(2_000, 8);
    send_all(&broker, &first);
    let args = ["--id", "fwd", "--subject", "edge.silent", "--window", "32"];
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    wait_count(&mut nats, "edge_silent", first.len() as u64, &forwarder);
    drop(nats);
    signal(pid, "STOP");
    let second = contents(500, 9);
    send_all(&broker, &second);
    eventually("the forwarder to give up on the silent server", || {
        forwarder
            .stderr()
            .contains("the NATS server did not answer 2 PINGs")
    });
    signal(pid, "CONT");
    let mut nats = server.client();
    let all: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    finish(&mut forwarder, &mut nats, &broker, "edge_silent", &all);
}

/// A server that PINGs every 100 ms and drops a connection after two
/// unanswered (far tighter than its default of 2 minutes): the forwarder
/// answers each PING, so an idle forwarder stays connected and still
/// forwards what comes later.
#[test]
fn nats_forward_answers_the_servers_pings() {
    let dir = TestDir::new("nats-pings");
    let broker = Broker::start(&dir, &[]);
    let config = dir.join("nats.conf");
    std::fs::write(&config, "ping_interval: \"100ms\"\nping_max: 2\n").unwrap();
    let server = NatsServer::start(&dir, &["-c", config.to_str().unwrap()]);
    let mut nats = server.client();
    let first = contents(10, 10);
    send_all(&broker, &first);
    let args = ["--id", "fwd", "--subject", "edge.pings"];
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    wait_count(&mut nats, "edge_pings", first.len() as u64, &forwarder);
    // Idle through some thirty of the server's PINGs: a scenario length,
    // not a readiness wait. (The tests' own client answers PINGs only
    // while it waits for a reply, so it goes, and comes back after.)
    drop(nats);
    std::thread::sleep(Duration::from_secs(3));
    let mut nats = server.client();
    let second = contents(10, 11);
    send_all(&broker, &second);
    let all: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    let stderr = finish(&mut forwarder, &mut nats, &broker, "edge_pings", &all);
    assert!(
        !stderr.contains("reconnecting"),
        "dropped as stale:\n{stderr}"
    );
}

/// A stream that takes no more (`max_msgs` 5, `discard: new`): JetStream
/// answers each publish past the limit with a PubAck error. The forwarder
/// says so, acknowledges to the broker only what was stored, and retries
/// with backoff; once the limit is lifted, everything arrives exactly once.
#[test]
fn nats_forward_retries_a_full_stream_until_it_has_room() {
    let dir = TestDir::new("nats-full");
    let broker = Broker::start(&dir, &[]);
    let server = NatsServer::start(&dir, &[]);
    let mut nats = server.client();
    let config = |max_msgs: i64| {
        format!(
            r#"{{"name":"FULL","subjects":["edge.full"],"storage":"file","retention":"limits","discard":"new","max_msgs":{max_msgs},"num_replicas":1,"duplicate_window":120000000000}}"#
        )
    };
    let created = nats.request("$JS.API.STREAM.CREATE.FULL", &config(5));
    assert!(!created.contains("\"error\""), "{created}");
    let sent = contents(40, 12);
    send_all(&broker, &sent);
    let args = [
        "--id",
        "fwd",
        "--subject",
        "edge.full",
        "--stream",
        "FULL",
        "--window",
        "8",
    ];
    let mut forwarder = Forwarder::start(&dir, &broker, &server.url(), &args);
    eventually("JetStream refusing the publishes past the limit", || {
        forwarder.stderr().matches("reconnecting in").count() >= 5
    });
    let stderr = forwarder.stderr();
    assert!(
        stderr.contains("JetStream refused the publish: maximum messages exceeded"),
        "{stderr}"
    );
    // The backoff grows across the refusals (100 ms doubling, each wait
    // between half and all of its step), though every cycle connected
    // fine. It starts afresh after a cycle that settled something: the
    // first stores five, and the second may skip those five again (their
    // acks can be lost with the first cycle), so by the fifth refusal at
    // least two have grown it: a wait of 200 ms or more.
    let waits: Vec<u64> = stderr
        .lines()
        .filter_map(|l| l.split("reconnecting in ").nth(1))
        .map(|rest| rest.trim_end_matches(" ms").parse().unwrap())
        .collect();
    assert!(waits.iter().any(|&ms| ms >= 200), "{waits:?}\n{stderr}");
    assert_eq!(nats.count("FULL"), 5);
    eventually("the five stored acknowledged, and no more", || {
        broker.stat("messages") == 35
    });
    let updated = nats.request("$JS.API.STREAM.UPDATE.FULL", &config(-1));
    assert!(!updated.contains("\"error\""), "{updated}");
    finish(&mut forwarder, &mut nats, &broker, "FULL", &sent);
}
