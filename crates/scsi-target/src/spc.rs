//! Primary commands (SPC-4) other than INQUIRY and the mode pages:
//! TEST UNIT READY, REQUEST SENSE, REPORT LUNS, START STOP UNIT,
//! PREVENT ALLOW MEDIUM REMOVAL, REPORT TARGET PORT GROUPS,
//! REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS.

use crate::cdb::Cdb;
use crate::lu::LogicalUnit;
use crate::sense::{self, Sense};
use crate::{alloc_trunc, CmdResult, ScsiResponse, ScsiTask};

pub(crate) fn test_unit_ready(_lu: &LogicalUnit, _cdb: Cdb<'_>) -> CmdResult {
    Ok(ScsiResponse::good_empty())
}

/// REQUEST SENSE returns (and clears) the oldest pending unit attention,
/// else a sanitize in progress (with its progress) or failed, else NO
/// SENSE. Only fixed format is produced; SPC-4 lets a device server that
/// lacks descriptor format answer DESC=1 with fixed format.
pub(crate) fn request_sense(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    let alloc = u64::from(cdb.byte(4));
    let s = match lu.take_ua(t.nexus) {
        Some(code) => Sense::new(code),
        None => crate::sanitize::condition(lu).unwrap_or(Sense::new(sense::NO_ADDITIONAL_SENSE)),
    };
    Ok(ScsiResponse::good(alloc_trunc(
        s.to_fixed().to_vec(),
        alloc,
    )))
}

/// The REQUEST SENSE answer for a LUN that does not exist (SPC-4 §6.39).
pub(crate) fn request_sense_absent_lun(cdb: Cdb<'_>) -> CmdResult {
    let alloc = u64::from(cdb.byte(4));
    let s = Sense::new(sense::LOGICAL_UNIT_NOT_SUPPORTED);
    Ok(ScsiResponse::good(alloc_trunc(
        s.to_fixed().to_vec(),
        alloc,
    )))
}

/// Encodes a LUN 0..16383 in the SAM-5 single level format: peripheral
/// device addressing below 256, flat space addressing above.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        let l = (lun & 0x3FFF) as u16;
        b[0] = 0x40 | (l >> 8) as u8;
        b[1] = (l & 0xFF) as u8;
    }
    b
}

/// REPORT LUNS over the given LUN list.
pub(crate) fn report_luns(luns: impl Iterator<Item = u64>, cdb: Cdb<'_>) -> CmdResult {
    let select = cdb.byte(2);
    let alloc = u64::from(cdb.u32(6));
    if alloc < 16 {
        return Err(Sense::invalid_cdb(6, None).into());
    }
    let luns: Vec<u64> = match select {
        // 00h: all logical units; 02h: all, including well-known (we have none).
        0x00 | 0x02 => luns.collect(),
        // 01h: well-known logical units only.
        0x01 => Vec::new(),
        // 10h..12h concern administrative LUNs, which we do not have.
        0x10..=0x12 => Vec::new(),
        _ => return Err(Sense::invalid_cdb(2, None).into()),
    };
    let mut v = Vec::with_capacity(8 + 8 * luns.len());
    let list_len = u32::try_from(8 * luns.len()).unwrap_or(u32::MAX);
    v.extend_from_slice(&list_len.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for l in luns {
        v.extend_from_slice(&encode_lun(l));
    }
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

/// START STOP UNIT: a disk that is always spun up. Stopping and power
/// conditions are accepted and change nothing; LOEJ asks to eject a medium,
/// which a non-removable LU refuses.
pub(crate) fn start_stop_unit(_lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let power_condition = cdb.byte(4) >> 4;
    let loej = cdb.bit(4, 1);
    if power_condition == 0 && loej {
        return Err(Sense::invalid_cdb(4, Some(1)).into());
    }
    Ok(ScsiResponse::good_empty())
}

/// PREVENT ALLOW MEDIUM REMOVAL: nothing to lock on a fixed medium.
pub(crate) fn prevent_allow(_lu: &LogicalUnit, _cdb: Cdb<'_>) -> CmdResult {
    Ok(ScsiResponse::good_empty())
}

/// REPORT TARGET PORT GROUPS: implicit ALUA with a single target port group,
/// active/optimized, holding the port the command arrived on.
pub(crate) fn report_target_port_groups(
    lu: &LogicalUnit,
    t: &ScsiTask<'_>,
    cdb: Cdb<'_>,
) -> CmdResult {
    let extended = (cdb.byte(1) >> 5) == 0x01;
    let alloc = u64::from(cdb.u32(6));
    let desc = crate::alua::descriptors(&lu.alua(), t.nexus);

    let mut v = Vec::with_capacity(8 + desc.len());
    v.extend_from_slice(&(desc.len() as u32).to_be_bytes());
    if extended {
        // Format type 1, implicit transition time 0.
        v.extend_from_slice(&[0x10, 0, 0, 0]);
    }
    v.extend_from_slice(&desc);
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS: ABORT TASK, ABORT TASK SET,
/// CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET, I_T NEXUS RESET.
pub(crate) fn report_supported_tmfs(cdb: Cdb<'_>) -> CmdResult {
    let repd = cdb.bit(2, 7);
    let alloc = u64::from(cdb.u32(6));
    let mut v = vec![0u8; if repd { 16 } else { 4 }];
    v[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02;
    v[1] = 0x01;
    if repd {
        v[3] = 0x0C;
    }
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;
    use crate::{sense, status};

    #[test]
    fn test_unit_ready_is_good_after_ua() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        assert_good(&exec(&lu, &n, &TUR, &[]));
    }

    #[test]
    fn request_sense_returns_and_clears_unit_attention() {
        let lu = mem_lu();
        let n = nexus(1);
        let r = exec(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
        assert_good(&r);
        assert_eq!(r.data_in.len(), 18);
        assert_eq!(r.data_in[0], 0x70);
        assert_eq!(
            (r.data_in[2], r.data_in[12], r.data_in[13]),
            (0x06, 0x29, 0x00)
        );
        let r = exec(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
        assert_eq!((r.data_in[2], r.data_in[12]), (0, 0));
        assert_good(&exec(&lu, &n, &TUR, &[]));
    }

    #[test]
    fn request_sense_truncates_to_allocation_length() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0x03, 0, 0, 0, 8, 0], &[]);
        assert_eq!(r.data_in.len(), 8);
    }

    #[test]
    fn report_luns_lists_the_lun() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_good(&r);
        assert_eq!(
            &r.data_in[..],
            &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn report_luns_small_allocation_is_invalid_field() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0], &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((6, true)));
    }

    #[test]
    fn report_luns_bad_select_report_is_invalid_field() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0xA0, 0, 0x05, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        let r = exec(&lu, &n, &[0xA0, 0, 0x01, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_good(&r);
        assert_eq!(&r.data_in[..4], &[0, 0, 0, 0]);
    }

    #[test]
    fn report_luns_is_answered_despite_pending_ua() {
        let lu = mem_lu();
        let n = nexus(1);
        let r = exec(&lu, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_good(&r);
    }

    #[test]
    fn encode_lun_uses_flat_space_above_255() {
        assert_eq!(super::encode_lun(5), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(super::encode_lun(300), [0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn start_stop_unit_start_and_stop_are_accepted() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        assert_good(&exec(&lu, &n, &[0x1B, 1, 0, 0, 0x01, 0], &[]));
        assert_good(&exec(&lu, &n, &[0x1B, 0, 0, 0, 0x00, 0], &[]));
        assert_good(&exec(&lu, &n, &[0x1B, 0, 0, 0, 0x32, 0], &[]));
    }

    #[test]
    fn start_stop_unit_eject_on_fixed_medium_is_refused() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0x1B, 1, 0, 0, 0x02, 0], &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn prevent_allow_is_accepted() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        assert_good(&exec(&lu, &n, &[0x1E, 0, 0, 0, 1, 0], &[]));
        assert_good(&exec(&lu, &n, &[0x1E, 0, 0, 0, 0, 0], &[]));
    }

    #[test]
    fn report_target_port_groups_names_the_nexus_port() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_good(&r);
        let d = &r.data_in;
        assert_eq!(&d[..4], &[0, 0, 0, 12]);
        assert_eq!(d[4] & 0x0F, 0);
        assert_eq!(&d[6..8], &[0, 1]);
        assert_eq!(d[11], 1);
        assert_eq!(&d[14..16], &[0, 1]);
        let r = exec(&lu, &n, &[0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_eq!(r.data_in[4], 0x10);
        assert_eq!(r.data_in.len(), 20);
    }

    #[test]
    fn unknown_maintenance_in_action_points_at_byte_one() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0xA3, 0x1F, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_eq!(r.status, status::CHECK_CONDITION);
        assert_eq!(field_pointer(&r), Some((1, true)));
    }

    #[test]
    fn report_supported_tmfs_lists_abort_and_resets() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_good(&r);
        assert_eq!(r.data_in.len(), 4);
        assert_ne!(r.data_in[0] & 0x80, 0);
    }
}
