//! A SysV semaphore set as a safe value.
//!
//! The set is identified by its kernel id; `Drop` does nothing because a
//! semaphore set is not attached the way a segment is. Operations retry on
//! `EINTR` (through [`cvt_r`]) and report a timeout (or `IPC_NOWAIT`
//! refusal) as `Ok(false)`, never as an error. Another process of the same
//! user may operate on the set too; nothing here trusts a value read from
//! it beyond what the caller checks.

use std::io;
use std::time::{Duration, Instant};

use super::{annotate, cvt, cvt_r};

/// The `struct timespec` of the unversioned `semtimedop` symbol: two C
/// `long`s on every Linux libc. On 32-bit targets whose libc offers a
/// 64-bit `time_t`, `libc::timespec` may be the 64-bit layout while the
/// plain symbol keeps the old one (the new ABI has another symbol name),
/// so pairing the two would pass a timeout the kernel misreads. Declaring
/// the struct beside the symbol keeps them matched on every target; our
/// timeouts are short slices, far inside a 32-bit `long` of seconds.
#[repr(C)]
struct LegacyTimespec {
    tv_sec: libc::c_long,
    tv_nsec: libc::c_long,
}

unsafe extern "C" {
    // glibc and musl provide semtimedop; the libc crate does not declare it.
    fn semtimedop(
        semid: libc::c_int,
        sops: *mut libc::sembuf,
        nsops: libc::size_t,
        timeout: *const LegacyTimespec,
    ) -> libc::c_int;
}

fn legacy_timespec(timeout: Duration) -> LegacyTimespec {
    LegacyTimespec {
        tv_sec: libc::c_long::try_from(timeout.as_secs()).unwrap_or(libc::c_long::MAX),
        // Below 10^9: fits a 32-bit long.
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    }
}

/// `sem_flg` bit: the kernel undoes this operation if the process dies.
pub const UNDO: i16 = libc::SEM_UNDO as i16;
/// `sem_flg` bit: fail at once instead of waiting.
pub const NOWAIT: i16 = libc::IPC_NOWAIT as i16;

/// What [`inspect`] found under a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// No set has this key.
    None,
    /// A set of `nsems` semaphores exists and the last process to operate
    /// on it is gone (or none ever did).
    Orphan { id: i32, nsems: u64 },
    /// A set exists and the last process to operate on it, `pid`, lives.
    InUse { id: i32, pid: i32, nsems: u64 },
}

/// Looks up the set with `key`. A set has no attach count, so liveness is
/// judged by the pid of the last process that operated on semaphore 0 (the
/// mutex, which a running broker takes constantly and takes once right
/// after creating the set).
pub fn inspect(key: i32) -> io::Result<Existing> {
    // SAFETY: semget with nsems 0 and no flags only looks a key up.
    let id = unsafe { libc::semget(key, 0, 0) };
    if id == -1 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(Existing::None),
            _ => Err(annotate(
                err,
                format!("semget(key=0x{key:x}, nsems=0, flags=0)"),
            )),
        };
    }
    let nsems = count(id)?;
    // SAFETY: GETPID takes no fourth argument.
    let pid = cvt(unsafe { libc::semctl(id, 0, libc::GETPID) }, || {
        format!("semctl(id={id}, 0, GETPID)")
    })?;
    if pid > 0 && super::os::process_alive(pid) {
        Ok(Existing::InUse { id, pid, nsems })
    } else {
        Ok(Existing::Orphan { id, nsems })
    }
}

/// How many semaphores the set `id` has (`IPC_STAT`).
fn count(id: i32) -> io::Result<u64> {
    // SAFETY: semid_ds is plain data; all zeros is a valid value.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    let buf: *mut libc::semid_ds = &mut ds;
    // SAFETY: IPC_STAT writes one semid_ds through the `buf` member of
    // union semun, passed as the fourth argument; `ds` outlives the call.
    cvt(unsafe { libc::semctl(id, 0, libc::IPC_STAT, buf) }, || {
        format!("semctl(id={id}, IPC_STAT)")
    })?;
    Ok(ds.sem_nsems as u64)
}

/// Removes the set `id` (`IPC_RMID`); processes waiting on it get `EIDRM`.
pub fn remove(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no fourth argument.
    cvt(unsafe { libc::semctl(id, 0, libc::IPC_RMID) }, || {
        format!("semctl(id={id}, IPC_RMID)")
    })
    .map(drop)
}

/// One operation on one semaphore of the set: add `delta` to semaphore
/// `index`, with `flags` ([`UNDO`], [`NOWAIT`]).
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub index: u16,
    pub delta: i16,
    pub flags: i16,
}

/// Most operations one [`SemaphoreSet::apply`] takes.
pub const MAX_OPS: usize = 4;

/// A semaphore set: created by us, or opened by key (a test playing
/// another process).
#[derive(Debug)]
pub struct SemaphoreSet {
    id: i32,
    key: i32,
    count: usize,
}

impl SemaphoreSet {
    /// Creates a set with one semaphore per entry of `initial`, mode 0600,
    /// set to those values. Fails with `AlreadyExists` if the key is taken.
    pub fn create(key: i32, initial: &[u16]) -> io::Result<SemaphoreSet> {
        let count = initial.len();
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;
        // SAFETY: semget takes plain integers.
        let id = cvt(
            unsafe { libc::semget(key, count as libc::c_int, flags) },
            || format!("semget(key=0x{key:x}, nsems={count}, IPC_CREAT|IPC_EXCL|0600)"),
        )?;
        let set = SemaphoreSet { id, key, count };
        let mut values: Vec<libc::c_ushort> = initial.to_vec();
        let array = values.as_mut_ptr();
        // SAFETY: SETALL reads `count` unsigned shorts through `array`, the
        // `array` member of the C union semun; `values` holds exactly
        // `count` of them and outlives the call.
        let ret = unsafe { libc::semctl(id, 0, libc::SETALL, array) };
        let set_all = cvt(ret, || format!("semctl(id={id}, SETALL, {initial:?})"));
        if let Err(err) = set_all {
            let _ = remove(id);
            return Err(err);
        }
        Ok(set)
    }

    /// Opens the existing set with `key`, as another process of the same
    /// user could.
    pub fn open(key: i32) -> io::Result<SemaphoreSet> {
        // SAFETY: semget with nsems 0 and no flags only looks a key up.
        let id = cvt(unsafe { libc::semget(key, 0, 0) }, || {
            format!("semget(key=0x{key:x}, nsems=0, flags=0)")
        })?;
        let count = usize::try_from(count(id)?).unwrap_or(0);
        Ok(SemaphoreSet { id, key, count })
    }

    /// The kernel's id of the set.
    pub fn id(&self) -> i32 {
        self.id
    }

    /// The key the set was created with.
    pub fn key(&self) -> i32 {
        self.key
    }

    /// Applies `ops` atomically: all of them or none. With a `timeout`,
    /// waits at most that long and returns `Ok(false)` when it passes;
    /// an op with [`NOWAIT`] that would block also returns `Ok(false)`.
    /// More than [`MAX_OPS`] operations, or an index outside the set, is
    /// refused with `InvalidInput`.
    pub fn apply(&self, ops: &[Op], timeout: Option<Duration>) -> io::Result<bool> {
        let empty = libc::sembuf {
            sem_num: 0,
            sem_op: 0,
            sem_flg: 0,
        };
        let mut bufs = [empty; MAX_OPS];
        if ops.len() > MAX_OPS || ops.iter().any(|op| usize::from(op.index) >= self.count) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("semop(id={}, {ops:?}): bad operations", self.id),
            ));
        }
        for (buf, op) in bufs.iter_mut().zip(ops) {
            *buf = libc::sembuf {
                sem_num: op.index,
                sem_op: op.delta,
                sem_flg: op.flags,
            };
        }
        let id = self.id;
        let deadline = timeout.map(|t| Instant::now() + t);
        let sops = bufs.as_mut_ptr();
        let result = cvt_r(|| match deadline {
            // SAFETY: `bufs` holds `ops.len()` initialised sembufs.
            None => unsafe { libc::semop(id, sops, ops.len()) },
            Some(deadline) => {
                // Recomputed on every retry after EINTR: the deadline holds.
                let ts = legacy_timespec(deadline.saturating_duration_since(Instant::now()));
                // SAFETY: `bufs` holds `ops.len()` initialised sembufs and
                // `ts` is the timespec this symbol takes, alive for the call.
                unsafe { semtimedop(id, sops, ops.len(), &ts) }
            }
        });
        match result {
            Ok(_) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => Ok(false),
            Err(err) => Err(annotate(err, format!("semop(id={id}, {ops:?})"))),
        }
    }

    /// The current value of semaphore `index`.
    pub fn value(&self, index: u16) -> io::Result<u32> {
        // SAFETY: GETVAL takes no fourth argument.
        let v = cvt(
            unsafe { libc::semctl(self.id, index as libc::c_int, libc::GETVAL) },
            || format!("semctl(id={}, {index}, GETVAL)", self.id),
        )?;
        Ok(v as u32)
    }

    /// Removes the set from the system (`IPC_RMID`).
    pub fn remove(&self) -> io::Result<()> {
        remove(self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_is_false_and_bad_ops_are_refused() {
        let key = 0x5200_0000 + (std::process::id() as i32 & 0xffff) * 4;
        let set = SemaphoreSet::create(key, &[0, 1]).unwrap();
        // Removed even when an assertion fails.
        struct Remove(i32);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = remove(self.0);
            }
        }
        let _remove = Remove(set.id());
        let take = Op {
            index: 0,
            delta: -1,
            flags: 0,
        };
        assert!(!set.apply(&[take], Some(Duration::from_millis(20))).unwrap());
        let bad = Op { index: 2, ..take };
        assert!(set.apply(&[bad], None).is_err());
        assert!(set.apply(&[take; MAX_OPS + 1], None).is_err());
        // SETALL may count as an operation by this (live) process.
        let found = inspect(key).unwrap();
        assert!(
            matches!(found, Existing::Orphan { id, nsems: 2 } | Existing::InUse { id, nsems: 2, .. } if id == set.id()),
            "{found:?}"
        );
        assert_eq!(SemaphoreSet::open(key).unwrap().id(), set.id());
    }
}
