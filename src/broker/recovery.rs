//! Startup recovery: from the offsets file and the messages file to the
//! state the broker starts with (next id, cursors, the records the queue
//! must hold again).
//!
//! Rules: a torn tail is cut with a warning; any other damage stops the
//! start with a message naming the file, the byte offset and `--repair`;
//! cursors are clamped to the last recovered message (an offset saved
//! ahead of its messages causes a redelivery, never a skip); ids are never
//! handed out twice. This module reads files only; it does not touch the
//! queue or the network.

use std::collections::VecDeque;
use std::fs::File;
use std::io;

use super::core::{Recovered, unix_now};
use crate::config::BrokerConfig;
use crate::log::Logger;
use crate::store::{self, MessageFile, Record, ScanError, Tail};

/// Reads both files and returns the state to start from and the records
/// (ids `head..next_id`) to load into the queue. The error is the whole
/// message to print.
pub fn recover(
    config: &BrokerConfig,
    log: &Logger,
) -> Result<(Recovered, VecDeque<Record>), String> {
    let path = &config.messages_file;
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

    // Which records the queue must hold: those some cursor still needs, or
    // with no cursor, those the queue held when the offsets were saved.
    let keep_from = match offsets.consumers.iter().map(|c| c.offset + 1).min() {
        Some(min) => min,
        None => offsets.head,
    };
    let capacity = config.capacity as usize;
    let scan = match File::open(path) {
        Ok(file) => store::scan(
            io::BufReader::with_capacity(64 * 1024, file),
            config.max_msg_size,
            keep_from,
            capacity,
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            store::scan(io::empty(), config.max_msg_size, 0, capacity)
        }
        Err(err) => {
            return Err(format!(
                "cannot open messages file {}: {err}",
                path.display()
            ));
        }
    };
    let scan = match scan {
        Ok(scan) => scan,
        Err(ScanError::Io(err)) => {
            return Err(format!(
                "cannot read messages file {}: {err}",
                path.display()
            ));
        }
        Err(ScanError::TooMany { limit }) => {
            return Err(format!(
                "messages file {} holds more than {limit} messages that consumers still need; \
                 start with a larger --capacity (nothing was changed)",
                path.display()
            ));
        }
    };
    let mut repaired = false;
    match &scan.tail {
        Tail::Clean => {}
        Tail::Torn { bytes } => log.warn(format_args!(
            "messages file {}: cut a torn last record ({bytes} bytes at byte offset {}), left by an interrupted write",
            path.display(),
            scan.valid_len
        )),
        Tail::Damaged { offset, reason } => {
            let records = scan.last_id.map_or(0, |last| last + 1 - scan.first_id.unwrap_or(1));
            if !config.repair {
                return Err(format!(
                    "messages file {} is damaged at byte offset {offset} ({reason}); \
                     start with --repair to keep the {records} valid records before it \
                     (the whole file is saved as {}.corrupt-<time> first)",
                    path.display(),
                    path.display()
                ));
            }
            repaired = true;
            let saved = store::repair(path, scan.valid_len, unix_now())
                .map_err(|err| format!("repair of {} failed: {err}", path.display()))?;
            log.warn(format_args!(
                "repair: messages file {} was damaged at byte offset {offset} ({reason}); kept {records} valid records, original saved as {}",
                path.display(),
                saved.display()
            ));
        }
    }

    // Ids handed out before: the offsets file's NEXT_ID may be ahead of the
    // last record when --repair dropped damaged records.
    let mut next_id = match scan.last_id {
        Some(last) => {
            if offsets.next_id > last + 1 && !config.repair {
                return Err(format!(
                    "{} says the next message id is {} but {} ends at id {last}: \
                     records are missing (or the two files do not belong together); \
                     start with --repair to continue",
                    offsets_file.display(),
                    offsets.next_id,
                    path.display()
                ));
            }
            last + 1
        }
        None => offsets.next_id.max(1),
    };
    let first = scan.first_id.unwrap_or(next_id);
    let mut cursors = offsets.consumers;
    for cursor in &mut cursors {
        let pos = cursor.offset;
        let clamped = pos.clamp(first - 1, next_id - 1);
        if clamped != pos {
            log.warn(format_args!(
                "consumer {}: saved offset {pos} is outside the messages on disk ({first}..{next_id}); using {clamped}",
                String::from_utf8_lossy(&cursor.id)
            ));
            cursor.offset = clamped;
        }
    }
    let head = match cursors.iter().map(|c| c.offset + 1).min() {
        Some(min) => min,
        None if offsets.head > 0 => offsets.head,
        None => first,
    }
    .clamp(first, next_id);
    let mut records = scan.kept;
    while records.front().is_some_and(|r| r.id < head) {
        records.pop_front();
    }
    let mut file_len = scan.valid_len;
    // With --repair, acknowledged records may have been lost with the
    // damage: from after the last kept record (or the saved head, if none
    // was kept) up to the saved NEXT_ID. Their ids must not be handed out
    // again, but the file's ids must stay consecutive, so jumping past them
    // is only possible when no kept record is still waiting: then the file
    // is emptied (the saved NEXT_ID is already on disk).
    let lost_from = scan.last_id.map_or(offsets.head.max(1), |last| last + 1);
    if repaired && offsets.next_id > lost_from {
        let lost_to = offsets.next_id - 1;
        if records.is_empty() {
            log.warn(format_args!(
                "repair: messages {lost_from}..{lost_to} were lost with the damage; continuing from id {}",
                offsets.next_id
            ));
            next_id = offsets.next_id;
            file_len = 0;
            for cursor in &mut cursors {
                cursor.offset = next_id - 1;
            }
        } else {
            log.warn(format_args!(
                "repair: messages {lost_from}..{lost_to} were lost with the damage, and their ids \
                 will be given to new messages: records {head}..{} are still waiting, and the \
                 file needs consecutive ids",
                next_id - 1
            ));
        }
    }
    let head = if records.is_empty() { next_id } else { head };
    debug_assert!(records.front().is_none_or(|r| r.id == head));
    let live_bytes = records
        .iter()
        .map(|r| store::record_len(r.id, r.timestamp, r.content.len()))
        .sum();
    let file = MessageFile::open(path, file_len).map_err(|err| err.to_string())?;
    log.info(format_args!(
        "recovered {}: next id {next_id}, {} message(s) held from id {head}, {} consumer offset(s)",
        path.display(),
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
