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

use super::core::{Recovered, unix_now};
use crate::config::{BrokerConfig, MAX_MSG_SIZE};
use crate::log::Logger;
use crate::store::{self, MessageFile, Record, ScanError, Tail};

/// The messages file's length, for a log line (0 if it cannot be read).
fn scan_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Reads both files and returns the state to start from and the records
/// (ids `head..next_id`) to load into the queue. The error is the whole
/// message to print.
pub fn recover(
    config: &BrokerConfig,
    log: &Logger,
) -> Result<(Recovered, VecDeque<Record>), String> {
    let path = &config.messages_file;
    let shown = path.display();
    let offsets_file = store::offsets_path(path);
    let (offsets, skipped) = store::load_offsets(path, config.repair).map_err(|err| {
        format!("{err}\nthe offsets file is damaged; start with --repair to skip its bad lines")
    })?;
    for line in skipped {
        log.warn(format_args!(
            "repair: skipped bad line {line} of {}",
            offsets_file.display()
        ));
    }

    // Keep what some cursor may still need (or, with no cursor, what the
    // queue held when the offsets were saved): at most `capacity` records,
    // the newest, so memory is bounded whatever the file's size.
    let keep_from = match offsets.consumers.iter().map(|c| c.offset + 1).min() {
        Some(min) => min,
        None => offsets.head,
    };
    let capacity = u64::from(config.capacity);
    let max_size = MAX_MSG_SIZE as usize;
    let scan = match File::open(path) {
        Ok(file) => store::scan(
            io::BufReader::with_capacity(64 * 1024, file),
            max_size,
            keep_from,
            capacity as usize,
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            store::scan(io::empty(), max_size, 0, 0)
        }
        Err(err) => return Err(format!("cannot open messages file {shown}: {err}")),
    };
    let scan = match scan {
        Ok(scan) => scan,
        Err(ScanError::Io(err)) => {
            return Err(format!("cannot read messages file {shown}: {err}"));
        }
    };

    let mut repaired = false;
    match &scan.tail {
        Tail::Clean => {}
        Tail::Torn { bytes } => log.warn(format_args!(
            "messages file {shown}: cut a torn last record ({bytes} bytes at byte offset {}), \
             left by an interrupted write",
            scan.valid_len
        )),
        Tail::Damaged { offset, reason }
            if store::power_cut_tail(&scan, offsets.next_id, offsets.head) =>
        {
            // What a power cut leaves past the last fsync: never needs --repair.
            log.warn(format_args!(
                "messages file {shown}: cut {} bytes after the last valid record at byte \
                 offset {offset} ({reason}); no record follows them and every message the \
                 offsets file counts as stored is kept: left by a power cut",
                scan_len(path).saturating_sub(scan.valid_len)
            ))
        }
        Tail::Damaged { offset, reason } => {
            let records = scan
                .last_id
                .map_or(0, |last| last + 1 - scan.first_id.unwrap_or(1));
            if !config.repair {
                return Err(format!(
                    "messages file {shown} is damaged at byte offset {offset} ({reason}); \
                     start with --repair to keep the {records} valid records before it \
                     (the whole file is saved as {shown}.corrupt-<time> first)"
                ));
            }
            repaired = true;
            let saved = store::repair(path, scan.valid_len, unix_now())
                .map_err(|err| format!("repair of {shown} failed: {err}"))?;
            log.warn(format_args!(
                "repair: messages file {shown} was damaged at byte offset {offset} ({reason}); \
                 kept {records} valid records, original saved as {}",
                saved.display()
            ));
        }
    }

    // The next id: after the last record, and never behind NEXT_ID. NEXT_ID
    // ahead of the records means records are missing.
    let mut next_id = match scan.last_id {
        Some(last) => {
            if offsets.next_id > last + 1 && !config.repair {
                return Err(format!(
                    "{} says the next message id is {} but {shown} ends at id {last}: \
                     records are missing (or the two files do not belong together); \
                     start with --repair to continue",
                    offsets_file.display(),
                    offsets.next_id,
                ));
            }
            last + 1
        }
        None => offsets.next_id.max(1),
    };
    let first = scan.first_id.unwrap_or(next_id);

    // Offsets are saved about once a second, so after a crash they may lag.
    // They cannot lag past what the queue could hold: a message leaves the
    // queue only when every cursor has passed it, and the queue held at
    // most its capacity then, so every cursor was at least at this floor.
    let saved_capacity = if offsets.capacity > 0 {
        offsets.capacity
    } else {
        capacity
    };
    let floor = (next_id - 1).saturating_sub(saved_capacity);
    let mut cursors = offsets.consumers;
    for cursor in &mut cursors {
        let id = String::from_utf8_lossy(&cursor.id).into_owned();
        let pos = cursor.offset;
        if pos < floor {
            log.info(format_args!(
                "consumer {id}: saved offset {pos} lags behind what the queue could hold; \
                 resuming at {floor}"
            ));
            cursor.offset = floor;
        }
        let clamped = cursor.offset.clamp(first - 1, next_id - 1);
        if clamped != cursor.offset {
            log.warn(format_args!(
                "consumer {id}: saved offset {} is outside the messages on disk \
                 ({first}..{next_id}); using {clamped}",
                cursor.offset
            ));
            cursor.offset = clamped;
        }
    }
    let mut head = match cursors.iter().map(|c| c.offset + 1).min() {
        Some(min) => min,
        None => offsets.head.max(floor + 1),
    }
    .clamp(first, next_id);
    let mut records = scan.kept;
    while records.front().is_some_and(|r| r.id < head) {
        records.pop_front();
    }

    // With --repair, acknowledged records may have been lost with the
    // damage: from after the last kept record (or the saved head, if none
    // was kept) up to the saved NEXT_ID. Their ids must not be handed out
    // again, but the file's ids must stay consecutive, so jumping past them
    // is only possible when no kept record is still waiting: then the file
    // is emptied (the saved NEXT_ID is already on disk).
    let mut file_len = scan.valid_len;
    let lost_from = scan.last_id.map_or(offsets.head.max(1), |last| last + 1);
    if repaired && offsets.next_id > lost_from {
        let lost_to = offsets.next_id - 1;
        if records.is_empty() {
            log.warn(format_args!(
                "repair: messages {lost_from}..{lost_to} were lost with the damage; \
                 continuing from id {}",
                offsets.next_id
            ));
            next_id = offsets.next_id;
            file_len = 0;
            for cursor in &mut cursors {
                cursor.offset = next_id - 1;
            }
        } else {
            log.warn(format_args!(
                "repair: messages {lost_from}..{lost_to} were lost with the damage, and their \
                 ids will be given to new messages: records {head}..{} are still waiting, and \
                 the file needs consecutive ids",
                next_id - 1
            ));
        }
    }
    if records.is_empty() {
        head = next_id;
    }

    let live = next_id - head;
    if live > capacity {
        return Err(format!(
            "messages file {shown} holds {live} messages that consumers still need, more than \
             --capacity {capacity}; start with --capacity {live} or more{}",
            if repaired {
                ""
            } else {
                " (nothing was changed)"
            }
        ));
    }
    if records.len() as u64 != live || records.front().is_some_and(|r| r.id != head) {
        return Err(format!(
            "messages file {shown}: records {head}..{next_id} are needed but not all were read"
        ));
    }
    if let Some(largest) = records.iter().map(|r| r.content.len()).max()
        && largest > config.max_msg_size
    {
        return Err(format!(
            "messages file {shown} holds a waiting message of {largest} bytes, more than \
             --max-msg-size {}; start with --max-msg-size {largest} or more",
            config.max_msg_size
        ));
    }
    let live_bytes = records
        .iter()
        .map(|r| store::record_len(r.id, r.timestamp, r.content.len()))
        .sum();
    let file = MessageFile::open(path, file_len).map_err(|err| err.to_string())?;
    log.info(format_args!(
        "recovered {shown}: next id {next_id}, {} message(s) held from id {head}, \
         {} consumer offset(s)",
        records.len(),
        cursors.len()
    ));
    let next_consumer = offsets.next_consumer.max(1);
    Ok((
        Recovered {
            file,
            next_id,
            head,
            next_consumer,
            cursors,
            live_bytes,
        },
        records,
    ))
}
