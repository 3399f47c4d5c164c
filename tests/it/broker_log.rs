//! The log is the queue (issue 9), through the real binary: backlogs far
//! larger than the ring (`--ring 16`) delivered in order from the segment
//! files and then from the ring, with competing consumers, in ack mode and
//! across a SIGKILL; a restart with no offsets file offers every record;
//! `--capacity` and `--max-bytes` answer `ERROR:Queue full` after the
//! wait; segment files named so `ls` sorts them, deleted once consumed;
//! the upgrade of a single messages file; and a real full disk (a 2 MiB
//! tmpfs) that recovers by itself as consumers move on, also after a
//! restart on the full disk. No test depends on wall-clock speed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

const NO_MESSAGES: &str = "ERROR:No messages available";
/// The backlog: far past the ring of 16.
const BACKLOG: u64 = 10_000;

fn content(id: u64) -> String {
    format!("message {id} {}", "b".repeat((id % 50) as usize))
}

/// Sends the contents of ids `from..=to` pipelined, 500 at a time, and
/// checks each `OK:MSG_ID`.
fn send_range(producer: &mut Client, from: u64, to: u64) {
    let mut id = from;
    while id <= to {
        let last = (id + 499).min(to);
        let mut batch = String::new();
        for k in id..=last {
            batch.push_str(&format!("SEND:{}\n", content(k)));
        }
        producer.send_bytes(batch.as_bytes());
        for k in id..=last {
            assert_eq!(producer.reply(), format!("OK:MSG_ID:{k}"));
        }
        id = last + 1;
    }
}

fn parse_msg(line: &str) -> (u64, String) {
    line.strip_prefix("MSG:")
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(id, content)| Some((id.parse().ok()?, content.to_string())))
        .unwrap_or_else(|| panic!("expected MSG:<id>:<content>, got {line:?}"))
}

/// Up to `count` messages from pipelined GETs (stops at the first
/// `ERROR:No messages available`; the rest of the batch is read too).
fn get_batch(consumer: &mut Client, count: usize) -> Vec<(u64, String)> {
    consumer.send_bytes("GET\n".repeat(count).as_bytes());
    let mut got = Vec::new();
    for _ in 0..count {
        let line = consumer.reply();
        if line != NO_MESSAGES {
            got.push(parse_msg(&line));
        }
    }
    got
}

/// Every message waiting, in batches of 256, bounded.
fn drain(consumer: &mut Client) -> Vec<(u64, String)> {
    let mut all = Vec::new();
    for _ in 0..1000 {
        let got = get_batch(consumer, 256);
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
    panic!("more than 256000 messages waiting");
}

/// Checks that `got` is exactly the ids `from..=to` with their contents.
fn assert_in_order(got: &[(u64, String)], from: u64, to: u64) {
    assert_eq!(got.len() as u64, to + 1 - from, "count from {from} to {to}");
    for (k, (id, text)) in got.iter().enumerate() {
        assert_eq!(*id, from + k as u64, "gap or duplicate at position {k}");
        assert_eq!(*text, content(*id));
    }
}

#[test]
fn a_backlog_far_past_the_ring_comes_from_disk_in_order_then_from_the_ring() {
    let dir = TestDir::new("log-backlog");
    let broker = Broker::start(&dir, &["--ring", "16", "--segment-size", "64K"]);
    let mut consumer = broker.consumer("c");
    let mut producer = broker.producer();
    send_range(&mut producer, 1, BACKLOG);
    assert_eq!(broker.stat("ring"), 16);
    assert_eq!(broker.stat("messages"), BACKLOG);
    assert!(broker.stat("held_bytes") > BACKLOG * 20);
    // The ring holds the newest 16: everything before comes from disk.
    let got = drain(&mut consumer);
    assert_in_order(&got, 1, BACKLOG);
    let from_disk = broker.stat("delivered_from_disk");
    assert!(from_disk >= BACKLOG - 16, "{from_disk} from disk");
    // Caught up: what follows is served from the ring.
    for id in BACKLOG + 1..=BACKLOG + 100 {
        producer.expect(&format!("SEND:{}", content(id)), &format!("OK:MSG_ID:{id}"));
        consumer.send("GET");
        assert_eq!(consumer.reply(), format!("MSG:{id}:{}", content(id)));
    }
    assert_eq!(broker.stat("delivered_from_disk"), from_disk);
    consumer.expect("GET", NO_MESSAGES);
}

#[test]
fn competing_consumers_share_a_backlog_behind_the_ring_once_each() {
    let dir = TestDir::new("log-competing");
    let broker = Broker::start(&dir, &["--ring", "16", "--segment-size", "64K"]);
    drop(broker.consumer("shared"));
    send_range(&mut broker.producer(), 1, BACKLOG);
    let port = broker.port;
    let threads: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                c.send("REGISTER:CONSUMER:shared");
                assert_eq!(c.line(), "OK:CONSUMER:shared");
                drain(&mut c)
            })
        })
        .collect();
    let mut all: Vec<(u64, String)> = Vec::new();
    for thread in threads {
        let got = thread.join().expect("a consumer thread failed");
        // Each connection sees its own share in increasing order.
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "out of order");
        all.extend(got);
    }
    all.sort();
    assert_in_order(&all, 1, BACKLOG);
}

#[test]
fn ack_mode_takes_a_backlog_behind_the_ring_in_order() {
    let dir = TestDir::new("log-ack");
    let broker = Broker::start(&dir, &["--ring", "16", "--segment-size", "64K"]);
    let mut c = broker.connect();
    c.send("REGISTER:CONSUMER:a:ACK");
    assert_eq!(c.line(), "OK:CONSUMER:a");
    send_range(&mut broker.producer(), 1, BACKLOG);
    let mut all = Vec::new();
    loop {
        let got = get_batch(&mut c, 200);
        if got.is_empty() {
            break;
        }
        let acks: String = got.iter().map(|(id, _)| format!("ACK:{id}\n")).collect();
        c.send_bytes(acks.as_bytes());
        for (id, _) in &got {
            assert_eq!(c.reply(), format!("OK:ACK:{id}"));
        }
        all.extend(got);
    }
    assert_in_order(&all, 1, BACKLOG);
    assert_eq!(broker.stat("in_flight"), 0);
    assert_eq!(broker.stat("messages"), 0, "acked: nothing held");
}

#[test]
fn a_backlog_survives_sigkill_and_the_cursor_resumes_without_a_gap() {
    let dir = TestDir::new("log-kill");
    let mut broker = Broker::start(&dir, &["--ring", "16", "--segment-size", "64K"]);
    let mut consumer = broker.consumer("c");
    send_range(&mut broker.producer(), 1, BACKLOG);
    let mut got = Vec::new();
    while got.len() < 3000 {
        got.extend(get_batch(&mut consumer, 100));
    }
    assert_in_order(&got, 1, 3000);
    drop(consumer);
    broker.kill();
    broker.restart();
    assert_eq!(broker.stat("next_id"), BACKLOG + 1);
    let mut consumer = broker.consumer("c");
    let again = drain(&mut consumer);
    // The offsets save may lag: some are redelivered, none skipped.
    let resumed = again.first().expect("the rest of the backlog").0;
    assert!(
        resumed <= 3001,
        "resumed at {resumed}, past the last delivered"
    );
    assert_in_order(&again, resumed, BACKLOG);
    broker
        .producer()
        .expect("SEND:after", &format!("OK:MSG_ID:{}", BACKLOG + 1));
}

#[test]
fn a_restart_without_offsets_offers_every_record_on_disk() {
    let dir = TestDir::new("log-no-offsets");
    // A capacity below the backlog: the old recovery cut to the last
    // `capacity` records; nothing held may be skipped.
    let mut broker = Broker::start(
        &dir,
        &[
            "--ring",
            "16",
            "--capacity",
            "20000",
            "--send-timeout",
            "100",
        ],
    );
    let mut consumer = broker.consumer("c");
    send_range(&mut broker.producer(), 1, BACKLOG);
    assert_in_order(&drain(&mut consumer), 1, BACKLOG);
    drop(consumer);
    assert!(broker.terminate().success());
    std::fs::remove_file(mensajeria::store::offsets_path(&broker.messages)).unwrap();
    broker.extra = ["--ring", "16", "--capacity", "1000"]
        .map(String::from)
        .to_vec();
    broker.restart();
    assert_eq!(broker.stat("messages"), BACKLOG);
    let mut consumer = broker.consumer("new");
    assert_in_order(&drain(&mut consumer), 1, BACKLOG);
    // Held past --capacity: SENDs wait, then are refused; nothing dropped.
    let mut producer = broker.producer();
    producer.expect("SEND:x", &format!("OK:MSG_ID:{}", BACKLOG + 1));
}

#[test]
fn capacity_answers_queue_full_after_the_wait_and_a_consumer_makes_room() {
    let dir = TestDir::new("log-capacity");
    let broker = Broker::start(&dir, &["--capacity", "100", "--send-timeout", "100"]);
    let mut consumer = broker.consumer("c");
    let mut producer = broker.producer();
    send_range(&mut producer, 1, 100);
    producer.expect("SEND:one too many", "ERROR:Queue full");
    assert_eq!(broker.stat("queue_full"), 1);
    // A SEND that waits is answered as soon as a consumer makes room
    // (a send timeout far longer than the test).
    let slow_dir = TestDir::new("log-capacity-wait");
    let slow = Broker::start(&slow_dir, &["--capacity", "3", "--send-timeout", "60000"]);
    let mut c = slow.consumer("c");
    let mut p = slow.producer();
    send_range(&mut p, 1, 3);
    p.send(&format!("SEND:{}", content(4)));
    assert_in_order(&get_batch(&mut c, 2), 1, 2);
    assert_eq!(p.reply(), "OK:MSG_ID:4");
    // The first broker: room again after consuming.
    assert_eq!(get_batch(&mut consumer, 10).len(), 10);
    producer.expect("SEND:fits now", "OK:MSG_ID:101");
}

#[test]
fn max_bytes_answers_queue_full_and_deleted_segments_make_room() {
    let dir = TestDir::new("log-max-bytes");
    // 16 KiB of records on disk, so segments of 4 KiB (a quarter).
    let broker = Broker::start(&dir, &["--max-bytes", "16K", "--send-timeout", "100"]);
    let mut consumer = broker.consumer("c");
    let mut producer = broker.producer();
    let body = "m".repeat(900);
    let mut stored = 0;
    loop {
        producer.send(&format!("SEND:{body}"));
        match producer.reply().as_str() {
            "ERROR:Queue full" => break,
            reply => assert_eq!(reply, format!("OK:MSG_ID:{}", stored + 1)),
        }
        stored += 1;
        assert!(stored < 100, "--max-bytes did not bound the queue");
    }
    assert!(broker.stat("held_bytes") <= 16 * 1024);
    assert!(
        stored >= 12,
        "only {stored} records of ~920 bytes in 16 KiB"
    );
    assert_eq!(get_batch(&mut consumer, stored).len(), stored);
    producer.expect(
        &format!("SEND:{body}"),
        &format!("OK:MSG_ID:{}", stored + 1),
    );
}

#[test]
fn small_segments_sort_by_first_id_and_consumed_ones_are_deleted() {
    let dir = TestDir::new("log-segments");
    let broker = Broker::start(&dir, &["--segment-size", "4K"]);
    let mut consumer = broker.consumer("c");
    // One at a time: a pipelined batch goes whole into one segment.
    let mut producer = broker.producer();
    for id in 1..=300 {
        producer.expect(&format!("SEND:{}", content(id)), &format!("OK:MSG_ID:{id}"));
    }
    let segments = segments_of(&broker.messages);
    assert!(segments.len() >= 4, "{segments:?}");
    // `ls` order is id order: every name is the first id, 20 digits.
    let listing = Command::new("ls").arg(&dir.path).output().unwrap();
    let names: Vec<String> = String::from_utf8(listing.stdout)
        .unwrap()
        .lines()
        .filter(|n| n.len() == "messages.dat.".len() + 20 && n.starts_with("messages.dat."))
        .map(str::to_string)
        .collect();
    let ids: Vec<u64> = names.iter().map(|n| n[13..].parse().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]) && ids[0] == 1,
        "{names:?}"
    );
    let records = log_bytes(&broker.messages);
    assert_eq!(records.iter().filter(|&&b| b == b'\n').count(), 300);
    assert_eq!(broker.stat("segments"), segments.len() as u64);
    // Consumed: every sealed segment goes; the active one stays.
    assert_in_order(&drain(&mut consumer), 1, 300);
    assert_eq!(segments_of(&broker.messages).len(), 1);
    assert!(log_len(&broker.messages) <= 4096 + 100);
}

#[test]
fn a_single_messages_file_of_the_old_version_is_carried_over() {
    let dir = TestDir::new("log-upgrade");
    let messages = dir.join("messages.dat");
    let mut old = String::new();
    for id in 1..=50 {
        let text = content(id);
        old.push_str(&format!("{id}:1700000000:{}:{text}\n", text.len()));
    }
    std::fs::write(&messages, &old).unwrap();
    std::fs::write(
        dir.join("messages.dat.offsets"),
        "NEXT_ID:51\nNEXT_CONSUMER:1\nHEAD:21\nCAPACITY:1000\nCONSUMER:c:20\n",
    )
    .unwrap();
    let broker = Broker::start(&dir, &["--ring", "16"]);
    assert!(!messages.exists(), "the old file is now a segment");
    let first = dir.join("messages.dat.00000000000000000001");
    assert_eq!(std::fs::read_to_string(&first).unwrap(), old);
    assert!(
        broker.log_text().contains("upgrade"),
        "{}",
        broker.log_text()
    );
    assert_in_order(&drain(&mut broker.consumer("c")), 21, 50);
    broker.producer().expect("SEND:new", "OK:MSG_ID:51");
}

/// A tmpfs mounted for one test, unmounted when the guard goes (after the
/// broker that uses it: declare the guard first).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("running mount");
        assert!(
            output.status.success(),
            "the full-disk test needs a real small tmpfs and mount refused it \
             (run the tests as root, with CAP_SYS_ADMIN): {}",
            show(&output)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Sends big messages until the disk refuses one; returns the last id
/// stored.
fn fill_disk(producer: &mut Client, mut last: u64, body: &str) -> u64 {
    for _ in 0..10_000 {
        producer.send(&format!("SEND:{body}"));
        match producer.reply().as_str() {
            "ERROR:Persistence failure" => return last,
            reply => assert_eq!(reply, format!("OK:MSG_ID:{}", last + 1)),
        }
        last += 1;
    }
    panic!("a 2 MiB disk took 10000 messages");
}

/// SENDs until one is stored again (each refused one is fine): the disk
/// recovered by itself.
fn send_until_stored(producer: &mut Client, next: u64) {
    eventually("a SEND to be stored again", || {
        producer.send("SEND:after");
        let reply = producer.reply();
        if reply == format!("OK:MSG_ID:{next}") {
            return true;
        }
        assert_eq!(reply, "ERROR:Persistence failure");
        false
    });
}

#[test]
fn a_full_disk_recovers_by_itself_as_consumers_pass_segments_also_after_a_restart() {
    let dir = TestDir::new("log-full-disk");
    let _disk = Tmpfs::mount(&dir.join("disk"), "2m");
    let mut broker = Broker::start_with(
        &dir,
        &["--segment-size", "256K", "--max-msg-size", "4096"],
        |b| b.messages = dir.join("disk").join("messages.dat"),
    );
    let body = "d".repeat(4000);
    let mut consumer = broker.consumer("c");
    let mut producer = broker.producer();
    let last = fill_disk(&mut producer, 0, &body);
    assert!(last > 100, "only {last} messages of 4 KB on 2 MiB");
    assert!(broker.log_text().contains("cannot store messages"));
    // Consumers pass two segments: they are deleted, SENDs work again.
    assert_eq!(get_batch(&mut consumer, 150).len(), 150);
    send_until_stored(&mut producer, last + 1);
    let last = fill_disk(&mut producer, last + 1, &body);

    // A restart on the full disk works, and recovers the same way.
    drop((consumer, producer));
    broker.kill();
    broker.restart();
    assert_eq!(broker.stat("next_id"), last + 1);
    let mut consumer = broker.consumer("c");
    let mut producer = broker.producer();
    let got = get_batch(&mut consumer, 200);
    assert_eq!(got.len(), 200);
    assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1), "in order");
    send_until_stored(&mut producer, last + 1);
    drop((consumer, producer));
    assert_eq!(broker.terminate().code(), Some(0), "{}", broker.stderr());
}
