//! The calls that make the programs behave as Unix services: the broker's
//! whole signal set (stop, reopen the log, dump STATS, ignore), and a way
//! for a client to notice that the reader of its stdout went away.
//!
//! Like [`super::os`], signals are never handled in signal context: the
//! broker blocks every signal it cares about before it starts a thread and
//! one thread takes them with `sigtimedwait`. A signal that is blocked and
//! waited for cannot kill the process, which is the point: SIGHUP, SIGUSR1
//! and SIGUSR2 stop being fatal. SIGPIPE is set to "ignore" so a write to a
//! closed socket or pipe fails with `EPIPE` instead (std does this for
//! binaries already; a library caller may not have).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// A signal the broker acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT or SIGTERM: shut down cleanly.
    Stop(&'static str),
    /// SIGHUP: reopen the log file (after logrotate moved it).
    Hangup,
    /// SIGUSR1: write the STATS line to the log.
    User1,
    /// SIGUSR2: reserved; received and ignored.
    User2,
}

const SERVICE_SIGNALS: [libc::c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn service_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before
    // use; the calls only write into `set`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in SERVICE_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 in the calling
/// thread and every thread it starts afterwards, and ignores SIGPIPE. Call
/// it before starting any thread; then only [`wait_signal`] sees them.
pub fn block_service_signals() -> io::Result<()> {
    let set = service_set();
    // SAFETY: `set` is initialised; the old mask is not wanted (null).
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    // SAFETY: installing SIG_IGN for SIGPIPE has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    Ok(())
}

/// Waits up to `timeout` for one of the signals blocked by
/// [`block_service_signals`].
pub fn wait_signal(timeout: Duration) -> Option<Signal> {
    let set = service_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are initialised and outlive the call; the
    // siginfo output is not wanted (null is allowed).
    let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    match signal {
        libc::SIGINT => Some(Signal::Stop("SIGINT")),
        libc::SIGTERM => Some(Signal::Stop("SIGTERM")),
        libc::SIGHUP => Some(Signal::Hangup),
        libc::SIGUSR1 => Some(Signal::User1),
        libc::SIGUSR2 => Some(Signal::User2),
        _ => None,
    }
}

/// Sends `signal` (a `libc::SIG*` number) to process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers; a wrong pid fails with ESRCH.
    let ret = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks until the descriptor's peer is gone: for the write end of a
/// pipe, until no process has the read end open (`POLLERR`); for a socket,
/// until it is shut down (`POLLHUP`). For a terminal or a file it never
/// returns, which is right: nobody can "go away" from those.
pub fn wait_output_closed(output: &impl AsRawFd) -> io::Result<()> {
    let mut pollfd = libc::pollfd {
        fd: output.as_raw_fd(),
        // No events asked for: POLLERR and POLLHUP are always reported.
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: `pollfd` is one valid, writable pollfd; -1 waits forever.
        let ret = unsafe { libc::poll(&mut pollfd, 1, -1) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if pollfd.revents & libc::POLLNVAL != 0 {
            // Not an open descriptor (started with stdout closed): there
            // is no reader to lose, so there is nothing to watch.
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        if pollfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Ok(());
        }
    }
}
