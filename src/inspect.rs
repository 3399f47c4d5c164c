//! `broker --inspect`: a look inside a running broker's queue, for an
//! operator or a learner. It opens the semaphore set, takes the MUTEX for
//! exactly one copy of the segment, attached read-only (`SHM_RDONLY`) for
//! that copy only ([`shm::peek`]), so header and slots are consistent and
//! the broker waits no longer than one `memcpy`; then it decodes the copy
//! at leisure.
//!
//! The decoding ([`describe`]) is a pure function over the copied bytes:
//! the segment is untrusted input (another process of the same user may
//! have written anything), so every length and id is checked before it is
//! used and nothing here panics on what it finds. It never writes to the
//! segment or the semaphores beyond taking and giving back the MUTEX (with
//! `SEM_UNDO`, so even a killed inspector cannot leave it taken).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::queue::{HEADER_SIZE, LAYOUT_VERSION, MAGIC, SLOT_HEADER};
use crate::sys::sem::{self, Op, UNDO};
use crate::sys::shm;

/// How long to wait for the MUTEX before copying without it (a broker
/// stuck holding it is itself worth seeing).
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// Newest messages shown.
const NEWEST: u64 = 5;
/// Bytes of content shown per message.
const PREVIEW: usize = 40;

/// What the semaphore set said, and whether the copy was made under its
/// MUTEX.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Semaphores {
    pub key: i32,
    /// `None`: no set has the key.
    pub id: Option<i32>,
    /// MUTEX (read before taking it), EMPTY and FULL (read while holding
    /// it, so they match the copied header).
    pub values: Vec<u32>,
    pub locked_copy: bool,
}

/// Attaches, copies, describes. `Err` (exit 1) when no segment has
/// `shm_key` or the system refuses.
pub fn run(shm_key: i32, sem_key: i32) -> Result<String, InspectError> {
    run_text(shm_key, sem_key).map_err(InspectError)
}

fn run_text(shm_key: i32, sem_key: i32) -> Result<String, String> {
    let found = shm::inspect(shm_key)
        .map_err(|err| format!("cannot look up the segment with key 0x{shm_key:x}: {err}"))?;
    let (id, size, attached, creator_pid) = match found {
        shm::Existing::None => {
            return Err(format!(
                "no shared memory segment has key 0x{shm_key:x}: no broker runs with --shm-key 0x{shm_key:x} \
                 (see ipcs -m; give the running broker's --shm-key and --sem-key)"
            ));
        }
        shm::Existing::Orphan {
            id,
            size,
            creator_pid,
        } => (id, size, 0, creator_pid),
        shm::Existing::InUse {
            id,
            size,
            attached,
            creator_pid,
        } => (id, size, attached, creator_pid),
    };
    let set = match sem::inspect(sem_key) {
        Ok(sem::Existing::None) => None,
        Ok(_) => Some(sem::SemaphoreSet::open(sem_key).map_err(|err| err.to_string())?),
        Err(err) => {
            return Err(format!(
                "cannot look up the semaphore set 0x{sem_key:x}: {err}"
            ));
        }
    };
    let mut sems = Semaphores {
        key: sem_key,
        id: set.as_ref().map(|set| set.id()),
        ..Semaphores::default()
    };
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    let copy = match &set {
        Some(set) if set_has_three(set) => copy_under_mutex(id, len, set, &mut sems)?,
        _ => shm::peek(id, len).map_err(|err| err.to_string())?,
    };
    let mut text = format!(
        "segment key 0x{shm_key:x} id {id}: {size} bytes, {attached} process(es) attached \
         (before this look), created by pid {creator_pid}\n"
    );
    text.push_str(&describe(&copy, &sems));
    Ok(text)
}

/// Whether the set has MUTEX, EMPTY and FULL (a value for index 2).
fn set_has_three(set: &sem::SemaphoreSet) -> bool {
    set.value(2).is_ok()
}

/// Takes the MUTEX (bounded wait), copies the segment read-only, gives the
/// MUTEX back: the broker waits for one copy at most.
fn copy_under_mutex(
    id: i32,
    len: usize,
    set: &sem::SemaphoreSet,
    sems: &mut Semaphores,
) -> Result<Vec<u8>, String> {
    let value = |i: u16| set.value(i).map_err(|err| err.to_string());
    let mutex = value(0)?;
    let take = Op {
        index: 0,
        delta: -1,
        flags: UNDO,
    };
    let give = Op { delta: 1, ..take };
    let locked = set
        .apply(&[take], Some(LOCK_WAIT))
        .map_err(|e| e.to_string())?;
    let copy = shm::peek(id, len);
    let counts = (value(1), value(2));
    if locked {
        set.apply(&[give], None).map_err(|e| e.to_string())?;
    }
    let copy = copy.map_err(|err| err.to_string())?;
    sems.values = vec![mutex, counts.0?, counts.1?];
    sems.locked_copy = locked;
    Ok(copy)
}

/// Little-endian u64 at `at`, if the copy is long enough.
fn u64_at(copy: &[u8], at: usize) -> Option<u64> {
    let bytes = copy.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Header, semaphores, ids in the ring and the newest messages of a copy
/// of the segment.
pub fn describe(copy: &[u8], sems: &Semaphores) -> String {
    let mut out = String::new();
    let header: Vec<u64> = (0..8).map(|i| u64_at(copy, i * 8).unwrap_or(0)).collect();
    let [magic, version, slots, slot_size, max_msg, head, next, owner] = header[..] else {
        unreachable!("eight fields")
    };
    let magic_text = printable(&magic.to_le_bytes());
    let _ = writeln!(
        out,
        "header: magic \"{magic_text}\" ({}), layout version {version}, slots {slots}, slot size {slot_size} bytes, \
         max message {max_msg} bytes, owner pid {owner}",
        if magic == MAGIC {
            "a mensajeria queue"
        } else {
            "NOT a mensajeria queue"
        }
    );
    describe_semaphores(&mut out, sems);
    if copy.len() < HEADER_SIZE || magic != MAGIC || version != LAYOUT_VERSION {
        let _ = writeln!(
            out,
            "not decoding the slots: this inspector reads layout version {LAYOUT_VERSION} of magic \"MQRING01\""
        );
        return out;
    }
    let layout_ok = slots > 0
        && (slot_size as usize) >= SLOT_HEADER
        && slots
            .checked_mul(slot_size)
            .and_then(|n| n.checked_add(HEADER_SIZE as u64))
            .is_some_and(|n| n <= copy.len() as u64);
    if !layout_ok || head > next || next - head > slots {
        let _ = writeln!(
            out,
            "the header is inconsistent (slots {slots} x {slot_size} bytes in {} bytes, head {head}, next {next}): not decoding",
            copy.len()
        );
        return out;
    }
    let held = next - head;
    match held {
        0 => {
            let _ = writeln!(out, "ids in the ring: none (next id {next})");
        }
        _ => {
            let _ = writeln!(
                out,
                "ids in the ring: {head}..={} ({held} message(s), {} free slot(s)); next id {next}",
                next - 1,
                slots - held
            );
        }
    }
    describe_newest(&mut out, copy, (head, next), (slots, slot_size as usize));
    out
}

fn describe_semaphores(out: &mut String, sems: &Semaphores) {
    let key = sems.key;
    match (sems.id, &sems.values[..]) {
        (None, _) => {
            let _ = writeln!(out, "semaphores key 0x{key:x}: no set has this key");
        }
        (Some(id), [mutex, empty, full]) => {
            let _ = writeln!(
                out,
                "semaphores key 0x{key:x} id {id}: MUTEX={mutex} ({}) EMPTY={empty} (free slots) FULL={full} (used slots)",
                if *mutex == 1 { "free" } else { "taken" }
            );
            let _ = writeln!(
                out,
                "copy made {}",
                if sems.locked_copy {
                    "holding the MUTEX (one memcpy long)"
                } else {
                    "WITHOUT the MUTEX (not free within 1 s): it may be torn"
                }
            );
        }
        (Some(id), _) => {
            let _ = writeln!(
                out,
                "semaphores key 0x{key:x} id {id}: not MUTEX/EMPTY/FULL (fewer than 3 semaphores)"
            );
        }
    }
}

fn describe_newest(out: &mut String, copy: &[u8], ids: (u64, u64), layout: (u64, usize)) {
    let ((head, next), (slots, slot_size)) = (ids, layout);
    let first = next.saturating_sub(NEWEST).max(head);
    if first == next {
        return;
    }
    let _ = writeln!(out, "newest messages (first {PREVIEW} bytes):");
    for id in first..next {
        // In bounds: the layout check above covers every slot.
        let at = HEADER_SIZE + (id % slots) as usize * slot_size;
        let (slot_id, timestamp, len) = (
            u64_at(copy, at).unwrap_or(0),
            u64_at(copy, at + 8).unwrap_or(0),
            u64_at(copy, at + 16).unwrap_or(0),
        );
        let room = (slot_size - SLOT_HEADER) as u64;
        if slot_id != id || len > room {
            let _ = writeln!(
                out,
                "  {id:>8}  slot says id {slot_id}, length {len}: does not match"
            );
            continue;
        }
        let start = at + SLOT_HEADER;
        let shown = &copy[start..start + (len as usize).min(PREVIEW)];
        let when = crate::log::utc_timestamp(UNIX_EPOCH + Duration::from_secs(timestamp));
        let more = if len as usize > PREVIEW { "..." } else { "" };
        let _ = writeln!(
            out,
            "  {id:>8}  {when}  {len:>5} bytes  \"{}\"{more}",
            printable(shown)
        );
    }
}

/// Bytes as text a terminal shows safely: printable ASCII as is, the rest
/// as `\xNN`.
fn printable(bytes: &[u8]) -> String {
    let mut text = String::new();
    for &b in bytes {
        match b {
            b'"' | b'\\' => {
                text.push('\\');
                text.push(b as char);
            }
            0x20..=0x7e => text.push(b as char),
            _ => {
                let _ = write!(text, "\\x{b:02x}");
            }
        }
    }
    text
}

crate::message_error!(
    /// Why `broker --inspect` could not show the queue.
    InspectError
);

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment copy with `slots` slots of `max` content bytes, holding
    /// `contents` from id `head`.
    fn segment(slots: u64, max: usize, head: u64, contents: &[&[u8]]) -> Vec<u8> {
        let slot = crate::queue::slot_size(max);
        let mut copy = vec![0u8; HEADER_SIZE + slot * slots as usize];
        let next = head + contents.len() as u64;
        let fields = [
            MAGIC,
            LAYOUT_VERSION,
            slots,
            slot as u64,
            max as u64,
            head,
            next,
            42,
        ];
        for (i, v) in fields.iter().enumerate() {
            copy[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        for (k, content) in contents.iter().enumerate() {
            let id = head + k as u64;
            let at = HEADER_SIZE + (id % slots) as usize * slot;
            copy[at..at + 8].copy_from_slice(&id.to_le_bytes());
            copy[at + 8..at + 16].copy_from_slice(&1_700_000_000u64.to_le_bytes());
            copy[at + 16..at + 24].copy_from_slice(&(content.len() as u64).to_le_bytes());
            copy[at + 24..at + 24 + content.len()].copy_from_slice(content);
        }
        copy
    }

    fn sems() -> Semaphores {
        Semaphores {
            key: 0x5678,
            id: Some(7),
            values: vec![1, 1, 3],
            locked_copy: true,
        }
    }

    #[test]
    fn a_healthy_queue() {
        let copy = segment(4, 16, 9, &[b"one", b"two\n\"q\"", b"three"]);
        let text = describe(&copy, &sems());
        for expected in [
            "magic \"MQRING01\" (a mensajeria queue)",
            "layout version 1, slots 4",
            "MUTEX=1 (free) EMPTY=1 (free slots) FULL=3 (used slots)",
            "ids in the ring: 9..=11 (3 message(s), 1 free slot(s)); next id 12",
            "\"one\"",
            "\"two\\x0a\\\"q\\\"\"",
            "2023-11-14T22:13:20Z",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
    }

    #[test]
    fn hostile_or_foreign_segments_are_described_not_trusted() {
        let mut foreign = segment(4, 16, 1, &[b"x"]);
        foreign[0] = b'Z';
        let text = describe(&foreign, &sems());
        assert!(text.contains("NOT a mensajeria queue") && text.contains("not decoding"));
        // Too short for its header, an empty copy, a lying slot count.
        assert!(describe(&[1, 2, 3], &sems()).contains("not decoding"));
        assert!(describe(&[], &Semaphores::default()).contains("no set has this key"));
        let mut lying = segment(4, 16, 1, &[b"x"]);
        lying[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(describe(&lying, &sems()).contains("inconsistent"));
        // head past next, a slot whose id or length lies.
        let mut backwards = segment(4, 16, 5, &[b"x"]);
        backwards[40..48].copy_from_slice(&9u64.to_le_bytes());
        assert!(describe(&backwards, &sems()).contains("inconsistent"));
        let mut bad_slot = segment(4, 16, 1, &[b"x", b"y"]);
        let at = HEADER_SIZE + crate::queue::slot_size(16) + 16;
        bad_slot[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(describe(&bad_slot, &sems()).contains("does not match"));
    }

    #[test]
    fn long_contents_are_cut_and_the_newest_shown() {
        let long = [b'a'; 60];
        let many: Vec<&[u8]> = (0..8).map(|_| &long[..]).collect();
        let text = describe(&segment(8, 64, 1, &many), &sems());
        assert_eq!(text.matches("...").count(), NEWEST as usize, "{text}");
        assert!(
            text.contains("       8  ") && !text.contains("       3  "),
            "{text}"
        );
    }
}
