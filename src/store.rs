//! Persistence: the messages file, the offsets file, recovery and
//! compaction (see docs/operations.md).
//!
//! Messages file: one record per message, `MSG_ID:TIMESTAMP:SIZE:CONTENT\n`
//! (the original system's format). SIZE makes a record self-delimiting: the
//! reader trusts SIZE, then checks that the newline is exactly there.
//! Offsets file (`<messages file>.offsets`): `NEXT_ID:`, `NEXT_CONSUMER:`,
//! `HEAD:`, `CAPACITY:` and `CONSUMER:<id>:<offset>[:ACK]` lines, always replaced whole
//! (temporary file, fsync, rename, fsync of the directory).
//!
//! Invariants: recovery never invents a record and never drops one
//! silently: a torn tail (a record cut short, possibly followed by zeros)
//! is reported as such, any other damage is an error that names the file
//! and byte offset. Memory during recovery is bounded by the records kept
//! plus one record, whatever the file's size. This module knows nothing of
//! sockets or shared memory.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::disk::Disk;
use crate::text::{parse_u64, push_u64, valid_consumer_id};

/// When the messages file is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every `OK:MSG_ID` (one fsync covers every SEND waiting then).
    Always,
    /// At most every `--fsync-interval` ms, in the background.
    Interval,
    /// Never on the message path; the OS writes back when it likes.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = ();
    fn from_str(text: &str) -> Result<FsyncPolicy, ()> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "interval" => Ok(FsyncPolicy::Interval),
            "never" => Ok(FsyncPolicy::Never),
            _ => Err(()),
        }
    }
}

impl FsyncPolicy {
    pub fn name(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Interval => "interval",
            FsyncPolicy::Never => "never",
        }
    }
}

/// Timestamps at or past this are not believed (year 5138): a damaged
/// digit more likely than a clock that far ahead. Clocks that are behind
/// (boards without a real-time clock start in 1970) are fine.
pub const MAX_TIMESTAMP: u64 = 100_000_000_000;
/// Digits allowed in the SIZE field; the value is checked against the
/// maximum message size too.
pub const MAX_SIZE_DIGITS: usize = 7;

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    pub timestamp: u64,
    pub content: Vec<u8>,
}

/// Appends one record's bytes to `out`.
pub fn encode_record(out: &mut Vec<u8>, id: u64, timestamp: u64, content: &[u8]) {
    push_u64(out, id);
    out.push(b':');
    push_u64(out, timestamp);
    out.push(b':');
    push_u64(out, content.len() as u64);
    out.push(b':');
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// Bytes that [`encode_record`] writes for a record.
pub fn record_len(id: u64, timestamp: u64, size: usize) -> u64 {
    fn digits(mut n: u64) -> u64 {
        let mut d = 1;
        while n >= 10 {
            n /= 10;
            d += 1;
        }
        d
    }
    digits(id) + digits(timestamp) + digits(size as u64) + size as u64 + 4
}

/// What parsing the bytes at a record boundary gave.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole record: its fields, where its content lies, its length.
    Record {
        id: u64,
        timestamp: u64,
        content: (usize, usize),
        len: usize,
    },
    /// The bytes so far are a valid start of a record, and end too soon.
    Incomplete,
    /// Not a record: why, and at which byte of the slice it went wrong.
    Invalid { reason: &'static str, at: usize },
}

/// Parses one record at the start of `buf`.
fn parse_record(buf: &[u8], max_msg_size: usize) -> Parsed {
    let mut pos = 0;
    let mut fields = [0u64; 3];
    let limits = [
        (20, "bad message id"),
        (20, "bad timestamp"),
        (MAX_SIZE_DIGITS, "bad size"),
    ];
    for (field, (max_digits, reason)) in fields.iter_mut().zip(limits) {
        let start = pos;
        loop {
            let Some(&b) = buf.get(pos) else {
                return Parsed::Incomplete;
            };
            if b == b':' && pos > start {
                break;
            }
            if !b.is_ascii_digit() || pos - start >= max_digits {
                return Parsed::Invalid { reason, at: pos };
            }
            pos += 1;
        }
        match parse_u64(&buf[start..pos]) {
            Some(value) => *field = value,
            None => return Parsed::Invalid { reason, at: start },
        }
        pos += 1;
    }
    let [id, timestamp, size] = fields;
    if id == 0 {
        return Parsed::Invalid {
            reason: "message id 0",
            at: 0,
        };
    }
    if size == 0 || size > max_msg_size as u64 {
        return Parsed::Invalid {
            reason: "size out of range",
            at: pos - 1,
        };
    }
    let content_start = pos;
    let newline = content_start + size as usize;
    match buf.get(newline) {
        None => Parsed::Incomplete,
        Some(b'\n') => match buf[content_start..newline].iter().position(|&b| b == b'\n') {
            Some(at) => Parsed::Invalid {
                reason: "newline inside content",
                at: content_start + at,
            },
            None => Parsed::Record {
                id,
                timestamp,
                content: (content_start, newline),
                len: newline + 1,
            },
        },
        Some(_) => Parsed::Invalid {
            reason: "no newline where SIZE says the record ends",
            at: newline,
        },
    }
}

/// How a scanned messages file ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The last record ends the file.
    Clean,
    /// The file ends in `bytes` bytes that are the start of a record cut
    /// short (an interrupted write), possibly followed by zeros, or only
    /// zeros (a file system that grew the file before a crash).
    Torn { bytes: u64 },
    /// Something that is not a record at byte `offset` of the file.
    Damaged { offset: u64, reason: String },
}

/// What [`scan`] found.
#[derive(Debug)]
pub struct Scan {
    /// Records with `id >= keep_from`, oldest first.
    pub kept: VecDeque<Record>,
    /// Id of the first and last valid records, if any.
    pub first_id: Option<u64>,
    pub last_id: Option<u64>,
    /// Bytes of valid records from the start of the file.
    pub valid_len: u64,
    /// The largest SIZE among the kept records.
    pub kept_max_size: usize,
    pub tail: Tail,
    /// With a damaged tail: whether a whole record with a later id than
    /// the last valid one starts somewhere after the damage (at a line
    /// start). Without one, the damage may be what a power cut leaves
    /// (see [`power_cut_tail`]).
    pub records_after_damage: bool,
}

/// The rule for a power cut (docs/operations.md, "Power cut"): bytes
/// after the last valid record, with no valid record after them, are a
/// torn tail when the records kept still reach everything the offsets
/// file says is durable: its NEXT_ID (`durable_next_id`) is never ahead of
/// fsynced records, so if the kept records reach `durable_next_id - 1`
/// (or, with none kept, the offsets' `head` says nothing before it is
/// needed), whatever followed was never acknowledged under `always` and
/// never covered by a saved offset. Anything else is damage.
pub fn power_cut_tail(scan: &Scan, durable_next_id: u64, head: u64) -> bool {
    if !matches!(scan.tail, Tail::Damaged { .. }) || scan.records_after_damage {
        return false;
    }
    let reached = scan.last_id.unwrap_or(head.saturating_sub(1));
    reached.saturating_add(1) >= durable_next_id
}

/// Reads on from damage at the start of `window` (which the scan already
/// holds; `zeros_from` is where the bad byte is) to the end of the file.
/// Returns the bytes from the damage to the end, whether they are all
/// zeros from the bad byte on, and whether a whole record with an id past
/// `after` starts at a line start in them. Memory is bounded by one
/// record plus a read chunk.
fn look_past_damage(
    mut window: Vec<u8>,
    zeros_from: usize,
    mut reader: impl Read,
    mut eof: bool,
    max_msg_size: usize,
    after: Option<u64>,
) -> Result<(u64, bool, bool), ScanError> {
    let mut total = window.len() as u64;
    let mut zeros_only = window[zeros_from.min(window.len())..]
        .iter()
        .all(|&b| b == 0);
    // The first index that may start a record: right after a newline, and
    // never the damaged record itself at 0.
    let mut next = 1;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut need_more = false;
        while next < window.len() {
            if window[next - 1] != b'\n' {
                next += 1;
                continue;
            }
            match parse_record(&window[next..], max_msg_size) {
                Parsed::Record { id, .. } if after.is_none_or(|last| id > last) => {
                    return Ok((total, false, true));
                }
                Parsed::Incomplete if !eof => {
                    need_more = true;
                    break;
                }
                _ => next += 1,
            }
        }
        if eof && !need_more {
            return Ok((total, zeros_only, false));
        }
        // Keep the newline before the next candidate, drop what is done.
        let keep_from = (next - 1).min(window.len());
        window.drain(..keep_from);
        next -= keep_from;
        let n = loop {
            match reader.read(&mut chunk) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ScanError::Io(e)),
            }
        };
        eof = n == 0;
        zeros_only &= chunk[..n].iter().all(|&b| b == 0);
        total += n as u64;
        window.extend_from_slice(&chunk[..n]);
    }
}

/// An error that stops a scan.
#[derive(Debug)]
pub enum ScanError {
    Io(io::Error),
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Io(err) => write!(f, "reading the messages file: {err}"),
        }
    }
}

impl std::error::Error for ScanError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ScanError::Io(err) => Some(err),
        }
    }
}

/// Reads records from `reader` until the end or the first invalid byte,
/// keeping the last `keep_limit` of those with `id >= keep_from`: memory
/// stays bounded whatever the file's size. `max_msg_size` bounds what a
/// SIZE field may say (a larger one is damage).
pub fn scan(
    mut reader: impl Read,
    max_msg_size: usize,
    keep_from: u64,
    keep_limit: usize,
) -> Result<Scan, ScanError> {
    let chunk = 64 * 1024;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk);
    let mut start = 0usize; // first unparsed byte in buf
    let mut file_offset = 0u64; // file offset of buf[start]
    let mut eof = false;
    let mut result = Scan {
        kept: VecDeque::new(),
        first_id: None,
        last_id: None,
        valid_len: 0,
        kept_max_size: 0,
        tail: Tail::Clean,
        records_after_damage: false,
    };
    loop {
        match parse_record(&buf[start..], max_msg_size) {
            Parsed::Record {
                id,
                timestamp,
                content,
                len,
            } => {
                if let Some(reason) = record_problem(id, timestamp, result.last_id) {
                    // A record that skips ids is itself one after the damage.
                    let skips = result.last_id.is_some_and(|last| id > last + 1);
                    let damage = Damage {
                        window: buf[start..].to_vec(),
                        zeros_from: None,
                        file_offset,
                        reason,
                    };
                    return result.damaged(damage, reader, eof, max_msg_size, skips);
                }
                if id >= keep_from && keep_limit > 0 {
                    let bytes = &buf[start + content.0..start + content.1];
                    result.keep(id, timestamp, bytes, keep_limit);
                }
                result.first_id.get_or_insert(id);
                result.last_id = Some(id);
                start += len;
                file_offset += len as u64;
                result.valid_len = file_offset;
            }
            Parsed::Incomplete if !eof => {
                buf.drain(..start);
                start = 0;
                eof = read_chunk(&mut reader, &mut buf, chunk)?;
            }
            Parsed::Incomplete => {
                let rest = (buf.len() - start) as u64;
                if rest > 0 {
                    result.tail = Tail::Torn { bytes: rest };
                }
                return Ok(result);
            }
            Parsed::Invalid { reason, at } => {
                let damage = Damage {
                    window: buf[start..].to_vec(),
                    zeros_from: Some(at),
                    file_offset,
                    reason: reason.to_string(),
                };
                return result.damaged(damage, reader, eof, max_msg_size, false);
            }
        }
    }
}

/// Appends up to `chunk` bytes from `reader` to `buf`; true at the end.
fn read_chunk(reader: &mut impl Read, buf: &mut Vec<u8>, chunk: usize) -> Result<bool, ScanError> {
    let old = buf.len();
    buf.resize(old + chunk, 0);
    let n = loop {
        match reader.read(&mut buf[old..]) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ScanError::Io(e)),
        }
    };
    buf.truncate(old + n);
    Ok(n == 0)
}

/// Why a whole record cannot follow the last valid one, if it cannot.
fn record_problem(id: u64, timestamp: u64, last: Option<u64>) -> Option<String> {
    if timestamp >= MAX_TIMESTAMP {
        return Some("timestamp out of range".to_string());
    }
    match last {
        Some(last) if id != last + 1 => Some(format!("message id {id} does not follow {last}")),
        _ => None,
    }
}

/// Where a scan met something that is not the next record.
struct Damage {
    /// The bytes from the bad record on that the scan holds.
    window: Vec<u8>,
    /// Where in `window` the first bad byte is, if zeros from there on
    /// would make it a torn tail.
    zeros_from: Option<usize>,
    file_offset: u64,
    reason: String,
}

impl Scan {
    /// Ends the scan at `damage`: zeros from the bad byte to the end of the
    /// file are what a crash leaves after a torn write (a torn tail);
    /// anything else is damage, which may still be a power cut's (see
    /// [`power_cut_tail`]) unless a record follows it.
    fn damaged(
        mut self,
        damage: Damage,
        reader: impl Read,
        eof: bool,
        max_msg_size: usize,
        record_follows: bool,
    ) -> Result<Scan, ScanError> {
        let zeros_from = damage.zeros_from.unwrap_or(usize::MAX);
        let (rest, zeros_only, after) = look_past_damage(
            damage.window,
            zeros_from,
            reader,
            eof,
            max_msg_size,
            self.last_id,
        )?;
        if zeros_only && damage.zeros_from.is_some() {
            self.tail = Tail::Torn { bytes: rest };
        } else {
            self.records_after_damage = after || record_follows;
            self.tail = Tail::Damaged {
                offset: damage.file_offset,
                reason: damage.reason,
            };
        }
        Ok(self)
    }

    /// Keeps a record, dropping the oldest kept past `limit`.
    fn keep(&mut self, id: u64, timestamp: u64, content: &[u8], limit: usize) {
        if self.kept.len() == limit {
            self.kept.pop_front();
        }
        self.kept_max_size = self.kept_max_size.max(content.len());
        self.kept.push_back(Record {
            id,
            timestamp,
            content: content.to_vec(),
        });
    }
}

/// The offsets file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offsets {
    /// The id the next stored message gets.
    pub next_id: u64,
    /// The next consumer id the broker will assign.
    pub next_consumer: u64,
    /// The oldest message id the queue held when saved.
    pub head: u64,
    /// The queue's capacity when saved (0: not recorded).
    pub capacity: u64,
    /// Every consumer id's cursor.
    pub consumers: Vec<SavedCursor>,
}

/// One consumer id's position as saved: `CONSUMER:<id>:<offset>`, with a
/// trailing `:ACK` for an id in ack mode (whose offset is its ack floor).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SavedCursor {
    pub id: Vec<u8>,
    /// The id of the last message consumed (ack mode: acknowledged with
    /// everything before it).
    pub offset: u64,
    pub ack: bool,
}

impl Offsets {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.consumers.len() * 32);
        for (key, value) in [
            (&b"NEXT_ID:"[..], self.next_id),
            (b"NEXT_CONSUMER:", self.next_consumer),
            (b"HEAD:", self.head),
            (b"CAPACITY:", self.capacity),
        ] {
            out.extend_from_slice(key);
            push_u64(&mut out, value);
            out.push(b'\n');
        }
        for cursor in &self.consumers {
            out.extend_from_slice(b"CONSUMER:");
            out.extend_from_slice(&cursor.id);
            out.push(b':');
            push_u64(&mut out, cursor.offset);
            if cursor.ack {
                out.extend_from_slice(b":ACK");
            }
            out.push(b'\n');
        }
        out
    }

    /// Parses the file's bytes. A bad line is an error naming its number,
    /// unless `skip_bad` (repair), when it is left out and reported in the
    /// returned list of skipped line numbers.
    pub fn decode(bytes: &[u8], skip_bad: bool) -> Result<(Offsets, Vec<usize>), String> {
        let mut offsets = Offsets::default();
        let mut skipped = Vec::new();
        let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        if text.is_empty() {
            return Ok((offsets, skipped));
        }
        for (number, line) in text.split(|&b| b == b'\n').enumerate() {
            let ok = if let Some(v) = line.strip_prefix(b"NEXT_ID:") {
                parse_u64(v).map(|v| offsets.next_id = v)
            } else if let Some(v) = line.strip_prefix(b"NEXT_CONSUMER:") {
                parse_u64(v).map(|v| offsets.next_consumer = v)
            } else if let Some(v) = line.strip_prefix(b"HEAD:") {
                parse_u64(v).map(|v| offsets.head = v)
            } else if let Some(v) = line.strip_prefix(b"CAPACITY:") {
                parse_u64(v).map(|v| offsets.capacity = v)
            } else if let Some(rest) = line.strip_prefix(b"CONSUMER:") {
                let (rest, ack) = match rest.strip_suffix(b":ACK") {
                    Some(rest) => (rest, true),
                    None => (rest, false),
                };
                let colon = rest.iter().rposition(|&b| b == b':');
                colon.and_then(|c| {
                    let (id, offset) = (&rest[..c], parse_u64(&rest[c + 1..])?);
                    valid_consumer_id(id).then(|| {
                        offsets.consumers.push(SavedCursor {
                            id: id.to_vec(),
                            offset,
                            ack,
                        })
                    })
                })
            } else {
                None
            };
            if ok.is_none() {
                if !skip_bad {
                    return Err(format!(
                        "line {}: not an offsets line: {:?}",
                        number + 1,
                        String::from_utf8_lossy(line)
                    ));
                }
                skipped.push(number + 1);
            }
        }
        Ok((offsets, skipped))
    }
}

/// The offsets file that goes with `messages`.
pub fn offsets_path(messages: &Path) -> PathBuf {
    let mut name = messages.as_os_str().to_owned();
    name.push(".offsets");
    PathBuf::from(name)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn context(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// Fsyncs the directory that holds `path`, so a rename in it is durable.
fn sync_dir(disk: &Disk, path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| disk.sync_all(&d))
        .map_err(|e| context(e, "fsync directory", dir))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename,
/// fsync of the directory. Readers see the old file or the new, never half.
/// On any failure the old file stays as it was.
pub fn replace_file(disk: &Disk, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = with_suffix(path, ".tmp");
    write_new_file(disk, &tmp, bytes)?;
    disk.rename(&tmp, path)
        .map_err(|e| context(e, "rename over", path))
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
    sync_dir(disk, path)
}

/// Creates `path` (0600, replacing what is there) holding `bytes`,
/// fsynced; returns it open for reading and writing.
fn write_new_file(disk: &Disk, path: &Path, bytes: &[u8]) -> io::Result<File> {
    let file = create_private(path)?;
    let written = disk
        .write_all(&file, bytes)
        .map_err(|e| context(e, "write", path))
        .and_then(|()| disk.sync_all(&file).map_err(|e| context(e, "fsync", path)));
    if let Err(err) = written {
        let _ = fs::remove_file(path);
        return Err(err);
    }
    Ok(file)
}

/// Creates `path` empty, mode 0600, open for reading and writing. A file
/// left there by a crash (or planted as a symbolic link) is removed first:
/// it would keep its own mode, so the result is 0600 whatever was there.
fn create_private(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(context(e, "remove", path)),
        _ => {}
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| context(e, "create", path))
}

/// Makes the file at `path` (or the file a symbolic link there points to)
/// mode 0600 if anyone but its owner may read or write it. Returns the
/// mode it had when it had to be changed (the caller logs a warning), and
/// `None` when it was private already or does not exist.
pub fn make_private(path: &Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(context(e, "stat", path)),
    };
    if mode & 0o7077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| context(e, "make private (chmod 0600)", path))?;
    Ok(Some(mode))
}

/// The file beside the messages file where a running broker records the
/// ids of its IPC objects (`<messages file>.ipc`), so that the next run
/// can tell an orphaned semaphore set of its own (which carries no stamp)
/// from another program's.
pub fn ipc_ids_path(messages: &Path) -> PathBuf {
    with_suffix(messages, ".ipc")
}

/// The segment and semaphore set ids the previous run recorded, if the
/// file is there and well formed (anything else: none recorded).
pub fn load_ipc_ids(messages: &Path) -> Option<(i32, i32)> {
    let bytes = fs::read(ipc_ids_path(messages)).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let mut lines = text.lines();
    let shm = lines.next()?.strip_prefix("SHM_ID:")?.parse().ok()?;
    let sem = lines.next()?.strip_prefix("SEM_ID:")?.parse().ok()?;
    Some((shm, sem))
}

/// Records the ids of this run's IPC objects (atomically, 0600).
pub fn save_ipc_ids(disk: &Disk, messages: &Path, shm_id: i32, sem_id: i32) -> io::Result<()> {
    let text = format!("SHM_ID:{shm_id}\nSEM_ID:{sem_id}\n");
    replace_file(disk, &ipc_ids_path(messages), text.as_bytes())
}

/// Reads the offsets file, or the defaults if it does not exist.
pub fn load_offsets(messages: &Path, skip_bad: bool) -> io::Result<(Offsets, Vec<usize>)> {
    let path = offsets_path(messages);
    match fs::read(&path) {
        Ok(bytes) => Offsets::decode(&bytes, skip_bad).map_err(|reason| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {reason}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Offsets::default(), Vec::new())),
        Err(e) => Err(context(e, "read", &path)),
    }
}

/// Saves the offsets file atomically.
pub fn save_offsets(disk: &Disk, messages: &Path, offsets: &Offsets) -> io::Result<()> {
    replace_file(disk, &offsets_path(messages), &offsets.encode())
}

/// The messages file open for appending.
#[derive(Debug)]
pub struct MessageFile {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    disk: Disk,
    /// A failed write could not be cut back: bytes past `len` may be
    /// garbage, so nothing more is appended until a restart re-reads it.
    broken: bool,
}

impl MessageFile {
    /// Opens (creating, mode 0600) the file and cuts it to `valid_len`,
    /// dropping a torn tail that recovery reported.
    pub fn open(path: &Path, valid_len: u64, disk: Disk) -> io::Result<MessageFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| context(e, "open", path))?;
        let actual = file.metadata().map_err(|e| context(e, "stat", path))?.len();
        if actual != valid_len {
            disk.truncate(&file, valid_len)
                .map_err(|e| context(e, "truncate", path))?;
            disk.sync_all(&file)
                .map_err(|e| context(e, "fsync", path))?;
        }
        use std::io::Seek;
        let mut file = file;
        file.seek(io::SeekFrom::Start(valid_len))
            .map_err(|e| context(e, "seek", path))?;
        Ok(MessageFile {
            path: path.to_path_buf(),
            file: Arc::new(file),
            len: valid_len,
            disk,
            broken: false,
        })
    }

    /// Current length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file holds no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends whole records. On failure the file is cut back to where it
    /// was, so a half-written record never stays behind a live broker; if
    /// even that fails, the error says so (the caller must stop writing).
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other(format!(
                "{} could not be cut back after a failed write; restart the broker",
                self.path.display()
            )));
        }
        match self.disk.write_all(&self.file, bytes) {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(err) => {
                let err = context(err, "append to", &self.path);
                match self.cut_back(self.len) {
                    Ok(()) => Err(err),
                    Err(cut) => Err(io::Error::new(cut.kind(), format!("{err}; then {cut}"))),
                }
            }
        }
    }

    /// Cuts the file back to `len` bytes (after a failed write or fsync),
    /// so no record that was not acknowledged stays behind. The file
    /// offset follows, so the next append lands right after `len`.
    pub fn cut_back(&mut self, len: u64) -> io::Result<()> {
        use std::io::Seek;
        self.broken = true;
        self.disk
            .truncate(&self.file, len)
            .map_err(|e| context(e, "truncate", &self.path))?;
        self.broken = false;
        self.len = len;
        (&*self.file)
            .seek(io::SeekFrom::Start(len))
            .map(drop)
            .map_err(|e| context(e, "seek", &self.path))
    }

    /// The open file, for fsyncing without the lock that guards appends.
    pub fn sync_handle(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// The disk this file is written through.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Fsyncs the data (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        self.disk
            .sync_data(&self.file)
            .map_err(|e| context(e, "fsync", &self.path))
    }

    /// The content of record `id`, which starts at byte `offset` and is
    /// `len` bytes long: read back from the file and checked (the whole
    /// record parses, its id and length are those asked for). How the
    /// broker serves a message whose shared memory slot was overwritten.
    pub fn read_record_of_len(&self, offset: u64, id: u64, len: u64) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: record {id} is not at byte offset {offset}",
                    self.path.display()
                ),
            )
        };
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(bad());
        }
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| bad())?];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|e| context(e, "read", &self.path))?;
        match parse_record(&bytes, bytes.len()) {
            Parsed::Record {
                id: found,
                content,
                len: parsed,
                ..
            } if found == id && parsed == bytes.len() => Ok(bytes[content.0..content.1].to_vec()),
            _ => Err(bad()),
        }
    }

    /// Compaction: replaces the file with its bytes from `offset` on (the
    /// records still needed), copied from the file itself, never from the
    /// shared memory another process could have written. The copy goes to
    /// a temporary file, fsynced, renamed over, directory fsynced. The
    /// temporary file's own handle is kept and becomes the messages file,
    /// so nothing is reopened after the rename (a reopen that failed, on
    /// EMFILE say, would leave appends going to the unlinked old inode).
    /// On error before the rename, the old file stays in place and in use.
    pub fn compact_from(&mut self, offset: u64) -> io::Result<()> {
        let tmp = with_suffix(&self.path, ".tmp");
        let fresh = copy_to_new_file(&self.disk, &self.file, offset..self.len, &tmp)?;
        if let Err(err) = self.disk.rename(&tmp, &self.path) {
            let _ = fs::remove_file(&tmp);
            return Err(context(err, "rename over", &self.path));
        }
        // From here the new file is the messages file, whatever follows;
        // its offset is at its end already.
        self.file = Arc::new(fresh);
        self.len -= offset;
        sync_dir(&self.disk, &self.path)
    }
}

/// Creates `path` (0600) holding the bytes `range` of `source`, fsynced,
/// copied a block at a time; returns it open, its offset at its end.
fn copy_to_new_file(
    disk: &Disk,
    source: &File,
    range: std::ops::Range<u64>,
    path: &Path,
) -> io::Result<File> {
    use std::os::unix::fs::FileExt;
    let file = create_private(path)?;
    let mut block = vec![0u8; 64 * 1024];
    let mut at = range.start;
    let copied = (|| {
        while at < range.end {
            let n = block.len().min((range.end - at) as usize);
            source
                .read_exact_at(&mut block[..n], at)
                .map_err(|e| context(e, "read back", path))?;
            disk.write_all(&file, &block[..n])
                .map_err(|e| context(e, "write", path))?;
            at += n as u64;
        }
        disk.sync_all(&file).map_err(|e| context(e, "fsync", path))
    })();
    if let Err(err) = copied {
        let _ = fs::remove_file(path);
        return Err(err);
    }
    Ok(file)
}

/// `--repair`: keeps the first `valid_len` bytes of `path`, after saving
/// the whole original as `<path>.corrupt-<unix time>`. Returns that name.
pub fn repair(path: &Path, valid_len: u64, unix_time: u64) -> io::Result<PathBuf> {
    let saved = with_suffix(path, &format!(".corrupt-{unix_time}"));
    fs::copy(path, &saved).map_err(|e| context(e, "copy to", &saved))?;
    File::open(&saved)
        .and_then(|f| f.sync_all())
        .map_err(|e| context(e, "fsync", &saved))?;
    let mut prefix = Vec::with_capacity(valid_len as usize);
    File::open(path)
        .map_err(|e| context(e, "open", path))?
        .take(valid_len)
        .read_to_end(&mut prefix)
        .map_err(|e| context(e, "read", path))?;
    replace_file(&Disk::real(), path, &prefix)?;
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(count: u64) -> (Vec<u8>, Vec<Record>, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut records = Vec::new();
        let mut ends = Vec::new();
        for id in 1..=count {
            let content = format!("msg:{id}:{}", "x".repeat(id as usize % 5)).into_bytes();
            encode_record(&mut bytes, id, 1_700_000_000 + id, &content);
            assert_eq!(
                record_len(id, 1_700_000_000 + id, content.len()),
                (bytes.len() as u64) - ends.last().copied().unwrap_or(0)
            );
            ends.push(bytes.len() as u64);
            records.push(Record {
                id,
                timestamp: 1_700_000_000 + id,
                content,
            });
        }
        (bytes, records, ends)
    }

    fn scan_all(bytes: &[u8]) -> Scan {
        scan(bytes, 64, 0, usize::MAX).unwrap()
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let (bytes, records, _) = sample(20);
        let result = scan_all(&bytes);
        assert_eq!(result.tail, Tail::Clean);
        assert_eq!(Vec::from(result.kept), records);
        assert_eq!((result.first_id, result.last_id), (Some(1), Some(20)));
        assert_eq!(result.valid_len, bytes.len() as u64);
    }

    #[test]
    fn content_may_hold_colons_and_any_byte_but_newline() {
        let mut bytes = Vec::new();
        let content = b"a:b\r\x00\xff:".to_vec();
        encode_record(&mut bytes, 5, 1, &content);
        let result = scan_all(&bytes);
        assert_eq!(result.kept[0].content, content);
    }

    #[test]
    fn keeps_only_what_is_asked_and_bounds_it() {
        let (bytes, _, _) = sample(10);
        let result = scan(&bytes[..], 64, 7, 4).unwrap();
        assert_eq!(
            result.kept.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![7, 8, 9, 10]
        );
        // Past the limit the oldest kept records make way for newer ones.
        let result = scan(&bytes[..], 64, 2, 3).unwrap();
        assert_eq!(
            result.kept.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        assert_eq!(
            result.kept_max_size,
            result.kept.iter().map(|r| r.content.len()).max().unwrap()
        );
    }

    #[test]
    fn every_cut_yields_exactly_the_whole_records_before_it() {
        let (bytes, records, ends) = sample(12);
        for cut in 0..=bytes.len() {
            let whole = ends.iter().filter(|&&end| end <= cut as u64).count();
            let valid = if whole == 0 { 0 } else { ends[whole - 1] };
            for suffix in [&b""[..], &[0u8; 300][..]] {
                let mut input = bytes[..cut].to_vec();
                input.extend_from_slice(suffix);
                let result = scan_all(&input);
                assert_eq!(Vec::from(result.kept), records[..whole], "cut {cut}");
                assert_eq!(result.valid_len, valid, "cut {cut}");
                let rest = input.len() as u64 - valid;
                let want = if rest == 0 {
                    Tail::Clean
                } else {
                    Tail::Torn { bytes: rest }
                };
                assert_eq!(result.tail, want, "cut {cut} suffix {}", suffix.len());
            }
            // Garbage after the cut is damage at the first record it spoils.
            let mut input = bytes[..cut].to_vec();
            input.extend_from_slice(&[b'#'; 100]);
            let result = scan_all(&input);
            assert_eq!(Vec::from(result.kept), records[..whole], "cut {cut}");
            assert!(
                matches!(result.tail, Tail::Damaged { offset, .. } if offset == valid),
                "cut {cut}: {:?}",
                result.tail
            );
        }
    }

    #[test]
    fn a_flipped_byte_is_reported_at_its_record() {
        let (bytes, _, ends) = sample(12);
        let mut reported = 0;
        for at in 0..bytes.len() {
            for replacement in [b'#', b'\n', b'9'] {
                if bytes[at] == replacement {
                    continue;
                }
                let mut input = bytes.clone();
                input[at] = replacement;
                let result = scan_all(&input);
                // Never more records than there were, never a changed one
                // before the damage.
                assert!(result.kept.len() <= 12);
                if let Tail::Damaged { offset, .. } = result.tail {
                    // At the flipped record or, when the flip left it a
                    // valid record (an id digit), at the one after it.
                    let end_of_flipped = ends.iter().copied().find(|&end| end > at as u64).unwrap();
                    assert!(offset <= end_of_flipped, "at {at}: reported at {offset}");
                    assert!(ends.contains(&offset) || offset == 0);
                    reported += 1;
                }
            }
        }
        assert!(
            reported > bytes.len(),
            "most flips must be caught, got {reported}"
        );
    }

    #[test]
    fn repair_after_any_flip_keeps_exactly_the_valid_prefix_and_the_original() {
        let dir = std::env::temp_dir().join(format!("mq-store-flip-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("messages.dat");
        let (bytes, records, _) = sample(8);
        let mut repaired = 0;
        for at in 0..bytes.len() {
            let mut input = bytes.clone();
            input[at] = if input[at] == b'#' { b'*' } else { b'#' };
            let result = scan_all(&input);
            let Tail::Damaged { .. } = result.tail else {
                continue;
            };
            fs::write(&path, &input).unwrap();
            let saved = repair(&path, result.valid_len, at as u64).unwrap();
            // The original is kept byte for byte; the file is the prefix of
            // whole records before the damage, which read back unchanged.
            assert_eq!(fs::read(&saved).unwrap(), input, "flip at {at}");
            let kept = fs::read(&path).unwrap();
            assert_eq!(kept, input[..result.valid_len as usize], "flip at {at}");
            let again = scan_all(&kept);
            assert_eq!(again.tail, Tail::Clean, "flip at {at}");
            let count = again.kept.len();
            assert_eq!(Vec::from(again.kept), records[..count], "flip at {at}");
            fs::remove_file(&saved).unwrap();
            repaired += 1;
        }
        assert!(
            repaired > bytes.len() / 4,
            "only {repaired} flips were damage"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_power_cut_tail_is_told_from_damage_by_what_follows_and_what_was_durable() {
        let (bytes, _, ends) = sample(12);
        let mut noise = 0x2545_f491_4f6c_dd1d_u64;
        for cut in 0..=bytes.len() {
            let whole = ends.iter().filter(|&&end| end <= cut as u64).count() as u64;
            for garbage in 0..3 {
                let mut input = bytes[..cut].to_vec();
                for _ in 0..(garbage * 50 + 1) {
                    noise ^= noise << 13;
                    noise ^= noise >> 7;
                    noise ^= noise << 17;
                    // Random bytes, a '#' first so the tail is never all zeros.
                    input.push(if input.len() == cut {
                        b'#'
                    } else {
                        noise as u8
                    });
                }
                let result = scan_all(&input);
                if !matches!(result.tail, Tail::Damaged { .. }) {
                    continue;
                }
                assert!(!result.records_after_damage, "cut {cut}");
                // Random bytes may by chance complete the cut record (the
                // format has no checksum), never lose a whole one.
                let last = result.last_id.unwrap_or(0);
                assert!(last >= whole, "cut {cut}");
                // Durable up to the last record kept: a power cut's tail.
                assert!(power_cut_tail(&result, last + 1, 0), "cut {cut}");
                // The offsets counted one more record as stored: damage.
                assert!(!power_cut_tail(&result, last + 2, 0), "cut {cut}");
            }
        }
        // Garbage in the middle, records after it: damage, however durable.
        let mut input = bytes[..ends[3] as usize].to_vec();
        input.extend_from_slice(b"#garbage\n");
        input.extend_from_slice(&bytes[ends[4] as usize..]);
        let result = scan_all(&input);
        assert!(matches!(result.tail, Tail::Damaged { offset, .. } if offset == ends[3]));
        assert!(result.records_after_damage);
        assert!(!power_cut_tail(&result, 0, 0));
        // A record whose id skips ahead is damage with a record after it.
        let mut input = bytes[..ends[3] as usize].to_vec();
        input.extend_from_slice(&bytes[ends[5] as usize..]);
        assert!(scan_all(&input).records_after_damage);
        // Nothing valid at all, and the offsets need nothing before id 5.
        let result = scan_all(b"\x01\x02garbage");
        assert!(power_cut_tail(&result, 5, 5));
        assert!(!power_cut_tail(&result, 6, 5));
    }

    #[test]
    fn ids_must_follow_each_other() {
        let mut bytes = Vec::new();
        encode_record(&mut bytes, 3, 1, b"a");
        let second = bytes.len() as u64;
        encode_record(&mut bytes, 5, 1, b"b");
        let result = scan_all(&bytes);
        assert_eq!(result.kept.len(), 1);
        assert!(matches!(result.tail, Tail::Damaged { offset, .. } if offset == second));
    }

    #[test]
    fn offsets_round_trip_and_reject_bad_lines() {
        let offsets = Offsets {
            next_id: 42,
            next_consumer: 7,
            head: 30,
            capacity: 1000,
            consumers: vec![
                SavedCursor {
                    id: b"a".to_vec(),
                    offset: 31,
                    ack: false,
                },
                SavedCursor {
                    id: b"x.y-z_1".to_vec(),
                    offset: 41,
                    ack: true,
                },
            ],
        };
        let bytes = offsets.encode();
        assert_eq!(Offsets::decode(&bytes, false).unwrap().0, offsets);
        assert_eq!(Offsets::decode(b"", false).unwrap().0, Offsets::default());
        let mut bad = bytes.clone();
        bad.extend_from_slice(b"CONSUMER:a b:1\n");
        assert!(Offsets::decode(&bad, false).unwrap_err().contains("line 7"));
        let (repaired, skipped) = Offsets::decode(&bad, true).unwrap();
        assert_eq!((repaired, skipped), (offsets, vec![7]));
    }

    #[test]
    fn files_append_rewrite_and_repair() {
        let dir = std::env::temp_dir().join(format!("mq-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("messages.dat");
        let (bytes, _, ends) = sample(6);
        let mut file = MessageFile::open(&path, 0, Disk::real()).unwrap();
        file.append(&bytes).unwrap();
        file.sync().unwrap();
        assert_eq!(file.len(), bytes.len() as u64);
        file.compact_from(ends[3]).unwrap();
        let on_disk = fs::read(&path).unwrap();
        assert_eq!(on_disk, bytes[ends[3] as usize..]);
        file.append(b"").unwrap();

        // Damage in the middle, then repair keeps the prefix and the original.
        let mut damaged = bytes.clone();
        damaged[ends[2] as usize] = b'#';
        fs::write(&path, &damaged).unwrap();
        let result = scan(File::open(&path).unwrap(), 64, 0, 100).unwrap();
        assert!(matches!(result.tail, Tail::Damaged { offset, .. } if offset == ends[2]));
        let saved = repair(&path, result.valid_len, 1234).unwrap();
        assert_eq!(fs::read(&saved).unwrap(), damaged);
        assert_eq!(fs::read(&path).unwrap(), bytes[..ends[2] as usize]);

        let offsets = Offsets {
            next_id: 9,
            ..Offsets::default()
        };
        save_offsets(&Disk::real(), &path, &offsets).unwrap();
        assert_eq!(load_offsets(&path, false).unwrap().0, offsets);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn fault_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mq-fault-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_failed_offsets_save_leaves_the_old_file() {
        use crate::disk::{DiskOp, FaultPlan};
        let dir = fault_dir("offsets");
        let path = dir.join("messages.dat");
        let old = Offsets {
            next_id: 5,
            ..Offsets::default()
        };
        save_offsets(&Disk::real(), &path, &old).unwrap();
        let new = Offsets {
            next_id: 9,
            ..Offsets::default()
        };
        // Every call of the save: the file's write, its fsync, the rename.
        for (op, nth) in [(DiskOp::Write, 1), (DiskOp::Fsync, 1), (DiskOp::Rename, 1)] {
            let plan = FaultPlan::new();
            plan.fail(op, nth, 1);
            let err = save_offsets(&Disk::with_faults(plan), &path, &new).unwrap_err();
            assert!(err.to_string().contains("injected"), "{op:?}: {err}");
            assert_eq!(load_offsets(&path, false).unwrap().0, old, "{op:?}");
            assert!(
                !with_suffix(&offsets_path(&path), ".tmp").exists(),
                "{op:?}"
            );
        }
        // The directory's fsync fails after the rename: the new file is in
        // place, and the error is still reported (the caller retries).
        let plan = FaultPlan::new();
        plan.fail(DiskOp::Fsync, 2, 1);
        assert!(save_offsets(&Disk::with_faults(plan), &path, &new).is_err());
        assert_eq!(load_offsets(&path, false).unwrap().0, new);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_append_is_cut_back_or_reported() {
        use crate::disk::{DiskOp, FaultPlan};
        let dir = fault_dir("append");
        let path = dir.join("messages.dat");
        let plan = FaultPlan::new();
        let mut file = MessageFile::open(&path, 0, Disk::with_faults(plan.clone())).unwrap();
        file.append(b"1:1:1:a\n").unwrap();
        plan.fail(DiskOp::Write, 1, 1);
        assert!(file.append(b"2:1:1:b\n").is_err());
        assert_eq!(file.len(), 8);
        file.append(b"2:1:1:c\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"1:1:1:a\n2:1:1:c\n");
        // Neither the write nor the cut back works: the error says both.
        plan.fail(DiskOp::Write, 1, 1);
        plan.fail(DiskOp::Truncate, 1, 1);
        let err = file.append(b"3:1:1:d\n").unwrap_err().to_string();
        assert!(err.contains("append") && err.contains("truncate"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_keeps_the_old_file_until_the_rename_and_the_new_after() {
        use crate::disk::{DiskOp, FaultPlan};
        let dir = fault_dir("rewrite");
        let path = dir.join("messages.dat");
        let (bytes, _, ends) = sample(6);
        let plan = FaultPlan::new();
        let mut file = MessageFile::open(&path, 0, Disk::with_faults(plan.clone())).unwrap();
        file.append(&bytes[..ends[4] as usize]).unwrap();
        for (op, nth) in [(DiskOp::Write, 1), (DiskOp::Fsync, 1), (DiskOp::Rename, 1)] {
            plan.fail(op, nth, 1);
            assert!(file.compact_from(ends[2]).is_err(), "{op:?}");
            assert_eq!(
                fs::read(&path).unwrap(),
                bytes[..ends[4] as usize],
                "{op:?}"
            );
            assert!(!with_suffix(&path, ".tmp").exists(), "{op:?}");
        }
        // Past the rename (the directory's fsync fails): the new file is
        // the one appended to, never the unlinked old inode.
        plan.fail(DiskOp::Fsync, 2, 1);
        assert!(file.compact_from(ends[2]).is_err());
        file.append(&bytes[ends[4] as usize..]).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes[ends[2] as usize..]);
        assert_eq!(file.len(), bytes.len() as u64 - ends[2]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
