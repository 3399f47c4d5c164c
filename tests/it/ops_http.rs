//! `broker --http ADDR` through a real HTTP client (curl): `/metrics` in
//! the Prometheus text format, `/healthz` 200 and then 503 while
//! persistence fails, 404 elsewhere, and answers while every client slot
//! is taken (the listener is not on the pool).

use std::io::{Read, Write};
use std::process::Command;

use crate::util::*;

/// The address the broker's HTTP listener bound, from its log.
fn http_address(broker: &Broker) -> String {
    let log = broker.log_text();
    log.lines()
        .find_map(|line| line.split("http listening on ").nth(1))
        .unwrap_or_else(|| panic!("no http line in the log:\n{log}"))
        .trim()
        .to_string()
}

/// `curl -i` of `url`: the status code and the whole response.
fn curl(url: &str) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-s", "-S", "-i", "--max-time", "10", url])
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run curl ({err}): install the package curl (./build.sh test does when it can)")
        });
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "curl {url}: {}", show(&output));
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    (code, text)
}

#[test]
fn metrics_health_and_not_found_over_http() {
    let dir = TestDir::new("http");
    let broker = Broker::start_with(
        &dir,
        &[
            "--http",
            "127.0.0.1:0",
            "--fsync",
            "always",
            "--max-clients",
            "2",
        ],
        |b| b.file_size_limit_kib = Some(64),
    );
    let base = format!("http://{}", http_address(&broker));
    let _consumer = broker.consumer("holds-everything");
    let mut producer = broker.producer();
    producer.expect("SEND:one", "OK:MSG_ID:1");

    // Both client slots are taken now: HTTP still answers.
    let (code, metrics) = curl(&format!("{base}/metrics"));
    assert_eq!(code, 200, "{metrics}");
    for expected in [
        "Content-Type: text/plain; version=0.0.4",
        "# HELP mensajeria_stored_total ",
        "# TYPE mensajeria_stored_total counter\nmensajeria_stored_total 1\n",
        "# TYPE mensajeria_messages gauge\nmensajeria_messages 1\n",
        "mensajeria_connections 2\n",
        "mensajeria_info{fsync=\"always\"",
    ] {
        assert!(metrics.contains(expected), "{expected:?} not in\n{metrics}");
    }
    let (code, health) = curl(&format!("{base}/healthz"));
    assert_eq!(code, 200, "{health}");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
    let (code, _) = curl(&format!("{base}/nothing-here"));
    assert_eq!(code, 404);

    // A client that never finishes its request holds the listener for at
    // most its timeout; an oversized request head is refused.
    let address = http_address(&broker);
    let mut stalled = std::net::TcpStream::connect(&address).unwrap();
    stalled.write_all(b"GET /metr").unwrap();
    let (code, _) = curl(&format!("{base}/healthz"));
    assert_eq!(code, 200);
    let mut huge = std::net::TcpStream::connect(&address).unwrap();
    huge.set_read_timeout(Some(WAIT)).unwrap();
    let mut request = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    request.resize(20 * 1024, b'a');
    let _ = huge.write_all(&request);
    let mut answer = String::new();
    let _ = huge.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");

    // Fill the file past its size limit: SENDs fail, and so does health.
    let body = "h".repeat(1000);
    let mut failed = false;
    for n in 0..200 {
        producer.send(&format!("SEND:{n}{body}"));
        if producer.reply() == "ERROR:Persistence failure" {
            failed = true;
            break;
        }
    }
    assert!(failed, "the file size limit never hit");
    let (code, health) = curl(&format!("{base}/healthz"));
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("persistence failing"), "{health}");
    let (_, metrics) = curl(&format!("{base}/metrics"));
    assert!(
        !metrics.contains("mensajeria_persistence_failures_total 0\n"),
        "{metrics}"
    );
}
