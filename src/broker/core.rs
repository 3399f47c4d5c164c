//! The shell around the broker's state machine: it applies what
//! [`State`](super::state::State) decides to the segment log (the queue of
//! record), the ring in shared memory (the window over the newest
//! messages) and the sockets, and hands typed replies to the session,
//! which encodes them.
//!
//! Locks, in the order they are taken: a worker's own connection write
//! lock (held for a whole batch, so no push lands inside its replies) →
//! `inner` (the state machine, the segment log) → the ring's SysV MUTEX
//! → the durability lock. Pushes to *other* connections are sent after
//! `inner` is released and only ever `try_lock` their write lock, so no
//! cycle can form. A sender that finds the queue full waits on `room`,
//! which releases `inner` while it waits; nobody blocks on a socket while
//! holding `inner`.
//!
//! Invariants: the log holds every id `head..next_id`; the ring holds the
//! ids `ring_first..next_id`, at most its slots, each also in the log; an
//! `OK:MSG_ID` is produced only after the record's write returned (and,
//! under `always`, its fsync); a SEND answered `ERROR:` is never
//! delivered. Memory does not grow with the backlog: nothing here is kept
//! per message. With one process attached, the ring's MUTEX is always
//! taken inside `inner`, so it never makes anyone wait; it is there for any
//! other process that reads the ring.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::conn::{Conn, Conns, lock};
use super::durability::Durability;
use super::recovery::Recovered;
use super::state::{ConsumerKey, RegisterError, Rules, State};
use crate::log::{Level, Logger};
use crate::protocol::{ErrorCode, Reply, StatValue};
use crate::queue::Ring;
use crate::segments::{SegmentError, SegmentLog};
use crate::store::{self, FsyncPolicy};

/// A sender waiting for room looks at its `give_up` condition this often.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Seconds since the Unix epoch, 0 if the clock is before it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the core's typed replies go: the session encodes them.
pub type Replies<'a> = dyn FnMut(Reply<'_>) + 'a;

/// Counters for `STATS`.
#[derive(Debug, Default)]
pub struct Counters {
    pub stored: AtomicU64,
    pub delivered: AtomicU64,
    pub queue_full: AtomicU64,
    pub persistence_failures: AtomicU64,
    pub connections: AtomicU64,
    pub producers: AtomicU64,
    pub consumers: AtomicU64,
    pub refused_full: AtomicU64,
    pub idle_drops: AtomicU64,
    pub acked: AtomicU64,
    pub redelivered: AtomicU64,
    /// Deliveries read from the segments (behind the ring's window, or
    /// for a slot that could not be trusted).
    pub delivered_from_disk: AtomicU64,
    /// Connections closed with `ERROR:Authentication failed`.
    pub auth_failures: AtomicU64,
}

/// Settings the core needs from the command line.
pub struct CoreConfig {
    /// The broker's stable id, shown in `STATS` (see `instance.rs`).
    pub instance: String,
    pub messages_file: PathBuf,
    pub send_timeout: Duration,
    pub consumer_ttl: Duration,
    pub fsync: FsyncPolicy,
    /// Ack mode: how long a delivered message waits for its ack.
    pub ack_wait: Duration,
    /// Ack mode: messages one consumer id may hold unacknowledged.
    pub max_ack_pending: usize,
    /// Cursors kept at most: a new id past it is refused.
    pub max_consumers: usize,
    /// Messages the queue holds at most (`--capacity`).
    pub capacity: u64,
    /// Record bytes the segments hold at most (`--max-bytes`).
    pub max_bytes: u64,
}

/// What `inner` guards.
struct Inner {
    state: State,
    log: SegmentLog,
    /// The oldest id in the ring: it holds `ring_first..next_id` (the
    /// broker's own account, never read back from the segment).
    ring_first: u64,
    /// Encoded records of the SEND batch being stored.
    scratch: Vec<u8>,
    /// The content of the message being delivered.
    content: Vec<u8>,
}

/// How one chunk of a SEND batch went.
enum Chunk {
    Stored { first: u64, count: usize },
    Failed { count: usize },
    Full,
}

/// Why an append stored nothing.
enum AppendError {
    /// A write (or the ring) failed; nothing of the batch is anywhere.
    Io(io::Error),
    /// A roll's fdatasync of the segment it sealed failed: as a failed
    /// group commit, the records since the last good fsync may be lost.
    Sync(super::durability::SyncFailure),
}

/// The shared heart of the broker.
pub struct Core {
    pub log: Arc<Logger>,
    pub config: CoreConfig,
    pub counters: Counters,
    pub conns: Conns,
    pub durability: Durability,
    /// Whether a message was stored yet (`Some(true)`), or the broker is
    /// stopping (`Some(false)`); see `populate_queue_when_used`.
    used: (Mutex<Option<bool>>, Condvar),
    used_flag: AtomicBool,
    ring: Ring,
    inner: Mutex<Inner>,
    /// Signalled (with `inner`) when room is made: the head moved, a
    /// segment was deleted, messages were cut back.
    room: Condvar,
    /// Senders waiting on `room` (changed under `inner`): a release with
    /// nobody waiting skips the wake-up, a system call per GET batch.
    room_waiters: AtomicU64,
    started: Instant,
}

impl Core {
    /// Builds the core over a ring already filled with the newest ids
    /// up to `recovered.start.next_id`.
    pub fn new(
        config: CoreConfig,
        log: Arc<Logger>,
        ring: Ring,
        mut recovered: Recovered,
    ) -> io::Result<Core> {
        // What the log holds now counts as durable from here on.
        recovered.log.sync()?;
        let last = recovered.start.next_id - 1;
        let durability = Durability::new(
            config.fsync,
            recovered.log.disk().clone(),
            config.messages_file.clone(),
            recovered.log.active_handle(),
            last,
        );
        let rules = Rules {
            max_ack_pending: config.max_ack_pending,
            ack_wait: config.ack_wait,
            consumer_ttl: config.consumer_ttl,
            visible_when_synced: config.fsync == FsyncPolicy::Always,
            max_consumers: config.max_consumers,
            capacity: config.capacity,
        };
        let now = Instant::now();
        let ring_first = ring.lock().and_then(|guard| {
            let (first, next) = guard.bounds();
            guard.unlock()?;
            assert_eq!(
                next, recovered.start.next_id,
                "the ring ends at the next id"
            );
            Ok(first)
        })?;
        Ok(Core {
            log,
            config,
            counters: Counters::default(),
            conns: Conns::default(),
            durability,
            used: (Mutex::new(None), Condvar::new()),
            used_flag: AtomicBool::new(false),
            ring,
            inner: Mutex::new(Inner {
                state: State::new(rules, recovered.start, now),
                log: recovered.log,
                ring_first,
                scratch: Vec::new(),
                content: Vec::new(),
            }),
            room: Condvar::new(),
            room_waiters: AtomicU64::new(0),
            started: now,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Stores `contents` (each already checked for size) and answers one
    /// reply per message, in order: `OK:MSG_ID`, or `ERROR:Queue full` once
    /// the queue stayed full (`--capacity` or `--max-bytes`) past the send
    /// timeout (or `give_up` said so), or `ERROR:Persistence failure`.
    pub fn send_batch(
        &self,
        contents: &[&[u8]],
        out: &mut Replies<'_>,
        give_up: &dyn Fn() -> bool,
    ) {
        let deadline = Instant::now() + self.config.send_timeout;
        // A chunk never needs more slots than the ring has.
        let slots = self.ring.slots() as usize;
        let mut done = 0;
        while done < contents.len() {
            let want = (contents.len() - done).min(slots);
            match self.store_chunk(&contents[done..done + want], deadline, give_up) {
                Chunk::Stored { first, count } => {
                    (0..count as u64).for_each(|k| out(Reply::MsgId(first + k)));
                    done += count;
                }
                Chunk::Failed { count } => {
                    self.counters
                        .persistence_failures
                        .fetch_add(count as u64, Ordering::Relaxed);
                    (0..count).for_each(|_| out(Reply::error(ErrorCode::PersistenceFailure)));
                    done += count;
                }
                Chunk::Full => {
                    let rest = contents.len() - done;
                    self.counters
                        .queue_full
                        .fetch_add(rest as u64, Ordering::Relaxed);
                    (0..rest).for_each(|_| out(Reply::error(ErrorCode::QueueFull)));
                    return;
                }
            }
        }
    }

    /// Stores as much of `chunk` as there is room for (waiting, bounded,
    /// for some), durably under `always`.
    fn store_chunk(&self, chunk: &[&[u8]], deadline: Instant, give_up: &dyn Fn() -> bool) -> Chunk {
        let timestamp = unix_now();
        let mut guard = self.inner();
        let count = loop {
            let fit = self.fitting(&guard, chunk, timestamp);
            if fit > 0 {
                break fit;
            }
            // Full: wait for room without holding `inner` (the condvar
            // gives it back while waiting), in slices, noticing shutdown.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || give_up() {
                return Chunk::Full;
            }
            self.room_waiters.fetch_add(1, Ordering::Relaxed);
            guard = self
                .room
                .wait_timeout(guard, left.min(WAIT_SLICE))
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            self.room_waiters.fetch_sub(1, Ordering::Relaxed);
        };
        let result = self.append(&mut guard, &chunk[..count], timestamp);
        drop(guard);
        let first = match result {
            Ok(first) => first,
            Err(AppendError::Io(err)) => {
                self.durability.store_failed(&self.log, count, &err);
                return Chunk::Failed { count };
            }
            Err(AppendError::Sync(failure)) => {
                self.durability.store_failed(&self.log, count, &failure);
                if self.config.fsync == FsyncPolicy::Always {
                    self.cut_unsynced(failure.generation);
                }
                return Chunk::Failed { count };
            }
        };
        if self.config.fsync == FsyncPolicy::Always {
            if let Err(failure) = self.durability.sync_to(first + count as u64 - 1) {
                self.durability.store_failed(&self.log, count, &failure);
                self.cut_unsynced(failure.generation);
                return Chunk::Failed { count };
            }
            self.publish_synced();
        }
        self.durability.store_succeeded(&self.log);
        Chunk::Stored { first, count }
    }

    /// How many messages of `chunk` fit now: within `--capacity` messages
    /// and `--max-bytes` record bytes on disk (the segments' bytes, so a
    /// consumed part of the oldest segment counts until it is deleted).
    fn fitting(&self, inner: &Inner, chunk: &[&[u8]], timestamp: u64) -> usize {
        let room = inner.state.room().min(chunk.len() as u64) as usize;
        let mut bytes_left = self
            .config
            .max_bytes
            .saturating_sub(inner.log.total_bytes());
        let first = inner.state.next_id();
        let mut count = 0;
        for (k, content) in chunk[..room].iter().enumerate() {
            let len = store::record_len(first + k as u64, timestamp, content.len());
            if len > bytes_left {
                break;
            }
            bytes_left -= len;
            count += 1;
        }
        count
    }

    /// Appends `chunk` to the log and the ring; returns the first id. The
    /// ring evicts its oldest slots if it must, in the semop that takes
    /// its slots. On error nothing is stored.
    fn append(
        &self,
        inner: &mut Inner,
        chunk: &[&[u8]],
        timestamp: u64,
    ) -> Result<u64, AppendError> {
        // Checked under the lock, so no append slips in between a failed
        // fsync and the cut back that follows it.
        if let Some(reason) = self.durability.refusing() {
            return Err(AppendError::Io(io::Error::other(reason)));
        }
        let first = inner.state.next_id();
        let n = chunk.len() as u64;
        inner.scratch.clear();
        for (k, content) in chunk.iter().enumerate() {
            store::encode_record(&mut inner.scratch, first + k as u64, timestamp, content);
        }
        let sealed = inner.log.segment_count();
        if let Err(err) = inner.log.append(&inner.scratch, first, n) {
            let fsync = matches!(&err, SegmentError::Io { what: "fsync", .. });
            let err = io::Error::from(err);
            return Err(match fsync {
                true => AppendError::Sync(self.durability.failed_elsewhere(err)),
                false => AppendError::Io(err),
            });
        }
        if let Err(err) = self.push_to_ring(inner, first, chunk, timestamp) {
            // The ring's counts were changed from outside: store nothing.
            let _ = inner.log.cut_back(first);
            return Err(AppendError::Io(err));
        }
        self.mark_used();
        let pushes = inner.state.stored(n);
        let rolled = inner.log.segment_count() != sealed;
        self.durability.appended(
            first + n - 1,
            inner.log.active_handle(),
            rolled.then(|| inner.log.active_first_id()),
        );
        self.counters.stored.fetch_add(n, Ordering::Relaxed);
        if self.log.enabled(Level::Debug) {
            self.log
                .debug(format_args!("stored messages {first}..={}", first + n - 1));
        }
        self.conns.push(&pushes);
        Ok(first)
    }

    /// Pushes the messages `first..` to the ring, evicting the oldest
    /// slots when fewer are free (the ring is the window over the newest).
    fn push_to_ring(
        &self,
        inner: &mut Inner,
        first: u64,
        chunk: &[&[u8]],
        timestamp: u64,
    ) -> io::Result<()> {
        let slots = self.ring.slots();
        let used = first - inner.ring_first;
        let evict = (used + chunk.len() as u64).saturating_sub(slots);
        let mut ring = self.ring.lock_appending(evict as usize, chunk.len())?;
        inner.ring_first = ring.bounds().0;
        if let Err(err) = ring.push(timestamp, chunk) {
            let _ = ring.unlock_giving_back(chunk.len());
            return Err(err);
        }
        ring.unlock_pushed(chunk.len())
    }

    /// Under `always`, after the failed fsync `generation`: cuts every
    /// message written since the last good fsync from the active segment
    /// and the ring (nobody saw them; their senders are told `ERROR:`). If
    /// that cannot be done, SENDs stay refused until a restart.
    fn cut_unsynced(&self, generation: u64) {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let Some(synced) = self.durability.cut_point(generation) else {
            return;
        };
        let new_next = synced + 1;
        let ok = inner
            .log
            .cut_back(new_next)
            .and_then(|()| inner.log.sync())
            .map_err(io::Error::from);
        let ok = ok.and_then(|()| self.ring.lock()?.unlock_cutting_to(new_next));
        if let Err(err) = &ok {
            self.log
                .error(format_args!("cutting back unsynced messages: {err}"));
        } else {
            inner.state.cut_back(new_next);
            inner.ring_first = inner.ring_first.min(new_next);
            self.wake_senders();
        }
        self.durability.cut_done(generation, ok.is_ok(), &self.log);
    }

    /// Under `always`, shows consumers what is fsynced now.
    fn publish_synced(&self) {
        let synced = self.durability.synced();
        let pushes = self.inner().state.synced(synced);
        self.conns.push(&pushes);
    }

    /// Answers `count` pipelined `GET`s on `conn`: `MSG:` for each message
    /// waiting, then `ERROR:No messages available`, then a NOTIFY if more
    /// are waiting. Each message comes from the ring if it is in the
    /// window, else from the segments (consecutive ids in one read).
    pub fn get_batch(&self, conn: &Conn, count: usize, out: &mut Replies<'_>) {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let got = inner.state.get(conn.id, count, Instant::now());
        conn.set_epoch(got.epoch);
        let messages = &got.messages;
        let mut i = 0;
        while i < messages.len() {
            let id = messages[i].id;
            let mut run = 1;
            if id >= inner.ring_first {
                // The window from here on: every later id is in it too
                // unless it is a redelivery of an older one.
                while i + run < messages.len() && messages[i + run].id >= inner.ring_first {
                    run += 1;
                }
                self.serve_from_ring(inner, &messages[i..i + run], out);
            } else {
                while i + run < messages.len()
                    && messages[i + run].id == id + run as u64
                    && messages[i + run].id < inner.ring_first
                {
                    run += 1;
                }
                serve_from_log((&self.log, &self.counters), &inner.log, id, run, out);
            }
            i += run;
        }
        (0..got.empty).for_each(|_| out(Reply::error(ErrorCode::NoMessages)));
        if let Some(waiting) = got.notify {
            out(Reply::Notify(waiting));
        }
        self.release(inner);
        drop(guard);
        self.count_deliveries(conn, &got.messages);
    }

    /// Serves `deliveries` (all in the window) from the ring; a slot that
    /// does not hold what the broker stored there, or a ring that cannot
    /// be locked, is served from the log, which is the queue of record.
    fn serve_from_ring(
        &self,
        inner: &mut Inner,
        deliveries: &[super::state::Delivery],
        out: &mut Replies<'_>,
    ) {
        let ring = match self.ring.lock() {
            Ok(ring) => ring,
            Err(err) => {
                self.log
                    .error(format_args!("queue: {err}; serving from the log"));
                for d in deliveries {
                    serve_from_log((&self.log, &self.counters), &inner.log, d.id, 1, out);
                }
                return;
            }
        };
        for delivery in deliveries {
            inner.content.clear();
            match ring.append_content(delivery.id, &mut inner.content) {
                Ok(()) => out(Reply::Msg {
                    id: delivery.id,
                    content: &inner.content,
                }),
                Err(mismatch) => {
                    self.log.error(format_args!(
                        "{mismatch}; message {} served from the messages file's segments",
                        delivery.id
                    ));
                    serve_from_log((&self.log, &self.counters), &inner.log, delivery.id, 1, out);
                }
            }
        }
        if let Err(err) = ring.unlock() {
            self.log.error(format_args!("queue: {err}"));
        }
    }

    fn count_deliveries(&self, conn: &Conn, messages: &[super::state::Delivery]) {
        if messages.is_empty() {
            return;
        }
        let again = messages.iter().filter(|d| d.again).count() as u64;
        let delivered = messages.len() as u64;
        self.counters
            .delivered
            .fetch_add(delivered, Ordering::Relaxed);
        self.counters
            .redelivered
            .fetch_add(again, Ordering::Relaxed);
        if self.log.enabled(Level::Debug) {
            self.log.debug(format_args!(
                "delivered {delivered} message(s) ({again} again) on connection {}",
                conn.id
            ));
        }
    }

    /// Answers a run of `ACK:<id>`s on `conn`: `OK:ACK:<id>` for each
    /// message in flight (or waiting to go again), else
    /// `ERROR:Unknown message id` (also for every ACK in plain mode).
    pub fn ack_batch(&self, conn: &Conn, ids: &[Option<u64>], out: &mut Replies<'_>) {
        let mut guard = self.inner();
        let acked = guard.state.ack(conn.id, ids);
        for result in &acked.results {
            match result {
                Some(id) => out(Reply::Acked(*id)),
                None => out(Reply::error(ErrorCode::UnknownMessageId)),
            }
        }
        self.release(&mut guard);
        drop(guard);
        let count = acked.results.iter().flatten().count() as u64;
        self.counters.acked.fetch_add(count, Ordering::Relaxed);
        self.conns.push(&acked.notify);
    }

    /// Releases the messages every cursor has passed: the head moves and
    /// every whole segment before it is deleted (which needs no new space
    /// and does not wait for the offsets save, so a full disk recovers as
    /// consumers move on). Senders waiting for room are woken.
    fn release(&self, inner: &mut Inner) {
        let Some(new_head) = inner.state.take_release() else {
            return;
        };
        inner.state.released(new_head);
        self.delete_segments(inner);
        self.wake_senders();
    }

    /// Wakes the senders waiting for room, if any. Called under `inner`,
    /// which the waiters' count changes under too, so none is missed.
    fn wake_senders(&self) {
        if self.room_waiters.load(Ordering::Relaxed) > 0 {
            self.room.notify_all();
        }
    }

    /// Deletes the segments wholly before the head (never the active one).
    fn delete_segments(&self, inner: &mut Inner) {
        match inner.log.delete_before(inner.state.head()) {
            Ok(freed) if freed.segments > 0 => {
                self.wake_senders();
                if self.log.enabled(Level::Debug) {
                    self.log.debug(format_args!(
                        "deleted {} consumed segment(s), {} bytes",
                        freed.segments, freed.bytes
                    ));
                }
            }
            Ok(_) => {}
            Err(err) => self
                .log
                .error(format_args!("deleting consumed segments: {err}")),
        }
    }

    /// Housekeeping: deletes consumed segments a failed delete left.
    pub fn delete_consumed(&self) {
        let mut guard = self.inner();
        self.delete_segments(&mut guard);
    }

    /// Housekeeping, while writes fail: when every message is consumed but
    /// the active segment holds them (it alone fills the disk, or reached a
    /// file size limit), starts a new one, so the old one can be deleted.
    pub fn free_when_failing(&self) {
        if !self.durability.writes_failing() {
            return;
        }
        let mut guard = self.inner();
        let inner = &mut *guard;
        if inner.state.head() != inner.state.next_id() {
            return;
        }
        match inner.log.roll_now() {
            Ok(true) => {
                let rolled_at = inner.log.active_first_id();
                self.durability.appended(
                    inner.state.next_id() - 1,
                    inner.log.active_handle(),
                    Some(rolled_at),
                );
                self.delete_segments(inner);
            }
            Ok(false) => {}
            Err(err) => self
                .log
                .debug(format_args!("sealing the consumed active segment: {err}")),
        }
    }

    /// Registers `conn` as a consumer under `requested` (or a new id), in
    /// ack mode if `ack`, and answers `OK:CONSUMER:<id>` plus a NOTIFY if
    /// messages are waiting. An existing id keeps the mode it was created
    /// in: asking for the other one is `ERROR:Invalid registration message`.
    pub fn register_consumer(
        &self,
        conn: &Conn,
        requested: Option<&[u8]>,
        ack: bool,
        out: &mut Replies<'_>,
    ) -> Result<ConsumerKey, ErrorCode> {
        let mut inner = self.inner();
        let registered = inner
            .state
            .register(conn.id, requested, ack, Instant::now())
            .map_err(|err| match err {
                RegisterError::ModeMismatch => ErrorCode::InvalidRegistration,
                RegisterError::AlreadyRegistered => ErrorCode::AlreadyRegistered,
                RegisterError::TooManyConsumers => ErrorCode::TooManyConsumers,
            })?;
        conn.set_epoch(registered.epoch);
        drop(inner);
        out(Reply::Consumer(&registered.key));
        if let Some(waiting) = registered.notify {
            out(Reply::Notify(waiting));
        }
        self.counters.consumers.fetch_add(1, Ordering::Relaxed);
        self.log.info(format_args!(
            "connection {} registered as consumer {}{} at offset {}",
            conn.id,
            String::from_utf8_lossy(&registered.key),
            if ack { " (ack mode)" } else { "" },
            registered.pos
        ));
        Ok(registered.key)
    }

    /// Forgets `conn` as a consumer (the cursor stays, for its TTL). In
    /// ack mode what it had in flight can go at once to another connection
    /// of the id, which is notified.
    pub fn unregister_consumer(&self, conn: &Conn) {
        let pushes = self.inner().state.unregister(conn.id, Instant::now());
        self.counters.consumers.fetch_sub(1, Ordering::Relaxed);
        self.conns.push(&pushes);
    }

    /// Ack mode: messages whose ack wait passed become deliverable again;
    /// armed connections of their ids are notified.
    pub fn expire_acks(&self) {
        let pushes = self.inner().state.expire_acks(Instant::now());
        self.conns.push(&pushes);
    }

    /// Forgets cursors that have had no connection for the consumer TTL,
    /// and frees the messages only they held.
    pub fn expire_cursors(&self) {
        let mut guard = self.inner();
        let gone = guard.state.expire_cursors(Instant::now());
        for (id, pos) in &gone {
            self.log.info(format_args!(
                "consumer {} expired after {} s without a connection (offset {pos})",
                String::from_utf8_lossy(id),
                self.config.consumer_ttl.as_secs(),
            ));
        }
        self.release(&mut guard);
    }

    /// Fsyncs the active segment if anything was written since the last
    /// fsync (the `interval` policy's tick, and shutdown).
    pub fn sync_now(&self) -> io::Result<()> {
        match self.durability.sync_now() {
            Ok(()) => {
                if self.config.fsync == FsyncPolicy::Always {
                    self.publish_synced();
                }
                Ok(())
            }
            Err(failure) => {
                if self.config.fsync == FsyncPolicy::Always {
                    self.cut_unsynced(failure.generation);
                }
                Err(failure.error)
            }
        }
    }

    /// Saves the offsets file if a cursor moved (or `force`). Under
    /// `always` and `interval` the active segment is fsynced first, so an
    /// offset never reaches the disk ahead of the messages it covers.
    pub fn save_offsets(&self, force: bool) -> io::Result<()> {
        if !force && !self.inner().state.is_dirty() {
            return Ok(());
        }
        if self.config.fsync != FsyncPolicy::Never {
            self.sync_now()?;
        }
        let synced = self.durability.synced();
        let snapshot = {
            let mut inner = self.inner();
            inner.state.take_dirty();
            inner
                .state
                .snapshot(synced, self.durability.offsets_cover(synced))
        };
        self.durability
            .save_offsets(snapshot, self.config.capacity)
            .inspect_err(|_| self.inner().state.mark_dirty())
    }

    /// The `STATS` fields.
    pub fn stats(&self) -> Vec<(&'static str, StatValue<'_>)> {
        let (held, next_id, cursors, in_flight, held_bytes, segments) = {
            let inner = self.inner();
            let state = &inner.state;
            (
                state.held(),
                state.next_id(),
                state.cursor_count(),
                state.in_flight(),
                inner.log.total_bytes(),
                inner.log.segment_count(),
            )
        };
        let c = &self.counters;
        let count = |a: &AtomicU64| StatValue::Counter(a.load(Ordering::Relaxed));
        let gauge = |a: &AtomicU64| StatValue::Gauge(a.load(Ordering::Relaxed));
        vec![
            ("messages", StatValue::Gauge(held)),
            ("capacity", StatValue::Gauge(self.config.capacity)),
            ("ring", StatValue::Gauge(self.ring.slots())),
            ("held_bytes", StatValue::Gauge(held_bytes)),
            ("max_bytes", StatValue::Gauge(self.config.max_bytes)),
            ("segments", StatValue::Gauge(segments as u64)),
            ("next_id", StatValue::Gauge(next_id)),
            ("stored", count(&c.stored)),
            ("delivered", count(&c.delivered)),
            ("queue_full", count(&c.queue_full)),
            ("persistence_failures", count(&c.persistence_failures)),
            ("fsync_failures", count(&self.durability.fsync_failures)),
            ("connections", gauge(&c.connections)),
            ("producers", gauge(&c.producers)),
            ("consumers", gauge(&c.consumers)),
            ("cursors", StatValue::Gauge(cursors as u64)),
            ("in_flight", StatValue::Gauge(in_flight as u64)),
            ("acked", count(&c.acked)),
            ("redelivered", count(&c.redelivered)),
            ("delivered_from_disk", count(&c.delivered_from_disk)),
            ("refused_full", count(&c.refused_full)),
            ("idle_drops", count(&c.idle_drops)),
            ("auth_failures", count(&c.auth_failures)),
            ("file_bytes", StatValue::Gauge(held_bytes)),
            ("fsync", StatValue::Text(self.config.fsync.name())),
            (
                "uptime_s",
                StatValue::Gauge(self.started.elapsed().as_secs()),
            ),
            ("instance", StatValue::Text(&self.config.instance)),
        ]
    }

    /// Waits until the first message is stored (or [`stop_populating`] is
    /// called), then backs the queue's shared memory with memory ahead of
    /// the senders. An idle broker keeps its small footprint; a busy one
    /// pays for its queue memory at once, on another core, rather than page
    /// by page in the senders' path. Returns the bytes backed.
    ///
    /// [`stop_populating`]: Self::stop_populating
    pub fn populate_queue_when_used(&self) -> usize {
        let mut used = lock(&self.used.0);
        while used.is_none() {
            used = self
                .used
                .1
                .wait(used)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if *used == Some(false) {
            return 0;
        }
        drop(used);
        self.ring.populate(&|| *lock(&self.used.0) == Some(false))
    }

    /// Ends [`populate_queue_when_used`](Self::populate_queue_when_used)
    /// (shutdown).
    pub fn stop_populating(&self) {
        *lock(&self.used.0) = Some(false);
        self.used.1.notify_all();
    }

    /// Called on every store: the first one starts the populating.
    fn mark_used(&self) {
        // A plain load on the hot path; the swap runs once.
        if !self.used_flag.load(Ordering::Relaxed) && !self.used_flag.swap(true, Ordering::Relaxed)
        {
            let mut used = lock(&self.used.0);
            if used.is_none() {
                *used = Some(true);
            }
            self.used.1.notify_all();
        }
    }

    /// Removes the queue's shared memory and semaphores (clean shutdown).
    pub fn remove_queue(&self) -> io::Result<()> {
        self.ring.remove()
    }

    /// Messages held and the next id (for logs).
    pub fn summary(&self) -> (u64, u64) {
        let inner = self.inner();
        (inner.state.held(), inner.state.next_id())
    }
}

/// Serves `count` consecutive messages from `id` on out of the segments,
/// in one read; what cannot be read is answered `ERROR:Persistence
/// failure` (and logged), so the replies stay one per message.
fn serve_from_log(
    (logger, counters): (&Logger, &Counters),
    log: &SegmentLog,
    id: u64,
    count: usize,
    out: &mut Replies<'_>,
) {
    let mut served = 0;
    let read = log.read_each(id, count, u64::MAX, |got, _, content| {
        out(Reply::Msg { id: got, content });
        served += 1;
    });
    counters
        .delivered_from_disk
        .fetch_add(served as u64, Ordering::Relaxed);
    if served < count {
        match read {
            Err(err) => logger.error(format_args!("reading message {id} from the log: {err}")),
            Ok(_) => logger.error(format_args!(
                "reading messages {id}..: the log ended after {served} of {count}"
            )),
        }
        (served..count).for_each(|_| out(Reply::error(ErrorCode::PersistenceFailure)));
    }
}

#[cfg(test)]
mod tests;
