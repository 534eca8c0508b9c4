//! The only `unsafe` code of `tcpstat`: a thin wrapper over the libc calls that open, send to
//! and receive from a `NETLINK_SOCK_DIAG` socket. Everything that interprets bytes lives in the
//! safe, pure `netlink` module.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A `NETLINK_SOCK_DIAG` socket in the caller's network namespace; closed on drop.
pub(crate) struct DiagSocket {
    fd: OwnedFd,
}

impl DiagSocket {
    /// Opens the socket. Errors are the raw `socket(2)` errors (EPROTONOSUPPORT, EACCES, ...).
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Bounds each receive, so a kernel that never ends a dump cannot hang the agent forever.
    pub(crate) fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 1_000_000: fits suseconds_t on every target.
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval that lives across the call; the length matches it.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                socklen_of::<libc::timeval>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one request message to the kernel (netlink port 0).
    pub(crate) fn send_to_kernel(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain old data for which all-zero bytes are valid.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `msg` and `addr` are valid for the lengths passed and outlive the call.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const addr).cast(),
                    socklen_of::<libc::sockaddr_nl>(),
                )
            };
            if sent < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if usize::try_from(sent).ok() != Some(msg.len()) {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short send of a netlink request",
                ));
            }
            return Ok(());
        }
    }

    /// Receives one datagram into `buf`. Returns the datagram's full length (`MSG_TRUNC`),
    /// which exceeds `buf.len()` when the kernel had to cut it: the caller must check.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            return usize::try_from(n).map_err(io::Error::other);
        }
    }
}

fn socklen_of<T>() -> libc::socklen_t {
    // Both types passed here are a few bytes long; the conversion cannot fail.
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}
