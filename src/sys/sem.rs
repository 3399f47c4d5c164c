//! A SysV semaphore set as a safe value.
//!
//! The set is identified by its kernel id; `Drop` does nothing because a
//! semaphore set is not attached the way a segment is. Operations retry on
//! `EINTR` and report a timeout (or `IPC_NOWAIT` refusal) as `Ok(false)`,
//! never as an error.

use std::io;
use std::time::{Duration, Instant};

use super::{annotate, cvt};

unsafe extern "C" {
    // glibc and musl provide semtimedop; the libc crate does not declare it.
    fn semtimedop(
        semid: libc::c_int,
        sops: *mut libc::sembuf,
        nsops: libc::size_t,
        timeout: *const libc::timespec,
    ) -> libc::c_int;
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
    /// A set exists and the last process to operate on it is gone.
    Orphan { id: i32 },
    /// A set exists and the last process to operate on it, `pid`, lives.
    InUse { id: i32, pid: i32 },
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
    // SAFETY: GETPID takes no fourth argument.
    let pid = cvt(unsafe { libc::semctl(id, 0, libc::GETPID) }, || {
        format!("semctl(id={id}, 0, GETPID)")
    })?;
    if pid > 0 && super::os::process_alive(pid) {
        Ok(Existing::InUse { id, pid })
    } else {
        Ok(Existing::Orphan { id })
    }
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

/// A created semaphore set.
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
    pub fn apply(&self, ops: &[Op], timeout: Option<Duration>) -> io::Result<bool> {
        debug_assert!(ops.iter().all(|op| (op.index as usize) < self.count));
        let mut bufs = [libc::sembuf {
            sem_num: 0,
            sem_op: 0,
            sem_flg: 0,
        }; 4];
        assert!(
            ops.len() <= bufs.len(),
            "at most 4 semaphore operations at once"
        );
        for (buf, op) in bufs.iter_mut().zip(ops) {
            *buf = libc::sembuf {
                sem_num: op.index,
                sem_op: op.delta,
                sem_flg: op.flags,
            };
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ret = match deadline {
                None => {
                    // SAFETY: `bufs` holds `ops.len()` initialised sembufs.
                    unsafe { libc::semop(self.id, bufs.as_mut_ptr(), ops.len()) }
                }
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ts = libc::timespec {
                        tv_sec: left.as_secs() as libc::time_t,
                        tv_nsec: left.subsec_nanos() as libc::c_long,
                    };
                    // SAFETY: `bufs` holds `ops.len()` initialised sembufs and
                    // `ts` is a valid timespec that outlives the call.
                    unsafe { semtimedop(self.id, bufs.as_mut_ptr(), ops.len(), &ts) }
                }
            };
            if ret == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(false),
                _ => {
                    return Err(annotate(err, format!("semop(id={}, {:?})", self.id, &ops)));
                }
            }
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

/// Opens the existing set with `key` without creating it, for looking at
/// a live broker's semaphores (`broker --inspect`); `Ok(None)` if no set
/// has that key. Removing it is the caller's business (never done by
/// `--inspect`).
pub fn open_existing(key: i32) -> io::Result<Option<SemaphoreSet>> {
    let id = match inspect(key)? {
        Existing::None => return Ok(None),
        Existing::Orphan { id } | Existing::InUse { id, .. } => id,
    };
    // SAFETY: semid_ds is plain old data; all-zero is a valid value.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one semid_ds through the `buf` member of the
    // C union semun, passed here as a pointer to `ds`, which outlives it.
    let ret = unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) };
    cvt(ret, || format!("semctl(id={id}, 0, IPC_STAT)"))?;
    Ok(Some(SemaphoreSet {
        id,
        key,
        count: ds.sem_nsems as usize,
    }))
}

impl SemaphoreSet {
    /// How many semaphores the set has.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
