//! Persistence, through the real broker: the record format on disk and that
//! it is written before `OK:MSG_ID`; recovery after SIGKILL under every
//! fsync policy (nothing lost, ids never reused, bytes kept exactly);
//! consumer offsets and assigned consumer ids across clean stops and
//! crashes, offsets clamped when the offsets file runs ahead of the
//! messages; a torn tail (half a record, or zeros) cut with a warning;
//! damage in the middle refused with the file, the byte offset and
//! `--repair`, and what `--repair` keeps; compaction while running and at
//! shutdown, keeping the unconsumed tail; group commit under `--fsync
//! always` with several producers; and the log levels. Each test reads and
//! writes the broker's files directly, so these tests pin the on-disk
//! format of DESIGN.md. They do not test power loss (that needs a file
//! system that can be cut off) or I/O errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::util::*;

const NO_MESSAGES: &str = "ERROR:No messages available";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The offsets file that goes with the broker's messages file.
fn offsets_file(broker: &Broker) -> PathBuf {
    let mut name = broker.messages.as_os_str().to_owned();
    name.push(".offsets");
    PathBuf::from(name)
}

fn offsets_lines(broker: &Broker) -> Vec<String> {
    std::fs::read_to_string(offsets_file(broker))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// One record as the test reads it from the messages file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    id: u64,
    timestamp: u64,
    content: Vec<u8>,
}

/// Parses a whole messages file strictly: `ID:TIMESTAMP:SIZE:CONTENT\n`
/// records back to back, plain decimal fields, SIZE trusted and the newline
/// exactly where it says. Panics on anything else.
fn read_records(path: &Path) -> Vec<Stored> {
    let bytes = log_bytes(path);
    let mut records = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let at = bytes.len() - rest.len();
        let mut fields = [0u64; 3];
        for field in &mut fields {
            let colon = rest.iter().position(|&b| b == b':').unwrap_or_else(|| {
                panic!(
                    "record at byte {at}: missing ':' in {:?}",
                    String::from_utf8_lossy(rest)
                )
            });
            let digits = &rest[..colon];
            assert!(
                !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
                "record at byte {at}: field {:?} is not a decimal number",
                String::from_utf8_lossy(digits)
            );
            *field = std::str::from_utf8(digits).unwrap().parse().unwrap();
            rest = &rest[colon + 1..];
        }
        let [id, timestamp, size] = fields;
        let size = size as usize;
        assert!(
            rest.len() > size && rest[size] == b'\n',
            "record {id} at byte {at}: no newline where SIZE {size} says"
        );
        records.push(Stored {
            id,
            timestamp,
            content: rest[..size].to_vec(),
        });
        rest = &rest[size + 1..];
    }
    records
}

/// Sends every content as `SEND:` in one write (pipelined), then reads one
/// `OK:MSG_ID:` reply per message; returns the ids in order.
fn send_pipelined(client: &mut Client, contents: &[String]) -> Vec<u64> {
    let mut batch = Vec::new();
    for content in contents {
        batch.extend_from_slice(b"SEND:");
        batch.extend_from_slice(content.as_bytes());
        batch.push(b'\n');
    }
    client.send_bytes(&batch);
    contents
        .iter()
        .map(|content| {
            let line = client.reply();
            line.strip_prefix("OK:MSG_ID:")
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("SEND:{content}: got {line:?}"))
        })
        .collect()
}

/// `MSG:<id>:<content>` to its parts.
fn parse_msg(line: &str) -> (u64, String) {
    line.strip_prefix("MSG:")
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(id, content)| Some((id.parse().ok()?, content.to_string())))
        .unwrap_or_else(|| panic!("expected MSG:<id>:<content>, got {line:?}"))
}

/// Sends `count` pipelined `GET`s and returns the messages; each must be a
/// `MSG:`.
fn get_pipelined(client: &mut Client, count: usize) -> Vec<(u64, String)> {
    client.send_bytes("GET\n".repeat(count).as_bytes());
    (0..count).map(|_| parse_msg(&client.reply())).collect()
}

/// Exactly `count` messages, then nothing more.
fn get_exactly(client: &mut Client, count: usize) -> Vec<(u64, String)> {
    let got = get_pipelined(client, count);
    client.expect("GET", NO_MESSAGES);
    got
}

/// Every message waiting for this consumer, one `GET` at a time, bounded.
fn drain(client: &mut Client) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    for _ in 0..10_000 {
        client.send("GET");
        let line = client.reply();
        if line == NO_MESSAGES {
            return got;
        }
        got.push(parse_msg(&line));
    }
    panic!("more than 10000 messages waiting: {:?}", got.last());
}

/// Runs the broker's command line to its exit (bounded by [`WAIT`]), for a
/// start that must fail.
fn run_to_exit(broker: &Broker) -> Output {
    let mut command = broker.command(0);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_output(command.spawn().expect("spawn broker"), WAIT)
}

/// The level word of each log line (`TIME LEVEL message`).
fn log_levels(log: &str) -> Vec<&str> {
    log.lines()
        .map(|line| line.split(' ').nth(1).unwrap_or(""))
        .collect()
}

/// Log lines at `level` whose words include `word` (split on anything but
/// letters, digits and `.-_`).
fn log_lines_with<'a>(log: &'a str, level: &str, word: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|line| line.split(' ').nth(1) == Some(level))
        .filter(|line| {
            line.split(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
                .any(|w| w == word)
        })
        .collect()
}

// --- 1. Records on disk ---------------------------------------------------

#[test]
fn the_record_is_in_the_file_in_the_original_format_when_ok_arrives() {
    for policy in ["always", "interval", "never"] {
        let dir = TestDir::new(&format!("persist-format-{policy}"));
        let mut broker = Broker::start(&dir, &["--fsync", policy]);
        let mut producer = broker.producer();
        let before = unix_now();
        producer.expect("SEND:hello", "OK:MSG_ID:1");
        // Read at once: the write() must precede the OK under every policy.
        let bytes = log_bytes(&broker.messages);
        let after = unix_now();
        let text = String::from_utf8(bytes).unwrap();
        let (timestamp, rest) = text
            .strip_prefix("1:")
            .and_then(|rest| rest.split_once(':'))
            .unwrap_or_else(|| panic!("{policy}: file holds {text:?}"));
        assert_eq!(rest, "5:hello\n", "{policy}: file holds {text:?}");
        assert!(
            !timestamp.is_empty()
                && timestamp.bytes().all(|b| b.is_ascii_digit())
                && !timestamp.starts_with('0'),
            "{policy}: timestamp {timestamp:?} is not plain decimal"
        );
        let timestamp: u64 = timestamp.parse().unwrap();
        assert!(
            (before..=after).contains(&timestamp),
            "{policy}: timestamp {timestamp} outside {before}..={after}"
        );

        producer.expect("SEND:a:b", "OK:MSG_ID:2");
        let records = read_records(&broker.messages);
        assert_eq!(records.len(), 2, "{policy}: {records:?}");
        assert_eq!((records[1].id, &records[1].content[..]), (2, &b"a:b"[..]));
        assert!(broker.terminate().success());
    }
}

// --- 2. Crash recovery ----------------------------------------------------

/// Sends `count` pipelined messages, SIGKILLs the broker, restarts it, and
/// checks that a new consumer gets every one with its id and content, and
/// that the next id follows.
fn a_crash_loses_nothing(policy: &str) {
    const COUNT: u64 = 300;
    let dir = TestDir::new(&format!("persist-crash-{policy}"));
    let mut broker = Broker::start(&dir, &["--fsync", policy]);
    let mut producer = broker.producer();
    let contents: Vec<String> = (1..=COUNT)
        .map(|i| format!("message {i}: {}:end", "x".repeat(i as usize % 37)))
        .collect();
    let ids = send_pipelined(&mut producer, &contents);
    assert_eq!(ids, (1..=COUNT).collect::<Vec<_>>(), "{policy}");

    broker.kill();
    broker.restart();
    let mut consumer = broker.consumer("fresh");
    let got = get_exactly(&mut consumer, COUNT as usize);
    let want: Vec<(u64, String)> = ids.into_iter().zip(contents).collect();
    assert_eq!(got, want, "{policy}: messages after the crash");

    let mut producer = broker.producer();
    producer.expect("SEND:after the crash", &format!("OK:MSG_ID:{}", COUNT + 1));
    consumer.expect("GET", &format!("MSG:{}:after the crash", COUNT + 1));
    assert!(broker.terminate().success());
}

#[test]
fn a_crash_loses_nothing_with_fsync_always() {
    a_crash_loses_nothing("always");
}

#[test]
fn a_crash_loses_nothing_with_fsync_interval() {
    a_crash_loses_nothing("interval");
}

#[test]
fn a_crash_loses_nothing_with_fsync_never() {
    a_crash_loses_nothing("never");
}

#[test]
fn ids_are_never_reused_after_crash_after_crash() {
    // Two crashes in a row, a message stored between them: the ids keep
    // growing and the file keeps every record once.
    let dir = TestDir::new("persist-crash-twice");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    broker.producer().expect("SEND:one", "OK:MSG_ID:1");
    broker.kill();
    broker.restart();
    broker.producer().expect("SEND:two", "OK:MSG_ID:2");
    broker.kill();
    broker.restart();
    broker.producer().expect("SEND:three", "OK:MSG_ID:3");
    let ids: Vec<u64> = read_records(&broker.messages)
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(broker.terminate().success());
}

#[test]
fn opaque_bytes_survive_a_crash_byte_for_byte() {
    let dir = TestDir::new("persist-crash-bytes");
    let mut broker = Broker::start(&dir, &["--fsync", "never"]);
    // Every byte but the two that end a line, NUL and 0xff included.
    let content: Vec<u8> = (0u8..=255).filter(|&b| b != b'\n' && b != b'\r').collect();
    let mut line = b"SEND:".to_vec();
    line.extend_from_slice(&content);
    line.push(b'\n');
    let mut producer = broker.producer();
    producer.send_bytes(&line);
    assert_eq!(producer.reply(), "OK:MSG_ID:1");

    broker.kill();
    broker.restart();
    assert_eq!(read_records(&broker.messages)[0].content, content);
    let mut consumer = broker.consumer("bytes");
    consumer.send("GET");
    let got = loop {
        let line = consumer.line_bytes();
        if !line.starts_with(b"NOTIFY:") {
            break line;
        }
    };
    let mut want = b"MSG:1:".to_vec();
    want.extend_from_slice(&content);
    assert_eq!(got, want);
    assert!(broker.terminate().success());
}

// --- 3. Offsets -----------------------------------------------------------

fn five_messages(broker: &Broker) -> Vec<String> {
    let contents: Vec<String> = (1..=5).map(|i| format!("m{i}")).collect();
    let ids = send_pipelined(&mut broker.producer(), &contents);
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    contents
}

#[test]
fn offsets_survive_a_clean_stop_and_a_new_id_starts_at_the_oldest_held() {
    let dir = TestDir::new("persist-offsets-clean");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    five_messages(&broker);
    let mut c1 = broker.consumer("c1");
    let got = get_pipelined(&mut c1, 3);
    assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    c1.expect("QUIT", "OK:BYE");
    assert!(broker.terminate().success(), "{}", broker.stderr());

    let lines = offsets_lines(&broker);
    assert!(
        lines.contains(&"CONSUMER:c1:3".to_string()),
        "offsets file: {lines:?}"
    );
    assert!(
        lines.contains(&"NEXT_ID:6".to_string()),
        "offsets file: {lines:?}"
    );

    broker.restart();
    // A new id, registered before c1 moves on, starts at the oldest
    // message still held: 4 (1..3 were consumed by the only cursor).
    let mut newcomer = broker.consumer("newcomer");
    let mut c1 = broker.consumer("c1");
    let want = vec![(4, "m4".to_string()), (5, "m5".to_string())];
    assert_eq!(
        get_exactly(&mut c1, 2),
        want,
        "c1 resumes after its saved offset"
    );
    assert_eq!(
        get_exactly(&mut newcomer, 2),
        want,
        "a new id starts at the oldest held"
    );
    broker.producer().expect("SEND:m6", "OK:MSG_ID:6");
    assert!(broker.terminate().success());
}

#[test]
fn offsets_saved_in_the_background_survive_a_crash_without_a_gap() {
    let dir = TestDir::new("persist-offsets-crash");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    five_messages(&broker);
    let mut c1 = broker.consumer("c1");
    let got = get_pipelined(&mut c1, 3);
    assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    eventually("the offsets file to show c1 at 3", || {
        offsets_lines(&broker).contains(&"CONSUMER:c1:3".to_string())
    });
    broker.kill();
    drop(c1);

    broker.restart();
    let mut c1 = broker.consumer("c1");
    let got = drain(&mut c1);
    // Redelivery would be allowed, a gap never; the offset on disk was 3.
    assert_eq!(got, vec![(4, "m4".to_string()), (5, "m5".to_string())]);
    assert!(broker.terminate().success());
}

#[test]
fn a_crash_before_the_offsets_are_saved_redelivers_and_never_skips() {
    // Killed right after the GETs, the broker may or may not have saved
    // c1's offset (anything from nothing to 3): whatever c1 gets next must
    // continue without a gap up to 5.
    let dir = TestDir::new("persist-offsets-early-crash");
    let mut broker = Broker::start(&dir, &["--fsync", "interval"]);
    five_messages(&broker);
    let mut c1 = broker.consumer("c1");
    assert_eq!(
        get_pipelined(&mut c1, 3)
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    broker.kill();
    broker.restart();
    let mut c1 = broker.consumer("c1");
    let ids: Vec<u64> = drain(&mut c1).into_iter().map(|m| m.0).collect();
    let first = *ids.first().expect("4 and 5 at least");
    assert!(first <= 4, "skipped to {first}: {ids:?}");
    assert_eq!(ids, (first..=5).collect::<Vec<_>>());
    assert!(broker.terminate().success());
}

#[test]
fn assigned_consumer_ids_are_not_given_again_after_a_restart() {
    let dir = TestDir::new("persist-next-consumer");
    let mut broker = Broker::start(&dir, &["--fsync", "always", "--consumer-ttl", "1"]);
    let register = |broker: &Broker| {
        let mut client = broker.connect();
        client.send("REGISTER:CONSUMER");
        let line = client.line();
        let id = line
            .strip_prefix("OK:CONSUMER:")
            .unwrap_or_else(|| panic!("REGISTER:CONSUMER: {line:?}"))
            .to_string();
        client.expect("QUIT", "OK:BYE");
        id
    };
    let first = register(&broker);
    // Its cursor expires, so only NEXT_CONSUMER remembers the id was given.
    eventually("the cursor to expire", || broker.stat("cursors") == 0);
    assert!(broker.terminate().success());
    let lines = offsets_lines(&broker);
    assert!(
        !lines.iter().any(|line| line.starts_with("CONSUMER:")),
        "offsets file: {lines:?}"
    );
    broker.restart();
    let second = register(&broker);
    assert_ne!(first, second, "consumer id {first} given twice");
    assert!(broker.terminate().success());
}

// --- 4. Offsets clamped on load -------------------------------------------

#[test]
fn an_offset_past_the_last_message_is_clamped_with_a_warning() {
    let dir = TestDir::new("persist-clamp");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    let ids = send_pipelined(
        &mut broker.producer(),
        &["a".into(), "b".into(), "c".into()],
    );
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(broker.terminate().success());
    assert_eq!(read_records(&broker.messages).len(), 3);

    // The offsets file as the broker left it, plus a cursor far ahead.
    let mut offsets = std::fs::read_to_string(offsets_file(&broker)).unwrap_or_default();
    offsets.push_str("CONSUMER:x:999\n");
    std::fs::write(offsets_file(&broker), offsets).unwrap();

    broker.restart();
    let mut x = broker.consumer("x");
    x.expect("GET", NO_MESSAGES);
    broker.producer().expect("SEND:four", "OK:MSG_ID:4");
    x.expect("GET", "MSG:4:four");
    x.expect("GET", NO_MESSAGES);

    let log = broker.log_text();
    let warnings = log_lines_with(&log, "WARN", "x");
    assert!(
        warnings.iter().any(|line| line.contains("999")),
        "no warning about consumer x's offset 999:\n{log}"
    );
    let stderr = broker.stderr();
    assert!(
        log_lines_with(&stderr, "WARN", "x")
            .iter()
            .any(|line| line.contains("999")),
        "the warning goes to stderr too:\n{stderr}"
    );
    assert!(broker.terminate().success());
}

// --- 5. Torn tail ---------------------------------------------------------

/// Stores three messages, stops cleanly, appends `tail` to the messages
/// file, restarts: the start warns about a torn record, keeps the three,
/// and the file is cut back so the next record follows them.
fn a_torn_tail_is_cut_with_a_warning(name: &str, tail: &[u8]) {
    let dir = TestDir::new(name);
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    let contents: Vec<String> = vec!["first".into(), "second:2".into(), "third".into()];
    assert_eq!(
        send_pipelined(&mut broker.producer(), &contents),
        vec![1, 2, 3]
    );
    assert!(broker.terminate().success());
    let original = log_bytes(&broker.messages);
    assert_eq!(read_records(&broker.messages).len(), 3);
    let mut torn = original.clone();
    torn.extend_from_slice(tail);
    replace_log(&broker.messages, &torn);

    broker.restart();
    let stderr = broker.stderr();
    assert!(
        stderr.to_lowercase().contains("torn"),
        "no warning about a torn record on stderr:\n{stderr}"
    );
    let log = broker.log_text();
    assert!(
        log.lines()
            .any(|l| l.split(' ').nth(1) == Some("WARN") && l.to_lowercase().contains("torn")),
        "no WARN line about a torn record in the log:\n{log}"
    );
    let mut consumer = broker.consumer("reader");
    let got = get_exactly(&mut consumer, 3);
    assert_eq!(
        got,
        vec![
            (1, contents[0].clone()),
            (2, contents[1].clone()),
            (3, contents[2].clone())
        ]
    );

    broker.producer().expect("SEND:fourth", "OK:MSG_ID:4");
    let bytes = log_bytes(&broker.messages);
    assert!(
        bytes.starts_with(&original),
        "the three records were changed"
    );
    assert_eq!(bytes.last(), Some(&b'\n'));
    let records = read_records(&broker.messages);
    assert_eq!(
        records.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(records[3].content, b"fourth");
    consumer.expect("GET", "MSG:4:fourth");
    assert!(broker.terminate().success());
}

#[test]
fn half_a_record_at_the_end_is_cut_with_a_warning() {
    a_torn_tail_is_cut_with_a_warning("persist-torn-half", b"4:1700000000:10:abc");
}

#[test]
fn zeros_at_the_end_are_cut_with_a_warning() {
    a_torn_tail_is_cut_with_a_warning("persist-torn-zeros", &[0u8; 4096]);
}

#[test]
fn half_a_record_then_zeros_is_cut_with_a_warning() {
    let mut tail = b"4:1700000000:10:ab".to_vec();
    tail.extend_from_slice(&[0u8; 8192]);
    a_torn_tail_is_cut_with_a_warning("persist-torn-half-zeros", &tail);
}

// --- 6. Damage in the middle ----------------------------------------------

/// Stores three messages, stops cleanly, then sets byte `at_in_record_2`
/// of record 2 to `byte`; returns the broker (stopped), the damaged file's
/// bytes and the byte offset where record 2 starts.
fn damaged_in_the_middle(
    dir: &TestDir,
    at_in_record_2: usize,
    byte: u8,
) -> (Broker, Vec<u8>, usize) {
    let mut broker = Broker::start(dir, &["--fsync", "always"]);
    let contents: Vec<String> = vec![
        "the first one survives".into(),
        "two".into(),
        "three".into(),
    ];
    assert_eq!(
        send_pipelined(&mut broker.producer(), &contents),
        vec![1, 2, 3]
    );
    assert!(broker.terminate().success());
    let mut bytes = log_bytes(&broker.messages);
    let record_2 = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    assert!(bytes[record_2..].starts_with(b"2:"));
    bytes[record_2 + at_in_record_2] = byte;
    replace_log(&broker.messages, &bytes);
    (broker, bytes, record_2)
}

fn refuses_to_start_naming_file_offset_and_repair(broker: &Broker, damaged: &[u8], offset: usize) {
    let output = run_to_exit(broker);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening on"),
        "{}",
        show(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&broker.messages.display().to_string()),
        "stderr does not name the file:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("offset {offset}")),
        "stderr does not name byte offset {offset}:\n{stderr}"
    );
    assert!(
        stderr.contains("--repair"),
        "stderr does not name --repair:\n{stderr}"
    );
    assert_eq!(
        log_bytes(&broker.messages),
        damaged,
        "a refused start changed the file"
    );
}

#[test]
fn damage_in_the_middle_stops_the_start_and_repair_keeps_the_records_before_it() {
    let dir = TestDir::new("persist-damage");
    // The ':' after record 2's id becomes '#'.
    let (mut broker, damaged, offset) = damaged_in_the_middle(&dir, 1, b'#');
    refuses_to_start_naming_file_offset_and_repair(&broker, &damaged, offset);
    // The harness's launch reports the failure too, and nothing is left running.
    let refused = broker
        .launch(0)
        .expect_err("a damaged file must stop the start");
    assert!(refused.contains("exit status: 1"), "{refused}");

    broker.extra.push("--repair".into());
    broker.restart();
    let saved: Vec<PathBuf> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // The damaged segment's name, then `.corrupt-<time>`.
            name.strip_prefix("messages.dat.00000000000000000001.corrupt-")
                .is_some_and(|time| !time.is_empty() && time.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    assert_eq!(
        saved.len(),
        1,
        "want one messages.dat.<first id>.corrupt-<time> in {}",
        dir.path.display()
    );
    assert_eq!(
        std::fs::read(&saved[0]).unwrap(),
        damaged,
        "the saved copy must hold the original bytes"
    );
    assert_eq!(
        log_bytes(&broker.messages),
        &damaged[..offset],
        "repair keeps the valid prefix"
    );
    let log = broker.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("repair")),
        "no repair warning:\n{log}"
    );

    let mut consumer = broker.consumer("after-repair");
    assert_eq!(
        get_exactly(&mut consumer, 1),
        vec![(1, "the first one survives".to_string())]
    );
    assert!(broker.terminate().success());

    // After a clean stop the repaired files start without --repair, and
    // the consumer's offset was kept.
    broker.extra.pop();
    broker.restart();
    broker.consumer("after-repair").expect("GET", NO_MESSAGES);
    assert!(broker.terminate().success());
}

/// `--repair` when a kept record is still waiting: the messages file needs
/// consecutive ids, so the ids lost with the damage (2 and 3) are given
/// again, and the log says so, naming them (docs/operations.md).
#[test]
fn repair_with_records_still_waiting_warns_that_lost_ids_are_given_again() {
    let dir = TestDir::new("persist-repair-ids");
    let (mut broker, _, _) = damaged_in_the_middle(&dir, 1, b'#');
    assert!(offsets_lines(&broker).contains(&"NEXT_ID:4".to_string()));
    broker.extra.push("--repair".into());
    broker.restart();
    let log = broker.log_text();
    assert!(
        log.contains("messages 2..3 were lost with the damage, and their ids will be given"),
        "{log}"
    );
    let mut producer = broker.producer();
    producer.expect("SEND:after repair", "OK:MSG_ID:2");
    assert!(broker.terminate().success());

    // And the files stay readable without --repair.
    broker.extra.pop();
    broker.restart();
    let mut consumer = broker.consumer("reader");
    let want = vec![
        (1, "the first one survives".to_string()),
        (2, "after repair".to_string()),
    ];
    assert_eq!(drain(&mut consumer), want);
    assert!(broker.terminate().success());
}

/// `--repair` when no kept record is waiting: the lost ids are never
/// given again; the broker continues from the saved NEXT_ID.
#[test]
fn repair_with_nothing_waiting_never_gives_lost_ids_again() {
    let dir = TestDir::new("persist-repair-jump");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    let contents: Vec<String> = vec!["one".into(), "two".into(), "three".into()];
    assert_eq!(
        send_pipelined(&mut broker.producer(), &contents),
        vec![1, 2, 3]
    );
    let mut consumer = broker.consumer("c");
    consumer.expect("GET", "MSG:1:one");
    drop(consumer);
    assert!(broker.terminate().success());
    // Record 2's ':' after its id becomes '#': record 1 is kept, and
    // consumed, so nothing kept is waiting.
    let mut bytes = log_bytes(&broker.messages);
    let second = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    assert!(bytes[second..].starts_with(b"2:"));
    bytes[second + 1] = b'#';
    replace_log(&broker.messages, &bytes);
    broker.extra.push("--repair".into());
    broker.restart();
    assert!(
        broker
            .log_text()
            .contains("messages 2..3 were lost with the damage; continuing from id 4"),
        "{}",
        broker.log_text()
    );
    broker.producer().expect("SEND:four", "OK:MSG_ID:4");
    let mut consumer = broker.consumer("c");
    consumer.expect("GET", "MSG:4:four");
    assert!(broker.terminate().success());
    broker.extra.pop();
    broker.restart();
    broker.producer().expect("SEND:five", "OK:MSG_ID:5");
}

/// A `--repair` start saves the offsets at once, so a crash right after it
/// does not make the next plain start refuse.
#[test]
fn a_crash_right_after_a_repaired_start_needs_no_second_repair() {
    let dir = TestDir::new("persist-repair-crash");
    let (mut broker, _, offset) = damaged_in_the_middle(&dir, 1, b'#');
    broker.extra.push("--repair".into());
    broker.restart();
    assert_eq!(log_len(&broker.messages), offset as u64);
    broker.kill();

    broker.extra.pop();
    if let Err(refused) = broker.launch(broker.port) {
        panic!("a plain start after a repaired one was refused:\n{refused}");
    }
    broker
        .consumer("reader")
        .expect("GET", "MSG:1:the first one survives");
    assert!(broker.terminate().success());
}

#[test]
fn a_damaged_size_in_the_middle_stops_the_start() {
    let dir = TestDir::new("persist-damage-size");
    // Record 2 is `2:<10 digits>:3:two\n`: its SIZE digit becomes 9, so the
    // newline is not where SIZE says.
    let (broker, damaged, offset) = damaged_in_the_middle(&dir, 13, b'9');
    assert_eq!(
        &damaged[offset + 12..offset + 15],
        b":9:",
        "record 2: {:?}",
        String::from_utf8_lossy(&damaged)
    );
    refuses_to_start_naming_file_offset_and_repair(&broker, &damaged, offset);
}

// --- 7. Segments ---------------------------------------------------------

/// Messages of this size make a 64 KiB segment in about 70 records.
const BIG: usize = 900;
/// The segment size these tests run with.
const SEGMENT: u64 = 64 * 1024;

/// Sends `count` messages of [`BIG`] bytes, 100 at a time, each hundred
/// taken at once by `consumer`; returns the bytes they took in the file.
fn stream_through(producer: &mut Client, consumer: &mut Client, count: usize) -> u64 {
    const CHUNK: usize = 100;
    let mut written = 0;
    for chunk in 0..count / CHUNK {
        let first = chunk * CHUNK + 1;
        let contents: Vec<String> = (first..first + CHUNK)
            .map(|i| format!("{i:06}{}", "z".repeat(BIG - 6)))
            .collect();
        let ids = send_pipelined(producer, &contents);
        assert_eq!(
            ids,
            (first as u64..(first + CHUNK) as u64).collect::<Vec<_>>()
        );
        written += contents
            .iter()
            .zip(&ids)
            .map(|(c, id)| format!("{id}:1700000000:{}:{c}\n", c.len()).len() as u64)
            .sum::<u64>();
        let got = get_pipelined(consumer, CHUNK);
        assert_eq!(got, ids.into_iter().zip(contents).collect::<Vec<_>>());
    }
    written
}

#[test]
fn consumed_segments_are_deleted_and_ids_continue_after_them() {
    const COUNT: usize = 3000;
    let dir = TestDir::new("persist-segments");
    let mut broker = Broker::start(&dir, &["--fsync", "interval", "--segment-size", "64K"]);
    let mut producer = broker.producer();
    let mut consumer = broker.consumer("keeper");
    // While it streams, disk use stays within the live records (at most
    // 100 here) plus two segments.
    let written = stream_through(&mut producer, &mut consumer, COUNT);
    consumer.expect("GET", NO_MESSAGES);
    assert!(written > 2_600_000, "{written} bytes went through the log");
    assert!(
        log_len(&broker.messages) <= 2 * SEGMENT + 100 * (BIG as u64 + 30),
        "{} bytes on disk with nothing live",
        log_len(&broker.messages)
    );
    // The names sort by first id, and what remains is whole records with
    // consecutive ids, up to the last.
    let segments = segments_of(&broker.messages);
    assert!(!segments.is_empty() && segments.len() <= 2, "{segments:?}");
    let records = read_records(&broker.messages);
    let last = records.last().expect("the active segment holds the last");
    assert_eq!(last.id, COUNT as u64);
    assert_eq!(records[0].id + records.len() as u64 - 1, last.id);
    let first_name = segments[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(first_name, format!("messages.dat.{:020}", records[0].id));

    assert!(broker.terminate().success());
    let lines = offsets_lines(&broker);
    assert!(
        lines.contains(&format!("NEXT_ID:{}", COUNT + 1)),
        "offsets file: {lines:?}"
    );
    broker.restart();
    let mut consumer = broker.consumer("keeper");
    consumer.expect("GET", NO_MESSAGES);
    broker
        .producer()
        .expect("SEND:after", &format!("OK:MSG_ID:{}", COUNT + 1));
    consumer.expect("GET", &format!("MSG:{}:after", COUNT + 1));
    assert!(broker.terminate().success());
}

#[test]
fn deleting_segments_keeps_the_unconsumed_tail_and_a_crash_after_it_loses_nothing() {
    // 1200 big messages (1.05 MiB of records, 17 segments) and 20 small
    // ones, all stored before anything is consumed. Then the consumer
    // takes exactly the 1200: every segment before the one holding the
    // 20 goes, and the 20 stay, unchanged.
    const BIG_COUNT: u64 = 1200;
    let dir = TestDir::new("persist-segments-tail");
    let mut broker = Broker::start(
        &dir,
        &[
            "--fsync",
            "always",
            "--capacity",
            "2000",
            "--segment-size",
            "64K",
        ],
    );
    let mut producer = broker.producer();
    let mut consumer = broker.consumer("keeper");
    let mut sent = Vec::new();
    for chunk in 0..BIG_COUNT / 100 {
        let contents: Vec<String> = (1..=100)
            .map(|i| format!("{chunk:03}-{i:03}{}", "y".repeat(BIG - 7)))
            .collect();
        let ids = send_pipelined(&mut producer, &contents);
        sent.extend(ids.into_iter().zip(contents));
    }
    let tail: Vec<String> = (1..=20).map(|i| format!("live {i}")).collect();
    let tail_ids = send_pipelined(&mut producer, &tail);
    assert_eq!(
        tail_ids,
        (BIG_COUNT + 1..=BIG_COUNT + 20).collect::<Vec<_>>()
    );
    let before = read_records(&broker.messages);
    assert_eq!(before.len() as u64, BIG_COUNT + 20);
    assert!(segments_of(&broker.messages).len() >= 16);
    for chunk in sent.chunks(100) {
        assert_eq!(get_pipelined(&mut consumer, chunk.len()), chunk);
    }
    let after = read_records(&broker.messages);
    assert!(after.len() as u64 >= 20, "{} records left", after.len());
    assert_eq!(after[after.len() - 20..], before[BIG_COUNT as usize..]);
    assert!(
        log_len(&broker.messages) <= 2 * SEGMENT,
        "within two segments"
    );

    // Once the cursor is saved, a crash redelivers nothing and loses nothing.
    eventually("the offsets save", || {
        offsets_lines(&broker).contains(&format!("CONSUMER:keeper:{BIG_COUNT}"))
    });
    broker.kill();
    broker.restart();
    let mut consumer = broker.consumer("keeper");
    let want: Vec<(u64, String)> = tail_ids.into_iter().zip(tail).collect();
    assert_eq!(drain(&mut consumer), want);
    broker
        .producer()
        .expect("SEND:next", &format!("OK:MSG_ID:{}", BIG_COUNT + 21));
    assert!(broker.terminate().success());
}

// --- 8. Group commit ------------------------------------------------------

#[test]
fn fsync_always_with_several_producers_at_once_stores_everything_once() {
    const PRODUCERS: usize = 4;
    const EACH: usize = 200;
    let dir = TestDir::new("persist-group-commit");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    let port = broker.port;
    let threads: Vec<_> = (0..PRODUCERS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut producer = Client::connect(port);
                producer.expect("REGISTER:PRODUCER", "OK:PRODUCER");
                let contents: Vec<String> = (0..EACH)
                    .map(|i| format!("producer {t} message {i}"))
                    .collect();
                let ids = send_pipelined(&mut producer, &contents);
                assert!(
                    ids.windows(2).all(|w| w[0] < w[1]),
                    "producer {t}: ids out of order: {ids:?}"
                );
                ids.into_iter().zip(contents).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut sent = BTreeMap::new();
    for thread in threads {
        for (id, content) in thread.join().expect("a producer thread failed") {
            assert!(sent.insert(id, content).is_none(), "id {id} given twice");
        }
    }
    let total = (PRODUCERS * EACH) as u64;
    assert_eq!(
        sent.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );

    broker.kill();
    broker.restart();
    let records = read_records(&broker.messages);
    assert_eq!(records.len(), total as usize);
    for record in &records {
        assert_eq!(
            record.content,
            sent[&record.id].as_bytes(),
            "record {}",
            record.id
        );
    }
    let mut consumer = broker.consumer("counter");
    let got = get_exactly(&mut consumer, total as usize);
    assert_eq!(got, sent.into_iter().collect::<Vec<_>>());
    assert!(broker.terminate().success());
}

// --- 9. Log levels --------------------------------------------------------

/// Sends three messages one at a time and consumes them, then stops
/// cleanly; returns the log.
fn three_messages_then_the_log(name: &str, extra: &[&str]) -> String {
    let dir = TestDir::new(name);
    let mut broker = Broker::start(&dir, extra);
    let mut producer = broker.producer();
    for id in 1..=3 {
        producer.expect(&format!("SEND:m{id}"), &format!("OK:MSG_ID:{id}"));
    }
    let mut consumer = broker.consumer("reader");
    assert_eq!(get_exactly(&mut consumer, 3).len(), 3);
    assert!(broker.terminate().success());
    assert!(
        broker.log.exists(),
        "no log file at {}",
        broker.log.display()
    );
    broker.log_text()
}

#[test]
fn debug_level_logs_every_stored_message() {
    let log = three_messages_then_the_log("persist-log-debug", &["--log-level", "debug"]);
    let mut covered = Vec::new();
    for line in log.lines().filter(|l| l.contains("stored messages")) {
        assert_eq!(line.split(' ').nth(1), Some("DEBUG"), "{line}");
        let range = line.rsplit(' ').next().unwrap();
        let (first, last) = range
            .split_once("..=")
            .unwrap_or_else(|| panic!("no id range in {line:?}"));
        covered.extend(first.parse::<u64>().unwrap()..=last.parse::<u64>().unwrap());
    }
    assert_eq!(covered, vec![1, 2, 3], "stored messages lines:\n{log}");
}

#[test]
fn info_level_logs_no_line_per_message() {
    let log = three_messages_then_the_log("persist-log-info", &[]);
    let levels = log_levels(&log);
    assert!(
        levels.contains(&"INFO"),
        "info level writes the lifecycle:\n{log}"
    );
    assert!(!levels.contains(&"DEBUG"), "{log}");
    assert!(!log.contains("stored messages"), "{log}");
}

#[test]
fn error_level_writes_no_info_lines() {
    let log = three_messages_then_the_log("persist-log-error", &["--log-level", "error"]);
    let levels = log_levels(&log);
    assert!(
        levels.iter().all(|&level| level == "ERROR"),
        "only ERROR lines at --log-level error:\n{log}"
    );
}

/// Offsets saved a second ago may lag far behind after a crash under
/// load. The broker still starts, and the cursor resumes where it was
/// saved: every record after it is still on disk and offered again, in
/// order (redelivering some, skipping none); nothing raises it.
#[test]
fn a_crash_with_offsets_far_behind_still_restarts_without_a_skip() {
    let dir = TestDir::new("persist-stale");
    let mut broker = Broker::start(&dir, &["--capacity", "100"]);
    let mut producer = broker.producer();
    let mut consumer = broker.consumer("c");
    let mut last = 0;
    for chunk in 0..50 {
        let contents: Vec<String> = (0..100)
            .map(|i| format!("m{}", chunk * 100 + i + 1))
            .collect();
        let ids = send_pipelined(&mut producer, &contents);
        for got in get_exactly(&mut consumer, ids.len()) {
            assert_eq!(got.0, last + 1);
            last = got.0;
        }
    }
    assert_eq!(last, 5000);
    broker.kill();
    broker.restart();
    let saved: u64 = offsets_lines(&broker)
        .iter()
        .find_map(|l| l.strip_prefix("CONSUMER:c:")?.parse().ok())
        .unwrap_or(0);
    let mut consumer = broker.consumer("c");
    let again = drain(&mut consumer);
    let ids: Vec<u64> = again.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (saved + 1..=5000).collect::<Vec<_>>(),
        "resumed after {saved}"
    );
    broker.producer().expect("SEND:next", "OK:MSG_ID:5001");
}
