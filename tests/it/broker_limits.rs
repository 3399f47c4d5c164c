//! Bounds under load and abuse: a full queue (bounded wait, then
//! `ERROR:Queue full`; room as the slowest cursor advances or expires), the
//! connection limit (`ERROR:Server is full`), over-long lines (bounded
//! memory, connection still usable), idle clients (including tricklers),
//! clients that stop reading, and shutdown with many clients connected.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn a_full_queue_waits_a_bounded_time_then_says_queue_full() {
    let dir = TestDir::new("limits-full");
    let broker = Broker::start(&dir, &["--capacity", "5", "--send-timeout", "300"]);
    let mut slow = broker.consumer("slow");
    let mut p = broker.producer();
    for n in 1..=5 {
        p.expect(&format!("SEND:m{n}"), &format!("OK:MSG_ID:{n}"));
    }
    let started = Instant::now();
    p.expect("SEND:m6", "ERROR:Queue full");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "did not wait for room"
    );
    // Nothing was dropped to make room, and the connection still works.
    slow.expect("GET", "MSG:1:m1");
    slow.expect("GET", "MSG:2:m2");
    p.expect("SEND:m6", "OK:MSG_ID:6");
    p.expect("SEND:m7", "OK:MSG_ID:7");
    p.expect("SEND:m8", "ERROR:Queue full");
    for n in 3..=7 {
        slow.send("GET");
        assert_eq!(slow.reply(), format!("MSG:{n}:m{n}"));
    }
}

#[test]
fn a_waiting_send_succeeds_when_the_slowest_cursor_moves() {
    let dir = TestDir::new("limits-wait");
    let broker = Broker::start(&dir, &["--capacity", "2", "--send-timeout", "10000"]);
    let mut fast = broker.consumer("fast");
    let mut slow = broker.consumer("slow");
    let mut p = broker.producer();
    p.expect("SEND:a", "OK:MSG_ID:1");
    p.expect("SEND:b", "OK:MSG_ID:2");
    fast.expect("GET", "MSG:1:a");
    fast.expect("GET", "MSG:2:b");
    // Full: "slow" holds both. The SEND waits; slow's GET makes room.
    p.send("SEND:c");
    slow.expect("GET", "MSG:1:a");
    assert_eq!(p.reply(), "OK:MSG_ID:3");
}

#[test]
fn with_no_cursor_messages_are_held_for_consumers_to_come() {
    let dir = TestDir::new("limits-held");
    let broker = Broker::start(&dir, &["--capacity", "3", "--send-timeout", "100"]);
    let mut p = broker.producer();
    for n in 1..=3 {
        p.expect(&format!("SEND:m{n}"), &format!("OK:MSG_ID:{n}"));
    }
    p.expect("SEND:m4", "ERROR:Queue full");
    let mut c = broker.consumer("later");
    c.expect("GET", "MSG:1:m1");
    p.expect("SEND:m4", "OK:MSG_ID:4");
}

#[test]
fn an_expired_cursor_stops_holding_messages() {
    let dir = TestDir::new("limits-ttl");
    let broker = Broker::start(
        &dir,
        &[
            "--capacity",
            "3",
            "--send-timeout",
            "100",
            "--consumer-ttl",
            "1",
        ],
    );
    let mut gone = broker.consumer("gone");
    gone.expect("QUIT", "OK:BYE");
    let mut live = broker.consumer("live");
    let mut p = broker.producer();
    for n in 1..=3 {
        p.expect(&format!("SEND:m{n}"), &format!("OK:MSG_ID:{n}"));
        live.send("GET");
        assert_eq!(live.reply(), format!("MSG:{n}:m{n}"));
    }
    // "gone" holds all three until its TTL passes and it is forgotten.
    let mut next = 4;
    eventually("the idle cursor to expire", || {
        p.send(&format!("SEND:m{next}"));
        let ok = p.reply() == format!("OK:MSG_ID:{next}");
        if ok {
            next += 1;
        }
        ok
    });
    assert!(
        broker.log_text().contains("consumer gone expired"),
        "{}",
        broker.log_text()
    );
    assert_eq!(broker.stat("cursors"), 1);
}

#[test]
fn past_max_clients_a_connection_is_told_server_is_full_and_closed() {
    let dir = TestDir::new("limits-clients");
    let broker = Broker::start(&dir, &["--max-clients", "3"]);
    let mut served: Vec<Client> = (0..3).map(|_| broker.connect()).collect();
    for c in &mut served {
        c.expect("HEARTBEAT:1", "OK:HEARTBEAT");
    }
    let mut refused = broker.connect();
    assert_eq!(refused.line(), "ERROR:Server is full");
    assert!(refused.is_closed());
    // When one leaves, the next is served.
    served.pop().unwrap().expect("QUIT", "OK:BYE");
    eventually("a freed place", || {
        let mut c = broker.connect();
        c.send("HEARTBEAT:1");
        c.line() == "OK:HEARTBEAT"
    });
    served[0].send("STATS");
    assert!(stat_value(&served[0].reply(), "refused_full") >= 1);
}

#[test]
fn over_long_lines_get_message_too_large_and_the_connection_stays_usable() {
    let dir = TestDir::new("limits-long");
    let broker = Broker::start(&dir, &["--max-msg-size", "1024"]);
    let mut p = broker.producer();
    // Content just over the limit on a line within the line limit.
    p.expect(
        &format!("SEND:{}", "x".repeat(1025)),
        "ERROR:Message too large",
    );
    p.expect(&format!("SEND:{}", "x".repeat(1024)), "OK:MSG_ID:1");
    // A line over the line limit (1024 + 64), with its newline.
    p.expect(
        &format!("SEND:{}", "y".repeat(5000)),
        "ERROR:Message too large",
    );
    p.expect("SEND:after", "OK:MSG_ID:2");
    // Any command can be too long, registered or not.
    let mut anon = broker.connect();
    anon.expect(&"Z".repeat(3000), "ERROR:Message too large");
    anon.expect("HEARTBEAT:1", "OK:HEARTBEAT");
}

#[test]
fn a_100_mb_line_without_newline_is_refused_early_with_bounded_memory() {
    let dir = TestDir::new("limits-huge");
    let broker = Broker::start(&dir, &[]);
    let mut p = broker.producer();
    p.expect("SEND:warm up", "OK:MSG_ID:1");
    let before = broker.rss_kib();
    p.send_bytes(b"SEND:");
    // The error must come before the line ends: read it after 1 MB.
    let chunk = vec![b'x'; 1 << 20];
    p.send_bytes(&chunk);
    assert_eq!(p.line(), "ERROR:Message too large");
    for _ in 1..100 {
        p.stream.write_all(&chunk).unwrap();
    }
    let after = broker.rss_kib();
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The rest of the line is discarded; the next line is served.
    p.send("");
    p.expect("SEND:next", "OK:MSG_ID:2");
}

#[test]
fn idle_clients_are_dropped_even_when_trickling_half_a_line() {
    let dir = TestDir::new("limits-idle");
    let broker = Broker::start(&dir, &["--idle-timeout", "1"]);
    let mut silent = broker.connect();
    let mut trickler = broker.connect();
    let mut busy = broker.connect();
    let started = Instant::now();
    // The trickler sends a byte of an unfinished line every 200 ms.
    trickler.set_timeout(Duration::from_millis(1));
    loop {
        assert!(started.elapsed() < WAIT, "the trickler was never dropped");
        std::thread::sleep(Duration::from_millis(200));
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut trickler.stream, &mut buf) {
            Ok(0) => panic!("closed without ERROR:Idle timeout"),
            Ok(n) => {
                assert_eq!(&buf[..n], b"ERROR:Idle timeout\n");
                break;
            }
            Err(err) => assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{err}"
            ),
        }
        trickler.send_bytes(b"S");
        busy.expect("HEARTBEAT:1", "OK:HEARTBEAT");
    }
    // Heartbeats kept "busy" alive well past the idle timeout.
    assert!(started.elapsed() >= Duration::from_secs(1));
    busy.expect("HEARTBEAT:2", "OK:HEARTBEAT");
    assert_eq!(silent.line(), "ERROR:Idle timeout");
    assert!(silent.is_closed());
    assert!(broker.stat("idle_drops") >= 2);
}

#[test]
fn a_client_that_stops_reading_blocks_nobody_else() {
    let dir = TestDir::new("limits-stuck");
    let broker = Broker::start(&dir, &["--capacity", "2000"]);
    let mut p = broker.producer();
    let body = "b".repeat(1000);
    let mut batch = String::new();
    for _ in 0..2000 {
        batch.push_str(&format!("SEND:{body}\n"));
    }
    p.send_bytes(batch.as_bytes());
    for n in 1..=2000 {
        assert_eq!(p.line(), format!("OK:MSG_ID:{n}"));
    }
    let mut other = broker.consumer("other");
    // "stuck" asks for 2 MB of replies and never reads them.
    let mut stuck = broker.consumer("stuck");
    stuck.send_bytes("GET\n".repeat(2000).as_bytes());
    // Everyone else is served meanwhile: other consumers, producers, STATS.
    for n in 1..=50 {
        other.send("GET");
        assert_eq!(other.reply(), format!("MSG:{n}:{body}"));
    }
    let mut p2 = broker.producer();
    p2.send("SEND:still moving");
    let reply = p2.reply();
    assert!(
        reply.starts_with("OK:MSG_ID:") || reply == "ERROR:Queue full",
        "{reply}"
    );
    assert!(broker.stat("connections") >= 4);
}

#[test]
fn sigterm_with_100_clients_answers_in_flight_says_shutting_down_to_each_and_exits_0() {
    let dir = TestDir::new("limits-shutdown");
    let mut broker = Broker::start(&dir, &[]);
    let mut clients = Vec::new();
    // 99 idle clients and one busy one: the default --max-clients 100.
    for n in 0..99 {
        let mut c = if n % 2 == 0 {
            broker.producer()
        } else {
            broker.consumer(&format!("c{n}"))
        };
        c.expect("HEARTBEAT:1", "OK:HEARTBEAT");
        clients.push(c);
    }
    // One more producer has requests in flight when the signal comes.
    let mut busy = broker.producer();
    let mut batch = String::new();
    for n in 0..300 {
        batch.push_str(&format!("SEND:inflight-{n}\n"));
    }
    busy.send_bytes(batch.as_bytes());
    let started = Instant::now();
    let status = broker.terminate();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    for c in &mut clients {
        let rest = c.rest();
        let lines: Vec<&str> = rest.lines().filter(|l| !l.starts_with("NOTIFY:")).collect();
        assert_eq!(lines, ["ERROR:Shutting down"], "{rest}");
    }
    // Every SEND read before the signal was answered; each OK is on disk.
    let text = busy.rest();
    let mut acknowledged = 0;
    for line in text.lines() {
        if line == "ERROR:Shutting down" {
            break;
        }
        acknowledged += 1;
        assert_eq!(line, format!("OK:MSG_ID:{acknowledged}"));
    }
    assert!(text.ends_with("ERROR:Shutting down\n"), "{text}");
    assert!(!ipc_exists(broker.shm_key, broker.sem_key));
    broker.restart();
    let mut c = broker.consumer("check");
    for n in 1..=acknowledged {
        c.send("GET");
        assert_eq!(c.reply(), format!("MSG:{n}:inflight-{}", n - 1));
    }
}
