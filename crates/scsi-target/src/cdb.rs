//! Panic-free access to CDB bytes and the SCSI operation codes we know.
//!
//! [`Cdb`] answers zero for any byte past the end of the CDB, so handlers
//! read fields directly; the door ([`Cdb::new`]) rejects a CDB shorter than
//! its group code says, so a zero from past the end never stands in for a
//! field the initiator did send.

use crate::sense::{Sense, INVALID_FIELD_IN_CDB};

/// Operation codes (SPC-4 / SBC-3).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const FORMAT_UNIT: u8 = 0x04;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const SEND_DIAGNOSTIC: u8 = 0x1D;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_CDB: u8 = 0x7E;
    pub const VARIABLE_LENGTH: u8 = 0x7F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const MAINTENANCE_OUT: u8 = 0xA4;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN.
pub mod sa {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
    pub const REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;
    pub const REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    pub const REPORT_SUPPORTED_TMFS: u8 = 0x0D;
}

/// The length a CDB of this operation code has (SPC-4 §4.2.5.1 group codes);
/// `None` for variable-length or vendor groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A CDB whose length has been checked against its group code.
#[derive(Clone, Copy, Debug)]
pub struct Cdb<'a>(&'a [u8]);

impl<'a> Cdb<'a> {
    /// Checks the CDB is at least as long as its group code says.
    pub fn new(bytes: &'a [u8]) -> Result<Self, Sense> {
        let first = *bytes.first().ok_or(Sense::invalid_cdb(0, None))?;
        let need = cdb_len(first).unwrap_or(6);
        if bytes.len() < need {
            return Err(Sense::new(INVALID_FIELD_IN_CDB));
        }
        Ok(Cdb(bytes))
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    pub fn opcode(&self) -> u8 {
        self.byte(0)
    }

    /// Service action (low five bits of byte 1).
    pub fn service_action(&self) -> u8 {
        self.byte(1) & 0x1F
    }

    pub fn byte(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }

    pub fn bit(&self, i: usize, bit: u8) -> bool {
        self.byte(i) & (1 << bit) != 0
    }

    fn be(&self, i: usize, n: usize) -> u64 {
        (0..n).fold(0u64, |acc, k| (acc << 8) | u64::from(self.byte(i + k)))
    }

    pub fn u16(&self, i: usize) -> u16 {
        self.be(i, 2) as u16
    }

    pub fn u24(&self, i: usize) -> u32 {
        self.be(i, 3) as u32
    }

    pub fn u32(&self, i: usize) -> u32 {
        self.be(i, 4) as u32
    }

    pub fn u64(&self, i: usize) -> u64 {
        self.be(i, 8)
    }
}

/// Big-endian readers for parameter lists (data-out), zero past the end.
pub(crate) fn be_at(buf: &[u8], i: usize, n: usize) -> u64 {
    (0..n).fold(0u64, |acc, k| {
        (acc << 8) | u64::from(buf.get(i + k).copied().unwrap_or(0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_cdb_is_rejected_at_the_door() {
        assert!(Cdb::new(&[0x28, 0, 0, 0, 0, 0]).is_err());
        assert!(Cdb::new(&[]).is_err());
        assert!(Cdb::new(&[0x00; 6]).is_ok());
    }

    #[test]
    fn fields_read_big_endian_and_zero_past_end() {
        let c = Cdb::new(&[0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 9, 0, 0]).unwrap();
        assert_eq!(c.u64(2), 0x0102030405060708);
        assert_eq!(c.u32(10), 9);
        assert_eq!(c.byte(100), 0);
        assert_eq!(c.u32(14), 0);
    }
}
