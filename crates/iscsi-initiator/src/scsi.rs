//! SCSI on the initiator side, independent of iSCSI: CDB builders for the
//! commands the API offers (SPC-4 / SBC-3), decoders for their answers, and
//! SCSI status plus fixed/descriptor sense data turned into [`ScsiError`].
//!
//! Decoders take target-supplied bytes and never index past them: short
//! answers decode to what is there or to `None`.

use thiserror::Error;

/// SCSI status codes (SAM-5 §5.3).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Sense keys (SPC-4 §4.5.6).
pub mod sense_key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;

    /// The name SPC-4 gives a sense key.
    pub fn name(key: u8) -> &'static str {
        match key {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            0x2 => "NOT READY",
            0x3 => "MEDIUM ERROR",
            0x4 => "HARDWARE ERROR",
            0x5 => "ILLEGAL REQUEST",
            0x6 => "UNIT ATTENTION",
            0x7 => "DATA PROTECT",
            0x8 => "BLANK CHECK",
            0x9 => "VENDOR SPECIFIC",
            0xa => "COPY ABORTED",
            0xb => "ABORTED COMMAND",
            0xd => "VOLUME OVERFLOW",
            0xe => "MISCOMPARE",
            _ => "RESERVED",
        }
    }
}

/// Decoded sense data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// Descriptor format (0x72/0x73) rather than fixed (0x70/0x71).
    pub descriptor: bool,
    /// The INFORMATION field, when valid.
    pub information: Option<u64>,
}

impl Sense {
    /// Decodes fixed (SPC-4 §4.5.3) or descriptor (§4.5.2) sense data.
    pub fn parse(b: &[u8]) -> Option<Sense> {
        let code = b.first()? & 0x7f;
        match code {
            0x70 | 0x71 => {
                let valid = b.first()? & 0x80 != 0;
                let information = match (valid, b.get(3..7)) {
                    (true, Some(i)) => {
                        Some(u64::from(u32::from_be_bytes([i[0], i[1], i[2], i[3]])))
                    }
                    _ => None,
                };
                Some(Sense {
                    key: b.get(2)? & 0x0f,
                    asc: b.get(12).copied().unwrap_or(0),
                    ascq: b.get(13).copied().unwrap_or(0),
                    descriptor: false,
                    information,
                })
            }
            0x72 | 0x73 => {
                let mut information = None;
                // Descriptors start at byte 8; type 0 is INFORMATION.
                let extra = usize::from(b.get(7).copied().unwrap_or(0));
                let mut descs = b.get(8..).unwrap_or_default();
                descs = descs.get(..extra.min(descs.len())).unwrap_or_default();
                while let (Some(&ty), Some(&len)) = (descs.first(), descs.get(1)) {
                    let body = descs.get(2..2 + usize::from(len)).unwrap_or_default();
                    if ty == 0 {
                        if let Some(i) = body.get(2..10) {
                            let mut v = [0u8; 8];
                            v.copy_from_slice(i);
                            information = Some(u64::from_be_bytes(v));
                        }
                    }
                    descs = descs.get(2 + usize::from(len)..).unwrap_or_default();
                }
                Some(Sense {
                    key: b.get(1)? & 0x0f,
                    asc: b.get(2).copied().unwrap_or(0),
                    ascq: b.get(3).copied().unwrap_or(0),
                    descriptor: true,
                    information,
                })
            }
            _ => None,
        }
    }
}

/// A command that ended with a status other than GOOD, or not at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ScsiError {
    #[error("CHECK CONDITION: {} (ASC/ASCQ {asc:#04x}/{ascq:#04x})", sense_key::name(*.key))]
    CheckCondition { key: u8, asc: u8, ascq: u8 },
    /// CHECK CONDITION without (decodable) sense data.
    #[error("CHECK CONDITION without sense data")]
    CheckConditionNoSense,
    #[error("BUSY")]
    Busy,
    #[error("RESERVATION CONFLICT")]
    ReservationConflict,
    #[error("TASK SET FULL")]
    TaskSetFull,
    #[error("ACA ACTIVE")]
    AcaActive,
    #[error("TASK ABORTED")]
    TaskAborted,
    #[error("SCSI status {0:#04x}")]
    OtherStatus(u8),
    /// The iSCSI response code was not "command completed at target".
    #[error("target failure (iSCSI response {0:#04x})")]
    TargetFailure(u8),
}

impl ScsiError {
    /// The error for a status and its sense data; `None` for GOOD and CONDITION MET.
    pub fn from_status(status: u8, sense: Option<&Sense>) -> Option<ScsiError> {
        Some(match status {
            status::GOOD | status::CONDITION_MET => return None,
            status::CHECK_CONDITION => match sense {
                Some(s) => ScsiError::CheckCondition {
                    key: s.key,
                    asc: s.asc,
                    ascq: s.ascq,
                },
                None => ScsiError::CheckConditionNoSense,
            },
            status::BUSY => ScsiError::Busy,
            status::RESERVATION_CONFLICT => ScsiError::ReservationConflict,
            status::TASK_SET_FULL => ScsiError::TaskSetFull,
            status::ACA_ACTIVE => ScsiError::AcaActive,
            status::TASK_ABORTED => ScsiError::TaskAborted,
            other => ScsiError::OtherStatus(other),
        })
    }

    /// A UNIT ATTENTION: the command was not run and may simply be retried.
    pub fn is_unit_attention(&self) -> bool {
        matches!(self, ScsiError::CheckCondition { key, .. } if *key == sense_key::UNIT_ATTENTION)
    }
}

// ---- CDBs -------------------------------------------------------------------

pub fn test_unit_ready() -> Vec<u8> {
    vec![0u8; 6]
}

/// INQUIRY (SPC-4 §6.6): standard data, or a VPD page when `vpd` is set.
pub fn inquiry(vpd: Option<u8>, allocation_length: u16) -> Vec<u8> {
    let a = allocation_length.to_be_bytes();
    let (evpd, page) = match vpd {
        Some(p) => (1, p),
        None => (0, 0),
    };
    vec![0x12, evpd, page, a[0], a[1], 0]
}

pub fn read_capacity10() -> Vec<u8> {
    vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// READ CAPACITY (16): SERVICE ACTION IN (16), service action 0x10.
pub fn read_capacity16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    c
}

/// REPORT LUNS (SPC-4 §6.33), select report 0 (all LUNs).
pub fn report_luns(allocation_length: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = 0xa0;
    c[6..10].copy_from_slice(&allocation_length.to_be_bytes());
    c
}

/// Whether the 10-byte READ/WRITE can address this range.
pub fn fits_rw10(lba: u64, blocks: u32) -> bool {
    blocks <= u32::from(u16::MAX)
        && lba.saturating_add(u64::from(blocks)) <= u64::from(u32::MAX) + 1
}

/// READ (10) or READ (16), whichever addresses the range.
pub fn read(lba: u64, blocks: u32) -> Vec<u8> {
    rw(0x28, 0x88, lba, blocks)
}

/// WRITE (10) or WRITE (16), whichever addresses the range.
pub fn write(lba: u64, blocks: u32) -> Vec<u8> {
    rw(0x2a, 0x8a, lba, blocks)
}

fn rw(op10: u8, op16: u8, lba: u64, blocks: u32) -> Vec<u8> {
    if fits_rw10(lba, blocks) {
        let mut c = vec![0u8; 10];
        c[0] = op10;
        c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
        c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        c
    } else {
        let mut c = vec![0u8; 16];
        c[0] = op16;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }
}

// ---- answers ------------------------------------------------------------------

/// Standard INQUIRY data (SPC-4 §6.6.2), the parts people look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InquiryData {
    pub peripheral_qualifier: u8,
    pub device_type: u8,
    pub removable: bool,
    pub version: u8,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

impl InquiryData {
    pub fn parse(b: &[u8]) -> Option<InquiryData> {
        let first = *b.first()?;
        Some(InquiryData {
            peripheral_qualifier: first >> 5,
            device_type: first & 0x1f,
            removable: b.get(1).is_some_and(|x| x & 0x80 != 0),
            version: b.get(2).copied().unwrap_or(0),
            vendor: ascii(b.get(8..16).unwrap_or_default()),
            product: ascii(b.get(16..32).unwrap_or_default()),
            revision: ascii(b.get(32..36).unwrap_or_default()),
        })
    }

    /// SPC's name for the peripheral device type.
    pub fn device_type_name(&self) -> &'static str {
        match self.device_type {
            0x00 => "disk",
            0x01 => "tape",
            0x05 => "cd/dvd",
            0x07 => "optical",
            0x08 => "changer",
            0x0c => "storage array controller",
            0x0d => "enclosure",
            0x1f => "unknown/no device",
            _ => "other",
        }
    }
}

/// Size of a logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Address of the last block.
    pub last_lba: u64,
    pub block_size: u32,
}

impl Capacity {
    pub fn blocks(&self) -> u64 {
        self.last_lba.saturating_add(1)
    }

    pub fn bytes(&self) -> u64 {
        self.blocks().saturating_mul(u64::from(self.block_size))
    }

    /// READ CAPACITY (10) data: 8 bytes.
    pub fn parse10(b: &[u8]) -> Option<Capacity> {
        let b = b.get(..8)?;
        Some(Capacity {
            last_lba: u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            block_size: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        })
    }

    /// READ CAPACITY (16) data: at least 12 bytes.
    pub fn parse16(b: &[u8]) -> Option<Capacity> {
        let b = b.get(..12)?;
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&b[..8]);
        Some(Capacity {
            last_lba: u64::from_be_bytes(lba),
            block_size: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

/// REPORT LUNS data: the LUN numbers listed (SAM-5 flat/peripheral forms).
pub fn parse_report_luns(b: &[u8]) -> Vec<u64> {
    let Some(len) = b
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]))
    else {
        return Vec::new();
    };
    let list = b.get(8..).unwrap_or_default();
    let list = list
        .get(..(len as usize).min(list.len()))
        .unwrap_or_default();
    list.chunks_exact(8)
        .map(|c| {
            let mut v = [0u8; 8];
            v.copy_from_slice(c);
            iscsi_proto::pdu::lun_from_wire(u64::from_be_bytes(v))
        })
        .collect()
}

/// Length of REPORT LUNS data the target has (for a second, larger call).
pub fn report_luns_needed(b: &[u8]) -> Option<u32> {
    let l = b.get(..4)?;
    u32::from_be_bytes([l[0], l[1], l[2], l[3]]).checked_add(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_decodes_key_asc_ascq_and_information() {
        let mut s = [0u8; 18];
        s[0] = 0xf0;
        s[2] = 0x05;
        s[3..7].copy_from_slice(&1234u32.to_be_bytes());
        s[7] = 10;
        s[12] = 0x24;
        s[13] = 0x00;
        let d = Sense::parse(&s).unwrap();
        assert_eq!((d.key, d.asc, d.ascq), (5, 0x24, 0));
        assert_eq!(d.information, Some(1234));
        assert!(!d.descriptor);
    }

    #[test]
    fn descriptor_sense_decodes_key_and_information_descriptor() {
        let mut s = vec![0x72, 0x06, 0x29, 0x01, 0, 0, 0, 12];
        s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
        s.extend_from_slice(&99u64.to_be_bytes());
        let d = Sense::parse(&s).unwrap();
        assert_eq!((d.key, d.asc, d.ascq), (6, 0x29, 1));
        assert_eq!(d.information, Some(99));
        assert!(d.descriptor);
        let e = ScsiError::from_status(status::CHECK_CONDITION, Some(&d)).unwrap();
        assert!(e.is_unit_attention());
    }

    #[test]
    fn truncated_or_odd_sense_never_panics() {
        for s in [
            &[][..],
            &[0x70],
            &[0x70, 0, 5],
            &[0x72],
            &[0x72, 1, 2, 3, 0, 0, 0, 200, 0, 50],
            &[0x00, 1, 2],
        ] {
            let _ = Sense::parse(s);
        }
        assert_eq!(Sense::parse(&[0x70, 0, 5]).unwrap().key, 5);
    }

    #[test]
    fn status_maps_to_typed_errors() {
        assert_eq!(ScsiError::from_status(status::GOOD, None), None);
        assert_eq!(
            ScsiError::from_status(status::BUSY, None),
            Some(ScsiError::Busy)
        );
        assert_eq!(
            ScsiError::from_status(status::RESERVATION_CONFLICT, None),
            Some(ScsiError::ReservationConflict)
        );
        assert_eq!(
            ScsiError::from_status(status::CHECK_CONDITION, None),
            Some(ScsiError::CheckConditionNoSense)
        );
    }

    #[test]
    fn read_write_use_10_byte_cdbs_until_the_range_needs_16() {
        assert_eq!(read(0x1234, 8), vec![0x28, 0, 0, 0, 0x12, 0x34, 0, 0, 8, 0]);
        assert_eq!(write(5, 1)[0], 0x2a);
        let c = read(1 << 32, 8);
        assert_eq!(c.len(), 16);
        assert_eq!(c[0], 0x88);
        assert_eq!(&c[2..10], &(1u64 << 32).to_be_bytes());
        assert_eq!(&c[10..14], &8u32.to_be_bytes());
        assert_eq!(write(0, 70_000)[0], 0x8a);
        assert_eq!(read(u64::from(u32::MAX), 1).len(), 10);
        assert_eq!(read(u64::from(u32::MAX), 2).len(), 16);
    }

    #[test]
    fn capacity_and_inquiry_decode() {
        let c = Capacity::parse10(&[0, 0, 0x7f, 0xff, 0, 0, 2, 0]).unwrap();
        assert_eq!(
            (c.blocks(), c.block_size, c.bytes()),
            (32768, 512, 16 << 20)
        );
        assert!(Capacity::parse16(&[0; 11]).is_none());
        let mut inq = vec![0u8; 36];
        inq[8..16].copy_from_slice(b"IET     ");
        inq[16..32].copy_from_slice(b"VIRTUAL-DISK    ");
        inq[32..36].copy_from_slice(b"0001");
        let i = InquiryData::parse(&inq).unwrap();
        assert_eq!(
            (i.vendor.as_str(), i.product.as_str()),
            ("IET", "VIRTUAL-DISK")
        );
        assert_eq!(i.device_type_name(), "disk");
        assert_eq!(InquiryData::parse(&[0x0c]).unwrap().vendor, "");
    }

    #[test]
    fn report_luns_lists_and_bounds_by_its_length() {
        let mut b = vec![0, 0, 0, 16, 0, 0, 0, 0];
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_report_luns(&b), vec![0, 1]);
        assert_eq!(parse_report_luns(&b[..12]), Vec::<u64>::new());
        assert_eq!(report_luns_needed(&b), Some(24));
    }
}
