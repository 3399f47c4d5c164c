//! Startup recovery: from the offsets file and the segment log to the
//! state the broker starts with (next id, cursors, head) and the newest
//! records the ring window is filled with.
//!
//! Phases: the offsets file; `--repair` of the log if asked; the log
//! opened ([`SegmentLog::open_after`]: the upgrade of a single messages
//! file, a torn tail or a power-cut tail of the last segment cut with a
//! warning, any other damage stops the start with a message naming the
//! file, the byte offset and `--repair`); the next id; the cursors,
//! clamped only to the records on disk (`first_id - 1 ..= next_id - 1`),
//! so a restart with no offsets file, or offsets far behind, offers every
//! record still on disk (an offset saved ahead of its records causes a
//! redelivery, never a skip); the newest `--ring` records for the ring.
//!
//! Memory is bounded whatever the backlog: the log keeps a sparse index,
//! and only the ring's window is read. The only files this module changes
//! are the segments (cut tails, the upgrade, `--repair`); the caller holds
//! the messages file's lock. It does not touch the queue or the network.

use super::core::unix_now;
use super::state::{SavedPosition, Start};
use crate::config::{BrokerConfig, MAX_MSG_SIZE};
use crate::disk::Disk;
use crate::log::Logger;
use crate::segments::{self, Durable, OpenReport, SegmentError, SegmentLog};
use crate::store::{self, Offsets, Record, SavedCursor};

/// What recovery hands to the broker's core.
pub struct Recovered {
    pub log: SegmentLog,
    pub start: Start,
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

/// Reads both files and returns the state to start from and the newest
/// records (at most `--ring`, from the head on) to load into the ring.
pub fn recover(
    config: &BrokerConfig,
    log: &Logger,
) -> Result<(Recovered, Vec<Record>), RecoveryError> {
    let recovery = Recovery {
        config,
        log,
        shown: config.messages_file.display().to_string(),
    };
    let offsets = recovery.load_offsets()?;
    if config.repair {
        recovery.repair()?;
    }
    let mut segment_log = recovery.open_log(&offsets)?;
    let mut next_id = recovery.next_id(&offsets, &mut segment_log)?;
    let first = segment_log.first_id();
    let mut cursors = offsets.consumers.clone();
    recovery.clamp_cursors(&mut cursors, first, next_id);
    let mut head = match cursors.iter().map(|c| c.offset + 1).min() {
        Some(min) => min,
        None => offsets.head,
    }
    .clamp(first, next_id);
    if offsets.next_id > next_id {
        next_id = recovery.skip_lost_ids(&offsets, &mut segment_log, head, &mut cursors)?;
        head = head.max(segment_log.first_id());
    }
    let ring_from = head.max(next_id.saturating_sub(u64::from(config.ring)));
    let records = recovery.ring_records(&segment_log, ring_from)?;
    log.info(format_args!(
        "recovered {}: next id {next_id}, {} message(s) held from id {head} in {} segment(s) \
         ({} bytes), {} consumer offset(s); {} newest in the ring",
        recovery.shown,
        next_id - head,
        segment_log.segment_count(),
        segment_log.total_bytes(),
        cursors.len(),
        records.len()
    ));
    if next_id - head > config.capacity {
        log.warn(format_args!(
            "{} message(s) are held, more than --capacity {}: SENDs wait for consumers \
             (nothing held is dropped)",
            next_id - head,
            config.capacity
        ));
    }
    let start = Start {
        next_id,
        head,
        next_consumer: offsets.next_consumer.max(1),
        cursors: cursors
            .into_iter()
            .map(|c| SavedPosition {
                id: c.id,
                offset: c.offset,
                ack: c.ack,
            })
            .collect(),
    };
    let recovered = Recovered {
        log: segment_log,
        start,
    };
    Ok((recovered, records))
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

    /// `--repair`: keeps the records before any damage and moves the
    /// rest aside (never deleting a byte), with a warning per file saved.
    fn repair(&self) -> Result<(), RecoveryError> {
        let saved = segments::repair(
            &self.config.messages_file,
            MAX_MSG_SIZE as usize,
            unix_now(),
        )
        .map_err(|err| format!("repair of {} failed: {err}", self.shown))?;
        for path in saved {
            self.log.warn(format_args!(
                "repair: the log of {} was damaged; kept the valid records before the damage, \
                 saved {}",
                self.shown,
                path.display()
            ));
        }
        Ok(())
    }

    /// Opens the segment log, logging what opening did (an upgrade, a cut
    /// tail). Damage stops the start with the way out.
    fn open_log(&self, offsets: &Offsets) -> Result<SegmentLog, RecoveryError> {
        let durable = Durable {
            next_id: offsets.next_id,
        };
        let opened = SegmentLog::open_after(
            &self.config.messages_file,
            Disk::real(),
            self.config.segment_bytes(),
            MAX_MSG_SIZE as usize,
            Some(durable),
        );
        match opened {
            Ok((log, report)) => {
                self.report(&report);
                Ok(log)
            }
            Err(SegmentError::Damaged {
                path,
                offset,
                reason,
            }) => Err(format!(
                "messages file {} is damaged at byte offset {offset} ({reason}); start with \
                 --repair to keep the valid records before it (the damaged file is saved as \
                 {}.corrupt-<time> first, later segments moved aside)",
                path.display(),
                path.display()
            )
            .into()),
            Err(err) => Err(format!("cannot open the log of {}: {err}", self.shown).into()),
        }
    }

    fn report(&self, report: &OpenReport) {
        if let Some(upgrade) = &report.upgraded {
            match &upgrade.to {
                Some(to) => self.log.info(format_args!(
                    "upgrade: messages file {} of the single-file version carried over as \
                     segment {}",
                    upgrade.from.display(),
                    to.display()
                )),
                None => self.log.info(format_args!(
                    "upgrade: messages file {} of the single-file version held no record; \
                     removed",
                    upgrade.from.display()
                )),
            }
        }
        if let Some(torn) = &report.torn {
            self.log.warn(format_args!(
                "messages file {}: cut a torn last record ({} bytes at byte offset {}), \
                 left by an interrupted write",
                torn.path.display(),
                torn.bytes,
                torn.offset
            ));
        }
        if let Some(cut) = &report.power_cut {
            self.log.warn(format_args!(
                "messages file {}: cut {} bytes after the last valid record at byte offset {}; \
                 no record follows them and every message the offsets file counts as stored \
                 is kept: left by a power cut",
                cut.path.display(),
                cut.bytes,
                cut.offset
            ));
        }
    }

    /// The next id: after the last record, and never behind NEXT_ID (with
    /// no segment at all, NEXT_ID is where the log starts). NEXT_ID ahead
    /// of the records means records are missing.
    fn next_id(&self, offsets: &Offsets, log: &mut SegmentLog) -> Result<u64, RecoveryError> {
        if log.segment_count() == 0 {
            let next = offsets.next_id.max(log.next_id()).max(1);
            log.start_at(next).map_err(|err| err.to_string())?;
            return Ok(next);
        }
        let next = log.next_id();
        if offsets.next_id > next && !self.config.repair {
            return Err(format!(
                "{} says the next message id is {} but the log of {} ends before id {next}: \
                 records are missing (or the files do not belong together); start with \
                 --repair to continue",
                store::offsets_path(&self.config.messages_file).display(),
                offsets.next_id,
                self.shown,
            )
            .into());
        }
        Ok(next)
    }

    /// `--repair` lost the records `log.next_id()..offsets.next_id`. Their
    /// ids must not be handed out again, but the segments' ids must stay
    /// consecutive, so jumping past them is only possible when no kept
    /// record is still waiting (`head` is past them all): then the log is
    /// emptied and starts at the saved NEXT_ID (already on disk). Returns
    /// the next id.
    fn skip_lost_ids(
        &self,
        offsets: &Offsets,
        log: &mut SegmentLog,
        head: u64,
        cursors: &mut [SavedCursor],
    ) -> Result<u64, RecoveryError> {
        let (lost_from, lost_to) = (log.next_id(), offsets.next_id - 1);
        if head < log.next_id() {
            self.log.warn(format_args!(
                "repair: messages {lost_from}..{lost_to} were lost with the damage, and their \
                 ids will be given to new messages: records {head}..{} are still waiting, and \
                 the segments need consecutive ids",
                lost_from - 1
            ));
            return Ok(lost_from);
        }
        log.reset_to(offsets.next_id)
            .map_err(|err| format!("repair of {} failed: {err}", self.shown))?;
        self.log.warn(format_args!(
            "repair: messages {lost_from}..{lost_to} were lost with the damage; continuing \
             from id {}",
            offsets.next_id
        ));
        for cursor in cursors {
            cursor.offset = offsets.next_id - 1;
        }
        Ok(offsets.next_id)
    }

    /// Brings every cursor within the records on disk: a power cut can
    /// cause a redelivery, never a stuck or skipping cursor. Nothing else
    /// moves a cursor: one far behind gets every record still on disk.
    fn clamp_cursors(&self, cursors: &mut [SavedCursor], first: u64, next: u64) {
        for cursor in cursors {
            let clamped = cursor.offset.clamp(first - 1, next - 1);
            if clamped != cursor.offset {
                self.log.warn(format_args!(
                    "consumer {}: saved offset {} is outside the messages on disk \
                     ({first}..{next}); using {clamped}",
                    String::from_utf8_lossy(&cursor.id),
                    cursor.offset
                ));
                cursor.offset = clamped;
            }
        }
    }

    /// The records `from..next_id` for the ring (at most `--ring`), which
    /// must fit its slots.
    fn ring_records(&self, log: &SegmentLog, from: u64) -> Result<Vec<Record>, RecoveryError> {
        let ring = self.config.ring as usize;
        let records = log
            .read(from, ring, u64::MAX)
            .map_err(|err| format!("cannot read the log of {}: {err}", self.shown))?;
        if let Some(largest) = records.iter().map(|r| r.content.len()).max()
            && largest > self.config.max_msg_size
        {
            return Err(format!(
                "messages file {} holds a waiting message of {largest} bytes, more than \
                 --max-msg-size {}; start with --max-msg-size {largest} or more",
                self.shown, self.config.max_msg_size
            )
            .into());
        }
        Ok(records)
    }
}
