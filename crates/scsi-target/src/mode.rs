//! MODE SENSE and MODE SELECT (SPC-4 §6.11-6.14) and our mode pages:
//! read-write error recovery (01h), caching (08h, WCE changeable),
//! control (0Ah, SWP changeable) and informational exceptions (1Ch).
//!
//! The pages are built from the LU's live state on each request, so there is
//! one source of truth (the atomics on the LU) and no page image to keep in
//! step with it. When several gateways serve the LU, a change is stored in
//! its [`SharedState`] before it applies here, and the other gateways take it
//! in before their next command ([`load_shared`]).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::cdb::{op, Cdb};
use crate::lu::LogicalUnit;
use crate::sense::{self, Sense};
use crate::{alloc_trunc, CmdResult, Fail, ScsiResponse, ScsiTask, SharedState};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

/// Page codes we implement, in the order MODE SENSE returns them.
const PAGES: [u8; 4] = [0x01, 0x08, 0x0A, 0x1C];
const ALL_PAGES: u8 = 0x3F;

fn page(lu: &LogicalUnit, code: u8, pc: Pc) -> Option<Vec<u8>> {
    let mut p = match code {
        0x01 => vec![0u8; 12],
        0x08 => vec![0u8; 20],
        0x0A => vec![0u8; 12],
        0x1C => vec![0u8; 12],
        _ => return None,
    };
    p[0] = code;
    p[1] = (p.len() - 2) as u8;
    match (code, pc) {
        (0x01, Pc::Current | Pc::Default) => p[2] = 0xC0, // AWRE, ARRE
        (0x08, Pc::Current) => {
            p[2] = if lu.wce.load(Ordering::Relaxed) {
                0x04
            } else {
                0
            }
        }
        (0x08, Pc::Default) => p[2] = if lu.config.write_cache { 0x04 } else { 0 },
        (0x08, Pc::Changeable) => p[2] = 0x04,
        (0x0A, Pc::Current | Pc::Default) => {
            // TST 000b, D_SENSE 0 (fixed format only), QERR 00b.
            let swp = pc == Pc::Current && lu.swp.load(Ordering::Relaxed);
            p[4] = if swp { 0x08 } else { 0 };
            p[5] = 0x40; // TAS: aborted tasks of other nexuses get TASK ABORTED
            p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes()); // busy timeout: unlimited
        }
        (0x0A, Pc::Changeable) => p[4] = 0x08, // SWP
        (0x1C, Pc::Current | Pc::Default) => p[2] = 0x08, // DEXCPT: no reporting
        _ => {}
    }
    Some(p)
}

pub(crate) fn mode_sense(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let ten = cdb.opcode() == op::MODE_SENSE_10;
    let dbd = cdb.bit(1, 3);
    let llbaa = ten && cdb.bit(1, 4);
    let pc = match cdb.byte(2) >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(sense::SAVING_PARAMETERS_NOT_SUPPORTED.into()),
    };
    let code = cdb.byte(2) & 0x3F;
    let subpage = cdb.byte(3);
    let alloc = if ten {
        u64::from(cdb.u16(7))
    } else {
        u64::from(cdb.byte(4))
    };
    if subpage != 0 && subpage != 0xFF {
        return Err(Sense::invalid_cdb(3, None).into());
    }
    let mut pages = Vec::with_capacity(64);
    if code == ALL_PAGES {
        for c in PAGES {
            if let Some(p) = page(lu, c, pc) {
                pages.extend_from_slice(&p);
            }
        }
    } else {
        match page(lu, code, pc) {
            Some(p) => pages.extend_from_slice(&p),
            None => return Err(Sense::invalid_cdb(2, Some(5)).into()),
        }
    }

    let blocks = lu.num_blocks();
    let bs = lu.config.block_size;
    let bd: Vec<u8> = if dbd {
        Vec::new()
    } else if llbaa {
        let mut d = vec![0u8; 16];
        d[..8].copy_from_slice(&blocks.to_be_bytes());
        d[12..16].copy_from_slice(&bs.to_be_bytes());
        d
    } else {
        let mut d = vec![0u8; 8];
        let short = u32::try_from(blocks).unwrap_or(u32::MAX);
        d[..4].copy_from_slice(&short.to_be_bytes());
        d[5..8].copy_from_slice(&bs.to_be_bytes()[1..4]);
        d
    };
    // WP when write protected; DPOFUA: DPO and FUA are honoured.
    let dsp = if lu.write_protected() { 0x80 } else { 0 } | 0x10;

    let mut v = Vec::with_capacity(8 + bd.len() + pages.len());
    if ten {
        let total = 8 + bd.len() + pages.len();
        v.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        v.push(0);
        v.push(dsp);
        v.push(u8::from(llbaa && !dbd));
        v.push(0);
        v.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let total = 4 + bd.len() + pages.len();
        v.push(u8::try_from(total - 1).unwrap_or(u8::MAX));
        v.push(0);
        v.push(dsp);
        v.push(bd.len() as u8);
    }
    v.extend_from_slice(&bd);
    v.extend_from_slice(&pages);
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

/// What a validated MODE SELECT changes.
#[derive(Default)]
struct Changes {
    wce: Option<bool>,
    swp: Option<bool>,
}

pub(crate) fn mode_select(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    let ten = cdb.opcode() == op::MODE_SELECT_10;
    if cdb.bit(1, 0) {
        // SP: we have no saved pages.
        return Err(Sense::invalid_cdb(1, Some(0)).into());
    }
    let plen = if ten {
        usize::from(cdb.u16(7))
    } else {
        usize::from(cdb.byte(4))
    };
    if plen == 0 {
        return Ok(ScsiResponse::good_empty());
    }
    let data = t.data_out.get(..plen).unwrap_or(t.data_out);
    let hdr = if ten { 8 } else { 4 };
    if data.len() < hdr {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let (bdl, long) = if ten {
        (
            usize::from(u16::from_be_bytes([data[6], data[7]])),
            data[4] & 1 != 0,
        )
    } else {
        (usize::from(data[3]), false)
    };
    let bd_size = if long { 16 } else { 8 };
    if bdl % bd_size != 0 {
        let at = if ten { 6 } else { 3 };
        return Err(Sense::invalid_param(at, None).into());
    }
    let Some(bds) = data.get(hdr..hdr + bdl) else {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    };
    for (i, d) in bds.chunks_exact(bd_size).enumerate() {
        let len_at = if long { 12 } else { 5 };
        let bl = crate::cdb::be_at(d, len_at, if long { 4 } else { 3 });
        if bl != u64::from(lu.config.block_size) && bl != 0 {
            return Err(Sense::invalid_param((hdr + i * bd_size + len_at) as u16, None).into());
        }
    }

    let _g = lu.mode_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut changes = Changes::default();
    let mut at = hdr + bdl;
    while at < data.len() {
        let Some(&b0) = data.get(at) else { break };
        let Some(&len) = data.get(at + 1) else {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        };
        if b0 & 0x40 != 0 {
            // SPF: sub-page format; we have no subpages.
            return Err(Sense::invalid_param(at as u16, Some(6)).into());
        }
        let code = b0 & 0x3F;
        let (Some(cur), Some(chg)) = (page(lu, code, Pc::Current), page(lu, code, Pc::Changeable))
        else {
            return Err(Sense::invalid_param(at as u16, Some(5)).into());
        };
        if usize::from(len) + 2 != cur.len() {
            return Err(Sense::invalid_param((at + 1) as u16, None).into());
        }
        let Some(new) = data.get(at..at + cur.len()) else {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        };
        for i in 2..cur.len() {
            if (new[i] ^ cur[i]) & !chg[i] != 0 {
                return Err(Sense::invalid_param((at + i) as u16, None).into());
            }
        }
        match code {
            0x08 => changes.wce = Some(new[2] & 0x04 != 0),
            0x0A => changes.swp = Some(new[4] & 0x08 != 0),
            _ => {}
        }
        at += cur.len();
    }

    // Only what differs is stored, so two gateways' MODE SELECTs of
    // different parameters do not undo each other.
    let mut updates: Vec<(&str, &[u8])> = Vec::new();
    let mut apply: Vec<(&AtomicBool, bool)> = Vec::new();
    for ((name, flag), want) in shared_params(lu)
        .into_iter()
        .zip([changes.wce, changes.swp])
    {
        match want {
            Some(w) if flag.load(Ordering::Relaxed) != w => {
                updates.push((name, if w { b"1" } else { b"0" }));
                apply.push((flag, w));
            }
            _ => {}
        }
    }
    if apply.is_empty() {
        return Ok(ScsiResponse::good_empty());
    }
    if let Some(store) = lu.backend.shared_state() {
        // Stored (and the other gateways told) before it takes effect here,
        // so no gateway runs a command under parameters the others lack.
        store.store_mode_params(&updates).map_err(|e| {
            tracing::warn!(error = %e, "shared mode parameters unavailable");
            Fail::from(sense::INTERNAL_TARGET_FAILURE)
        })?;
    }
    for (flag, w) in apply {
        flag.store(w, Ordering::Relaxed);
    }
    lu.queue_ua_others(Some(t.nexus.id), sense::MODE_PARAMETERS_CHANGED);
    Ok(ScsiResponse::good_empty())
}

/// The mode parameters every gateway of a shared LU applies alike, by the
/// name the shared state keeps each under.
fn shared_params(lu: &LogicalUnit) -> [(&'static str, &AtomicBool); 2] {
    [("wce", &lu.wce), ("swp", &lu.swp)]
}

/// Takes in the mode parameters stored by any gateway. With `announce`,
/// this gateway's nexuses hear of a change as the other gateway's did
/// (MODE PARAMETERS CHANGED); an LU being opened has no nexus to tell.
pub(crate) fn load_shared(lu: &LogicalUnit, store: &dyn SharedState, announce: bool) {
    let _g = lu.mode_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut changed = false;
    for (name, flag) in shared_params(lu) {
        let on = match store.load_mode_param(name) {
            Ok(None) => continue,
            Ok(Some(v)) if v == b"1" => true,
            Ok(Some(v)) if v == b"0" => false,
            Ok(Some(_)) => {
                tracing::warn!(serial = %lu.config.serial, name, "unreadable shared mode parameter ignored");
                continue;
            }
            Err(e) => {
                tracing::warn!(serial = %lu.config.serial, name, error = %e, "cannot read a shared mode parameter");
                continue;
            }
        };
        changed |= flag.swap(on, Ordering::Relaxed) != on;
    }
    if changed && announce {
        lu.queue_ua_others(None, sense::MODE_PARAMETERS_CHANGED);
    }
}

#[cfg(test)]
mod tests {
    use crate::sense;
    use crate::testutil::*;
    use crate::LuConfig;

    fn sense6(pc: u8, page: u8, sub: u8, alloc: u8) -> [u8; 6] {
        [0x1A, 0, (pc << 6) | page, sub, alloc, 0]
    }

    #[test]
    fn mode_sense6_all_pages_has_header_block_descriptor_and_pages() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &sense6(0, 0x3F, 0, 255), &[]);
        assert_good(&r);
        let d = &r.data_in;
        assert_eq!(usize::from(d[0]), d.len() - 1);
        assert_eq!(d[2] & 0x80, 0, "not write protected");
        assert_ne!(d[2] & 0x10, 0, "DPOFUA");
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &((MIB / 512) as u32).to_be_bytes());
        assert_eq!(&d[9..12], &[0, 2, 0]);
        let codes: Vec<u8> = {
            let mut at = 12;
            let mut v = Vec::new();
            while at < d.len() {
                v.push(d[at] & 0x3F);
                at += 2 + usize::from(d[at + 1]);
            }
            v
        };
        assert_eq!(codes, vec![0x01, 0x08, 0x0A, 0x1C]);
    }

    #[test]
    fn mode_sense6_truncates_to_allocation_length() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &sense6(0, 0x3F, 0, 4), &[]);
        assert_eq!(r.data_in.len(), 4);
    }

    #[test]
    fn mode_sense_dbd_omits_block_descriptor() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0x1A, 0x08, 0x08, 0, 255, 0], &[]);
        assert_eq!(r.data_in[3], 0);
        assert_eq!(r.data_in[4], 0x08);
    }

    #[test]
    fn mode_sense_saved_values_are_not_supported() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &sense6(3, 0x08, 0, 255), &[]);
        assert_check(&r, sense::SAVING_PARAMETERS_NOT_SUPPORTED);
    }

    #[test]
    fn mode_sense_unknown_page_or_subpage_is_invalid_field() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        assert_check(
            &exec(&lu, &n, &sense6(0, 0x19, 0, 255), &[]),
            sense::INVALID_FIELD_IN_CDB,
        );
        assert_check(
            &exec(&lu, &n, &sense6(0, 0x08, 1, 255), &[]),
            sense::INVALID_FIELD_IN_CDB,
        );
        assert_good(&exec(&lu, &n, &sense6(0, 0x3F, 0xFF, 255), &[]));
    }

    #[test]
    fn mode_sense_changeable_shows_wce_and_swp() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let d = exec(&lu, &n, &[0x1A, 0x08, 0x48, 0, 255, 0], &[]).data_in;
        assert_eq!(d[4 + 2], 0x04);
        let d = exec(&lu, &n, &[0x1A, 0x08, 0x4A, 0, 255, 0], &[]).data_in;
        assert_eq!(d[4 + 4], 0x08);
    }

    #[test]
    fn mode_sense10_llbaa_uses_long_descriptor() {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]);
        let d = &r.data_in;
        assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])), d.len() - 2);
        assert_eq!(d[4] & 1, 1);
        assert_eq!(&d[6..8], &[0, 16]);
        assert_eq!(&d[8..16], &(MIB / 512).to_be_bytes());
        assert_eq!(d[24], 0x08);
    }

    #[test]
    fn mode_sense_read_only_sets_wp() {
        let cfg = LuConfig {
            read_only: true,
            ..LuConfig::default()
        };
        let lu = lu_with(cfg, MIB);
        let n = ready_nexus(&lu, 1);
        let d = exec(&lu, &n, &sense6(0, 0x3F, 0, 255), &[]).data_in;
        assert_ne!(d[2] & 0x80, 0);
    }

    fn select6_caching(wce: bool, extra: u8) -> (Vec<u8>, [u8; 6]) {
        let mut p = vec![0u8, 0, 0, 0];
        let mut page = vec![0u8; 20];
        page[0] = 0x08;
        page[1] = 0x12;
        page[2] = if wce { 0x04 } else { 0 } | extra;
        p.extend_from_slice(&page);
        let len = p.len() as u8;
        (p, [0x15, 0x10, 0, 0, len, 0])
    }

    #[test]
    fn mode_select_changes_wce_and_tells_other_nexuses() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        let (p, cdb) = select6_caching(false, 0);
        assert_good(&exec(&lu, &a, &cdb, &p));
        let d = exec(&lu, &a, &[0x1A, 0x08, 0x08, 0, 255, 0], &[]).data_in;
        assert_eq!(d[6] & 0x04, 0);
        assert_good(&exec(&lu, &a, &TUR, &[]));
        assert_check(&exec(&lu, &b, &TUR, &[]), sense::MODE_PARAMETERS_CHANGED);
    }

    #[test]
    fn mode_select_changing_fixed_field_is_invalid_parameter() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let (p, cdb) = select6_caching(true, 0x01); // RCD is not changeable
        let r = exec(&lu, &a, &cdb, &p);
        assert_check(&r, sense::INVALID_FIELD_IN_PARAMETER_LIST);
        assert_eq!(field_pointer(&r), Some((6, false)));
    }

    #[test]
    fn mode_select_unknown_page_and_bad_length_are_invalid_parameter() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let p = vec![0, 0, 0, 0, 0x19, 2, 0, 0];
        let r = exec(&lu, &a, &[0x15, 0x10, 0, 0, 8, 0], &p);
        assert_check(&r, sense::INVALID_FIELD_IN_PARAMETER_LIST);
        let p = vec![0, 0, 0, 0, 0x08, 2, 0, 0];
        let r = exec(&lu, &a, &[0x15, 0x10, 0, 0, 8, 0], &p);
        assert_check(&r, sense::INVALID_FIELD_IN_PARAMETER_LIST);
    }

    #[test]
    fn mode_select_short_header_is_parameter_list_length_error() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let r = exec(&lu, &a, &[0x15, 0x10, 0, 0, 3, 0], &[0, 0, 0]);
        assert_check(&r, sense::PARAMETER_LIST_LENGTH_ERROR);
    }

    #[test]
    fn mode_select_sp_is_invalid_field() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let (p, mut cdb) = select6_caching(true, 0);
        cdb[1] |= 1;
        assert_check(&exec(&lu, &a, &cdb, &p), sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn mode_select_swp_write_protects_the_medium() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        // Read the control page with its header and block descriptor, set SWP, send it back.
        let mut d = exec(&lu, &a, &[0x1A, 0, 0x0A, 0, 255, 0], &[])
            .data_in
            .to_vec();
        d[0] = 0;
        d[12 + 4] |= 0x08;
        let len = d.len() as u8;
        assert_good(&exec(&lu, &a, &[0x15, 0x10, 0, 0, len, 0], &d));
        let r = exec(&lu, &a, &cdb10(0x2A, 0, 1), &[0u8; 512]);
        assert_check(&r, sense::SOFTWARE_WRITE_PROTECTED);
        assert_good(&exec(&lu, &a, &cdb10(0x28, 0, 1), &[]));
        let ms = exec(&lu, &a, &[0x1A, 0, 0x0A, 0, 255, 0], &[]).data_in;
        assert_ne!(ms[2] & 0x80, 0);
    }
}
