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
//! The ring is a window, not the queue (issue 9): it holds the newest
//! `capacity` messages stored, whatever the cursors; the segment files are
//! the queue of record, and a reader behind `head` reads them instead.
//!
//! Semaphores: MUTEX (0) guards every access to the segment and is always
//! taken with `SEM_UNDO`, so a broker killed while holding it does not leave
//! it taken. EMPTY (1) counts free slots and FULL (2) used ones (EMPTY +
//! FULL = slots; FULL = ids in the window). A sender takes its slots from
//! EMPTY and, when too few are free, evicts the oldest from FULL in the
//! same atomic `semop` that takes the MUTEX, so it never waits for a slot.
//! Lock release and count updates go to the kernel in one atomic `semop`,
//! so each batch costs two system calls.
//!
//! This module does not decide which messages are still needed (the broker
//! does, from its cursors, on disk); it never hands out references into the
//! segment.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::log::Logger;
use crate::sys::os;
use crate::sys::sem::{self, NOWAIT, Op, SemaphoreSet};
use crate::sys::shm::{self, LockError, Region, RegionGuard, Segment};

/// Stamped at offset 0 of the segment: "MQRING01" read as little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MQRING01");
/// Layout version of header and slots.
pub const LAYOUT_VERSION: u64 = 1;
/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 64;
/// Bytes at the start of every slot: id, timestamp, length.
pub const SLOT_HEADER: usize = 24;
/// Semaphores in our set: MUTEX, EMPTY, FULL.
pub const SEMAPHORES: u64 = 3;

const MUTEX: u16 = 0;
const EMPTY: u16 = 1;
const FULL: u16 = 2;

/// How long taking the MUTEX may wait. Only this process takes it, for
/// microseconds at a time, so a longer wait means another process holds
/// it (or changed its value): give up with an error instead of hanging a
/// worker (and shutdown) forever.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);

// Header field offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_CAPACITY: usize = 16;
const H_SLOT_SIZE: usize = 24;
const H_MAX_MSG: usize = 32;
const H_HEAD: usize = 40;
const H_NEXT: usize = 48;
const H_OWNER: usize = 56;

/// The sizes of a ring, computed once with checked arithmetic: every slot
/// offset derived from them stays inside `len`, which fits the address
/// space. See [`Layout::within`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub capacity: u64,
    pub max_msg_size: usize,
    pub slot_size: usize,
    /// Bytes of the whole segment.
    pub len: usize,
}

/// Sizes that do not fit: the message names the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError(pub String);

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SizeError {}

impl Layout {
    /// The layout for this process: sizes must fit `isize::MAX` (the most
    /// a pointer offset may be).
    pub fn new(capacity: u64, max_msg_size: u64) -> Result<Layout, SizeError> {
        Layout::within(capacity, max_msg_size, isize::MAX as u64)
    }

    /// The layout if `capacity` slots for messages of `max_msg_size` bytes
    /// and the header fit in `limit` bytes (a parameter so that tests can
    /// ask what a 32-bit target would say).
    pub fn within(capacity: u64, max_msg_size: u64, limit: u64) -> Result<Layout, SizeError> {
        let too_big = || {
            SizeError(format!(
                "--ring {capacity} with --max-msg-size {max_msg_size} needs a shared memory \
                 segment larger than this system's address space ({limit} bytes)"
            ))
        };
        if capacity == 0 || max_msg_size == 0 {
            return Err(SizeError(
                "capacity and message size must be positive".into(),
            ));
        }
        let slot = max_msg_size
            .checked_add(SLOT_HEADER as u64)
            .and_then(|n| n.checked_next_multiple_of(8))
            .ok_or_else(too_big)?;
        let len = slot
            .checked_mul(capacity)
            .and_then(|n| n.checked_add(HEADER_SIZE as u64))
            .filter(|&n| n <= limit)
            .ok_or_else(too_big)?;
        let to_usize = |n: u64| usize::try_from(n).map_err(|_| too_big());
        Ok(Layout {
            capacity,
            max_msg_size: to_usize(max_msg_size)?,
            slot_size: to_usize(slot)?,
            len: to_usize(len)?,
        })
    }

    /// Where the slot of message `id` starts. In bounds by construction:
    /// `id % capacity < capacity`, and the last slot ends at `len`.
    fn slot_offset(&self, id: u64) -> usize {
        // `capacity` fits usize (len does), so the remainder does too.
        HEADER_SIZE + (id % self.capacity) as usize * self.slot_size
    }
}

/// Bytes a slot takes for messages of up to `max_msg_size` bytes.
pub fn slot_size(max_msg_size: usize) -> usize {
    (SLOT_HEADER + max_msg_size).div_ceil(8) * 8
}

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
    /// An object under our key that the broker cannot show is its own.
    Foreign {
        what: &'static str,
        key: i32,
        option: &'static str,
        found: String,
        ipcrm: char,
    },
    /// The sizes do not fit.
    Size(SizeError),
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
            QueueError::Foreign {
                what,
                key,
                option,
                found,
                ipcrm,
            } => write!(
                f,
                "a {what} with key 0x{key:x} exists and is not this broker's ({found}); \
                 it was left alone. Start the broker with another {option}, or, if you know \
                 that object is stale, remove it with 'ipcrm -{ipcrm} 0x{key:x}'"
            ),
            QueueError::Size(err) => write!(f, "{err}"),
            QueueError::Io(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueueError::Size(err) => Some(err),
            QueueError::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for QueueError {
    fn from(err: io::Error) -> QueueError {
        QueueError::Io(err)
    }
}

/// What the broker knows of each message in the ring, in its own memory:
/// the segment's copy of these is never believed.
#[derive(Debug, Clone, Copy, Default)]
struct SlotMeta {
    timestamp: u64,
    len: usize,
    checksum: u64,
}

/// The ring's authoritative state, in process memory.
#[derive(Debug)]
struct Local {
    head: u64,
    next: u64,
    /// One entry per slot, for the id `head..next` it holds.
    slots: Vec<SlotMeta>,
}

/// The ring: owns the segment and the semaphore set, and removes both when
/// dropped (a clean shutdown leaves nothing in `ipcs`).
#[derive(Debug)]
pub struct Ring {
    region: Region<Local>,
    layout: Layout,
    removed: AtomicBool,
}

/// What is under our keys, once judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysChecked {
    /// An orphaned segment of ours to remove before creating ours.
    pub orphan_segment: Option<i32>,
    /// An orphaned set of ours to remove.
    pub orphan_set: Option<i32>,
}

/// Looks at the objects under both keys and refuses (with a message naming
/// the key and its option) if a live process uses either, or if either is
/// not provably ours: a segment must carry our magic, layout version and a
/// size that matches its own header; a set must have our three semaphores
/// and the id `recorded_set` that our previous run recorded. Touches
/// nothing.
pub fn check_keys(
    shm_key: i32,
    sem_key: i32,
    recorded_set: Option<i32>,
) -> Result<KeysChecked, QueueError> {
    let orphan_segment = check_segment(shm_key)?;
    let orphan_set = check_set(sem_key, recorded_set)?;
    Ok(KeysChecked {
        orphan_segment,
        orphan_set,
    })
}

fn check_segment(key: i32) -> Result<Option<i32>, QueueError> {
    let (id, size, creator_pid, attached) = match shm::inspect(key)? {
        shm::Existing::None => return Ok(None),
        shm::Existing::Orphan {
            id,
            size,
            creator_pid,
        } => (id, size, creator_pid, 0),
        shm::Existing::InUse {
            id,
            size,
            attached,
            creator_pid,
        } => (id, size, creator_pid, attached),
    };
    let found = format!("{size} bytes, created by pid {creator_pid}, {attached} attached");
    let ours = match is_our_segment(id, size) {
        // Mapped by this very process: ours, and in use.
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => true,
        other => other?,
    };
    if !ours {
        return Err(QueueError::Foreign {
            what: "shared memory segment",
            key,
            option: "--shm-key",
            found: format!("{found}, no broker queue header"),
            ipcrm: 'M',
        });
    }
    if attached > 0 {
        return Err(QueueError::InUse {
            what: "shared memory segment",
            key,
            option: "--shm-key",
            detail: format!("{attached} attached, created by pid {creator_pid}"),
        });
    }
    Ok(Some(id))
}

/// Whether segment `id` of `size` bytes starts with our header: magic,
/// version, and a capacity and slot size whose layout is exactly `size`.
fn is_our_segment(id: i32, size: u64) -> io::Result<bool> {
    let header = shm::peek(id, HEADER_SIZE)?;
    if header.len() < HEADER_SIZE {
        return Ok(false);
    }
    let field = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    if field(H_MAGIC) != MAGIC || field(H_VERSION) != LAYOUT_VERSION {
        return Ok(false);
    }
    let layout = Layout::new(field(H_CAPACITY), field(H_MAX_MSG));
    Ok(layout.is_ok_and(|l| l.len as u64 == size && l.slot_size as u64 == field(H_SLOT_SIZE)))
}

fn check_set(key: i32, recorded: Option<i32>) -> Result<Option<i32>, QueueError> {
    let (id, nsems, pid) = match sem::inspect(key)? {
        sem::Existing::None => return Ok(None),
        sem::Existing::Orphan { id, nsems } => (id, nsems, None),
        sem::Existing::InUse { id, pid, nsems } => (id, nsems, Some(pid)),
    };
    let recorded_text = match recorded {
        Some(recorded) => format!("the previous run recorded set id {recorded}"),
        None => "no set id recorded beside the messages file".to_string(),
    };
    let user = match pid {
        Some(pid) => format!("last used by pid {pid}, alive"),
        None => "its last user is gone".to_string(),
    };
    let foreign = || QueueError::Foreign {
        what: "semaphore set",
        key,
        option: "--sem-key",
        found: format!("id {id}, {nsems} semaphore(s), {user}; {recorded_text}"),
        ipcrm: 'S',
    };
    if nsems != SEMAPHORES {
        return Err(foreign());
    }
    if let Some(pid) = pid {
        return Err(QueueError::InUse {
            what: "semaphore set",
            key,
            option: "--sem-key",
            detail: format!("last used by pid {pid}"),
        });
    }
    if recorded != Some(id) {
        return Err(foreign());
    }
    Ok(Some(id))
}

/// A slot that does not hold what the broker put there: another process
/// wrote over it. The message is still in the messages file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMismatch {
    pub key: i32,
    pub id: u64,
    pub what: &'static str,
}

impl fmt::Display for SlotMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shared memory segment with key 0x{:x}: the slot of message {} does not hold \
             what the broker stored ({}); another process wrote over it",
            self.key, self.id, self.what
        )
    }
}

impl std::error::Error for SlotMismatch {}

/// A cheap checksum of a message's content: enough to notice bytes that
/// another process changed (not a defence against a forger, who could as
/// well write the messages file).
fn checksum(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut hash = bytes.len() as u64 ^ K;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        hash = (hash ^ u64::from_le_bytes(word))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    for &b in chunks.remainder() {
        hash = (hash ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
    }
    hash
}

fn lock_error(err: LockError, key: i32) -> io::Error {
    match err {
        LockError::Io(err) => err,
        LockError::WouldBlock => io::Error::from(io::ErrorKind::WouldBlock),
        LockError::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the queue's MUTEX (semaphore key 0x{key:x}) stayed taken for {} s: another \
                 process holds it or changed it",
                LOCK_TIMEOUT.as_secs()
            ),
        ),
    }
}

impl Ring {
    /// Creates the segment and the set under the given keys, after removing
    /// orphans that are provably ours (see [`check_keys`]) and refusing to
    /// touch anything else. `first_id` is the id the first message pushed
    /// will have.
    pub fn create(
        shm_key: i32,
        sem_key: i32,
        capacity: u32,
        max_msg_size: usize,
        first_id: u64,
        recorded_set: Option<i32>,
        log: &Logger,
    ) -> Result<Ring, QueueError> {
        let layout =
            Layout::new(u64::from(capacity), max_msg_size as u64).map_err(QueueError::Size)?;
        // Look at both keys before removing anything, so a refusal leaves
        // every object as it was.
        let checked = check_keys(shm_key, sem_key, recorded_set)?;
        if let Some(id) = checked.orphan_segment {
            shm::remove(id)?;
            log.warn(format_args!(
                "removed an orphaned shared memory segment with key 0x{shm_key:x} (id {id}, our header, no process attached)"
            ));
        }
        if let Some(id) = checked.orphan_set {
            sem::remove(id)?;
            log.warn(format_args!(
                "removed an orphaned semaphore set with key 0x{sem_key:x} (id {id}, recorded by our previous run, its last user is gone)"
            ));
        }
        let capacity_u16 = u16::try_from(capacity).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "capacity above a semaphore's maximum",
            )
        })?;
        let sems = SemaphoreSet::create(sem_key, &[1, capacity_u16, 0])?;
        let segment = match Segment::create(shm_key, layout.len) {
            Ok(segment) => segment,
            Err(err) => {
                let _ = sems.remove();
                return Err(err.into());
            }
        };
        let local = Local {
            head: first_id,
            next: first_id,
            slots: vec![SlotMeta::default(); capacity as usize],
        };
        let ring = Ring {
            region: Region::new(segment, sems, MUTEX, local),
            layout,
            removed: AtomicBool::new(false),
        };
        // Take the mutex once now: it stamps our pid on the set, which is
        // how a second broker tells that this set is in use.
        let guard = ring.lock()?;
        let header = [
            (H_MAGIC, MAGIC),
            (H_VERSION, LAYOUT_VERSION),
            (H_CAPACITY, u64::from(capacity)),
            (H_SLOT_SIZE, layout.slot_size as u64),
            (H_MAX_MSG, max_msg_size as u64),
            (H_HEAD, first_id),
            (H_NEXT, first_id),
            (H_OWNER, os::pid() as u64),
        ];
        for (offset, value) in header {
            guard.inner.write_u64(offset, value);
        }
        guard.unlock()?;
        Ok(ring)
    }

    /// Slots of the ring (`--ring`).
    pub fn slots(&self) -> u64 {
        self.layout.capacity
    }

    pub fn max_msg_size(&self) -> usize {
        self.layout.max_msg_size
    }

    /// Segment and set ids, for logs (and for the record beside the data
    /// that lets the next run recognise an orphaned set as ours).
    pub fn ids(&self) -> (i32, i32) {
        (self.region.segment().id(), self.region.sems().id())
    }

    /// Bytes of shared memory used.
    pub fn segment_len(&self) -> usize {
        self.region.segment().len()
    }

    fn sems(&self) -> &SemaphoreSet {
        self.region.sems()
    }

    /// Takes `n` free slots and the MUTEX in one atomic semop, after
    /// evicting the `evict` oldest messages in the same semop
    /// (`[FULL -evict NOWAIT, EMPTY +evict, EMPTY -n NOWAIT, MUTEX -1]`):
    /// the ring is a window over the newest messages, so a sender never
    /// waits for a slot. The caller (who alone writes the ring) computes
    /// `evict` from the bounds it keeps; counts that do not allow it mean
    /// another process changed them: an error, and nothing was taken.
    pub fn lock_appending(&self, evict: usize, n: usize) -> io::Result<RingGuard<'_>> {
        let take = count_op(EMPTY, -(n as i64), NOWAIT);
        let ops = [
            count_op(FULL, -(evict as i64), NOWAIT),
            count_op(EMPTY, evict as i64, 0),
            take,
        ];
        let ops: &[Op] = if evict == 0 { &[take] } else { &ops };
        match self.region.lock(ops, LOCK_TIMEOUT) {
            Ok(inner) => {
                let mut guard = self.guard(inner);
                let (head, next) = guard.bounds();
                assert!(
                    evict as u64 <= next - head,
                    "evict {evict} of {}",
                    next - head
                );
                guard.set_head(head + evict as u64);
                Ok(guard)
            }
            Err(LockError::WouldBlock) => Err(io::Error::other(format!(
                "semaphores EMPTY and FULL (key 0x{:x}) do not allow {n} new and {evict} \
                 evicted slot(s): changed by another process?",
                self.sems().key()
            ))),
            Err(err) => Err(lock_error(err, self.sems().key())),
        }
    }

    /// Takes the MUTEX; the guard gives access to the slots.
    pub fn lock(&self) -> io::Result<RingGuard<'_>> {
        match self.region.lock(&[], LOCK_TIMEOUT) {
            Ok(inner) => Ok(self.guard(inner)),
            Err(err) => Err(lock_error(err, self.sems().key())),
        }
    }

    fn guard<'a>(&'a self, inner: RegionGuard<'a, Local>) -> RingGuard<'a> {
        RingGuard { ring: self, inner }
    }

    /// Backs the whole segment with memory, a megabyte at a time, until
    /// done or `stop` says so: the first pass round the ring then finds
    /// its pages ready instead of faulting each one in. Contents do not
    /// change, so this may run beside the senders. Returns how many bytes
    /// were backed (0 where the kernel does not offer it).
    pub fn populate(&self, stop: &dyn Fn() -> bool) -> usize {
        const STEP: usize = 1 << 20;
        let segment = self.region.segment();
        let len = segment.len();
        let mut done = 0;
        while done < len && !stop() {
            match segment.populate(done, STEP) {
                Ok(true) => done = done.saturating_add(STEP).min(len),
                Ok(false) | Err(_) => break,
            }
        }
        done
    }

    /// Removes the segment and the set from the system now (clean
    /// shutdown). Dropping the ring does the same, ignoring errors.
    pub fn remove(&self) -> io::Result<()> {
        if self.removed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let shm = self.region.segment().remove();
        let sem = self.sems().remove();
        shm.and(sem)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// An operation on a count semaphore. Deltas beyond what a semaphore
/// holds are cut to `i16` (they never are: counts are at most 32767).
fn count_op(index: u16, delta: i64, flags: i16) -> Op {
    Op {
        index,
        delta: delta.clamp(i64::from(i16::MIN), i64::from(i16::MAX)) as i16,
        flags,
    }
}

/// Holds the MUTEX. Dropping it releases the MUTEX; the `unlock_*` methods
/// release it together with a count update, in one system call.
pub struct RingGuard<'a> {
    ring: &'a Ring,
    inner: RegionGuard<'a, Local>,
}

impl RingGuard<'_> {
    /// The oldest id held and the id the next message will get: the
    /// broker's own values, never read back from the segment.
    pub fn bounds(&self) -> (u64, u64) {
        let local = self.inner.local_ref();
        (local.head, local.next)
    }

    /// Stores `contents` as the messages `next..next + n` with `timestamp`,
    /// in slots the caller reserved. Makes them visible with
    /// [`unlock_pushed`](Self::unlock_pushed). Refuses (storing nothing) a
    /// message larger than a slot, or more than the free slots (possible
    /// only if another process changed the EMPTY count).
    pub fn push(&mut self, timestamp: u64, contents: &[&[u8]]) -> io::Result<()> {
        let layout = self.ring.layout;
        let (head, next) = self.bounds();
        let used = next - head;
        let fits = (contents.len() as u64) <= layout.capacity - used;
        if !fits || contents.iter().any(|c| c.len() > layout.max_msg_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "queue: {} message(s) do not fit ({used} of {} slots used); \
                     was the EMPTY semaphore (key 0x{:x}) changed by another process?",
                    contents.len(),
                    layout.capacity,
                    self.ring.sems().key()
                ),
            ));
        }
        for (k, content) in contents.iter().enumerate() {
            let id = next + k as u64;
            let at = layout.slot_offset(id);
            self.inner.write_u64(at, id);
            self.inner.write_u64(at + 8, timestamp);
            self.inner.write_u64(at + 16, content.len() as u64);
            self.inner.write(at + SLOT_HEADER, content);
            let slot = (id % layout.capacity) as usize;
            self.inner.local().slots[slot] = SlotMeta {
                timestamp,
                len: content.len(),
                checksum: checksum(content),
            };
        }
        let next = next + contents.len() as u64;
        self.inner.local().next = next;
        // For `ipcs`-side readers only: never read back.
        self.inner.write_u64(H_NEXT, next);
        Ok(())
    }

    /// Timestamp and length of message `id`, which must be held: the
    /// broker's own record, not the segment's.
    pub fn meta(&self, id: u64) -> (u64, usize) {
        let meta = self.slot_meta(id);
        (meta.timestamp, meta.len)
    }

    fn slot_meta(&self, id: u64) -> SlotMeta {
        let (head, next) = self.bounds();
        assert!(
            head <= id && id < next,
            "message {id} not held ({head}..{next})"
        );
        self.inner.local_ref().slots[(id % self.ring.layout.capacity) as usize]
    }

    /// Appends the content of message `id` (which must be held) to `out`,
    /// after checking the slot against what the broker stored: its id and
    /// length fields, and the content's checksum. On a mismatch `out` is
    /// left as it was: serve the message from the messages file.
    pub fn append_content(&self, id: u64, out: &mut Vec<u8>) -> Result<(), SlotMismatch> {
        let meta = self.slot_meta(id);
        let at = self.ring.layout.slot_offset(id);
        let mismatch = |what| SlotMismatch {
            key: self.ring.region.segment().key(),
            id,
            what,
        };
        if self.inner.read_u64(at) != Some(id) {
            return Err(mismatch("id field"));
        }
        if self.inner.read_u64(at + 16) != Some(meta.len as u64) {
            return Err(mismatch("length field"));
        }
        let old = out.len();
        out.resize(old + meta.len, 0);
        let copied = self.inner.read(at + SLOT_HEADER, &mut out[old..]);
        if !copied || checksum(&out[old..]) != meta.checksum {
            out.truncate(old);
            return Err(mismatch("content"));
        }
        Ok(())
    }

    /// Releases the MUTEX together with the count changes `counts`, in one
    /// atomic semop. `Ok(false)` if a `NOWAIT` count change could not be
    /// made (then nothing was done: the MUTEX is still held).
    fn unlock_with(&mut self, counts: &[Op]) -> io::Result<bool> {
        self.inner.unlock_with(counts)
    }

    /// Releases the MUTEX and counts `pushed` new messages on FULL.
    pub fn unlock_pushed(mut self, pushed: usize) -> io::Result<()> {
        self.unlock_with(&[count_op(FULL, pushed as i64, 0)])
            .map(drop)
    }

    /// Moves the oldest id held (eviction; the counts are the caller's).
    fn set_head(&mut self, head: u64) {
        self.inner.local().head = head;
        // For `ipcs`-side readers only: never read back.
        self.inner.write_u64(H_HEAD, head);
    }

    /// Drops the messages from `new_next` on (their fsync failed and
    /// nobody saw them; some may have been evicted already), then releases
    /// the MUTEX, moving their slots from FULL to EMPTY. The ring may be
    /// left empty, starting at `new_next`.
    pub fn unlock_cutting_to(mut self, new_next: u64) -> io::Result<()> {
        let (head, next) = self.bounds();
        assert!(new_next <= next, "cut to {new_next} past {next}");
        let dropped = next - new_next.max(head);
        if new_next < head {
            self.set_head(new_next);
        }
        self.inner.local().next = new_next;
        // For `ipcs`-side readers only: never read back.
        self.inner.write_u64(H_NEXT, new_next);
        if dropped == 0 {
            // A semop of 0 would wait for FULL to be zero.
            return self.unlock();
        }
        let full = count_op(FULL, -(dropped as i64), NOWAIT);
        let empty = count_op(EMPTY, dropped as i64, 0);
        if self.unlock_with(&[full, empty])? {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "semaphore FULL (key 0x{:x}) below the ring's count: changed by another process?",
            self.ring.sems().key()
        )))
    }

    /// Releases the MUTEX and gives back `n` slots taken and not used
    /// (an eviction made with them stays: the window only shrank, and
    /// every message is still on disk).
    pub fn unlock_giving_back(mut self, n: usize) -> io::Result<()> {
        self.unlock_with(&[count_op(EMPTY, n as i64, 0)]).map(drop)
    }

    /// Releases the MUTEX with no count change.
    pub fn unlock(mut self) -> io::Result<()> {
        self.unlock_with(&[]).map(drop)
    }

    /// The header fields a reader checks before trusting the segment:
    /// magic, layout version, capacity and slot size, as the segment has
    /// them now (untrusted: for inspection and tests).
    pub fn header(&self) -> [Option<u64>; 4] {
        [H_MAGIC, H_VERSION, H_CAPACITY, H_SLOT_SIZE].map(|offset| self.inner.read_u64(offset))
    }
}

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

    /// Removes whatever is left under these keys when a test ends, passed
    /// or failed.
    struct Cleanup(Vec<i32>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for &key in &self.0 {
                if let Ok(shm::Existing::Orphan { id, .. } | shm::Existing::InUse { id, .. }) =
                    shm::inspect(key)
                {
                    let _ = shm::remove(id);
                }
                if let Ok(sem::Existing::Orphan { id, .. } | sem::Existing::InUse { id, .. }) =
                    sem::inspect(key)
                {
                    let _ = sem::remove(id);
                }
            }
        }
    }

    #[test]
    fn push_read_evict_and_cut_back() {
        let (shm_key, sem_key) = keys(1);
        let _cleanup = Cleanup(vec![shm_key, sem_key]);
        let log = Logger::stderr_only(Level::Error);
        let ring = Ring::create(shm_key, sem_key, 3, 8, 10, None, &log).unwrap();
        {
            let guard = ring.lock().unwrap();
            assert_eq!(
                guard.header(),
                [MAGIC, LAYOUT_VERSION, 3, slot_size(8) as u64].map(Some)
            );
            guard.unlock().unwrap();
        }
        let mut guard = ring.lock_appending(0, 3).unwrap();
        guard.push(7, &[b"a", b"bb", b"ccc"]).unwrap();
        assert_eq!(guard.bounds(), (10, 13));
        // A fourth does not fit, whatever the semaphores say.
        assert!(guard.push(7, &[b"d"]).is_err());
        let mut out = Vec::new();
        guard.append_content(11, &mut out).unwrap();
        assert_eq!(out, b"bb");
        assert_eq!(guard.meta(12), (7, 3));
        guard.unlock_pushed(3).unwrap();

        // Full: two more evict the two oldest in the same semop.
        assert!(
            ring.lock_appending(0, 2).is_err(),
            "no room without evicting"
        );
        let mut guard = ring.lock_appending(2, 2).unwrap();
        assert_eq!(guard.bounds(), (12, 13));
        guard.push(8, &[b"dd", b"e"]).unwrap();
        assert_eq!(guard.bounds(), (12, 15));
        guard.unlock_pushed(2).unwrap();
        assert_eq!(ring.sems().value(FULL).unwrap(), 3);
        assert_eq!(ring.sems().value(EMPTY).unwrap(), 0);

        // A cut back past the window empties it and gives the slots back.
        ring.lock().unwrap().unlock_cutting_to(11).unwrap();
        assert_eq!(ring.lock().unwrap().bounds(), (11, 11));
        assert_eq!(ring.sems().value(FULL).unwrap(), 0);
        assert_eq!(ring.sems().value(EMPTY).unwrap(), 3);
        let guard = ring.lock_appending(0, 1).unwrap();
        guard.unlock_giving_back(1).unwrap();
        assert_eq!(ring.sems().value(EMPTY).unwrap(), 3);
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
    fn a_scribbled_slot_is_reported_never_served_and_bounds_are_our_own() {
        let (shm_key, sem_key) = keys(3);
        let _cleanup = Cleanup(vec![shm_key, sem_key]);
        let log = Logger::stderr_only(Level::Error);
        let ring = Ring::create(shm_key, sem_key, 4, 16, 1, None, &log).unwrap();
        let mut guard = ring.lock_appending(0, 3).unwrap();
        guard.push(5, &[b"one", b"two", b"three"]).unwrap();
        let layout = ring.layout;
        // Another process writes over the header and three slots: an id,
        // a length of 2^63, a content byte.
        guard.inner.write_u64(H_HEAD, u64::MAX);
        guard.inner.write_u64(H_NEXT, 0);
        guard.inner.write_u64(layout.slot_offset(1), 99);
        guard.inner.write_u64(layout.slot_offset(2) + 16, 1 << 63);
        guard
            .inner
            .write(layout.slot_offset(3) + SLOT_HEADER, b"\n");
        assert_eq!(guard.bounds(), (1, 4));
        for (id, what) in [(1, "id field"), (2, "length field"), (3, "content")] {
            let mut out = b"MSG:".to_vec();
            let err = guard.append_content(id, &mut out).unwrap_err();
            assert_eq!(err.what, what);
            assert_eq!(out, b"MSG:", "nothing appended for {id}");
            assert!(err.to_string().contains(&format!("0x{shm_key:x}")), "{err}");
        }
        assert_eq!(guard.meta(2), (5, 3));
        guard.unlock_pushed(3).unwrap();
    }

    #[test]
    fn sizes_are_checked_against_the_address_space() {
        // The armv7 case: 4096 slots of 1048552 + 24 bytes is 2^32 bytes,
        // which wrapped to a 64-byte segment; with 32-bit limits it is
        // refused, on 64 bits it fits.
        let limit_32 = i32::MAX as u64;
        let err = Layout::within(4096, 1_048_552, limit_32).unwrap_err();
        assert!(err.0.contains("--ring 4096"), "{err}");
        assert!(Layout::within(4096, 1_048_552, usize::MAX as u64).is_ok());
        assert!(Layout::within(1000, 1024, limit_32).is_ok());
        for (capacity, size) in [(u64::MAX, 1), (2, u64::MAX), (u64::MAX, u64::MAX), (0, 1)] {
            assert!(
                Layout::within(capacity, size, u64::MAX).is_err(),
                "{capacity} {size}"
            );
        }
        let layout = Layout::within(3, 8, 1 << 20).unwrap();
        assert_eq!((layout.slot_size, layout.len), (32, 64 + 96));
        // The last slot ends exactly at the end, for any id.
        for id in [0, 1, 2, 5, u64::MAX] {
            assert!(layout.slot_offset(id) + layout.slot_size <= layout.len);
        }
    }

    #[test]
    fn refuses_keys_in_use_and_objects_not_provably_ours() {
        let (shm_key, sem_key) = keys(2);
        let mut all = vec![shm_key, sem_key];
        for offset in [100, 200, 300] {
            all.extend([shm_key + offset, sem_key + offset]);
        }
        let _cleanup = Cleanup(all);
        let log = Logger::stderr_only(Level::Error);
        let ring = Ring::create(shm_key, sem_key, 2, 4, 1, None, &log).unwrap();
        let err = Ring::create(shm_key, sem_key, 2, 4, 1, None, &log).unwrap_err();
        assert!(err.to_string().contains("--shm-key"), "{err}");
        // Another program's orphaned segment, and a set of one semaphore.
        let foreign = Segment::create(shm_key + 100, 4096).unwrap();
        drop(foreign);
        let err = Ring::create(shm_key + 100, sem_key + 100, 2, 4, 1, None, &log).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("4096 bytes") && text.contains("ipcrm -M"),
            "{text}"
        );
        assert!(matches!(
            shm::inspect(shm_key + 100).unwrap(),
            shm::Existing::Orphan { .. }
        ));
        let set = SemaphoreSet::create(sem_key + 200, &[1]).unwrap();
        let err = Ring::create(shm_key + 200, sem_key + 200, 2, 4, 1, None, &log).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("1 semaphore(s)") && text.contains("--sem-key"),
            "{text}"
        );
        // A set of three is ours only with the id the last run recorded.
        let three = SemaphoreSet::create(sem_key + 300, &[1, 1, 0]).unwrap();
        let checked = check_keys(shm_key + 300, sem_key + 300, Some(three.id()));
        assert!(
            matches!(&checked, Ok(c) if c.orphan_set == Some(three.id()))
                || matches!(&checked, Err(QueueError::InUse { .. })),
            "{checked:?}"
        );
        assert!(check_keys(shm_key + 300, sem_key + 300, Some(three.id() + 1)).is_err());
        for id in [set.id(), three.id()] {
            sem::remove(id).unwrap();
        }
        if let shm::Existing::Orphan { id, .. } = shm::inspect(shm_key + 100).unwrap() {
            shm::remove(id).unwrap();
        }
        drop(ring);
    }
}
