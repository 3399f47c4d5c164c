//! A SysV shared memory segment as a safe RAII value.
//!
//! `Segment` is attached for its whole life; `Drop` detaches and never
//! panics. Memory in the segment may be written by another process, so this
//! type never hands out `&[u8]` or `&T` over it: callers copy bytes in and
//! out with [`Segment::read`] and [`Segment::write`], which check bounds,
//! while holding whatever lock guards the segment.

use std::io;

use super::{annotate, cvt};

/// What [`inspect`] found under a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// No segment has this key.
    None,
    /// A segment exists and no process is attached: left by a crash.
    Orphan { id: i32 },
    /// A segment exists and `attached` processes use it.
    InUse {
        id: i32,
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
    if ds.shm_nattch == 0 {
        Ok(Existing::Orphan { id })
    } else {
        Ok(Existing::InUse {
            id,
            attached: ds.shm_nattch as u64,
            creator_pid: ds.shm_cpid,
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

/// An attached segment.
#[derive(Debug)]
pub struct Segment {
    id: i32,
    key: i32,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process-wide; `Segment` only moves raw copies in
// and out through bounds-checked methods, and callers serialise access with
// the semaphore set, so sharing the handle between threads is sound.
unsafe impl Send for Segment {}
// SAFETY: see `Send` above; no method hands out references into the mapping.
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
        // SAFETY: a null address lets the kernel choose; flags 0 is read/write.
        let ptr = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        // shmat reports failure as (void*)-1, not NULL.
        if ptr as isize == -1 {
            let err = annotate(io::Error::last_os_error(), format!("shmat(id={id})"));
            let _ = remove(id);
            return Err(err);
        }
        let segment = Segment {
            id,
            key,
            ptr: ptr.cast::<u8>(),
            len,
        };
        Ok(segment)
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

    /// Copies `out.len()` bytes from `offset` in the segment into `out`.
    ///
    /// # Panics
    /// If the range is outside the segment: a programmer error.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        let end = offset.checked_add(out.len()).expect("range overflow");
        assert!(
            end <= self.len,
            "read {offset}..{end} outside segment of {}",
            self.len
        );
        // SAFETY: the range was checked to lie inside the live mapping, and
        // `out` is a distinct, writable buffer of exactly that length.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` into the segment at `offset`.
    ///
    /// # Panics
    /// If the range is outside the segment: a programmer error.
    pub fn write(&self, offset: usize, data: &[u8]) {
        let end = offset.checked_add(data.len()).expect("range overflow");
        assert!(
            end <= self.len,
            "write {offset}..{end} outside segment of {}",
            self.len
        );
        // SAFETY: the range was checked to lie inside the live mapping, and
        // `data` is a separate buffer that cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) }
    }

    /// Reads a little-endian `u64` at `offset`.
    pub fn read_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes a little-endian `u64` at `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Asks the kernel to back `offset..offset + len` with memory now
    /// (`MADV_POPULATE_WRITE`, Linux 5.14 and later), instead of a page
    /// fault per page on first touch. Contents do not change. Returns
    /// `Ok(false)` where the kernel does not offer it.
    pub fn populate(&self, offset: usize, len: usize) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.len);
        let start = offset / 4096 * 4096;
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
        // SAFETY: `ptr` came from a successful shmat and is detached only
        // here, once. An error (impossible for a valid address) is ignored
        // because Drop must not panic.
        unsafe {
            libc::shmdt(self.ptr.cast::<libc::c_void>());
        }
    }
}

/// A segment attached read-only (`SHM_RDONLY`), for looking at a live
/// broker's queue (`broker --inspect`). It can only copy bytes out: the
/// kernel faults any write through this mapping, and this type offers
/// none.
#[derive(Debug)]
pub struct ReadOnlySegment {
    pub id: i32,
    /// Processes attached, this one included.
    pub attached: u64,
    pub creator_pid: i32,
    ptr: *const u8,
    len: usize,
}

/// Attaches the segment with `key` read-only; `Ok(None)` if no segment
/// has that key.
pub fn attach_read_only(key: i32) -> io::Result<Option<ReadOnlySegment>> {
    let id = match inspect(key)? {
        Existing::None => return Ok(None),
        Existing::Orphan { id } | Existing::InUse { id, .. } => id,
    };
    // SAFETY: a null address lets the kernel choose; SHM_RDONLY maps the
    // segment without write permission.
    let ptr = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
    if ptr as isize == -1 {
        return Err(annotate(
            io::Error::last_os_error(),
            format!("shmat(id={id}, SHM_RDONLY)"),
        ));
    }
    // SAFETY: shmid_ds is plain old data; all-zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: `ds` is a valid, writable shmid_ds for IPC_STAT to fill.
    let stat = cvt(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) }, || {
        format!("shmctl(id={id}, IPC_STAT)")
    });
    let segment = ReadOnlySegment {
        id,
        attached: ds.shm_nattch as u64,
        creator_pid: ds.shm_cpid,
        ptr: ptr.cast::<u8>(),
        len: ds.shm_segsz,
    };
    // On a failed IPC_STAT, `segment` is dropped here and detaches.
    stat.map(|_| Some(segment))
}

impl ReadOnlySegment {
    /// Size in bytes, as the kernel reports it.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the whole segment out, in one `memcpy`: the caller holds the
    /// owner's lock for as short a time as that takes.
    pub fn copy_all(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: the mapping is `len` bytes long (the kernel's size of the
        // segment, which cannot shrink while attached) and readable;
        // `out` is a distinct buffer of exactly that length.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), self.len) }
        out
    }
}

impl Drop for ReadOnlySegment {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from a successful shmat and is detached only
        // here, once; an error is ignored because Drop must not panic.
        unsafe {
            libc::shmdt(self.ptr.cast::<libc::c_void>());
        }
    }
}
