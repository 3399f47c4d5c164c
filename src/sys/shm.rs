//! A SysV shared memory segment as a safe RAII value, and the only way to
//! read or write it: a [`Region`]'s lock guard.
//!
//! Within this process the segment is never raced on. A segment is mapped
//! at most once per process (a small registry of attached ids refuses a
//! second mapping, which would alias the first), it offers no accessor of
//! its own, and a [`Region`] copies bytes in and out only through a
//! [`RegionGuard`], which holds a process-local mutex and the set's SysV
//! MUTEX. No `&[u8]` or `&T` is ever formed over the mapping.
//!
//! What another process can do: the segment is mode 0600, so only
//! processes of the broker's own user (or root) can attach it, but any of
//! them can, at any moment: write any byte (header, slot ids, lengths,
//! contents), take or change the semaphores (hold the MUTEX, raise EMPTY,
//! lower FULL), or remove both objects. No lock we take binds them. What
//! the broker does about it: everything read from the segment is input,
//! copied out before it is looked at and checked like bytes from a socket
//! (the queue keeps its own authoritative head, next, ids and lengths in
//! process memory and a checksum of each content, and serves a message
//! from the messages file when its slot does not match); the MUTEX is
//! taken with a timeout, so a process that holds it stalls the queue with
//! errors in the log, never a worker forever; nothing read from the
//! segment is ever written to disk. A copy that races with a foreign
//! writer yields some bytes, possibly torn; every byte pattern is a valid
//! `u8`, and the checks decide what they are worth.

use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sem::{MAX_OPS, Op, SemaphoreSet};
use super::{annotate, cvt};

/// What [`inspect`] found under a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// No segment has this key.
    None,
    /// A segment of `size` bytes exists and no process is attached.
    Orphan {
        id: i32,
        size: u64,
        creator_pid: i32,
    },
    /// A segment exists and `attached` processes use it.
    InUse {
        id: i32,
        size: u64,
        attached: u64,
        creator_pid: i32,
    },
}

/// Looks up the segment with `key` without creating or attaching it.
pub fn inspect(key: i32) -> io::Result<Existing> {
    // SAFETY: shmget with size 0 and no flags only looks a key up; it takes
    // no pointers.
    let id = unsafe { libc::shmget(key, 0, 0) };
    if id == -1 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(Existing::None),
            _ => Err(annotate(
                err,
                format!("shmget(key=0x{key:x}, size=0, flags=0)"),
            )),
        };
    }
    // SAFETY: shmid_ds is plain old data; all-zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: `ds` is a valid, writable shmid_ds for IPC_STAT to fill.
    cvt(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) }, || {
        format!("shmctl(id={id}, IPC_STAT)")
    })?;
    let (size, creator_pid) = (ds.shm_segsz as u64, ds.shm_cpid);
    if ds.shm_nattch == 0 {
        Ok(Existing::Orphan {
            id,
            size,
            creator_pid,
        })
    } else {
        Ok(Existing::InUse {
            id,
            size,
            attached: ds.shm_nattch as u64,
            creator_pid,
        })
    }
}

/// Removes the segment `id` (`IPC_RMID`). Attached processes keep their
/// mapping until they detach; the key is free at once.
pub fn remove(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer; a null pointer is what it expects.
    cvt(
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) },
        || format!("shmctl(id={id}, IPC_RMID)"),
    )
    .map(drop)
}

/// Ids of the segments this process has mapped. The one piece of global
/// state in the crate besides signal handling: it is what makes "one
/// mapping per segment per process" true, so that a [`RegionGuard`]'s
/// exclusion covers every mapping of its segment in this process.
static ATTACHED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn attached() -> MutexGuard<'static, Vec<i32>> {
    ATTACHED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Maps segment `id` (read-only with `read_only`) unless this process has
/// it mapped already. Returns the address.
fn attach_once(id: i32, read_only: bool) -> io::Result<*mut u8> {
    let mut ids = attached();
    if ids.contains(&id) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("shared memory segment {id} is already mapped by this process"),
        ));
    }
    let flags = if read_only { libc::SHM_RDONLY } else { 0 };
    // SAFETY: a null address lets the kernel choose where to map.
    let ptr = unsafe { libc::shmat(id, std::ptr::null(), flags) };
    // shmat reports failure as (void*)-1, not NULL.
    if ptr as isize == -1 {
        return Err(annotate(
            io::Error::last_os_error(),
            format!("shmat(id={id})"),
        ));
    }
    ids.push(id);
    Ok(ptr.cast::<u8>())
}

/// Unmaps what [`attach_once`] mapped.
fn detach(id: i32, ptr: *mut u8) {
    // SAFETY: `ptr` came from a successful shmat and is detached only
    // here, once. An error (impossible for a valid address) is ignored
    // because this runs in Drop, which must not panic.
    unsafe {
        libc::shmdt(ptr.cast::<libc::c_void>());
    }
    attached().retain(|&attached_id| attached_id != id);
}

/// The segment's size as the kernel has it.
fn size_of(id: i32) -> io::Result<usize> {
    // SAFETY: shmid_ds is plain old data; all-zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: `ds` is a valid, writable shmid_ds for IPC_STAT to fill.
    cvt(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) }, || {
        format!("shmctl(id={id}, IPC_STAT)")
    })?;
    Ok(ds.shm_segsz as usize)
}

/// Copies the first `len` bytes (at most the segment's size) of segment
/// `id`, mapped read-only for the copy: how startup tells whether an
/// orphan under our key is a broker's queue. The bytes are untrusted.
pub fn peek(id: i32, len: usize) -> io::Result<Vec<u8>> {
    let len = len.min(size_of(id)?);
    let ptr = attach_once(id, true)?;
    let mut out = vec![0u8; len];
    // SAFETY: the mapping is at least `len` bytes (checked against the
    // kernel's size), `out` is a separate buffer of `len` bytes, and no
    // thread of this process writes the segment (it is mapped only here).
    unsafe { std::ptr::copy_nonoverlapping(ptr, out.as_mut_ptr(), len) };
    detach(id, ptr);
    Ok(out)
}

/// An attached segment. It offers no way to read or write its memory:
/// that takes a [`Region`].
#[derive(Debug)]
pub struct Segment {
    id: i32,
    key: i32,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process-wide and `Segment` itself never touches
// it; every copy in or out goes through a `RegionGuard`, which excludes
// the other threads.
unsafe impl Send for Segment {}
// SAFETY: see `Send` above; `&Segment` gives no access to the memory.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates a new segment of `len` bytes with mode 0600 and attaches it.
    /// Fails with `AlreadyExists` if the key is taken: the caller decides
    /// what an existing segment means (see [`inspect`]).
    pub fn create(key: i32, len: usize) -> io::Result<Segment> {
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;
        // SAFETY: shmget takes plain integers.
        let id = cvt(unsafe { libc::shmget(key, len, flags) }, || {
            format!("shmget(key=0x{key:x}, size={len}, IPC_CREAT|IPC_EXCL|0600)")
        })?;
        match attach_once(id, false) {
            Ok(ptr) => Ok(Segment { id, key, ptr, len }),
            Err(err) => {
                let _ = remove(id);
                Err(err)
            }
        }
    }

    /// Attaches the existing segment with `key`, read and write, as any
    /// process of the same user can (tests use it to play one).
    pub fn attach(key: i32) -> io::Result<Segment> {
        // SAFETY: shmget with size 0 and no flags only looks a key up.
        let id = cvt(unsafe { libc::shmget(key, 0, 0) }, || {
            format!("shmget(key=0x{key:x}, size=0, flags=0)")
        })?;
        let len = size_of(id)?;
        let ptr = attach_once(id, false)?;
        Ok(Segment { id, key, ptr, len })
    }

    /// The kernel's id of the segment.
    pub fn id(&self) -> i32 {
        self.id
    }

    /// The key the segment was created with.
    pub fn key(&self) -> i32 {
        self.key
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment has zero bytes (never true for ours).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Asks the kernel to back `offset..offset + len` with memory now
    /// (`MADV_POPULATE_WRITE`, Linux 5.14 and later), instead of a page
    /// fault per page on first touch. Contents do not change. Returns
    /// `Ok(false)` where the kernel does not offer it.
    pub fn populate(&self, offset: usize, len: usize) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.len);
        let page = super::os::page_size();
        let start = offset / page * page;
        if start >= end {
            return Ok(true);
        }
        // SAFETY: `start..end` lies inside the live mapping (`start` is
        // rounded down to a page boundary, still inside it). POPULATE_WRITE
        // only faults pages in; it never changes their contents.
        let ret = unsafe {
            libc::madvise(
                self.ptr.add(start).cast(),
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if ret == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) => Ok(false),
            _ => Err(annotate(
                err,
                format!("madvise(id={}, MADV_POPULATE_WRITE)", self.id),
            )),
        }
    }

    /// Marks the segment for removal. It disappears from `ipcs` at once and
    /// its memory is freed when the last process detaches.
    pub fn remove(&self) -> io::Result<()> {
        remove(self.id)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        detach(self.id, self.ptr);
    }
}

/// Why [`Region::lock`] gave no guard.
#[derive(Debug)]
pub enum LockError {
    /// A `NOWAIT` operation given with the lock could not be made now.
    WouldBlock,
    /// The MUTEX stayed taken past the timeout: another process holds it
    /// or changed its value.
    TimedOut,
    /// The semaphore call failed (the set was removed, ...).
    Io(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::WouldBlock => f.write_str("the semaphore operation would block"),
            LockError::TimedOut => f.write_str(
                "the segment's MUTEX stayed taken: another process holds it or changed its value",
            ),
            LockError::Io(err) => write!(f, "semaphore operation failed: {err}"),
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Io(err) => Some(err),
            _ => None,
        }
    }
}

/// A segment, the semaphore set whose semaphore `mutex` guards it, and
/// process-local data `T` that goes with the segment's contents: the only
/// way to touch the segment's memory.
#[derive(Debug)]
pub struct Region<T> {
    segment: Segment,
    sems: SemaphoreSet,
    mutex: u16,
    local: Mutex<T>,
}

impl<T> Region<T> {
    /// Joins a segment and its set. `Segment` values are unique per
    /// mapping and a segment is mapped once per process, so this region is
    /// the only way into that memory here.
    pub fn new(segment: Segment, sems: SemaphoreSet, mutex: u16, local: T) -> Region<T> {
        Region {
            segment,
            sems,
            mutex,
            local: Mutex::new(local),
        }
    }

    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    pub fn sems(&self) -> &SemaphoreSet {
        &self.sems
    }

    /// Takes the local mutex, then applies `with` together with taking the
    /// SysV MUTEX (`SEM_UNDO`) in one atomic semop, waiting at most
    /// `timeout` for the MUTEX.
    pub fn lock(&self, with: &[Op], timeout: Duration) -> Result<RegionGuard<'_, T>, LockError> {
        if with.len() >= MAX_OPS {
            return Err(LockError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many operations with the lock",
            )));
        }
        let local = self
            .local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut ops = [self.take(); MAX_OPS];
        ops[..with.len()].copy_from_slice(with);
        ops[with.len()] = self.take();
        let has_nowait = with.iter().any(|op| op.flags & super::sem::NOWAIT != 0);
        let started = Instant::now();
        match self.sems.apply(&ops[..=with.len()], Some(timeout)) {
            Ok(true) => Ok(RegionGuard {
                region: self,
                local,
                released: false,
            }),
            // EAGAIN says either: a NOWAIT operation could not be made (at
            // once, or when a change woke the wait for the MUTEX), or the
            // MUTEX stayed taken for the whole timeout. The time it took
            // tells which, so that a MUTEX held by another process is never
            // blamed on the counters.
            Ok(false) if has_nowait && started.elapsed() < timeout => Err(LockError::WouldBlock),
            Ok(false) => Err(LockError::TimedOut),
            Err(err) => Err(LockError::Io(err)),
        }
    }

    fn take(&self) -> Op {
        Op {
            index: self.mutex,
            delta: -1,
            flags: super::sem::UNDO,
        }
    }
}

/// Holds the region's local mutex and its SysV MUTEX. Copies in and out
/// are bounds-checked and never panic: a range outside the segment is
/// refused with `false` / `None`.
pub struct RegionGuard<'a, T> {
    region: &'a Region<T>,
    local: MutexGuard<'a, T>,
    released: bool,
}

impl<T> RegionGuard<'_, T> {
    /// The process-local data.
    pub fn local(&mut self) -> &mut T {
        &mut self.local
    }

    /// The process-local data, shared.
    pub fn local_ref(&self) -> &T {
        &self.local
    }

    fn range(&self, offset: usize, len: usize) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        let segment = &self.region.segment;
        // SAFETY: `offset <= end <= len` of the live mapping, so the
        // pointer stays inside it (one past the end at most).
        (end <= segment.len).then(|| unsafe { segment.ptr.add(offset) })
    }

    /// Copies `out.len()` bytes from `offset` into `out`; `false` (nothing
    /// copied) if the range is outside the segment.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        let Some(from) = self.range(offset, out.len()) else {
            return false;
        };
        // SAFETY: the range lies inside the mapping; `out` is a distinct
        // buffer of that length; this guard excludes every other thread
        // of this process (foreign writers only make the bytes untrusted).
        unsafe { std::ptr::copy_nonoverlapping(from, out.as_mut_ptr(), out.len()) };
        true
    }

    /// Copies `data` to `offset`; `false` (nothing written) if the range
    /// is outside the segment.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        let Some(to) = self.range(offset, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`; `data` is a separate buffer, it cannot
        // overlap the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), to, data.len()) };
        true
    }

    /// Reads a little-endian `u64` at `offset`.
    pub fn read_u64(&self, offset: usize) -> Option<u64> {
        let mut bytes = [0u8; 8];
        self.read(offset, &mut bytes)
            .then(|| u64::from_le_bytes(bytes))
    }

    /// Writes a little-endian `u64` at `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) -> bool {
        self.write(offset, &value.to_le_bytes())
    }

    /// Releases the MUTEX together with `counts` in one atomic semop.
    /// `Ok(false)` if a `NOWAIT` count could not be made: then nothing
    /// was done and the guard still holds the MUTEX.
    pub fn unlock_with(&mut self, counts: &[Op]) -> io::Result<bool> {
        if counts.len() >= MAX_OPS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many operations with the unlock",
            ));
        }
        let release = Op {
            delta: 1,
            ..self.region.take()
        };
        let mut ops = [release; MAX_OPS];
        ops[1..=counts.len()].copy_from_slice(counts);
        let done = self.region.sems.apply(&ops[..=counts.len()], None)?;
        self.released |= done;
        Ok(done)
    }
}

impl<T> Drop for RegionGuard<'_, T> {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.unlock_with(&[]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_mapped_once_per_process_and_read_only_through_a_guard() {
        let key = 0x5300_0000 + (std::process::id() as i32 & 0xffff) * 4;
        let segment = Segment::create(key, 100).unwrap();
        let id = segment.id();
        // Both objects are removed even when an assertion fails.
        struct Remove(i32, Option<i32>);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = remove(self.0);
                if let Some(set) = self.1 {
                    let _ = super::super::sem::remove(set);
                }
            }
        }
        let mut cleanup = Remove(id, None);
        // A second mapping would alias the first outside its guard.
        let again = Segment::attach(key).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists, "{again}");
        assert_eq!(
            peek(id, 8).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        let sems = SemaphoreSet::create(key, &[1]).unwrap();
        cleanup.1 = Some(sems.id());
        let region = Region::new(segment, sems, 0, 7u32);
        {
            let mut guard = region.lock(&[], Duration::from_secs(5)).unwrap();
            assert!(guard.write_u64(92, 42));
            assert_eq!(guard.read_u64(92), Some(42));
            // Out of bounds, or overflowing: refused, never a panic.
            assert!(!guard.write_u64(93, 1));
            assert_eq!(guard.read_u64(usize::MAX - 3), None);
            assert!(!guard.read(usize::MAX, &mut [0u8; 2]));
            *guard.local() += 1;
        }
        // The guard released the MUTEX: it can be taken again at once.
        let guard = region.lock(&[], Duration::from_millis(100)).unwrap();
        assert_eq!(*guard.local_ref(), 8);
        drop(guard);
        drop(region);
        // Unmapped now: it may be looked at again (a new segment is zeros).
        assert_eq!(peek(id, 8).unwrap(), vec![0u8; 8]);
    }

    #[test]
    fn a_held_mutex_is_a_timeout_and_a_short_count_is_would_block() {
        use super::super::sem::{NOWAIT, Op};
        let key = 0x5310_0000 + (std::process::id() as i32 & 0xffff) * 4;
        let segment = Segment::create(key, 64).unwrap();
        let _segment_gone = Removed::segment(segment.id());
        // MUTEX (index 0) free, a counter (index 1) at 0.
        let sems = SemaphoreSet::create(key, &[1, 0]).unwrap();
        let _sems_gone = Removed::set(sems.id());
        let region = Region::new(segment, sems, 0, ());
        let counter = |delta, flags| Op {
            index: 1,
            delta,
            flags,
        };
        let short = region.lock(&[counter(-1, NOWAIT)], Duration::from_secs(5));
        assert!(
            matches!(short, Err(LockError::WouldBlock)),
            "{:?}",
            short.err()
        );
        // The MUTEX taken as another process would (no SEM_UNDO here: the
        // test gives it back itself).
        let hold = Op {
            index: 0,
            delta: -1,
            flags: 0,
        };
        assert!(region.sems().apply(&[hold], None).unwrap());
        let held = region.lock(&[counter(1, NOWAIT)], Duration::from_millis(200));
        assert!(matches!(held, Err(LockError::TimedOut)), "{:?}", held.err());
        let release = Op { delta: 1, ..hold };
        assert!(region.sems().apply(&[release], None).unwrap());
        let guard = region.lock(&[counter(1, NOWAIT)], Duration::from_secs(5));
        assert!(guard.is_ok(), "free again");
    }

    /// Removes a segment or a set when dropped, even when a test fails.
    enum Removed {
        Segment(i32),
        Set(i32),
    }

    impl Removed {
        fn segment(id: i32) -> Removed {
            Removed::Segment(id)
        }
        fn set(id: i32) -> Removed {
            Removed::Set(id)
        }
    }

    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = match *self {
                Removed::Segment(id) => remove(id),
                Removed::Set(id) => super::super::sem::remove(id),
            };
        }
    }
}
