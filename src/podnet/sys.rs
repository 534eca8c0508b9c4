//! The only `unsafe` code of `podnet`: `pidfd_open(2)`, `pidfd_send_signal(2)` with signal 0
//! (is the pinned process still alive?) and `setns(2)` into a pidfd's network namespace.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A descriptor pinning one process: unlike a PID, it can never come to name another process.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the pinned process still exists (`ESRCH` once it has exited and been reaped).
pub(crate) fn pidfd_alive(pidfd: &OwnedFd) -> io::Result<bool> {
    // SAFETY: signal 0 is only a permission and existence check; the info pointer may be NULL.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        _ => Err(err),
    }
}

/// Moves the calling *thread* into the network namespace `fd` names: a pidfd's process's
/// (Linux 5.8) or a `/proc/.../ns/net` file's.
pub(crate) fn setns_net(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and a flag, no pointers.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
