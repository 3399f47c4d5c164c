//! The shell around the broker's state machine: it applies what
//! [`State`](super::state::State) decides to the ring in shared memory,
//! the messages file and the sockets, and hands typed replies to the
//! session, which encodes them.
//!
//! Locks, in the order they are taken: a worker's own connection write
//! lock (held for a whole batch, so no push lands inside its replies) →
//! `inner` (the state machine, the messages file) → the ring's SysV MUTEX
//! → the durability lock. Pushes to *other* connections are sent after
//! `inner` is released and only ever `try_lock` their write lock, so no
//! cycle can form. Nobody waits for room in the ring while holding
//! `inner` (senders reserve slots first), and nobody blocks on a socket
//! while holding it.
//!
//! Invariants: the ring holds exactly the ids `head..next_id`; every id in
//! it is also in the messages file; an `OK:MSG_ID` is produced only after
//! the record's write returned (and, under `always`, its fsync); a SEND
//! answered `ERROR:` is never delivered. With one process attached, the
//! ring's MUTEX is always taken inside `inner`, so it never makes anyone
//! wait; it is there for any other process that reads the ring.

use std::collections::VecDeque;
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
use crate::store::{self, FsyncPolicy, MessageFile};

/// Below this size the messages file is never compacted: rewriting tiny
/// files often would cost more than the disk it saves.
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// Seconds since the Unix epoch, 0 if the clock is before it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The content of message `id` read from the messages file, when its ring
/// slot cannot be trusted. The records `head..next_id` are the file's last
/// `live_bytes` bytes and `record_lens` are their lengths (the broker's
/// own account), so the offset of `id` is known without a scan.
fn content_from_file(
    file: &MessageFile,
    (record_lens, live_bytes): (&VecDeque<u32>, u64),
    head: u64,
    id: u64,
) -> io::Result<Vec<u8>> {
    let index = usize::try_from(id - head).map_err(io::Error::other)?;
    let before: u64 = record_lens.iter().take(index).map(|&n| u64::from(n)).sum();
    let offset = file
        .len()
        .checked_sub(live_bytes)
        .map(|start| start + before)
        .ok_or_else(|| io::Error::other("fewer bytes in the messages file than live records"))?;
    let len = record_lens
        .get(index)
        .map(|&n| u64::from(n))
        .ok_or_else(|| io::Error::other(format!("message {id} is not held")))?;
    file.read_record_of_len(offset, id, len)
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
}

/// What `inner` guards.
struct Inner {
    state: State,
    file: MessageFile,
    /// Record bytes of the ids `head..next_id`, oldest first: the broker's
    /// own account, never read back from the segment.
    record_lens: VecDeque<u32>,
    live_bytes: u64,
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
    started: Instant,
}

impl Core {
    /// Builds the core over a ring already filled with the ids
    /// `recovered.start.head..recovered.start.next_id`.
    pub fn new(
        config: CoreConfig,
        log: Arc<Logger>,
        ring: Ring,
        recovered: Recovered,
    ) -> io::Result<Core> {
        // What the file holds now counts as durable from here on.
        recovered.file.sync()?;
        let last = recovered.start.next_id - 1;
        let durability = Durability::new(
            config.fsync,
            recovered.file.disk().clone(),
            config.messages_file.clone(),
            recovered.file.sync_handle(),
            last,
            recovered.file.len(),
        );
        let rules = Rules {
            max_ack_pending: config.max_ack_pending,
            ack_wait: config.ack_wait,
            consumer_ttl: config.consumer_ttl,
            visible_when_synced: config.fsync == FsyncPolicy::Always,
            max_consumers: config.max_consumers,
        };
        let now = Instant::now();
        let live_bytes = recovered.record_lens.iter().map(|&n| u64::from(n)).sum();
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
                file: recovered.file,
                record_lens: recovered.record_lens,
                live_bytes,
                scratch: Vec::new(),
                content: Vec::new(),
            }),
            started: now,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Stores `contents` (each already checked for size) and answers one
    /// reply per message, in order: `OK:MSG_ID`, or `ERROR:Queue full` once
    /// the ring stayed full past the send timeout (or `give_up` said so),
    /// or `ERROR:Persistence failure`.
    pub fn send_batch(
        &self,
        contents: &[&[u8]],
        out: &mut Replies<'_>,
        give_up: &dyn Fn() -> bool,
    ) {
        let deadline = Instant::now() + self.config.send_timeout;
        let capacity = self.ring.capacity() as usize;
        let mut done = 0;
        while done < contents.len() {
            let want = (contents.len() - done).min(capacity);
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
        // Fast path: take the slots and the queue's MUTEX in one semop, if
        // there is room for all of them now.
        let mut attempted = chunk.len();
        let mut result = self.append(chunk, false);
        if let Ok(None) = result {
            // Not enough room: wait (bounded) for some, without locks.
            let reserved = self
                .ring
                .reserve(chunk.len(), deadline, give_up)
                .unwrap_or_else(|err| {
                    self.log.error(format_args!("queue: {err}"));
                    0
                });
            if reserved == 0 {
                return Chunk::Full;
            }
            attempted = reserved;
            result = self.append(&chunk[..reserved], true);
        }
        let first = match result {
            Ok(Some(first)) => first,
            Ok(None) => unreachable!("reserved slots always take the append"),
            Err(err) => {
                self.durability.store_failed(&self.log, attempted, &err);
                return Chunk::Failed { count: attempted };
            }
        };
        if self.config.fsync == FsyncPolicy::Always {
            if let Err(failure) = self.durability.sync_to(first + attempted as u64 - 1) {
                self.durability.store_failed(&self.log, attempted, &failure);
                self.cut_unsynced(failure.generation);
                return Chunk::Failed { count: attempted };
            }
            self.publish_synced();
        }
        self.durability.store_succeeded(&self.log);
        Chunk::Stored {
            first,
            count: attempted,
        }
    }

    /// Appends `chunk` to the file and the ring; returns the first id.
    /// With `reserved`, the caller already took the slots; without, they
    /// are taken here together with the MUTEX, and `Ok(None)` says there
    /// was not room for all of `chunk` (nothing was stored). On error
    /// nothing is stored and the slots are given back.
    fn append(&self, chunk: &[&[u8]], reserved: bool) -> io::Result<Option<u64>> {
        let mut guard = self.inner();
        let inner = &mut *guard;
        // Checked under the lock, so no append slips in between a failed
        // fsync and the cut back that follows it.
        if let Some(reason) = self.durability.refusing() {
            if reserved {
                let _ = self.ring.unreserve(chunk.len());
            }
            return Err(io::Error::other(reason));
        }
        let mut ring = if reserved {
            self.ring.lock().inspect_err(|_| {
                let _ = self.ring.unreserve(chunk.len());
            })?
        } else {
            match self.ring.lock_reserving(chunk.len())? {
                Some(ring) => ring,
                None => return Ok(None),
            }
        };
        let first = inner.state.next_id();
        let timestamp = unix_now();
        inner.scratch.clear();
        for (k, content) in chunk.iter().enumerate() {
            let before = inner.scratch.len();
            store::encode_record(&mut inner.scratch, first + k as u64, timestamp, content);
            inner
                .record_lens
                .push_back((inner.scratch.len() - before) as u32);
        }
        let old_len = inner.file.len();
        let written = inner.file.append(&inner.scratch);
        if let Err(err) = written {
            // Nothing was stored (the file is cut back): give the slots back.
            inner
                .record_lens
                .truncate(inner.record_lens.len() - chunk.len());
            let _ = ring.unlock_giving_back(chunk.len());
            return Err(err);
        }
        if let Err(err) = ring.push(timestamp, chunk) {
            // The ring had no room for what was reserved (its counts were
            // changed from outside): store nothing.
            inner
                .record_lens
                .truncate(inner.record_lens.len() - chunk.len());
            let _ = inner.file.cut_back(old_len);
            let _ = ring.unlock_giving_back(chunk.len());
            return Err(err);
        }
        if let Err(err) = ring.unlock_pushed(chunk.len()) {
            // The semaphores are gone: keep file and ids as they were.
            inner
                .record_lens
                .truncate(inner.record_lens.len() - chunk.len());
            let _ = inner.file.cut_back(old_len);
            return Err(err);
        }
        self.mark_used();
        let n = chunk.len() as u64;
        inner.live_bytes += inner.scratch.len() as u64;
        let pushes = inner.state.stored(n);
        self.durability.appended(first + n - 1, inner.file.len());
        drop(guard);
        self.counters.stored.fetch_add(n, Ordering::Relaxed);
        if self.log.enabled(Level::Debug) {
            self.log
                .debug(format_args!("stored messages {first}..={}", first + n - 1));
        }
        self.conns.push(&pushes);
        Ok(Some(first))
    }

    /// Under `always`, after the failed fsync `generation`: cuts every
    /// message written since the last good fsync from the file and the
    /// ring (nobody saw them; their senders are told `ERROR:`). If that
    /// cannot be done, SENDs stay refused until a restart.
    fn cut_unsynced(&self, generation: u64) {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let Some((synced, synced_len)) = self.durability.cut_point(generation) else {
            return;
        };
        let new_next = synced + 1;
        let count = (inner.state.next_id() - new_next) as usize;
        let ok = inner
            .file
            .cut_back(synced_len)
            .and_then(|()| inner.file.sync());
        let ok = ok.and_then(|()| self.ring.lock()?.unlock_dropping_newest(count));
        if let Err(err) = &ok {
            self.log
                .error(format_args!("cutting back unsynced messages: {err}"));
        } else {
            inner.state.cut_back(new_next);
            let keep = inner.record_lens.len() - count;
            let cut: u64 = inner.record_lens.drain(keep..).map(u64::from).sum();
            inner.live_bytes -= cut;
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
    /// are waiting.
    pub fn get_batch(&self, conn: &Conn, count: usize, out: &mut Replies<'_>) {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let ring = match self.ring.lock() {
            Ok(ring) => ring,
            Err(err) => {
                self.log.error(format_args!("queue: {err}"));
                (0..count).for_each(|_| out(Reply::error(ErrorCode::NoMessages)));
                return;
            }
        };
        let got = inner.state.get(conn.id, count, Instant::now());
        conn.set_epoch(got.epoch);
        for delivery in &got.messages {
            inner.content.clear();
            if let Err(mismatch) = ring.append_content(delivery.id, &mut inner.content) {
                // The slot was overwritten from outside: the messages file
                // is the queue of record.
                let head = inner.state.head();
                let lens = (&inner.record_lens, inner.live_bytes);
                match content_from_file(&inner.file, lens, head, delivery.id) {
                    Ok(content) => inner.content = content,
                    Err(err) => {
                        self.log.error(format_args!("{mismatch}; and {err}"));
                        out(Reply::error(ErrorCode::PersistenceFailure));
                        continue;
                    }
                }
                self.log.error(format_args!(
                    "{mismatch}; message {} served from the messages file",
                    delivery.id
                ));
            }
            out(Reply::Msg {
                id: delivery.id,
                content: &inner.content,
            });
        }
        if let Err(err) = ring.unlock() {
            self.log.error(format_args!("queue: {err}"));
        }
        (0..got.empty).for_each(|_| out(Reply::error(ErrorCode::NoMessages)));
        if let Some(waiting) = got.notify {
            out(Reply::Notify(waiting));
        }
        self.release(inner);
        drop(guard);
        self.count_deliveries(conn, &got.messages);
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

    /// Drops from the ring the messages every cursor has passed.
    fn release(&self, inner: &mut Inner) {
        let Some(new_head) = inner.state.take_release() else {
            return;
        };
        match self
            .ring
            .lock()
            .and_then(|ring| ring.unlock_released(new_head))
        {
            Ok(()) => {
                let count = (new_head - inner.state.head()) as usize;
                let freed: u64 = inner.record_lens.drain(..count).map(u64::from).sum();
                inner.live_bytes -= freed;
                inner.state.released(new_head);
            }
            Err(err) => self
                .log
                .error(format_args!("queue: releasing up to {new_head}: {err}")),
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

    /// Fsyncs the messages file if anything was written since the last
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
    /// `always` and `interval` the messages file is fsynced first, so an
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
            .save_offsets(snapshot, self.ring.capacity())
            .inspect_err(|_| self.inner().state.mark_dirty())
    }

    /// Rewrites the messages file down to the live records when consumed
    /// ones dominate it (or always, with `force`, if any are consumed).
    /// NEXT_ID reaches the offsets file before the records that prove it
    /// are dropped.
    pub fn compact_if_worth_it(&self, force: bool) -> io::Result<()> {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let len = inner.file.len();
        let dead = len - inner.live_bytes;
        let worth = if force {
            dead > 0
        } else {
            len >= COMPACT_MIN_BYTES && dead > inner.live_bytes
        };
        if !worth {
            return Ok(());
        }
        let last = inner.state.next_id() - 1;
        self.durability
            .sync_to(last)
            .map_err(|failure| failure.error)?;
        let snapshot = inner.state.snapshot(last, last);
        self.durability
            .save_offsets(snapshot, self.ring.capacity())?;
        inner.state.take_dirty();
        inner.file.compact_from(dead)?;
        self.durability
            .replaced_file(inner.file.sync_handle(), last, inner.file.len());
        self.log.info(format_args!(
            "compacted {}: {len} -> {} bytes ({} live messages)",
            inner.file.path().display(),
            inner.file.len(),
            inner.state.held()
        ));
        Ok(())
    }

    /// The `STATS` fields.
    pub fn stats(&self) -> Vec<(&'static str, StatValue<'_>)> {
        let (held, next_id, cursors, in_flight, file_len) = {
            let inner = self.inner();
            let state = &inner.state;
            let held = state.held();
            (
                held,
                state.next_id(),
                state.cursor_count(),
                state.in_flight(),
                inner.file.len(),
            )
        };
        let c = &self.counters;
        let count = |a: &AtomicU64| StatValue::Counter(a.load(Ordering::Relaxed));
        let gauge = |a: &AtomicU64| StatValue::Gauge(a.load(Ordering::Relaxed));
        vec![
            ("messages", StatValue::Gauge(held)),
            ("capacity", StatValue::Gauge(self.ring.capacity())),
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
            ("refused_full", count(&c.refused_full)),
            ("idle_drops", count(&c.idle_drops)),
            ("auth_failures", count(&c.auth_failures)),
            ("file_bytes", StatValue::Gauge(file_len)),
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

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
