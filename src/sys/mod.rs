//! The only place in the crate that talks to the kernel through raw libc:
//! SysV shared memory ([`shm`]), SysV semaphores ([`sem`]), and the few
//! socket and signal calls std does not offer ([`os`], [`service`]).
//!
//! Soundness by construction: no safe function here reads or writes the
//! shared segment except through [`shm::RegionGuard`], which holds both a
//! process-local mutex and the SysV MUTEX, and a segment is mapped at most
//! once per process, so no two threads of this process ever touch it at
//! once. What other processes do to it is the subject of [`shm`]'s header.
//!
//! Every `unsafe` block of the crate lives below this module, each under a
//! `// SAFETY:` comment saying what was checked. The wrappers are safe to
//! call: they turn "-1 and errno" into `io::Result` with a message that
//! names the syscall, its arguments and what the errno means, and their
//! `Drop`s detach or release without ever panicking. Removing a kernel
//! object (`IPC_RMID`) is always an explicit call, never a side effect of
//! `Drop`, because a segment outlives the process by design.

pub mod os;
pub mod sem;
pub mod service;
pub mod shm;

use std::io;

/// A C return value that says "failed, see errno" with -1.
pub(crate) trait IsMinusOne: Copy {
    fn is_minus_one(self) -> bool;
}

impl IsMinusOne for libc::c_int {
    fn is_minus_one(self) -> bool {
        self == -1
    }
}

impl IsMinusOne for libc::ssize_t {
    fn is_minus_one(self) -> bool {
        self == -1
    }
}

/// Calls `call` until it does not fail with `EINTR` (std's `cvt_r`): the
/// one place that retries interrupted calls. Callers recompute anything
/// time-dependent (a remaining timeout) inside `call`. The error is the
/// raw errno; callers add what they called.
pub(crate) fn cvt_r<T: IsMinusOne>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        let ret = call();
        if !ret.is_minus_one() {
            return Ok(ret);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Turns the C convention "-1 and errno" into an `io::Result`, adding
/// `what` (the call and its arguments) and a hint at what the errno means
/// for this family of calls.
fn cvt(ret: libc::c_int, what: impl FnOnce() -> String) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(annotate(io::Error::last_os_error(), what()))
    } else {
        Ok(ret)
    }
}

/// Wraps `err` with the failing call and, for the errnos that SysV IPC
/// gives a special meaning, what it usually means in practice.
fn annotate(err: io::Error, what: String) -> io::Error {
    let hint = match err.raw_os_error() {
        Some(libc::ENOSPC) => {
            " (a kernel IPC limit was reached: see /proc/sys/kernel/shmmni, shmall, sem; not the disk)"
        }
        Some(libc::EINVAL) => " (size or count out of the kernel's limits, or a mismatched object)",
        Some(libc::EACCES) => " (an object with this key belongs to another user or mode)",
        Some(libc::EIDRM) => " (the object was removed meanwhile)",
        Some(libc::ENOMEM) => " (the kernel is out of memory for IPC)",
        _ => "",
    };
    io::Error::new(err.kind(), format!("{what}: {err}{hint}"))
}
