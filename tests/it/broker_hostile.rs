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
    // The first segment of the messages file's log.
    let messages = dir.join("messages.dat.00000000000000000001");
    let offsets = dir.join("messages.dat.offsets");
    let lock = dir.join("messages.dat.lock");
    let log = dir.join("broker.log");
    // The segment is a link to a world-readable file; the others are
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
        "/messages.dat.00000000000000000001 had mode 0644",
        "/messages.dat.offsets had mode 0666",
        "/messages.dat.lock had mode 0644",
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

#[test]
fn foreign_ipc_objects_under_our_keys_are_left_alone_and_refused() {
    use mensajeria::sys::sem::{self, SemaphoreSet};
    use mensajeria::sys::shm::{self, Segment};
    let dir = TestDir::new("hostile-foreign-ipc");
    let mut broker = Broker::start(&dir, &[]);
    broker.terminate();
    // From here the guard removes whatever is under the keys, on failure too.
    let (shm_key, sem_key) = (broker.shm_key, broker.sem_key);
    let me = std::process::id();

    // Another program's segment of 4096 bytes, nobody attached.
    drop(Segment::create(shm_key, 4096).unwrap());
    let err = broker.launch(0).expect_err("must refuse a foreign segment");
    assert!(err.contains("status exit status: 1"), "{err}");
    for part in [
        format!("key 0x{shm_key:x}"),
        "4096 bytes".to_string(),
        format!("created by pid {me}"),
        "--shm-key".to_string(),
        format!("ipcrm -M 0x{shm_key:x}"),
    ] {
        assert!(err.contains(&part), "no {part:?} in:\n{err}");
    }
    let shm::Existing::Orphan { id, size: 4096, .. } = shm::inspect(shm_key).unwrap() else {
        panic!("the foreign segment must be left as it was")
    };
    shm::remove(id).unwrap();

    // Another program's set of one semaphore.
    let set = SemaphoreSet::create(sem_key, &[1]).unwrap();
    let err = broker.launch(0).expect_err("must refuse a foreign set");
    assert!(err.contains("status exit status: 1"), "{err}");
    for part in [
        format!("key 0x{sem_key:x}"),
        "1 semaphore(s)".to_string(),
        "--sem-key".to_string(),
        format!("ipcrm -S 0x{sem_key:x}"),
    ] {
        assert!(err.contains(&part), "no {part:?} in:\n{err}");
    }
    assert!(
        matches!(sem::inspect(sem_key).unwrap(), sem::Existing::InUse { id, nsems: 1, .. } | sem::Existing::Orphan { id, nsems: 1 } if id == set.id()),
        "the foreign set must be left as it was"
    );
    set.remove().unwrap();
    // Nothing foreign left: it starts, and finds its message file intact.
    broker.restart();
}

/// Set for the child process that plays the scribbler: the keys of the
/// segment and set to attack, and how many rounds.
const SCRIBBLE_ENV: &str = "MQ_TEST_SCRIBBLE";

/// Not a test of its own: the body of the second process that
/// [`a_scribbled_segment_is_served_from_the_file_and_never_trusted`]
/// starts (this test binary, run again with [`SCRIBBLE_ENV`] set). It
/// attaches the broker's segment and set through the crate's `sys`, as any
/// process of the same user can, takes the MUTEX like the broker does, and
/// writes over the header and every slot's id, length and content.
#[test]
fn scribbler_child() {
    use mensajeria::sys::sem::SemaphoreSet;
    use mensajeria::sys::shm::{Region, Segment};
    let Ok(spec) = std::env::var(SCRIBBLE_ENV) else {
        return;
    };
    let numbers: Vec<i64> = spec.split(',').map(|n| n.parse().unwrap()).collect();
    let [shm_key, sem_key, rounds] = numbers[..] else {
        panic!("bad {SCRIBBLE_ENV}: {spec}")
    };
    let segment = Segment::attach(shm_key as i32).unwrap();
    let len = segment.len();
    let sems = SemaphoreSet::open(sem_key as i32).unwrap();
    let region = Region::new(segment, sems, 0, ());
    for round in 0..rounds as u64 {
        let guard = region.lock(&[], WAIT).unwrap();
        // Header: head and next far off, capacity and slot size absurd.
        for (offset, value) in [(16, u64::MAX), (24, 0), (40, 1 << 62), (48, round)] {
            guard.write_u64(offset, value);
        }
        // Every 8 bytes past the header: ids, timestamps, lengths of 2^63
        // and content alike get garbage, a newline in every content.
        let mut offset = 64;
        while offset + 8 <= len {
            let value = match (offset / 8 + round as usize) % 3 {
                0 => 1u64 << 63,
                1 => u64::from_le_bytes(*b"\nERROR:x"),
                _ => round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            };
            guard.write_u64(offset, value);
            offset += 8;
        }
        drop(guard);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs [`scribbler_child`] in a second process against `broker`'s IPC
/// objects and waits (bounded) for it to finish its rounds.
fn scribble(broker: &Broker, rounds: u32) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "broker_hostile::scribbler_child",
            "--nocapture",
            "-q",
        ])
        .env(
            SCRIBBLE_ENV,
            format!("{},{},{rounds}", broker.shm_key, broker.sem_key),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish_scribbling(child: std::process::Child) {
    let output = wait_output(child, WAIT);
    assert!(
        output.status.success(),
        "scribbler failed:\n{}",
        show(&output)
    );
}

#[test]
fn a_scribbled_segment_is_served_from_the_file_and_never_trusted() {
    let dir = TestDir::new("hostile-scribble");
    let mut broker = Broker::start(&dir, &["--ring", "16", "--max-msg-size", "64"]);
    let mut p = broker.producer();
    let mut c = broker.consumer("reader");
    let content = |id: u64| format!("message {id}: {}", "x".repeat((id % 40) as usize));
    for id in 1..=10 {
        p.expect(&format!("SEND:{}", content(id)), &format!("OK:MSG_ID:{id}"));
    }
    // Once over everything, then the consumer reads: exact bytes, from the
    // file, as well-formed lines of the protocol.
    finish_scribbling(scribble(&broker, 1));
    for id in 1..=10 {
        c.send("GET");
        assert_eq!(c.reply(), format!("MSG:{id}:{}", content(id)));
    }
    // Then while it keeps scribbling, the broker stores and serves on.
    let child = scribble(&broker, 300);
    for id in 11..=60 {
        p.expect(&format!("SEND:{}", content(id)), &format!("OK:MSG_ID:{id}"));
        c.send("GET");
        assert_eq!(c.reply(), format!("MSG:{id}:{}", content(id)));
    }
    finish_scribbling(child);
    let log = broker.log_text();
    let key = format!("key 0x{:x}", broker.shm_key);
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&key) && l.contains("messages file")),
        "no error naming the key:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    drop((p, c));
    assert_eq!(broker.terminate().code(), Some(0), "{}", broker.stderr());
    // The next start works; the file's ids are consecutive, none twice.
    broker.restart();
    let mut p = broker.producer();
    p.expect("SEND:after", "OK:MSG_ID:61");
    let mut c = broker.consumer("reader");
    c.expect("GET", "MSG:61:after");
    let file = log_bytes(&broker.messages);
    let scan = mensajeria::store::scan(&file[..], 64, 0, usize::MAX).unwrap();
    assert_eq!(scan.tail, mensajeria::store::Tail::Clean);
    let ids: Vec<u64> = scan.kept.iter().map(|r| r.id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
}

/// xorshift64, seeded from the clock (printed, so a failure can be rerun
/// with `MQ_TEST_SEED`).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("MQ_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("power cut seed: MQ_TEST_SEED={seed}");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Byte offset where record `id` ends in the messages file `bytes`, or
/// the file's length if it is not there.
fn end_of_record(bytes: &[u8], id: u64) -> usize {
    let scan = mensajeria::store::scan(bytes, 1 << 20, 0, usize::MAX).unwrap();
    let mut end = 0;
    for record in &scan.kept {
        end += mensajeria::store::record_len(record.id, record.timestamp, record.content.len())
            as usize;
        if record.id >= id {
            return end;
        }
    }
    bytes.len()
}

/// One power cut: SIGKILL under load, then the files cut back to a random
/// point past everything fsynced-and-known (acknowledged, seen by a
/// consumer or counted in NEXT_ID) with nothing, zeros or random bytes
/// after the cut. Returns the ids acknowledged with their contents.
fn load_and_cut(
    broker: &mut Broker,
    round: u64,
    rng: &mut Rng,
    seen: &mut Vec<u64>,
) -> Vec<(u64, String)> {
    let mut p = broker.producer();
    let mut c = broker.consumer("c");
    let batch: Vec<String> = (0..200).map(|k| format!("r{round}-{k}")).collect();
    let mut wire = String::new();
    for content in &batch {
        wire.push_str(&format!("SEND:{content}\n"));
    }
    p.send_bytes(wire.as_bytes());
    let mut acked = Vec::new();
    let acked_id = |line: &str| -> u64 {
        let id = line.strip_prefix("OK:MSG_ID:").expect(line);
        id.parse().unwrap()
    };
    let read_before = rng.below(150);
    while (acked.len() as u64) < read_before {
        let line = p.try_line().expect("broker alive before the kill");
        acked.push((acked_id(&line), batch[acked.len()].clone()));
    }
    for _ in 0..rng.below(read_before + 1) {
        c.send("GET");
        let line = c.reply();
        if let Some(rest) = line.strip_prefix("MSG:") {
            seen.push(rest.split(':').next().unwrap().parse().unwrap());
        }
    }
    broker.kill();
    // Replies that reached our socket before the kill count as acked.
    while let Some(line) = p.try_line() {
        acked.push((acked_id(&line), batch[acked.len()].clone()));
    }
    let offsets = std::fs::read_to_string(mensajeria::store::offsets_path(&broker.messages))
        .unwrap_or_default();
    let durable_next = offsets
        .lines()
        .find_map(|l| l.strip_prefix("NEXT_ID:"))
        .map_or(0, |n| n.parse::<u64>().unwrap());
    let known = acked
        .iter()
        .map(|&(id, _)| id)
        .chain(seen.iter().copied())
        .chain([durable_next.saturating_sub(1)])
        .max()
        .unwrap_or(0);
    let mut bytes = log_bytes(&broker.messages);
    let floor = end_of_record(&bytes, known);
    let cut = floor + rng.below((bytes.len() - floor) as u64 + 1) as usize;
    bytes.truncate(cut);
    let extra = 1 + rng.below(3000) as usize;
    match round % 3 {
        0 => {}
        1 => bytes.extend(std::iter::repeat_n(0u8, extra)),
        _ => bytes.extend((0..extra).map(|_| rng.next() as u8)),
    }
    replace_log(&broker.messages, &bytes);
    acked
}

#[test]
fn a_power_cut_never_stops_the_start_and_loses_nothing_acknowledged() {
    let dir = TestDir::new("hostile-power-cut");
    let mut rng = Rng::new();
    let mut broker = Broker::start(&dir, &["--fsync", "always", "--capacity", "2000"]);
    // An id that consumes only at the end holds every message until then.
    drop(broker.consumer("audit"));
    let offsets = mensajeria::store::offsets_path(&broker.messages);
    eventually("the audit cursor to be saved", || {
        std::fs::read_to_string(&offsets).is_ok_and(|text| text.contains("CONSUMER:audit:0"))
    });
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut seen: Vec<u64> = Vec::new();
    for round in 0..6 {
        acked.extend(load_and_cut(&mut broker, round, &mut rng, &mut seen));
        // Never --repair: a power cut must not need it.
        broker.restart();
        assert!(!broker.stderr().contains("--repair"), "{}", broker.stderr());
    }
    // Consumer c saw no gap: each delivery follows the one before, or
    // repeats one already seen (a redelivery after the crash).
    let mut c = broker.consumer("c");
    loop {
        c.send("GET");
        let line = c.reply();
        let Some(rest) = line.strip_prefix("MSG:") else {
            break;
        };
        seen.push(rest.split(':').next().unwrap().parse().unwrap());
    }
    let mut highest = 0;
    for &id in &seen {
        assert!(
            id <= highest + 1,
            "consumer c skipped from {highest} to {id}: {seen:?}"
        );
        highest = highest.max(id);
    }
    // Nothing acknowledged is lost, and it is what was sent.
    let mut audit = broker.consumer("audit");
    let mut held = std::collections::HashMap::new();
    loop {
        audit.send("GET");
        let line = audit.reply();
        let Some(rest) = line.strip_prefix("MSG:") else {
            break;
        };
        let (id, content) = rest.split_once(':').unwrap();
        held.insert(id.parse::<u64>().unwrap(), content.to_string());
    }
    for (id, content) in &acked {
        assert_eq!(held.get(id), Some(content), "acknowledged message {id}");
    }
    assert_eq!(broker.terminate().code(), Some(0));
}
