//! The broker's decisions, as a pure state machine: which message each
//! consumer gets next, which connections hear a `NOTIFY`, how far the
//! queue may be released, and what the offsets file must say.
//!
//! It takes events (a consumer registers or leaves, messages are stored or
//! synced, a batch of `GET`s or `ACK`s, a clock tick) and returns what must
//! happen (deliver these ids, notify these connections, release up to this
//! id). It does no I/O: no sockets, files, semaphores, shared memory,
//! store or log (tests/it/architecture.rs checks its imports), so every
//! rule here is tested without a socket, a file or a semaphore, and the
//! model test (`state/tests.rs`) runs every short sequence of events
//! against the invariants of docs/architecture.md. The shell that applies the effects
//! is `core.rs`.
//!
//! The queue is the log on disk (issue 9): it holds the ids
//! `head..next_id`, at most `capacity` of them; `head` is the oldest id a
//! cursor still needs (with no cursor at all, messages are held for
//! consumers to come). The ring in shared memory is the shell's window
//! over the newest ids and decides nothing here.
//!
//! Invariants (checked by the model test after every step):
//! - `next_id - head <= capacity`: a store is taken only with room;
//! - every id delivered is held (`head <= id < next_id`) when it is
//!   delivered, so the log still has it;
//! - `visible_next <= next_id`, and under `visible_when_synced` no id at or
//!   past `synced + 1` is ever visible;
//! - a connection gets at most one `NOTIFY` until its next batch of `GET`s;
//! - a plain cursor never gets a message twice; an ack floor never passes
//!   an unacknowledged message;
//! - a release never passes a live cursor (`head <= pos + 1` for each).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cursor::{Cursor, Next};

/// A connection, as the broker numbers them.
pub type ConnId = u64;

/// A consumer id, shared by the cursor and the connections that use it.
pub type ConsumerKey = Arc<[u8]>;

/// The rules the machine applies, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Ack mode: messages one consumer id may hold unacknowledged.
    pub max_ack_pending: usize,
    /// Ack mode: how long a delivered message waits for its ack.
    pub ack_wait: Duration,
    /// How long a cursor with no connection is kept.
    pub consumer_ttl: Duration,
    /// `--fsync always`: a message is visible to consumers only once it is
    /// synced, so no consumer sees what a power cut could take back.
    pub visible_when_synced: bool,
    /// Cursors kept at most: registering a new id past it is refused.
    pub max_consumers: usize,
    /// Messages the queue holds at most (`--capacity`).
    pub capacity: u64,
}

/// Where the machine starts: what recovery found.
#[derive(Debug, Clone, Default)]
pub struct Start {
    pub next_id: u64,
    pub head: u64,
    pub next_consumer: u64,
    pub cursors: Vec<SavedPosition>,
}

/// One cursor as the offsets file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SavedPosition {
    pub id: Vec<u8>,
    pub offset: u64,
    pub ack: bool,
}

/// What the offsets file may say now (see [`State::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub next_id: u64,
    pub next_consumer: u64,
    pub head: u64,
    pub cursors: Vec<SavedPosition>,
}

/// Push `NOTIFY:MESSAGES_AVAILABLE:<count>` to `conn`. `epoch` is the
/// connection's count of `GET` batches when the push was decided: a push
/// that could not be written before the next batch is stale then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify {
    pub conn: ConnId,
    pub count: u64,
    pub epoch: u64,
}

/// Why a registration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// The id exists in the other mode (plain vs ack).
    ModeMismatch,
    /// The connection is registered already.
    AlreadyRegistered,
    /// A new id while `max_consumers` cursors exist (nothing changed).
    TooManyConsumers,
}

/// A registration that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub key: ConsumerKey,
    /// The cursor's position (for the log).
    pub pos: u64,
    /// Messages waiting: a `NOTIFY` with this count follows the reply.
    pub notify: Option<u64>,
    /// The connection's epoch now (see [`Notify::epoch`]).
    pub epoch: u64,
}

/// One message to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub id: u64,
    /// Delivered before (ack mode).
    pub again: bool,
}

/// The answer to a batch of `GET`s: `messages`, then `empty` times
/// `ERROR:No messages available`, then a `NOTIFY` if `notify` says so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Got {
    pub messages: Vec<Delivery>,
    pub empty: usize,
    pub notify: Option<u64>,
    pub epoch: u64,
}

/// The answer to a batch of `ACK`s: per request, the id acknowledged or
/// `None` (unknown), and the pushes the acks made possible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acked {
    pub results: Vec<Option<u64>>,
    pub notify: Vec<Notify>,
}

/// A registered consumer connection.
#[derive(Debug, Clone)]
struct Watcher {
    key: ConsumerKey,
    /// On the list to notify when a message arrives.
    armed: bool,
    /// Batches of `GET`s answered (registration counts as one).
    epoch: u64,
}

/// The broker's state. Cloning it is cheap enough for the model test.
#[derive(Debug, Clone)]
pub struct State {
    rules: Rules,
    next_id: u64,
    /// The id after the last message consumers may see.
    visible_next: u64,
    head: u64,
    next_consumer: u64,
    cursors: HashMap<ConsumerKey, Cursor>,
    watchers: HashMap<ConnId, Watcher>,
    /// Armed connections, in the order they were armed.
    armed: Vec<ConnId>,
    offsets_dirty: bool,
    /// A cursor that held the head moved: a release may be possible.
    release_due: bool,
}

impl State {
    pub fn new(rules: Rules, start: Start, now: Instant) -> State {
        let cursors = start
            .cursors
            .into_iter()
            .map(|saved| {
                (
                    Arc::from(saved.id),
                    Cursor::new(saved.offset, saved.ack, now),
                )
            })
            .collect();
        State {
            rules,
            next_id: start.next_id,
            visible_next: start.next_id,
            head: start.head,
            next_consumer: start.next_consumer,
            cursors,
            watchers: HashMap::new(),
            armed: Vec::new(),
            offsets_dirty: false,
            release_due: true,
        }
    }

    /// The id the next stored message gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The oldest id the queue holds.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The id after the last message consumers may see.
    #[cfg(test)]
    pub fn visible_next(&self) -> u64 {
        self.visible_next
    }

    /// Messages held (`head..next_id`).
    pub fn held(&self) -> u64 {
        self.next_id - self.head
    }

    /// Messages that may be stored now without passing `capacity`.
    pub fn room(&self) -> u64 {
        self.rules.capacity.saturating_sub(self.held())
    }

    pub fn cursor_count(&self) -> usize {
        self.cursors.len()
    }

    /// Messages in flight over every ack-mode cursor.
    pub fn in_flight(&self) -> usize {
        self.cursors.values().map(Cursor::in_flight).sum()
    }

    /// The position of consumer `id`'s cursor, if it exists.
    #[cfg(test)]
    pub fn cursor_pos(&self, id: &[u8]) -> Option<u64> {
        self.cursors.get(id).map(|c| c.pos)
    }

    /// Whether a cursor or the next ids changed since the last
    /// [`take_dirty`](Self::take_dirty).
    pub fn is_dirty(&self) -> bool {
        self.offsets_dirty
    }

    /// Clears the dirty flag; the caller saves the offsets (and calls
    /// [`mark_dirty`](Self::mark_dirty) if that fails).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.offsets_dirty)
    }

    pub fn mark_dirty(&mut self) {
        self.offsets_dirty = true;
    }

    /// Registers `conn` as a consumer under `requested` (or a new id the
    /// broker assigns), in ack mode if `ack`. An existing id keeps the mode
    /// it was created in.
    pub fn register(
        &mut self,
        conn: ConnId,
        requested: Option<&[u8]>,
        ack: bool,
        now: Instant,
    ) -> Result<Registered, RegisterError> {
        if self.watchers.contains_key(&conn) {
            return Err(RegisterError::AlreadyRegistered);
        }
        // Refused before anything changes (an assigned id is not used up).
        let known = requested.is_some_and(|id| self.cursors.contains_key(id));
        if !known && self.cursors.len() >= self.rules.max_consumers {
            return Err(RegisterError::TooManyConsumers);
        }
        let key = match requested {
            Some(id) => match self.cursors.get_key_value(id) {
                Some((_, cursor)) if cursor.is_ack() != ack => {
                    return Err(RegisterError::ModeMismatch);
                }
                Some((key, _)) => Arc::clone(key),
                None => Arc::from(id),
            },
            None => self.assign_id(),
        };
        let head = self.head;
        let cursor = self
            .cursors
            .entry(Arc::clone(&key))
            .or_insert_with(|| Cursor::new(head - 1, ack, now));
        cursor.connections += 1;
        let pos = cursor.pos;
        self.offsets_dirty = true;
        self.watchers.insert(
            conn,
            Watcher {
                key: Arc::clone(&key),
                armed: false,
                epoch: 0,
            },
        );
        let (notify, epoch) = self.settle(conn);
        Ok(Registered {
            key,
            pos,
            notify,
            epoch,
        })
    }

    /// A new decimal id no cursor has.
    fn assign_id(&mut self) -> ConsumerKey {
        loop {
            let candidate = self.next_consumer.to_string();
            self.next_consumer += 1;
            self.offsets_dirty = true;
            if !self.cursors.contains_key(candidate.as_bytes()) {
                return Arc::from(candidate.as_bytes());
            }
        }
    }

    /// Consumer connection `conn` is gone. Its cursor stays (for the TTL);
    /// in ack mode what it had in flight can go to another connection of
    /// the id at once, which is notified.
    pub fn unregister(&mut self, conn: ConnId, now: Instant) -> Vec<Notify> {
        let Some(watcher) = self.watchers.remove(&conn) else {
            return Vec::new();
        };
        if watcher.armed {
            self.armed.retain(|&armed| armed != conn);
        }
        let mut released = 0;
        if let Some(cursor) = self.cursors.get_mut(&watcher.key) {
            cursor.connections = cursor.connections.saturating_sub(1);
            if cursor.connections == 0 {
                cursor.idle_since = now;
            }
            released = cursor.release_connection(conn);
        }
        if released > 0 {
            self.notify_armed_of(&watcher.key)
        } else {
            Vec::new()
        }
    }

    /// `count` messages were stored (log and ring) as the ids from
    /// `next_id` on; the shell took at most [`room`](Self::room). Unless
    /// they wait for their fsync, armed connections with something to take
    /// are notified.
    pub fn stored(&mut self, count: u64) -> Vec<Notify> {
        assert!(
            count <= self.room(),
            "stored {count} with room for {}",
            self.room()
        );
        self.next_id += count;
        if self.rules.visible_when_synced {
            return Vec::new();
        }
        self.visible_next = self.next_id;
        self.take_armed()
    }

    /// Every message up to `through` is on disk: under
    /// `visible_when_synced` they become visible.
    pub fn synced(&mut self, through: u64) -> Vec<Notify> {
        let visible_next = through.saturating_add(1).min(self.next_id);
        if visible_next <= self.visible_next {
            return Vec::new();
        }
        self.visible_next = visible_next;
        self.take_armed()
    }

    /// The messages from `new_next` on were cut from the log and the ring
    /// (their fsync failed, so they were answered `ERROR:`). Only messages
    /// nobody could see may be cut.
    pub fn cut_back(&mut self, new_next: u64) {
        assert!(
            self.visible_next <= new_next && self.head <= new_next && new_next <= self.next_id,
            "cut back to {new_next} outside {}..={}",
            self.visible_next.max(self.head),
            self.next_id
        );
        self.next_id = new_next;
    }

    /// Answers a batch of `count` `GET`s from consumer connection `conn`.
    pub fn get(&mut self, conn: ConnId, count: usize, now: Instant) -> Got {
        let Some(key) = self.watchers.get(&conn).map(|w| Arc::clone(&w.key)) else {
            return Got {
                empty: count,
                ..Got::default()
            };
        };
        let (visible_next, max, head) = (self.visible_next, self.rules.max_ack_pending, self.head);
        let deadline = now + self.rules.ack_wait;
        let mut got = Got::default();
        if let Some(cursor) = self.cursors.get_mut(&key) {
            let old = cursor.pos;
            for _ in 0..count {
                match cursor.take(visible_next, conn, deadline, max) {
                    Next::Message { id, again } => got.messages.push(Delivery { id, again }),
                    Next::Nothing | Next::TooManyInFlight => break,
                }
            }
            if cursor.pos != old {
                self.offsets_dirty = true;
                self.release_due |= old + 1 == head;
            }
        }
        got.empty = count - got.messages.len();
        (got.notify, got.epoch) = self.settle(conn);
        got
    }

    /// Answers a run of `ACK`s from consumer connection `conn`: each id in
    /// flight (or waiting to go again) is acknowledged; anything else is
    /// unknown (every `ACK` is, in plain mode).
    pub fn ack(&mut self, conn: ConnId, ids: &[Option<u64>]) -> Acked {
        let key = self.watchers.get(&conn).map(|w| Arc::clone(&w.key));
        let Some(cursor) = key.as_ref().and_then(|key| self.cursors.get_mut(key)) else {
            return Acked {
                results: vec![None; ids.len()],
                notify: Vec::new(),
            };
        };
        let old = cursor.pos;
        let results: Vec<Option<u64>> = ids
            .iter()
            .map(|id| id.and_then(|id| cursor.ack(id).map(|_| id)))
            .collect();
        if cursor.pos != old {
            self.offsets_dirty = true;
            self.release_due |= old + 1 == self.head;
        }
        // Acks may have made room under --max-ack-pending: every armed
        // connection of the id (this one too) hears of it.
        let notify = match key {
            Some(key) if results.iter().any(Option::is_some) => self.notify_armed_of(&key),
            _ => Vec::new(),
        };
        Acked { results, notify }
    }

    /// Ack mode: messages whose ack wait passed by `now` become
    /// deliverable again; armed connections of their ids are notified.
    pub fn expire_acks(&mut self, now: Instant) -> Vec<Notify> {
        let expired: Vec<ConsumerKey> = self
            .cursors
            .iter_mut()
            .filter(|(_, cursor)| cursor.in_flight() > 0)
            .filter_map(|(key, cursor)| (cursor.expire(now) > 0).then(|| Arc::clone(key)))
            .collect();
        expired
            .iter()
            .flat_map(|key| self.notify_armed_of(key))
            .collect()
    }

    /// Forgets the cursors that have had no connection for the consumer
    /// TTL; returns them (id and position) for the log.
    pub fn expire_cursors(&mut self, now: Instant) -> Vec<(ConsumerKey, u64)> {
        let ttl = self.rules.consumer_ttl;
        let mut gone = Vec::new();
        self.cursors.retain(|key, cursor| {
            let keep =
                cursor.connections > 0 || now.saturating_duration_since(cursor.idle_since) < ttl;
            if !keep {
                gone.push((Arc::clone(key), cursor.pos));
            }
            keep
        });
        if !gone.is_empty() {
            self.offsets_dirty = true;
            self.release_due = true;
        }
        gone
    }

    /// The new head if messages every cursor has passed can be released;
    /// the shell deletes the segments wholly before it and calls
    /// [`released`](Self::released). With no cursor at all, messages are
    /// held for consumers to come.
    pub fn take_release(&mut self) -> Option<u64> {
        if !std::mem::take(&mut self.release_due) {
            return None;
        }
        let min = self.cursors.values().map(|c| c.pos + 1).min()?;
        let new_head = min.min(self.next_id);
        (new_head > self.head).then_some(new_head)
    }

    /// The shell released the queue up to `new_head`.
    pub fn released(&mut self, new_head: u64) {
        assert!(
            self.head <= new_head && new_head <= self.next_id,
            "release to {new_head} outside {}..={}",
            self.head,
            self.next_id
        );
        self.head = new_head;
    }

    /// The offsets as they may go to disk when the messages up to `synced`
    /// are durable: NEXT_ID never runs ahead of the durable records, and no
    /// offset covers a message past `covered` (the caller passes `synced`,
    /// or `u64::MAX` under `--fsync never`, where recovery clamps).
    pub fn snapshot(&self, synced: u64, covered: u64) -> Snapshot {
        let next_id = synced.saturating_add(1).min(self.next_id);
        let mut cursors: Vec<SavedPosition> = self
            .cursors
            .iter()
            .map(|(id, c)| SavedPosition {
                id: id.to_vec(),
                offset: c.pos.min(covered),
                ack: c.is_ack(),
            })
            .collect();
        cursors.sort();
        Snapshot {
            next_id,
            next_consumer: self.next_consumer,
            head: self.head.min(next_id),
            cursors,
        }
    }

    /// After a batch of `GET`s (or a registration), which clears any
    /// outstanding NOTIFY: if messages are there to take, the NOTIFY goes
    /// at the end of the replies; otherwise `conn` is armed for the next
    /// arrival. Returns that NOTIFY's count and the connection's epoch.
    fn settle(&mut self, conn: ConnId) -> (Option<u64>, u64) {
        let (visible_next, max) = (self.visible_next, self.rules.max_ack_pending);
        let Some(watcher) = self.watchers.get_mut(&conn) else {
            return (None, 0);
        };
        watcher.epoch += 1;
        let epoch = watcher.epoch;
        let waiting = self
            .cursors
            .get(&watcher.key)
            .map_or(0, |c| c.deliverable(visible_next, max));
        if waiting > 0 {
            if std::mem::take(&mut watcher.armed) {
                self.armed.retain(|&armed| armed != conn);
            }
            return (Some(waiting), epoch);
        }
        if !watcher.armed {
            watcher.armed = true;
            self.armed.push(conn);
        }
        (None, epoch)
    }

    /// Disarms every armed connection whose id has messages to take, and
    /// returns the pushes.
    fn take_armed(&mut self) -> Vec<Notify> {
        self.take_armed_where(|_| true)
    }

    /// Pushes to the armed connections of consumer `key`, if messages are
    /// waiting for it (after a redelivery became possible).
    fn notify_armed_of(&mut self, key: &ConsumerKey) -> Vec<Notify> {
        self.take_armed_where(|watched| watched == key)
    }

    fn take_armed_where(&mut self, select: impl Fn(&ConsumerKey) -> bool) -> Vec<Notify> {
        let (visible_next, max) = (self.visible_next, self.rules.max_ack_pending);
        let (cursors, watchers) = (&self.cursors, &mut self.watchers);
        let mut notify = Vec::new();
        self.armed.retain(|&conn| {
            let Some(watcher) = watchers.get_mut(&conn) else {
                return false;
            };
            if !select(&watcher.key) {
                return true;
            }
            let waiting = cursors
                .get(&watcher.key)
                .map_or(0, |c| c.deliverable(visible_next, max));
            if waiting == 0 {
                return true;
            }
            watcher.armed = false;
            notify.push(Notify {
                conn,
                count: waiting,
                epoch: watcher.epoch,
            });
            false
        });
        notify
    }
}

#[cfg(test)]
mod tests;
