//! Durability: the group commit that fsyncs the active segment, what a
//! failed fsync means, persistence-failure streaks, and the offsets file.
//!
//! Group commit: one fsync covers every append made before it started, so
//! many senders waiting under `--fsync always` share one `fdatasync`. Only
//! the active segment is ever unsynced: a roll fdatasyncs the segment it
//! seals before the first record goes to the new one, and the shell hands
//! the new file over with the append ([`Durability::appended`]).
//!
//! After a failed fsync the kernel may have dropped the dirty pages, so a
//! later successful fsync proves nothing about them (PostgreSQL's
//! "fsyncgate"). Hence the rules, in docs/operations.md "Faults":
//! - `always`: every message written after the last good fsync is answered
//!   `ERROR:Persistence failure`, is never shown to a consumer, and is cut
//!   from the active segment and the ring ([`SyncFailure`] tells the shell
//!   to); until the cut is done, and for good if it fails, no SEND is
//!   taken. A roll whose fdatasync of the sealed segment fails counts as a
//!   failed fsync ([`Durability::failed_elsewhere`]).
//! - `interval`: a failed background fsync is logged and counted, and SENDs
//!   are refused until an fsync succeeds again; what was acknowledged since
//!   the last good fsync may be lost in a crash.
//!
//! Every disk call goes through [`crate::disk::Disk`], so tests can make
//! each of them fail. This file knows nothing of sockets or the ring.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::conn::lock;
use super::state::Snapshot;
use crate::disk::Disk;
use crate::log::Logger;
use crate::protocol::{self, ErrorCode, Reply};
use crate::store::{self, FsyncPolicy, Offsets, SavedCursor};

/// How often a continuing streak of persistence failures is logged.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// An fsync failed: messages after `synced` may not be on disk.
#[derive(Debug)]
pub struct SyncFailure {
    pub error: io::Error,
    /// Which failure this is, so only one thread cuts back after it.
    pub generation: u64,
}

impl std::fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fsync failed: {}", self.error)
    }
}

impl std::error::Error for SyncFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

struct SyncState {
    /// The active segment (`None` while there is no segment at all).
    file: Option<Arc<File>>,
    /// Last id appended.
    written: u64,
    /// Last id known durable.
    synced: u64,
    syncing: bool,
    /// The generation of an fsync failure not yet dealt with.
    failed: Option<u64>,
    generations: u64,
}

/// Persistence failures: logged when they start, every
/// [`FAILURE_LOG_EVERY`] while they go on, and when writes succeed again.
#[derive(Debug, Default)]
struct Streak {
    current: Mutex<Option<(Instant, u64, Instant)>>,
}

/// The active segment's fsyncs, the offsets file, and the failure state.
pub struct Durability {
    policy: FsyncPolicy,
    disk: Disk,
    messages_path: PathBuf,
    sync: Mutex<SyncState>,
    done: Condvar,
    streak: Streak,
    /// Set while storing fails (housekeeping then seals a wholly consumed
    /// active segment, so that it can be deleted).
    failing: AtomicBool,
    /// SENDs are refused until the broker restarts: a cut back failed.
    fenced: AtomicBool,
    pub fsync_failures: AtomicU64,
}

impl Durability {
    /// Starts with everything up to `last_id` counted as durable; the
    /// caller fsynced it. `file` is the active segment.
    pub fn new(
        policy: FsyncPolicy,
        disk: Disk,
        messages_path: PathBuf,
        file: Option<Arc<File>>,
        last_id: u64,
    ) -> Durability {
        Durability {
            policy,
            disk,
            messages_path,
            sync: Mutex::new(SyncState {
                file,
                written: last_id,
                synced: last_id,
                syncing: false,
                failed: None,
                generations: 0,
            }),
            done: Condvar::new(),
            streak: Streak::default(),
            failing: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            fsync_failures: AtomicU64::new(0),
        }
    }

    /// Why a SEND must be refused now without writing anything, if so.
    pub fn refusing(&self) -> Option<&'static str> {
        if self.fenced.load(Ordering::Acquire) {
            return Some("a failed fsync could not be undone; restart the broker");
        }
        if self.policy != FsyncPolicy::Never && lock(&self.sync).failed.is_some() {
            return Some("the last fsync failed");
        }
        None
    }

    /// Records an append: messages up to `last_id`, in the active segment
    /// `file`. After a roll, `rolled_at` is the new segment's first id:
    /// the roll fdatasynced every record before it, so only the new
    /// segment can hold unsynced ones (and a cut back stays inside it).
    pub fn appended(&self, last_id: u64, file: Option<Arc<File>>, rolled_at: Option<u64>) {
        let mut state = lock(&self.sync);
        state.written = last_id;
        state.file = file;
        if let Some(first) = rolled_at {
            state.synced = state.synced.max(first - 1);
        }
    }

    /// Last id known durable.
    pub fn synced(&self) -> u64 {
        lock(&self.sync).synced
    }

    /// Returns once every message up to `id` is fsynced; fsyncs itself if
    /// nobody else is, or waits for the fsync under way. Under `always`,
    /// after a failure not yet dealt with, fails at once for anything not
    /// durable.
    pub fn sync_to(&self, id: u64) -> Result<(), SyncFailure> {
        let mut state = lock(&self.sync);
        loop {
            if state.synced >= id {
                return Ok(());
            }
            if let (Some(generation), FsyncPolicy::Always) = (state.failed, self.policy) {
                return Err(SyncFailure {
                    error: io::Error::other("an earlier fsync failed"),
                    generation,
                });
            }
            if !state.syncing {
                state.syncing = true;
                let target = state.written;
                let file = state.file.clone();
                drop(state);
                let result = file.map_or(Ok(()), |file| self.disk.sync_data(&file));
                state = lock(&self.sync);
                state.syncing = false;
                self.done.notify_all();
                match result {
                    Ok(()) => {
                        state.synced = state.synced.max(target);
                        state.failed = None;
                    }
                    Err(error) => return Err(self.sync_failed(&mut state, error)),
                }
                continue;
            }
            state = self
                .done
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn sync_failed(&self, state: &mut SyncState, error: io::Error) -> SyncFailure {
        self.fsync_failures.fetch_add(1, Ordering::Relaxed);
        let generation = match state.failed {
            Some(generation) => generation,
            None => {
                state.generations += 1;
                state.generations
            }
        };
        state.failed = Some(generation);
        SyncFailure { error, generation }
    }

    /// Fsyncs whatever was written since the last fsync.
    pub fn sync_now(&self) -> Result<(), SyncFailure> {
        let written = lock(&self.sync).written;
        self.sync_to(written)
    }

    /// An fsync made elsewhere failed (a roll's of the segment it sealed):
    /// the same rules as a failed group commit.
    pub fn failed_elsewhere(&self, error: io::Error) -> SyncFailure {
        let mut state = lock(&self.sync);
        self.sync_failed(&mut state, error)
    }

    /// Under `always`, after failure `generation`: the last id to keep
    /// (the last durable one), unless another thread dealt with it already.
    pub fn cut_point(&self, generation: u64) -> Option<u64> {
        let state = lock(&self.sync);
        (state.failed == Some(generation)).then_some(state.synced)
    }

    /// The cut back after failure `generation` is done (`ok`), or could
    /// not be done: then SENDs stay refused until the broker restarts.
    pub fn cut_done(&self, generation: u64, ok: bool, log: &Logger) {
        let mut state = lock(&self.sync);
        if state.failed != Some(generation) {
            return;
        }
        if ok {
            state.written = state.synced;
            state.failed = None;
            log.warn(format_args!(
                "fsync failed: messages after id {} were refused and cut from the messages \
                 log; taking messages again",
                state.synced
            ));
        } else {
            self.fenced.store(true, Ordering::Release);
            log.error(format_args!(
                "fsync failed and the unsynced messages after id {} could not be cut back: \
                 refusing every SEND until the broker is restarted (it re-reads its files)",
                state.synced
            ));
        }
    }

    /// Saves the offsets file from `snapshot`.
    pub fn save_offsets(&self, snapshot: Snapshot, capacity: u64) -> io::Result<()> {
        let offsets = Offsets {
            next_id: snapshot.next_id,
            next_consumer: snapshot.next_consumer,
            head: snapshot.head,
            capacity,
            consumers: snapshot
                .cursors
                .into_iter()
                .map(|c| SavedCursor {
                    id: c.id,
                    offset: c.offset,
                    ack: c.ack,
                })
                .collect(),
        };
        store::save_offsets(&self.disk, &self.messages_path, &offsets)
    }

    /// What no offset may cover yet: messages past the last fsync (under
    /// `never` nothing is fsynced, and recovery clamps offsets instead).
    pub fn offsets_cover(&self, synced: u64) -> u64 {
        match self.policy {
            FsyncPolicy::Never => u64::MAX,
            _ => synced,
        }
    }

    /// Whether storing messages is failing now.
    pub fn writes_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// `messages` could not be stored because of `err`.
    pub fn store_failed(&self, log: &Logger, messages: usize, err: &dyn std::fmt::Display) {
        self.failing.store(true, Ordering::Release);
        let mut streak = lock(&self.streak.current);
        let now = Instant::now();
        match &mut *streak {
            None => {
                log.error(format_args!(
                    "cannot store messages: {err}; answering {} until writes succeed",
                    protocol::reply_text(&Reply::error(ErrorCode::PersistenceFailure))
                ));
                *streak = Some((now, messages as u64, now));
            }
            Some((since, refused, last_logged)) => {
                *refused += messages as u64;
                if now.duration_since(*last_logged) >= FAILURE_LOG_EVERY {
                    *last_logged = now;
                    log.error(format_args!(
                        "still cannot store messages: {err} ({refused} refused in {} s)",
                        since.elapsed().as_secs()
                    ));
                }
            }
        }
    }

    /// A store succeeded: ends a streak of failures.
    pub fn store_succeeded(&self, log: &Logger) {
        if !self.failing.load(Ordering::Acquire) {
            return;
        }
        self.failing.store(false, Ordering::Release);
        if let Some((since, refused, _)) = lock(&self.streak.current).take() {
            log.info(format_args!(
                "storing messages works again after {} s ({refused} message(s) were refused)",
                since.elapsed().as_secs()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskOp, FaultPlan};

    fn active(durability: &Durability) -> Option<Arc<File>> {
        lock(&durability.sync).file.clone()
    }

    fn durability(policy: FsyncPolicy, plan: &Arc<FaultPlan>) -> (Durability, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "mq-durability-{}-{:?}-{}",
            std::process::id(),
            policy,
            Arc::as_ptr(plan) as usize
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("messages.dat");
        let file = Arc::new(File::create(&path).unwrap());
        let disk = Disk::with_faults(Arc::clone(plan));
        (Durability::new(policy, disk, path, Some(file), 0), dir)
    }

    #[test]
    fn under_always_a_failed_fsync_fails_everything_after_it_until_cut_back() {
        let plan = FaultPlan::new();
        let (durability, dir) = durability(FsyncPolicy::Always, &plan);
        let log = Logger::stderr_only(crate::log::Level::Error);
        durability.appended(2, active(&durability), None);
        durability.sync_to(2).unwrap();
        durability.appended(5, active(&durability), None);
        plan.fail(DiskOp::Fsync, 1, 1);
        let failure = durability.sync_to(5).unwrap_err();
        assert_eq!(durability.fsync_failures.load(Ordering::Relaxed), 1);
        // A later sender fails at once, without an fsync that would prove
        // nothing; SENDs are refused meanwhile.
        durability.appended(6, active(&durability), None);
        let calls = plan.calls(DiskOp::Fsync);
        assert_eq!(
            durability.sync_to(6).unwrap_err().generation,
            failure.generation
        );
        assert_eq!(plan.calls(DiskOp::Fsync), calls);
        assert!(durability.refusing().is_some());
        assert_eq!(durability.cut_point(failure.generation), Some(2));
        durability.cut_done(failure.generation, true, &log);
        assert_eq!(durability.cut_point(failure.generation), None);
        assert!(durability.refusing().is_none());
        // A cut back that fails fences the broker until a restart.
        durability.appended(3, active(&durability), None);
        plan.fail(DiskOp::Fsync, 1, 1);
        let failure = durability.sync_to(3).unwrap_err();
        durability.cut_done(failure.generation, false, &log);
        assert!(durability.refusing().unwrap().contains("restart"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn under_interval_sends_wait_for_an_fsync_that_works_again() {
        let plan = FaultPlan::new();
        let (durability, dir) = durability(FsyncPolicy::Interval, &plan);
        durability.appended(4, active(&durability), None);
        plan.fail(DiskOp::Fsync, 1, 2);
        assert!(durability.sync_now().is_err());
        assert!(durability.refusing().is_some());
        assert!(
            durability.sync_now().is_err(),
            "retried: a real fsync each time"
        );
        durability.sync_now().unwrap();
        assert!(durability.refusing().is_none());
        assert_eq!(durability.synced(), 4);
        assert_eq!(durability.fsync_failures.load(Ordering::Relaxed), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
