//! Integration tests: the real binaries over real sockets, real shared
//! memory and real files. One test crate (one link), one module per area.

mod util;

mod architecture;

mod broker_ack;
mod broker_cli;
mod broker_faults;
mod broker_hostile;
mod broker_ipc;
mod broker_limits;
mod broker_log;
mod broker_persistence;
mod broker_protocol;
mod clients;
mod lab;
mod nats_forward;
mod ops_access;
mod ops_consumer;
mod ops_http;
mod ops_inspect;
mod ops_service;
mod torture;
