//! Disk faults for real: the broker runs under a file size limit
//! (`ulimit -f`; it ignores SIGXFSZ), so appends past it fail with EFBIG.
//! A failed store answers `ERROR:Persistence failure`, acknowledges
//! nothing that is not stored, leaves no partial record, keeps serving
//! consumers, and recovers by itself once compaction makes room.

use crate::util::*;

#[test]
fn a_failing_write_answers_persistence_failure_and_recovers_by_itself() {
    let dir = TestDir::new("faults-fsize");
    let mut broker = Broker::start_with(&dir, &["--fsync", "always"], |b| {
        b.file_size_limit_kib = Some(64);
    });
    let mut consumer = broker.consumer("c");
    let mut producer = broker.producer();
    let body = "f".repeat(1000);
    // Fill the file up to the limit: about 64 records of ~1020 bytes.
    let mut acknowledged = Vec::new();
    let mut failures = 0;
    for n in 1..=100 {
        producer.send(&format!("SEND:{n:04}{body}"));
        let reply = producer.reply();
        if let Some(id) = reply.strip_prefix("OK:MSG_ID:") {
            assert_eq!(
                failures, 0,
                "an OK after a failure, before any room was made"
            );
            acknowledged.push((id.parse::<u64>().unwrap(), n));
        } else {
            assert_eq!(reply, "ERROR:Persistence failure");
            failures += 1;
        }
    }
    assert!(
        failures > 0 && acknowledged.len() >= 50,
        "{} ok, {failures} failed",
        acknowledged.len()
    );
    // No partial record was left behind: the file holds exactly the
    // acknowledged records, whole.
    let file = std::fs::read(&broker.messages).unwrap();
    assert!(file.ends_with(b"\n"));
    assert_eq!(
        file.iter().filter(|&&b| b == b'\n').count(),
        acknowledged.len()
    );
    let log = broker.log_text();
    assert!(
        log.contains("cannot store messages") && log.contains("File too large"),
        "{log}"
    );

    // Consumers are still served while writes fail.
    for (id, n) in &acknowledged {
        consumer.send("GET");
        assert_eq!(consumer.reply(), format!("MSG:{id}:{n:04}{body}"));
    }
    // Everything consumed: compaction frees the file and writes work again.
    let mut next = acknowledged.last().unwrap().0 + 1;
    eventually("writes to succeed again", || {
        producer.send(&format!("SEND:again{next}"));
        let reply = producer.reply();
        if reply == format!("OK:MSG_ID:{next}") {
            return true;
        }
        assert_eq!(reply, "ERROR:Persistence failure");
        false
    });
    assert!(broker.log_text().contains("storing messages works again"));
    consumer.expect("GET", &format!("MSG:{next}:again{next}"));
    next += 1;

    // After a crash the file recovers cleanly: no torn tail, ids go on.
    broker.kill();
    broker.restart();
    assert!(!broker.stderr().contains("torn"), "{}", broker.stderr());
    broker
        .producer()
        .expect("SEND:after", &format!("OK:MSG_ID:{next}"));
}

/// A process of ours that is killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether every thread of `pid` is traced.
fn fully_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
            status
                .lines()
                .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        })
    })
}

/// `strace -e inject=` makes the real broker's second `fdatasync` from now
/// fail with EIO, under `--fsync always`. Rule: a SEND answered `ERROR:`
/// is never delivered and never found after a restart; one answered `OK:`
/// is on disk. (`./build.sh test` installs strace; without it this test
/// fails, naming the package.)
#[test]
fn an_fdatasync_eio_in_the_real_process_is_never_a_lie() {
    let which = std::process::Command::new("strace").arg("-V").output();
    assert!(
        which.is_ok_and(|o| o.status.success()),
        "this test needs strace: apt-get install -y strace (./build.sh test does it)"
    );
    let dir = TestDir::new("faults-strace");
    let mut broker = Broker::start(&dir, &["--fsync", "always"]);
    let mut producer = broker.producer();
    producer.expect("SEND:before", "OK:MSG_ID:1");
    let pid = broker.pid().to_string();
    let strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-p", &pid])
        .args([
            "-e",
            "trace=fdatasync",
            "-e",
            "inject=fdatasync:error=EIO:when=2",
        ])
        .spawn()
        .expect("start strace");
    let _strace = KillOnDrop(strace);
    eventually("strace to attach to every thread", || {
        fully_traced(broker.pid())
    });
    let mut acknowledged = vec!["before".to_string()];
    let mut refused = Vec::new();
    for n in 1..=6 {
        let content = format!("m{n}");
        producer.send(&format!("SEND:{content}"));
        let reply = producer.reply();
        if reply.starts_with("OK:MSG_ID:") {
            acknowledged.push(content);
        } else {
            assert_eq!(reply, "ERROR:Persistence failure");
            refused.push(content);
        }
    }
    assert_eq!(refused, ["m2"], "the second fdatasync failed, and only it");
    assert_eq!(broker.stat("fsync_failures"), 1);

    // Delivered: exactly the acknowledged ones, in order.
    let mut consumer = broker.consumer("c");
    let mut delivered = Vec::new();
    loop {
        consumer.send("GET");
        let reply = consumer.reply();
        if reply == "ERROR:No messages available" {
            break;
        }
        delivered.push(reply.splitn(3, ':').nth(2).unwrap().to_string());
    }
    assert_eq!(delivered, acknowledged);

    // Found after a crash and restart: exactly the acknowledged ones.
    broker.kill();
    let file = std::fs::read_to_string(&broker.messages).unwrap();
    let contents: Vec<&str> = file
        .lines()
        .map(|record| record.splitn(4, ':').nth(3).unwrap())
        .collect();
    assert_eq!(contents, acknowledged);
    broker.restart();
    assert_eq!(broker.stat("next_id"), acknowledged.len() as u64 + 1);
}
