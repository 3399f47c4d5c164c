//! The queue's kernel objects: a SysV segment and a 3-semaphore set created
//! 0600 under the configured keys, orphans of a crashed broker removed at
//! startup with a warning, keys in use by a live broker refused (exit 1,
//! naming the key and the option), and nothing left after a clean stop.

use std::process::Command;

use mensajeria::sys::{sem, shm};

use crate::util::*;

/// The `ipcs` line for `key` in section `-m` or `-s`, if any.
fn ipcs_line(section: &str, key: i32) -> Option<String> {
    let output = Command::new("ipcs")
        .arg(section)
        .output()
        .expect("run ipcs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let hex = format!("0x{:08x}", key as u32);
    text.lines()
        .find(|line| line.starts_with(&hex))
        .map(str::to_string)
}

#[test]
fn segment_and_semaphores_exist_with_mode_0600_and_go_away_on_sigterm() {
    let dir = TestDir::new("ipc-lifecycle");
    let mut broker = Broker::start(&dir, &["--ring", "10", "--max-msg-size", "100"]);
    let segment = ipcs_line("-m", broker.shm_key).expect("segment listed by ipcs -m");
    let fields: Vec<&str> = segment.split_whitespace().collect();
    assert_eq!(fields[3], "600", "{segment}");
    // 64-byte header + 10 slots of (24 + 100 rounded up to 8) bytes.
    assert_eq!(fields[4], (64 + 10 * 128).to_string(), "{segment}");
    assert_eq!(fields[5], "1", "one process attached: {segment}");
    let set = ipcs_line("-s", broker.sem_key).expect("set listed by ipcs -s");
    let fields: Vec<&str> = set.split_whitespace().collect();
    assert_eq!((fields[3], fields[4]), ("600", "3"), "{set}");

    let mut p = broker.producer();
    p.expect("SEND:x", "OK:MSG_ID:1");
    assert!(broker.terminate().success());
    assert_eq!(ipcs_line("-m", broker.shm_key), None);
    assert_eq!(ipcs_line("-s", broker.sem_key), None);
    assert!(
        broker
            .log_text()
            .contains("shared memory and semaphores removed"),
        "{}",
        broker.log_text()
    );
}

#[test]
fn orphans_of_a_killed_broker_are_removed_with_a_warning() {
    let dir = TestDir::new("ipc-orphans");
    let mut broker = Broker::start(&dir, &[]);
    let mut p = broker.producer();
    p.expect("SEND:survives", "OK:MSG_ID:1");
    drop(p);
    broker.kill();
    // SIGKILL leaves both objects behind, with nobody attached.
    assert!(matches!(
        shm::inspect(broker.shm_key).unwrap(),
        shm::Existing::Orphan { .. }
    ));
    assert!(matches!(
        sem::inspect(broker.sem_key).unwrap(),
        sem::Existing::Orphan { .. }
    ));
    broker.restart();
    let warnings = broker.stderr();
    let shm_hex = format!("0x{:x}", broker.shm_key);
    let sem_hex = format!("0x{:x}", broker.sem_key);
    assert!(
        warnings.contains("orphaned shared memory segment") && warnings.contains(&shm_hex),
        "{warnings}"
    );
    assert!(
        warnings.contains("orphaned semaphore set") && warnings.contains(&sem_hex),
        "{warnings}"
    );
    let mut c = broker.consumer("after");
    c.expect("GET", "MSG:1:survives");
}

#[test]
fn keys_in_use_by_a_live_broker_are_refused() {
    let dir = TestDir::new("ipc-in-use");
    let first = Broker::start(&dir, &[]);
    let other = TestDir::new("ipc-in-use-2");

    // Same shared memory key.
    let mut second = Broker::start(&other, &[]);
    second.kill();
    remove_ipc(second.shm_key, second.sem_key);
    second.shm_key = first.shm_key;
    let err = second
        .launch(0)
        .expect_err("a second broker on the same keys must not start");
    assert!(err.contains("status exit status: 1"), "{err}");
    let hex = format!("0x{:x}", first.shm_key);
    assert!(err.contains(&hex) && err.contains("--shm-key"), "{err}");

    // Same semaphore key only.
    second.shm_key = fresh_keys().0;
    second.sem_key = first.sem_key;
    let err = second
        .launch(0)
        .expect_err("a second broker on the same semaphore key must not start");
    let hex = format!("0x{:x}", first.sem_key);
    assert!(err.contains(&hex) && err.contains("--sem-key"), "{err}");
    // The refusal touched nothing: the first broker still serves.
    second.sem_key = fresh_keys().1;
    let mut p = first.producer();
    p.expect("SEND:still here", "OK:MSG_ID:1");
    assert!(ipc_exists(first.shm_key, first.sem_key));
}

#[test]
fn a_killed_broker_not_yet_reaped_does_not_block_a_restart() {
    let dir = TestDir::new("ipc-zombie");
    let mut broker = Broker::start(&dir, &[]);
    broker.producer().expect("SEND:kept", "OK:MSG_ID:1");
    // SIGKILL without reaping: the dead broker stays a zombie, whose pid
    // still answers kill(pid, 0).
    let mut zombie = broker.child.take().unwrap();
    zombie.kill().unwrap();
    let dead = zombie.id() as i32;
    eventually("the killed broker to become a zombie", || {
        std::fs::read_to_string(format!("/proc/{dead}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(false)
    });
    let started = broker.launch(broker.port);
    let _ = zombie.wait();
    started
        .unwrap_or_else(|err| panic!("restart refused while the old broker is a zombie:\n{err}"));
    broker.consumer("c").expect("GET", "MSG:1:kept");
}

#[test]
fn a_second_broker_on_the_same_messages_file_is_refused() {
    let dir = TestDir::new("ipc-file-lock");
    let first = Broker::start(&dir, &[]);
    first.producer().expect("SEND:mine", "OK:MSG_ID:1");
    // Other keys, same files: without the lock it would recover (and cut)
    // a file another broker is writing.
    let other = TestDir::new("ipc-file-lock-2");
    let mut second = Broker::start(&other, &[]);
    second.kill();
    second.messages = first.messages.clone();
    let err = second
        .launch(0)
        .expect_err("a second broker on the same file must not start");
    assert!(err.contains("status exit status: 1"), "{err}");
    assert!(err.contains("in use by another broker"), "{err}");
    first.producer().expect("SEND:still mine", "OK:MSG_ID:2");
    first.consumer("c").expect("GET", "MSG:1:mine");
}
