//! A consumer id's cursor: which messages it has consumed, and in ack mode
//! which ones are in flight, waiting to be delivered again, or
//! acknowledged out of order.
//!
//! Plain mode: `pos` is the last message delivered; a `GET` consumes.
//! Ack mode: `pos` is the ack floor (every id up to it acknowledged);
//! every id in `pos + 1 ..= delivered_to` is in exactly one of
//! `in_flight`, `redeliver` and `acked`. The floor is what is saved to
//! disk, so a restart delivers again whatever was in flight (at least
//! once). This module is pure bookkeeping: no locks, sockets or queue.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// A message handed out in ack mode and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The connection it went to.
    conn: u64,
    /// When it becomes deliverable again without an ack.
    deadline: Instant,
}

#[derive(Debug, Default, Clone)]
struct AckState {
    /// The highest id ever handed out (at least `pos`).
    delivered_to: u64,
    in_flight: BTreeMap<u64, Pending>,
    redeliver: BTreeSet<u64>,
    acked: BTreeSet<u64>,
}

/// One consumer id's position.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// Plain mode: id of the last message consumed (0 before the first).
    /// Ack mode: the ack floor.
    pub pos: u64,
    /// Connections registered under this id now.
    pub connections: u32,
    /// When the last connection left (meaningful when `connections == 0`).
    pub idle_since: Instant,
    ack: Option<Box<AckState>>,
}

/// What handing out the next message found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Deliver this id; `again` when it was delivered before.
    Message { id: u64, again: bool },
    /// Nothing is waiting.
    Nothing,
    /// Ack mode: too many messages in flight already.
    TooManyInFlight,
}

impl Cursor {
    /// A cursor at `pos`, in ack mode if `ack`.
    pub fn new(pos: u64, ack: bool, now: Instant) -> Cursor {
        let ack = ack.then(|| {
            Box::new(AckState {
                delivered_to: pos,
                ..AckState::default()
            })
        });
        Cursor {
            pos,
            connections: 0,
            idle_since: now,
            ack,
        }
    }

    pub fn is_ack(&self) -> bool {
        self.ack.is_some()
    }

    /// Messages waiting for this id when the queue's next id is `next_id`.
    pub fn waiting(&self, next_id: u64) -> u64 {
        match &self.ack {
            None => next_id - 1 - self.pos,
            Some(ack) => next_id - 1 - ack.delivered_to + ack.redeliver.len() as u64,
        }
    }

    /// Messages a `GET` could take now: those waiting, unless ack mode's
    /// bound on messages in flight is reached.
    pub fn deliverable(&self, next_id: u64, max_in_flight: usize) -> u64 {
        if self.in_flight() >= max_in_flight {
            0
        } else {
            self.waiting(next_id)
        }
    }

    /// Messages in flight (ack mode; 0 in plain mode).
    pub fn in_flight(&self) -> usize {
        self.ack.as_ref().map_or(0, |ack| ack.in_flight.len())
    }

    /// Hands out the next message for `conn`: in ack mode, first one to
    /// deliver again, then the next new one, at most `max_in_flight` at a
    /// time, each to be acknowledged by `deadline`.
    pub fn take(
        &mut self,
        next_id: u64,
        conn: u64,
        deadline: Instant,
        max_in_flight: usize,
    ) -> Next {
        let Some(ack) = &mut self.ack else {
            if self.pos + 1 < next_id {
                self.pos += 1;
                return Next::Message {
                    id: self.pos,
                    again: false,
                };
            }
            return Next::Nothing;
        };
        if ack.in_flight.len() >= max_in_flight {
            return Next::TooManyInFlight;
        }
        let (id, again) = match ack.redeliver.pop_first() {
            Some(id) => (id, true),
            None if ack.delivered_to + 1 < next_id => {
                ack.delivered_to += 1;
                (ack.delivered_to, false)
            }
            None => return Next::Nothing,
        };
        ack.in_flight.insert(id, Pending { conn, deadline });
        Next::Message { id, again }
    }

    /// Acknowledges `id`. Returns `None` if it is not a message handed out
    /// and unacknowledged (or the cursor is not in ack mode), else whether
    /// the floor moved.
    pub fn ack(&mut self, id: u64) -> Option<bool> {
        let ack = self.ack.as_mut()?;
        if ack.in_flight.remove(&id).is_none() && !ack.redeliver.remove(&id) {
            return None;
        }
        ack.acked.insert(id);
        let old = self.pos;
        while ack.acked.remove(&(self.pos + 1)) {
            self.pos += 1;
        }
        Some(self.pos != old)
    }

    /// Connection `conn` is gone: what it had in flight can be delivered
    /// again at once. Returns how many messages that was.
    pub fn release_connection(&mut self, conn: u64) -> usize {
        let Some(ack) = &mut self.ack else { return 0 };
        let gone: Vec<u64> = ack
            .in_flight
            .iter()
            .filter(|(_, p)| p.conn == conn)
            .map(|(&id, _)| id)
            .collect();
        for id in &gone {
            ack.in_flight.remove(id);
            ack.redeliver.insert(*id);
        }
        gone.len()
    }

    /// Messages whose ack wait passed by `now` become deliverable again.
    /// Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let Some(ack) = &mut self.ack else { return 0 };
        let late: Vec<u64> = ack
            .in_flight
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in &late {
            ack.in_flight.remove(id);
            ack.redeliver.insert(*id);
        }
        late.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn plain_mode_consumes_as_it_delivers() {
        let now = Instant::now();
        let mut cursor = Cursor::new(0, false, now);
        assert_eq!(cursor.waiting(3), 2);
        assert_eq!(
            cursor.take(3, 1, now, 10),
            Next::Message {
                id: 1,
                again: false
            }
        );
        assert_eq!(
            cursor.take(3, 1, now, 10),
            Next::Message {
                id: 2,
                again: false
            }
        );
        assert_eq!(cursor.take(3, 1, now, 10), Next::Nothing);
        assert_eq!(cursor.pos, 2);
        assert_eq!(cursor.ack(1), None);
    }

    #[test]
    fn ack_mode_floor_redelivery_and_bound() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let mut cursor = Cursor::new(10, true, now);
        // Messages 11..=15 exist (next id 16).
        assert_eq!(cursor.waiting(16), 5);
        for id in 11..=13 {
            assert_eq!(
                cursor.take(16, 7, later, 3),
                Next::Message { id, again: false }
            );
        }
        assert_eq!(cursor.take(16, 7, later, 3), Next::TooManyInFlight);
        assert_eq!(cursor.in_flight(), 3);
        // Acks out of order: the floor moves only over a contiguous run.
        assert_eq!(cursor.ack(12), Some(false));
        assert_eq!(cursor.pos, 10);
        assert_eq!(cursor.ack(12), None, "acked twice");
        assert_eq!(cursor.ack(99), None, "never delivered");
        assert_eq!(cursor.ack(11), Some(true));
        assert_eq!(cursor.pos, 12);
        // 13 is in flight on connection 7, which goes away.
        assert_eq!(
            cursor.take(16, 8, later, 3),
            Next::Message {
                id: 14,
                again: false
            }
        );
        assert_eq!(cursor.release_connection(7), 1);
        assert_eq!(cursor.waiting(16), 2, "13 again and 15");
        assert_eq!(
            cursor.take(16, 8, later, 3),
            Next::Message {
                id: 13,
                again: true
            }
        );
        // The ack wait passes for 13 and 14.
        assert_eq!(cursor.expire(later), 2);
        assert_eq!(cursor.in_flight(), 0);
        // A late ack of a message waiting to go again still counts.
        assert_eq!(cursor.ack(14), Some(false));
        assert_eq!(
            cursor.take(16, 8, later, 3),
            Next::Message {
                id: 13,
                again: true
            }
        );
        assert_eq!(cursor.ack(13), Some(true));
        assert_eq!(cursor.pos, 14);
        assert_eq!(
            cursor.take(16, 8, later, 3),
            Next::Message {
                id: 15,
                again: false
            }
        );
        assert_eq!(cursor.take(16, 8, later, 3), Next::Nothing);
        assert_eq!(cursor.ack(15), Some(true));
        assert_eq!(
            (cursor.pos, cursor.waiting(16), cursor.in_flight()),
            (15, 0, 0)
        );
    }
}
