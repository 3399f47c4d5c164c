//! A client connection as every thread sees it: its write lock, the pushes
//! (`NOTIFY`) other threads send it, and the table of open connections.
//!
//! The worker serving a connection holds its [`Writer`] for a whole batch,
//! so no push lands inside a batch's replies. Other threads only ever
//! `try_lock` that lock and send without blocking: a push that finds the
//! lock taken is deferred and written by the worker after its batch (or by
//! housekeeping), unless the batch answered `GET`s since the push was
//! decided (its epoch is stale: at most one NOTIFY until the next GET).
//! This file decides nothing about *which* pushes happen: `state.rs` does.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::state::{ConnId, Notify};
use crate::protocol;
use crate::sys::os;

/// Locks `mutex`, also when another thread panicked holding it. Every
/// structure behind these locks is left consistent between statements
/// that can panic (see the panic policy in docs/architecture.md), and
/// release builds abort on a panic anyway.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One client connection as other threads see it: a way to write to it
/// and to wake it. The worker serving it owns the reading side.
#[derive(Debug)]
pub struct Conn {
    pub id: ConnId,
    pub stream: TcpStream,
    /// The write lock. Holds bytes a non-blocking push could not send yet;
    /// whoever writes next sends them first.
    pending: Mutex<Vec<u8>>,
    /// A NOTIFY that could not be written because the worker held the
    /// write lock: its count and epoch (0 count: none).
    deferred: Mutex<(u64, u64)>,
    /// The connection's epoch as the state machine last reported it (set
    /// under the state lock).
    epoch: AtomicU64,
}

impl Conn {
    pub fn new(id: ConnId, stream: TcpStream) -> Conn {
        Conn {
            id,
            stream,
            pending: Mutex::new(Vec::new()),
            deferred: Mutex::new((0, 0)),
            epoch: AtomicU64::new(0),
        }
    }

    /// Records the connection's epoch after a registration or a batch of
    /// GETs (call under the state lock, so no push decided later can be
    /// compared with an older epoch).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The deferred NOTIFY count, unless a batch of GETs answered since
    /// the push was decided (then the NOTIFY would be a second one).
    fn take_deferred(&self) -> u64 {
        let (count, epoch) = std::mem::take(&mut *lock(&self.deferred));
        if epoch == self.epoch.load(Ordering::Acquire) {
            count
        } else {
            0
        }
    }

    /// Takes the write lock. While a worker holds it, pushes to this
    /// connection are deferred.
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
    fn push_notify(&self, push: Notify) {
        let Ok(mut pending) = self.pending.try_lock() else {
            *lock(&self.deferred) = (push.count, push.epoch);
            return;
        };
        let mut line = Vec::with_capacity(48);
        protocol::write_notify(&mut line, push.count);
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

/// The open connections, by id: where pushes find their socket.
#[derive(Debug, Default)]
pub struct Conns {
    table: Mutex<HashMap<ConnId, Arc<Conn>>>,
}

impl Conns {
    pub fn insert(&self, conn: Arc<Conn>) {
        lock(&self.table).insert(conn.id, conn);
    }

    pub fn remove(&self, id: ConnId) {
        lock(&self.table).remove(&id);
    }

    /// Pushes the NOTIFYs the state machine decided (after its lock was
    /// released), never blocking on a socket.
    pub fn push(&self, pushes: &[Notify]) {
        if pushes.is_empty() {
            return;
        }
        let targets: Vec<(Arc<Conn>, Notify)> = {
            let table = lock(&self.table);
            pushes
                .iter()
                .filter_map(|push| table.get(&push.conn).map(|c| (Arc::clone(c), *push)))
                .collect()
        };
        for (conn, push) in targets {
            conn.push_notify(push);
        }
    }

    /// Sends pushes that could not be sent at once (housekeeping).
    pub fn flush_pushes(&self) {
        for conn in self.all() {
            conn.flush_pushes();
        }
    }

    /// Every open connection (shutdown wakes them all).
    pub fn all(&self) -> Vec<Arc<Conn>> {
        lock(&self.table).values().cloned().collect()
    }
}
