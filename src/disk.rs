//! The data path's disk calls — write, fsync, rename, truncate — behind one
//! seam, so that tests can make the Nth of any of them fail and check that
//! the broker's replies stay the truth about what is on disk (beanstalkd's
//! `falloc` is the model).
//!
//! A [`Disk`] without a [`FaultPlan`] is a plain call of std's function; a
//! plan is armed by tests only (nothing on the command line arms one). The
//! seam covers the calls that decide what a client is told: appends to the
//! segments and their fsync, rolls, cut backs, deletion of consumed
//! segments and the offsets file's replacement. Reads are not covered: recovery's failures stop
//! the start and are tested with real files.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The calls a plan can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    Write,
    Fsync,
    Rename,
    Truncate,
    /// Unlinking a file (segments: deleting a consumed one).
    Remove,
}

impl DiskOp {
    const ALL: [DiskOp; 5] = [
        DiskOp::Write,
        DiskOp::Fsync,
        DiskOp::Rename,
        DiskOp::Truncate,
        DiskOp::Remove,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskOp::Write => "write",
            DiskOp::Fsync => "fsync",
            DiskOp::Rename => "rename",
            DiskOp::Truncate => "truncate",
            DiskOp::Remove => "remove",
        }
    }
}

/// Which calls fail: per operation, a countdown to the first failing call
/// and how many fail from there (`u64::MAX`: every one after it).
#[derive(Debug, Default)]
pub struct FaultPlan {
    countdown: [AtomicU64; 5],
    failures: [AtomicU64; 5],
    /// Calls made per operation, failed or not (for tests to count).
    calls: [AtomicU64; 5],
}

impl FaultPlan {
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    /// The `nth` call of `op` from now on (1 = the next one) fails, and
    /// `count` calls from there (`u64::MAX` for all).
    pub fn fail(&self, op: DiskOp, nth: u64, count: u64) {
        let i = op.index();
        self.failures[i].store(count, Ordering::SeqCst);
        self.countdown[i].store(nth, Ordering::SeqCst);
    }

    /// Disarms every operation.
    pub fn clear(&self) {
        for op in DiskOp::ALL {
            self.countdown[op.index()].store(0, Ordering::SeqCst);
        }
    }

    /// Calls of `op` made so far.
    pub fn calls(&self, op: DiskOp) -> u64 {
        self.calls[op.index()].load(Ordering::SeqCst)
    }

    fn should_fail(&self, op: DiskOp) -> bool {
        let i = op.index();
        self.calls[i].fetch_add(1, Ordering::SeqCst);
        let countdown = self.countdown[i].load(Ordering::SeqCst);
        if countdown == 0 {
            return false;
        }
        if countdown > 1 {
            self.countdown[i].store(countdown - 1, Ordering::SeqCst);
            return false;
        }
        let left = self.failures[i].load(Ordering::SeqCst);
        if left != u64::MAX {
            self.failures[i].store(left.saturating_sub(1), Ordering::SeqCst);
            if left <= 1 {
                self.countdown[i].store(0, Ordering::SeqCst);
            }
        }
        left > 0
    }
}

/// The data path's disk: std's calls, or a test's plan in front of them.
#[derive(Debug, Clone, Default)]
pub struct Disk {
    faults: Option<Arc<FaultPlan>>,
}

impl Disk {
    /// The real disk, no faults.
    pub fn real() -> Disk {
        Disk { faults: None }
    }

    /// A disk whose calls fail as `plan` says.
    pub fn with_faults(plan: Arc<FaultPlan>) -> Disk {
        Disk { faults: Some(plan) }
    }

    fn check(&self, op: DiskOp) -> io::Result<()> {
        match &self.faults {
            Some(plan) if plan.should_fail(op) => Err(io::Error::other(format!(
                "{} failed: injected fault (EIO)",
                op.name()
            ))),
            _ => Ok(()),
        }
    }

    /// `write_all` of `bytes`.
    pub fn write_all(&self, mut file: &File, bytes: &[u8]) -> io::Result<()> {
        self.check(DiskOp::Write)?;
        file.write_all(bytes)
    }

    /// fdatasync: the data, and the metadata needed to read it back.
    pub fn sync_data(&self, file: &File) -> io::Result<()> {
        self.check(DiskOp::Fsync)?;
        file.sync_data()
    }

    /// fsync: data and every metadata (a new file, a directory).
    pub fn sync_all(&self, file: &File) -> io::Result<()> {
        self.check(DiskOp::Fsync)?;
        file.sync_all()
    }

    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(DiskOp::Rename)?;
        std::fs::rename(from, to)
    }

    /// ftruncate to `len` bytes.
    pub fn truncate(&self, file: &File, len: u64) -> io::Result<()> {
        self.check(DiskOp::Truncate)?;
        file.set_len(len)
    }

    /// Unlinks `path`.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        self.check(DiskOp::Remove)?;
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_fails_the_nth_call_and_as_many_as_asked() {
        let plan = FaultPlan::new();
        plan.fail(DiskOp::Fsync, 2, 2);
        let outcomes: Vec<bool> = (0..5).map(|_| plan.should_fail(DiskOp::Fsync)).collect();
        assert_eq!(outcomes, [false, true, true, false, false]);
        assert!(
            !plan.should_fail(DiskOp::Write),
            "other calls are not armed"
        );
        plan.fail(DiskOp::Rename, 1, u64::MAX);
        assert!((0..100).all(|_| plan.should_fail(DiskOp::Rename)));
        plan.clear();
        assert!(!plan.should_fail(DiskOp::Rename));
        assert_eq!(plan.calls(DiskOp::Fsync), 5);
    }
}
