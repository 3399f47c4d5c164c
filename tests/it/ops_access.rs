//! Access control through the real binaries: `--auth-token-file` (AUTH
//! first, wrong or missing token closes), the clients' `--token-file` and
//! `BROKER_TOKEN_FILE` (also after a reconnection), and protected mode
//! seen from a non-loopback address of this machine.

use std::io::Read;
use std::net::{IpAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;

use crate::util::*;

const TOKEN: &str = "correct-horse-battery-staple";

/// Writes a token file with `mode`.
fn token_file(dir: &TestDir, name: &str, text: &str, mode: u32) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_str().unwrap().to_string()
}

/// Reads until the broker closes; a read timeout is a failure, not a
/// close.
fn closed_after(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return String::from_utf8_lossy(&text).into_owned(),
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                return String::from_utf8_lossy(&text).into_owned();
            }
            Err(err) => panic!(
                "not closed: {err}; got {:?}",
                String::from_utf8_lossy(&text)
            ),
        }
    }
}

#[test]
fn token_file_must_be_private_and_long_enough() {
    let dir = TestDir::new("auth-file");
    let messages = dir.join("m.dat");
    let messages = messages.to_str().unwrap();
    let open = token_file(&dir, "open", &format!("{TOKEN}\n"), 0o644);
    let short = token_file(&dir, "short", "tooshort\n", 0o600);
    let missing = dir.join("missing");
    for (file, says) in [
        (open.as_str(), "chmod 600"),
        (short.as_str(), "at least 16"),
        (missing.to_str().unwrap(), "No such file"),
    ] {
        let output = run("broker", &["--auth-token-file", file, messages], &[], b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}", show(&output));
        assert_eq!(stderr.lines().count(), 1, "{}", show(&output));
        assert!(
            stderr.starts_with("broker: ") && stderr.contains(says),
            "{stderr}"
        );
    }
}

#[test]
fn with_a_token_auth_must_come_first() {
    let dir = TestDir::new("auth-first");
    let file = token_file(&dir, "token", &format!("{TOKEN}\n"), 0o600);
    let broker = Broker::start(&dir, &["--auth-token-file", &file]);
    for first in [
        "STATS",
        "REGISTER:PRODUCER",
        "AUTH:wrong-token-of-some-length",
        "AUTH:",
    ] {
        let mut client = broker.connect();
        client.send(first);
        assert_eq!(
            client.line(),
            "ERROR:Authentication failed",
            "after {first}"
        );
        assert_eq!(closed_after(&mut client.stream), "", "after {first}");
    }
    let mut client = broker.connect();
    client.send(&format!("AUTH:{TOKEN}"));
    assert_eq!(client.line(), "OK:AUTH");
    client.expect("REGISTER:PRODUCER", "OK:PRODUCER");
    client.expect("SEND:hello", "OK:MSG_ID:1");
    // Pipelined behind the AUTH, in one write.
    let mut client = broker.connect();
    client.send(&format!("AUTH:{TOKEN}\nSTATS"));
    assert_eq!(client.line(), "OK:AUTH");
    assert!(client.line().starts_with("OK:STATS:"));
    // A later wrong AUTH closes too.
    client.send("AUTH:not-the-token-at-all");
    assert_eq!(client.line(), "ERROR:Authentication failed");
    assert_eq!(closed_after(&mut client.stream), "");
    assert!(broker.log_text().contains("authentication failed"));
    let mut client = broker.connect();
    client.send(&format!("AUTH:{TOKEN}\nSTATS"));
    assert_eq!(client.line(), "OK:AUTH");
    assert_eq!(stat_value(&client.line(), "auth_failures"), 5);
}

#[test]
fn clients_send_the_token_first_also_after_a_reconnection() {
    let dir = TestDir::new("auth-clients");
    let file = token_file(&dir, "token", &format!("{TOKEN}\n"), 0o600);
    let mut broker = Broker::start(&dir, &["--auth-token-file", &file]);
    let port = broker.port.to_string();
    let no_token = run(
        "producer",
        &["--port", &port, "--retries", "0"],
        &[],
        b"x\n",
    );
    assert!(!no_token.status.success(), "{}", show(&no_token));
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("Authentication failed"));

    let sent = run(
        "producer",
        &["--port", &port, "--token-file", &file, "-n", "2", "-i", "0"],
        &[],
        b"",
    );
    assert!(sent.status.success(), "{}", show(&sent));
    // The consumer takes its token from the environment; the broker
    // restarts between its first and its third message.
    let mut consumer = client_command(
        "consumer",
        &["--port", &port, "--id", "c", "--count", "3"],
        &[("BROKER_TOKEN_FILE", &file)],
    )
    .spawn()
    .unwrap();
    eventually("two messages consumed", || {
        authed_stat(&broker, "delivered") == 2
    });
    // Restart: the consumer reconnects and must send AUTH again.
    broker.terminate();
    broker.restart();
    let more = run(
        "producer",
        &["--port", &port, "-n", "1", "-i", "0"],
        &[("BROKER_TOKEN_FILE", &file)],
        b"",
    );
    assert!(more.status.success(), "{}", show(&more));
    let stdout = consumer.stdout.take().unwrap();
    let output = wait_output_with(consumer, stdout);
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().count(),
        3,
        "{}",
        show(&output)
    );
}

/// One STATS value, asked after AUTH.
fn authed_stat(broker: &Broker, key: &str) -> u64 {
    let mut client = broker.connect();
    client.expect(&format!("AUTH:{TOKEN}"), "OK:AUTH");
    client.send("STATS");
    stat_value(&client.line(), key)
}

/// Collects a child's output whose stdout was taken already.
fn wait_output_with(
    mut child: std::process::Child,
    stdout: std::process::ChildStdout,
) -> std::process::Output {
    child.stdout = Some(stdout);
    wait_output(child, WAIT)
}

/// A non-loopback address of this machine, if it has one: the source
/// address the kernel would pick for a datagram to a public address
/// (connecting a UDP socket sends nothing).
fn non_loopback_address() -> Option<IpAddr> {
    for target in ["192.0.2.1:9", "198.51.100.1:9", "8.8.8.8:53", "10.0.0.1:9"] {
        let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
            continue;
        };
        if socket.connect(target).is_err() {
            continue;
        }
        if let Ok(local) = socket.local_addr()
            && !local.ip().is_loopback()
            && !local.ip().is_unspecified()
        {
            return Some(local.ip());
        }
    }
    None
}

#[test]
fn protected_mode_serves_loopback_only_and_says_how_once() {
    let Some(far) = non_loopback_address() else {
        eprintln!(
            "no non-loopback address on this machine: protected mode is covered by the \
             unit tests of broker::auth only"
        );
        return;
    };
    let dir = TestDir::new("protected");
    let broker = Broker::start(&dir, &["--bind", "0.0.0.0"]);
    for _ in 0..3 {
        let mut stream = TcpStream::connect((far, broker.port)).unwrap();
        assert_eq!(closed_after(&mut stream), "ERROR:Authentication failed\n");
    }
    // Loopback is served as before.
    broker.connect().expect("REGISTER:PRODUCER", "OK:PRODUCER");
    let log = broker.log_text();
    assert_eq!(
        log.matches(&format!("refused a connection from {far}"))
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("--auth-token-file") && log.contains("--no-protected-mode"));

    // --no-protected-mode serves anyone; a token serves whoever has it.
    let open_dir = TestDir::new("protected-off");
    let open = Broker::start(&open_dir, &["--bind", "0.0.0.0", "--no-protected-mode"]);
    let mut stream = TcpStream::connect((far, open.port)).unwrap();
    assert_eq!(request(&mut stream, "REGISTER:PRODUCER"), "OK:PRODUCER");
    let token_dir = TestDir::new("protected-token");
    let file = token_file(&token_dir, "token", TOKEN, 0o600);
    let tokened = Broker::start(
        &token_dir,
        &["--bind", "0.0.0.0", "--auth-token-file", &file],
    );
    let mut stream = TcpStream::connect((far, tokened.port)).unwrap();
    assert_eq!(request(&mut stream, &format!("AUTH:{TOKEN}")), "OK:AUTH");
    assert_eq!(request(&mut stream, "REGISTER:PRODUCER"), "OK:PRODUCER");
}

/// Sends one line and reads one reply line (byte by byte: no buffer to
/// keep between calls), bounded by a read timeout.
fn request(stream: &mut TcpStream, line: &str) -> String {
    use std::io::Write;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).expect("reply") == 1 && byte[0] != b'\n' {
        reply.push(byte[0]);
    }
    String::from_utf8(reply).unwrap()
}
