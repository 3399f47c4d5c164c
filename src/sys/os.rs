//! The few process, signal and socket calls std does not offer.
//!
//! Signals are handled without handlers: the main thread blocks SIGINT and
//! SIGTERM before it starts any other thread (so every thread inherits the
//! mask), and one thread collects them with `sigtimedwait`. No code runs in
//! signal context, so nothing here needs to be async-signal-safe.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::{cvt, cvt_r};

/// Whether a process with `pid` exists and is not a zombie (it may
/// belong to another user). A zombie has exited: it holds no IPC objects,
/// though `kill(pid, 0)` still succeeds until its parent reaps it.
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let ret = unsafe { libc::kill(pid, 0) };
    let exists = ret == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

/// Whether `/proc/<pid>/stat` says the process is a zombie (or dead). Where
/// /proc is missing, the answer is no.
fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself contain spaces and parentheses: look after the last ')'.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X" | "x"))
}

/// An exclusive advisory lock on an open file (`flock`), released when the
/// file is closed. Returns `Ok(false)` if another process holds it.
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    let fd = file.as_raw_fd();
    // SAFETY: flock takes a descriptor the caller owns (borrowed for the call).
    match cvt_r(|| unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(err) => Err(err),
    }
}

/// The size of a memory page, from `sysconf` (4096 where it cannot say).
pub fn page_size() -> usize {
    // SAFETY: sysconf takes a plain integer and touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// A `timespec` for `timeout`, built field by field so it is right
/// whatever widths libc gives `time_t` and `tv_nsec` on the target (32-bit
/// targets with a 64-bit `time_t` add padding fields); a timeout past
/// what `time_t` holds is cut to its maximum.
pub(crate) fn timespec(timeout: Duration) -> libc::timespec {
    // SAFETY: timespec is plain data; all zeros is a valid value (and
    // zeroes any padding field a target adds).
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    ts.tv_sec = libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX);
    // Below 10^9, so it fits every tv_nsec type.
    ts.tv_nsec = timeout.subsec_nanos() as _;
    ts
}

/// The id of this process.
pub fn pid() -> i32 {
    std::process::id() as i32
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use;
    // both calls only write into `set`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and in every thread it
/// starts afterwards, so that they wait for [`wait_termination`]. Call it
/// first thing in `main`.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is initialised; the old mask is not wanted (null).
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits up to `timeout` for SIGINT or SIGTERM (blocked beforehand with
/// [`block_termination_signals`]) and returns the signal's name.
pub fn wait_termination(timeout: Duration) -> Option<&'static str> {
    let set = termination_set();
    // libc declares sigtimedwait with its own timespec and the symbol
    // that goes with it (the 64-bit time variant where there is one).
    let ts = timespec(timeout);
    // SAFETY: `set` and `ts` are initialised and outlive the call; the
    // siginfo output is not wanted (null is allowed).
    let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    match signal {
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => None,
    }
}

/// Sends SIGTERM (or SIGINT with `interrupt`) to process `pid`: how a
/// supervisor or a test asks a broker to stop cleanly.
pub fn request_stop(pid: u32, interrupt: bool) -> io::Result<()> {
    let signal = if interrupt {
        libc::SIGINT
    } else {
        libc::SIGTERM
    };
    // SAFETY: kill takes plain integers; a wrong pid fails with ESRCH.
    cvt(unsafe { libc::kill(pid as libc::pid_t, signal) }, || {
        format!("kill({pid}, {signal})")
    })
    .map(drop)
}

/// Ignores SIGXFSZ, so that writing past a file-size limit fails with
/// `EFBIG` (which the store reports) instead of killing the process.
pub fn ignore_file_size_signal() {
    // SAFETY: installing SIG_IGN for SIGXFSZ has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Shuts down both directions of a socket. For a listener this wakes a
/// thread blocked in `accept`, which std's `TcpListener` does not offer.
pub fn shutdown(socket: &impl AsRawFd) -> io::Result<()> {
    shutdown_how(socket, libc::SHUT_RDWR)
}

/// Shuts down the reading side of a stream: a thread blocked in `read`
/// wakes with end of file, while writes still work.
pub fn shutdown_read(socket: &impl AsRawFd) -> io::Result<()> {
    shutdown_how(socket, libc::SHUT_RD)
}

fn shutdown_how(socket: &impl AsRawFd, how: libc::c_int) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    // SAFETY: shutdown takes a descriptor the caller owns (borrowed for the call).
    cvt(unsafe { libc::shutdown(fd, how) }, || {
        format!("shutdown(fd={fd}, {how})")
    })
    .map(drop)
}

/// Sends as much of `data` as the socket takes without blocking and
/// returns how much that was (0 when the send buffer is full). Never
/// raises SIGPIPE.
pub fn send_nonblocking(socket: &impl AsRawFd, data: &[u8]) -> io::Result<usize> {
    let fd = socket.as_raw_fd();
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: `data` is a valid buffer of `data.len()` bytes.
    match cvt_r(|| unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), flags) }) {
        // Not -1, so not negative: send returns a count or -1.
        Ok(n) => Ok(n as usize),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(err) => Err(err),
    }
}

/// Waits up to `timeout` (at most about 24 days) until any of `sockets`
/// has something to read, or was closed or failed (a read then says
/// which), and returns which ones. `poll(2)`, the way Beej's guide waits
/// on several sockets at once; a signal that interrupts it counts as
/// "none ready", so the caller simply looks at its clocks and waits again.
pub fn wait_readable<const N: usize>(
    sockets: [&dyn AsRawFd; N],
    timeout: Duration,
) -> io::Result<[bool; N]> {
    let mut fds = sockets.map(|socket| libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is an array of N initialised pollfd that outlives the
    // call, and N is its length.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), N as libc::nfds_t, millis) };
    if ret == -1 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(err);
    }
    let ready = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Ok(fds.map(|fd| fd.revents & ready != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_readable_says_which_socket_has_data() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let (mut a_out, a_in) = UnixStream::pair().unwrap();
        let (_b_out, b_in) = UnixStream::pair().unwrap();
        let quiet = wait_readable([&a_in, &b_in], Duration::from_millis(1)).unwrap();
        assert_eq!(quiet, [false, false]);
        a_out.write_all(b"x").unwrap();
        let ready = wait_readable([&a_in, &b_in], Duration::from_secs(5)).unwrap();
        assert_eq!(ready, [true, false]);
        drop(a_out);
        drop(_b_out);
        let closed = wait_readable([&a_in, &b_in], Duration::from_secs(5)).unwrap();
        assert_eq!(closed, [true, true], "a closed peer reads as ready (EOF)");
    }

    #[test]
    fn page_size_and_timespec_fit_the_target() {
        assert!(page_size().is_power_of_two() && page_size() >= 4096);
        let ts = timespec(Duration::new(3, 250));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (3, 250));
        // A timeout past what time_t holds is cut, not wrapped negative.
        let ts = timespec(Duration::from_secs(u64::MAX));
        assert_eq!(ts.tv_sec, libc::time_t::MAX);
    }
}
