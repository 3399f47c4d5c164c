//! `broker --inspect` against a live broker: header, semaphores, the ids
//! in the ring and the newest contents; the broker keeps serving (the
//! inspector only takes the MUTEX for one copy) and nothing of the
//! inspector's stays behind; exit 1 when no segment has the key.

use crate::util::*;

fn inspect(shm_key: i32, sem_key: i32) -> std::process::Output {
    run(
        "broker",
        &[
            "--inspect",
            "--shm-key",
            &shm_key.to_string(),
            "--sem-key",
            &sem_key.to_string(),
        ],
        &[],
        b"",
    )
}

#[test]
fn inspect_shows_the_live_queue_read_only() {
    let dir = TestDir::new("inspect");
    let broker = Broker::start(&dir, &["--capacity", "8", "--max-msg-size", "64"]);
    let _holder = broker.consumer("holder");
    let mut producer = broker.producer();
    for n in 1..=8 {
        producer.expect(
            &format!("SEND:message {n}: tab\there"),
            &format!("OK:MSG_ID:{n}"),
        );
    }
    let output = inspect(broker.shm_key, broker.sem_key);
    assert!(output.status.success(), "{}", show(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        &format!("segment key 0x{:x}", broker.shm_key)[..],
        "1 process(es) attached (before this look)",
        "magic \"MQRING01\" (a mensajeria queue), layout version 1, slots 8",
        "max message 64 bytes",
        "MUTEX=1 (free)",
        "FULL=8 (used slots)",
        "EMPTY=0",
        "ids in the ring: 1..=8 (8 message(s), 0 free slot(s)); next id 9",
        "\"message 8: tab\\x09here\"",
        "holding the MUTEX",
    ] {
        assert!(text.contains(expected), "{expected:?} not in\n{text}");
    }
    assert!(
        text.contains("message 4:") && !text.contains("message 3:"),
        "only the newest five: {text}"
    );
    // The broker serves on, its objects untouched, the inspector detached.
    assert_eq!(broker.stat("messages"), 8);
    let mut consumer = broker.consumer("reader");
    consumer.expect("GET", "MSG:1:message 1: tab\there");
    let again = inspect(broker.shm_key, broker.sem_key);
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(again.contains("1 process(es) attached"), "{again}");
    assert!(again.contains("next id 9"), "{again}");
}

#[test]
fn inspect_without_a_segment_exits_1_and_says_so() {
    let (shm_key, sem_key) = fresh_keys();
    let output = inspect(shm_key, sem_key);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("no shared memory segment has key 0x{shm_key:x}")),
        "{stderr}"
    );
    assert!(!ipc_exists(shm_key, sem_key));
}
