//! A single-host message broker and its two clients, a Rust rewrite of the
//! "Sistema de Mensajería con Broker": the queue lives in SysV shared memory
//! guarded by SysV semaphores, every message is persisted to disk before it
//! is acknowledged, and clients speak a line protocol over TCP.
//!
//! The three programs are thin `main`s over this library:
//!
//! ```text
//! broker [OPTIONS] <messages_file>     # src/bin/broker.rs   -> broker::run
//! producer [-n COUNT] [-i MS] ...      # src/bin/producer.rs -> client
//! consumer [--id ID] ...               # src/bin/consumer.rs -> client
//! ```
//!
//! Codemap (see docs/architecture.md): [`sys`] holds every libc call and
//! every block the compiler cannot check; [`protocol`] parses and formats
//! lines and never touches a socket; [`store`] owns the files and never
//! touches the network;
//! [`queue`] is the ring in shared memory; [`pool`] the worker threads;
//! [`broker`] ties them together; [`client`] is what producer and consumer
//! share.

#![deny(unsafe_code)]

pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod consumer;
pub mod disk;
pub mod exec;
pub mod forward;
pub mod inspect;
pub mod log;
pub mod nats;
pub mod notify;
pub mod pool;
pub mod producer;
pub mod protocol;
pub mod queue;
pub mod segments;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
pub mod text;
pub mod token;
