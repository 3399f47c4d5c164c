//! Faults from outside the broker's own code: clients that exhaust it
//! (too many consumer ids, connections that never register), files with
//! the wrong mode, foreign IPC objects under its keys, a power cut, and
//! another process scribbling over its shared memory. Each test shows
//! what a client sees and what is left behind.

use std::time::Duration;

use crate::util::*;

#[test]
fn is_closed_is_false_while_the_broker_keeps_the_connection_open() {
    // The helper itself: a read timeout must not count as "closed", or
    // every assertion that a connection was closed passes for nothing.
    let dir = TestDir::new("hostile-is-closed");
    let broker = Broker::start(&dir, &[]);
    let mut p = broker.producer();
    p.set_timeout(Duration::from_millis(200));
    assert!(!p.is_closed(), "an open, quiet connection is not closed");
    p.set_timeout(WAIT);
    p.expect("QUIT", "OK:BYE");
    assert!(p.is_closed());
}

#[test]
fn past_max_consumers_a_new_id_is_refused_and_the_connection_stays_open() {
    let dir = TestDir::new("hostile-max-consumers");
    let broker = Broker::start(&dir, &["--max-consumers", "2"]);
    let _a = broker.consumer("a");
    let mut b = broker.connect();
    b.expect("REGISTER:CONSUMER", "OK:CONSUMER:1");
    let mut c = broker.connect();
    c.expect("REGISTER:CONSUMER:c", "ERROR:Too many consumers");
    // An assigned id is refused too, and uses no number up.
    c.expect("REGISTER:CONSUMER", "ERROR:Too many consumers");
    // The connection stays open and may join an id that exists.
    c.expect("HEARTBEAT:1", "OK:HEARTBEAT");
    c.expect("REGISTER:CONSUMER:a", "OK:CONSUMER:a");
    c.expect("GET", "ERROR:No messages available");
    assert_eq!(broker.stat("cursors"), 2);
}

#[test]
fn a_connection_that_does_not_register_in_time_is_told_idle_timeout_and_closed() {
    let dir = TestDir::new("hostile-register-timeout");
    let broker = Broker::start(&dir, &["--register-timeout", "1"]);
    let mut producer = broker.producer();
    let mut stranger = broker.connect();
    // Heartbeats keep a connection from being idle, not from having to
    // register: the stranger is dropped anyway.
    stranger.set_timeout(Duration::from_millis(100));
    let mut reply = String::new();
    eventually("the unregistered connection to be dropped", || {
        stranger.send("HEARTBEAT:1");
        let mut line = Vec::new();
        match std::io::BufRead::read_until(stranger.reader(), b'\n', &mut line) {
            Ok(_) => {
                reply = String::from_utf8_lossy(&line).into_owned();
                reply != "OK:HEARTBEAT\n"
            }
            Err(err) => !is_timeout(&err),
        }
    });
    assert_eq!(reply, "ERROR:Idle timeout\n");
    stranger.set_timeout(WAIT);
    assert!(stranger.is_closed());
    // A registered connection, quiet for as long, is still served.
    producer.expect("SEND:still here", "OK:MSG_ID:1");
    assert!(broker.stat("idle_drops") >= 1);
}

#[test]
fn files_with_a_wider_mode_or_behind_a_link_are_made_0600_with_a_warning() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let dir = TestDir::new("hostile-modes");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let set_mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let messages = dir.join("messages.dat");
    let offsets = dir.join("messages.dat.offsets");
    // The lock sits beside the file the messages file's name resolves to.
    let lock = dir.join("real-messages.dat.lock");
    let log = dir.join("broker.log");
    // The messages file is a link to a world-readable file; the others are
    // plain files with wide modes, and a stale temporary offsets file too.
    let real = dir.join("real-messages.dat");
    std::fs::write(&real, b"1:1700000000:5:hello\n").unwrap();
    set_mode(&real, 0o644);
    symlink(&real, &messages).unwrap();
    for (path, wide) in [(&offsets, 0o666), (&lock, 0o644), (&log, 0o640)] {
        std::fs::write(path, b"").unwrap();
        set_mode(path, wide);
    }
    let stale_tmp = dir.join("messages.dat.offsets.tmp");
    std::fs::write(&stale_tmp, b"").unwrap();
    set_mode(&stale_tmp, 0o666);

    let mut broker = Broker::start(&dir, &[]);
    broker.consumer("c").expect("GET", "MSG:1:hello");
    for path in [&real, &offsets, &lock, &log] {
        assert_eq!(mode(path), 0o600, "{}", path.display());
    }
    let warnings = broker.stderr();
    for name in [
        "/messages.dat had mode 0644",
        "/messages.dat.offsets had mode 0666",
        "/real-messages.dat.lock had mode 0644",
        "/broker.log had mode 0640",
    ] {
        assert!(
            warnings
                .lines()
                .any(|l| l.contains(name) && l.contains("changed it to 0600")),
            "no warning for {name}:\n{warnings}"
        );
    }
    assert_eq!(broker.terminate().code(), Some(0));
    // Every file the broker wrote since is private too.
    for entry in std::fs::read_dir(&dir.path).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("messages.dat") || name.starts_with("real-") || name == "broker.log" {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
    }
}
