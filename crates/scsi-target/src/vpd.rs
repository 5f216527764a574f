//! INQUIRY: standard data and the vital product data pages (SPC-4 §6.6,
//! §7.8; SBC-3 §6.6).

use crate::cdb::Cdb;
use crate::lu::LogicalUnit;
use crate::sbc::limits;
use crate::sense::Sense;
use crate::{alloc_trunc, CmdResult, ScsiResponse, ScsiTask};

/// Version descriptors we claim: SAM-5, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 3] = [0x00A0, 0x0460, 0x04C0];

/// VPD pages, in the order of the Supported VPD Pages page.
const SUPPORTED_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2];

pub(crate) fn inquiry(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    let evpd = cdb.bit(1, 0);
    let cmddt = cdb.bit(1, 1);
    let page = cdb.byte(2);
    let alloc = u64::from(cdb.u16(3));
    if cmddt {
        return Err(Sense::invalid_cdb(1, Some(1)).into());
    }
    let data = if !evpd {
        if page != 0 {
            return Err(Sense::invalid_cdb(2, None).into());
        }
        standard(lu)
    } else {
        match page {
            0x00 => vpd_page(0x00, SUPPORTED_PAGES.to_vec()),
            0x80 => vpd_page(0x80, lu.config.serial.as_bytes().to_vec()),
            0x83 => vpd_page(0x83, device_identification(lu, t)),
            0x86 => vpd_page(0x86, extended_inquiry(lu)),
            0xB0 => vpd_page(0xB0, block_limits(lu)),
            0xB1 => vpd_page(0xB1, block_device_characteristics()),
            0xB2 => vpd_page(0xB2, logical_block_provisioning(lu)),
            _ => return Err(Sense::invalid_cdb(2, None).into()),
        }
    };
    Ok(ScsiResponse::good(alloc_trunc(data, alloc)))
}

/// Standard INQUIRY data for a present LU: 74 bytes with 8 version descriptor slots.
fn standard(lu: &LogicalUnit) -> Vec<u8> {
    let mut v = vec![0u8; 74];
    v[0] = 0x00; // qualifier 000b, direct access block device
    v[2] = 0x06; // SPC-4
    v[3] = 0x10 | 0x02; // HISUP, response data format 2
    v[4] = (v.len() - 5) as u8;
    v[5] = 0x10; // TPGS = 01b: implicit ALUA
    v[7] = 0x02; // CMDQUE
    put_padded(&mut v[8..16], &lu.config.vendor);
    put_padded(&mut v[16..32], &lu.config.product);
    put_padded(&mut v[32..36], &lu.config.revision);
    for (i, d) in VERSION_DESCRIPTORS.iter().enumerate() {
        let at = 58 + 2 * i;
        v[at..at + 2].copy_from_slice(&d.to_be_bytes());
    }
    v
}

/// Standard INQUIRY data for a LUN with no logical unit behind it:
/// peripheral qualifier 011b, device type 1Fh (SPC-4 §6.6.2).
pub(crate) fn absent_lun_inquiry(cdb: Cdb<'_>) -> CmdResult {
    let alloc = u64::from(cdb.u16(3));
    if cdb.bit(1, 1) {
        return Err(Sense::invalid_cdb(1, Some(1)).into());
    }
    if cdb.bit(1, 0) || cdb.byte(2) != 0 {
        // There are no VPD pages for a LUN that does not exist.
        return Err(Sense::invalid_cdb(2, None).into());
    }
    let mut v = vec![0u8; 36];
    v[0] = 0x7F;
    v[2] = 0x06;
    v[3] = 0x12;
    v[4] = 31;
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

fn put_padded(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, b) in dst.iter_mut().zip(s.bytes()) {
        *d = b;
    }
}

fn vpd_page(code: u8, body: Vec<u8>) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + body.len());
    v.push(0x00);
    v.push(code);
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&body);
    v
}

/// FNV-1a: a stable spread of the serial into the NAA low bits.
fn fnv1a(s: &[u8]) -> u64 {
    s.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The 16-byte NAA IEEE Registered Extended identifier of the LU.
pub(crate) fn naa_id(lu: &LogicalUnit) -> [u8; 16] {
    let hi = (lu.config.naa_id & 0x0FFF_FFFF_FFFF_FFFF) | (0x6 << 60);
    let lo = fnv1a(lu.config.serial.as_bytes());
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b
}

fn designator(out: &mut Vec<u8>, code_set: u8, assoc: u8, dtype: u8, id: &[u8]) {
    out.push(code_set & 0x0F);
    out.push(((assoc & 0x03) << 4) | (dtype & 0x0F));
    out.push(0);
    out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(id.get(..255).unwrap_or(id));
}

/// Device Identification (83h): NAA for the LU, T10 vendor id, and the
/// target port the command came through (relative port, port group, name).
fn device_identification(lu: &LogicalUnit, t: &ScsiTask<'_>) -> Vec<u8> {
    const BINARY: u8 = 1;
    const ASCII: u8 = 2;
    const UTF8: u8 = 3;
    const ASSOC_LU: u8 = 0;
    const ASSOC_PORT: u8 = 1;
    let mut v = Vec::with_capacity(128);
    designator(&mut v, BINARY, ASSOC_LU, 0x3, &naa_id(lu));

    let mut t10 = [b' '; 8].to_vec();
    put_padded(&mut t10, &lu.config.vendor);
    t10.extend_from_slice(lu.config.serial.as_bytes());
    designator(&mut v, ASCII, ASSOC_LU, 0x1, &t10);

    let rtpi = t.nexus.relative_target_port_id.to_be_bytes();
    designator(&mut v, BINARY, ASSOC_PORT, 0x4, &[0, 0, rtpi[0], rtpi[1]]);
    let tpg = crate::alua::group_of(&lu.alua(), t.nexus).to_be_bytes();
    designator(&mut v, BINARY, ASSOC_PORT, 0x5, &[0, 0, tpg[0], tpg[1]]);

    // SCSI name string: null terminated, padded to a multiple of four.
    let mut name = t.nexus.target_port_name.as_bytes().to_vec();
    name.truncate(250);
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    designator(&mut v, UTF8, ASSOC_PORT, 0x8, &name);
    v
}

/// Extended INQUIRY Data (86h).
fn extended_inquiry(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 60];
    b[1] = 0x07; // HEADSUP, ORDSUP, SIMPSUP
    if lu.caps.volatile_cache {
        b[2] = 0x01; // V_SUP
    }
    b[3] = 0x01; // LUICLR: unit attentions are cleared per I_T nexus
    b
}

/// Block Limits (B0h), SBC-3 page length 3Ch.
fn block_limits(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 60];
    let max_xfer = limits::max_transfer_blocks(lu);
    b[1] = limits::MAX_COMPARE_AND_WRITE_BLOCKS;
    // OPTIMAL TRANSFER LENGTH GRANULARITY: one physical block.
    b[2..4].copy_from_slice(&(1u16 << lu.lbppbe()).to_be_bytes());
    b[4..8].copy_from_slice(&max_xfer.to_be_bytes());
    b[8..12].copy_from_slice(&limits::optimal_transfer_blocks(lu).to_be_bytes());
    b[12..16].copy_from_slice(&max_xfer.to_be_bytes()); // max prefetch length
    if lu.thin() {
        b[16..20].copy_from_slice(&limits::MAX_UNMAP_LBA_COUNT.to_be_bytes());
        b[20..24].copy_from_slice(&limits::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        b[24..28].copy_from_slice(&1u32.to_be_bytes()); // optimal unmap granularity
        b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    }
    b[32..40].copy_from_slice(&limits::MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    // WRITE ATOMIC: up to the maximum transfer, no alignment constraint.
    b[40..44].copy_from_slice(&max_xfer.to_be_bytes());
    b[44..48].copy_from_slice(&0u32.to_be_bytes());
    b[48..52].copy_from_slice(&1u32.to_be_bytes());
    b
}

/// Block Device Characteristics (B1h): a non-rotating medium.
fn block_device_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 60];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    // WABEREQ 01b: after SANITIZE BLOCK ERASE, reads of unwritten blocks
    // complete with GOOD (they read as zeros, like any unmapped block).
    b[3] = 0x40;
    b
}

/// Logical Block Provisioning (B2h).
fn logical_block_provisioning(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if lu.thin() {
        // LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read as zeros).
        b[1] = 0x80 | 0x40 | 0x20 | 0x04;
        b[2] = 0x02; // provisioning type: thin
    }
    b
}

#[cfg(test)]
mod tests {
    use crate::sense;
    use crate::testutil::*;
    use crate::{LuConfig, ScsiResponse};

    fn inq(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
        let a = alloc.to_be_bytes();
        [0x12, u8::from(evpd), page, a[0], a[1], 0]
    }

    fn run(cdb: &[u8]) -> ScsiResponse {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        exec(&lu, &n, cdb, &[])
    }

    #[test]
    fn standard_inquiry_fields() {
        let r = run(&inq(false, 0, 260));
        assert_good(&r);
        let d = &r.data_in;
        assert_eq!(d.len(), 74);
        assert_eq!(d[0], 0);
        assert_eq!(d[2], 6);
        assert_eq!(d[3] & 0x0F, 2);
        assert_eq!(usize::from(d[4]), d.len() - 5);
        assert_eq!((d[5] >> 4) & 3, 1, "TPGS implicit");
        assert_ne!(d[7] & 0x02, 0, "CmdQue");
        assert_eq!(&d[8..16], b"IRONSTAR");
        assert_eq!(&d[58..60], &[0x00, 0xA0]);
        assert_eq!(&d[62..64], &[0x04, 0xC0]);
    }

    #[test]
    fn inquiry_truncates_to_allocation_length() {
        assert_eq!(run(&inq(false, 0, 5)).data_in.len(), 5);
        assert_eq!(run(&inq(false, 0, 0)).data_in.len(), 0);
    }

    #[test]
    fn inquiry_cmddt_is_invalid_field() {
        let r = run(&[0x12, 0x02, 0, 0, 255, 0]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((1, true)));
    }

    #[test]
    fn inquiry_page_code_without_evpd_is_invalid_field() {
        let r = run(&inq(false, 0x80, 255));
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((2, true)));
    }

    #[test]
    fn inquiry_unknown_vpd_page_is_invalid_field() {
        assert_check(&run(&inq(true, 0xC7, 255)), sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn supported_vpd_pages_lists_every_page_that_answers() {
        let r = run(&inq(true, 0, 255));
        assert_good(&r);
        let d = &r.data_in;
        assert_eq!(d[1], 0);
        let n = usize::from(d[3]);
        for &p in &d[4..4 + n] {
            assert_good(&run(&inq(true, p, 255)));
        }
        assert!(d[4..].contains(&0xB2));
    }

    #[test]
    fn unit_serial_number_page_carries_serial() {
        let r = run(&inq(true, 0x80, 255));
        assert_eq!(&r.data_in[4..], LuConfig::default().serial.as_bytes());
        assert_eq!(usize::from(r.data_in[3]), r.data_in.len() - 4);
    }

    #[test]
    fn device_identification_has_naa_t10_port_group_and_name() {
        let r = run(&inq(true, 0x83, 1024));
        let d = &r.data_in;
        assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - 4);
        let mut at = 4;
        let mut seen = Vec::new();
        while at + 4 <= d.len() {
            let (cs, assoc, ty, len) = (
                d[at] & 0xF,
                (d[at + 1] >> 4) & 3,
                d[at + 1] & 0xF,
                d[at + 3],
            );
            seen.push((cs, assoc, ty));
            if ty == 3 {
                assert_eq!(d[at + 4] >> 4, 6, "NAA 6");
                assert_eq!(len, 16);
            }
            if ty == 8 {
                assert_eq!(usize::from(len) % 4, 0);
            }
            at += 4 + usize::from(len);
        }
        assert_eq!(at, d.len());
        assert_eq!(
            seen,
            vec![(1, 0, 3), (2, 0, 1), (1, 1, 4), (1, 1, 5), (3, 1, 8)]
        );
    }

    #[test]
    fn block_limits_page_is_sbc3_length_with_unmap_limits() {
        let r = run(&inq(true, 0xB0, 255));
        let d = &r.data_in;
        assert_eq!(d[3], 0x3C);
        assert_eq!(d.len(), 64);
        let max_unmap = u32::from_be_bytes([d[20], d[21], d[22], d[23]]);
        let max_desc = u32::from_be_bytes([d[24], d[25], d[26], d[27]]);
        assert!(max_unmap > 0 && (max_unmap <= 1024 * 1024 || max_unmap == u32::MAX));
        assert!(max_desc > 0 && max_desc <= 1024 * 1024);
        assert_eq!(d[4] & 1, 0, "WSNZ clear");
    }

    #[test]
    fn block_limits_without_thin_provisioning_reports_no_unmap() {
        let cfg = LuConfig {
            thin_provisioning: false,
            ..LuConfig::default()
        };
        let lu = lu_with(cfg, MIB);
        let n = ready_nexus(&lu, 1);
        let d = exec(&lu, &n, &inq(true, 0xB0, 255), &[]).data_in;
        assert_eq!(&d[20..28], &[0; 8]);
        let d = exec(&lu, &n, &inq(true, 0xB2, 255), &[]).data_in;
        assert_eq!(d[5], 0);
    }

    #[test]
    fn block_device_characteristics_is_non_rotating() {
        let d = run(&inq(true, 0xB1, 255)).data_in;
        assert_eq!(&d[4..6], &[0, 1]);
        assert_eq!(d[3], 0x3C);
    }

    #[test]
    fn block_limits_granularity_is_one_physical_block() {
        let d = run(&inq(true, 0xB0, 255)).data_in;
        assert_eq!(&d[6..8], &[0, 8]);
    }

    #[test]
    fn block_device_characteristics_says_reads_after_block_erase_succeed() {
        let d = run(&inq(true, 0xB1, 255)).data_in;
        assert_eq!(d[7] >> 6, 1, "WABEREQ");
        assert_eq!((d[7] >> 4) & 3, 0, "WACEREQ: no crypto erase");
    }

    #[test]
    fn logical_block_provisioning_reports_thin_with_lbprz() {
        let d = run(&inq(true, 0xB2, 255)).data_in;
        assert_eq!(d[5] & 0xE4, 0xE4);
        assert_eq!(d[6] & 7, 2);
    }

    #[test]
    fn extended_inquiry_page_length() {
        let d = run(&inq(true, 0x86, 255)).data_in;
        assert_eq!(d[3], 0x3C);
    }
}
