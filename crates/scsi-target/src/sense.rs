//! Fixed-format sense data (SPC-4 §4.5.3) and the (key, ASC, ASCQ) triples
//! the emulation reports.
//!
//! Every command handler fails with a [`Sense`]; this module is the only place
//! that lays sense bytes out, so the INFORMATION field and the sense-key
//! specific field pointer are encoded the same way everywhere.

use bytes::Bytes;

/// Sense keys (SPC-4 table 49).
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const RECOVERED_ERROR: u8 = 0x01;
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ABORTED_COMMAND: u8 = 0x0B;
    pub const MISCOMPARE: u8 = 0x0E;
}

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SenseCode {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

const fn code(key: u8, asc: u8, ascq: u8) -> SenseCode {
    SenseCode { key, asc, ascq }
}

pub const NO_ADDITIONAL_SENSE: SenseCode = code(key::NO_SENSE, 0x00, 0x00);
pub const LU_NOT_READY_SANITIZE_IN_PROGRESS: SenseCode = code(key::NOT_READY, 0x04, 0x1B);
pub const LU_NOT_READY_FORMAT_IN_PROGRESS: SenseCode = code(key::NOT_READY, 0x04, 0x04);
pub const MEDIUM_FORMAT_CORRUPTED: SenseCode = code(key::MEDIUM_ERROR, 0x31, 0x00);
pub const SANITIZE_COMMAND_FAILED: SenseCode = code(key::MEDIUM_ERROR, 0x31, 0x03);
pub const UNRECOVERED_READ_ERROR: SenseCode = code(key::MEDIUM_ERROR, 0x11, 0x00);
pub const WRITE_ERROR: SenseCode = code(key::MEDIUM_ERROR, 0x0C, 0x00);
pub const INTERNAL_TARGET_FAILURE: SenseCode = code(key::HARDWARE_ERROR, 0x44, 0x00);
pub const PARAMETER_LIST_LENGTH_ERROR: SenseCode = code(key::ILLEGAL_REQUEST, 0x1A, 0x00);
pub const INVALID_COMMAND_OPERATION_CODE: SenseCode = code(key::ILLEGAL_REQUEST, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: SenseCode = code(key::ILLEGAL_REQUEST, 0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: SenseCode = code(key::ILLEGAL_REQUEST, 0x24, 0x00);
pub const LOGICAL_UNIT_NOT_SUPPORTED: SenseCode = code(key::ILLEGAL_REQUEST, 0x25, 0x00);
pub const INVALID_FIELD_IN_PARAMETER_LIST: SenseCode = code(key::ILLEGAL_REQUEST, 0x26, 0x00);
pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: SenseCode =
    code(key::ILLEGAL_REQUEST, 0x26, 0x04);
pub const SAVING_PARAMETERS_NOT_SUPPORTED: SenseCode = code(key::ILLEGAL_REQUEST, 0x39, 0x00);
pub const MEDIUM_REMOVAL_PREVENTED: SenseCode = code(key::ILLEGAL_REQUEST, 0x53, 0x02);
pub const INSUFFICIENT_REGISTRATION_RESOURCES: SenseCode = code(key::ILLEGAL_REQUEST, 0x55, 0x04);
pub const POWER_ON_RESET_OCCURRED: SenseCode = code(key::UNIT_ATTENTION, 0x29, 0x00);
pub const BUS_DEVICE_RESET_FUNCTION_OCCURRED: SenseCode = code(key::UNIT_ATTENTION, 0x29, 0x03);
pub const I_T_NEXUS_LOSS_OCCURRED: SenseCode = code(key::UNIT_ATTENTION, 0x29, 0x07);
pub const MODE_PARAMETERS_CHANGED: SenseCode = code(key::UNIT_ATTENTION, 0x2A, 0x01);
pub const RESERVATIONS_PREEMPTED: SenseCode = code(key::UNIT_ATTENTION, 0x2A, 0x03);
pub const RESERVATIONS_RELEASED: SenseCode = code(key::UNIT_ATTENTION, 0x2A, 0x04);
pub const REGISTRATIONS_PREEMPTED: SenseCode = code(key::UNIT_ATTENTION, 0x2A, 0x05);
pub const CAPACITY_DATA_HAS_CHANGED: SenseCode = code(key::UNIT_ATTENTION, 0x2A, 0x09);
pub const REPORTED_LUNS_DATA_HAS_CHANGED: SenseCode = code(key::UNIT_ATTENTION, 0x3F, 0x0E);
pub const WRITE_PROTECTED: SenseCode = code(key::DATA_PROTECT, 0x27, 0x00);
pub const SOFTWARE_WRITE_PROTECTED: SenseCode = code(key::DATA_PROTECT, 0x27, 0x02);
pub const MISCOMPARE_DURING_VERIFY: SenseCode = code(key::MISCOMPARE, 0x1D, 0x00);

/// Where in the CDB or parameter list a bad field sits (SPC-4 §4.5.2.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// true: the field is in the CDB; false: in the parameter data.
    pub in_cdb: bool,
    pub byte: u16,
    /// The bit of the field's most significant bit, when it is narrower than a byte.
    pub bit: Option<u8>,
}

/// One sense report: a code plus the optional INFORMATION and, in the
/// sense-key specific bytes, a field pointer or a progress indication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub code: SenseCode,
    pub information: Option<u64>,
    pub field: Option<FieldPointer>,
    /// PROGRESS INDICATION: the fraction done of an operation in progress,
    /// in 65536ths (SPC-4 §4.5.2.4.4); ignored when `field` is set.
    pub progress: Option<u16>,
}

/// Length of the fixed-format sense data we build (18 bytes, additional length 10).
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    pub const fn new(code: SenseCode) -> Self {
        Sense {
            code,
            information: None,
            field: None,
            progress: None,
        }
    }

    /// INVALID FIELD IN CDB pointing at `byte` (and `bit`, if the field is narrower).
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            code: INVALID_FIELD_IN_CDB,
            information: None,
            field: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
            progress: None,
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` of the data-out buffer.
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            code: INVALID_FIELD_IN_PARAMETER_LIST,
            information: None,
            field: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit,
            }),
            progress: None,
        }
    }

    pub const fn with_information(mut self, info: u64) -> Self {
        self.information = Some(info);
        self
    }

    pub const fn with_progress(mut self, fraction: u16) -> Self {
        self.progress = Some(fraction);
        self
    }

    /// Fixed-format (response code 70h) sense bytes.
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        b[2] = self.code.key & 0x0F;
        if let Some(info) = self.information {
            // The fixed format has four bytes; a larger value cannot be
            // represented, so VALID stays clear (SPC-4 §4.5.3).
            if let Ok(v) = u32::try_from(info) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.code.asc;
        b[13] = self.code.ascq;
        if let Some(f) = self.field {
            let mut v = 0x80u8; // SKSV
            if f.in_cdb {
                v |= 0x40;
            }
            if let Some(bit) = f.bit {
                v |= 0x08 | (bit & 0x07);
            }
            b[15] = v;
            b[16..18].copy_from_slice(&f.byte.to_be_bytes());
        } else if let Some(p) = self.progress {
            b[15] = 0x80; // SKSV
            b[16..18].copy_from_slice(&p.to_be_bytes());
        }
        b
    }

    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.to_fixed())
    }
}

impl From<SenseCode> for Sense {
    fn from(code: SenseCode) -> Self {
        Sense::new(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_carries_key_asc_ascq() {
        let b = Sense::new(LBA_OUT_OF_RANGE).to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x21, 0x00));
        assert_eq!(b[15], 0);
    }

    #[test]
    fn information_sets_valid_bit() {
        let b = Sense::new(MISCOMPARE_DURING_VERIFY)
            .with_information(0x1234)
            .to_fixed();
        assert_eq!(b[0], 0xF0);
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
    }

    #[test]
    fn information_too_large_leaves_valid_clear() {
        let b = Sense::new(LBA_OUT_OF_RANGE)
            .with_information(1 << 40)
            .to_fixed();
        assert_eq!(b[0], 0x70);
    }

    #[test]
    fn field_pointer_encodes_cd_bpv_and_byte() {
        let b = Sense::invalid_cdb(1, Some(5)).to_fixed();
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(&b[16..18], &[0, 1]);
        let p = Sense::invalid_param(300, None).to_fixed();
        assert_eq!(p[15], 0x80);
        assert_eq!(&p[16..18], &[1, 0x2C]);
    }

    #[test]
    fn progress_indication_sets_sksv_and_the_fraction() {
        let b = Sense::new(LU_NOT_READY_SANITIZE_IN_PROGRESS)
            .with_progress(0x8000)
            .to_fixed();
        assert_eq!((b[2], b[12], b[13]), (0x02, 0x04, 0x1B));
        assert_eq!(b[15], 0x80);
        assert_eq!(&b[16..18], &[0x80, 0x00]);
    }
}
