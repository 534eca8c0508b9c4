//! Counting TCP sockets per state with a netlink `sock_diag` dump.
//!
//! Two ways to ask, both with no extension attributes (the kernel then sends only the fixed
//! `inet_diag_msg` per socket, and we read two bytes of it: family and state; asking for
//! `tcp_info` would make the dump about 30 % slower for nothing):
//!
//! - **One walk**: the legacy `TCPDIAG_GETSOCK` request (type 18, old `struct inet_diag_req`).
//!   The kernel dumps it with family `AF_UNSPEC`, so one walk of the machine-wide TCP hash
//!   table returns the IPv4 and the IPv6 sockets; each record names its family.
//! - **Per family**: one `SOCK_DIAG_BY_FAMILY` dump (type 20, `inet_diag_req_v2`) for
//!   `AF_INET`, one for `AF_INET6`: two walks of the same table. This is what `ss` does, and
//!   the fallback when a kernel does not answer the legacy request.
//!
//! The byte-level parts ([`build_request`], [`parse_datagram`]) are pure and unit-tested; the
//! socket calls live in `sys`. Replies are untrusted: every length is checked, nothing is
//! allocated per socket, and one fixed receive buffer serves the whole count.

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
/// `sizeof(struct inet_diag_req)`, the legacy request: family, src_len, dst_len, ext,
/// 48-byte socket id, states, dbs.
pub const INET_DIAG_REQ_LEN: usize = 60;
/// `sizeof(struct inet_diag_msg)`: the least a socket record can carry.
pub const INET_DIAG_MSG_LEN: usize = 72;
/// Longest request message (the legacy one).
pub const MAX_REQUEST_LEN: usize = NLMSG_HDRLEN + INET_DIAG_REQ_LEN;

/// `TCPDIAG_GETSOCK`: legacy TCP request and its record message type.
pub const TCPDIAG_GETSOCK: u16 = 18;
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

/// One dump request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `TCPDIAG_GETSOCK` with `AF_UNSPEC`: both families in one walk.
    AllFamilies,
    /// `SOCK_DIAG_BY_FAMILY` for one family.
    Family(Family),
}

impl Request {
    /// The message type of the records answering this request (the request's own type).
    pub const fn record_type(self) -> u16 {
        match self {
            Request::AllFamilies => TCPDIAG_GETSOCK,
            Request::Family(_) => SOCK_DIAG_BY_FAMILY,
        }
    }
}

/// How the sockets were walked, reported as the snapshot's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// One `TCPDIAG_GETSOCK` walk for both families.
    Single,
    /// One `SOCK_DIAG_BY_FAMILY` walk per family.
    PerFamily,
}

/// Sockets per state, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyCounts {
    pub ipv4: StateCounts,
    /// IPv6 sockets, IPv4-mapped ones included.
    pub ipv6: StateCounts,
}

/// A request message: a fixed buffer and the used length (the two requests differ in size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestMessage {
    bytes: [u8; MAX_REQUEST_LEN],
    len: usize,
}

impl RequestMessage {
    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Builds a dump request for TCP, all states, no extensions, wildcard socket id.
pub fn build_request(request: Request, seq: u32) -> RequestMessage {
    let mut msg = [0u8; MAX_REQUEST_LEN];
    let len = match request {
        Request::AllFamilies => {
            // struct inet_diag_req: the kernel dumps the compat request as AF_UNSPEC
            // whatever the family byte says; we say so too.
            let req = NLMSG_HDRLEN;
            msg[req] = libc::AF_UNSPEC as u8; // idiag_family
            // idiag_src_len, idiag_dst_len, idiag_ext: 0. Socket id (48 bytes): wildcard.
            msg[req + 52..req + 56].copy_from_slice(&ALL_STATES_MASK.to_ne_bytes());
            // idiag_dbs: unused by the kernel, 0.
            NLMSG_HDRLEN + INET_DIAG_REQ_LEN
        }
        Request::Family(family) => {
            let req = NLMSG_HDRLEN;
            msg[req] = family.af(); // sdiag_family
            msg[req + 1] = IPPROTO_TCP; // sdiag_protocol
            msg[req + 2] = 0; // idiag_ext: no attributes
            msg[req + 4..req + 8].copy_from_slice(&ALL_STATES_MASK.to_ne_bytes());
            // inet_diag_sockid stays all zero: match every socket.
            NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN
        }
    };
    msg[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&request.record_type().to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel assigns our port id.
    RequestMessage { bytes: msg, len }
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
/// the counts of the record's own family. `seq` is the request's sequence number and
/// `record_type` its [`Request::record_type`]; messages of another dump are an error.
///
/// Never panics: short headers, lengths that overrun the datagram, short records, unknown
/// families and unknown states are returned as errors.
pub fn parse_datagram(
    buf: &[u8],
    seq: u32,
    record_type: u16,
    counts: &mut FamilyCounts,
) -> Result<Progress, TcpStatError> {
    let mut offset = 0usize;
    while offset < buf.len() {
        let rest = &buf[offset..];
        let (len, kind) = read_header(rest, offset, seq)?;
        let payload = &rest[NLMSG_HDRLEN..len];
        if let Some(done) = handle_message(kind, payload, offset, record_type, counts)? {
            return Ok(done);
        }
        // Messages are 4-byte aligned; the last one may omit its padding.
        offset = offset.saturating_add(len.next_multiple_of(4));
    }
    Ok(Progress::More)
}

/// The netlink header at the start of `rest` (at `offset` in the datagram): the message's
/// length, checked to fit in `rest`, and its type. A message of another dump, or of a dump the
/// kernel interrupted, is an error.
fn read_header(rest: &[u8], offset: usize, seq: u32) -> Result<(usize, u16), TcpStatError> {
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
    Ok((len, kind))
}

/// One message's payload: a socket record is counted; `Some` when the dump ends here.
fn handle_message(
    kind: u16,
    payload: &[u8],
    offset: usize,
    record_type: u16,
    counts: &mut FamilyCounts,
) -> Result<Option<Progress>, TcpStatError> {
    match kind {
        _ if kind == record_type => count_record(payload, offset, counts)?,
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
            return Ok(Some(Progress::Done));
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
    Ok(None)
}

/// Adds one `inet_diag_msg` socket record's state to the counts of its address family.
fn count_record(
    payload: &[u8],
    offset: usize,
    counts: &mut FamilyCounts,
) -> Result<(), TcpStatError> {
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
    let family = match i32::from(payload[0]) {
        libc::AF_INET => &mut counts.ipv4,
        libc::AF_INET6 => &mut counts.ipv6,
        other => {
            return Err(malformed(
                offset,
                format!("socket record of address family {other}"),
            ));
        }
    };
    let state = payload[1];
    family.increment(TcpState::from_kernel(state).ok_or(TcpStatError::UnknownState(state))?);
    Ok(())
}

/// Whether a failed one-walk request means "this kernel does not answer it" (so the
/// per-family dumps should be tried) rather than a real failure. Only the kernel's own
/// refusals qualify: a malformed reply or an I/O error is reported, never papered over.
pub fn single_walk_refused(err: &TcpStatError) -> bool {
    matches!(err, TcpStatError::Kernel { .. })
}

/// Counts the TCP sockets of both families in the caller's network namespace: one walk if the
/// kernel answers `TCPDIAG_GETSOCK`, else one walk per family. Says which walk was used.
///
/// Returns [`TcpStatError::NetlinkUnavailable`] when the socket cannot be created or the kernel
/// has no TCP diag handler, so callers can fall back to procfs.
pub fn count() -> Result<(FamilyCounts, Walk), TcpStatError> {
    count_trying(build_request(Request::AllFamilies, 1).as_bytes())
}

/// [`count`], but first sends a legacy request cut short of `struct inet_diag_req`, which
/// the kernel refuses (`EINVAL`): drives the fallback with a real kernel refusal. Tests only.
#[doc(hidden)]
pub fn count_after_refused_single_walk() -> Result<(FamilyCounts, Walk), TcpStatError> {
    let full = build_request(Request::AllFamilies, 1);
    let short_len = NLMSG_HDRLEN + INET_DIAG_REQ_LEN / 2;
    let mut short = [0u8; NLMSG_HDRLEN + INET_DIAG_REQ_LEN / 2];
    short.copy_from_slice(&full.as_bytes()[..short_len]);
    short[0..4].copy_from_slice(&(short_len as u32).to_ne_bytes());
    count_trying(&short)
}

fn count_trying(single_walk_request: &[u8]) -> Result<(FamilyCounts, Walk), TcpStatError> {
    let socket = open()?;
    let mut buf = vec![0u8; RECV_BUFFER_SIZE];
    match dump(&socket, single_walk_request, TCPDIAG_GETSOCK, 1, &mut buf) {
        Ok(counts) => Ok((counts, Walk::Single)),
        Err(err) if single_walk_refused(&err) => {
            tracing::debug!(%err, "TCPDIAG_GETSOCK refused, dumping per family");
            Ok((count_per_family_on(&socket, &mut buf)?, Walk::PerFamily))
        }
        Err(err) => Err(err),
    }
}

/// Counts with one `SOCK_DIAG_BY_FAMILY` dump per family (two walks), never the legacy
/// request: the fallback path, callable on its own for tests and benchmarks.
pub fn count_per_family() -> Result<FamilyCounts, TcpStatError> {
    let socket = open()?;
    let mut buf = vec![0u8; RECV_BUFFER_SIZE];
    count_per_family_on(&socket, &mut buf)
}

fn count_per_family_on(socket: &DiagSocket, buf: &mut [u8]) -> Result<FamilyCounts, TcpStatError> {
    let ipv4 = match dump_request(socket, Request::Family(Family::Inet), 2, buf) {
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
    let ipv6 = match dump_request(socket, Request::Family(Family::Inet6), 3, buf) {
        // IPv6 disabled on this kernel: there are no IPv6 sockets to count.
        Err(TcpStatError::Kernel { errno })
            if errno == libc::ENOENT || errno == libc::EAFNOSUPPORT =>
        {
            FamilyCounts::default()
        }
        other => other?,
    };
    Ok(FamilyCounts {
        ipv4: ipv4.ipv4 + ipv6.ipv4,
        ipv6: ipv4.ipv6 + ipv6.ipv6,
    })
}

/// Counts one family only (one walk of the machine-wide table, like [`count`]'s one walk).
pub fn count_family(family: Family) -> Result<StateCounts, TcpStatError> {
    let socket = open()?;
    let mut buf = vec![0u8; RECV_BUFFER_SIZE];
    let counts = dump_request(&socket, Request::Family(family), 1, &mut buf)?;
    Ok(counts.ipv4 + counts.ipv6)
}

fn open() -> Result<DiagSocket, TcpStatError> {
    let socket = DiagSocket::open().map_err(TcpStatError::NetlinkUnavailable)?;
    socket
        .set_recv_timeout(RECV_TIMEOUT)
        .map_err(|source| TcpStatError::NetlinkIo {
            op: "setsockopt",
            source,
        })?;
    Ok(socket)
}

fn dump_request(
    socket: &DiagSocket,
    request: Request,
    seq: u32,
    buf: &mut [u8],
) -> Result<FamilyCounts, TcpStatError> {
    let msg = build_request(request, seq);
    dump(socket, msg.as_bytes(), request.record_type(), seq, buf)
}

/// Sends one dump request and counts its answer, datagram by datagram, in `buf`.
fn dump(
    socket: &DiagSocket,
    msg: &[u8],
    record_type: u16,
    seq: u32,
    buf: &mut [u8],
) -> Result<FamilyCounts, TcpStatError> {
    socket
        .send_to_kernel(msg)
        .map_err(|source| TcpStatError::NetlinkIo { op: "send", source })?;
    let mut counts = FamilyCounts::default();
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
        if parse_datagram(&buf[..len], seq, record_type, &mut counts)? == Progress::Done {
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
        typed_record(SOCK_DIAG_BY_FAMILY, libc::AF_INET, state)
    }

    fn typed_record(kind: u16, family: i32, state: u8) -> Vec<u8> {
        let mut out = header(NLMSG_HDRLEN + INET_DIAG_MSG_LEN, kind, 2, SEQ);
        let mut body = vec![0u8; INET_DIAG_MSG_LEN];
        body[0] = family as u8;
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
        out.extend_from_slice(&header(72, SOCK_DIAG_BY_FAMILY, 0x301, SEQ));
        out
    }

    /// Parses as an answer to a per-family request; returns the IPv4 counts (what the
    /// `record` fixtures carry) and checks that nothing landed in IPv6.
    fn parse(buf: &[u8]) -> (Result<Progress, TcpStatError>, StateCounts) {
        let mut counts = FamilyCounts::default();
        let result = parse_datagram(buf, SEQ, SOCK_DIAG_BY_FAMILY, &mut counts);
        assert_eq!(counts.ipv6.total(), 0);
        (result, counts.ipv4)
    }

    #[test]
    fn request_layout_matches_the_kernel_structs() {
        let msg = build_request(Request::Family(Family::Inet6), 9);
        let req = msg.as_bytes();
        assert_eq!(req.len(), 72);
        assert_eq!(read_u32(req, 0), Some(72));
        assert_eq!(read_u16(req, 4), Some(20));
        assert_eq!(read_u16(req, 6), Some(0x301));
        assert_eq!(read_u32(req, 8), Some(9));
        assert_eq!(req[16], libc::AF_INET6 as u8);
        assert_eq!(req[17], 6);
        assert_eq!(req[18], 0, "no extension attributes");
        assert_eq!(read_u32(req, 20), Some(0x1ffe));
        assert!(req[24..].iter().all(|b| *b == 0), "wildcard socket id");
        let inet = build_request(Request::Family(Family::Inet), 1);
        assert_eq!(inet.as_bytes()[16], libc::AF_INET as u8);
    }

    #[test]
    fn legacy_request_layout_matches_struct_inet_diag_req() {
        let msg = build_request(Request::AllFamilies, 5);
        let req = msg.as_bytes();
        assert_eq!(req.len(), 16 + 60);
        assert_eq!(read_u32(req, 0), Some(76));
        assert_eq!(read_u16(req, 4), Some(18), "TCPDIAG_GETSOCK");
        assert_eq!(read_u16(req, 6), Some(0x301));
        assert_eq!(read_u32(req, 8), Some(5));
        assert_eq!(req[16], libc::AF_UNSPEC as u8);
        assert!(
            req[17..20].iter().all(|b| *b == 0),
            "lengths, no extensions"
        );
        assert!(req[20..68].iter().all(|b| *b == 0), "wildcard socket id");
        assert_eq!(read_u32(req, 68), Some(0x1ffe), "idiag_states");
        assert_eq!(read_u32(req, 72), Some(0), "idiag_dbs");
    }

    #[test]
    fn one_walk_records_count_by_their_own_family() {
        let mut buf = Vec::new();
        for (family, state) in [
            (libc::AF_INET, 6),
            (libc::AF_INET6, 6),
            (libc::AF_INET6, 6),
            (libc::AF_INET, 10),
            (libc::AF_INET6, 1),
        ] {
            buf.extend(typed_record(TCPDIAG_GETSOCK, family, state));
        }
        buf.extend(done(0));
        let mut counts = FamilyCounts::default();
        let result = parse_datagram(&buf, SEQ, TCPDIAG_GETSOCK, &mut counts);
        assert_eq!(result.ok(), Some(Progress::Done));
        assert_eq!(counts.ipv4.get(TcpState::TimeWait), 1);
        assert_eq!(counts.ipv4.get(TcpState::Listen), 1);
        assert_eq!(counts.ipv4.total(), 2);
        assert_eq!(counts.ipv6.get(TcpState::TimeWait), 2);
        assert_eq!(counts.ipv6.get(TcpState::Established), 1);
        assert_eq!(counts.ipv6.total(), 3);

        // A record of the other request type is not ours, in either direction.
        let mut counts = FamilyCounts::default();
        let stray = typed_record(SOCK_DIAG_BY_FAMILY, libc::AF_INET, 1);
        let result = parse_datagram(&stray, SEQ, TCPDIAG_GETSOCK, &mut counts);
        assert!(
            matches!(result, Err(TcpStatError::Malformed { .. })),
            "{result:?}"
        );
        let stray = typed_record(TCPDIAG_GETSOCK, libc::AF_INET, 1);
        assert!(matches!(
            parse(&stray).0,
            Err(TcpStatError::Malformed { .. })
        ));
        assert_eq!(counts.ipv4.total() + counts.ipv6.total(), 0);
    }

    #[test]
    fn records_of_other_families_are_errors() {
        for family in [libc::AF_UNSPEC, libc::AF_UNIX, libc::AF_PACKET, 255] {
            let mut counts = FamilyCounts::default();
            let buf = typed_record(TCPDIAG_GETSOCK, family, 1);
            let result = parse_datagram(&buf, SEQ, TCPDIAG_GETSOCK, &mut counts);
            assert!(
                matches!(result, Err(TcpStatError::Malformed { offset: 0, .. })),
                "family {family}: {result:?}"
            );
        }
    }

    #[test]
    fn only_kernel_refusals_switch_to_per_family_dumps() {
        for errno in [libc::EINVAL, libc::EOPNOTSUPP, libc::ENOENT] {
            assert!(single_walk_refused(&TcpStatError::Kernel { errno }));
        }
        assert!(!single_walk_refused(&malformed(0, "torn")));
        assert!(!single_walk_refused(&TcpStatError::DumpInterrupted));
        assert!(!single_walk_refused(&TcpStatError::DatagramTruncated {
            len: 70000,
            capacity: RECV_BUFFER_SIZE
        }));
        assert!(!single_walk_refused(&TcpStatError::NetlinkIo {
            op: "recv",
            source: io::Error::from_raw_os_error(libc::EAGAIN)
        }));
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
        let mut total = FamilyCounts {
            ipv4: counts,
            ipv6: StateCounts::default(),
        };
        let result = parse_datagram(&second, SEQ, SOCK_DIAG_BY_FAMILY, &mut total);
        let total = total.ipv4;
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
        body[0] = libc::AF_INET as u8;
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
