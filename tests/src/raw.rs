//! A raw-PDU iSCSI client for the hostile-initiator tests: blocking `TcpStream`, PDUs built
//! with `iscsi_proto`'s types, answers framed with its `PduDecoder`. It does only what the
//! tests need — a plain login (optionally with CRC32C digests), sending any bytes, and
//! reading what comes back with a deadline — so a test can misbehave on purpose.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_proto::codec::PduDecoder;
use iscsi_proto::pdu::{DataOut, Header, LoginRequest, NopOut, Pdu, RawPdu, ScsiCommand};

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
                Err(e) => {
                    // A reset reads as a close; say which, for the failure that follows.
                    eprintln!("reading from the target failed: {e}");
                    return Recv::Closed;
                }
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
        match RawConn::try_login(addr, initiator, digests) {
            Ok(c) => c,
            Err(status) => panic!("login refused with status {status:?}"),
        }
    }

    /// [`RawConn::login`], or the (class, detail) of the Login Response that refused it.
    pub fn try_login(
        addr: SocketAddr,
        initiator: &str,
        digests: bool,
    ) -> Result<RawConn, (u8, u8)> {
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
        if resp.status_class != 0 {
            return Err((resp.status_class, resp.status_detail));
        }
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
        if resp.status_class != 0 {
            return Err((resp.status_class, resp.status_detail));
        }
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
        Ok(c)
    }

    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// A READ(10) (0x28) or WRITE(10) (0x2a) CDB.
pub fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [op, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

/// The status of a SCSI Response and, for CHECK CONDITION, its (key, ASC, ASCQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiStatus {
    pub response: u8,
    pub status: u8,
    pub sense: Option<(u8, u8, u8)>,
}

impl ScsiStatus {
    pub fn of(p: &RawPdu) -> ScsiStatus {
        // Data segment: 2-byte SenseLength, then fixed-format sense data.
        let sense = (p.bhs[3] == 0x02 && p.data.len() >= 2 + 14).then(|| {
            let s = &p.data[2..];
            (s[2] & 0x0f, s[12], s[13])
        });
        ScsiStatus {
            response: p.bhs[2],
            status: p.bhs[3],
            sense,
        }
    }

    pub fn good(&self) -> bool {
        self.response == 0 && self.status == 0
    }
}

/// SCSI commands on LUN 0 over a [`RawConn`] logged in by [`RawConn::login`]
/// (InitialR2T=Yes, ImmediateData=No: all write data goes after an R2T).
impl RawConn {
    /// A SCSI Command PDU with this connection's sequence numbers (CmdSN advances).
    pub fn scsi_command(
        &mut self,
        itt: u32,
        cdb: &[u8],
        read: bool,
        write: bool,
        edtl: u32,
    ) -> Pdu {
        let mut cdb16 = [0u8; 16];
        cdb16[..cdb.len()].copy_from_slice(cdb);
        let p = Pdu::new(
            Header::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read,
                write,
                attr: 1,
                lun: 0,
                itt,
                expected_data_transfer_length: edtl,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                cdb: cdb16,
                extended_cdb: None,
                bidi_read_length: None,
            }),
            Bytes::new(),
        );
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        p
    }

    /// The first Data-Out PDU of a burst (DataSN 0) for `itt`/`ttt` at `offset`.
    pub fn data_out(&self, itt: u32, ttt: u32, offset: u32, final_: bool, data: Bytes) -> Pdu {
        self.data_out_sn(itt, ttt, 0, offset, final_, data)
    }

    /// A Data-Out PDU with DataSN `data_sn` (counted from 0 in each burst).
    pub fn data_out_sn(
        &self,
        itt: u32,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        final_: bool,
        data: Bytes,
    ) -> Pdu {
        Pdu::new(
            Header::DataOut(DataOut {
                final_,
                lun: 0,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: offset,
            }),
            data,
        )
    }

    /// Reads PDUs until one satisfies `want`, the connection closes, or nothing comes.
    pub fn recv_until(&mut self, want: impl Fn(&RawPdu) -> bool) -> Recv {
        loop {
            match self.recv() {
                Recv::Pdu(p) if want(&p) => return Recv::Pdu(p),
                Recv::Pdu(_) => {}
                other => return other,
            }
        }
    }

    /// Runs TEST UNIT READY until it is GOOD, so a pending unit attention does not mask
    /// what a later command shows.
    pub fn clear_unit_attention(&mut self) {
        for _ in 0..3 {
            let itt = self.itt();
            let t = self.scsi_command(itt, &[0; 6], false, false, 0);
            assert!(self.send(&t));
            let p = self.recv_until(|p| p.itt() == itt).pdu();
            if p.bhs[3] == 0 {
                return;
            }
        }
        panic!("TEST UNIT READY never returned GOOD");
    }

    /// READ(10) of `blocks` 512-byte blocks at `lba`; the data, or a panic if it failed.
    pub fn read_blocks(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let itt = self.itt();
        let edtl = u32::from(blocks) * 512;
        let r = self.scsi_command(itt, &rw10(0x28, lba, blocks), true, false, edtl);
        assert!(self.send(&r));
        let mut data = Vec::new();
        loop {
            let p = self.recv_until(|p| p.itt() == itt).pdu();
            if p.opcode_byte() == 0x25 {
                data.extend_from_slice(&p.data);
                // S bit: status rode on the last Data-In.
                if p.bhs[1] & 0x01 != 0 {
                    assert_eq!(p.bhs[3], 0, "READ ended with status {:#x}", p.bhs[3]);
                    return data;
                }
            } else {
                assert_eq!(p.opcode_byte(), 0x21, "unexpected answer to a READ");
                let st = ScsiStatus::of(&p);
                assert!(st.good(), "READ failed: {st:?}");
                return data;
            }
        }
    }

    /// WRITE(10) of `data` (whole 512-byte blocks) at `lba`, FUA if asked, answering each
    /// R2T; the command's status.
    pub fn write_blocks(&mut self, lba: u32, data: &[u8], fua: bool) -> ScsiStatus {
        let itt = self.itt();
        let blocks = u16::try_from(data.len() / 512).expect("too many blocks for WRITE(10)");
        let mut cdb = rw10(0x2a, lba, blocks);
        if fua {
            cdb[1] |= 0x08;
        }
        let w = self.scsi_command(itt, &cdb, false, true, data.len() as u32);
        assert!(self.send(&w));
        self.answer_r2ts(itt, data, None)
    }

    /// Answers the R2Ts of write `itt` with `data` (starting with `first`, an R2T already
    /// read) until its SCSI Response; the command's status.
    pub fn answer_r2ts(&mut self, itt: u32, data: &[u8], first: Option<RawPdu>) -> ScsiStatus {
        let mut next = first;
        loop {
            let p = match next.take() {
                Some(p) => p,
                None => self.recv_until(|p| p.itt() == itt).pdu(),
            };
            match p.opcode_byte() {
                0x31 => {
                    let word = |i: usize| {
                        u32::from_be_bytes([p.bhs[i], p.bhs[i + 1], p.bhs[i + 2], p.bhs[i + 3]])
                    };
                    let (ttt, offset, len) = (word(20), word(40), word(44));
                    // One Data-Out per 64 KiB: under any MaxRecvDataSegmentLength we offer.
                    let end = offset + len;
                    let mut at = offset;
                    let mut data_sn = 0;
                    while at < end {
                        let n = (end - at).min(65536);
                        let chunk = Bytes::copy_from_slice(&data[at as usize..(at + n) as usize]);
                        let d = self.data_out_sn(itt, ttt, data_sn, at, at + n == end, chunk);
                        assert!(self.send(&d));
                        at += n;
                        data_sn += 1;
                    }
                }
                0x21 => return ScsiStatus::of(&p),
                op => panic!("unexpected opcode {op:#x} during a WRITE"),
            }
        }
    }

    /// SYNCHRONIZE CACHE(10) of the whole LU; its status.
    pub fn synchronize_cache(&mut self) -> ScsiStatus {
        let itt = self.itt();
        let c = self.scsi_command(itt, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], false, false, 0);
        assert!(self.send(&c));
        ScsiStatus::of(&self.recv_until(|p| p.itt() == itt).pdu())
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
