//! The broker program: startup, the accept loop, housekeeping, signals and
//! the clean shutdown (see docs/architecture.md for the threads and locks).
//!
//! Threads: the caller's thread accepts connections and hands each to the
//! pool ([`crate::pool`]), whose `max_clients` workers serve one
//! connection each ([`session`]); one thread waits for SIGINT/SIGTERM; one
//! does housekeeping (fsync interval, offsets, cursor expiry, compaction,
//! pushes left pending); one backs the queue's memory once it is first
//! used. Every thread is joined before [`run`] returns.

pub mod auth;
mod conn;
mod core;
mod cursor;
mod durability;
mod http;
pub mod instance;
mod panic;
mod recovery;
mod session;
mod state;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::conn::lock;
use self::core::{Core, CoreConfig};
use self::recovery::Recovered;
use crate::config::BrokerConfig;
use crate::log::Logger;
use crate::notify::Notifier;
use crate::pool::Pool;
use crate::protocol::ErrorCode;
use crate::queue::{MAX_SEND_WAIT, Ring};
use crate::store::FsyncPolicy;
use crate::sys::os;
use crate::sys::service::{self, Signal};

/// Stack of a pool worker: its frames are small and buffers live on the
/// heap, so a small stack keeps 100 idle workers cheap.
const WORKER_STACK: usize = 256 * 1024;
/// How long a write to a client may block before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Housekeeping period.
const TICK: Duration = Duration::from_millis(100);
/// How long startup waits for the messages file's lock before refusing.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// The shortest housekeeping period, whatever `--fsync-interval` says.
const MIN_TICK: Duration = Duration::from_millis(10);
/// Shutdown: how long clients get to take their last replies before their
/// sockets are closed under them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What every thread of the broker shares.
pub(crate) struct Shared {
    pub(crate) core: Core,
    pub(crate) config: BrokerConfig,
    pub(crate) shutting_down: AtomicBool,
    /// Connections accepted and not yet finished (queued or served).
    pub(crate) active: AtomicUsize,
    /// Token and protected mode (see [`auth`]).
    pub(crate) access: auth::Access,
}

/// Why the broker did not start, or did not stop cleanly (exit status 1).
#[derive(Debug)]
pub struct StartError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StartError {
    fn new(message: impl Into<String>) -> StartError {
        StartError {
            message: message.into(),
            source: None,
        }
    }

    fn caused_by(err: impl std::error::Error + Send + Sync + 'static) -> StartError {
        StartError {
            message: err.to_string(),
            source: Some(Box::new(err)),
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|err| err as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for StartError {
    fn from(err: std::io::Error) -> StartError {
        StartError::caused_by(err)
    }
}

impl From<crate::queue::QueueError> for StartError {
    fn from(err: crate::queue::QueueError) -> StartError {
        StartError::caused_by(err)
    }
}

impl From<recovery::RecoveryError> for StartError {
    fn from(err: recovery::RecoveryError) -> StartError {
        StartError::caused_by(err)
    }
}

impl From<String> for StartError {
    fn from(message: String) -> StartError {
        StartError::new(message)
    }
}

/// Runs the broker until SIGINT or SIGTERM. Prints `listening on ADDR` on
/// stdout once it accepts connections.
pub fn run(config: BrokerConfig) -> Result<(), StartError> {
    // First, before any thread exists, so that every thread inherits it.
    // SIGHUP, SIGUSR1 and SIGUSR2 too: blocked, they cannot kill it.
    service::block_service_signals()?;
    os::ignore_file_size_signal();
    let log = Arc::new(Logger::open(&config.log_file, config.log_level)?);
    panic::install(Arc::clone(&log));
    log.info(format_args!(
        "starting broker pid {}: messages file {}, capacity {}, max message {} bytes, fsync {}",
        os::pid(),
        config.messages_file.display(),
        config.capacity,
        config.max_msg_size,
        config.fsync.name()
    ));
    let notifier = Notifier::from_env();
    let result = start_and_serve(config, &log, &notifier);
    let status = match &result {
        Ok(()) => "stopped cleanly".to_string(),
        Err(err) => {
            // The binary prints it on stderr; the log keeps a copy.
            log.file_only(crate::log::Level::Error, format_args!("{err}"));
            format!("failed: {err}")
        }
    };
    notify(&log, notifier.status(&status));
    result
}

/// Logs a failed notification to the service manager (at most a warning:
/// the broker serves on without it).
fn notify(log: &Logger, sent: std::io::Result<()>) {
    if let Err(err) = sent {
        log.warn(format_args!("NOTIFY_SOCKET: {err}"));
    }
}

fn start_and_serve(
    config: BrokerConfig,
    log: &Arc<Logger>,
    notifier: &Notifier,
) -> Result<(), StartError> {
    // One broker per messages file: recovery may cut the file, so take its
    // lock before reading it, and refuse keys in use before touching
    // anything.
    let _lock = lock_messages_file(&config.messages_file)?;
    make_files_private(&config, log)?;
    // The set id our previous run recorded: an orphaned set is removed
    // only if it is that one (a set carries no stamp of its own).
    let recorded_set = crate::store::load_ipc_ids(&config.messages_file).map(|(_, sem)| sem);
    crate::queue::check_keys(config.shm_key, config.sem_key, recorded_set)?;
    let (recovered, ring) = recover_queue(&config, recorded_set, log)?;
    let listener = TcpListener::bind((config.bind, config.port))
        .map_err(|err| format!("cannot listen on {}:{}: {err}", config.bind, config.port))?;

    // The id the NATS forwarder names this broker's messages with.
    let (instance, created) = instance::load_or_create(&config.messages_file)?;
    log.info(format_args!(
        "instance {instance} ({})",
        if created { "created" } else { "kept" }
    ));
    let core_config = CoreConfig {
        instance,
        messages_file: config.messages_file.clone(),
        send_timeout: config.send_timeout.min(MAX_SEND_WAIT),
        consumer_ttl: config.consumer_ttl,
        fsync: config.fsync,
        ack_wait: config.ack_wait,
        max_ack_pending: config.max_ack_pending,
        max_consumers: config.max_consumers,
    };
    let core = Core::new(core_config, Arc::clone(log), ring, recovered)?;
    // The offsets file now matches what recovery decided (clamped cursors,
    // a repaired file), before anyone is served.
    core.save_offsets(true)?;
    let access = auth::Access::new(config.auth_token.clone(), config.protected_mode);
    let shared = Arc::new(Shared {
        core,
        config,
        shutting_down: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        access,
    });
    // Before the other threads, so a --http address in use stops the start
    // with nothing to wind down.
    let http = match shared.config.http {
        Some(address) => Some(http::HttpServer::start(&shared, address)?),
        None => None,
    };
    let threads = Threads::start(&shared, &listener)?;
    let http_address = http.as_ref().map(|http| http.address);
    serve(&shared, &listener, &threads.pool, notifier, http_address)?;
    drop(listener);
    threads.stop(&shared);
    if let Some(http) = http {
        http.stop();
    }
    finish(shared, log)
}

/// Recovery, then the ring in shared memory filled with the records
/// consumers still need.
fn recover_queue(
    config: &BrokerConfig,
    recorded_set: Option<i32>,
    log: &Logger,
) -> Result<(Recovered, Ring), StartError> {
    let (recovered, records) = recovery::recover(config, log)?;
    let ring = Ring::create(
        config.shm_key,
        config.sem_key,
        config.capacity,
        config.max_msg_size,
        recovered.start.head,
        recorded_set,
        log,
    )?;
    // Recorded beside the data, so the next run can tell this set, left
    // orphaned by a crash, from another program's.
    let (shm_id, sem_id) = ring.ids();
    crate::store::save_ipc_ids(
        &crate::disk::Disk::real(),
        &config.messages_file,
        shm_id,
        sem_id,
    )?;
    if !records.is_empty() {
        let reserved = ring.reserve(records.len(), Instant::now(), &|| true)?;
        assert_eq!(
            reserved,
            records.len(),
            "recovery keeps at most capacity records"
        );
        let mut guard = ring.lock()?;
        for record in &records {
            guard.push(record.timestamp, &[&record.content])?;
        }
        guard.unlock_pushed(records.len())?;
    }
    log.info(format_args!(
        "queue in shared memory key 0x{:x} (id {shm_id}, {} bytes), semaphores key 0x{:x} (id {sem_id})",
        config.shm_key,
        ring.segment_len(),
        config.sem_key
    ));
    Ok((recovered, ring))
}

/// The broker's threads besides the caller's: the pool of connection
/// workers, the signal waiter, housekeeping and the populate thread.
struct Threads {
    pool: Pool<(TcpStream, u64)>,
    stop: Arc<Stopper>,
    signals: JoinHandle<()>,
    housekeeping: JoinHandle<()>,
    populator: JoinHandle<usize>,
}

impl Threads {
    fn start(shared: &Arc<Shared>, listener: &TcpListener) -> Result<Threads, StartError> {
        let max_clients = shared.config.max_clients;
        let worker_shared = Arc::clone(shared);
        let pool = Pool::new(
            "conn",
            max_clients,
            WORKER_STACK,
            max_clients,
            move |(stream, id): (TcpStream, u64)| session::serve(&worker_shared, stream, id),
            // Never reached: the panic policy aborts first.
            |_| {},
        )?;
        let stop = Arc::new(Stopper::default());
        let signals = spawn_signal_thread(shared, &stop, listener.try_clone()?)?;
        let housekeeping = spawn_housekeeping(shared, &stop)?;
        let populate_shared = Arc::clone(shared);
        let populator = std::thread::Builder::new()
            .name("populate".into())
            .stack_size(64 * 1024)
            .spawn(move || populate_shared.core.populate_queue_when_used())?;
        Ok(Threads {
            pool,
            stop,
            signals,
            housekeeping,
            populator,
        })
    }

    /// Joins every thread (the workers have finished their connections).
    fn stop(mut self, shared: &Shared) {
        self.pool.shutdown();
        self.stop.stop();
        let _ = self.signals.join();
        let _ = self.housekeeping.join();
        shared.core.stop_populating();
        let _ = self.populator.join();
    }
}

/// Says `listening on`, accepts until a signal, then closes every
/// connection: no new ones; every worker blocked in a read is woken (end
/// of file on its socket) so it answers what it has read, says
/// `ERROR:Shutting down` and leaves.
fn serve(
    shared: &Shared,
    listener: &TcpListener,
    pool: &Pool<(TcpStream, u64)>,
    notifier: &Notifier,
    http: Option<std::net::SocketAddr>,
) -> Result<(), StartError> {
    let address = listener.local_addr()?;
    let log = &shared.core.log;
    log.info(format_args!(
        "listening on {address} with {} workers",
        pool.threads()
    ));
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {address}");
    if let Some(http) = http {
        log.info(format_args!("http listening on {http}"));
        let _ = writeln!(stdout, "http listening on {http}");
    }
    let _ = stdout.flush();
    notify(log, notifier.ready(&format!("listening on {address}")));

    accept_loop(shared, listener, pool);

    shared.shutting_down.store(true, Ordering::Release);
    let open = shared.active.load(Ordering::Acquire);
    log.info(format_args!("shutting down: {open} connection(s) open"));
    notify(
        log,
        notifier.stopping(&format!("shutting down: {open} connection(s) open")),
    );
    for conn in shared.core.conns.all() {
        let _ = os::shutdown_read(&conn.stream);
    }
    if !wait_for_idle(shared, SHUTDOWN_GRACE) {
        // Clients that do not read their replies: close under them.
        for conn in shared.core.conns.all() {
            let _ = os::shutdown(&conn.stream);
        }
        wait_for_idle(shared, WRITE_TIMEOUT);
    }
    Ok(())
}

/// The last fsync, compaction and offsets, then the IPC objects go.
fn finish(shared: Arc<Shared>, log: &Logger) -> Result<(), StartError> {
    let core = &shared.core;
    let mut clean = true;
    for (what, result) in [
        ("fsync", core.sync_now()),
        ("compaction", core.compact_if_worth_it(true)),
        ("saving offsets", core.save_offsets(true)),
    ] {
        if let Err(err) = result {
            clean = false;
            log.error(format_args!("shutdown: {what}: {err}"));
        }
    }
    let (held, next_id) = core.summary();
    let Ok(shared) = Arc::try_unwrap(shared) else {
        return Err(StartError::new("shutdown: a thread still holds the broker"));
    };
    match shared.core.remove_queue() {
        Ok(()) => log.info(format_args!(
            "stopped cleanly: {held} message(s) held, next id {next_id}; shared memory and semaphores removed"
        )),
        Err(err) => {
            clean = false;
            log.error(format_args!("shutdown: removing IPC objects: {err}"));
        }
    }
    if clean {
        Ok(())
    } else {
        Err(StartError::new("shutdown was not clean; see the log"))
    }
}

/// The lock file: beside the file the messages file's name resolves to,
/// so a symbolic link to the same file finds the same lock.
fn lock_path(messages: &std::path::Path) -> std::path::PathBuf {
    let resolved = std::fs::canonicalize(messages).unwrap_or_else(|_| messages.to_path_buf());
    let mut name = resolved.into_os_string();
    name.push(".lock");
    std::path::PathBuf::from(name)
}

/// The broker's files are created 0600; files that existed with a wider
/// mode (or links to such files) are tightened, with a warning, since
/// they hold the messages and who consumed them.
fn make_files_private(config: &BrokerConfig, log: &Logger) -> Result<(), StartError> {
    let messages = &config.messages_file;
    let paths = [
        messages.clone(),
        crate::store::offsets_path(messages),
        crate::store::ipc_ids_path(messages),
        lock_path(messages),
        config.log_file.clone(),
    ];
    for path in &paths {
        if let Some(mode) = crate::store::make_private(path)? {
            log.warn(format_args!(
                "{} had mode {mode:04o}, readable or writable by others: changed it to 0600",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Creates (0600) and locks `<messages file>.lock` for the broker's life.
fn lock_messages_file(messages: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(messages);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|err| format!("cannot open lock file {}: {err}", path.display()))?;
    // A broker killed a moment ago may still be tearing down its threads,
    // and holds the lock until the last one is gone: wait a little.
    let deadline = Instant::now() + LOCK_WAIT;
    let mut locked = os::try_lock_exclusive(&file)?;
    while !locked && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        locked = os::try_lock_exclusive(&file)?;
    }
    if !locked {
        return Err(StartError::new(format!(
            "messages file {} is in use by another broker (it holds {}); \
             stop it or give this broker another messages file",
            messages.display(),
            path.display()
        )));
    }
    Ok(file)
}

fn accept_loop(shared: &Shared, listener: &TcpListener, pool: &Pool<(TcpStream, u64)>) {
    let next_id = AtomicU64::new(1);
    let max_clients = shared.config.max_clients;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) => {
                if shared.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                shared.core.log.warn(format_args!("accept: {err}"));
                // Out of descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.shutting_down.load(Ordering::Acquire) {
            refuse(&stream, ErrorCode::ShuttingDown);
            return;
        }
        if let auth::Admission::Refuse(first) = shared.access.admit(peer.ip()) {
            let counters = &shared.core.counters;
            counters.auth_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(text) = first {
                shared.core.log.warn(format_args!("{text}"));
            }
            refuse(&stream, ErrorCode::AuthenticationFailed);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if shared.active.fetch_add(1, Ordering::AcqRel) >= max_clients {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            shared
                .core
                .counters
                .refused_full
                .fetch_add(1, Ordering::Relaxed);
            refuse(&stream, ErrorCode::ServerFull);
            shared.core.log.debug(format_args!(
                "refused a connection: {max_clients} clients served"
            ));
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if let Err((stream, _)) = pool.submit((stream, id)) {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            refuse(&stream, ErrorCode::ServerFull);
        }
    }
}

/// Tells a connection we will not serve it why, without blocking.
fn refuse(stream: &TcpStream, code: ErrorCode) {
    let mut line = Vec::new();
    code.write_line(&mut line);
    let _ = os::send_nonblocking(stream, &line);
    let _ = os::shutdown(stream);
}

/// Waits until no connection is open, at most `limit`.
fn wait_for_idle(shared: &Shared, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while shared.active.load(Ordering::Acquire) > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// A stop flag that sleeping threads can wait on.
#[derive(Default)]
struct Stopper {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stopper {
    fn stop(&self) {
        *lock(&self.stopped) = true;
        self.wake.notify_all();
    }

    fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Sleeps up to `period`; true once stopped.
    fn sleep(&self, period: Duration) -> bool {
        let stopped = lock(&self.stopped);
        if *stopped {
            return true;
        }
        let (stopped, _) = self
            .wake
            .wait_timeout(stopped, period)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *stopped
    }
}

fn spawn_signal_thread(
    shared: &Arc<Shared>,
    stop: &Arc<Stopper>,
    listener: TcpListener,
) -> std::io::Result<JoinHandle<()>> {
    let shared = Arc::clone(shared);
    let stop = Arc::clone(stop);
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            while !stop.is_stopped() {
                match service::wait_signal(Duration::from_millis(200)) {
                    Some(Signal::Stop(name)) => {
                        shared.core.log.info(format_args!("received {name}"));
                        shared.shutting_down.store(true, Ordering::Release);
                        let _ = os::shutdown(&listener);
                        return;
                    }
                    Some(other) => on_service_signal(&shared, other),
                    None => {}
                }
            }
        })
}

/// SIGHUP, SIGUSR1, SIGUSR2: never fatal, each logged.
fn on_service_signal(shared: &Shared, signal: Signal) {
    let log = &shared.core.log;
    match signal {
        Signal::Hangup => match log.reopen() {
            // Written to the new file: where the rotated log continues.
            Ok(Some(path)) => log.info(format_args!(
                "received SIGHUP: log file {} reopened",
                path.display()
            )),
            Ok(None) => log.info(format_args!("received SIGHUP: no log file to reopen")),
            Err(err) => log.error(format_args!(
                "received SIGHUP: {err}; still writing to the old log file"
            )),
        },
        Signal::User1 => {
            // The same line a STATS request gets.
            let mut body = Vec::new();
            crate::protocol::encode_stats(&mut body, &shared.core.stats());
            let mut line = Vec::new();
            crate::protocol::encode_reply(&mut line, &crate::protocol::Reply::Stats(&body));
            let text = String::from_utf8_lossy(&line);
            log.info(format_args!("received SIGUSR1: {}", text.trim_end()));
        }
        Signal::User2 => log.info(format_args!("received SIGUSR2: ignored")),
        Signal::Stop(_) => {}
    }
}

fn spawn_housekeeping(
    shared: &Arc<Shared>,
    stop: &Arc<Stopper>,
) -> std::io::Result<JoinHandle<()>> {
    let shared = Arc::clone(shared);
    let stop = Arc::clone(stop);
    std::thread::Builder::new()
        .name("housekeeping".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let interval = shared.config.fsync_interval;
            // A shorter --fsync-interval than the tick shortens the tick, down
            // to a floor that keeps housekeeping from spinning.
            let tick = TICK.min(interval).max(MIN_TICK);
            let mut chores = Housekeeping::new(&shared.core, interval);
            while !stop.sleep(tick) {
                chores.tick();
            }
        })
}

/// What the housekeeping thread does, and when it last did it.
struct Housekeeping<'a> {
    core: &'a Core,
    fsync_interval: Duration,
    last_sync: Instant,
    last_slow: Instant,
    last_forced_compaction: Instant,
}

impl Housekeeping<'_> {
    fn new(core: &Core, fsync_interval: Duration) -> Housekeeping<'_> {
        let now = Instant::now();
        Housekeeping {
            core,
            fsync_interval,
            last_sync: now,
            last_slow: now,
            last_forced_compaction: now,
        }
    }

    fn tick(&mut self) {
        let core = self.core;
        // Under `always` SENDs sync themselves; under `never` nobody does.
        if core.config.fsync == FsyncPolicy::Interval
            && self.last_sync.elapsed() >= self.fsync_interval
        {
            self.last_sync = Instant::now();
            match core.sync_now() {
                Ok(()) => core.durability.store_succeeded(&core.log),
                Err(err) => core.durability.store_failed(
                    &core.log,
                    0,
                    &format_args!("background fsync: {err}"),
                ),
            }
        }
        core.expire_acks();
        core.conns.flush_pushes();
        if core.durability.writes_failing()
            && self.last_forced_compaction.elapsed() >= Duration::from_secs(1)
        {
            // Maybe the disk is full: reclaim what consumed records take, at
            // once rather than at the usual threshold (once a second: it
            // holds the state lock while it writes).
            self.last_forced_compaction = Instant::now();
            if let Err(err) = core.compact_if_worth_it(true) {
                core.log
                    .debug(format_args!("compaction while writes fail: {err}"));
            }
        }
        if self.last_slow.elapsed() >= Duration::from_secs(1) {
            self.last_slow = Instant::now();
            core.expire_cursors();
            if let Err(err) = core.save_offsets(false) {
                core.log.error(format_args!("saving offsets: {err}"));
            }
            if let Err(err) = core.compact_if_worth_it(false) {
                core.log.error(format_args!("compaction: {err}"));
            }
        }
    }
}
