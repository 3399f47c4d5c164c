//! Startup recovery: from the offsets file and the messages file to the
//! state the broker starts with (next id, cursors, the records the queue
//! must hold again).
//!
//! Rules: a torn tail is cut with a warning; any other damage stops the
//! start with a message naming the file, the byte offset and `--repair`
//! (which keeps the records before the damage and saves the original);
//! cursors are clamped to the messages on disk (an offset saved ahead of
//! its messages causes a redelivery, never a skip); ids are never handed
//! out twice, except after a `--repair` that must keep waiting records (it
//! says so). The only file this module changes is the messages file, and
//! only to cut a torn tail or under `--repair`; the caller holds the
//! messages file's lock. It does not touch the queue or the network.

use std::collections::VecDeque;
use std::fs::File;
use std::io;

use super::core::unix_now;
use super::state::{SavedPosition, Start};
use crate::config::{BrokerConfig, MAX_MSG_SIZE};
use crate::disk::Disk;
use crate::log::Logger;
use crate::store::{self, MessageFile, Offsets, Record, SavedCursor, Scan, ScanError, Tail};

/// What recovery hands to the broker's core.
pub struct Recovered {
    pub file: MessageFile,
    pub start: Start,
    /// Record bytes of the ids `start.head..start.next_id`, oldest first.
    pub record_lens: VecDeque<u32>,
}

/// Why the broker cannot start from its files: the whole message to print.
#[derive(Debug)]
pub struct RecoveryError(pub String);

impl std::fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecoveryError {}

impl From<String> for RecoveryError {
    fn from(text: String) -> RecoveryError {
        RecoveryError(text)
    }
}

/// What the phases of recovery share.
struct Recovery<'a> {
    config: &'a BrokerConfig,
    log: &'a Logger,
    shown: String,
}

/// The messages file's length, for a log line (0 if it cannot be read).
fn scan_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Reads both files and returns the state to start from and the records
/// (ids `head..next_id`) to load into the queue.
pub fn recover(
    config: &BrokerConfig,
    log: &Logger,
) -> Result<(Recovered, VecDeque<Record>), RecoveryError> {
    let recovery = Recovery {
        config,
        log,
        shown: config.messages_file.display().to_string(),
    };
    let offsets = recovery.load_offsets()?;
    let scan = recovery.scan(&offsets)?;
    let repaired = recovery.check_tail(&scan, &offsets)?;
    let next_id = recovery.next_id(&offsets, &scan)?;
    let first = scan.first_id.unwrap_or(next_id);
    let mut cursors = offsets.consumers.clone();
    recovery.clamp_cursors(&mut cursors, &offsets, first, next_id);
    let head = match cursors.iter().map(|c| c.offset + 1).min() {
        Some(min) => min,
        None => offsets.head.max(recovery.floor(&offsets, next_id) + 1),
    }
    .clamp(first, next_id);
    let mut records = scan.kept;
    while records.front().is_some_and(|r| r.id < head) {
        records.pop_front();
    }
    let mut kept = Kept {
        next_id,
        head,
        file_len: scan.valid_len,
        cursors,
    };
    if repaired {
        recovery.skip_lost_ids(&offsets, scan.last_id, &records, &mut kept);
    }
    if records.is_empty() {
        kept.head = kept.next_id;
    }
    recovery.check_live(&records, &kept, repaired)?;
    let recovered = recovery.open(&offsets, &records, kept)?;
    Ok((recovered, records))
}

/// What recovery decided, before the file is opened.
struct Kept {
    next_id: u64,
    head: u64,
    file_len: u64,
    cursors: Vec<SavedCursor>,
}

impl Recovery<'_> {
    fn load_offsets(&self) -> Result<Offsets, RecoveryError> {
        let path = &self.config.messages_file;
        let (offsets, skipped) = store::load_offsets(path, self.config.repair).map_err(|err| {
            format!("{err}\nthe offsets file is damaged; start with --repair to skip its bad lines")
        })?;
        for line in skipped {
            self.log.warn(format_args!(
                "repair: skipped bad line {line} of {}",
                store::offsets_path(path).display()
            ));
        }
        Ok(offsets)
    }

    /// Reads the messages file, keeping what some cursor may still need
    /// (or, with no cursor, what the queue held when the offsets were
    /// saved): at most `capacity` records, the newest, so memory is
    /// bounded whatever the file's size.
    fn scan(&self, offsets: &Offsets) -> Result<Scan, RecoveryError> {
        let keep_from = match offsets.consumers.iter().map(|c| c.offset + 1).min() {
            Some(min) => min,
            None => offsets.head,
        };
        let capacity = self.config.capacity as usize;
        let max_size = MAX_MSG_SIZE as usize;
        let scan = match File::open(&self.config.messages_file) {
            Ok(file) => store::scan(
                io::BufReader::with_capacity(64 * 1024, file),
                max_size,
                keep_from,
                capacity,
            ),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                store::scan(io::empty(), max_size, 0, 0)
            }
            Err(err) => {
                return Err(format!("cannot open messages file {}: {err}", self.shown).into());
            }
        };
        scan.map_err(|ScanError::Io(err)| {
            format!("cannot read messages file {}: {err}", self.shown).into()
        })
    }

    /// A torn tail is cut with a warning; damage stops the start unless
    /// `--repair`. Returns whether the file was repaired.
    fn check_tail(&self, scan: &Scan, offsets: &Offsets) -> Result<bool, RecoveryError> {
        let shown = &self.shown;
        match &scan.tail {
            Tail::Damaged { offset, reason }
                if store::power_cut_tail(scan, offsets.next_id, offsets.head) =>
            {
                // What a power cut leaves past the last fsync: never needs --repair.
                self.log.warn(format_args!(
                    "messages file {shown}: cut {} bytes after the last valid record at byte \
                     offset {offset} ({reason}); no record follows them and every message the \
                     offsets file counts as stored is kept: left by a power cut",
                    scan_len(&self.config.messages_file).saturating_sub(scan.valid_len)
                ));
                Ok(false)
            }
            Tail::Clean => Ok(false),
            Tail::Torn { bytes } => {
                self.log.warn(format_args!(
                    "messages file {shown}: cut a torn last record ({bytes} bytes at byte offset {}), \
                     left by an interrupted write",
                    scan.valid_len
                ));
                Ok(false)
            }
            Tail::Damaged { offset, reason } => {
                let records = scan
                    .last_id
                    .map_or(0, |last| last + 1 - scan.first_id.unwrap_or(1));
                if !self.config.repair {
                    return Err(format!(
                        "messages file {shown} is damaged at byte offset {offset} ({reason}); \
                         start with --repair to keep the {records} valid records before it \
                         (the whole file is saved as {shown}.corrupt-<time> first)"
                    )
                    .into());
                }
                let saved = store::repair(&self.config.messages_file, scan.valid_len, unix_now())
                    .map_err(|err| format!("repair of {shown} failed: {err}"))?;
                self.log.warn(format_args!(
                    "repair: messages file {shown} was damaged at byte offset {offset} ({reason}); \
                     kept {records} valid records, original saved as {}",
                    saved.display()
                ));
                Ok(true)
            }
        }
    }

    /// The next id: after the last record, and never behind NEXT_ID.
    /// NEXT_ID ahead of the records means records are missing.
    fn next_id(&self, offsets: &Offsets, scan: &Scan) -> Result<u64, RecoveryError> {
        let Some(last) = scan.last_id else {
            return Ok(offsets.next_id.max(1));
        };
        if offsets.next_id > last + 1 && !self.config.repair {
            return Err(format!(
                "{} says the next message id is {} but {} ends at id {last}: \
                 records are missing (or the two files do not belong together); \
                 start with --repair to continue",
                store::offsets_path(&self.config.messages_file).display(),
                offsets.next_id,
                self.shown,
            )
            .into());
        }
        Ok(last + 1)
    }

    /// Offsets are saved about once a second, so after a crash they may
    /// lag. They cannot lag past what the queue could hold: a message
    /// leaves the queue only when every cursor has passed it, and the
    /// queue held at most its capacity then, so every cursor was at least
    /// at this floor.
    fn floor(&self, offsets: &Offsets, next_id: u64) -> u64 {
        let saved_capacity = if offsets.capacity > 0 {
            offsets.capacity
        } else {
            u64::from(self.config.capacity)
        };
        (next_id - 1).saturating_sub(saved_capacity)
    }

    /// Brings every cursor within the floor and the messages on disk: a
    /// power cut can cause a redelivery, never a stuck or skipping cursor.
    fn clamp_cursors(&self, cursors: &mut [SavedCursor], offsets: &Offsets, first: u64, next: u64) {
        let floor = self.floor(offsets, next);
        for cursor in cursors {
            let id = String::from_utf8_lossy(&cursor.id).into_owned();
            let pos = cursor.offset;
            if pos < floor {
                self.log.info(format_args!(
                    "consumer {id}: saved offset {pos} lags behind what the queue could hold; \
                     resuming at {floor}"
                ));
                cursor.offset = floor;
            }
            let clamped = cursor.offset.clamp(first - 1, next - 1);
            if clamped != cursor.offset {
                self.log.warn(format_args!(
                    "consumer {id}: saved offset {} is outside the messages on disk \
                     ({first}..{next}); using {clamped}",
                    cursor.offset
                ));
                cursor.offset = clamped;
            }
        }
    }

    /// With --repair, acknowledged records may have been lost with the
    /// damage: from after the last kept record (or the saved head, if none
    /// was kept) up to the saved NEXT_ID. Their ids must not be handed out
    /// again, but the file's ids must stay consecutive, so jumping past
    /// them is only possible when no kept record is still waiting: then
    /// the file is emptied (the saved NEXT_ID is already on disk).
    fn skip_lost_ids(
        &self,
        offsets: &Offsets,
        last_id: Option<u64>,
        records: &VecDeque<Record>,
        kept: &mut Kept,
    ) {
        let lost_from = last_id.map_or(offsets.head.max(1), |last| last + 1);
        if offsets.next_id <= lost_from {
            return;
        }
        let lost_to = offsets.next_id - 1;
        if records.is_empty() {
            self.log.warn(format_args!(
                "repair: messages {lost_from}..{lost_to} were lost with the damage; \
                 continuing from id {}",
                offsets.next_id
            ));
            kept.next_id = offsets.next_id;
            kept.file_len = 0;
            for cursor in &mut kept.cursors {
                cursor.offset = kept.next_id - 1;
            }
        } else {
            self.log.warn(format_args!(
                "repair: messages {lost_from}..{lost_to} were lost with the damage, and their \
                 ids will be given to new messages: records {}..{} are still waiting, and \
                 the file needs consecutive ids",
                kept.head,
                kept.next_id - 1
            ));
        }
    }

    /// The records still needed must fit the queue and its slots.
    fn check_live(
        &self,
        records: &VecDeque<Record>,
        kept: &Kept,
        repaired: bool,
    ) -> Result<(), RecoveryError> {
        let (shown, head, next_id) = (&self.shown, kept.head, kept.next_id);
        let capacity = u64::from(self.config.capacity);
        let live = next_id - head;
        if live > capacity {
            let unchanged = if repaired {
                ""
            } else {
                " (nothing was changed)"
            };
            return Err(format!(
                "messages file {shown} holds {live} messages that consumers still need, more than \
                 --capacity {capacity}; start with --capacity {live} or more{unchanged}"
            )
            .into());
        }
        if records.len() as u64 != live || records.front().is_some_and(|r| r.id != head) {
            return Err(format!(
                "messages file {shown}: records {head}..{next_id} are needed but not all were read"
            )
            .into());
        }
        if let Some(largest) = records.iter().map(|r| r.content.len()).max()
            && largest > self.config.max_msg_size
        {
            return Err(format!(
                "messages file {shown} holds a waiting message of {largest} bytes, more than \
                 --max-msg-size {}; start with --max-msg-size {largest} or more",
                self.config.max_msg_size
            )
            .into());
        }
        Ok(())
    }

    /// Opens the messages file (cut to what was kept) for appending.
    fn open(
        &self,
        offsets: &Offsets,
        records: &VecDeque<Record>,
        kept: Kept,
    ) -> Result<Recovered, RecoveryError> {
        let file = MessageFile::open(&self.config.messages_file, kept.file_len, Disk::real())
            .map_err(|err| err.to_string())?;
        self.log.info(format_args!(
            "recovered {}: next id {}, {} message(s) held from id {}, {} consumer offset(s)",
            self.shown,
            kept.next_id,
            records.len(),
            kept.head,
            kept.cursors.len()
        ));
        let record_lens = records
            .iter()
            .map(|r| store::record_len(r.id, r.timestamp, r.content.len()) as u32)
            .collect();
        let cursors = kept
            .cursors
            .into_iter()
            .map(|c| SavedPosition {
                id: c.id,
                offset: c.offset,
                ack: c.ack,
            })
            .collect();
        Ok(Recovered {
            file,
            start: Start {
                next_id: kept.next_id,
                head: kept.head,
                next_consumer: offsets.next_consumer.max(1),
                cursors,
            },
            record_lens,
        })
    }
}
