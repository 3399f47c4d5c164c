//! The messages on disk as a log of segment files (issue 9, "the log is
//! the queue"): appends go to the last segment, reads from any id are
//! served through a sparse in-memory index, and consumed segments are
//! deleted whole, so freeing space never rewrites live data and needs no
//! new space.
//!
//! Files: beside the messages file `M`, segments named `M.<first id as 20
//! zero-padded digits>` (so `ls` sorts them by id), mode 0600, holding
//! records in the original format `MSG_ID:TIMESTAMP:SIZE:CONTENT\n`
//! ([`store::encode_record`]). A messages file of the single-file version
//! is carried over on first open by renaming it to its segment name.
//!
//! Invariants: ids are consecutive inside a segment and across segments
//! (a segment's name is the id after its predecessor's last, also for an
//! empty segment); only the last segment (the active one) is ever written,
//! truncated or left unsynced; a record of a batch is never split over two
//! files; the active segment is never deleted, so the next id always has a
//! file that proves it while any segment exists. Memory is bounded whatever
//! the backlog: per segment a few words and one index entry per
//! [`INDEX_EVERY_RECORDS`] records or [`INDEX_EVERY_BYTES`] bytes; reads
//! and scans hold one chunk plus one record. Every write, fsync, rename,
//! truncate and unlink goes through [`Disk`], so tests can make each fail.
//!
//! Deliberately not here: cursors, the offsets file, the ring, limits on
//! the backlog (`--capacity`, `--max-bytes`) and the decision of what to
//! delete: the caller says up to which id records are no longer needed.
//! No locking: the caller holds the log behind its own lock. Sealed
//! segments are opened per read rather than kept open, so the number of
//! descriptors does not grow with the backlog.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::disk::Disk;
use crate::store::{self, MAX_SIZE_DIGITS, MAX_TIMESTAMP, Record, Tail};
use crate::text::parse_u64;

/// Default size a segment may reach before the next write rolls to a new
/// one: large enough that a 1 GiB backlog is 16 files, small enough that
/// "live records plus two segments" stays close to the live records.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// An index entry at least every this many records...
pub const INDEX_EVERY_RECORDS: u64 = 4096;
/// ...or every this many bytes, whichever comes first. Kafka's `.index`
/// keeps one per 4 KiB; ours is coarser because it only bounds the walk
/// from an entry to the id wanted (at most this many records or bytes of
/// headers, read in 64 KiB chunks), and it must stay small in memory.
pub const INDEX_EVERY_BYTES: u64 = 1024 * 1024;
/// Bytes read at a time by scans and reads.
const READ_CHUNK: usize = 64 * 1024;
/// Digits of a segment's name after the messages file's.
const NAME_DIGITS: usize = 20;
/// The longest header `ID:TIMESTAMP:SIZE:` can be.
const MAX_HEADER: usize = 20 + 1 + 20 + 1 + MAX_SIZE_DIGITS + 1;

/// An error of the segment log.
#[derive(Debug)]
pub enum SegmentError {
    /// A call of the OS failed: what was being done, to which file.
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The files hold something that is not the log: where and why. Open
    /// stops on it; [`repair`] keeps what comes before it.
    Damaged {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A read from an id the log does not hold (deleted, or not yet sent).
    OutOfRange {
        id: u64,
        first_id: u64,
        next_id: u64,
    },
    /// `append` was given bytes that are not `count` whole records from
    /// `first_id` (a programmer error of the caller; nothing was written).
    BadBatch { first_id: u64, reason: String },
    /// A failed write could not be cut back: bytes past the last record
    /// may be garbage, so nothing more is written until the log is opened
    /// again (which cuts them as a torn tail).
    Broken { path: PathBuf },
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentError::Io { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
            SegmentError::Damaged {
                path,
                offset,
                reason,
            } => write!(f, "{}: damaged at byte {offset}: {reason}", path.display()),
            SegmentError::OutOfRange {
                id,
                first_id,
                next_id,
            } if first_id == next_id => write!(
                f,
                "message id {id} is not in the log (it is empty, the next id is {next_id})"
            ),
            SegmentError::OutOfRange {
                id,
                first_id,
                next_id,
            } => write!(
                f,
                "message id {id} is not in the log (it holds {first_id} to {})",
                next_id - 1
            ),
            SegmentError::BadBatch { first_id, reason } => {
                write!(f, "batch from message id {first_id}: {reason}")
            }
            SegmentError::Broken { path } => write!(
                f,
                "{} could not be cut back after a failed write; open the log again",
                path.display()
            ),
        }
    }
}

impl std::error::Error for SegmentError {}

impl From<SegmentError> for io::Error {
    fn from(err: SegmentError) -> io::Error {
        let kind = match &err {
            SegmentError::Io { source, .. } => source.kind(),
            SegmentError::Damaged { .. } => io::ErrorKind::InvalidData,
            SegmentError::OutOfRange { .. } | SegmentError::BadBatch { .. } => {
                io::ErrorKind::InvalidInput
            }
            SegmentError::Broken { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, err.to_string())
    }
}

fn io_error<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> SegmentError + 'p {
    move |source| SegmentError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn damaged(path: &Path, offset: u64, reason: impl Into<String>) -> SegmentError {
    SegmentError::Damaged {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// The file of the segment whose first record is `first_id`.
pub fn segment_path(messages_path: &Path, first_id: u64) -> PathBuf {
    let mut name = messages_path.as_os_str().to_owned();
    name.push(format!(".{first_id:0NAME_DIGITS$}"));
    PathBuf::from(name)
}

/// The segment files beside `messages_path`, by first id (for callers
/// that check their modes before the log is opened).
pub fn segment_files(messages_path: &Path) -> Result<Vec<PathBuf>, SegmentError> {
    let found = list_segments(messages_path, &parent_dir(messages_path))?;
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// The first id a segment's file name says, if `name` is one of the
/// segments of the messages file named `base` (anything else beside it,
/// `.offsets`, `.lock`, `.corrupt-…`, is not).
pub fn segment_id(base: &[u8], name: &[u8]) -> Option<u64> {
    let digits = name.strip_prefix(base)?.strip_prefix(b".")?;
    if digits.len() != NAME_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    parse_u64(digits).filter(|&id| id > 0)
}

/// One entry of a sparse index: record `id` starts at byte `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: u64,
    pub offset: u64,
}

/// A segment's sparse index: its first record, then one record per
/// [`INDEX_EVERY_RECORDS`] records or [`INDEX_EVERY_BYTES`] bytes. Pure:
/// it is told where records are and answers where to start looking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SparseIndex {
    entries: Vec<IndexEntry>,
}

impl SparseIndex {
    /// Notes that record `id` starts at `offset` (records are noted in
    /// order); keeps it when it is far enough from the last entry.
    pub fn note(&mut self, id: u64, offset: u64) {
        match self.entries.last() {
            Some(last)
                if id - last.id < INDEX_EVERY_RECORDS
                    && offset - last.offset < INDEX_EVERY_BYTES => {}
            _ => self.entries.push(IndexEntry { id, offset }),
        }
    }

    /// The last entry at or before `id`: where a walk to `id` starts.
    pub fn seek(&self, id: u64) -> Option<IndexEntry> {
        let after = self.entries.partition_point(|e| e.id <= id);
        after.checked_sub(1).map(|i| self.entries[i])
    }

    /// Forgets the entries of records from `id` on (after a cut back).
    pub fn forget_from(&mut self, id: u64) {
        let keep = self.entries.partition_point(|e| e.id < id);
        self.entries.truncate(keep);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A record's header at the start of `buf`.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    /// `ID:TIMESTAMP:SIZE:` parsed; `len` is its length in bytes.
    Whole {
        id: u64,
        timestamp: u64,
        size: usize,
        len: usize,
    },
    /// The bytes end before the header does.
    Short,
    /// Not a header.
    Bad,
}

impl Header {
    fn parse(buf: &[u8]) -> Header {
        let mut fields = [0u64; 3];
        let mut pos = 0;
        for (field, max_digits) in fields.iter_mut().zip([20, 20, MAX_SIZE_DIGITS]) {
            let start = pos;
            loop {
                match buf.get(pos) {
                    None => return Header::Short,
                    Some(b':') if pos > start => break,
                    Some(b) if b.is_ascii_digit() && pos - start < max_digits => pos += 1,
                    Some(_) => return Header::Bad,
                }
            }
            match parse_u64(&buf[start..pos]) {
                Some(value) => *field = value,
                None => return Header::Bad,
            }
            pos += 1;
        }
        Header::Whole {
            id: fields[0],
            timestamp: fields[1],
            size: fields[2] as usize,
            len: pos,
        }
    }
}

/// Where one record lies at the start of a buffer, and its fields.
#[derive(Debug, PartialEq, Eq)]
struct Place {
    id: u64,
    timestamp: u64,
    content: std::ops::Range<usize>,
    len: usize,
}

/// One record checked at the start of `buf` as [`store::scan`] checks it
/// (ids in order are the caller's check): `Ok(None)` when `buf` ends
/// first, `Err(reason)` when it is not a record.
fn check_record(buf: &[u8], max_msg_size: usize) -> Result<Option<Place>, &'static str> {
    let (id, timestamp, size, header) = match Header::parse(buf) {
        Header::Whole {
            id,
            timestamp,
            size,
            len,
        } => (id, timestamp, size, len),
        Header::Short => return Ok(None),
        Header::Bad => return Err("not a record header"),
    };
    if id == 0 || size == 0 || size > max_msg_size || timestamp >= MAX_TIMESTAMP {
        return Err("message id, size or timestamp out of range");
    }
    let end = header + size;
    match buf.get(end) {
        None => Ok(None),
        Some(b'\n') if !buf[header..end].contains(&b'\n') => Ok(Some(Place {
            id,
            timestamp,
            content: header..end,
            len: end + 1,
        })),
        Some(_) => Err("no newline where SIZE says the record ends"),
    }
}

/// Reads a file through one buffer: at most a chunk or one record.
struct Window<'f> {
    file: &'f File,
    /// Bytes of the file that may be read (a segment's valid length).
    end: u64,
    /// File offset of `buf[0]`.
    at: u64,
    buf: Vec<u8>,
    /// Bytes the next read asks for at least; doubles after each read, up
    /// to [`READ_CHUNK`].
    chunk: usize,
}

impl<'f> Window<'f> {
    /// A window for scans: reads of [`READ_CHUNK`].
    fn new(file: &'f File, end: u64) -> Window<'f> {
        Window::sized(file, end, READ_CHUNK)
    }

    /// A window whose first read is `first_read` bytes (at least 4 KiB),
    /// for a read of a few records: a `GET` batch of 16 small messages
    /// then copies a few KiB out of the page cache, not 64.
    fn sized(file: &'f File, end: u64, first_read: usize) -> Window<'f> {
        Window {
            file,
            end,
            at: 0,
            buf: Vec::new(),
            chunk: first_read.clamp(4096, READ_CHUNK),
        }
    }

    /// The bytes from `offset` on, at least `want` of them unless the end
    /// comes first.
    fn get(&mut self, offset: u64, want: usize) -> io::Result<&[u8]> {
        let want_end = offset.saturating_add(want as u64).min(self.end);
        let have_end = self.at + self.buf.len() as u64;
        if offset < self.at || want_end > have_end {
            let n = (self.end.saturating_sub(offset)).min(want.max(self.chunk) as u64);
            self.buf.resize(n as usize, 0);
            self.file.read_exact_at(&mut self.buf, offset)?;
            self.at = offset;
            self.chunk = (self.chunk * 2).min(READ_CHUNK);
        }
        let start = ((offset - self.at) as usize).min(self.buf.len());
        Ok(&self.buf[start..])
    }
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    first_id: u64,
    /// The id after its last record (`first_id` when it holds none).
    next_id: u64,
    len: u64,
    index: SparseIndex,
}

/// What opening the log did that the caller should log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The single messages file of the earlier version was carried over.
    pub upgraded: Option<Upgrade>,
    /// A torn tail was cut from the last segment.
    pub torn: Option<TornTail>,
    /// Bytes after the last valid record of the last segment, with no
    /// valid record after them, were cut as what a power cut leaves (see
    /// [`SegmentLog::open_after`]).
    pub power_cut: Option<TornTail>,
}

/// What the offsets file says is durable, for the power-cut rule of
/// [`store::power_cut_tail`]: its NEXT_ID is never ahead of fsynced
/// records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    pub next_id: u64,
}

/// The carry-over of a messages file of the single-file version.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub from: PathBuf,
    /// Its new name; `None` when it held no record and was removed.
    pub to: Option<PathBuf>,
}

/// A torn tail cut from the last segment: `bytes` bytes from `offset`.
#[derive(Debug, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: u64,
}

/// What [`SegmentLog::delete_before`] freed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Freed {
    pub segments: usize,
    pub bytes: u64,
}

/// How many leading segments (their `next_id`s in order) hold only records
/// before `id`: never the last one, which is the active segment.
fn deletable(next_ids: impl ExactSizeIterator<Item = u64>, id: u64) -> usize {
    let sealed = next_ids.len().saturating_sub(1);
    next_ids.take(sealed).take_while(|&next| next <= id).count()
}

/// Whether a batch of `batch_len` bytes must go to a new segment: when the
/// active one holds something and would grow past `segment_bytes`. An
/// empty active segment takes any batch whole, so a batch larger than a
/// segment is never split and never loops.
fn needs_roll(active_len: Option<u64>, batch_len: u64, segment_bytes: u64) -> bool {
    match active_len {
        None => true,
        Some(0) => false,
        Some(len) => len.saturating_add(batch_len) > segment_bytes,
    }
}

/// What a read may still deliver.
struct Budget {
    records_left: usize,
    bytes_left: u64,
    delivered: usize,
}

/// The directory that holds `path`.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fsyncs `dir`, so a create, rename or unlink in it is durable.
fn sync_dir(disk: &Disk, dir: &Path) -> Result<(), SegmentError> {
    File::open(dir)
        .and_then(|d| disk.sync_all(&d))
        .map_err(io_error("fsync directory", dir))
}

/// The segments beside `messages_path`, by first id.
fn list_segments(messages_path: &Path, dir: &Path) -> Result<Vec<(u64, PathBuf)>, SegmentError> {
    let Some(base) = messages_path.file_name() else {
        return Err(io_error("name segments after", messages_path)(
            io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        ));
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        if let Some(id) = segment_id(base.as_bytes(), entry.file_name().as_bytes()) {
            found.push((id, segment_path(messages_path, id)));
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The id of the first record of a single-file messages file: `None` when
/// it holds no whole record, only a torn one or zeros (which the
/// single-file version cut as a torn tail too). Damage before any record
/// is an error; damage after one is found again under the segment's name.
fn first_record_id(path: &Path, max_msg_size: usize) -> Result<Option<u64>, SegmentError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    let mut window = Window::new(&file, len);
    let head = window
        .get(0, MAX_HEADER + max_msg_size + 1)
        .map_err(io_error("read", path))?;
    if let Ok(Some(place)) = check_record(head, max_msg_size) {
        return Ok(Some(place.id));
    }
    let scan = store::scan(&file, max_msg_size, u64::MAX, 0).map_err(|err| match err {
        store::ScanError::Io(source) => io_error("read", path)(source),
    })?;
    match (scan.first_id, scan.tail) {
        (Some(id), _) => Ok(Some(id)),
        (None, Tail::Damaged { offset, reason }) => Err(damaged(path, offset, reason)),
        (None, _) => Ok(None),
    }
}

/// Upgrade: carries a messages file of the single-file version over as the
/// first segment (renamed to its first record's segment name), or removes
/// it when it holds no record, then fsyncs the directory. With segments
/// already there, a messages file too is an error: which is the truth is
/// not for this module to guess.
fn carry_over(
    messages_path: &Path,
    dir: &Path,
    disk: &Disk,
    have_segments: bool,
    max_msg_size: usize,
) -> Result<Option<Upgrade>, SegmentError> {
    let meta = match fs::symlink_metadata(messages_path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("stat", messages_path)(e)),
    };
    if !meta.is_file() {
        return Err(damaged(messages_path, 0, "not a regular file"));
    }
    if have_segments {
        return Err(damaged(
            messages_path,
            0,
            "a messages file of the single-file version and segment files are both there; \
             move one of them aside",
        ));
    }
    let to = match first_record_id(messages_path, max_msg_size)? {
        None => {
            disk.remove(messages_path)
                .map_err(io_error("remove", messages_path))?;
            None
        }
        Some(id) => {
            let to = segment_path(messages_path, id);
            disk.rename(messages_path, &to)
                .map_err(io_error("rename", messages_path))?;
            Some(to)
        }
    };
    sync_dir(disk, dir)?;
    Ok(Some(Upgrade {
        from: messages_path.to_path_buf(),
        to,
    }))
}

/// What a scan of one segment must show at open: a clean end (or a torn
/// tail, on the last segment only, which open cuts) and a first record
/// whose id is the one the file's name says.
fn check_scanned(
    path: &Path,
    first_id: u64,
    last: bool,
    scan: &store::Scan,
) -> Result<(), SegmentError> {
    match &scan.tail {
        Tail::Clean => {}
        Tail::Torn { .. } if last => {}
        Tail::Torn { bytes } => {
            let reason =
                format!("{bytes} bytes of a torn record in a segment that is not the last");
            return Err(damaged(path, scan.valid_len, reason));
        }
        Tail::Damaged { offset, reason } => return Err(damaged(path, *offset, reason.clone())),
    }
    match scan.first_id {
        Some(id) if id != first_id => {
            let reason =
                format!("the first record is message id {id}, the file's name says {first_id}");
            Err(damaged(path, 0, reason))
        }
        _ => Ok(()),
    }
}

/// Whether the damage a scan of the last segment found is what a power
/// cut leaves (see [`SegmentLog::open_after`]): the first record's id must
/// still be the one the name says.
fn power_cut(scan: &store::Scan, first_id: u64, durable: Option<Durable>) -> bool {
    let Some(durable) = durable else {
        return false;
    };
    let named_right = scan.first_id.is_none_or(|id| id == first_id);
    named_right && store::power_cut_tail(scan, durable.next_id, first_id)
}

/// Builds the sparse index of the first `valid_len` bytes of a segment,
/// which [`store::scan`] has checked: only the headers are read again.
fn build_index(
    file: &File,
    path: &Path,
    valid_len: u64,
    first_id: u64,
) -> Result<SparseIndex, SegmentError> {
    let mut index = SparseIndex::default();
    let mut window = Window::new(file, valid_len);
    let (mut offset, mut id) = (0u64, first_id);
    while offset < valid_len {
        let bytes = window
            .get(offset, MAX_HEADER)
            .map_err(io_error("read", path))?;
        match Header::parse(bytes) {
            Header::Whole {
                id: got, size, len, ..
            } if got == id => {
                index.note(id, offset);
                offset += (len + size + 1) as u64;
                id += 1;
            }
            _ => return Err(damaged(path, offset, "changed while it was being opened")),
        }
    }
    Ok(index)
}

/// The messages on disk as segment files; see the module's header.
#[derive(Debug)]
pub struct SegmentLog {
    messages_path: PathBuf,
    dir: PathBuf,
    disk: Disk,
    segment_bytes: u64,
    max_msg_size: usize,
    /// Oldest first; the last one is the active segment.
    segments: VecDeque<Segment>,
    /// The active segment, open for appending (`None` with no segment).
    active: Option<Arc<File>>,
    next_id: u64,
    total_bytes: u64,
    /// Appends to the active segment since its last fdatasync.
    dirty: bool,
    /// A segment was created whose name may not be durable yet (a roll
    /// whose directory fsync failed and whose undo failed too).
    dir_dirty: bool,
    /// A failed write could not be cut back.
    broken: bool,
    /// Where the last read ended: (its segment's first id, the next
    /// record's id and offset), so a sequential reader does not walk from
    /// an index entry every time.
    read_hint: std::cell::Cell<Option<(u64, IndexEntry)>>,
}

impl SegmentLog {
    /// Opens the log of `messages_path`: carries a single-file messages
    /// file over (see [`OpenReport::upgraded`]), scans every segment with
    /// [`store::scan`], checks that ids follow across segments, builds the
    /// sparse indexes and cuts a torn tail of the last segment (reported in
    /// [`OpenReport::torn`]). Damage anywhere else, a torn tail of another
    /// segment included, is [`SegmentError::Damaged`], naming the file and
    /// byte (see [`repair`]). With no segment, the next id is 1 until
    /// [`SegmentLog::start_at`] says otherwise.
    pub fn open(
        messages_path: &Path,
        disk: Disk,
        segment_bytes: u64,
        max_msg_size: usize,
    ) -> Result<(SegmentLog, OpenReport), SegmentError> {
        SegmentLog::open_after(messages_path, disk, segment_bytes, max_msg_size, None)
    }

    /// [`Self::open`], with the power-cut rule for the last segment when
    /// `durable` is given: damage past its last valid record with no
    /// valid record after it is cut like a torn tail (reported in
    /// [`OpenReport::power_cut`]) when the records kept reach
    /// `durable.next_id - 1`, since nothing after them was ever
    /// acknowledged under `always` or covered by a saved offset.
    pub fn open_after(
        messages_path: &Path,
        disk: Disk,
        segment_bytes: u64,
        max_msg_size: usize,
        durable: Option<Durable>,
    ) -> Result<(SegmentLog, OpenReport), SegmentError> {
        assert!(segment_bytes > 0 && max_msg_size > 0, "limits must be set");
        let dir = parent_dir(messages_path);
        let mut report = OpenReport::default();
        let mut found = list_segments(messages_path, &dir)?;
        report.upgraded = carry_over(messages_path, &dir, &disk, !found.is_empty(), max_msg_size)?;
        if report.upgraded.is_some() {
            found = list_segments(messages_path, &dir)?;
        }
        let mut log = SegmentLog {
            messages_path: messages_path.to_path_buf(),
            dir,
            disk,
            segment_bytes,
            max_msg_size,
            segments: VecDeque::with_capacity(found.len()),
            active: None,
            next_id: 1,
            total_bytes: 0,
            dirty: false,
            dir_dirty: false,
            broken: false,
            read_hint: std::cell::Cell::new(None),
        };
        let count = found.len();
        for (i, (first_id, path)) in found.into_iter().enumerate() {
            let last = (i + 1 == count).then_some(durable);
            log.add_scanned(path, first_id, last, &mut report)?;
        }
        Ok((log, report))
    }

    /// Scans one segment found at open and adds it after the others.
    /// `last` is `Some` for the last segment, with what is durable.
    fn add_scanned(
        &mut self,
        path: PathBuf,
        first_id: u64,
        last: Option<Option<Durable>>,
        report: &mut OpenReport,
    ) -> Result<(), SegmentError> {
        let (durable, last) = (last.flatten(), last.is_some());
        if !self.segments.is_empty() && first_id != self.next_id {
            return Err(damaged(
                &path,
                0,
                format!(
                    "the segment starts at message id {first_id}, the one before it ends \
                     before id {} (a segment is missing or misnamed)",
                    self.next_id
                ),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .append(last)
            .open(&path)
            .map_err(io_error("open", &path))?;
        let scan = store::scan(&file, self.max_msg_size, u64::MAX, 0).map_err(|err| match err {
            store::ScanError::Io(source) => io_error("read", &path)(source),
        })?;
        let valid_len = scan.valid_len;
        let power_cut = last && power_cut(&scan, first_id, durable);
        if !power_cut {
            check_scanned(&path, first_id, last, &scan)?;
        }
        let index = build_index(&file, &path, valid_len, first_id)?;
        if power_cut {
            let len = file.metadata().map_err(io_error("stat", &path))?.len();
            report.power_cut =
                Some(self.cut_tail(&file, &path, valid_len, len.saturating_sub(valid_len))?);
        }
        if let Tail::Torn { bytes } = scan.tail {
            report.torn = Some(self.cut_tail(&file, &path, valid_len, bytes)?);
        }
        self.next_id = scan.last_id.map_or(first_id, |id| id + 1);
        self.total_bytes += valid_len;
        if last {
            self.active = Some(Arc::new(file));
        }
        self.segments.push_back(Segment {
            path,
            first_id,
            next_id: self.next_id,
            len: valid_len,
            index,
        });
        Ok(())
    }

    /// The id of the oldest record held (`next_id()` when none is).
    pub fn first_id(&self) -> u64 {
        self.segments
            .iter()
            .find(|s| s.next_id > s.first_id)
            .map_or(self.next_id, |s| s.first_id)
    }

    /// The id the next appended record must carry.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Record bytes in every segment.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Entries in every segment's sparse index (what the index costs is
    /// 16 bytes each).
    pub fn index_entries(&self) -> usize {
        self.segments.iter().map(|s| s.index.len()).sum()
    }

    /// The active segment's file, for fdatasyncs outside the caller's
    /// lock (group commit); a roll makes a new one.
    pub fn active_handle(&self) -> Option<Arc<File>> {
        self.active.clone()
    }

    /// The first id of the active segment (the next id with no segment).
    pub fn active_first_id(&self) -> u64 {
        self.segments.back().map_or(self.next_id, |s| s.first_id)
    }

    /// The fault seam the log writes through.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Bytes a new segment may grow to.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// The segment files, oldest first.
    pub fn segment_paths(&self) -> impl Iterator<Item = &Path> {
        self.segments.iter().map(|s| s.path.as_path())
    }

    /// With no segment at all (a new log, or an upgraded empty file), sets
    /// the id the first append carries: the offsets file's `NEXT_ID`, so
    /// that ids are never reused. With segments, their names are the truth
    /// and this is refused.
    pub fn start_at(&mut self, next_id: u64) -> Result<(), SegmentError> {
        if !self.segments.is_empty() || next_id == 0 {
            return Err(SegmentError::BadBatch {
                first_id: next_id,
                reason: format!("cannot start there, the next id is {}", self.next_id),
            });
        }
        self.next_id = next_id;
        Ok(())
    }
}

/// Writing: append, roll, sync, cut back, delete.
impl SegmentLog {
    /// Appends `count` whole records (bytes of [`store::encode_record`])
    /// whose ids run from `first_id`, which must be [`SegmentLog::next_id`].
    /// The batch is checked before it is written. It goes whole to the
    /// active segment, or to a new one when the active segment would grow
    /// past `segment_bytes` (the old one is fdatasynced first). On a failed
    /// write the segment is cut back to its last record; if even that
    /// fails, the log refuses writes ([`SegmentError::Broken`]). An error
    /// that names an fsync is the roll's fdatasync of the sealed segment:
    /// the records before this batch may not be durable, as after a failed
    /// [`Self::sync`].
    pub fn append(
        &mut self,
        records: &[u8],
        first_id: u64,
        count: u64,
    ) -> Result<(), SegmentError> {
        if self.broken {
            return Err(SegmentError::Broken {
                path: self
                    .segments
                    .back()
                    .map(|s| s.path.clone())
                    .unwrap_or_default(),
            });
        }
        self.check_batch(records, first_id, count)?;
        let active_len = self.segments.back().map(|s| s.len);
        if needs_roll(active_len, records.len() as u64, self.segment_bytes) {
            self.roll(first_id)?;
        }
        self.write(records, first_id, count)
    }

    /// Checks a batch as a scan at open will check it, so that nothing
    /// written now is found damaged later.
    fn check_batch(&self, records: &[u8], first_id: u64, count: u64) -> Result<(), SegmentError> {
        let bad = |reason: String| Err(SegmentError::BadBatch { first_id, reason });
        if first_id != self.next_id {
            return bad(format!("the next id is {}", self.next_id));
        }
        let (mut at, mut id) = (0usize, first_id);
        while at < records.len() {
            match check_record(&records[at..], self.max_msg_size) {
                Ok(Some(place)) if place.id == id => {
                    at += place.len;
                    id += 1;
                }
                Ok(Some(place)) => return bad(format!("record {} where {id} was due", place.id)),
                Ok(None) => return bad(format!("the bytes end inside record {id}")),
                Err(reason) => return bad(format!("byte {at}: {reason}")),
            }
        }
        if count == 0 || id - first_id != count {
            return bad(format!("{} records, not {count}", id - first_id));
        }
        Ok(())
    }

    /// Creates the segment that starts at `first_id` and makes it the
    /// active one. The segment it seals is fdatasynced first and never
    /// again, so one fdatasync of the active segment covers every record.
    /// On failure the old active segment stays the active one.
    fn roll(&mut self, first_id: u64) -> Result<(), SegmentError> {
        self.sync()?;
        let path = segment_path(&self.messages_path, first_id);
        // create_new: a file of that name that the log does not know is
        // not the log's to overwrite.
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("create", &path))?;
        let segment = Segment {
            path,
            first_id,
            next_id: first_id,
            len: 0,
            index: SparseIndex::default(),
        };
        if let Err(err) = sync_dir(&self.disk, &self.dir) {
            // Its name might not survive a crash, so nothing is written in
            // it. If it cannot be removed either, it stays as the empty
            // active segment (a valid log), its directory synced later.
            if self.disk.remove(&segment.path).is_err() {
                self.dir_dirty = true;
                self.segments.push_back(segment);
                self.active = Some(Arc::new(file));
            }
            return Err(err);
        }
        self.segments.push_back(segment);
        self.active = Some(Arc::new(file));
        Ok(())
    }

    /// Writes a checked batch at the end of the active segment.
    fn write(&mut self, records: &[u8], first_id: u64, count: u64) -> Result<(), SegmentError> {
        let (Some(file), Some(segment)) = (&self.active, self.segments.back_mut()) else {
            unreachable!("append rolls to a segment before it writes");
        };
        if let Err(err) = self.disk.write_all(file, records) {
            // The file is opened for appending: once cut back, the next
            // write lands right after the last whole record.
            return match self.disk.truncate(file, segment.len) {
                Ok(()) => Err(io_error("append to", &segment.path)(err)),
                Err(cut) => {
                    self.broken = true;
                    let both = format!("{err}; then the cut back failed: {cut}");
                    Err(io_error("append to", &segment.path)(io::Error::new(
                        cut.kind(),
                        both,
                    )))
                }
            };
        }
        let (mut at, mut id) = (0usize, first_id);
        while let Header::Whole { size, len, .. } = Header::parse(&records[at..]) {
            segment.index.note(id, segment.len + at as u64);
            at += len + size + 1;
            id += 1;
            if at >= records.len() {
                break;
            }
        }
        debug_assert_eq!(id - first_id, count, "checked by check_batch");
        segment.len += records.len() as u64;
        segment.next_id = first_id + count;
        self.next_id = first_id + count;
        self.total_bytes += records.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Removes every segment, the active one too, and starts the log
    /// empty at `next_id`: for a `--repair` that lost records after every
    /// kept one was consumed, so ids may jump past the lost ones. The
    /// caller has `next_id` on disk already (the offsets file's NEXT_ID),
    /// so ids are never reused.
    pub fn reset_to(&mut self, next_id: u64) -> Result<Freed, SegmentError> {
        let mut freed = Freed::default();
        while let Some(segment) = self.segments.front() {
            match self.disk.remove(&segment.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &segment.path)(e)),
            }
            freed.segments += 1;
            freed.bytes += segment.len;
            self.total_bytes -= segment.len;
            self.segments.pop_front();
        }
        self.active = None;
        self.dirty = false;
        self.read_hint.set(None);
        sync_dir(&self.disk, &self.dir)?;
        self.start_at(next_id)?;
        Ok(freed)
    }

    /// Seals the active segment if it holds records, starting an empty
    /// one at the next id, so that the sealed one can be deleted once
    /// consumed. For a disk (or a file size limit) that the active segment
    /// alone fills: creating an empty file needs no data blocks. Returns
    /// whether a new segment was started.
    pub fn roll_now(&mut self) -> Result<bool, SegmentError> {
        if self.broken || self.segments.back().is_none_or(|s| s.len == 0) {
            return Ok(false);
        }
        self.roll(self.next_id)?;
        Ok(true)
    }

    /// Fdatasyncs the active segment if anything was appended since its
    /// last one (a roll synced every segment before it). After a failure
    /// the records since the last good sync must be taken as lost
    /// (PostgreSQL's fsyncgate): the caller cuts them ([`Self::cut_back`]),
    /// it does not retry and believe the second answer.
    pub fn sync(&mut self) -> Result<(), SegmentError> {
        if self.dir_dirty {
            sync_dir(&self.disk, &self.dir)?;
            self.dir_dirty = false;
        }
        if let (true, Some(file), Some(segment)) = (self.dirty, &self.active, self.segments.back())
        {
            self.disk
                .sync_data(file)
                .map_err(io_error("fsync", &segment.path))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Cuts the records from `next_id` on (they must all be in the active
    /// segment: the unsynced ones always are), after a failed write or
    /// fsync, so that no record that was refused stays behind.
    pub fn cut_back(&mut self, next_id: u64) -> Result<(), SegmentError> {
        let out_of_range = SegmentError::OutOfRange {
            id: next_id,
            first_id: self.segments.back().map_or(self.next_id, |s| s.first_id),
            next_id: self.next_id,
        };
        let (Some(file), Some(segment)) = (&self.active, self.segments.back()) else {
            return if next_id == self.next_id {
                Ok(())
            } else {
                Err(out_of_range)
            };
        };
        if next_id < segment.first_id || next_id > self.next_id {
            return Err(out_of_range);
        }
        if next_id == self.next_id {
            return Ok(());
        }
        let offset = offset_of(file, segment, next_id)?;
        self.read_hint.set(None);
        // Until the truncate is done, refused records may still be there:
        // if it fails, nothing more is appended after them.
        self.broken = true;
        self.disk
            .truncate(file, offset)
            .map_err(io_error("truncate", &segment.path))?;
        self.broken = false;
        let segment = self.segments.back_mut().expect("checked above");
        self.total_bytes -= segment.len - offset;
        segment.len = offset;
        segment.next_id = next_id;
        segment.index.forget_from(next_id);
        self.next_id = next_id;
        Ok(())
    }

    /// `delete_before(id + 1)`.
    pub fn delete_through(&mut self, id: u64) -> Result<Freed, SegmentError> {
        self.delete_before(id.saturating_add(1))
    }

    /// Deletes the segments every record of which is before `id`, oldest
    /// first, never the active one, then fsyncs the directory. Unlinking
    /// needs no new space, so this works on a full disk. On a failure the
    /// segments already removed are gone from the log too (compare
    /// [`Self::total_bytes`]) and the error names the one that was not.
    pub fn delete_before(&mut self, id: u64) -> Result<Freed, SegmentError> {
        let count = deletable(self.segments.iter().map(|s| s.next_id), id);
        let mut freed = Freed::default();
        let mut failed = None;
        for _ in 0..count {
            let segment = &self.segments[0];
            match self.disk.remove(&segment.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed = Some(io_error("remove", &segment.path)(e));
                    break;
                }
            }
            freed.segments += 1;
            freed.bytes += segment.len;
            self.total_bytes -= segment.len;
            self.segments.pop_front();
        }
        let synced = match freed.segments {
            0 => Ok(()),
            _ => sync_dir(&self.disk, &self.dir),
        };
        match failed {
            Some(err) => Err(err),
            None => synced.map(|()| freed),
        }
    }
}

/// The bytes of the record at `offset` (at most `whole`): the header
/// first, then exactly the record, so the window is refilled a chunk at a
/// time, not once per record.
fn record_at<'w>(window: &'w mut Window<'_>, offset: u64, whole: usize) -> io::Result<&'w [u8]> {
    let want = match Header::parse(window.get(offset, MAX_HEADER)?) {
        Header::Whole { size, len, .. } => (len + size + 1).min(whole),
        _ => MAX_HEADER,
    };
    window.get(offset, want)
}

/// Where record `id` of `segment` starts, walking the headers from the
/// index entry before it.
fn offset_of(file: &File, segment: &Segment, id: u64) -> Result<u64, SegmentError> {
    let entry = segment.index.seek(id).unwrap_or(IndexEntry {
        id: segment.first_id,
        offset: 0,
    });
    let mut window = Window::new(file, segment.len);
    let (mut offset, mut at_id) = (entry.offset, entry.id);
    while at_id < id {
        let bytes = window
            .get(offset, MAX_HEADER)
            .map_err(io_error("read", &segment.path))?;
        let Header::Whole { size, len, .. } = Header::parse(bytes) else {
            return Err(damaged(&segment.path, offset, "not a record header"));
        };
        offset += (len + size + 1) as u64;
        at_id += 1;
    }
    Ok(offset)
}

/// Reading.
impl SegmentLog {
    /// The records from `from_id` on, in order, across segments: at most
    /// `max_records`, and at most `max_bytes` bytes of records on disk
    /// (but always one, if any is there, so a reader always moves on).
    /// `from_id == next_id()` is an empty answer (caught up); an id before
    /// [`Self::first_id`] (deleted) or after the next is
    /// [`SegmentError::OutOfRange`].
    pub fn read(
        &self,
        from_id: u64,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, SegmentError> {
        let mut out = Vec::new();
        self.read_each(from_id, max_records, max_bytes, |id, timestamp, content| {
            out.push(Record {
                id,
                timestamp,
                content: content.to_vec(),
            })
        })?;
        Ok(out)
    }

    /// [`Self::read`] without copies: `each(id, timestamp, content)` for
    /// every record, in order. Returns the id after the last one given.
    /// Every record is checked again as it is read back.
    pub fn read_each(
        &self,
        from_id: u64,
        max_records: usize,
        max_bytes: u64,
        mut each: impl FnMut(u64, u64, &[u8]),
    ) -> Result<u64, SegmentError> {
        if from_id < self.first_id() || from_id > self.next_id {
            return Err(SegmentError::OutOfRange {
                id: from_id,
                first_id: self.first_id(),
                next_id: self.next_id,
            });
        }
        let mut budget = Budget {
            records_left: max_records,
            bytes_left: max_bytes,
            delivered: 0,
        };
        let mut id = from_id;
        // The last segment whose first id is at or before `from_id` holds
        // it (empty segments share their successor's first id).
        let mut k = self.segments.partition_point(|s| s.first_id <= from_id);
        k = k.saturating_sub(1);
        while k < self.segments.len() && id < self.next_id && budget.records_left > 0 {
            let last = k + 1 == self.segments.len();
            if self.read_segment(k, last, &mut id, &mut budget, &mut each)? {
                break;
            }
            k += 1;
        }
        Ok(id)
    }

    /// Reads from segment `k` what `id` and the budget allow; true when the
    /// budget is spent.
    fn read_segment(
        &self,
        k: usize,
        last: bool,
        id: &mut u64,
        budget: &mut Budget,
        each: &mut impl FnMut(u64, u64, &[u8]),
    ) -> Result<bool, SegmentError> {
        let segment = &self.segments[k];
        if *id >= segment.next_id {
            return Ok(false);
        }
        let opened;
        let file = match (&self.active, last) {
            (Some(file), true) => &**file,
            _ => {
                opened = File::open(&segment.path).map_err(io_error("open", &segment.path))?;
                &opened
            }
        };
        let mut at = segment.index.seek(*id).unwrap_or(IndexEntry {
            id: segment.first_id,
            offset: 0,
        });
        // A reader that goes on where the last read ended (a consumer
        // catching up) starts there, not at the index entry before it.
        if let Some((first, hint)) = self.read_hint.get()
            && first == segment.first_id
            && at.id <= hint.id
            && hint.id <= *id
            && hint.offset <= segment.len
        {
            at = hint;
        }
        // About 128 bytes a record to start with; a window that runs
        // short reads on in doubling chunks.
        let first_read = budget.records_left.saturating_mul(128);
        let mut window = Window::sized(file, segment.len, first_read);
        let (mut offset, mut at_id) = (at.offset, at.id);
        let whole = MAX_HEADER + self.max_msg_size + 1;
        let mut spent = false;
        while at_id < segment.next_id {
            let bytes =
                record_at(&mut window, offset, whole).map_err(io_error("read", &segment.path))?;
            let place = match check_record(bytes, self.max_msg_size) {
                Ok(Some(place)) if place.id == at_id => place,
                Ok(Some(place)) => {
                    let reason = format!("message id {} where {at_id} was due", place.id);
                    return Err(damaged(&segment.path, offset, reason));
                }
                Ok(None) => return Err(damaged(&segment.path, offset, "ends inside a record")),
                Err(reason) => return Err(damaged(&segment.path, offset, reason)),
            };
            if at_id >= *id {
                if budget.delivered > 0 && place.len as u64 > budget.bytes_left {
                    spent = true;
                    break;
                }
                each(at_id, place.timestamp, &bytes[place.content.clone()]);
                budget.delivered += 1;
                budget.records_left -= 1;
                budget.bytes_left = budget.bytes_left.saturating_sub(place.len as u64);
                *id = at_id + 1;
            }
            offset += place.len as u64;
            at_id += 1;
            if budget.records_left == 0 {
                spent = true;
                break;
            }
        }
        let hint = IndexEntry { id: at_id, offset };
        self.read_hint.set(Some((segment.first_id, hint)));
        Ok(spent)
    }
}

/// `--repair` for the segment log: when [`SegmentLog::open`] finds damage,
/// keeps every record before it and moves the rest aside, never deleting
/// a byte. The damaged segment is saved whole as
/// `<segment>.corrupt-<unix_time>` and cut to its valid records
/// ([`store::repair`]; when none is valid it is only renamed so); every
/// later segment is renamed `<segment>.corrupt-<unix_time>` (its records
/// follow the damage, and ids must follow each other). A damaged messages
/// file of the single-file version is repaired as before and carried over
/// by the next open. Returns the files saved aside (none when nothing was
/// damaged); the caller logs them and opens the log.
pub fn repair(
    messages_path: &Path,
    max_msg_size: usize,
    unix_time: u64,
) -> Result<Vec<PathBuf>, SegmentError> {
    let (path, offset, reason) =
        match SegmentLog::open(messages_path, Disk::real(), u64::MAX, max_msg_size) {
            Ok(_) => return Ok(Vec::new()),
            Err(SegmentError::Damaged {
                path,
                offset,
                reason,
            }) => (path, offset, reason),
            Err(other) => return Err(other),
        };
    let aside = |p: &Path| -> PathBuf {
        let mut name = p.as_os_str().to_owned();
        name.push(format!(".corrupt-{unix_time}"));
        PathBuf::from(name)
    };
    let dir = parent_dir(messages_path);
    let damaged_id = path.file_name().and_then(|name| {
        let base = messages_path.file_name()?;
        segment_id(base.as_bytes(), name.as_bytes())
    });
    // An old messages file beside segments: which is the truth is the
    // operator's call, not a repair's.
    if damaged_id.is_none() && !list_segments(messages_path, &dir)?.is_empty() {
        return Err(SegmentError::Damaged {
            path,
            offset,
            reason,
        });
    }
    let mut saved = Vec::new();
    if offset > 0 || damaged_id.is_none() {
        saved.push(store::repair(&path, offset, unix_time).map_err(io_error("repair", &path))?);
    } else {
        fs::rename(&path, aside(&path)).map_err(io_error("rename", &path))?;
        saved.push(aside(&path));
    }
    if let Some(damaged_id) = damaged_id {
        for (id, later) in list_segments(messages_path, &dir)? {
            if id > damaged_id {
                fs::rename(&later, aside(&later)).map_err(io_error("rename", &later))?;
                saved.push(aside(&later));
            }
        }
    }
    sync_dir(&Disk::real(), &dir)?;
    Ok(saved)
}

impl SegmentLog {
    /// Cuts `file` back to `valid_len` (a torn or power-cut tail of
    /// `bytes` bytes) and fsyncs the cut, reporting what went.
    fn cut_tail(
        &self,
        file: &File,
        path: &Path,
        valid_len: u64,
        bytes: u64,
    ) -> Result<TornTail, SegmentError> {
        self.disk
            .truncate(file, valid_len)
            .map_err(io_error("truncate", path))?;
        self.disk.sync_data(file).map_err(io_error("fsync", path))?;
        Ok(TornTail {
            path: path.to_path_buf(),
            offset: valid_len,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskOp, FaultPlan};
    use std::os::unix::fs::PermissionsExt;

    const MAX: usize = 64;

    /// A directory of its own per test, removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("mq-segments-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn messages(&self) -> PathBuf {
            self.0.join("messages.dat")
        }

        /// The names in the directory, sorted as `ls` sorts them.
        fn names(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn expected(id: u64) -> Record {
        Record {
            id,
            timestamp: 1_700_000_000 + id,
            content: format!("m{id}:{}", "x".repeat((id % 13) as usize)).into_bytes(),
        }
    }

    /// The bytes of records `first..first + count`.
    fn encoded(first: u64, count: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for id in first..first + count {
            let r = expected(id);
            store::encode_record(&mut out, r.id, r.timestamp, &r.content);
        }
        out
    }

    fn open(path: &Path, segment_bytes: u64) -> (SegmentLog, OpenReport) {
        SegmentLog::open(path, Disk::real(), segment_bytes, MAX).unwrap()
    }

    fn open_err(path: &Path) -> SegmentError {
        SegmentLog::open(path, Disk::real(), 100, MAX).unwrap_err()
    }

    /// Appends batches of 1 to 4 records until the next id is `next`.
    fn fill(log: &mut SegmentLog, next: u64) {
        while log.next_id() < next {
            let first = log.next_id();
            let count = (first % 4 + 1).min(next - first);
            log.append(&encoded(first, count), first, count).unwrap();
        }
    }

    /// Every record from `from` on, read `step` at a time, must be the
    /// records appended, in order, with no gap and no duplicate.
    fn check_reads_from(log: &SegmentLog, from: u64, step: usize) {
        let mut id = from;
        while id < log.next_id() {
            let got = log.read(id, step, u64::MAX).unwrap();
            assert!(!got.is_empty() && got.len() <= step, "from {id}");
            for record in got {
                assert_eq!(record, expected(id), "read from {from} by {step}");
                id += 1;
            }
        }
        assert_eq!(id, log.next_id());
        assert!(log.read(id, step, u64::MAX).unwrap().is_empty());
    }

    fn damage_at(err: SegmentError) -> (String, u64, String) {
        match err {
            SegmentError::Damaged {
                path,
                offset,
                reason,
            } => (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                offset,
                reason,
            ),
            other => panic!("not damage: {other}"),
        }
    }

    fn name(id: u64) -> String {
        format!("messages.dat.{id:020}")
    }

    #[test]
    fn names_and_pure_decisions() {
        assert_eq!(
            segment_path(Path::new("d/messages.dat"), 1),
            Path::new("d/messages.dat.00000000000000000001")
        );
        let base = b"messages.dat";
        assert_eq!(
            segment_id(base, b"messages.dat.00000000000000000042"),
            Some(42)
        );
        for not_ours in [
            &b"messages.dat"[..],
            b"messages.dat.offsets",
            b"messages.dat.0000000000000000004",
            b"messages.dat.000000000000000000042",
            b"messages.dat.00000000000000000000",
            b"messages.dat.99999999999999999999",
            b"messages.dat.00000000000000000042.corrupt-1",
            b"other.dat.00000000000000000042",
        ] {
            assert_eq!(
                segment_id(base, not_ours),
                None,
                "{}",
                String::from_utf8_lossy(not_ours)
            );
        }
        // No segment: create one. An empty one takes any batch whole.
        assert!(needs_roll(None, 1, 100));
        assert!(!needs_roll(Some(0), 1000, 100));
        assert!(!needs_roll(Some(60), 40, 100));
        assert!(needs_roll(Some(60), 41, 100));
        // The last segment is never deletable.
        assert_eq!(deletable([5, 9, 12].into_iter(), 100), 2);
        assert_eq!(deletable([5, 9, 12].into_iter(), 9), 2);
        assert_eq!(deletable([5, 9, 12].into_iter(), 8), 1);
        assert_eq!(deletable([5, 9, 12].into_iter(), 4), 0);
        assert_eq!(deletable([5].into_iter(), 100), 0);
        assert_eq!(deletable([].into_iter(), 100), 0);
    }

    #[test]
    fn the_sparse_index_keeps_one_entry_per_many_records_and_seeks_before() {
        let mut index = SparseIndex::default();
        for i in 0..10_000u64 {
            index.note(100 + i, i * 10);
        }
        // By count (10 bytes a record never reaches the byte bound).
        assert_eq!(
            index.len(),
            10_000usize.div_ceil(INDEX_EVERY_RECORDS as usize)
        );
        assert_eq!(index.seek(99), None);
        assert_eq!(index.seek(100), Some(IndexEntry { id: 100, offset: 0 }));
        let second = 100 + INDEX_EVERY_RECORDS;
        assert_eq!(index.seek(second - 1).unwrap().id, 100);
        assert_eq!(
            index.seek(second).unwrap(),
            IndexEntry {
                id: second,
                offset: INDEX_EVERY_RECORDS * 10
            }
        );
        index.forget_from(second);
        assert_eq!(index.len(), 1);
        // By bytes: records of half the byte bound give an entry every other.
        let mut index = SparseIndex::default();
        for i in 0..10 {
            index.note(1 + i, i * INDEX_EVERY_BYTES / 2);
        }
        assert_eq!(index.len(), 5);
    }

    #[test]
    fn ten_million_records_of_100_bytes_cost_well_under_a_megabyte_of_index() {
        // The index alone, as appends build it: one entry per 4096 records.
        let mut index = SparseIndex::default();
        let mut offset = 0;
        for id in 1..=10_000_000u64 {
            index.note(id, offset);
            offset += record_len_of(id, 100);
        }
        let bytes = index.len() * std::mem::size_of::<IndexEntry>();
        assert!(bytes < 100 * 1024, "{} entries, {bytes} bytes", index.len());
    }

    fn record_len_of(id: u64, size: usize) -> u64 {
        store::record_len(id, 1_700_000_000 + id, size)
    }

    #[test]
    fn a_million_records_on_disk_keep_a_small_index_and_read_anywhere() {
        let dir = TempDir::new("million");
        let (mut log, _) = open(&dir.messages(), 4 * 1024 * 1024);
        let per_batch = 1000;
        for first in (1..=1_000_000u64).step_by(per_batch as usize) {
            log.append(&encoded(first, per_batch), first, per_batch)
                .unwrap();
        }
        log.sync().unwrap();
        let entries = log.index_entries();
        // 1,000,000 / 4096 by count, plus one per segment begun.
        assert!(
            entries <= 1_000_000 / 4096 + 2 * log.segment_count(),
            "{entries}"
        );
        let (again, _) = open(&dir.messages(), 4 * 1024 * 1024);
        assert_eq!(
            again.index_entries(),
            entries,
            "the scan rebuilds the same index"
        );
        for from in [1, 2, 4095, 4096, 4097, 500_000, 999_999, 1_000_000] {
            let got = again.read(from, 3, u64::MAX).unwrap();
            let want: Vec<Record> = (from..(from + 3).min(1_000_001)).map(expected).collect();
            assert_eq!(got, want, "from {from}");
        }
    }

    #[test]
    fn rolls_over_at_a_tiny_size_without_splitting_a_batch() {
        let dir = TempDir::new("roll");
        let (mut log, report) = open(&dir.messages(), 100);
        assert_eq!(report, OpenReport::default());
        assert_eq!(
            (log.segment_count(), log.first_id(), log.next_id()),
            (0, 1, 1)
        );
        fill(&mut log, 301);
        log.sync().unwrap();
        let mut all = Vec::new();
        let mut next = 1;
        // `ls` order is id order; each file starts right after the last.
        for name in dir.names() {
            let path = dir.0.join(&name);
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let bytes = fs::read(&path).unwrap();
            let scan = store::scan(&bytes[..], MAX, 0, usize::MAX).unwrap();
            assert_eq!(scan.tail, Tail::Clean, "{name}");
            assert_eq!(name, super::tests::name(next));
            assert_eq!(scan.first_id, Some(next));
            // Past the size only when one batch of up to 4 records is all
            // it holds.
            assert!(bytes.len() <= 100 || scan.kept.len() <= 4, "{name}");
            next = scan.last_id.unwrap() + 1;
            all.extend_from_slice(&bytes);
        }
        assert_eq!(next, 301);
        assert_eq!(
            all,
            encoded(1, 300),
            "the files hold the appends byte for byte"
        );
        assert_eq!(log.total_bytes(), all.len() as u64);
        assert_eq!(log.segment_count(), dir.names().len());
        // A batch larger than a segment goes whole into a fresh one.
        let big = encoded(301, 20);
        assert!(big.len() > 100);
        log.append(&big, 301, 20).unwrap();
        assert_eq!(fs::read(segment_path(&dir.messages(), 301)).unwrap(), big);
        log.append(&encoded(321, 1), 321, 1).unwrap();
        assert!(segment_path(&dir.messages(), 321).exists());
    }

    #[test]
    fn reads_from_every_id_across_boundaries_before_and_after_a_reopen() {
        let dir = TempDir::new("read");
        let (mut log, _) = open(&dir.messages(), 150);
        fill(&mut log, 120);
        assert!(log.segment_count() > 10);
        for from in 1..=log.next_id() {
            for step in [1, 3, 1000] {
                check_reads_from(&log, from, step);
            }
        }
        let (again, _) = open(&dir.messages(), 150);
        assert_eq!((again.first_id(), again.next_id()), (1, 120));
        assert_eq!(again.total_bytes(), log.total_bytes());
        let indexes = |l: &SegmentLog| {
            l.segments
                .iter()
                .map(|s| s.index.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(indexes(&again), indexes(&log));
        for from in 1..=again.next_id() {
            check_reads_from(&again, from, 7);
        }
        // Bytes bound the answer, but one record always comes.
        let one = again.read(5, 100, 1).unwrap();
        assert_eq!(one, [expected(5)]);
        let len = |id| record_len_of(id, expected(id).content.len());
        let two = again.read(5, 100, len(5) + len(6)).unwrap();
        assert_eq!(two, [expected(5), expected(6)]);
        let mut seen = Vec::new();
        let next = again
            .read_each(118, 10, u64::MAX, |id, _, content| {
                seen.push((id, content.to_vec()))
            })
            .unwrap();
        assert_eq!(next, 120);
        assert_eq!(
            seen,
            [(118, expected(118).content), (119, expected(119).content)]
        );
    }

    #[test]
    fn reads_out_of_range_say_so() {
        let dir = TempDir::new("range");
        let (mut log, _) = open(&dir.messages(), 100);
        assert!(
            log.read(1, 10, u64::MAX).unwrap().is_empty(),
            "empty log, caught up"
        );
        let err = log.read(2, 10, u64::MAX).unwrap_err();
        assert!(
            err.to_string().contains("it is empty, the next id is 1"),
            "{err}"
        );
        fill(&mut log, 40);
        assert!(log.read(40, 10, u64::MAX).unwrap().is_empty());
        assert!(log.read(1, 0, u64::MAX).unwrap().is_empty());
        for id in [0, 41, u64::MAX] {
            let err = log.read(id, 10, u64::MAX).unwrap_err();
            assert!(
                matches!(err, SegmentError::OutOfRange { .. }),
                "{id}: {err}"
            );
        }
        log.delete_before(20).unwrap();
        let first = log.first_id();
        assert!(first > 1 && first <= 20);
        let err = log.read(first - 1, 10, u64::MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "message id {} is not in the log (it holds {first} to 39)",
                first - 1
            )
        );
        check_reads_from(&log, first, 5);
    }

    #[test]
    fn deletes_whole_consumed_segments_never_the_active_one() {
        let dir = TempDir::new("delete");
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 200);
        let count = log.segment_count();
        let sizes: Vec<(u64, u64, u64)> = log
            .segments
            .iter()
            .map(|s| (s.first_id, s.next_id, s.len))
            .collect();
        // Nothing before the end of the first segment: nothing deleted.
        let (_, first_next, _) = sizes[0];
        assert_eq!(log.delete_before(first_next - 1).unwrap(), Freed::default());
        assert_eq!(
            log.delete_through(first_next - 1).unwrap(),
            Freed {
                segments: 1,
                bytes: sizes[0].2
            }
        );
        assert!(!segment_path(&dir.messages(), 1).exists());
        assert_eq!(log.first_id(), first_next);
        // Everything: all but the active segment.
        let before = log.total_bytes();
        let freed = log.delete_through(u64::MAX).unwrap();
        assert_eq!(freed.segments, count - 2);
        assert_eq!(
            freed.bytes,
            sizes[1..count - 1].iter().map(|s| s.2).sum::<u64>()
        );
        assert_eq!(log.total_bytes(), before - freed.bytes);
        assert_eq!(log.segment_count(), 1);
        assert_eq!(dir.names(), [name(sizes[count - 1].0)]);
        assert_eq!(log.first_id(), sizes[count - 1].0);
        check_reads_from(&log, log.first_id(), 2);
        fill(&mut log, 220);
        let (again, _) = open(&dir.messages(), 100);
        assert_eq!(
            (again.first_id(), again.next_id()),
            (sizes[count - 1].0, 220)
        );
        check_reads_from(&again, again.first_id(), 3);
    }

    /// A log of records 1 to 56, synced and closed, then `extra` appended
    /// to its last segment by hand; that segment's path and its length
    /// before `extra`.
    fn fifty_six_records_then(dir: &TempDir, extra: &[u8]) -> (PathBuf, u64) {
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 57);
        log.sync().unwrap();
        let last = log.segments.back().unwrap().path.clone();
        let len = fs::metadata(&last).unwrap().len();
        let mut file = OpenOptions::new().append(true).open(&last).unwrap();
        io::Write::write_all(&mut file, extra).unwrap();
        (last, len)
    }

    #[test]
    fn a_torn_tail_of_the_last_segment_is_cut_and_reported() {
        for tail in [
            &b"57:17000"[..],
            b"57:1700000057:9:m57:xx",
            &[0u8; 300],
            b"57:1700000057:5:m57:x\x00\x00",
        ] {
            let dir = TempDir::new("torn");
            let (last, len) = fifty_six_records_then(&dir, tail);
            let (mut again, report) = open(&dir.messages(), 100);
            assert_eq!(
                report.torn,
                Some(TornTail {
                    path: last.clone(),
                    offset: len,
                    bytes: tail.len() as u64
                }),
                "{tail:?}"
            );
            assert_eq!(fs::metadata(&last).unwrap().len(), len);
            assert_eq!(again.next_id(), 57);
            fill(&mut again, 70);
            let (third, report) = open(&dir.messages(), 100);
            assert_eq!(report.torn, None);
            check_reads_from(&third, 1, 4);
        }
    }

    #[test]
    fn a_power_cut_tail_of_the_last_segment_is_cut_only_when_durable_records_are_kept() {
        // Garbage after record 56 (a stale block), no valid record after it.
        let garbage = b"#!garbage of a stale block\n\x01\x02";
        let dir = TempDir::new("power-cut");
        let (last, len) = fifty_six_records_then(&dir, garbage);
        // Without what is durable, or when the offsets count a record that
        // is gone (NEXT_ID 58), it is damage, and nothing is changed.
        let plain = open_err(&dir.messages());
        assert_eq!(damage_at(plain).1, len);
        let ahead = Some(Durable { next_id: 58 });
        let err = SegmentLog::open_after(&dir.messages(), Disk::real(), 100, MAX, ahead);
        assert!(matches!(err, Err(SegmentError::Damaged { .. })));
        assert_eq!(
            fs::metadata(&last).unwrap().len(),
            len + garbage.len() as u64
        );
        // The kept records reach NEXT_ID - 1: a power cut's, cut and reported.
        let durable = Some(Durable { next_id: 57 });
        let (mut again, report) =
            SegmentLog::open_after(&dir.messages(), Disk::real(), 100, MAX, durable).unwrap();
        assert_eq!(
            report.power_cut,
            Some(TornTail {
                path: last.clone(),
                offset: len,
                bytes: garbage.len() as u64
            })
        );
        assert_eq!(
            (again.next_id(), fs::metadata(&last).unwrap().len()),
            (57, len)
        );
        fill(&mut again, 70);
        check_reads_from(&open(&dir.messages(), 100).0, 1, 5);
    }

    #[test]
    fn a_last_segment_of_only_a_torn_record_becomes_empty_and_names_the_next_id() {
        let dir = TempDir::new("torn-only");
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 30);
        let count = log.segment_count();
        drop(log);
        // A crash after a roll created the file and wrote part of a record.
        let torn_path = segment_path(&dir.messages(), 30);
        fs::write(&torn_path, b"30:17000").unwrap();
        let (mut log, report) = open(&dir.messages(), 100);
        assert_eq!(report.torn.unwrap().bytes, 8);
        assert_eq!((log.segment_count(), log.next_id()), (count + 1, 30));
        assert_eq!(fs::metadata(&torn_path).unwrap().len(), 0);
        // The empty segment takes the next batch, however large.
        log.append(&encoded(30, 10), 30, 10).unwrap();
        assert_eq!(fs::read(&torn_path).unwrap(), encoded(30, 10));
        consistent(&dir, &log);
    }

    #[test]
    fn a_torn_or_garbage_tail_of_a_middle_segment_is_damage() {
        for (tail, reason) in [
            (&b"9999:17"[..], "torn record"),
            (b"####", "not a record"),
            (b"99:1:1:a\n", "does not follow"),
        ] {
            let dir = TempDir::new("middle");
            let (mut log, _) = open(&dir.messages(), 100);
            fill(&mut log, 60);
            let middle = &log.segments[2];
            let (path, len) = (middle.path.clone(), middle.len);
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            io::Write::write_all(&mut file, tail).unwrap();
            let (file_name, offset, why) = damage_at(open_err(&dir.messages()));
            assert_eq!(file_name, path.file_name().unwrap().to_string_lossy());
            assert_eq!(offset, len, "{why}");
            assert!(why.contains(reason) || reason == "not a record", "{why}");
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                len + tail.len() as u64,
                "left as it was"
            );
        }
        // Garbage in the middle of the last segment is damage too.
        let dir = TempDir::new("last-garbage");
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 30);
        let last = log.segments.back().unwrap().path.clone();
        let mut bytes = fs::read(&last).unwrap();
        bytes[0] = b'#';
        fs::write(&last, &bytes).unwrap();
        assert_eq!(damage_at(open_err(&dir.messages())).1, 0);
    }

    #[test]
    fn a_missing_or_misnamed_segment_is_damage() {
        let dir = TempDir::new("gap");
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 60);
        let paths: Vec<PathBuf> = log.segment_paths().map(Path::to_path_buf).collect();
        drop(log);
        fs::remove_file(&paths[2]).unwrap();
        let (file_name, offset, why) = damage_at(open_err(&dir.messages()));
        assert_eq!(
            (file_name.as_str(), offset),
            (paths[3].file_name().unwrap().to_str().unwrap(), 0)
        );
        assert!(why.contains("missing"), "{why}");
        // A segment whose name is not its first record's id.
        let dir = TempDir::new("misnamed");
        fs::write(segment_path(&dir.messages(), 5), encoded(6, 3)).unwrap();
        let (_, offset, why) = damage_at(open_err(&dir.messages()));
        assert_eq!(offset, 0);
        assert!(why.contains("the file's name says 5"), "{why}");
    }

    #[test]
    fn an_old_single_file_is_carried_over_once() {
        let dir = TempDir::new("upgrade");
        let old = encoded(50, 31);
        fs::write(dir.messages(), &old).unwrap();
        fs::write(store::offsets_path(&dir.messages()), b"NEXT_ID:81\n").unwrap();
        let (mut log, report) = open(&dir.messages(), 100);
        let to = segment_path(&dir.messages(), 50);
        assert_eq!(
            report.upgraded,
            Some(Upgrade {
                from: dir.messages(),
                to: Some(to.clone())
            })
        );
        assert!(!dir.messages().exists());
        assert_eq!(
            fs::read(&to).unwrap(),
            old,
            "the same bytes under the new name"
        );
        assert_eq!(
            (log.first_id(), log.next_id(), log.segment_count()),
            (50, 81, 1)
        );
        check_reads_from(&log, 50, 6);
        fill(&mut log, 90);
        // A second open does nothing more.
        let (again, report) = open(&dir.messages(), 100);
        assert_eq!(report, OpenReport::default());
        check_reads_from(&again, 50, 6);
        assert!(dir.names().contains(&"messages.dat.offsets".to_string()));

        // An empty old file, or one of only a torn record, goes away.
        for content in [&b""[..], b"7:1700"] {
            let dir = TempDir::new("upgrade-empty");
            fs::write(dir.messages(), content).unwrap();
            let (mut log, report) = open(&dir.messages(), 100);
            assert_eq!(
                report.upgraded,
                Some(Upgrade {
                    from: dir.messages(),
                    to: None
                })
            );
            assert!(dir.names().is_empty());
            log.start_at(7).unwrap();
            log.append(&encoded(7, 1), 7, 1).unwrap();
            assert_eq!(dir.names(), [name(7)]);
            assert!(log.start_at(9).is_err(), "segments name the next id");
        }

        // A torn tail comes along and is cut under the new name.
        let dir = TempDir::new("upgrade-torn");
        let mut torn = encoded(3, 4);
        torn.extend_from_slice(b"7:17");
        fs::write(dir.messages(), &torn).unwrap();
        let (log, report) = open(&dir.messages(), 100);
        assert_eq!(report.torn.unwrap().bytes, 4);
        assert_eq!(log.next_id(), 7);

        // Garbage at the start, or both kinds of files: refused, untouched.
        let dir = TempDir::new("upgrade-bad");
        fs::write(dir.messages(), b"garbage\n").unwrap();
        assert_eq!(
            damage_at(open_err(&dir.messages())),
            ("messages.dat".into(), 0, "bad message id".into())
        );
        fs::write(dir.messages(), encoded(1, 2)).unwrap();
        fs::write(segment_path(&dir.messages(), 1), encoded(1, 2)).unwrap();
        assert!(
            damage_at(open_err(&dir.messages()))
                .2
                .contains("both there")
        );
        assert_eq!(dir.names().len(), 2);
    }

    #[test]
    fn bad_batches_are_refused_before_anything_is_written() {
        let dir = TempDir::new("batch");
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 5);
        let mut newline = Vec::new();
        store::encode_record(&mut newline, 5, 1, b"a\nb");
        let mut too_big = Vec::new();
        store::encode_record(&mut too_big, 5, 1, &[b'x'; MAX + 1]);
        let cases: [(Vec<u8>, u64, u64); 8] = [
            (encoded(6, 1), 6, 1),
            (encoded(5, 2), 5, 1),
            (encoded(5, 2), 5, 3),
            (encoded(5, 2)[..20].to_vec(), 5, 1),
            (b"5:1:1:a\n6:1:1:b\n8:1:1:c\n".to_vec(), 5, 3),
            (newline, 5, 1),
            (too_big, 5, 1),
            (Vec::new(), 5, 0),
        ];
        let before = log.total_bytes();
        for (bytes, first, count) in cases {
            let err = log.append(&bytes, first, count).unwrap_err();
            assert!(matches!(err, SegmentError::BadBatch { .. }), "{err}");
        }
        assert_eq!(log.total_bytes(), before);
        assert_eq!(log.next_id(), 5);
        check_reads_from(&log, 1, 10);
    }

    fn faulty(dir: &TempDir, segment_bytes: u64) -> (SegmentLog, Arc<FaultPlan>) {
        let plan = FaultPlan::new();
        let (log, _) = SegmentLog::open(
            &dir.messages(),
            Disk::with_faults(plan.clone()),
            segment_bytes,
            MAX,
        )
        .unwrap();
        (log, plan)
    }

    use std::sync::Arc;

    /// The log on disk, opened afresh, holds what `log` says it holds.
    fn consistent(dir: &TempDir, log: &SegmentLog) {
        let (again, report) = open(&dir.messages(), log.segment_bytes);
        assert_eq!(report.torn, None);
        assert_eq!(
            (again.first_id(), again.next_id()),
            (log.first_id(), log.next_id())
        );
        assert_eq!(again.total_bytes(), log.total_bytes());
        assert_eq!(again.segment_count(), log.segment_count());
        check_reads_from(&again, again.first_id(), 5);
    }

    #[test]
    fn a_failed_append_is_cut_back_and_a_failed_cut_back_stops_writes() {
        let dir = TempDir::new("fault-append");
        let (mut log, plan) = faulty(&dir, 1000);
        fill(&mut log, 10);
        plan.fail(DiskOp::Write, 1, 1);
        let err = log.append(&encoded(10, 2), 10, 2).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(log.next_id(), 10);
        consistent(&dir, &log);
        log.append(&encoded(10, 2), 10, 2).unwrap();
        consistent(&dir, &log);
        // The write fails and so does its cut back.
        plan.fail(DiskOp::Write, 1, 1);
        plan.fail(DiskOp::Truncate, 1, 1);
        let err = log.append(&encoded(12, 1), 12, 1).unwrap_err().to_string();
        assert!(err.contains("cut back failed"), "{err}");
        assert!(matches!(
            log.append(&encoded(12, 1), 12, 1),
            Err(SegmentError::Broken { .. })
        ));
        drop(log);
        let (log, _) = open(&dir.messages(), 1000);
        assert_eq!(log.next_id(), 12);
    }

    #[test]
    fn a_failed_roll_leaves_the_old_active_segment_in_use() {
        let dir = TempDir::new("fault-roll");
        let (mut log, plan) = faulty(&dir, 100);
        fill(&mut log, 6);
        let (count, next) = (log.segment_count(), log.next_id());
        let big = encoded(next, 4);
        // The fdatasync of the segment being sealed fails.
        plan.fail(DiskOp::Fsync, 1, 1);
        assert!(log.append(&big, next, 4).is_err());
        assert_eq!((log.segment_count(), log.next_id()), (count, next));
        assert!(!segment_path(&dir.messages(), next).exists());
        // The directory's fsync after the create fails: the file goes.
        log.sync().unwrap();
        plan.fail(DiskOp::Fsync, 1, 1);
        assert!(log.append(&big, next, 4).is_err());
        assert_eq!((log.segment_count(), log.next_id()), (count, next));
        assert!(!segment_path(&dir.messages(), next).exists());
        consistent(&dir, &log);
        // ...and when it cannot be removed, it is the empty active one,
        // whose directory the next sync fsyncs.
        plan.fail(DiskOp::Fsync, 1, 1);
        plan.fail(DiskOp::Remove, 1, 1);
        assert!(log.append(&big, next, 4).is_err());
        assert_eq!((log.segment_count(), log.next_id()), (count + 1, next));
        consistent(&dir, &log);
        let fsyncs = plan.calls(DiskOp::Fsync);
        log.append(&big, next, 4).unwrap();
        log.sync().unwrap();
        assert_eq!(
            plan.calls(DiskOp::Fsync),
            fsyncs + 2,
            "directory, then the data"
        );
        assert_eq!(log.segment_count(), count + 1);
        // A write that fails in a fresh segment leaves it empty and active.
        let next = log.next_id();
        plan.fail(DiskOp::Write, 1, 1);
        assert!(log.append(&encoded(next, 4), next, 4).is_err());
        assert_eq!(
            fs::metadata(segment_path(&dir.messages(), next))
                .unwrap()
                .len(),
            0
        );
        consistent(&dir, &log);
        fill(&mut log, 40);
        consistent(&dir, &log);
    }

    #[test]
    fn a_roll_fsyncs_the_segment_it_seals() {
        let dir = TempDir::new("roll-sync");
        let (mut log, plan) = faulty(&dir, 100);
        fill(&mut log, 3);
        let fsyncs = plan.calls(DiskOp::Fsync);
        let next = log.next_id();
        log.append(&encoded(next, 5), next, 5).unwrap();
        // The sealed segment's data, then the directory after the create.
        assert_eq!(plan.calls(DiskOp::Fsync), fsyncs + 2);
        log.sync().unwrap();
        log.sync().unwrap();
        assert_eq!(
            plan.calls(DiskOp::Fsync),
            fsyncs + 3,
            "a clean log is not synced again"
        );
    }

    #[test]
    fn a_failed_sync_is_reported_and_the_caller_cuts_back() {
        let dir = TempDir::new("fault-sync");
        let (mut log, plan) = faulty(&dir, 1000);
        fill(&mut log, 10);
        log.sync().unwrap();
        fill(&mut log, 20);
        plan.fail(DiskOp::Fsync, 1, 1);
        assert!(log.sync().is_err());
        assert!(log.cut_back(25).is_err());
        assert!(log.cut_back(0).is_err());
        log.cut_back(10).unwrap();
        assert_eq!(
            (log.next_id(), log.total_bytes()),
            (10, encoded(1, 9).len() as u64)
        );
        consistent(&dir, &log);
        fill(&mut log, 30);
        consistent(&dir, &log);
        // A cut back that cannot truncate stops writes.
        plan.fail(DiskOp::Truncate, 1, 1);
        assert!(log.cut_back(25).is_err());
        assert!(matches!(
            log.append(&encoded(30, 1), 30, 1),
            Err(SegmentError::Broken { .. })
        ));
    }

    #[test]
    fn a_failed_delete_is_reported_and_the_log_stays_the_truth() {
        let dir = TempDir::new("fault-delete");
        let (mut log, plan) = faulty(&dir, 100);
        fill(&mut log, 100);
        let count = log.segment_count();
        plan.fail(DiskOp::Remove, 2, 1);
        let err = log.delete_through(u64::MAX).unwrap_err();
        assert!(err.to_string().starts_with("remove "), "{err}");
        assert_eq!(
            log.segment_count(),
            count - 1,
            "the first went, the second stayed"
        );
        consistent(&dir, &log);
        // The directory's fsync fails: the segments are gone all the same.
        plan.fail(DiskOp::Fsync, 1, 1);
        assert!(log.delete_through(u64::MAX).is_err());
        assert_eq!(log.segment_count(), 1);
        consistent(&dir, &log);
    }

    #[test]
    fn failures_at_open_change_nothing() {
        // The rename of an upgrade fails: the old file stays; next time.
        let dir = TempDir::new("fault-open");
        fs::write(dir.messages(), encoded(1, 5)).unwrap();
        let plan = FaultPlan::new();
        plan.fail(DiskOp::Rename, 1, 1);
        assert!(SegmentLog::open(&dir.messages(), Disk::with_faults(plan), 100, MAX).is_err());
        assert_eq!(fs::read(dir.messages()).unwrap(), encoded(1, 5));
        // The cut of a torn tail fails: the error says so; next time.
        let mut torn = encoded(1, 5);
        torn.extend_from_slice(b"6:1");
        fs::write(dir.messages(), &torn).unwrap();
        let plan = FaultPlan::new();
        plan.fail(DiskOp::Truncate, 1, 1);
        let err = SegmentLog::open(&dir.messages(), Disk::with_faults(plan), 100, MAX).unwrap_err();
        assert!(err.to_string().starts_with("truncate "), "{err}");
        let (log, report) = open(&dir.messages(), 100);
        assert_eq!(report.torn.unwrap().bytes, 3);
        assert_eq!(log.next_id(), 6);
    }

    #[test]
    fn repair_keeps_the_records_before_the_damage_and_moves_the_rest_aside() {
        let dir = TempDir::new("repair");
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 60);
        let spans: Vec<(PathBuf, u64)> = log
            .segments
            .iter()
            .map(|s| (s.path.clone(), s.next_id))
            .collect();
        drop(log);
        let originals: Vec<Vec<u8>> = spans.iter().map(|(p, _)| fs::read(p).unwrap()).collect();
        let mut damaged = originals[2].clone();
        damaged.extend_from_slice(b"####");
        fs::write(&spans[2].0, &damaged).unwrap();
        let saved = repair(&dir.messages(), MAX, 77).unwrap();
        let aside = |p: &Path| PathBuf::from(format!("{}.corrupt-77", p.display()));
        let want: Vec<PathBuf> = spans[2..].iter().map(|(p, _)| aside(p)).collect();
        assert_eq!(saved, want);
        assert_eq!(
            fs::read(&saved[0]).unwrap(),
            damaged,
            "the damaged segment, whole"
        );
        for (path, original) in saved[1..].iter().zip(&originals[3..]) {
            assert_eq!(
                &fs::read(path).unwrap(),
                original,
                "a later segment, renamed"
            );
        }
        assert_eq!(
            fs::read(&spans[2].0).unwrap(),
            originals[2],
            "its valid records stay"
        );
        let (log, report) = open(&dir.messages(), 100);
        assert_eq!(report, OpenReport::default());
        assert_eq!((log.first_id(), log.next_id()), (1, spans[2].1));
        check_reads_from(&log, 1, 4);
        assert!(
            repair(&dir.messages(), MAX, 78).unwrap().is_empty(),
            "nothing left to repair"
        );
    }

    #[test]
    fn repair_of_a_gap_or_a_bad_first_byte_renames_from_there_on() {
        let dir = TempDir::new("repair-gap");
        let (mut log, _) = open(&dir.messages(), 100);
        fill(&mut log, 60);
        let spans: Vec<(PathBuf, u64, u64)> = log
            .segments
            .iter()
            .map(|s| (s.path.clone(), s.first_id, s.next_id))
            .collect();
        drop(log);
        fs::remove_file(&spans[4].0).unwrap();
        let saved = repair(&dir.messages(), MAX, 5).unwrap();
        assert_eq!(saved.len(), spans.len() - 5);
        let (log, _) = open(&dir.messages(), 100);
        assert_eq!(log.next_id(), spans[4].1);
        // The first byte of a segment: nothing in it to keep, renamed.
        let mut bytes = fs::read(&spans[2].0).unwrap();
        bytes[0] = b'#';
        fs::write(&spans[2].0, &bytes).unwrap();
        let saved = repair(&dir.messages(), MAX, 6).unwrap();
        assert_eq!(
            saved[0],
            PathBuf::from(format!("{}.corrupt-6", spans[2].0.display()))
        );
        assert_eq!(fs::read(&saved[0]).unwrap(), bytes);
        assert!(!spans[2].0.exists());
        let (log, _) = open(&dir.messages(), 100);
        assert_eq!((log.next_id(), log.segment_count()), (spans[2].1, 2));
        check_reads_from(&log, 1, 3);
    }

    #[test]
    fn repair_of_an_old_file_then_carries_it_over() {
        let dir = TempDir::new("repair-old");
        fs::write(dir.messages(), b"garbage\n").unwrap();
        let saved = repair(&dir.messages(), MAX, 9).unwrap();
        assert_eq!(fs::read(&saved[0]).unwrap(), b"garbage\n");
        let (log, report) = open(&dir.messages(), 100);
        assert_eq!(report.upgraded.unwrap().to, None);
        assert_eq!(log.segment_count(), 0);
        // Beside segments, an old file is not repaired but refused.
        fs::write(dir.messages(), b"garbage\n").unwrap();
        fs::write(segment_path(&dir.messages(), 1), encoded(1, 2)).unwrap();
        assert!(
            damage_at(repair(&dir.messages(), MAX, 10).unwrap_err())
                .2
                .contains("both there")
        );
    }

    /// A small deterministic generator (xorshift), so a failing sequence
    /// repeats.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// What the log must show after every step: the files on disk are its
    /// segments, their sizes its bytes, and every record it holds reads
    /// back as appended.
    fn check_invariants(dir: &TempDir, log: &SegmentLog, step: usize) {
        let mut on_disk: Vec<String> = dir
            .names()
            .into_iter()
            .filter(|n| n != "messages.dat.offsets")
            .collect();
        on_disk.sort();
        let listed: Vec<String> = log
            .segment_paths()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(on_disk, listed, "step {step}");
        let sizes: u64 = log
            .segment_paths()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(sizes, log.total_bytes(), "step {step}");
        let sealed = log.segments.len().saturating_sub(1);
        assert!(
            log.segments
                .iter()
                .take(sealed)
                .all(|s| s.next_id > s.first_id),
            "step {step}"
        );
        check_reads_from(log, log.first_id(), 1 + step % 5);
    }

    #[test]
    fn random_steps_with_random_faults_keep_the_log_whole() {
        let dir = TempDir::new("random");
        let plan = FaultPlan::new();
        let reopen = |plan: &Arc<FaultPlan>| {
            plan.clear();
            SegmentLog::open(&dir.messages(), Disk::with_faults(plan.clone()), 200, MAX)
                .unwrap()
                .0
        };
        let mut log = reopen(&plan);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Failures seen: appends, syncs, deletes.
        let mut failed = [0u32; 3];
        let ops = [
            DiskOp::Write,
            DiskOp::Fsync,
            DiskOp::Rename,
            DiskOp::Truncate,
            DiskOp::Remove,
        ];
        for step in 0..600 {
            if rng.below(4) == 0 {
                plan.fail(ops[rng.below(5) as usize], 1 + rng.below(2), 1);
            }
            let next = log.next_id();
            match rng.below(10) {
                0..=5 => {
                    let count = 1 + rng.below(6);
                    match log.append(&encoded(next, count), next, count) {
                        Ok(()) => assert_eq!(log.next_id(), next + count),
                        Err(SegmentError::Broken { .. }) => log = reopen(&plan),
                        Err(_) => {
                            failed[0] += 1;
                            assert_eq!(log.next_id(), next, "step {step}");
                        }
                    }
                }
                6 => {
                    if log.sync().is_err() {
                        failed[1] += 1;
                        // The caller's answer to a failed fsync.
                        let to = log.segments.back().map_or(next, |s| s.first_id);
                        let _ = log.cut_back(to.max(next.saturating_sub(3)));
                    }
                }
                7 | 8 => {
                    let upto = log.first_id() + rng.below(next - log.first_id() + 1);
                    if log.delete_before(upto).is_ok() {
                        let sealed = log.segments.len() - 1;
                        assert!(
                            log.segments.iter().take(sealed).all(|s| s.next_id > upto),
                            "step {step}"
                        );
                    }
                }
                _ => log = reopen(&plan),
            }
            plan.clear();
            if log.broken {
                log = reopen(&plan);
            }
            check_invariants(&dir, &log, step);
        }
        assert!(
            log.next_id() > 500,
            "the steps did append: {}",
            log.next_id()
        );
    }
}
