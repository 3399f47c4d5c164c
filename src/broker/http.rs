//! `--http ADDR`: a very small HTTP/1.1 server for monitoring, on a thread
//! of its own (never a pool worker, so a busy or full broker still
//! answers, and a monitoring client never takes a client's slot).
//!
//! - `GET /metrics`: the `STATS` counters and gauges in the Prometheus
//!   text exposition format (version 0.0.4), `# HELP` and `# TYPE` for
//!   each, counters named `…_total`.
//! - `GET /healthz`: `200 ok` while the broker accepts messages, `503`
//!   with the reason while persistence is failing or it shuts down.
//! - anything else: 404 (405 for another method on a known path).
//!
//! Bounded on purpose: one connection at a time (a scrape every few
//! seconds needs no more), a request head of at most [`MAX_REQUEST`]
//! bytes, [`IO_TIMEOUT`] for the whole request and for the reply, and
//! `Connection: close` after every reply. A slow or hostile client delays
//! the next scrape by at most that timeout and never touches the queue.
//! The formatting ([`prometheus`], [`route`], [`response`]) is pure and
//! unit-tested; the shell around it only reads and writes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Shared;
use crate::protocol::StatValue;
use crate::sys::os;

/// Longest request head read (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its request, and to take the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Help for the STATS fields we know; any other gets a generic one. Which
/// fields are counters is the core's word ([`StatValue::Counter`]).
const HELP: [(&str, &str); 25] = [
    (
        "auth_failures",
        "Connections closed for a wrong or missing token, or by protected mode, since start",
    ),
    ("stored", "Messages stored since start"),
    ("delivered", "Messages delivered to consumers since start"),
    (
        "queue_full",
        "SENDs refused because the queue was full, since start",
    ),
    (
        "persistence_failures",
        "SENDs refused because storing failed, since start",
    ),
    (
        "fsync_failures",
        "Failed fsyncs of the messages file since start",
    ),
    ("acked", "Acknowledgements accepted since start"),
    (
        "redelivered",
        "Messages delivered again after an ack wait or a lost connection",
    ),
    (
        "refused_full",
        "Connections refused because every client slot was taken, since start",
    ),
    ("idle_drops", "Connections closed for idleness since start"),
    ("messages", "Messages held in the queue"),
    ("capacity", "Messages the queue can hold (--capacity)"),
    (
        "ring",
        "Slots of the shared-memory ring, the window over the newest messages",
    ),
    ("held_bytes", "Bytes of the segment files"),
    (
        "max_bytes",
        "Bytes the segment files may hold (--max-bytes)",
    ),
    ("segments", "Segment files of the log"),
    (
        "delivered_from_disk",
        "Messages delivered from the segment files (behind the ring) since start",
    ),
    ("next_id", "Id the next stored message gets"),
    ("connections", "Client connections open"),
    ("producers", "Connections registered as producers"),
    ("consumers", "Connections registered as consumers"),
    ("cursors", "Consumer ids known (cursors kept)"),
    (
        "in_flight",
        "Messages delivered in ack mode and not yet acknowledged",
    ),
    ("file_bytes", "Bytes of records in the messages files"),
    ("uptime_s", "Seconds since the broker started"),
];

/// The metric name for a STATS key: `mensajeria_` and the key, a unit
/// suffix spelled out (`_s` becomes `_seconds`), `_total` for counters.
fn metric_name(key: &str, counter: bool) -> String {
    let clean: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let base = match clean.strip_suffix("_s") {
        Some(stem) => format!("{stem}_seconds"),
        None => clean,
    };
    if counter {
        format!("mensajeria_{base}_total")
    } else {
        format!("mensajeria_{base}")
    }
}

/// The Prometheus text for the `STATS` fields: counters and gauges become
/// samples with `# HELP` and `# TYPE`; the text fields (`fsync`,
/// `instance`) become labels of `mensajeria_info 1`.
pub fn prometheus(stats: &[(&str, StatValue<'_>)]) -> String {
    let mut out = String::new();
    let mut labels = Vec::new();
    for (key, value) in stats {
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        let (kind, number) = match value {
            StatValue::Counter(n) => ("counter", n),
            StatValue::Gauge(n) => ("gauge", n),
            StatValue::Text(text) => {
                labels.push(format!("{key}=\"{}\"", escape_label(text)));
                continue;
            }
        };
        let help = HELP.iter().find(|(k, _)| k == key).map_or_else(
            || format!("Broker statistic {key}"),
            |(_, help)| help.to_string(),
        );
        let name = metric_name(key, kind == "counter");
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {number}\n"
        ));
    }
    if !labels.is_empty() {
        out.push_str(&format!(
            "# HELP mensajeria_info Broker settings and identity\n# TYPE mensajeria_info gauge\nmensajeria_info{{{}}} 1\n",
            labels.join(",")
        ));
    }
    out
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes a request head (the bytes before the blank line).
pub fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if parts.next().is_some() || !version.starts_with(b"HTTP/1.") {
        return Route::BadRequest;
    }
    // The query string does not matter to either endpoint.
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let known = match path {
        b"/metrics" => Route::Metrics,
        b"/healthz" => Route::Health,
        _ => return Route::NotFound,
    };
    // HTTP's methods GET and HEAD (not our protocol's GET), as slice
    // patterns, so the check for our wire texts outside protocol.rs need
    // not know HTTP.
    match method {
        [b'G', b'E', b'T'] | [b'H', b'E', b'A', b'D'] => known,
        _ => Route::MethodNotAllowed,
    }
}

/// A whole HTTP/1.1 response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The running HTTP thread.
pub struct HttpServer {
    listener: TcpListener,
    thread: JoinHandle<()>,
    pub address: SocketAddr,
}

impl HttpServer {
    /// Binds `address` (at startup: an address in use stops the start) and
    /// starts serving on a thread of its own.
    pub fn start(shared: &Arc<Shared>, address: SocketAddr) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(address).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot listen on {address} for --http: {err}"),
            )
        })?;
        let address = listener.local_addr()?;
        let accepting = listener.try_clone()?;
        let shared = Arc::clone(shared);
        let thread = std::thread::Builder::new()
            .name("http".into())
            .stack_size(128 * 1024)
            .spawn(move || serve(&shared, &accepting))?;
        Ok(HttpServer {
            listener,
            thread,
            address,
        })
    }

    /// Stops accepting (wakes the blocked `accept`) and joins the thread.
    pub fn stop(self) {
        let _ = os::shutdown(&self.listener);
        let _ = self.thread.join();
    }
}

fn serve(shared: &Shared, listener: &TcpListener) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(err) => {
                if shared.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                shared.core.log.warn(format_args!("http accept: {err}"));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.shutting_down.load(Ordering::Acquire) {
            // Still answer: a health check during shutdown learns why.
            answer(shared, stream);
            return;
        }
        answer(shared, stream);
    }
}

/// Reads one request head (bounded in size and time) and answers it.
fn answer(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let reply = match read_head(&mut stream) {
        Some(head) => reply_to(shared, &head),
        None => response(400, "text/plain", "bad request\n"),
    };
    let _ = stream.write_all(&reply);
    linger(&mut stream);
}

/// Closes gently: says end of reply, then reads and drops what the client
/// still sends (bounded), because closing with unread bytes would reset
/// the connection and the client could lose the reply it has not read.
fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// The request head, or `None` if it is too long, too slow or cut off.
fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || head.len() > MAX_REQUEST {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

fn reply_to(shared: &Shared, head: &[u8]) -> Vec<u8> {
    let head_only = head.starts_with(b"HEAD ");
    let mut reply = match route(head) {
        Route::Metrics => {
            let text = prometheus(&shared.core.stats());
            response(200, "text/plain; version=0.0.4; charset=utf-8", &text)
        }
        Route::Health => match health(shared) {
            None => response(200, "text/plain", "ok\n"),
            Some(reason) => response(503, "text/plain", &format!("{reason}\n")),
        },
        Route::NotFound => response(404, "text/plain", "not found: try /metrics or /healthz\n"),
        Route::MethodNotAllowed => response(405, "text/plain", "only GET\n"),
        Route::BadRequest => response(400, "text/plain", "bad request\n"),
    };
    if head_only && let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") {
        reply.truncate(end + 4);
    }
    reply
}

/// Why the broker does not accept messages now, if it does not.
fn health(shared: &Shared) -> Option<&'static str> {
    if shared.shutting_down.load(Ordering::Acquire) {
        Some("shutting down")
    } else if shared.core.durability.writes_failing() {
        Some("persistence failing: messages are refused until storing works again (see the log)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Vec<(&'static str, StatValue<'static>)> {
        use StatValue::{Counter, Gauge, Text};
        vec![
            ("messages", Gauge(3)),
            ("stored", Counter(3)),
            ("idle_drops", Counter(0)),
            ("fsync", Text("interval")),
            ("uptime_s", Gauge(12)),
            ("instance", Text("00ff")),
        ]
    }

    #[test]
    fn stats_become_prometheus_text() {
        let text = prometheus(&stats());
        for expected in [
            "# HELP mensajeria_stored_total Messages stored since start\n# TYPE mensajeria_stored_total counter\nmensajeria_stored_total 3\n",
            "# TYPE mensajeria_messages gauge\nmensajeria_messages 3\n",
            "# TYPE mensajeria_uptime_seconds gauge\nmensajeria_uptime_seconds 12\n",
            "mensajeria_idle_drops_total 0\n",
            "mensajeria_info{fsync=\"interval\",instance=\"00ff\"} 1\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
        // Every sample has its HELP and TYPE; every line is one of the three.
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP mensajeria_")
                    || line.starts_with("# TYPE mensajeria_")
                    || line.starts_with("mensajeria_"),
                "{line}"
            );
        }
        assert_eq!(
            text.matches("# TYPE").count(),
            text.matches("# HELP").count()
        );
        // A field added later gets a generic help, not lost; a key that is
        // no metric name is skipped; a quote in a label is escaped.
        let later = prometheus(&[
            ("new_thing", StatValue::Gauge(5)),
            ("bad key", StatValue::Gauge(1)),
            ("", StatValue::Counter(1)),
            ("odd", StatValue::Text("a\"b")),
        ]);
        assert!(later.contains("# HELP mensajeria_new_thing Broker statistic new_thing\n"));
        assert!(
            !later.contains("bad") && !later.contains("mensajeria__total"),
            "{later}"
        );
        assert!(
            later.contains("mensajeria_info{odd=\"a\\\"b\"} 1"),
            "{later}"
        );
    }

    #[test]
    fn routes() {
        for (head, expected) in [
            (
                &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                Route::Metrics,
            ),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", Route::Metrics),
            (b"HEAD /healthz HTTP/1.1\r\n\r\n", Route::Health),
            (b"GET /healthz HTTP/1.1\n\n", Route::Health),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Route::MethodNotAllowed),
            (b"GET / HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metrics\r\n\r\n", Route::BadRequest),
            (b"GET /metrics SPDY/3\r\n\r\n", Route::BadRequest),
            (b"GET /metrics HTTP/1.1 extra\r\n\r\n", Route::BadRequest),
            (b"", Route::BadRequest),
        ] {
            assert_eq!(route(head), expected, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn responses_are_complete_and_close() {
        let reply = String::from_utf8(response(503, "text/plain", "down\n")).unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{reply}"
        );
        assert!(reply.contains("Content-Length: 5\r\n") && reply.contains("Connection: close\r\n"));
        assert!(reply.ends_with("\r\n\r\ndown\n"));
    }
}
