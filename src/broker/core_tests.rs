//! The shell's fault tests: a real ring in shared memory (keys of the
//! test's own) and a real messages file, with the disk's calls made to fail
//! through [`FaultPlan`]. Each checks that the replies are the truth about
//! what is on disk: a SEND answered `ERROR:` is never delivered and never
//! found by a restart's scan; one answered `OK:` under `always` is on disk.

use super::*;
use crate::broker::recovery::Recovered;
use crate::broker::state::Start;
use crate::disk::{Disk, DiskOp, FaultPlan};
use crate::protocol::{self, Reply};
use crate::store::{self, Tail};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::AtomicU32;

/// A core over a fresh ring and an empty messages file in `dir`.
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
        let file = MessageFile::open(&path, 0, Disk::with_faults(Arc::clone(&plan))).unwrap();
        let recovered = Recovered {
            file,
            start: Start {
                next_id: 1,
                head: 1,
                next_consumer: 1,
                cursors: Vec::new(),
            },
            record_lens: VecDeque::new(),
        };
        let config = CoreConfig {
            instance: "00000000000000aa".into(),
            messages_file: path,
            send_timeout: Duration::from_millis(10),
            consumer_ttl: Duration::from_secs(60),
            fsync,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 100,
            max_consumers: 100,
        };
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

    /// What `GET`s deliver now (up to 8).
    fn deliveries(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.core.get_batch(&self.conn, 8, &mut sink(&mut out));
        lines(&out)
            .into_iter()
            .filter(|line| matches!(protocol::parse_reply(line.as_bytes()), Reply::Msg { .. }))
            .collect()
    }

    /// The contents a restart would find in the messages file.
    fn on_disk(&self) -> Vec<String> {
        let bytes = std::fs::read(self.dir.join("messages.dat")).unwrap();
        let scan = store::scan(&bytes[..], 64, 0, 1000).unwrap();
        assert_eq!(scan.tail, Tail::Clean);
        scan.kept
            .into_iter()
            .map(|r| String::from_utf8(r.content).unwrap())
            .collect()
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
    assert_eq!(delivered, ["MSG:1:kept", "MSG:2:z"]);
    assert_eq!(h.on_disk(), ["kept", "z"]);
    assert_eq!(h.core.durability.fsync_failures.load(Ordering::Relaxed), 1);
}

#[test]
fn a_cut_back_that_fails_stops_every_send_until_restart() {
    let h = Harness::new("fence", FsyncPolicy::Always);
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
fn a_failed_compaction_keeps_appending_to_the_live_file() {
    let h = Harness::new("compact", FsyncPolicy::Always);
    assert_eq!(h.send(&[b"old1", b"old2"]), [ok(1), ok(2)]);
    assert_eq!(h.deliveries().len(), 2);
    assert_eq!(h.send(&[b"live"]), [ok(3)]);
    for (op, nth) in [(DiskOp::Write, 2), (DiskOp::Fsync, 3), (DiskOp::Rename, 2)] {
        h.plan.fail(op, nth, 1);
        assert!(h.core.compact_if_worth_it(true).is_err(), "{op:?}");
        assert_eq!(h.on_disk(), ["old1", "old2", "live"], "{op:?}");
    }
    h.core.compact_if_worth_it(true).unwrap();
    assert_eq!(h.on_disk(), ["live"]);
    assert_eq!(h.send(&[b"after"]), [ok(4)]);
    assert_eq!(h.on_disk(), ["live", "after"], "appends go to the new file");
    assert!(!Path::new(&format!("{}.tmp", h.core.config.messages_file.display())).exists());
}
