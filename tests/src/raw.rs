//! A raw-PDU iSCSI client for the hostile-initiator tests: blocking `TcpStream`, PDUs built
//! with `iscsi_proto`'s types, answers framed with its `PduDecoder`. It does only what the
//! tests need — a plain login (optionally with CRC32C digests), sending any bytes, and
//! reading what comes back with a deadline — so a test can misbehave on purpose.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_proto::codec::PduDecoder;
use iscsi_proto::pdu::{Header, LoginRequest, NopOut, Pdu, RawPdu};

use crate::TARGET_IQN;

/// How long a read waits before a test decides the target said nothing.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a read from the target gave.
#[derive(Debug)]
pub enum Recv {
    Pdu(RawPdu),
    /// The target closed (or reset) the connection.
    Closed,
    /// Nothing arrived before the deadline.
    Timeout,
}

impl Recv {
    /// The PDU, or a panic naming what came instead.
    pub fn pdu(self) -> RawPdu {
        match self {
            Recv::Pdu(p) => p,
            other => panic!("expected a PDU, got {other:?}"),
        }
    }
}

/// One raw connection to the target.
pub struct RawConn {
    pub stream: TcpStream,
    dec: PduDecoder,
    buf: BytesMut,
    pub header_digest: bool,
    pub data_digest: bool,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    next_itt: u32,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            dec: PduDecoder::new(16 * 1024 * 1024),
            buf: BytesMut::new(),
            header_digest: false,
            data_digest: false,
            cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 0x100,
        }
    }

    /// A fresh initiator task tag.
    pub fn itt(&mut self) -> u32 {
        self.next_itt = self.next_itt.wrapping_add(1);
        self.next_itt
    }

    /// Writes `bytes` as they are; false if the target already closed.
    pub fn send_raw(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Encodes and writes `pdu` with the negotiated digests.
    pub fn send(&mut self, pdu: &Pdu) -> bool {
        let b = pdu.to_bytes(self.header_digest, self.data_digest);
        self.send_raw(&b)
    }

    /// Reads one PDU, waiting at most `timeout`.
    pub fn recv_within(&mut self, timeout: Duration) -> Recv {
        let deadline = Instant::now() + timeout;
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(p)) => {
                    self.note_stat_sn(&p);
                    return Recv::Pdu(p);
                }
                Ok(None) => {}
                Err(e) => panic!("target sent a PDU we cannot frame: {e}"),
            }
            let now = Instant::now();
            if now >= deadline {
                return Recv::Timeout;
            }
            let _ = self.stream.set_read_timeout(Some(deadline - now));
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Recv::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Recv::Timeout
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Recv::Closed,
            }
        }
    }

    pub fn recv(&mut self) -> Recv {
        self.recv_within(READ_TIMEOUT)
    }

    /// Reads until the target closes, collecting what it sent first; panics if it has not
    /// closed within `timeout`.
    pub fn expect_close(&mut self, timeout: Duration) -> Vec<RawPdu> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left) {
                Recv::Pdu(p) => got.push(p),
                Recv::Closed => return got,
                Recv::Timeout => panic!(
                    "target kept the connection open for {timeout:?}; it sent opcodes {:?}",
                    got.iter().map(|p| p.opcode_byte()).collect::<Vec<_>>()
                ),
            }
        }
    }

    fn note_stat_sn(&mut self, p: &RawPdu) {
        // StatSN sits at bytes 24..28 of every status-carrying target PDU.
        let op = p.opcode_byte();
        let has_stat = matches!(op, 0x21 | 0x22 | 0x23 | 0x24 | 0x26 | 0x3f)
            || (op == 0x20 && iscsi_proto::pdu::itt(&p.bhs) != 0xffff_ffff)
            || (op == 0x25 && p.bhs[1] & 0x01 != 0);
        if has_stat {
            let s = u32::from_be_bytes([p.bhs[24], p.bhs[25], p.bhs[26], p.bhs[27]]);
            self.exp_stat_sn = s.wrapping_add(1);
        }
        if matches!(op, 0x20..=0x26 | 0x31 | 0x32 | 0x3f) && op != 0x23 {
            let exp = u32::from_be_bytes([p.bhs[28], p.bhs[29], p.bhs[30], p.bhs[31]]);
            if exp != 0 {
                self.cmd_sn = exp;
            }
        }
    }

    /// An immediate NOP-Out ping; true if the matching NOP-In came back in time (other PDUs
    /// that arrive first are skipped).
    pub fn ping(&mut self) -> bool {
        let itt = self.itt();
        let nop = Pdu::new(
            Header::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: 0xffff_ffff,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            Bytes::from_static(b"ping"),
        );
        if !self.send(&nop) {
            return false;
        }
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left) {
                Recv::Pdu(p) if p.opcode_byte() == 0x20 && p.itt() == itt => {
                    return &p.data[..] == b"ping"
                }
                Recv::Pdu(_) => {}
                _ => return false,
            }
        }
    }

    /// Sends one login request and returns the response.
    pub fn login_pdu(&mut self, req: LoginRequest, keys: &[(&str, &str)]) -> Recv {
        let mut data = Vec::new();
        iscsi_proto::text::encode(keys, &mut data);
        self.send(&Pdu::new(Header::LoginRequest(req), Bytes::from(data)));
        self.recv()
    }

    /// A LoginRequest header with this connection's sequence numbers.
    pub fn login_header(&self, isid: [u8; 6], csg: u8, nsg: u8, transit: bool) -> LoginRequest {
        LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid,
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }
    }

    /// A complete login to full feature phase as `initiator` (security stage with
    /// AuthMethod=None, then operational with `digests` for both header and data).
    pub fn login(addr: SocketAddr, initiator: &str, digests: bool) -> RawConn {
        let mut c = RawConn::connect(addr);
        let isid = isid_for(initiator);
        let r = c
            .login_pdu(
                c.login_header(isid, 0, 1, true),
                &[
                    ("InitiatorName", initiator),
                    ("TargetName", TARGET_IQN),
                    ("SessionType", "Normal"),
                    ("AuthMethod", "None"),
                ],
            )
            .pdu();
        let resp = login_response(&r);
        assert_eq!(resp.status_class, 0, "security stage refused: {resp:?}");
        assert!(
            resp.transit && resp.nsg == 1,
            "no transit to operational: {resp:?}"
        );
        c.exp_stat_sn = resp.stat_sn.wrapping_add(1);
        c.cmd_sn = resp.exp_cmd_sn;
        let digest = if digests { "CRC32C" } else { "None" };
        let mut hdr = c.login_header(isid, 1, 3, true);
        hdr.tsih = resp.tsih;
        let r = c
            .login_pdu(
                hdr,
                &[
                    ("HeaderDigest", digest),
                    ("DataDigest", digest),
                    ("MaxRecvDataSegmentLength", "262144"),
                    ("InitialR2T", "Yes"),
                    ("ImmediateData", "No"),
                    ("ErrorRecoveryLevel", "0"),
                ],
            )
            .pdu();
        let resp = login_response(&r);
        assert_eq!(resp.status_class, 0, "operational stage refused: {resp:?}");
        assert!(resp.transit && resp.nsg == 3, "no transit to FFP: {resp:?}");
        let keys = iscsi_proto::text::parse(&r.data).unwrap_or_default();
        let digest_on = |k: &str| keys.iter().any(|(n, v)| n == k && v == "CRC32C");
        c.header_digest = digest_on("HeaderDigest");
        c.data_digest = digest_on("DataDigest");
        assert_eq!(
            c.header_digest, digests,
            "HeaderDigest not as asked: {keys:?}"
        );
        assert_eq!(c.data_digest, digests, "DataDigest not as asked: {keys:?}");
        c.dec.header_digest = c.header_digest;
        c.dec.data_digest = c.data_digest;
        c.exp_stat_sn = resp.stat_sn.wrapping_add(1);
        c.cmd_sn = resp.exp_cmd_sn;
        c
    }

    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// An ISID of the random-qualifier type, derived from the initiator name so each test's
/// session is its own.
pub fn isid_for(initiator: &str) -> [u8; 6] {
    let h = iscsi_proto::digest::crc32c(initiator.as_bytes()).to_be_bytes();
    [0x80, 0x00, h[0], h[1], h[2], h[3]]
}

/// The typed Login Response in `p`, or a panic naming what came instead.
pub fn login_response(p: &RawPdu) -> iscsi_proto::pdu::LoginResponse {
    match p.clone().parse().map(|p| p.header) {
        Ok(Header::LoginResponse(r)) => r,
        other => panic!("expected a Login Response, got {other:?}"),
    }
}

/// The Reject reason, if `p` is a Reject.
pub fn reject_reason(p: &RawPdu) -> Option<u8> {
    (p.opcode_byte() == 0x3f).then_some(p.bhs[2])
}

/// Resident memory of process `pid` in bytes (VmRSS from /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
