//! The byte layouts of the fuzz inputs, shared by the targets (which read
//! them) and `seedgen` (which writes seeds from captured traffic, and
//! includes this file by path so it needs no libFuzzer).
//!
//! Every reader accepts any bytes: a short or odd input just ends early, so
//! libFuzzer's mutations always reach the code under test.

/// Reads fields from the front of a fuzz input; past the end it gives
/// zeros and empty slices.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { rest: data }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((b, rest)) => {
                self.rest = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.rest.len());
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.rest.len())
    }
}

// ---------------------------------------------------------------- pdu_decoder
//
// [flags u8][nsplits u8][nsplits split bytes][stream...]
//   flags bit 0: HeaderDigest, bit 1: DataDigest,
//         bits 2-3: MaxRecvDataSegmentLength 8192 / 512 / 65536 / 16777215.
//   split byte s: feed s bytes next (0: all that is left); cycled.

pub const PDU_HEADER_DIGEST: u8 = 1;
pub const PDU_DATA_DIGEST: u8 = 2;

pub fn pdu_max_dsl(flags: u8) -> u32 {
    match (flags >> 2) & 3 {
        0 => 8192,
        1 => 512,
        2 => 65536,
        _ => 16_777_215,
    }
}

/// A pdu_decoder input: the stream fed in `splits`-sized pieces.
pub fn encode_pdu_input(flags: u8, splits: &[u8], stream: &[u8]) -> Vec<u8> {
    let n = splits.len().min(255);
    let mut out = vec![flags, n as u8];
    out.extend_from_slice(splits.get(..n).unwrap_or(&[]));
    out.extend_from_slice(stream);
    out
}

// ----------------------------------------------------------- text_negotiation
//
// [mode u8] then records: [flags u8][len u16 LE][len bytes: a data segment]
//   mode bit 0: the authority requires CHAP, bit 1: mutual CHAP,
//        bit 2: a non-leading connection (TSIH != 0),
//        bit 3: the authority offers CRC32C digests and larger limits,
//        bit 4: bind() refuses (session does not exist),
//        bit 5: the first request carries version_min 1 (must be refused).
//   flags bits 0-1: CSG, bits 2-3: NSG, bit 4: T, bit 5: C,
//         bit 6: replace the CHAP_N/CHAP_R of this text with a correct
//                answer to the challenge in our last response (so the
//                fuzzer gets past CHAP), bit 7: change the CID (must fail).

pub const MODE_CHAP: u8 = 1;
pub const MODE_MUTUAL: u8 = 2;
pub const MODE_NON_LEADING: u8 = 4;
pub const MODE_DIGESTS: u8 = 8;
pub const MODE_BIND_FAILS: u8 = 16;
pub const MODE_BAD_VERSION: u8 = 32;

pub const REC_TRANSIT: u8 = 0x10;
pub const REC_CONT: u8 = 0x20;
pub const REC_AUTO_CHAP: u8 = 0x40;
pub const REC_NEW_CID: u8 = 0x80;

pub fn login_flags(csg: u8, nsg: u8, transit: bool, cont: bool) -> u8 {
    (csg & 3)
        | ((nsg & 3) << 2)
        | if transit { REC_TRANSIT } else { 0 }
        | if cont { REC_CONT } else { 0 }
}

pub struct LoginRecord<'a> {
    pub csg: u8,
    pub nsg: u8,
    pub transit: bool,
    pub cont: bool,
    pub auto_chap: bool,
    pub new_cid: bool,
    pub data: &'a [u8],
}

pub fn read_login_record<'a>(r: &mut Reader<'a>) -> Option<LoginRecord<'a>> {
    if r.is_empty() {
        return None;
    }
    let flags = r.u8();
    let len = r.u16() as usize;
    Some(LoginRecord {
        csg: flags & 3,
        nsg: (flags >> 2) & 3,
        transit: flags & REC_TRANSIT != 0,
        cont: flags & REC_CONT != 0,
        auto_chap: flags & REC_AUTO_CHAP != 0,
        new_cid: flags & REC_NEW_CID != 0,
        data: r.take(len),
    })
}

pub fn push_login_record(out: &mut Vec<u8>, flags: u8, data: &[u8]) {
    let len = data.len().min(u16::MAX as usize);
    out.push(flags);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(data.get(..len).unwrap_or(&[]));
}

// ------------------------------------------------------------------- scsi_cdb
//
// [mode u8] then records: [cdb_len u8][flags u8][data_len u16 LE][cdb][data]
//   mode bit 0: 4096-byte blocks, bit 1: read-only LU, bit 2: no thin
//        provisioning, bit 3: write cache off.
//   cdb_len: 6 + (byte % 27), so 6..=32.
//   flags bits 0-1: the nexus (I_T) issuing the command,
//         bits 2-3: 0/1 execute, 2: LOGICAL UNIT RESET first,
//                   3: that nexus is lost after the command,
//         bits 4-5: expected data-in length 1 MiB / 0 / 512 / 255,
//         bit 6: address LUN 1 (absent) instead of LUN 0,
//         bit 7: ORDERED rather than SIMPLE.

pub const SCSI_MODE_4K: u8 = 1;
pub const SCSI_MODE_READ_ONLY: u8 = 2;
pub const SCSI_MODE_THICK: u8 = 4;
pub const SCSI_MODE_WCE_OFF: u8 = 8;

pub struct ScsiRecord<'a> {
    pub nexus: u8,
    pub action: u8,
    pub expected_in_len: u32,
    pub lun: u64,
    pub ordered: bool,
    pub cdb: &'a [u8],
    pub data: &'a [u8],
}

pub fn read_scsi_record<'a>(r: &mut Reader<'a>) -> Option<ScsiRecord<'a>> {
    if r.is_empty() {
        return None;
    }
    let cdb_len = 6 + usize::from(r.u8() % 27);
    let flags = r.u8();
    let data_len = r.u16() as usize;
    let cdb = r.take(cdb_len);
    let data = r.take(data_len);
    Some(ScsiRecord {
        nexus: flags & 3,
        action: (flags >> 2) & 3,
        expected_in_len: match (flags >> 4) & 3 {
            0 => 1 << 20,
            1 => 0,
            2 => 512,
            _ => 255,
        },
        lun: u64::from((flags >> 6) & 1),
        ordered: flags & 0x80 != 0,
        cdb,
        data,
    })
}

/// A record that executes `cdb` (6..=32 bytes) with `data` from nexus 0 on LUN 0.
pub fn push_scsi_record(out: &mut Vec<u8>, cdb: &[u8], data: &[u8]) {
    let cdb = cdb.get(..cdb.len().min(32)).unwrap_or(&[]);
    let mut padded = cdb.to_vec();
    padded.resize(padded.len().max(6), 0);
    let data = data.get(..data.len().min(u16::MAX as usize)).unwrap_or(&[]);
    out.push((padded.len() - 6) as u8);
    out.push(0);
    out.extend_from_slice(&(data.len() as u16).to_le_bytes());
    out.extend_from_slice(&padded);
    out.extend_from_slice(data);
}
