//! The shell's fault tests: a real ring in shared memory (keys of the
//! test's own, 8 slots) and a real segment log, with the disk's calls made
//! to fail through [`FaultPlan`]. Each checks that the replies are the truth about
//! what is on disk: a SEND answered `ERROR:` is never delivered and never
//! found by a restart's scan; one answered `OK:` under `always` is on disk.

use super::*;
use crate::broker::recovery::Recovered;
use crate::broker::state::Start;
use crate::disk::{Disk, DiskOp, FaultPlan};
use crate::protocol::{self, Reply};
use crate::segments::SegmentLog;
use crate::store;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicU32;

/// A core over a fresh ring and an empty segment log in `dir`.
struct Harness {
    core: Core,
    dir: PathBuf,
    plan: Arc<FaultPlan>,
    conn: Conn,
    _peer: TcpStream,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Harness {
    fn new(name: &str, fsync: FsyncPolicy) -> Harness {
        Harness::with_segments(name, fsync, 1 << 20)
    }

    /// With segments of `segment_bytes`.
    fn with_segments(name: &str, fsync: FsyncPolicy, segment_bytes: u64) -> Harness {
        Harness::build(name, fsync, segment_bytes, |_| {})
    }

    /// With segments of `segment_bytes` and the settings `configure` makes.
    fn build(
        name: &str,
        fsync: FsyncPolicy,
        segment_bytes: u64,
        configure: impl FnOnce(&mut CoreConfig),
    ) -> Harness {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id() & 0xfff;
        let key = 0x5100_0000 | (pid << 12) as i32 | (n << 1) as i32;
        let dir = std::env::temp_dir().join(format!("mq-core-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = Arc::new(Logger::stderr_only(Level::Error));
        let ring = Ring::create(key, key + 1, 8, 64, 1, None, &log).unwrap();
        let plan = FaultPlan::new();
        let path = dir.join("messages.dat");
        let disk = Disk::with_faults(Arc::clone(&plan));
        let (log_file, _) = SegmentLog::open(&path, disk, segment_bytes, 64).unwrap();
        let recovered = Recovered {
            log: log_file,
            start: Start {
                next_id: 1,
                head: 1,
                next_consumer: 1,
                cursors: Vec::new(),
            },
        };
        let mut config = CoreConfig {
            instance: "00000000000000aa".into(),
            messages_file: path,
            send_timeout: Duration::from_millis(10),
            consumer_ttl: Duration::from_secs(60),
            fsync,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 100,
            max_consumers: 100,
            capacity: 1000,
            max_bytes: 1 << 30,
        };
        configure(&mut config);
        let core = Core::new(config, log, ring, recovered).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let conn = Conn::new(1, stream);
        let mut out = Vec::new();
        core.register_consumer(&conn, Some(b"c"), false, &mut sink(&mut out))
            .unwrap();
        Harness {
            core,
            dir,
            plan,
            conn,
            _peer: peer,
        }
    }

    /// Sends `contents` as one batch; returns the replies as text.
    fn send(&self, contents: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        self.core
            .send_batch(contents, &mut sink(&mut out), &|| false);
        lines(&out)
    }

    /// What `GET`s deliver now (up to 8), as `id:content`.
    fn deliveries(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.core.get_batch(&self.conn, 8, &mut sink(&mut out));
        lines(&out)
            .into_iter()
            .filter_map(|line| match protocol::parse_reply(line.as_bytes()) {
                Reply::Msg { id, content } => {
                    Some(format!("{id}:{}", String::from_utf8_lossy(content)))
                }
                _ => None,
            })
            .collect()
    }

    /// The contents a restart would find in the segments.
    fn on_disk(&self) -> Vec<String> {
        let path = self.dir.join("messages.dat");
        let (log, report) = SegmentLog::open(&path, Disk::real(), 1 << 20, 64).unwrap();
        assert_eq!(report.torn, None);
        log.read(log.first_id(), 1000, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|r| String::from_utf8(r.content).unwrap())
            .collect()
    }

    /// The segment files in the directory.
    fn segments(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.len() == "messages.dat.".len() + 20 && name.starts_with("messages.dat.")
            })
            .count()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.core.remove_queue();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sink(out: &mut Vec<u8>) -> impl FnMut(Reply<'_>) + '_ {
    move |reply| protocol::encode_reply(out, &reply)
}

fn lines(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|line| !line.starts_with("NOTIFY"))
        .map(str::to_string)
        .collect()
}

fn ok(id: u64) -> String {
    protocol::reply_text(&Reply::MsgId(id))
}

fn failed() -> String {
    protocol::reply_text(&Reply::error(ErrorCode::PersistenceFailure))
}

#[test]
fn a_failed_write_is_an_error_and_leaves_nothing() {
    let h = Harness::new("write", FsyncPolicy::Always);
    h.plan.fail(DiskOp::Write, 1, 1);
    assert_eq!(h.send(&[b"a", b"b"]), [failed(), failed()]);
    assert!(h.deliveries().is_empty());
    assert_eq!(h.send(&[b"c"]), [ok(1)]);
    assert_eq!(h.deliveries().len(), 1);
    assert_eq!(h.on_disk(), ["c"]);
}

#[test]
fn under_always_a_failed_fsync_is_an_error_never_delivered_nor_found() {
    let h = Harness::new("fsync", FsyncPolicy::Always);
    assert_eq!(h.send(&[b"kept"]), [ok(1)]);
    h.plan.fail(DiskOp::Fsync, 1, 1);
    assert_eq!(h.send(&[b"x", b"y"]), [failed(), failed()]);
    // Cut back from the file and the ring: a later SEND takes their place
    // and is the only one delivered after the first.
    assert_eq!(h.send(&[b"z"]), [ok(2)]);
    let delivered = h.deliveries();
    assert_eq!(delivered, ["1:kept", "2:z"]);
    assert_eq!(h.on_disk(), ["kept", "z"]);
    assert_eq!(h.core.durability.fsync_failures.load(Ordering::Relaxed), 1);
}

#[test]
fn a_cut_back_that_fails_stops_every_send_until_restart() {
    let h = Harness::new("fence", FsyncPolicy::Always);
    // The first SEND creates the first segment (and fsyncs its directory).
    assert_eq!(h.send(&[b"a"]), [ok(1)]);
    h.deliveries();
    h.plan.fail(DiskOp::Fsync, 1, 1);
    h.plan.fail(DiskOp::Truncate, 1, 1);
    assert_eq!(h.send(&[b"x"]), [failed()]);
    let writes = h.plan.calls(DiskOp::Write);
    assert_eq!(h.send(&[b"y"]), [failed()]);
    assert_eq!(
        h.plan.calls(DiskOp::Write),
        writes,
        "nothing more is written"
    );
    assert!(h.deliveries().is_empty(), "never delivered");
}

#[test]
fn under_interval_a_failed_fsync_refuses_sends_until_one_works() {
    let h = Harness::new("interval", FsyncPolicy::Interval);
    assert_eq!(h.send(&[b"a"]), [ok(1)]);
    h.plan.fail(DiskOp::Fsync, 1, 1);
    assert!(h.core.sync_now().is_err());
    assert_eq!(h.send(&[b"b"]), [failed()]);
    h.core.sync_now().unwrap();
    assert_eq!(h.send(&[b"c"]), [ok(2)]);
    assert_eq!(h.on_disk(), ["a", "c"]);
}

#[test]
fn a_failed_offsets_save_is_retried() {
    let h = Harness::new("offsets", FsyncPolicy::Always);
    assert_eq!(h.send(&[b"a"]), [ok(1)]);
    h.deliveries();
    for op in [DiskOp::Write, DiskOp::Fsync, DiskOp::Rename] {
        // Everything is fsynced under `always` already: the first call of
        // each kind is the offsets file's.
        h.plan.fail(op, 1, 1);
        assert!(h.core.save_offsets(false).is_err(), "{op:?}");
        let saved = store::load_offsets(&h.core.config.messages_file, false).unwrap();
        assert!(saved.0.consumers.is_empty(), "{op:?}: old file kept");
    }
    h.core.save_offsets(false).unwrap();
    let saved = store::load_offsets(&h.core.config.messages_file, false).unwrap();
    assert_eq!(saved.0.consumers[0].offset, 1, "the dirty flag survived");
}

#[test]
fn consumed_segments_are_deleted_and_a_failed_delete_is_retried() {
    // 30-byte segments: every SEND of one 20-byte record rolls.
    let h = Harness::with_segments("delete", FsyncPolicy::Always, 30);
    for (k, content) in [b"old1", b"old2", b"live"].iter().enumerate() {
        assert_eq!(h.send(&[&content[..]]), [ok(k as u64 + 1)]);
    }
    assert_eq!(h.segments(), 3);
    h.plan.fail(DiskOp::Remove, 1, 1);
    assert_eq!(h.deliveries().len(), 3);
    assert_eq!(h.segments(), 3, "the delete failed");
    h.core.delete_consumed();
    assert_eq!(h.segments(), 1, "retried; the active segment stays");
    assert_eq!(h.send(&[b"after"]), [ok(4)]);
    assert_eq!(
        h.on_disk(),
        ["live", "after"],
        "live's segment goes at the next release"
    );
    h.deliveries();
    assert_eq!(h.on_disk(), ["after"]);
}

#[test]
fn a_roll_whose_fsync_fails_is_a_failed_send() {
    let h = Harness::with_segments("roll", FsyncPolicy::Always, 30);
    assert_eq!(h.send(&[b"one"]), [ok(1)]);
    // The next SEND rolls: the fsync of the sealed segment fails.
    h.plan.fail(DiskOp::Fsync, 1, 1);
    assert_eq!(h.send(&[b"two"]), [failed()]);
    assert_eq!(h.send(&[b"three"]), [ok(2)]);
    assert_eq!(h.on_disk(), ["one", "three"]);
    assert_eq!(h.deliveries(), ["1:one", "2:three"]);
}

#[test]
fn behind_the_ring_messages_come_from_the_log_in_order() {
    let h = Harness::with_segments("behind", FsyncPolicy::Never, 100);
    let contents: Vec<String> = (1..=30).map(|k| format!("m{k}")).collect();
    let refs: Vec<&[u8]> = contents.iter().map(|c| c.as_bytes()).collect();
    let replies = h.send(&refs);
    assert_eq!(replies.len(), 30);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(h.deliveries());
    }
    let expected: Vec<String> = (1..=30).map(|k| format!("{k}:m{k}")).collect();
    assert_eq!(got, expected, "22 from the log, 8 from the ring");
}

#[test]
fn capacity_and_max_bytes_answer_queue_full_after_the_wait() {
    let full = protocol::reply_text(&Reply::error(ErrorCode::QueueFull));
    let h = Harness::build("full", FsyncPolicy::Never, 1 << 20, |c| c.capacity = 3);
    assert_eq!(
        h.send(&[b"a", b"b", b"c", b"d"]),
        [ok(1), ok(2), ok(3), full.clone()]
    );
    assert_eq!(h.deliveries().len(), 3);
    assert_eq!(h.send(&[b"e"]), [ok(4)], "consumed: room again");
    // Each record of one byte is 15 bytes ("1:1700000000:1:a\n" is 17):
    // 40 bytes hold two.
    let h = Harness::build("bytes", FsyncPolicy::Never, 1 << 20, |c| c.max_bytes = 40);
    assert_eq!(h.send(&[b"a", b"b", b"c"]), [ok(1), ok(2), full]);
}
