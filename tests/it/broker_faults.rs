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
