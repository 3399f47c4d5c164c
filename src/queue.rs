//! The message queue: a ring of fixed-size slots in a SysV shared memory
//! segment, guarded by a SysV semaphore set (MUTEX, EMPTY, FULL, as in the
//! original system).
//!
//! Layout: a 64-byte header (magic, layout version, capacity, slot size,
//! maximum message size, head id, next id, owner pid; little-endian u64s),
//! then `capacity` slots of `SLOT_HEADER + max_msg_size` bytes rounded up to
//! 8. A slot holds message id, timestamp, length and content. Message ids
//! are consecutive, so the message with id `n` lives in slot `n % capacity`
//! and the ring holds exactly the ids `head..next`.
//!
//! Semaphores: MUTEX (0) guards every access to the segment and is always
//! taken with `SEM_UNDO`, so a broker killed while holding it does not leave
//! it taken. EMPTY (1) counts free slots: a sender takes slots from it
//! before it stores, and waits on it (bounded) when the ring is full.
//! FULL (2) counts used slots. Lock release and count updates go to the
//! kernel in one atomic `semop`, so each batch costs two system calls.
//!
//! This module does not decide which messages are still needed (the broker
//! does, from its cursors); it never hands out references into the segment.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use crate::log::Logger;
use crate::sys::os;
use crate::sys::sem::{self, NOWAIT, Op, SemaphoreSet, UNDO};
use crate::sys::shm::{self, Segment};

/// Stamped at offset 0 of the segment: "MQRING01" read as little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MQRING01");
/// Layout version of header and slots.
pub const LAYOUT_VERSION: u64 = 1;
/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 64;
/// Bytes at the start of every slot: id, timestamp, length.
pub const SLOT_HEADER: usize = 24;

const MUTEX: u16 = 0;
const EMPTY: u16 = 1;
const FULL: u16 = 2;

/// Takes the MUTEX; `SEM_UNDO` gives it back if the process dies holding it.
const TAKE_MUTEX: Op = Op {
    index: MUTEX,
    delta: -1,
    flags: UNDO,
};
/// Gives the MUTEX back (and cancels the undo entry of the take).
const RELEASE_MUTEX: Op = Op {
    index: MUTEX,
    delta: 1,
    flags: UNDO,
};

// Header field offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_CAPACITY: usize = 16;
const H_SLOT_SIZE: usize = 24;
const H_MAX_MSG: usize = 32;
const H_HEAD: usize = 40;
const H_NEXT: usize = 48;
const H_OWNER: usize = 56;

/// Why the queue could not be created.
#[derive(Debug)]
pub enum QueueError {
    /// A live process uses an object with our key.
    InUse {
        what: &'static str,
        key: i32,
        option: &'static str,
        detail: String,
    },
    /// A system call failed.
    Io(io::Error),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::InUse {
                what,
                key,
                option,
                detail,
            } => write!(
                f,
                "a {what} with key 0x{key:x} is in use by a running process ({detail}): \
                 another broker runs with this key; stop it or start this one with {option}"
            ),
            QueueError::Io(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueueError::Io(err) => Some(err),
            QueueError::InUse { .. } => None,
        }
    }
}

impl From<io::Error> for QueueError {
    fn from(err: io::Error) -> QueueError {
        QueueError::Io(err)
    }
}

/// The ring: owns the segment and the semaphore set, and removes both when
/// dropped (a clean shutdown leaves nothing in `ipcs`).
#[derive(Debug)]
pub struct Ring {
    segment: Segment,
    sems: SemaphoreSet,
    capacity: u64,
    slot_size: usize,
    max_msg_size: usize,
    removed: std::sync::atomic::AtomicBool,
}

/// Looks at the objects under both keys and refuses (with a message naming
/// the key and its option) if a live process uses either. Touches nothing.
pub fn check_keys(
    shm_key: i32,
    sem_key: i32,
) -> Result<(shm::Existing, sem::Existing), QueueError> {
    let existing_shm = shm::inspect(shm_key)?;
    let existing_sem = sem::inspect(sem_key)?;
    if let shm::Existing::InUse {
        attached,
        creator_pid,
        ..
    } = existing_shm
    {
        return Err(QueueError::InUse {
            what: "shared memory segment",
            key: shm_key,
            option: "--shm-key",
            detail: format!("{attached} attached, created by pid {creator_pid}"),
        });
    }
    if let sem::Existing::InUse { pid, .. } = existing_sem {
        return Err(QueueError::InUse {
            what: "semaphore set",
            key: sem_key,
            option: "--sem-key",
            detail: format!("last used by pid {pid}"),
        });
    }
    Ok((existing_shm, existing_sem))
}

/// Bytes a slot takes for messages of up to `max_msg_size` bytes.
pub fn slot_size(max_msg_size: usize) -> usize {
    (SLOT_HEADER + max_msg_size).div_ceil(8) * 8
}

impl Ring {
    /// Creates the segment and the set under the given keys, after removing
    /// orphans (objects left by a broker that died) and refusing to touch
    /// objects that a live process uses. `first_id` is the id the first
    /// message pushed will have.
    pub fn create(
        shm_key: i32,
        sem_key: i32,
        capacity: u32,
        max_msg_size: usize,
        first_id: u64,
        log: &Logger,
    ) -> Result<Ring, QueueError> {
        // Look at both keys before removing anything, so a refusal leaves
        // every object as it was.
        let (existing_shm, existing_sem) = check_keys(shm_key, sem_key)?;
        if let shm::Existing::Orphan { id } = existing_shm {
            shm::remove(id)?;
            log.warn(format_args!(
                "removed an orphaned shared memory segment with key 0x{shm_key:x} (id {id}, no process attached)"
            ));
        }
        if let sem::Existing::Orphan { id } = existing_sem {
            sem::remove(id)?;
            log.warn(format_args!(
                "removed an orphaned semaphore set with key 0x{sem_key:x} (id {id}, its last user is gone)"
            ));
        }

        let capacity_u16 = u16::try_from(capacity).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "capacity above a semaphore's maximum",
            )
        })?;
        let sems = SemaphoreSet::create(sem_key, &[1, capacity_u16, 0])?;
        let slot = slot_size(max_msg_size);
        let len = HEADER_SIZE + slot * capacity as usize;
        let segment = match Segment::create(shm_key, len) {
            Ok(segment) => segment,
            Err(err) => {
                let _ = sems.remove();
                return Err(err.into());
            }
        };
        let ring = Ring {
            segment,
            sems,
            capacity: u64::from(capacity),
            slot_size: slot,
            max_msg_size,
            removed: std::sync::atomic::AtomicBool::new(false),
        };
        // Take the mutex once now: it stamps our pid on the set, which is
        // how a second broker tells that this set is in use.
        let guard = ring.lock()?;
        let header = [
            (H_MAGIC, MAGIC),
            (H_VERSION, LAYOUT_VERSION),
            (H_CAPACITY, u64::from(capacity)),
            (H_SLOT_SIZE, slot as u64),
            (H_MAX_MSG, max_msg_size as u64),
            (H_HEAD, first_id),
            (H_NEXT, first_id),
            (H_OWNER, os::pid() as u64),
        ];
        for (offset, value) in header {
            ring.segment.write_u64(offset, value);
        }
        guard.unlock()?;
        Ok(ring)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn max_msg_size(&self) -> usize {
        self.max_msg_size
    }

    /// Segment and set ids, for logs.
    pub fn ids(&self) -> (i32, i32) {
        (self.segment.id(), self.sems.id())
    }

    /// Bytes of shared memory used.
    pub fn segment_len(&self) -> usize {
        self.segment.len()
    }

    /// Takes up to `want` free slots, waiting until `deadline` for at least
    /// one when none is free, in slices of at most [`WAIT_SLICE`] so that
    /// `give_up` (a shutdown) is noticed. Returns how many were taken (0:
    /// the ring stayed full). The caller must push or
    /// [`unreserve`](Self::unreserve) each of them.
    pub fn reserve(
        &self,
        want: usize,
        deadline: Instant,
        give_up: &dyn Fn() -> bool,
    ) -> io::Result<usize> {
        let want = want.min(self.capacity as usize);
        loop {
            let free = self.sems.value(EMPTY)? as usize;
            if free > 0 {
                // Several senders may race for these slots: take them without
                // waiting, and look again if another sender was faster.
                let n = want.min(free);
                let op = Op {
                    index: EMPTY,
                    delta: -(n as i16),
                    flags: NOWAIT,
                };
                if self.sems.apply(&[op], None)? {
                    return Ok(n);
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || give_up() {
                return Ok(0);
            }
            let op = Op {
                index: EMPTY,
                delta: -1,
                flags: 0,
            };
            if self.sems.apply(&[op], Some(left.min(WAIT_SLICE)))? {
                return Ok(1);
            }
        }
    }

    /// Gives back `n` slots taken by [`reserve`](Self::reserve) and not used.
    pub fn unreserve(&self, n: usize) -> io::Result<()> {
        if n > 0 {
            self.sems.apply(
                &[Op {
                    index: EMPTY,
                    delta: n as i16,
                    flags: 0,
                }],
                None,
            )?;
        }
        Ok(())
    }

    /// Takes `n` free slots and the MUTEX in one atomic operation, without
    /// waiting: `None` when fewer than `n` slots are free (nothing taken).
    pub fn lock_reserving(&self, n: usize) -> io::Result<Option<RingGuard<'_>>> {
        let slots = Op {
            index: EMPTY,
            delta: -(n as i16),
            flags: NOWAIT,
        };
        if !self.sems.apply(&[slots, TAKE_MUTEX], None)? {
            return Ok(None);
        }
        Ok(Some(RingGuard {
            ring: self,
            released: false,
        }))
    }

    /// Takes the MUTEX; the guard gives access to the slots.
    pub fn lock(&self) -> io::Result<RingGuard<'_>> {
        self.sems.apply(&[TAKE_MUTEX], None)?;
        Ok(RingGuard {
            ring: self,
            released: false,
        })
    }

    /// Backs the whole segment with memory, a megabyte at a time, until
    /// done or `stop` says so: the first pass round the ring then finds
    /// its pages ready instead of faulting each one in. Contents do not
    /// change, so this may run beside the senders. Returns how many bytes
    /// were backed (0 where the kernel does not offer it).
    pub fn populate(&self, stop: &dyn Fn() -> bool) -> usize {
        const STEP: usize = 1 << 20;
        let len = self.segment.len();
        let mut done = 0;
        while done < len && !stop() {
            match self.segment.populate(done, STEP) {
                Ok(true) => done = (done + STEP).min(len),
                Ok(false) | Err(_) => break,
            }
        }
        done
    }

    /// Removes the segment and the set from the system now (clean
    /// shutdown). Dropping the ring does the same, ignoring errors.
    pub fn remove(&self) -> io::Result<()> {
        if self.removed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        let shm = self.segment.remove();
        let sem = self.sems.remove();
        shm.and(sem)
    }

    fn slot_offset(&self, id: u64) -> usize {
        HEADER_SIZE + (id % self.capacity) as usize * self.slot_size
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// Holds the MUTEX. Dropping it releases the MUTEX; the `unlock_*` methods
/// release it together with a count update, in one system call.
#[derive(Debug)]
pub struct RingGuard<'a> {
    ring: &'a Ring,
    released: bool,
}

impl RingGuard<'_> {
    /// The oldest id held and the id the next message will get.
    pub fn bounds(&self) -> (u64, u64) {
        (
            self.ring.segment.read_u64(H_HEAD),
            self.ring.segment.read_u64(H_NEXT),
        )
    }

    /// Stores `contents` as the messages `next..next + n` with `timestamp`,
    /// in slots the caller reserved. Makes them visible with
    /// [`unlock_pushed`](Self::unlock_pushed).
    pub fn push(&mut self, timestamp: u64, contents: &[&[u8]]) {
        let segment = &self.ring.segment;
        let (head, mut next) = self.bounds();
        for content in contents {
            assert!(
                content.len() <= self.ring.max_msg_size,
                "message larger than a slot"
            );
            assert!(next - head < self.ring.capacity, "push into a full ring");
            let at = self.ring.slot_offset(next);
            segment.write_u64(at, next);
            segment.write_u64(at + 8, timestamp);
            segment.write_u64(at + 16, content.len() as u64);
            segment.write(at + SLOT_HEADER, content);
            next += 1;
        }
        segment.write_u64(H_NEXT, next);
    }

    /// Timestamp and length of message `id`, which must be held.
    pub fn meta(&self, id: u64) -> (u64, usize) {
        let at = self.checked_slot(id);
        let segment = &self.ring.segment;
        (segment.read_u64(at + 8), segment.read_u64(at + 16) as usize)
    }

    /// Appends the content of message `id` (which must be held) to `out`.
    pub fn append_content(&self, id: u64, out: &mut Vec<u8>) {
        let at = self.checked_slot(id);
        let len = (self.ring.segment.read_u64(at + 16) as usize).min(self.ring.max_msg_size);
        let old = out.len();
        out.resize(old + len, 0);
        self.ring.segment.read(at + SLOT_HEADER, &mut out[old..]);
    }

    fn checked_slot(&self, id: u64) -> usize {
        let (head, next) = self.bounds();
        assert!(
            head <= id && id < next,
            "message {id} not held ({head}..{next})"
        );
        let at = self.ring.slot_offset(id);
        debug_assert_eq!(self.ring.segment.read_u64(at), id);
        at
    }

    /// Releases the MUTEX together with the count changes `counts`, in one
    /// atomic semop. `Ok(false)` if a `NOWAIT` count change could not be
    /// made (then nothing was done: the MUTEX is still held).
    fn unlock_with(&mut self, counts: &[Op]) -> io::Result<bool> {
        let mut ops = [RELEASE_MUTEX; 3];
        ops[1..=counts.len()].copy_from_slice(counts);
        let done = self.ring.sems.apply(&ops[..=counts.len()], None)?;
        self.released |= done;
        Ok(done)
    }

    /// Releases the MUTEX and counts `pushed` new messages on FULL.
    pub fn unlock_pushed(mut self, pushed: usize) -> io::Result<()> {
        let full = Op {
            index: FULL,
            delta: pushed as i16,
            flags: 0,
        };
        self.unlock_with(&[full]).map(drop)
    }

    /// Drops the messages before `new_head` from the ring, then releases
    /// the MUTEX, moving their slots from FULL to EMPTY.
    pub fn unlock_released(mut self, new_head: u64) -> io::Result<()> {
        let (head, next) = self.bounds();
        assert!(
            head <= new_head && new_head <= next,
            "bad new head {new_head} ({head}..{next})"
        );
        let freed = (new_head - head) as i16;
        self.ring.segment.write_u64(H_HEAD, new_head);
        let full = Op {
            index: FULL,
            delta: -freed,
            flags: NOWAIT,
        };
        let empty = Op {
            index: EMPTY,
            delta: freed,
            flags: 0,
        };
        if self.unlock_with(&[full, empty])? {
            return Ok(());
        }
        // FULL lower than the ring says: a bug, but never leave the MUTEX
        // held (the guard's drop releases it).
        Err(io::Error::other("semaphore FULL below the ring's count"))
    }

    /// Drops the newest `n` messages (their fsync failed and nobody saw
    /// them), then releases the MUTEX, moving their slots from FULL to
    /// EMPTY.
    pub fn unlock_dropping_newest(mut self, n: usize) -> io::Result<()> {
        let (head, next) = self.bounds();
        assert!(n as u64 <= next - head, "drop {n} of {}", next - head);
        self.ring.segment.write_u64(H_NEXT, next - n as u64);
        let full = Op {
            index: FULL,
            delta: -(n as i16),
            flags: NOWAIT,
        };
        let empty = Op {
            index: EMPTY,
            delta: n as i16,
            flags: 0,
        };
        if self.unlock_with(&[full, empty])? {
            return Ok(());
        }
        Err(io::Error::other("semaphore FULL below the ring's count"))
    }

    /// Releases the MUTEX and gives back `n` reserved slots not used.
    pub fn unlock_giving_back(mut self, n: usize) -> io::Result<()> {
        let empty = Op {
            index: EMPTY,
            delta: n as i16,
            flags: 0,
        };
        self.unlock_with(&[empty]).map(drop)
    }

    /// Releases the MUTEX with no count change.
    pub fn unlock(mut self) -> io::Result<()> {
        self.unlock_with(&[]).map(drop)
    }

    /// The header fields a reader checks before trusting the segment:
    /// magic, layout version, capacity and slot size.
    pub fn header(&self) -> [u64; 4] {
        let segment = &self.ring.segment;
        [H_MAGIC, H_VERSION, H_CAPACITY, H_SLOT_SIZE].map(|offset| segment.read_u64(offset))
    }
}

impl Drop for RingGuard<'_> {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.ring.sems.apply(&[RELEASE_MUTEX], None);
        }
    }
}

/// A sender waiting for room looks at its `give_up` condition this often.
pub const WAIT_SLICE: Duration = Duration::from_millis(100);

/// The longest a sender may wait for room, whatever the option says.
pub const MAX_SEND_WAIT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Level;

    /// Keys unlikely to clash with other tests or a running broker.
    fn keys(salt: i32) -> (i32, i32) {
        let base = 0x5100_0000 + (std::process::id() as i32 & 0xffff) * 16 + salt * 2;
        (base, base + 1)
    }

    #[test]
    fn push_read_release_and_bounded_wait() {
        let (shm_key, sem_key) = keys(1);
        let log = Logger::stderr_only(Level::Error);
        let ring = Ring::create(shm_key, sem_key, 3, 8, 10, &log).unwrap();
        {
            let guard = ring.lock().unwrap();
            assert_eq!(
                guard.header(),
                [MAGIC, LAYOUT_VERSION, 3, slot_size(8) as u64]
            );
            guard.unlock().unwrap();
        }
        let deadline = Instant::now() + Duration::from_millis(50);
        assert_eq!(ring.reserve(5, deadline, &|| false).unwrap(), 3);
        let mut guard = ring.lock().unwrap();
        guard.push(7, &[b"a", b"bb", b"ccc"]);
        assert_eq!(guard.bounds(), (10, 13));
        let mut out = Vec::new();
        guard.append_content(11, &mut out);
        assert_eq!(out, b"bb");
        assert_eq!(guard.meta(12), (7, 3));
        guard.unlock_pushed(3).unwrap();

        // Full: a reserve waits until its deadline and gets nothing.
        let started = Instant::now();
        assert_eq!(
            ring.reserve(1, started + Duration::from_millis(30), &|| false)
                .unwrap(),
            0
        );
        assert!(started.elapsed() >= Duration::from_millis(25));

        // Giving up (a shutdown) ends the wait early.
        let started = Instant::now();
        assert_eq!(
            ring.reserve(1, started + Duration::from_secs(30), &|| true)
                .unwrap(),
            0
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        ring.lock().unwrap().unlock_released(12).unwrap();
        assert_eq!(ring.reserve(5, Instant::now(), &|| false).unwrap(), 2);
        ring.unreserve(2).unwrap();
        let (shm_id, sem_id) = ring.ids();
        drop(ring);
        assert_eq!(
            shm::inspect(shm_key).unwrap(),
            shm::Existing::None,
            "segment {shm_id} left"
        );
        assert_eq!(
            sem::inspect(sem_key).unwrap(),
            sem::Existing::None,
            "set {sem_id} left"
        );
    }

    #[test]
    fn refuses_keys_in_use_and_removes_orphans() {
        let (shm_key, sem_key) = keys(2);
        let log = Logger::stderr_only(Level::Error);
        let ring = Ring::create(shm_key, sem_key, 2, 4, 1, &log).unwrap();
        let err = Ring::create(shm_key, sem_key, 2, 4, 1, &log).unwrap_err();
        assert!(err.to_string().contains("--shm-key"), "{err}");
        // An orphan: a segment nobody is attached to.
        let orphan = Segment::create(shm_key + 100, 64).unwrap();
        let orphan_id = orphan.id();
        drop(orphan);
        let again = Ring::create(shm_key + 100, sem_key + 100, 2, 4, 1, &log).unwrap();
        assert_ne!(again.ids().0, orphan_id);
        drop(again);
        drop(ring);
    }
}
