//! Tests of the state machine: one table-driven test per rule, then the
//! model test, which runs every sequence of up to [`MODEL_DEPTH`] events
//! over two consumer ids (one plain, one in ack mode), two connections, a
//! queue of capacity three on disk and a ring window of two slots, under
//! both visibility rules, and checks the invariants after every step
//! (lexopt's exhaustive test is the model).

use super::*;
use std::collections::{BTreeSet, HashMap as Map};

const WAIT: Duration = Duration::from_secs(30);

fn rules(visible_when_synced: bool) -> Rules {
    Rules {
        max_ack_pending: 2,
        ack_wait: WAIT,
        consumer_ttl: WAIT,
        visible_when_synced,
        max_consumers: 3,
        capacity: 100,
    }
}

fn fresh(visible_when_synced: bool, now: Instant) -> State {
    fresh_with(visible_when_synced, 100, now)
}

fn fresh_with(visible_when_synced: bool, capacity: u64, now: Instant) -> State {
    let start = Start {
        next_id: 1,
        head: 1,
        next_consumer: 1,
        cursors: Vec::new(),
    };
    let rules = Rules {
        capacity,
        ..rules(visible_when_synced)
    };
    State::new(rules, start, now)
}

fn ids(got: &Got) -> Vec<u64> {
    got.messages.iter().map(|d| d.id).collect()
}

#[test]
fn registration_assigns_ids_and_keeps_modes() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    let first = state.register(1, None, false, now).unwrap();
    assert_eq!(&*first.key, b"1");
    assert_eq!(first.notify, None, "nothing waiting: armed instead");
    assert_eq!(
        state.register(1, Some(b"x"), false, now),
        Err(RegisterError::AlreadyRegistered)
    );
    state.register(2, Some(b"a"), true, now).unwrap();
    assert_eq!(
        state.register(3, Some(b"a"), false, now),
        Err(RegisterError::ModeMismatch),
        "an ack-mode id stays in ack mode"
    );
    let second = state.register(4, None, false, now).unwrap();
    assert_eq!(&*second.key, b"2");
}

#[test]
fn past_max_consumers_a_new_id_is_refused_and_nothing_changes() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    for (conn, id) in [(1, &b"a"[..]), (2, b"b"), (3, b"c")] {
        state.register(conn, Some(id), false, now).unwrap();
    }
    assert_eq!(
        state.register(4, Some(b"d"), false, now),
        Err(RegisterError::TooManyConsumers)
    );
    assert_eq!(
        state.register(4, None, false, now),
        Err(RegisterError::TooManyConsumers)
    );
    assert_eq!(state.cursor_pos(b"d"), None);
    // The refused connection is not registered: it may join an id that exists.
    assert_eq!(
        &*state.register(4, Some(b"a"), false, now).unwrap().key,
        b"a"
    );
}

#[test]
fn a_new_cursor_starts_at_the_head_and_hears_of_the_backlog() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.stored(3);
    let registered = state.register(1, Some(b"c"), false, now).unwrap();
    assert_eq!(registered.pos, 0);
    assert_eq!(registered.notify, Some(3));
}

#[test]
fn one_notify_until_the_next_get() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"c"), false, now).unwrap();
    let pushes = state.stored(1);
    assert_eq!(pushes.len(), 1);
    assert_eq!((pushes[0].conn, pushes[0].count), (1, 1));
    assert!(state.stored(1).is_empty(), "no second NOTIFY before a GET");
    let got = state.get(1, 1, now);
    assert_eq!(ids(&got), [1]);
    assert_eq!(
        got.notify,
        Some(1),
        "one more waits: NOTIFY after the reply"
    );
    let got = state.get(1, 2, now);
    assert_eq!((ids(&got), got.empty, got.notify), (vec![2], 1, None));
    assert_eq!(state.stored(1).len(), 1, "armed again by the last GET");
}

#[test]
fn the_epoch_tells_a_stale_push() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    let registered = state.register(1, Some(b"c"), false, now).unwrap();
    let push = state.stored(1)[0];
    assert_eq!(push.epoch, registered.epoch);
    let got = state.get(1, 1, now);
    assert!(
        got.epoch > push.epoch,
        "a push decided before the GET is stale"
    );
}

#[test]
fn plain_cursors_release_and_fan_out() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"a"), false, now).unwrap();
    state.register(2, Some(b"b"), false, now).unwrap();
    state.stored(2);
    assert_eq!(ids(&state.get(1, 5, now)), [1, 2]);
    assert_eq!(state.take_release(), None, "b still needs both");
    assert_eq!(ids(&state.get(2, 1, now)), [1]);
    assert_eq!(state.take_release(), Some(2));
    state.released(2);
    assert_eq!(state.head(), 2);
}

#[test]
fn competing_connections_share_a_cursor() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"w"), false, now).unwrap();
    state.register(2, Some(b"w"), false, now).unwrap();
    state.stored(2);
    assert_eq!(ids(&state.get(1, 1, now)), [1]);
    assert_eq!(ids(&state.get(2, 1, now)), [2]);
}

#[test]
fn ack_mode_floor_redelivery_and_bound() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"k"), true, now).unwrap();
    state.stored(3);
    let got = state.get(1, 3, now);
    assert_eq!((ids(&got), got.empty), (vec![1, 2], 1), "max_ack_pending 2");
    let acked = state.ack(1, &[Some(2), Some(9), None]);
    assert_eq!(acked.results, [Some(2), None, None]);
    assert_eq!(
        state.cursor_pos(b"k"),
        Some(0),
        "1 is not acked: floor stays"
    );
    assert_eq!(state.take_release(), None);
    // Its ack wait passes: 1 goes again, with 3.
    assert!(state.expire_acks(now + WAIT).is_empty(), "not armed");
    let got = state.get(1, 3, now + WAIT);
    assert_eq!(
        got.messages,
        [
            Delivery { id: 1, again: true },
            Delivery {
                id: 3,
                again: false
            }
        ]
    );
    assert_eq!(
        state.ack(1, &[Some(1), Some(3)]).results,
        [Some(1), Some(3)]
    );
    assert_eq!(state.cursor_pos(b"k"), Some(3));
    assert_eq!(state.take_release(), Some(4));
}

#[test]
fn a_closed_connection_gives_its_messages_to_the_others() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"k"), true, now).unwrap();
    state.register(2, Some(b"k"), true, now).unwrap();
    state.stored(1);
    assert_eq!(ids(&state.get(1, 1, now)), [1]);
    assert!(state.get(2, 1, now).messages.is_empty());
    let pushes = state.unregister(1, now);
    assert_eq!(pushes.len(), 1);
    assert_eq!((pushes[0].conn, pushes[0].count), (2, 1));
    assert_eq!(state.get(2, 1, now).messages[0].id, 1);
}

#[test]
fn under_always_nothing_is_visible_before_its_fsync() {
    let now = Instant::now();
    let mut state = fresh(true, now);
    state.register(1, Some(b"c"), false, now).unwrap();
    assert!(state.stored(2).is_empty());
    assert!(state.get(1, 1, now).messages.is_empty());
    let pushes = state.synced(1);
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].count, 1);
    assert_eq!(ids(&state.get(1, 5, now)), [1]);
    state.cut_back(2);
    assert_eq!(state.next_id(), 2, "the unsynced message is cut back");
}

#[test]
fn idle_cursors_expire_and_release() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"gone"), false, now).unwrap();
    state.stored(2);
    state.unregister(1, now);
    assert!(state.expire_cursors(now + WAIT / 2).is_empty());
    let gone = state.expire_cursors(now + WAIT);
    assert_eq!(gone.len(), 1);
    assert_eq!(
        state.take_release(),
        None,
        "no cursor left: held for consumers to come"
    );
}

#[test]
fn snapshots_never_run_ahead_of_the_disk() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"c"), false, now).unwrap();
    state.stored(5);
    state.get(1, 4, now);
    let snapshot = state.snapshot(2, 2);
    assert_eq!(snapshot.next_id, 3);
    assert_eq!(snapshot.cursors[0].offset, 2);
    assert_eq!(state.snapshot(5, u64::MAX).cursors[0].offset, 4);
}

#[test]
fn room_is_the_capacity_less_what_no_cursor_passed() {
    let now = Instant::now();
    let mut state = fresh_with(false, 3, now);
    assert_eq!(state.room(), 3);
    state.stored(3);
    assert_eq!(state.room(), 0, "no cursor: held for consumers to come");
    state.register(1, Some(b"c"), false, now).unwrap();
    state.get(1, 2, now);
    let head = state.take_release().unwrap();
    state.released(head);
    assert_eq!((state.held(), state.room()), (1, 2));
}

#[test]
fn every_ack_on_a_plain_cursor_is_unknown() {
    let now = Instant::now();
    let mut state = fresh(false, now);
    state.register(1, Some(b"p"), false, now).unwrap();
    state.stored(2);
    assert_eq!(ids(&state.get(1, 2, now)), [1, 2]);
    let acked = state.ack(1, &[Some(1), Some(2), None]);
    assert_eq!(acked.results, [None, None, None]);
    assert!(acked.notify.is_empty());
    assert_eq!(state.cursor_pos(b"p"), Some(2), "the GETs consumed them");
}

// --- the model test -------------------------------------------------------

/// Events per sequence: 6 in release builds (about 5 million sequences per
/// visibility rule), 5 in debug builds, where each step is slower.
const MODEL_DEPTH: usize = if cfg!(debug_assertions) { 5 } else { 6 };
/// Messages the queue holds (`--capacity`).
const CAPACITY: u64 = 3;
/// Slots of the ring window: fewer than the capacity, so some deliveries
/// come from the log.
const RING: u64 = 2;
const CONNS: u64 = 2;
const KEYS: [&[u8]; 2] = [b"plain", b"acked"];

#[derive(Debug, Clone, Copy)]
enum Event {
    Register {
        conn: u64,
        key: usize,
    },
    Send,
    Sync,
    Get {
        conn: u64,
    },
    Ack {
        conn: u64,
    },
    Disconnect {
        conn: u64,
    },
    /// The ack wait and the consumer TTL pass.
    Tick,
}

fn alphabet() -> Vec<Event> {
    let mut events = vec![Event::Send, Event::Sync, Event::Tick];
    for conn in 0..CONNS {
        for key in 0..KEYS.len() {
            events.push(Event::Register { conn, key });
        }
        events.push(Event::Get { conn });
        events.push(Event::Ack { conn });
        events.push(Event::Disconnect { conn });
    }
    events
}

/// What the shell and the clients would see, kept beside the machine.
#[derive(Debug, Clone)]
struct World {
    state: State,
    now: Instant,
    /// The ring as the shell keeps it: ids `ring.0..ring.1`, the newest.
    ring: (u64, u64),
    /// The log as the shell keeps it: ids `log.0..log.1` (deletion
    /// follows the head; segments make it coarser, never finer).
    log: (u64, u64),
    /// Deliveries served from the log (behind the ring window).
    from_log: u64,
    synced: u64,
    /// Which key each connection registered under.
    conn_key: Map<u64, usize>,
    /// A NOTIFY is outstanding on the connection (no GET since).
    notified: Map<u64, bool>,
    /// Plain key: every id delivered. Ack key: handed out, not acked.
    delivered: Vec<BTreeSet<u64>>,
    acked: BTreeSet<u64>,
    /// Where the ack key's current cursor started.
    ack_epoch_floor: u64,
}

impl World {
    fn new(visible_when_synced: bool) -> World {
        let now = Instant::now();
        World {
            state: fresh_with(visible_when_synced, CAPACITY, now),
            now,
            ring: (1, 1),
            log: (1, 1),
            from_log: 0,
            synced: 0,
            conn_key: Map::new(),
            notified: Map::new(),
            delivered: vec![BTreeSet::new(), BTreeSet::new()],
            acked: BTreeSet::new(),
            ack_epoch_floor: 0,
        }
    }

    fn push(&mut self, pushes: Vec<Notify>, trace: &[Event]) {
        for push in pushes {
            assert!(push.count > 0, "empty NOTIFY after {trace:?}");
            let outstanding = self.notified.entry(push.conn).or_default();
            assert!(!*outstanding, "two NOTIFYs without a GET after {trace:?}");
            *outstanding = true;
        }
    }

    fn release(&mut self) {
        if let Some(head) = self.state.take_release() {
            self.log.0 = head;
            self.state.released(head);
        }
    }

    fn apply(&mut self, event: Event, trace: &[Event]) {
        match event {
            Event::Register { conn, key } => self.register(conn, key, trace),
            Event::Send => {
                // The shell stores only with room; the ring evicts its
                // oldest slot instead of waiting.
                if self.state.room() > 0 {
                    self.log.1 += 1;
                    self.ring.1 += 1;
                    self.ring.0 = self.ring.0.max(self.ring.1.saturating_sub(RING));
                    let pushes = self.state.stored(1);
                    self.push(pushes, trace);
                }
            }
            Event::Sync => {
                self.synced = self.log.1 - 1;
                let pushes = self.state.synced(self.synced);
                self.push(pushes, trace);
            }
            Event::Get { conn } => self.get(conn, trace),
            Event::Ack { conn } => self.ack(conn, trace),
            Event::Disconnect { conn } => {
                if self.conn_key.remove(&conn).is_some() {
                    self.notified.remove(&conn);
                    let pushes = self.state.unregister(conn, self.now);
                    self.push(pushes, trace);
                }
            }
            Event::Tick => self.tick(trace),
        }
    }

    fn register(&mut self, conn: u64, key: usize, trace: &[Event]) {
        if self.conn_key.contains_key(&conn) {
            return;
        }
        if self.state.cursor_pos(KEYS[key]).is_none() {
            // A new cursor (the first, or after the old one expired)
            // starts at the head: the old one's history is gone.
            self.delivered[key].clear();
            if key == 1 {
                self.ack_epoch_floor = self.state.head() - 1;
            }
        }
        let registered = self
            .state
            .register(conn, Some(KEYS[key]), key == 1, self.now)
            .unwrap_or_else(|err| panic!("{err:?} after {trace:?}"));
        self.conn_key.insert(conn, key);
        self.notified.insert(conn, registered.notify.is_some());
    }

    fn get(&mut self, conn: u64, trace: &[Event]) {
        let Some(&key) = self.conn_key.get(&conn) else {
            return;
        };
        let got = self.state.get(conn, 2, self.now);
        for delivery in &got.messages {
            let id = delivery.id;
            assert!(
                self.log.0 <= id && id < self.log.1 && self.state.head() <= id,
                "{id} not held after {trace:?}"
            );
            if id < self.ring.0 {
                self.from_log += 1;
            }
            assert!(
                id < self.state.visible_next(),
                "{id} not visible after {trace:?}"
            );
            let first_time = self.delivered[key].insert(id);
            assert!(
                key == 1 || first_time,
                "plain cursor got {id} twice after {trace:?}"
            );
        }
        self.notified.insert(conn, got.notify.is_some());
        self.release();
    }

    fn ack(&mut self, conn: u64, trace: &[Event]) {
        let Some(&key) = self.conn_key.get(&conn) else {
            return;
        };
        let id = self.delivered[key].first().copied();
        let acked = self.state.ack(conn, &[id.or(Some(99))]);
        match id {
            Some(id) if key == 1 => {
                assert_eq!(acked.results, [Some(id)], "after {trace:?}");
                self.delivered[1].remove(&id);
                self.acked.insert(id);
            }
            _ => assert_eq!(acked.results, [None], "after {trace:?}"),
        }
        self.push(acked.notify, trace);
        self.release();
    }

    fn tick(&mut self, trace: &[Event]) {
        self.now += WAIT;
        let pushes = self.state.expire_acks(self.now);
        self.push(pushes, trace);
        self.state.expire_cursors(self.now);
        self.release();
    }

    fn check(&self, visible_when_synced: bool, trace: &[Event]) {
        let state = &self.state;
        assert_eq!(
            (state.head(), state.next_id()),
            self.log,
            "the log is not head..next after {trace:?}"
        );
        assert!(
            state.held() <= CAPACITY,
            "past the capacity after {trace:?}"
        );
        assert!(
            self.ring.1 == state.next_id() && self.ring.1 - self.ring.0 <= RING,
            "the ring is not the newest window after {trace:?}"
        );
        assert!(state.visible_next() <= state.next_id(), "after {trace:?}");
        if visible_when_synced {
            assert!(
                state.visible_next() <= self.synced + 1,
                "visible before synced after {trace:?}"
            );
        }
        for key in KEYS {
            if let Some(pos) = state.cursor_pos(key) {
                assert!(
                    state.head() <= pos + 1,
                    "released past a cursor after {trace:?}"
                );
            }
        }
        if let Some(floor) = state.cursor_pos(KEYS[1]) {
            for id in self.ack_epoch_floor + 1..=floor {
                assert!(
                    self.acked.contains(&id),
                    "floor {floor} passed unacked {id} after {trace:?}"
                );
            }
        }
    }
}

/// Deliveries from behind the ring window over every sequence: the model
/// must reach the disk path, or it proves nothing about it.
static LOG_DELIVERIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn explore(
    world: &World,
    events: &[Event],
    trace: &mut Vec<Event>,
    visible_when_synced: bool,
) -> u64 {
    if trace.len() == MODEL_DEPTH {
        LOG_DELIVERIES.fetch_add(world.from_log, std::sync::atomic::Ordering::Relaxed);
        return 1;
    }
    let mut sequences = 0;
    for &event in events {
        let mut next = world.clone();
        trace.push(event);
        next.apply(event, trace);
        next.check(visible_when_synced, trace);
        sequences += explore(&next, events, trace, visible_when_synced);
        trace.pop();
    }
    sequences
}

#[test]
fn model_every_short_sequence_keeps_the_invariants() {
    let events = alphabet();
    let started = Instant::now();
    let mut sequences = 0;
    for visible_when_synced in [false, true] {
        let world = World::new(visible_when_synced);
        sequences += explore(&world, &events, &mut Vec::new(), visible_when_synced);
    }
    assert!(
        LOG_DELIVERIES.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no sequence delivered from behind the ring window"
    );
    let expected = 2 * (events.len() as u64).pow(MODEL_DEPTH as u32);
    assert_eq!(sequences, expected);
    eprintln!(
        "model test: {sequences} sequences of {MODEL_DEPTH} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
