//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): the table of every
//! command the dispatcher implements, with its CDB usage data.
//!
//! A unit test walks this table through the dispatcher, so an entry cannot
//! claim a command that answers INVALID COMMAND OPERATION CODE.

use crate::cdb::Cdb;
use crate::lu::LogicalUnit;
use crate::sense::Sense;
use crate::{alloc_trunc, CmdResult, ScsiResponse};

/// One supported command: opcode, service action (if the opcode has them)
/// and the CDB usage bit map (byte 0 is the opcode itself).
pub(crate) struct OpInfo {
    pub opcode: u8,
    pub sa: Option<u16>,
    pub usage: &'static [u8],
}

const fn op(opcode: u8, usage: &'static [u8]) -> OpInfo {
    OpInfo {
        opcode,
        sa: None,
        usage,
    }
}

const fn op_sa(opcode: u8, sa: u16, usage: &'static [u8]) -> OpInfo {
    OpInfo {
        opcode,
        sa: Some(sa),
        usage,
    }
}

/// Every command we implement.
pub(crate) static COMMANDS: &[OpInfo] = &[
    op(0x00, &[0x00, 0x00, 0x00, 0x00, 0x00, 0x07]),
    op(0x03, &[0x03, 0x01, 0x00, 0x00, 0xFF, 0x07]),
    op(0x08, &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    op(0x0A, &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    op(0x12, &[0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07]),
    op(0x15, &[0x15, 0x11, 0x00, 0x00, 0xFF, 0x07]),
    op(0x16, &[0x16, 0x00, 0x00, 0x00, 0x00, 0x07]),
    op(0x17, &[0x17, 0x00, 0x00, 0x00, 0x00, 0x07]),
    op(0x1A, &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07]),
    op(0x1B, &[0x1B, 0x01, 0x00, 0x0F, 0xF7, 0x07]),
    op(0x1E, &[0x1E, 0x00, 0x00, 0x00, 0x03, 0x07]),
    op(
        0x25,
        &[0x25, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x01, 0x07],
    ),
    op(
        0x28,
        &[0x28, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x2A,
        &[0x2A, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x2E,
        &[0x2E, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x2F,
        &[0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x34,
        &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x35,
        &[0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x37,
        &[0x37, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x41,
        &[0x41, 0xE8, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x42,
        &[0x42, 0x00, 0x00, 0x00, 0x00, 0x00, 0x3F, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x48,
        0x01,
        &[0x48, 0xBF, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x48,
        0x02,
        &[0x48, 0xBF, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x48,
        0x1F,
        &[0x48, 0xBF, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x55,
        &[0x55, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x5A,
        &[0x5A, 0x18, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5E,
        0x00,
        &[0x5E, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5E,
        0x01,
        &[0x5E, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5E,
        0x02,
        &[0x5E, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5E,
        0x03,
        &[0x5E, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5F,
        0x00,
        &[0x5F, 0x1F, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5F,
        0x01,
        &[0x5F, 0x1F, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5F,
        0x02,
        &[0x5F, 0x1F, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5F,
        0x03,
        &[0x5F, 0x1F, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5F,
        0x04,
        &[0x5F, 0x1F, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5F,
        0x05,
        &[0x5F, 0x1F, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    ),
    op_sa(
        0x5F,
        0x06,
        &[0x5F, 0x1F, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x07],
    ),
    op(
        0x88,
        &[
            0x88, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x89,
        &[
            0x89, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x8A,
        &[
            0x8A, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x8B,
        &[
            0x8B, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x8E,
        &[
            0x8E, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x8F,
        &[
            0x8F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x90,
        &[
            0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x91,
        &[
            0x91, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x93,
        &[
            0x93, 0xE9, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op(
        0x9C,
        &[
            0x9C, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0xFF, 0xFF,
            0x3F, 0x07,
        ],
    ),
    op_sa(
        0x9E,
        0x10,
        &[
            0x9E, 0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x00, 0x07,
        ],
    ),
    op_sa(
        0x9E,
        0x12,
        &[
            0x9E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x00, 0x07,
        ],
    ),
    op(
        0xA0,
        &[
            0xA0, 0x00, 0xFF, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07,
        ],
    ),
    op_sa(
        0xA3,
        0x0A,
        &[
            0xA3, 0xEA, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07,
        ],
    ),
    op_sa(
        0xA3,
        0x0C,
        &[
            0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07,
        ],
    ),
    op_sa(
        0xA3,
        0x0D,
        &[
            0xA3, 0x0D, 0x80, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07,
        ],
    ),
    op(
        0xA8,
        &[
            0xA8, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07,
        ],
    ),
    op(
        0xAA,
        &[
            0xAA, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07,
        ],
    ),
    op(
        0xAE,
        &[
            0xAE, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07,
        ],
    ),
    op(
        0xAF,
        &[
            0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07,
        ],
    ),
    op(
        0xB7,
        &[
            0xB7, 0x1F, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07,
        ],
    ),
];

/// Nominal and recommended command timeouts we report (seconds).
const NOMINAL_TIMEOUT: u32 = 1;
const RECOMMENDED_TIMEOUT: u32 = 30;

fn timeouts_descriptor(v: &mut Vec<u8>) {
    v.extend_from_slice(&0x000Au16.to_be_bytes());
    v.push(0);
    v.push(0);
    v.extend_from_slice(&NOMINAL_TIMEOUT.to_be_bytes());
    v.extend_from_slice(&RECOMMENDED_TIMEOUT.to_be_bytes());
}

fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.sa.is_some())
}

/// Whether this LU implements the command (UNMAP needs thin provisioning).
fn supported(lu: &LogicalUnit, c: &OpInfo) -> bool {
    c.opcode != crate::cdb::op::UNMAP || lu.thin()
}

pub(crate) fn report_supported_opcodes(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let rctd = cdb.bit(2, 7);
    let options = cdb.byte(2) & 0x07;
    let req_op = cdb.byte(3);
    let req_sa = cdb.u16(4);
    let alloc = u64::from(cdb.u32(6));

    let mut v = Vec::with_capacity(1024);
    if options == 0 {
        v.extend_from_slice(&[0; 4]);
        for c in COMMANDS.iter().filter(|c| supported(lu, c)) {
            v.push(c.opcode);
            v.push(0);
            v.extend_from_slice(&c.sa.unwrap_or(0).to_be_bytes());
            v.push(0);
            v.push(if rctd { 0x02 } else { 0 } | u8::from(c.sa.is_some()));
            v.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
            if rctd {
                timeouts_descriptor(&mut v);
            }
        }
        let len = (v.len() - 4) as u32;
        v[..4].copy_from_slice(&len.to_be_bytes());
        return Ok(ScsiResponse::good(alloc_trunc(v, alloc)));
    }

    let found = match options {
        1 => {
            if has_service_actions(req_op) {
                return Err(Sense::invalid_cdb(2, None).into());
            }
            COMMANDS.iter().find(|c| c.opcode == req_op)
        }
        2 => {
            if !has_service_actions(req_op) && COMMANDS.iter().any(|c| c.opcode == req_op) {
                return Err(Sense::invalid_cdb(2, None).into());
            }
            COMMANDS
                .iter()
                .find(|c| c.opcode == req_op && c.sa == Some(req_sa))
        }
        3 => {
            if has_service_actions(req_op) {
                COMMANDS
                    .iter()
                    .find(|c| c.opcode == req_op && c.sa == Some(req_sa))
            } else if req_sa == 0 {
                COMMANDS.iter().find(|c| c.opcode == req_op)
            } else {
                None
            }
        }
        _ => return Err(Sense::invalid_cdb(2, None).into()),
    };
    v.push(0);
    match found.filter(|c| supported(lu, c)) {
        Some(c) => {
            v.push(if rctd { 0x80 } else { 0 } | 0x03);
            v.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
            v.extend_from_slice(c.usage);
            if rctd {
                timeouts_descriptor(&mut v);
            }
        }
        None => {
            v.push(0x01); // not supported
            v.extend_from_slice(&[0, 0]);
        }
    }
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

#[cfg(test)]
mod tests {
    use super::COMMANDS;
    use crate::sense;
    use crate::testutil::*;

    fn rsoc(rctd: bool, options: u8, opcode: u8, sa: u16, alloc: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = 0xA3;
        c[1] = 0x0C;
        c[2] = if rctd { 0x80 } else { 0 } | options;
        c[3] = opcode;
        c[4..6].copy_from_slice(&sa.to_be_bytes());
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        c
    }

    #[test]
    fn every_listed_command_is_dispatched() {
        for c in COMMANDS {
            let lu = mem_lu();
            let n = ready_nexus(&lu, 1);
            let mut cdb = vec![0u8; c.usage.len()];
            cdb[0] = c.opcode;
            if let Some(sa) = c.sa {
                cdb[1] = sa as u8;
            }
            let r = exec(&lu, &n, &cdb, &[]);
            assert_ne!(
                r.sense_code(),
                Some(sense::INVALID_COMMAND_OPERATION_CODE),
                "opcode {:#x}",
                c.opcode
            );
            if c.sa.is_some() {
                assert_ne!(
                    super::super::testutil::field_pointer(&r),
                    Some((1, true)),
                    "service action {:#x}/{:?} rejected",
                    c.opcode,
                    c.sa
                );
            }
            assert_eq!(
                c.usage.len(),
                crate::cdb::cdb_len(c.opcode).unwrap_or(6),
                "{:#x}",
                c.opcode
            );
        }
    }

    #[test]
    fn all_commands_lists_descriptors_with_and_without_timeouts() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &rsoc(false, 0, 0, 0, 65535), &[]);
        assert_good(&r);
        let d = &r.data_in;
        let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
        assert_eq!(len, 8 * COMMANDS.len());
        assert_eq!(len + 4, d.len());
        let r = exec(&lu, &n, &rsoc(true, 0, 0, 0, 65535), &[]);
        let d = &r.data_in;
        assert_eq!(d.len(), 4 + 20 * COMMANDS.len());
        assert_eq!(d[4 + 5] & 0x02, 0x02, "CTDP");
        assert_eq!(&d[4 + 8..4 + 10], &[0, 0x0A]);
    }

    #[test]
    fn one_command_reports_usage_data() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &rsoc(false, 1, 0x28, 0, 512), &[]);
        assert_good(&r);
        assert_eq!(r.data_in[1] & 0x07, 3);
        assert_eq!(&r.data_in[2..4], &[0, 10]);
        assert_eq!(r.data_in[4], 0x28);
        let r = exec(&lu, &n, &rsoc(true, 1, 0x28, 0, 512), &[]);
        assert_eq!(r.data_in[1] & 0x80, 0x80);
        assert_eq!(r.data_in.len(), 4 + 10 + 12);
    }

    #[test]
    fn one_command_unsupported_opcode_reports_not_supported() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &rsoc(false, 1, 0xC5, 0, 512), &[]);
        assert_good(&r);
        assert_eq!(r.data_in[1] & 0x07, 1);
    }

    #[test]
    fn option_one_on_opcode_with_service_actions_is_invalid_field() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        assert_check(
            &exec(&lu, &n, &rsoc(false, 1, 0x9E, 0, 512), &[]),
            sense::INVALID_FIELD_IN_CDB,
        );
        assert_check(
            &exec(&lu, &n, &rsoc(false, 2, 0x28, 0, 512), &[]),
            sense::INVALID_FIELD_IN_CDB,
        );
        assert_check(
            &exec(&lu, &n, &rsoc(false, 5, 0x28, 0, 512), &[]),
            sense::INVALID_FIELD_IN_CDB,
        );
    }

    #[test]
    fn service_action_lookup_finds_read_capacity_16() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &rsoc(false, 2, 0x9E, 0x10, 512), &[]);
        assert_eq!(r.data_in[1] & 0x07, 3);
        assert_eq!(&r.data_in[2..4], &[0, 16]);
        let r = exec(&lu, &n, &rsoc(false, 3, 0x28, 0, 512), &[]);
        assert_eq!(r.data_in[1] & 0x07, 3);
        let r = exec(&lu, &n, &rsoc(false, 3, 0x9E, 0x12, 512), &[]);
        assert_eq!(r.data_in[1] & 0x07, 3);
    }
}
