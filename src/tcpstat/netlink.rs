//! Counting TCP sockets per state with a netlink `sock_diag` dump.
//!
//! One `SOCK_DIAG_BY_FAMILY` dump per address family, with no extension attributes: the kernel
//! then sends only the fixed `inet_diag_msg` per socket, and we read one byte of it
//! (`idiag_state`). Asking for `tcp_info` would make the dump about 30 % slower for nothing.
//!
//! The byte-level parts ([`build_request`], [`parse_datagram`]) are pure and unit-tested; the
//! socket calls live in `sys`.

use std::io;
use std::time::Duration;

use super::error::TcpStatError;
use super::state::{StateCounts, TcpState};
use super::sys::DiagSocket;

/// Receive buffer size. The kernel fills at most ~32 KiB per dump datagram, so this never
/// truncates; a truncation would still be detected and reported.
pub const RECV_BUFFER_SIZE: usize = 32 * 1024;

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`.
pub const INET_DIAG_REQ_V2_LEN: usize = 56;
/// `sizeof(struct inet_diag_msg)`: the least a socket record can carry.
pub const INET_DIAG_MSG_LEN: usize = 72;
/// Length of the request message.
pub const REQUEST_LEN: usize = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;

/// `SOCK_DIAG_BY_FAMILY`: request and record message type.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
/// Bits 1..=12: every state, including `NEW_SYN_RECV` request sockets. Bit 13
/// (`BOUND_INACTIVE`, bound but neither listening nor connected) is left out on purpose: such
/// sockets are not in `/proc/net/tcp` nor in `netstat`, so both sources count the same set.
pub const ALL_STATES_MASK: u32 = 0x1ffe;
const IPPROTO_TCP: u8 = 6;

/// Bound for one receive: a healthy dump answers in milliseconds.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Address family of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `AF_INET`.
    Inet,
    /// `AF_INET6`; includes IPv4-mapped sockets (`::ffff:a.b.c.d`), which are IPv6 sockets, as
    /// `ss -6` and `/proc/net/tcp6` count them.
    Inet6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::Inet => libc::AF_INET as u8,
            Family::Inet6 => libc::AF_INET6 as u8,
        }
    }
}

/// Builds the dump request: `nlmsghdr` + `inet_diag_req_v2` for TCP, all states, no
/// extensions, wildcard socket id.
pub fn build_request(family: Family, seq: u32) -> [u8; REQUEST_LEN] {
    let mut msg = [0u8; REQUEST_LEN];
    msg[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel assigns our port id.
    let req = NLMSG_HDRLEN;
    msg[req] = family.af(); // sdiag_family
    msg[req + 1] = IPPROTO_TCP; // sdiag_protocol
    msg[req + 2] = 0; // idiag_ext: no attributes
    msg[req + 4..req + 8].copy_from_slice(&ALL_STATES_MASK.to_ne_bytes());
    // inet_diag_sockid stays all zero: match every socket.
    msg
}

/// Whether a dump needs more datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// No `NLMSG_DONE` yet: receive the next datagram.
    More,
    /// `NLMSG_DONE` seen: the dump is complete.
    Done,
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    buf.get(at..at.checked_add(2)?)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at.checked_add(4)?)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    read_u32(buf, at).map(|v| v as i32)
}

fn malformed(offset: usize, reason: impl Into<String>) -> TcpStatError {
    TcpStatError::Malformed {
        offset,
        reason: reason.into(),
    }
}

/// Walks the netlink messages of one received datagram and adds each socket record's state to
/// `counts`. `seq` is the request's sequence number; messages of another dump are an error.
///
/// Never panics: short headers, lengths that overrun the datagram, short records and unknown
/// states are returned as errors.
pub fn parse_datagram(
    buf: &[u8],
    seq: u32,
    counts: &mut StateCounts,
) -> Result<Progress, TcpStatError> {
    let mut offset = 0usize;
    while offset < buf.len() {
        let rest = &buf[offset..];
        if rest.len() < NLMSG_HDRLEN {
            return Err(malformed(
                offset,
                format!(
                    "{} trailing bytes, shorter than a netlink header",
                    rest.len()
                ),
            ));
        }
        let header_field = |at| malformed(offset + at, "unreadable header field");
        let len = read_u32(rest, 0).ok_or_else(|| header_field(0))? as usize;
        let kind = read_u16(rest, 4).ok_or_else(|| header_field(4))?;
        let flags = read_u16(rest, 6).ok_or_else(|| header_field(6))?;
        let msg_seq = read_u32(rest, 8).ok_or_else(|| header_field(8))?;
        if len < NLMSG_HDRLEN {
            return Err(malformed(
                offset,
                format!("nlmsg_len {len} below header size"),
            ));
        }
        if len > rest.len() {
            return Err(malformed(
                offset,
                format!("nlmsg_len {len} overruns the {} bytes left", rest.len()),
            ));
        }
        if msg_seq != seq {
            return Err(malformed(
                offset,
                format!("sequence {msg_seq} does not match request {seq}"),
            ));
        }
        if flags & NLM_F_DUMP_INTR != 0 {
            return Err(TcpStatError::DumpInterrupted);
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        match kind {
            SOCK_DIAG_BY_FAMILY => {
                if payload.len() < INET_DIAG_MSG_LEN {
                    return Err(malformed(
                        offset,
                        format!(
                            "socket record of {} bytes, need {INET_DIAG_MSG_LEN}",
                            payload.len()
                        ),
                    ));
                }
                // inet_diag_msg: idiag_family, idiag_state, ...
                let state = payload[1];
                counts.increment(
                    TcpState::from_kernel(state).ok_or(TcpStatError::UnknownState(state))?,
                );
            }
            NLMSG_DONE => {
                // The payload is an int: negative means the dump failed part-way. Old kernels
                // may send none, which is a plain end.
                if let Some(err) = read_i32(payload, 0)
                    && err < 0
                {
                    return Err(TcpStatError::Kernel {
                        errno: err.saturating_neg(),
                    });
                }
                return Ok(Progress::Done);
            }
            NLMSG_ERROR => {
                let err = read_i32(payload, 0)
                    .ok_or_else(|| malformed(offset, "NLMSG_ERROR without an error code"))?;
                if err != 0 {
                    return Err(TcpStatError::Kernel {
                        errno: err.saturating_neg(),
                    });
                }
                // 0 is an acknowledgement; a dump does not end with one, so keep reading.
            }
            NLMSG_NOOP => {}
            other => {
                return Err(malformed(
                    offset,
                    format!("unexpected message type {other}"),
                ));
            }
        }
        // Messages are 4-byte aligned; the last one may omit its padding.
        offset = offset.saturating_add(len.next_multiple_of(4));
    }
    Ok(Progress::More)
}

/// Counts the TCP sockets of both families in the caller's network namespace.
///
/// Returns [`TcpStatError::NetlinkUnavailable`] when the socket cannot be created or the kernel
/// has no TCP diag handler, so callers can fall back to procfs.
pub fn count() -> Result<(StateCounts, StateCounts), TcpStatError> {
    let socket = DiagSocket::open().map_err(TcpStatError::NetlinkUnavailable)?;
    socket
        .set_recv_timeout(RECV_TIMEOUT)
        .map_err(|source| TcpStatError::NetlinkIo {
            op: "setsockopt",
            source,
        })?;
    let mut buf = vec![0u8; RECV_BUFFER_SIZE];
    let ipv4 = match dump(&socket, Family::Inet, 1, &mut buf) {
        // No handler for TCP (tcp_diag missing): the same as having no sock_diag at all.
        Err(TcpStatError::Kernel { errno })
            if errno == libc::ENOENT || errno == libc::EOPNOTSUPP =>
        {
            return Err(TcpStatError::NetlinkUnavailable(
                io::Error::from_raw_os_error(errno),
            ));
        }
        other => other?,
    };
    let ipv6 = match dump(&socket, Family::Inet6, 2, &mut buf) {
        // IPv6 disabled on this kernel: there are no IPv6 sockets to count.
        Err(TcpStatError::Kernel { errno })
            if errno == libc::ENOENT || errno == libc::EAFNOSUPPORT =>
        {
            StateCounts::default()
        }
        other => other?,
    };
    Ok((ipv4, ipv6))
}

/// Counts one family only. Each dump walks the machine-wide TCP hash table once, whatever
/// the family, so this costs about half of [`count`].
pub fn count_family(family: Family) -> Result<StateCounts, TcpStatError> {
    let socket = DiagSocket::open().map_err(TcpStatError::NetlinkUnavailable)?;
    socket
        .set_recv_timeout(RECV_TIMEOUT)
        .map_err(|source| TcpStatError::NetlinkIo {
            op: "setsockopt",
            source,
        })?;
    let mut buf = vec![0u8; RECV_BUFFER_SIZE];
    dump(&socket, family, 1, &mut buf)
}

fn dump(
    socket: &DiagSocket,
    family: Family,
    seq: u32,
    buf: &mut [u8],
) -> Result<StateCounts, TcpStatError> {
    socket
        .send_to_kernel(&build_request(family, seq))
        .map_err(|source| TcpStatError::NetlinkIo { op: "send", source })?;
    let mut counts = StateCounts::default();
    loop {
        let len = socket
            .recv(buf)
            .map_err(|source| TcpStatError::NetlinkIo { op: "recv", source })?;
        if len > buf.len() {
            return Err(TcpStatError::DatagramTruncated {
                len,
                capacity: buf.len(),
            });
        }
        if len == 0 {
            return Err(malformed(0, "empty datagram before NLMSG_DONE"));
        }
        if parse_datagram(&buf[..len], seq, &mut counts)? == Progress::Done {
            return Ok(counts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQ: u32 = 7;

    fn header(len: usize, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&4242u32.to_ne_bytes());
        out
    }

    fn record(state: u8) -> Vec<u8> {
        let mut out = header(
            NLMSG_HDRLEN + INET_DIAG_MSG_LEN,
            SOCK_DIAG_BY_FAMILY,
            2,
            SEQ,
        );
        let mut body = vec![0u8; INET_DIAG_MSG_LEN];
        body[0] = libc::AF_INET as u8;
        body[1] = state;
        out.extend_from_slice(&body);
        out
    }

    fn done(code: i32) -> Vec<u8> {
        let mut out = header(NLMSG_HDRLEN + 4, NLMSG_DONE, 2, SEQ);
        out.extend_from_slice(&code.to_ne_bytes());
        out
    }

    fn error(code: i32) -> Vec<u8> {
        let mut out = header(NLMSG_HDRLEN + 4 + NLMSG_HDRLEN, NLMSG_ERROR, 0, SEQ);
        out.extend_from_slice(&code.to_ne_bytes());
        out.extend_from_slice(&header(REQUEST_LEN, SOCK_DIAG_BY_FAMILY, 0x301, SEQ));
        out
    }

    fn parse(buf: &[u8]) -> (Result<Progress, TcpStatError>, StateCounts) {
        let mut counts = StateCounts::default();
        let result = parse_datagram(buf, SEQ, &mut counts);
        (result, counts)
    }

    #[test]
    fn request_layout_matches_the_kernel_structs() {
        let req = build_request(Family::Inet6, 9);
        assert_eq!(req.len(), 72);
        assert_eq!(read_u32(&req, 0), Some(72));
        assert_eq!(read_u16(&req, 4), Some(20));
        assert_eq!(read_u16(&req, 6), Some(0x301));
        assert_eq!(read_u32(&req, 8), Some(9));
        assert_eq!(req[16], libc::AF_INET6 as u8);
        assert_eq!(req[17], 6);
        assert_eq!(req[18], 0, "no extension attributes");
        assert_eq!(read_u32(&req, 20), Some(0x1ffe));
        assert!(req[24..].iter().all(|b| *b == 0), "wildcard socket id");
        assert_eq!(build_request(Family::Inet, 1)[16], libc::AF_INET as u8);
    }

    #[test]
    fn counts_records_across_datagrams_until_done() {
        let mut first = Vec::new();
        for state in [1, 1, 6, 10, 12, 3] {
            first.extend(record(state));
        }
        let (result, counts) = parse(&first);
        assert_eq!(result.ok(), Some(Progress::More));
        assert_eq!(counts.get(TcpState::Established), 2);
        assert_eq!(counts.get(TcpState::TimeWait), 1);
        assert_eq!(counts.get(TcpState::Listen), 1);
        assert_eq!(
            counts.get(TcpState::SynRecv),
            2,
            "NEW_SYN_RECV folds into SYN_RECV"
        );

        let mut second = record(8);
        second.extend(done(0));
        second.extend(record(1)); // after DONE: ignored
        let mut total = counts;
        let result = parse_datagram(&second, SEQ, &mut total);
        assert_eq!(result.ok(), Some(Progress::Done));
        assert_eq!(total.get(TcpState::CloseWait), 1);
        assert_eq!(total.total(), 7);
    }

    #[test]
    fn done_alone_and_empty_buffer() {
        let (result, counts) = parse(&done(0));
        assert_eq!(result.ok(), Some(Progress::Done));
        assert_eq!(counts.total(), 0);
        let (result, _) = parse(&header(NLMSG_HDRLEN, NLMSG_DONE, 2, SEQ));
        assert_eq!(result.ok(), Some(Progress::Done), "DONE without payload");
        let (result, _) = parse(&[]);
        assert_eq!(result.ok(), Some(Progress::More));
    }

    #[test]
    fn last_message_without_padding_is_accepted() {
        let mut buf = header(
            NLMSG_HDRLEN + INET_DIAG_MSG_LEN + 1,
            SOCK_DIAG_BY_FAMILY,
            2,
            SEQ,
        );
        let mut body = vec![0u8; INET_DIAG_MSG_LEN + 1];
        body[1] = 6;
        buf.extend(body);
        let (result, counts) = parse(&buf);
        assert_eq!(result.ok(), Some(Progress::More));
        assert_eq!(counts.get(TcpState::TimeWait), 1);
    }

    #[test]
    fn kernel_errors_are_reported() {
        let (result, _) = parse(&error(-libc::EPERM));
        assert!(
            matches!(result, Err(TcpStatError::Kernel { errno }) if errno == libc::EPERM),
            "{result:?}"
        );
        let (result, _) = parse(&done(-libc::EINTR));
        assert!(matches!(result, Err(TcpStatError::Kernel { errno }) if errno == libc::EINTR));
        // An ACK (error 0) is not an error.
        let mut buf = error(0);
        buf.extend(done(0));
        assert_eq!(parse(&buf).0.ok(), Some(Progress::Done));
        // NLMSG_ERROR too short to hold the code.
        let (result, _) = parse(&header(NLMSG_HDRLEN + 2, NLMSG_ERROR, 0, SEQ));
        assert!(
            matches!(result, Err(TcpStatError::Malformed { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn truncated_and_malformed_buffers_are_errors() {
        let full = record(1);
        // Every proper prefix of a record is malformed, never a panic.
        for cut in 1..full.len() {
            let (result, counts) = parse(&full[..cut]);
            assert!(
                matches!(result, Err(TcpStatError::Malformed { .. })),
                "cut at {cut}: {result:?}"
            );
            assert_eq!(counts.total(), 0);
        }
        // A valid record followed by a torn one: the error points at the second.
        let mut two = record(1);
        two.extend_from_slice(&record(1)[..20]);
        let (result, _) = parse(&two);
        assert!(
            matches!(result, Err(TcpStatError::Malformed { offset: 88, .. })),
            "{result:?}"
        );
        // Length below the header size (would loop forever if accepted).
        let (result, _) = parse(&header(8, SOCK_DIAG_BY_FAMILY, 2, SEQ));
        assert!(matches!(result, Err(TcpStatError::Malformed { .. })));
        // Header claims a record but carries too little payload.
        let mut short = header(NLMSG_HDRLEN + 8, SOCK_DIAG_BY_FAMILY, 2, SEQ);
        short.extend([0u8; 8]);
        let (result, _) = parse(&short);
        assert!(matches!(result, Err(TcpStatError::Malformed { .. })));
        // Huge length.
        let (result, _) = parse(&header(u32::MAX as usize, SOCK_DIAG_BY_FAMILY, 2, SEQ));
        assert!(matches!(result, Err(TcpStatError::Malformed { .. })));
    }

    #[test]
    fn unknown_state_type_sequence_and_interrupt_are_errors() {
        for state in [0u8, 13, 255] {
            let (result, _) = parse(&record(state));
            assert!(
                matches!(result, Err(TcpStatError::UnknownState(s)) if s == state),
                "{result:?}"
            );
        }
        let mut other_type = header(NLMSG_HDRLEN, 99, 0, SEQ);
        other_type.extend(done(0));
        assert!(matches!(
            parse(&other_type).0,
            Err(TcpStatError::Malformed { .. })
        ));

        let mut wrong_seq = record(1);
        wrong_seq[8..12].copy_from_slice(&(SEQ + 1).to_ne_bytes());
        assert!(matches!(
            parse(&wrong_seq).0,
            Err(TcpStatError::Malformed { .. })
        ));

        let mut interrupted = record(1);
        interrupted[6..8].copy_from_slice(&(2 | NLM_F_DUMP_INTR).to_ne_bytes());
        assert!(matches!(
            parse(&interrupted).0,
            Err(TcpStatError::DumpInterrupted)
        ));

        let mut noop = header(NLMSG_HDRLEN, NLMSG_NOOP, 0, SEQ);
        noop.extend(done(0));
        assert_eq!(parse(&noop).0.ok(), Some(Progress::Done));
    }
}
