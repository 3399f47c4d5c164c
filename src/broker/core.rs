//! The broker's shared state: the queue, the messages file, the cursors,
//! and the connections waiting for a `NOTIFY`.
//!
//! Locks, in the order they are taken: a worker's own connection write
//! lock (held for a whole batch, so no push lands inside its replies) →
//! `state` (a std `Mutex`) → the ring's SysV MUTEX → the syncer's lock.
//! Pushes to *other* connections only ever `try_lock` their write lock and
//! send without blocking, after `state` is released, so no cycle can form.
//! Nobody waits for room in the ring while holding `state` (senders reserve
//! slots first), and nobody blocks on a socket while holding `state`.
//!
//! Invariants: the ring holds exactly the ids `head..next_id`; every id in
//! it is also in the messages file; a message is removed from the ring only
//! when every cursor has passed it; an `OK:MSG_ID` is produced only after
//! the record's `write` returned (and, under `always`, its fsync); under
//! `always` consumers see a message only once it is fsynced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::cursor::{Cursor, Next};
use crate::log::Logger;
use crate::protocol::{self, ErrorCode};
use crate::queue::Ring;
use crate::store::{self, FsyncPolicy, MessageFile, Offsets, SavedCursor};
use crate::sys::os;

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

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One client connection as other threads see it: a way to write to it
/// and to wake it. The worker serving it owns the reading side.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub stream: TcpStream,
    /// The write lock. Holds bytes a non-blocking push could not send yet;
    /// whoever writes next sends them first.
    pending: Mutex<Vec<u8>>,
    /// A NOTIFY count that could not be written because the worker held
    /// the write lock; sent after its write (or by housekeeping).
    deferred_notify: AtomicU64,
    /// Whether this connection is on the list of consumers to notify when
    /// a message arrives (read and written under `state`).
    armed: AtomicBool,
    /// Batches of GETs answered (counted under `state`), and the value it
    /// had when a push disarmed the connection: a deferred NOTIFY is stale
    /// (the GETs answered it) once they differ.
    gets: AtomicU64,
    disarmed_at: AtomicU64,
}

impl Conn {
    pub fn new(id: u64, stream: TcpStream) -> Conn {
        Conn {
            id,
            stream,
            pending: Mutex::new(Vec::new()),
            deferred_notify: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            gets: AtomicU64::new(0),
            disarmed_at: AtomicU64::new(0),
        }
    }

    /// Takes this connection off the armed list's duty (under `state`):
    /// the caller pushes it a NOTIFY.
    fn disarm_for_push(&self) {
        self.armed.store(false, Ordering::Relaxed);
        self.disarmed_at
            .store(self.gets.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The deferred NOTIFY count, unless a batch of GETs answered since the
    /// push was decided (then the NOTIFY would be a second one, or stale).
    fn take_deferred(&self) -> u64 {
        let count = self.deferred_notify.swap(0, Ordering::AcqRel);
        let current = self.gets.load(Ordering::Relaxed) == self.disarmed_at.load(Ordering::Relaxed);
        if current { count } else { 0 }
    }

    /// Takes the write lock. While a worker holds it, pushes to this
    /// connection are deferred, so a NOTIFY never lands between a batch of
    /// replies and the request that caused them.
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            conn: self,
            pending: lock(&self.pending),
        }
    }

    /// Writes `data` (whole lines) under the write lock.
    pub fn write(&self, data: &[u8]) -> io::Result<()> {
        let mut writer = self.writer();
        writer.write(data)?;
        writer.finish()
    }

    /// Pushes `NOTIFY:MESSAGES_AVAILABLE:<count>` without ever blocking:
    /// what the socket does not take now stays pending.
    fn push_notify(&self, count: u64) {
        let Ok(mut pending) = self.pending.try_lock() else {
            self.deferred_notify.store(count, Ordering::Release);
            return;
        };
        let mut line = Vec::with_capacity(48);
        protocol::write_notify(&mut line, count);
        if pending.is_empty() {
            // On an error the worker sees the broken socket on its side.
            if let Ok(sent) = os::send_nonblocking(&self.stream, &line) {
                pending.extend_from_slice(&line[sent..]);
            }
        } else {
            pending.extend_from_slice(&line);
        }
    }

    /// Sends what pushes left pending, without blocking (housekeeping).
    fn flush_pushes(&self) {
        let Ok(mut pending) = self.pending.try_lock() else {
            return;
        };
        let count = self.take_deferred();
        if count > 0 {
            protocol::write_notify(&mut pending, count);
        }
        if !pending.is_empty()
            && let Ok(sent) = os::send_nonblocking(&self.stream, &pending)
        {
            pending.drain(..sent);
        }
    }
}

/// Pushes the NOTIFYs decided under `state`, after it was released.
fn push_notifies(notify: Vec<(Arc<Conn>, u64)>) {
    for (conn, count) in notify {
        conn.push_notify(count);
    }
}

/// The write lock of a connection, held by its worker for a whole batch.
pub struct Writer<'a> {
    conn: &'a Conn,
    pending: MutexGuard<'a, Vec<u8>>,
}

impl Writer<'_> {
    /// Writes `data` after any pushes still pending. Blocks at most the
    /// socket's write timeout.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let mut stream = &self.conn.stream;
        if !self.pending.is_empty() {
            stream.write_all(&self.pending)?;
            self.pending.clear();
        }
        stream.write_all(data)
    }

    /// Sends the NOTIFY deferred while the lock was held, then unlocks.
    pub fn finish(mut self) -> io::Result<()> {
        let count = self.conn.take_deferred();
        if count > 0 {
            let mut line = Vec::with_capacity(48);
            protocol::write_notify(&mut line, count);
            self.write(&line)?;
        }
        Ok(())
    }
}

struct State {
    file: MessageFile,
    next_id: u64,
    /// The id after the last message consumers may see: `next_id`, except
    /// under `--fsync always`, where a message is shown only once fsynced
    /// (so no consumer ever sees a message a power cut could take back).
    visible_next: u64,
    head: u64,
    next_consumer: u64,
    cursors: HashMap<Arc<[u8]>, Cursor>,
    armed: Vec<(Arc<Conn>, Arc<[u8]>)>,
    /// Bytes of the records `head..next_id` in the messages file.
    live_bytes: u64,
    offsets_dirty: bool,
    scratch: Vec<u8>,
}

/// Group commit: one fsync covers every append made before it started.
struct Syncer {
    state: Mutex<SyncState>,
    done: Condvar,
}

struct SyncState {
    file: Arc<File>,
    /// Last id appended / known durable.
    written: u64,
    synced: u64,
    syncing: bool,
}

impl Syncer {
    /// Returns once every message up to `id` is fsynced; fsyncs itself if
    /// nobody else is, or waits for the fsync under way.
    fn sync_to(&self, id: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        loop {
            if state.synced >= id {
                return Ok(());
            }
            if !state.syncing {
                state.syncing = true;
                let target = state.written;
                let file = Arc::clone(&state.file);
                drop(state);
                let result = file.sync_data();
                state = lock(&self.state);
                state.syncing = false;
                if result.is_ok() {
                    state.synced = state.synced.max(target);
                }
                self.done.notify_all();
                result?;
                continue;
            }
            state = self
                .done
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn written(&self) -> u64 {
        lock(&self.state).written
    }

    fn synced(&self) -> u64 {
        lock(&self.state).synced
    }
}

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
}

/// Persistence failures: logged when they start, every
/// [`FAILURE_LOG_EVERY`] while they go on, and when writes succeed again.
/// While they go on, housekeeping compacts the messages file at the first
/// chance, since a full disk or a file size limit may be what fails.
#[derive(Debug, Default)]
struct Failures {
    streak: Mutex<Option<Streak>>,
    /// Set while writes fail; read by housekeeping.
    failing: AtomicBool,
}

#[derive(Debug)]
struct Streak {
    since: Instant,
    messages: u64,
    last_logged: Instant,
}

/// How often a continuing streak of persistence failures is logged.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

impl Failures {
    fn failed(&self, log: &Logger, messages: usize, err: &io::Error) {
        self.failing.store(true, Ordering::Release);
        let mut streak = lock(&self.streak);
        let now = Instant::now();
        match &mut *streak {
            None => {
                log.error(format_args!(
                    "cannot store messages: {err}; answering ERROR:Persistence failure until writes succeed"
                ));
                *streak = Some(Streak {
                    since: now,
                    messages: messages as u64,
                    last_logged: now,
                });
            }
            Some(streak) => {
                streak.messages += messages as u64;
                if now.duration_since(streak.last_logged) >= FAILURE_LOG_EVERY {
                    streak.last_logged = now;
                    log.error(format_args!(
                        "still cannot store messages: {err} ({} refused in {} s)",
                        streak.messages,
                        streak.since.elapsed().as_secs()
                    ));
                }
            }
        }
    }

    fn succeeded(&self, log: &Logger) {
        if !self.failing.load(Ordering::Acquire) {
            return;
        }
        self.failing.store(false, Ordering::Release);
        if let Some(streak) = lock(&self.streak).take() {
            log.info(format_args!(
                "storing messages works again after {} s ({} message(s) were refused)",
                streak.since.elapsed().as_secs(),
                streak.messages
            ));
        }
    }
}

/// What recovery hands to [`Core::new`].
pub struct Recovered {
    pub file: MessageFile,
    pub next_id: u64,
    pub head: u64,
    pub next_consumer: u64,
    pub cursors: Vec<SavedCursor>,
    pub live_bytes: u64,
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
}

/// The shared heart of the broker.
pub struct Core {
    pub log: Arc<Logger>,
    pub config: CoreConfig,
    pub counters: Counters,
    failures: Failures,
    /// Whether a message was stored yet (`Some(true)`), or the broker is
    /// stopping (`Some(false)`); see `populate_queue_when_used`.
    used: (Mutex<Option<bool>>, Condvar),
    used_flag: AtomicBool,
    ring: Ring,
    state: Mutex<State>,
    sync: Syncer,
    started: Instant,
}

impl Core {
    /// Builds the core over a ring already filled with the ids
    /// `recovered.head..recovered.next_id`.
    pub fn new(
        config: CoreConfig,
        log: Arc<Logger>,
        ring: Ring,
        recovered: Recovered,
    ) -> io::Result<Core> {
        let sync_file = Arc::new(recovered.file.sync_handle()?);
        // What the file holds now counts as durable from here on.
        sync_file.sync_data()?;
        let last = recovered.next_id - 1;
        let now = Instant::now();
        let cursors = recovered
            .cursors
            .into_iter()
            .map(|saved| {
                (
                    Arc::from(saved.id),
                    Cursor::new(saved.offset, saved.ack, now),
                )
            })
            .collect();
        Ok(Core {
            log,
            config,
            counters: Counters::default(),
            failures: Failures::default(),
            used: (Mutex::new(None), Condvar::new()),
            used_flag: AtomicBool::new(false),
            ring,
            state: Mutex::new(State {
                file: recovered.file,
                next_id: recovered.next_id,
                visible_next: recovered.next_id,
                head: recovered.head,
                next_consumer: recovered.next_consumer,
                cursors,
                armed: Vec::new(),
                live_bytes: recovered.live_bytes,
                offsets_dirty: false,
                scratch: Vec::new(),
            }),
            sync: Syncer {
                state: Mutex::new(SyncState {
                    file: sync_file,
                    written: last,
                    synced: last,
                    syncing: false,
                }),
                done: Condvar::new(),
            },
            started: now,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Stores `contents` (each already checked for size) and appends one
    /// reply per message to `out`, in order: `OK:MSG_ID`, or
    /// `ERROR:Queue full` once the ring stayed full past the send timeout
    /// (or `give_up` said so), or `ERROR:Persistence failure`.
    pub fn send_batch(&self, contents: &[&[u8]], out: &mut Vec<u8>, give_up: &dyn Fn() -> bool) {
        let deadline = Instant::now() + self.config.send_timeout;
        let capacity = self.ring.capacity() as usize;
        let mut done = 0;
        while done < contents.len() {
            let want = (contents.len() - done).min(capacity);
            // Fast path: take the slots and the queue's MUTEX in one semop,
            // if there is room for all of them now.
            let mut attempted = want;
            let mut result = self.append(&contents[done..done + want], false);
            if let Ok(None) = result {
                // Not enough room: wait (bounded) for some, without locks.
                let reserved = match self.ring.reserve(want, deadline, give_up) {
                    Ok(n) => n,
                    Err(err) => {
                        self.log.error(format_args!("queue: {err}"));
                        0
                    }
                };
                if reserved == 0 {
                    let rest = contents.len() - done;
                    self.counters
                        .queue_full
                        .fetch_add(rest as u64, Ordering::Relaxed);
                    for _ in 0..rest {
                        ErrorCode::QueueFull.write_line(out);
                    }
                    return;
                }
                attempted = reserved;
                result = self.append(&contents[done..done + reserved], true);
            }
            // What was tried: stored, or failed as a whole.
            let chunk_len = attempted;
            let chunk = &contents[done..done + chunk_len];
            done += chunk_len;
            let result = result.map(|stored| stored.map_or(0, |(first, _)| first));
            let stored = result.and_then(|first| {
                if self.config.fsync == FsyncPolicy::Always {
                    self.sync.sync_to(first + chunk.len() as u64 - 1)?;
                    self.publish(self.sync.synced() + 1);
                }
                Ok(first)
            });
            match stored {
                Ok(first) => {
                    self.failures.succeeded(&self.log);
                    for k in 0..chunk.len() as u64 {
                        protocol::write_msg_id(out, first + k);
                    }
                }
                Err(err) => {
                    self.failures.failed(&self.log, chunk.len(), &err);
                    self.counters
                        .persistence_failures
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    for _ in chunk {
                        ErrorCode::PersistenceFailure.write_line(out);
                    }
                }
            }
        }
    }

    /// Appends `chunk` to the file and the ring; returns the first id and
    /// how many were stored. With `reserved`, the caller already took the
    /// slots; without, they are taken here together with the MUTEX, and
    /// `Ok(None)` says there was not room for all of `chunk` (nothing was
    /// stored). On error nothing is stored and the slots are given back.
    fn append(&self, chunk: &[&[u8]], reserved: bool) -> io::Result<Option<(u64, usize)>> {
        let mut notify: Vec<(Arc<Conn>, u64)> = Vec::new();
        let mut guard = self.state();
        let state = &mut *guard;
        let mut ring = if reserved {
            match self.ring.lock() {
                Ok(ring) => ring,
                Err(err) => {
                    let _ = self.ring.unreserve(chunk.len());
                    return Err(err);
                }
            }
        } else {
            match self.ring.lock_reserving(chunk.len())? {
                Some(ring) => ring,
                None => return Ok(None),
            }
        };
        let first = state.next_id;
        let timestamp = unix_now();
        state.scratch.clear();
        for (k, content) in chunk.iter().enumerate() {
            store::encode_record(&mut state.scratch, first + k as u64, timestamp, content);
        }
        let old_len = state.file.len();
        if let Err(err) = state.file.append(&state.scratch) {
            // Nothing was stored (the file is cut back): give the slots back.
            let _ = ring.unlock_giving_back(chunk.len());
            return Err(err);
        }
        ring.push(timestamp, chunk);
        if let Err(err) = ring.unlock_pushed(chunk.len()) {
            // The semaphores are gone: keep file and ids as they were.
            state.file.cut_back(old_len);
            return Err(err);
        }
        self.mark_used();
        let n = chunk.len() as u64;
        state.next_id += n;
        state.live_bytes += state.scratch.len() as u64;
        lock(&self.sync.state).written = state.next_id - 1;
        self.counters.stored.fetch_add(n, Ordering::Relaxed);
        if self.log.enabled(crate::log::Level::Debug) {
            self.log
                .debug(format_args!("stored messages {first}..={}", first + n - 1));
        }
        if self.config.fsync != FsyncPolicy::Always {
            state.visible_next = state.next_id;
            notify = self.take_armed(state);
        }
        drop(guard);
        push_notifies(notify);
        Ok(Some((first, chunk.len())))
    }

    /// Shows consumers the messages before `visible_next` (under
    /// `--fsync always`, once they are fsynced) and notifies the armed
    /// connections.
    fn publish(&self, visible_next: u64) {
        let mut guard = self.state();
        let state = &mut *guard;
        let visible_next = visible_next.min(state.next_id);
        if visible_next <= state.visible_next {
            return;
        }
        state.visible_next = visible_next;
        let notify = self.take_armed(state);
        drop(guard);
        push_notifies(notify);
    }

    /// Disarms every armed connection whose id has messages to take, and
    /// returns them with the count to notify.
    fn take_armed(&self, state: &mut State) -> Vec<(Arc<Conn>, u64)> {
        let mut notify = Vec::new();
        let (cursors, visible_next) = (&state.cursors, state.visible_next);
        let max = self.config.max_ack_pending;
        state.armed.retain(|(conn, key)| {
            let waiting = cursors
                .get(key)
                .map_or(0, |c| c.deliverable(visible_next, max));
            if waiting == 0 {
                return true;
            }
            conn.disarm_for_push();
            notify.push((Arc::clone(conn), waiting));
            false
        });
        notify
    }

    /// After a batch of GETs (or a registration), which clears any
    /// outstanding NOTIFY: if messages are there to take, the NOTIFY goes
    /// at the end of the replies; otherwise `conn` is armed for the next
    /// arrival. A push decided before this and deferred behind the batch's
    /// replies is dropped (see `Conn::take_deferred`): at most one NOTIFY
    /// until the next GET.
    fn settle_notify(
        &self,
        state: &mut State,
        conn: &Arc<Conn>,
        key: &Arc<[u8]>,
        out: &mut Vec<u8>,
    ) {
        conn.gets.fetch_add(1, Ordering::Relaxed);
        let max = self.config.max_ack_pending;
        let waiting = state
            .cursors
            .get(key)
            .map_or(0, |c| c.deliverable(state.visible_next, max));
        if waiting > 0 {
            if conn.armed.swap(false, Ordering::Relaxed) {
                state.armed.retain(|(armed, _)| armed.id != conn.id);
            }
            protocol::write_notify(out, waiting);
        } else if !conn.armed.swap(true, Ordering::Relaxed) {
            state.armed.push((Arc::clone(conn), Arc::clone(key)));
        }
    }

    /// Pushes a NOTIFY to the armed connections of consumer `key`, if
    /// messages are waiting for it (after a redelivery became possible).
    fn notify_armed(&self, state: &mut State, key: &Arc<[u8]>) -> Vec<(Arc<Conn>, u64)> {
        let max = self.config.max_ack_pending;
        let Some(waiting) = state
            .cursors
            .get(key)
            .map(|c| c.deliverable(state.visible_next, max))
        else {
            return Vec::new();
        };
        if waiting == 0 {
            return Vec::new();
        }
        let mut notify = Vec::new();
        state.armed.retain(|(conn, armed_key)| {
            if armed_key == key {
                conn.disarm_for_push();
                notify.push((Arc::clone(conn), waiting));
                false
            } else {
                true
            }
        });
        notify
    }

    /// Answers `count` pipelined `GET`s for consumer `key` on `conn`:
    /// `MSG:` for each message waiting, then `ERROR:No messages available`.
    /// In ack mode the messages stay in flight until acknowledged, and at
    /// most `max_ack_pending` of them at once. Re-arms the connection for
    /// the next NOTIFY.
    pub fn get_batch(&self, conn: &Arc<Conn>, key: &Arc<[u8]>, count: usize, out: &mut Vec<u8>) {
        let mut state = self.state();
        let state = &mut *state;
        let next_id = state.visible_next;
        let Some(cursor) = state.cursors.get_mut(key) else {
            // Cannot happen: a registered connection keeps its cursor alive.
            for _ in 0..count {
                ErrorCode::NoMessages.write_line(out);
            }
            return;
        };
        let old = cursor.pos;
        let deadline = Instant::now() + self.config.ack_wait;
        let mut delivered = 0u64;
        let mut again = 0u64;
        if let Ok(guard) = self
            .ring
            .lock()
            .inspect_err(|err| self.log.error(format_args!("queue: {err}")))
        {
            for _ in 0..count {
                match cursor.take(next_id, conn.id, deadline, self.config.max_ack_pending) {
                    Next::Message {
                        id,
                        again: redelivery,
                    } => {
                        protocol::write_msg_prefix(out, id);
                        guard.append_content(id, out);
                        out.push(b'\n');
                        delivered += 1;
                        again += u64::from(redelivery);
                    }
                    Next::Nothing | Next::TooManyInFlight => ErrorCode::NoMessages.write_line(out),
                }
            }
            if let Err(err) = guard.unlock() {
                self.log.error(format_args!("queue: {err}"));
            }
        }
        if delivered > 0 {
            self.counters
                .delivered
                .fetch_add(delivered, Ordering::Relaxed);
            self.counters
                .redelivered
                .fetch_add(again, Ordering::Relaxed);
            if self.log.enabled(crate::log::Level::Debug) {
                self.log.debug(format_args!(
                    "delivered {delivered} message(s) ({again} again) to consumer {}",
                    String::from_utf8_lossy(key)
                ));
            }
        }
        let moved = cursor.pos != old;
        self.settle_notify(state, conn, key, out);
        if moved {
            state.offsets_dirty = true;
            if old + 1 == state.head {
                self.release(state);
            }
        }
    }

    /// Answers a run of `ACK:<id>`s from consumer `key`: `OK:ACK:<id>` for
    /// each message in flight (or waiting to go again), else
    /// `ERROR:Unknown message id` (also for every ACK in plain mode).
    pub fn ack_batch(&self, key: &Arc<[u8]>, ids: &[Option<u64>], out: &mut Vec<u8>) {
        let mut guard = self.state();
        let state = &mut *guard;
        let Some(cursor) = state.cursors.get_mut(key) else {
            // Cannot happen: a registered connection keeps its cursor alive.
            for _ in ids {
                ErrorCode::UnknownMessageId.write_line(out);
            }
            return;
        };
        let old = cursor.pos;
        let mut acked = 0;
        for id in ids {
            match id.and_then(|id| cursor.ack(id).map(|_| id)) {
                Some(id) => {
                    acked += 1;
                    out.extend_from_slice(b"OK:ACK:");
                    protocol::push_u64(out, id);
                    out.push(b'\n');
                }
                None => ErrorCode::UnknownMessageId.write_line(out),
            }
        }
        self.counters.acked.fetch_add(acked, Ordering::Relaxed);
        let moved = cursor.pos != old;
        if moved {
            state.offsets_dirty = true;
            if old + 1 == state.head {
                self.release(state);
            }
        }
        // Acks may have made room under --max-ack-pending: every armed
        // connection of the id (this one too) hears of it.
        let notify = if acked > 0 {
            self.notify_armed(state, key)
        } else {
            Vec::new()
        };
        drop(guard);
        push_notifies(notify);
    }

    /// Drops from the ring the messages every cursor has passed.
    fn release(&self, state: &mut State) {
        let Some(min) = state.cursors.values().map(|c| c.pos + 1).min() else {
            return;
        };
        let new_head = min.min(state.next_id);
        if new_head <= state.head {
            return;
        }
        let released = self.ring.lock().and_then(|guard| {
            let mut bytes = 0;
            for id in state.head..new_head {
                let (timestamp, len) = guard.meta(id);
                bytes += store::record_len(id, timestamp, len);
            }
            guard.unlock_released(new_head).map(|()| bytes)
        });
        match released {
            Ok(bytes) => {
                state.live_bytes = state.live_bytes.saturating_sub(bytes);
                state.head = new_head;
            }
            Err(err) => self
                .log
                .error(format_args!("queue: releasing up to {new_head}: {err}")),
        }
    }

    /// Registers `conn` as a consumer under `requested` (or a new id), in
    /// ack mode if `ack`, and appends `OK:CONSUMER:<id>` plus a NOTIFY if
    /// messages are waiting. An existing id keeps the mode it was created
    /// in: asking for the other one is `ERROR:Invalid registration message`.
    pub fn register_consumer(
        &self,
        conn: &Arc<Conn>,
        requested: Option<&[u8]>,
        ack: bool,
        out: &mut Vec<u8>,
    ) -> Result<Arc<[u8]>, ErrorCode> {
        let mut state = self.state();
        let state = &mut *state;
        let key: Arc<[u8]> = match requested {
            Some(id) => match state.cursors.get_key_value(id) {
                Some((key, cursor)) if cursor.is_ack() != ack => {
                    let _ = key;
                    return Err(ErrorCode::InvalidRegistration);
                }
                Some((key, _)) => Arc::clone(key),
                None => Arc::from(id),
            },
            None => loop {
                let candidate = state.next_consumer.to_string();
                state.next_consumer += 1;
                state.offsets_dirty = true;
                if !state.cursors.contains_key(candidate.as_bytes()) {
                    break Arc::from(candidate.as_bytes());
                }
            },
        };
        let head = state.head;
        let cursor = state
            .cursors
            .entry(Arc::clone(&key))
            .or_insert_with(|| Cursor::new(head - 1, ack, Instant::now()));
        cursor.connections += 1;
        let pos = cursor.pos;
        state.offsets_dirty = true;
        protocol::write_consumer_ok(out, &key);
        self.settle_notify(state, conn, &key, out);
        self.log.info(format_args!(
            "connection {} registered as consumer {}{} at offset {pos}",
            conn.id,
            String::from_utf8_lossy(&key),
            if ack { " (ack mode)" } else { "" },
        ));
        Ok(key)
    }

    /// Forgets `conn` as a consumer of `key` (the cursor stays, for its
    /// TTL). In ack mode what it had in flight can go at once to another
    /// connection of the id, which is notified.
    pub fn unregister_consumer(&self, conn: &Arc<Conn>, key: &Arc<[u8]>) {
        let mut guard = self.state();
        let state = &mut *guard;
        if conn.armed.swap(false, Ordering::Relaxed) {
            state.armed.retain(|(armed, _)| armed.id != conn.id);
        }
        let mut released = 0;
        if let Some(cursor) = state.cursors.get_mut(key) {
            cursor.connections = cursor.connections.saturating_sub(1);
            if cursor.connections == 0 {
                cursor.idle_since = Instant::now();
            }
            released = cursor.release_connection(conn.id);
        }
        let notify = if released > 0 {
            self.notify_armed(state, key)
        } else {
            Vec::new()
        };
        drop(guard);
        push_notifies(notify);
    }

    /// Ack mode: messages whose ack wait passed become deliverable again;
    /// armed connections of their ids are notified.
    pub fn expire_acks(&self) {
        let now = Instant::now();
        let mut guard = self.state();
        let state = &mut *guard;
        let mut expired: Vec<Arc<[u8]>> = Vec::new();
        for (key, cursor) in state.cursors.iter_mut() {
            if cursor.in_flight() > 0 && cursor.expire(now) > 0 {
                expired.push(Arc::clone(key));
            }
        }
        let mut notify = Vec::new();
        for key in &expired {
            notify.extend(self.notify_armed(state, key));
        }
        drop(guard);
        push_notifies(notify);
    }

    /// Forgets cursors that have had no connection for the consumer TTL,
    /// and frees the messages only they held.
    pub fn expire_cursors(&self) {
        let ttl = self.config.consumer_ttl;
        let mut state = self.state();
        let before = state.cursors.len();
        let log = &self.log;
        state.cursors.retain(|id, cursor| {
            let keep = cursor.connections > 0 || cursor.idle_since.elapsed() < ttl;
            if !keep {
                log.info(format_args!(
                    "consumer {} expired after {} s without a connection (offset {})",
                    String::from_utf8_lossy(id),
                    ttl.as_secs(),
                    cursor.pos
                ));
            }
            keep
        });
        if state.cursors.len() != before {
            state.offsets_dirty = true;
            self.release(&mut state);
        }
    }

    /// Fsyncs the messages file if anything was written since the last
    /// fsync (the `interval` policy's tick, and shutdown).
    pub fn sync_now(&self) -> io::Result<()> {
        let written = self.sync.written();
        self.sync.sync_to(written)?;
        if self.config.fsync == FsyncPolicy::Always {
            // Messages whose own fsync failed become visible once a later
            // fsync (this one) covers them.
            self.publish(self.sync.synced() + 1);
        }
        Ok(())
    }

    /// Whether messages were written and not yet fsynced.
    pub fn has_unsynced(&self) -> bool {
        let sync = lock(&self.sync.state);
        sync.written > sync.synced
    }

    /// Saves the offsets file if a cursor moved (or `force`). Under
    /// `always` and `interval` the messages file is fsynced first, so an
    /// offset never reaches the disk ahead of the messages it covers.
    pub fn save_offsets(&self, force: bool) -> io::Result<()> {
        if !force && !self.state().offsets_dirty {
            return Ok(());
        }
        if self.config.fsync != FsyncPolicy::Never {
            self.sync_now()?;
        }
        let synced = self.sync.synced();
        let offsets = {
            let mut state = self.state();
            state.offsets_dirty = false;
            self.snapshot(&state, synced)
        };
        store::save_offsets(&self.config.messages_file, &offsets).inspect_err(|_| {
            self.state().offsets_dirty = true;
        })
    }

    /// The offsets as they may go to disk when messages up to `synced` are
    /// durable: NEXT_ID never runs ahead of the durable records, so ids are
    /// never handed out twice and the file's ids stay consecutive.
    fn snapshot(&self, state: &State, synced: u64) -> Offsets {
        let next_id = (synced + 1).min(state.next_id);
        // Under `always` and `interval` no offset may cover a message that
        // is not yet fsynced (some may have been stored and consumed since
        // the fsync that preceded this snapshot). Under `never` nothing is
        // fsynced, and recovery clamps offsets to the records it finds.
        let covered = match self.config.fsync {
            FsyncPolicy::Never => u64::MAX,
            _ => synced,
        };
        let mut consumers: Vec<SavedCursor> = state
            .cursors
            .iter()
            .map(|(id, c)| SavedCursor {
                id: id.to_vec(),
                offset: c.pos.min(covered),
                ack: c.is_ack(),
            })
            .collect();
        consumers.sort();
        Offsets {
            next_id,
            next_consumer: state.next_consumer,
            head: state.head.min(next_id),
            capacity: self.ring.capacity(),
            consumers,
        }
    }

    /// Whether storing messages is failing now (housekeeping then compacts
    /// whenever there is anything to reclaim).
    pub fn writes_failing(&self) -> bool {
        self.failures.failing.load(Ordering::Acquire)
    }

    /// Rewrites the messages file down to the live records when consumed
    /// ones dominate it (or always, with `force`, if any are consumed).
    /// NEXT_ID reaches the offsets file before the records that prove it
    /// are dropped.
    pub fn compact_if_worth_it(&self, force: bool) -> io::Result<()> {
        let mut state = self.state();
        let len = state.file.len();
        let dead = len.saturating_sub(state.live_bytes);
        let worth = if force {
            dead > 0
        } else {
            len >= COMPACT_MIN_BYTES && dead > state.live_bytes
        };
        if !worth {
            return Ok(());
        }
        let last = state.next_id - 1;
        self.sync.sync_to(last)?;
        store::save_offsets(&self.config.messages_file, &self.snapshot(&state, last))?;
        let (head, next_id) = (state.head, state.next_id);
        let guard = self.ring.lock()?;
        let mut records = Vec::with_capacity((next_id - head) as usize);
        for id in head..next_id {
            let (timestamp, _) = guard.meta(id);
            let mut content = Vec::new();
            guard.append_content(id, &mut content);
            records.push((id, timestamp, content));
        }
        guard.unlock()?;
        state
            .file
            .rewrite(records.iter().map(|(id, ts, c)| (*id, *ts, &c[..])))?;
        state.live_bytes = state.file.len();
        state.offsets_dirty = false;
        let mut sync = lock(&self.sync.state);
        sync.file = Arc::new(state.file.sync_handle()?);
        sync.synced = sync.synced.max(last);
        drop(sync);
        self.log.info(format_args!(
            "compacted {}: {len} -> {} bytes ({} live messages)",
            state.file.path().display(),
            state.file.len(),
            next_id - head
        ));
        Ok(())
    }

    /// Sends pushes that could not be sent at once.
    pub fn flush_pushes<'a>(&self, conns: impl Iterator<Item = &'a Arc<Conn>>) {
        for conn in conns {
            conn.flush_pushes();
        }
    }

    /// The `STATS` reply.
    pub fn stats_line(&self, out: &mut Vec<u8>) {
        let (held, next_id, cursors, in_flight, file_len) = {
            let state = self.state();
            (
                state.next_id - state.head,
                state.next_id,
                state.cursors.len(),
                state.cursors.values().map(Cursor::in_flight).sum::<usize>(),
                state.file.len(),
            )
        };
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let text = format!(
            "OK:STATS:messages={held} capacity={} next_id={next_id} stored={} delivered={} \
             queue_full={} persistence_failures={} connections={} producers={} consumers={} \
             cursors={cursors} in_flight={in_flight} acked={} redelivered={} refused_full={} \
             idle_drops={} file_bytes={file_len} fsync={} uptime_s={} instance={}\n",
            self.ring.capacity(),
            load(&c.stored),
            load(&c.delivered),
            load(&c.queue_full),
            load(&c.persistence_failures),
            load(&c.connections),
            load(&c.producers),
            load(&c.consumers),
            load(&c.acked),
            load(&c.redelivered),
            load(&c.refused_full),
            load(&c.idle_drops),
            self.config.fsync.name(),
            self.started.elapsed().as_secs(),
            self.config.instance,
        );
        out.extend_from_slice(text.as_bytes());
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
        let state = self.state();
        (state.next_id - state.head, state.next_id)
    }
}
