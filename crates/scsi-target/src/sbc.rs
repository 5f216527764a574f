//! Block commands (SBC-3/4): READ CAPACITY, READ, WRITE, WRITE AND VERIFY,
//! VERIFY, PRE-FETCH, SYNCHRONIZE CACHE, WRITE SAME, UNMAP, COMPARE AND
//! WRITE, ORWRITE, WRITE ATOMIC, GET LBA STATUS, READ DEFECT DATA (SANITIZE
//! is in `sanitize`).
//!
//! Every range is checked against the capacity before the backend is
//! touched. Writes take `write_order` for reading; COMPARE AND WRITE,
//! ORWRITE and WRITE ATOMIC take it for writing, which makes them atomic
//! against every other write.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use crate::backend::CompareAndWrite;
use crate::cdb::{be_at, op, Cdb};
use crate::lu::LogicalUnit;
use crate::sense::{self, Sense};
use crate::{alloc_trunc, CmdResult, Fail, ScsiResponse, ScsiTask};

/// The limits we report in the Block Limits VPD page and enforce here.
pub(crate) mod limits {
    use crate::lu::LogicalUnit;

    /// Largest READ/WRITE: bounds the buffer one command can make us
    /// allocate. 32 MiB is 65536 blocks of 512 bytes, which initiators
    /// (libiscsi's WriteSame16.Unmap among them) send without reading
    /// the Block Limits page; the iSCSI port accepts writes up to 64 MiB.
    pub const MAX_TRANSFER_BYTES: u64 = 32 << 20;
    /// WRITE SAME and SANITIZE write their pattern in pieces of this size.
    pub const PATTERN_PIECE_BYTES: u64 = 8 << 20;
    pub const OPTIMAL_TRANSFER_BYTES: u64 = 128 << 10;
    pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;
    pub const MAX_UNMAP_LBA_COUNT: u32 = 0xFFFF_FFFF;
    pub const MAX_UNMAP_DESCRIPTORS: u32 = 1024;
    /// 0: no limit reported (WRITE SAME writes in bounded pieces).
    pub const MAX_WRITE_SAME_BLOCKS: u64 = 0;

    pub fn max_transfer_blocks(lu: &LogicalUnit) -> u32 {
        u32::try_from(MAX_TRANSFER_BYTES >> lu.block_shift).unwrap_or(u32::MAX)
    }

    pub fn optimal_transfer_blocks(lu: &LogicalUnit) -> u32 {
        u32::try_from(OPTIMAL_TRANSFER_BYTES >> lu.block_shift)
            .unwrap_or(1)
            .max(1)
    }
}

/// LBA, block count and where the count sits in the CDB (for field pointers).
#[derive(Clone, Copy, Debug)]
struct Range {
    lba: u64,
    blocks: u64,
    len_at: u16,
}

/// Decodes LBA and TRANSFER LENGTH of the READ/WRITE/VERIFY families.
fn rw_range(cdb: Cdb<'_>) -> Range {
    match cdb.opcode() {
        op::READ_6 | op::WRITE_6 => {
            let n = u64::from(cdb.byte(4));
            Range {
                lba: u64::from(cdb.u24(1) & 0x1F_FFFF),
                blocks: if n == 0 { 256 } else { n },
                len_at: 4,
            }
        }
        op::READ_12 | op::WRITE_12 | op::WRITE_VERIFY_12 | op::VERIFY_12 => Range {
            lba: u64::from(cdb.u32(2)),
            blocks: u64::from(cdb.u32(6)),
            len_at: 6,
        },
        op::READ_16
        | op::WRITE_16
        | op::WRITE_VERIFY_16
        | op::VERIFY_16
        | op::ORWRITE_16
        | op::PRE_FETCH_16
        | op::SYNCHRONIZE_CACHE_16 => Range {
            lba: cdb.u64(2),
            blocks: u64::from(cdb.u32(10)),
            len_at: 10,
        },
        op::WRITE_ATOMIC_16 => Range {
            lba: cdb.u64(2),
            blocks: u64::from(cdb.u16(12)),
            len_at: 12,
        },
        // The 10-byte CDBs.
        _ => Range {
            lba: u64::from(cdb.u32(2)),
            blocks: u64::from(cdb.u16(7)),
            len_at: 7,
        },
    }
}

/// The PROTECT field (bits 7-5 of byte 1) must be zero: we keep no
/// protection information. The 6-byte CDBs have no such field.
fn check_no_protection(cdb: Cdb<'_>) -> Result<(), Fail> {
    if cdb.opcode() >> 5 != 0 && cdb.byte(1) >> 5 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)).into());
    }
    Ok(())
}

fn check_transfer_len(lu: &LogicalUnit, r: Range) -> Result<(), Fail> {
    if r.blocks > u64::from(limits::max_transfer_blocks(lu)) {
        return Err(Sense::invalid_cdb(r.len_at, None).into());
    }
    Ok(())
}

fn read_error(e: std::io::Error) -> Fail {
    tracing::warn!(error = %e, "backend read failed");
    sense::UNRECOVERED_READ_ERROR.into()
}

fn write_error(e: std::io::Error) -> Fail {
    tracing::warn!(error = %e, "backend write failed");
    sense::WRITE_ERROR.into()
}

/// Reads `blocks` blocks at `lba` into one freshly allocated buffer: the
/// only copy on the read path is the backend's.
fn read_blocks(lu: &LogicalUnit, lba: u64, blocks: u64) -> Result<BytesMut, Fail> {
    let len = lu
        .bytes_of(blocks)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or(Fail::from(sense::LBA_OUT_OF_RANGE))?;
    let mut buf = BytesMut::zeroed(len);
    lu.backend
        .read_at(lu.offset_of(lba), &mut buf)
        .map_err(read_error)?;
    Ok(buf)
}

pub(crate) fn read(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    check_no_protection(cdb)?;
    let r = rw_range(cdb);
    lu.check_range(r.lba, r.blocks)?;
    check_transfer_len(lu, r)?;
    if r.blocks == 0 {
        return Ok(ScsiResponse::good_empty());
    }
    let len = lu
        .bytes_of(r.blocks)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or(Fail::from(sense::LBA_OUT_OF_RANGE))?;
    // A memory LU hands out views of its own pages: no copy here.
    let mut rest = crate::MoreData::new();
    let data = lu
        .backend
        .read_pieces(lu.offset_of(r.lba), len, &mut rest)
        .map_err(read_error)?;
    let mut response = ScsiResponse::good(data);
    response.data_in_more = rest;
    if response.data_in_len() != len {
        return Err(read_error(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        )));
    }
    let c = &lu.counters;
    c.read_commands.fetch_add(1, Ordering::Relaxed);
    c.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
    Ok(response)
}

/// Writes `data` (whole blocks) at `lba`, then flushes if FUA was asked or
/// the write cache is off.
fn write_blocks(lu: &LogicalUnit, lba: u64, data: &[u8], fua: bool) -> Result<(), Fail> {
    write_blocks_from(lu, lba, data, None, fua)
}

/// [`write_blocks`]; `buffer`, when given, is `data` as a buffer of its own
/// (see [`ScsiTask::data_out_buffer`]) that the backend may keep.
fn write_blocks_from(
    lu: &LogicalUnit,
    lba: u64,
    data: &[u8],
    buffer: Option<&Bytes>,
    fua: bool,
) -> Result<(), Fail> {
    if data.is_empty() {
        return Ok(());
    }
    let offset = lu.offset_of(lba);
    match buffer {
        Some(b) => lu.backend.write_buffer(offset, b),
        None => lu.backend.write_at(offset, data),
    }
    .map_err(write_error)?;
    let c = &lu.counters;
    c.write_commands.fetch_add(1, Ordering::Relaxed);
    c.write_bytes
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    if fua || !lu.wce.load(Ordering::Relaxed) {
        lu.flush_backend()?;
    }
    Ok(())
}

/// The whole blocks of data-out the initiator actually sent, up to `blocks`:
/// when Expected Data Transfer Length is shorter than the CDB asks, only
/// what arrived is written (libiscsi's residual tests expect GOOD).
fn whole_blocks<'a>(lu: &LogicalUnit, data: &'a [u8], blocks: u64) -> &'a [u8] {
    let bs = lu.config.block_size as usize;
    let want = lu
        .bytes_of(blocks)
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(usize::MAX);
    let have = data.len() / bs * bs;
    data.get(..want.min(have)).unwrap_or(&[])
}

/// WRITE 6/10/12/16, WRITE AND VERIFY 10/12/16 and WRITE ATOMIC 16.
pub(crate) fn write(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    check_no_protection(cdb)?;
    lu.check_writable()?;
    let r = rw_range(cdb);
    lu.check_range(r.lba, r.blocks)?;
    check_transfer_len(lu, r)?;
    let opcode = cdb.opcode();
    // WRITE AND VERIFY has BYTCHK where the others have FUA; its verify is
    // of what we just wrote, so it always flushes.
    let fua = matches!(
        opcode,
        op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16
    ) || cdb.bit(1, 3);
    let data = whole_blocks(lu, t.data_out, r.blocks);
    // The data-out's own buffer, when all of it is what gets written.
    let buffer = t
        .data_out_buffer
        .filter(|b| b.len() == data.len() && b.as_ptr() == data.as_ptr());
    if opcode == op::WRITE_ATOMIC_16 {
        let _x = lu.write_order.write().unwrap_or_else(|e| e.into_inner());
        write_blocks_from(lu, r.lba, data, buffer, fua)?;
    } else {
        let _s = lu.write_order.read().unwrap_or_else(|e| e.into_inner());
        write_blocks_from(lu, r.lba, data, buffer, fua)?;
    }
    Ok(ScsiResponse::good_empty())
}

/// The offset of the first differing byte of two equal-length slices.
fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn miscompare(offset: usize) -> Fail {
    Sense::new(sense::MISCOMPARE_DURING_VERIFY)
        .with_information(offset as u64)
        .into()
}

/// VERIFY 10/12/16: BYTCHK 00b checks the range is readable, 01b compares
/// the data-out with the medium, 11b compares one block with every block.
pub(crate) fn verify(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    check_no_protection(cdb)?;
    let r = rw_range(cdb);
    let bytchk = (cdb.byte(1) >> 1) & 0x03;
    if bytchk == 0x02 {
        return Err(Sense::invalid_cdb(1, Some(2)).into());
    }
    lu.check_range(r.lba, r.blocks)?;
    check_transfer_len(lu, r)?;
    if r.blocks == 0 || bytchk == 0 {
        return Ok(ScsiResponse::good_empty());
    }
    let medium = read_blocks(lu, r.lba, r.blocks)?;
    let bs = lu.config.block_size as usize;
    if bytchk == 0x03 {
        let Some(pattern) = t.data_out.get(..bs) else {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        };
        for (i, block) in medium.chunks_exact(bs).enumerate() {
            if let Some(off) = first_mismatch(block, pattern) {
                return Err(miscompare(i * bs + off));
            }
        }
    } else {
        let n = medium.len().min(t.data_out.len());
        let (m, d) = (&medium[..n], &t.data_out[..n]);
        if let Some(off) = first_mismatch(m, d) {
            return Err(miscompare(off));
        }
    }
    Ok(ScsiResponse::good_empty())
}

/// PRE-FETCH 10/16: the data is as close as it gets already; GOOD says the
/// blocks were not all promised to stay in cache, which is honest.
pub(crate) fn pre_fetch(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let r = rw_range(cdb);
    lu.check_range(r.lba, r.blocks)?;
    Ok(ScsiResponse::good_empty())
}

/// SYNCHRONIZE CACHE 10/16: the backend flushes everything, whatever the range.
pub(crate) fn synchronize_cache(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let r = rw_range(cdb);
    lu.check_range(r.lba, r.blocks)?;
    lu.flush_backend()?;
    Ok(ScsiResponse::good_empty())
}

pub(crate) fn read_capacity_10(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let pmi = cdb.bit(8, 0);
    if !pmi && cdb.u32(2) != 0 {
        return Err(Sense::invalid_cdb(2, None).into());
    }
    let last = lu.num_blocks().saturating_sub(1);
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(&lu.config.block_size.to_be_bytes());
    Ok(ScsiResponse::good(Bytes::from(v)))
}

pub(crate) fn read_capacity_16(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let alloc = u64::from(cdb.u32(10));
    let mut v = vec![0u8; 32];
    v[..8].copy_from_slice(&lu.num_blocks().saturating_sub(1).to_be_bytes());
    v[8..12].copy_from_slice(&lu.config.block_size.to_be_bytes());
    // Physical blocks start at LBA 0 (LOWEST ALIGNED LBA stays zero).
    v[13] = lu.lbppbe() & 0x0F;
    if lu.thin() {
        v[14] = 0x80 | 0x40; // LBPME, LBPRZ
    }
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

/// GET LBA STATUS: mapped/deallocated runs from the backend, or "mapped"
/// for the rest of the medium when the backend cannot tell.
pub(crate) fn get_lba_status(lu: &LogicalUnit, cdb: Cdb<'_>) -> CmdResult {
    let lba = cdb.u64(2);
    let alloc = u64::from(cdb.u32(10));
    let blocks = lu.num_blocks();
    if lba >= blocks {
        return Err(sense::LBA_OUT_OF_RANGE.into());
    }
    if alloc < 24 {
        // Room for no descriptor: still answer the header.
        let mut v = vec![0u8; 8];
        v[..4].copy_from_slice(&4u32.to_be_bytes());
        return Ok(ScsiResponse::good(alloc_trunc(v, alloc)));
    }
    let max_desc = ((alloc - 8) / 16).min(64);
    let bs = u64::from(lu.config.block_size);
    let mut v = Vec::with_capacity(8 + 16 * max_desc as usize);
    v.extend_from_slice(&[0u8; 8]);
    let mut at = lba;
    let mut n = 0;
    while at < blocks && n < max_desc {
        let remaining = (blocks - at).min(u64::from(u32::MAX));
        let (mapped, run) = match lu.backend.map_status(at * bs, remaining * bs) {
            Some((m, bytes)) => (m, (bytes / bs).max(1).min(remaining)),
            None => (true, remaining),
        };
        v.extend_from_slice(&at.to_be_bytes());
        v.extend_from_slice(&(run as u32).to_be_bytes());
        v.push(if mapped { 0 } else { 1 });
        v.extend_from_slice(&[0, 0, 0]);
        at += run;
        n += 1;
    }
    let plen = (v.len() - 4) as u32;
    v[..4].copy_from_slice(&plen.to_be_bytes());
    Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
}

/// Writes the one-block `pattern` to `[lba, lba+blocks)` in bounded pieces.
fn write_pattern(lu: &LogicalUnit, lba: u64, blocks: u64, pattern: &[u8]) -> Result<(), Fail> {
    let bs = lu.config.block_size as usize;
    // A store that repeats the pattern itself (RBD's writesame) saves
    // sending it over and over.
    if let Some(len) = lu.bytes_of(blocks) {
        match lu.backend.write_same(lu.offset_of(lba), len, pattern) {
            Ok(()) => {
                lu.counters.write_commands.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
            Err(e) => return Err(write_error(e)),
        }
    }
    let per = (limits::PATTERN_PIECE_BYTES as usize / bs).max(1) as u64;
    let piece = blocks.min(per) as usize;
    let buf: Vec<u8> = pattern.iter().copied().cycle().take(piece * bs).collect();
    let mut done = 0u64;
    while done < blocks {
        let n = (blocks - done).min(per) as usize;
        lu.backend
            .write_at(lu.offset_of(lba + done), &buf[..n * bs])
            .map_err(write_error)?;
        done += n as u64;
    }
    lu.counters.write_commands.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn unmap_blocks(lu: &LogicalUnit, lba: u64, blocks: u64) -> Result<(), Fail> {
    let len = lu
        .bytes_of(blocks)
        .ok_or(Fail::from(sense::LBA_OUT_OF_RANGE))?;
    lu.backend
        .unmap(lu.offset_of(lba), len)
        .map_err(write_error)
}

/// WRITE SAME 10/16, with UNMAP (and NDOB on 16). NUMBER OF LOGICAL BLOCKS
/// zero means "to the end of the medium" (WSNZ is clear in our B0h page).
pub(crate) fn write_same(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    let sixteen = cdb.opcode() == op::WRITE_SAME_16;
    check_no_protection(cdb)?;
    if cdb.bit(1, 4) {
        // ANCHOR: we do not support anchored blocks (ANC_SUP = 0).
        return Err(Sense::invalid_cdb(1, Some(4)).into());
    }
    let unmap = cdb.bit(1, 3);
    if unmap && !lu.thin() {
        // LBPWS/LBPWS10 are clear when the LU is fully provisioned.
        return Err(Sense::invalid_cdb(1, Some(3)).into());
    }
    let ndob = sixteen && cdb.bit(1, 0);
    let (lba, count) = if sixteen {
        (cdb.u64(2), u64::from(cdb.u32(10)))
    } else {
        (u64::from(cdb.u32(2)), u64::from(cdb.u16(7)))
    };
    lu.check_writable()?;
    let blocks = if count == 0 {
        lu.num_blocks()
            .checked_sub(lba)
            .ok_or(Fail::from(sense::LBA_OUT_OF_RANGE))?
    } else {
        count
    };
    lu.check_range(lba, blocks)?;
    if limits::MAX_WRITE_SAME_BLOCKS != 0 && blocks > limits::MAX_WRITE_SAME_BLOCKS {
        return Err(Sense::invalid_cdb(if sixteen { 10 } else { 7 }, None).into());
    }
    let bs = lu.config.block_size as usize;
    let zeros;
    let pattern: &[u8] = if ndob {
        zeros = vec![0u8; bs];
        &zeros
    } else {
        if t.data_out.len() != bs {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        t.data_out
    };
    if blocks == 0 {
        return Ok(ScsiResponse::good_empty());
    }
    let _s = lu.write_order.read().unwrap_or_else(|e| e.into_inner());
    // With UNMAP the initiator asks for deallocation and the data is only
    // what a device that cannot unmap would write; unmapped blocks then
    // read as the LBPRZ pattern (zeros), whatever the data-out held, as
    // LIO does and libiscsi's WriteSame10.UnmapUntilEnd expects.
    if unmap {
        unmap_blocks(lu, lba, blocks)?;
    } else {
        write_pattern(lu, lba, blocks, pattern)?;
    }
    if !lu.wce.load(Ordering::Relaxed) {
        lu.flush_backend()?;
    }
    Ok(ScsiResponse::good_empty())
}

/// UNMAP: parameter list of block descriptors, all checked before any is applied.
pub(crate) fn unmap(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    if !lu.thin() {
        // LBPU is clear: a fully provisioned LU has no UNMAP.
        return Err(sense::INVALID_COMMAND_OPERATION_CODE.into());
    }
    if cdb.bit(1, 0) {
        return Err(Sense::invalid_cdb(1, Some(0)).into());
    }
    let plen = usize::from(cdb.u16(7));
    if plen == 0 {
        return Ok(ScsiResponse::good_empty());
    }
    lu.check_writable()?;
    if plen < 8 {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let data = t.data_out.get(..plen).unwrap_or(t.data_out);
    if data.len() < 8 {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let declared = be_at(data, 2, 2) as usize;
    if declared / 16 > limits::MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_param(2, None).into());
    }
    let descs = data.get(8..).unwrap_or(&[]);
    let bdl = declared.min(descs.len()) / 16 * 16;
    let n = bdl / 16;
    let mut ranges = Vec::with_capacity(n);
    let mut total: u64 = 0;
    for d in descs[..bdl].chunks_exact(16) {
        let lba = be_at(d, 0, 8);
        let count = be_at(d, 8, 4);
        lu.check_range(lba, count)?;
        total = total.saturating_add(count);
        ranges.push((lba, count));
    }
    if total > u64::from(limits::MAX_UNMAP_LBA_COUNT) {
        return Err(Sense::invalid_param(8 + 8, None).into());
    }
    let _s = lu.write_order.read().unwrap_or_else(|e| e.into_inner());
    for (lba, count) in ranges {
        if count > 0 {
            unmap_blocks(lu, lba, count)?;
        }
    }
    Ok(ScsiResponse::good_empty())
}

/// COMPARE AND WRITE: compare NUMBER OF LOGICAL BLOCKS with the first half
/// of the data-out, and only if equal write the second half, all under the
/// exclusive write lock.
pub(crate) fn compare_and_write(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    check_no_protection(cdb)?;
    lu.check_writable()?;
    let lba = cdb.u64(2);
    let blocks = u64::from(cdb.byte(13));
    let fua = cdb.bit(1, 3);
    if blocks > u64::from(limits::MAX_COMPARE_AND_WRITE_BLOCKS) {
        return Err(Sense::invalid_cdb(13, None).into());
    }
    lu.check_range(lba, blocks)?;
    if blocks == 0 {
        // Zero blocks is no error, but data-out then means the CDB and the
        // transfer disagree, e.g. an initiator that put 256 in this 8-bit
        // field: refuse rather than ignore the data.
        if !t.data_out.is_empty() {
            return Err(Sense::invalid_cdb(13, None).into());
        }
        return Ok(ScsiResponse::good_empty());
    }
    let half = lu
        .bytes_of(blocks)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or(Fail::from(sense::LBA_OUT_OF_RANGE))?;
    if t.data_out.len() != 2 * half {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let (verify, write) = t.data_out.split_at(half);
    let _x = lu.write_order.write().unwrap_or_else(|e| e.into_inner());
    // A shared store (RBD) compares and writes in one step, so the
    // operation is atomic against every gateway, not only this process.
    match lu
        .backend
        .compare_and_write(lu.offset_of(lba), verify, write)
    {
        Ok(CompareAndWrite::Written) => {
            let c = &lu.counters;
            c.write_commands.fetch_add(1, Ordering::Relaxed);
            c.write_bytes
                .fetch_add(write.len() as u64, Ordering::Relaxed);
            if fua || !lu.wce.load(Ordering::Relaxed) {
                lu.flush_backend()?;
            }
            return Ok(ScsiResponse::good_empty());
        }
        Ok(CompareAndWrite::Miscompare(off)) => {
            return Err(miscompare(usize::try_from(off).unwrap_or(0)));
        }
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
        Err(e) => return Err(write_error(e)),
    }
    let medium = read_blocks(lu, lba, blocks)?;
    if let Some(off) = first_mismatch(&medium, verify) {
        return Err(miscompare(off));
    }
    write_blocks(lu, lba, write, fua)?;
    Ok(ScsiResponse::good_empty())
}

/// ORWRITE 16: medium |= data-out, atomically against other writes.
pub(crate) fn orwrite(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    check_no_protection(cdb)?;
    lu.check_writable()?;
    let r = rw_range(cdb);
    lu.check_range(r.lba, r.blocks)?;
    check_transfer_len(lu, r)?;
    let data = whole_blocks(lu, t.data_out, r.blocks);
    if data.is_empty() {
        return Ok(ScsiResponse::good_empty());
    }
    let n = (data.len() / lu.config.block_size as usize) as u64;
    let _x = lu.write_order.write().unwrap_or_else(|e| e.into_inner());
    let mut medium = read_blocks(lu, r.lba, n)?;
    for (m, d) in medium.iter_mut().zip(data) {
        *m |= *d;
    }
    write_blocks(lu, r.lba, &medium, cdb.bit(1, 3))?;
    Ok(ScsiResponse::good_empty())
}

/// READ DEFECT DATA 10/12: an empty list in the format asked for.
pub(crate) fn read_defect_data(cdb: Cdb<'_>) -> CmdResult {
    if cdb.opcode() == op::READ_DEFECT_DATA_10 {
        let alloc = u64::from(cdb.u16(7));
        let v = vec![0, cdb.byte(2) & 0x1F, 0, 0];
        Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
    } else {
        let alloc = u64::from(cdb.u32(6));
        let v = vec![0, cdb.byte(1) & 0x1F, 0, 0, 0, 0, 0, 0];
        Ok(ScsiResponse::good(alloc_trunc(v, alloc)))
    }
}

#[cfg(test)]
mod tests {
    use super::limits;
    use crate::sense;
    use crate::testutil::*;
    use crate::{status, LuConfig};

    const BS: usize = 512;
    const BLOCKS: u64 = MIB / 512;

    fn setup() -> (std::sync::Arc<crate::LogicalUnit>, crate::Nexus) {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        (lu, n)
    }

    fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
        (0..blocks * BS)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed)
            .collect()
    }

    #[test]
    fn read_capacity_10_reports_last_lba_and_block_size() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_good(&r);
        assert_eq!(&r.data_in[..4], &((BLOCKS - 1) as u32).to_be_bytes());
        assert_eq!(&r.data_in[4..8], &512u32.to_be_bytes());
    }

    #[test]
    fn read_capacity_10_lba_without_pmi_is_invalid_field() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn read_capacity_16_reports_lbpme_and_lbprz_when_thin() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &cdb16(0x9E, 0, 32).map_with_sa(0x10), &[]);
        assert_good(&r);
        assert_eq!(r.data_in.len(), 32);
        assert_eq!(&r.data_in[..8], &(BLOCKS - 1).to_be_bytes());
        assert_eq!(r.data_in[14] & 0xC0, 0xC0);
    }

    #[test]
    fn read_capacity_16_reports_4096_byte_physical_blocks() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &cdb16(0x9E, 0, 32).map_with_sa(0x10), &[]);
        assert_eq!(r.data_in[13] & 0x0F, 3, "LBPPBE: 8 x 512 = 4096");
        assert_eq!(r.data_in[14] & 0x3F, 0, "lowest aligned LBA");
        assert_eq!(r.data_in[15], 0);
        let cfg = LuConfig {
            block_size: 4096,
            ..LuConfig::default()
        };
        let big = lu_with(cfg, MIB);
        let bn = ready_nexus(&big, 1);
        let r = exec(&big, &bn, &cdb16(0x9E, 0, 32).map_with_sa(0x10), &[]);
        assert_eq!(r.data_in[13] & 0x0F, 0);
    }

    /// A memory store whose physical blocks are 512 bytes, as an RBD image's are.
    struct SectorStore(crate::MemoryBackend);

    impl crate::Backend for SectorStore {
        fn size_bytes(&self) -> u64 {
            self.0.size_bytes()
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
            self.0.read_at(o, b)
        }
        fn write_at(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
            self.0.write_at(o, d)
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn unmap(&self, o: u64, l: u64) -> std::io::Result<()> {
            self.0.unmap(o, l)
        }
        fn caps(&self) -> crate::BackendCaps {
            self.0.caps()
        }
        fn physical_block_size(&self) -> u32 {
            512
        }
    }

    #[test]
    fn a_store_with_512_byte_physical_blocks_reports_one_block_per_physical_block() {
        let store = SectorStore(crate::MemoryBackend::new(MIB));
        let lu = crate::LogicalUnit::new(LuConfig::default(), Box::new(store)).unwrap();
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &cdb16(0x9E, 0, 32).map_with_sa(0x10), &[]);
        assert_eq!(r.data_in[13] & 0x0F, 0, "LBPPBE");
        let d = exec(&lu, &n, &[0x12, 1, 0xB0, 0, 255, 0], &[]).data_in;
        assert_eq!(&d[6..8], &[0, 1], "optimal transfer length granularity");
        assert_eq!(&d[28..32], &[0, 0, 0, 1], "optimal unmap granularity");
    }

    #[test]
    fn read_capacity_16_truncates_to_allocation_length() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &cdb16(0x9E, 0, 12).map_with_sa(0x10), &[]);
        assert_eq!(r.data_in.len(), 12);
    }

    trait WithSa {
        fn map_with_sa(self, sa: u8) -> Self;
    }
    impl WithSa for [u8; 16] {
        fn map_with_sa(mut self, sa: u8) -> Self {
            self[1] = sa;
            self
        }
    }

    #[test]
    fn write_then_read_round_trips_for_every_cdb_size() {
        let (lu, n) = setup();
        let data = pattern(2, 1);
        assert_good(&exec(&lu, &n, &[0x0A, 0, 0, 10, 2, 0], &data));
        assert_eq!(
            &exec(&lu, &n, &[0x08, 0, 0, 10, 2, 0], &[]).data_in[..],
            &data[..]
        );
        let data = pattern(3, 2);
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 20, 3), &data));
        assert_eq!(
            &exec(&lu, &n, &cdb10(0x28, 20, 3), &[]).data_in[..],
            &data[..]
        );
        let data = pattern(1, 3);
        assert_good(&exec(&lu, &n, &cdb12(0xAA, 30, 1), &data));
        assert_eq!(
            &exec(&lu, &n, &cdb12(0xA8, 30, 1), &[]).data_in[..],
            &data[..]
        );
        let data = pattern(4, 4);
        assert_good(&exec(&lu, &n, &cdb16(0x8A, 40, 4), &data));
        assert_eq!(
            &exec(&lu, &n, &cdb16(0x88, 40, 4), &[]).data_in[..],
            &data[..]
        );
        let s = lu.stats();
        assert_eq!(s.write_commands, 4);
        assert_eq!(s.read_bytes, 10 * 512);
    }

    #[test]
    fn read6_zero_length_means_256_blocks() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &[0x08, 0, 0, 0, 0, 0], &[]);
        assert_eq!(r.data_in.len(), 256 * BS);
    }

    #[test]
    fn zero_length_read_and_write_are_no_ops() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &cdb10(0x28, 0, 0), &[]);
        assert_good(&r);
        assert!(r.data_in.is_empty());
        assert_good(&exec(&lu, &n, &cdb16(0x8A, BLOCKS, 0), &[]));
    }

    #[test]
    fn read_beyond_end_is_lba_out_of_range() {
        let (lu, n) = setup();
        assert_check(
            &exec(&lu, &n, &cdb10(0x28, BLOCKS as u32, 1), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
        assert_check(
            &exec(&lu, &n, &cdb10(0x28, BLOCKS as u32 - 1, 2), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
        assert_check(
            &exec(&lu, &n, &cdb16(0x88, u64::MAX, 1), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
        assert_check(
            &exec(&lu, &n, &cdb10(0x28, BLOCKS as u32 + 1, 0), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
        assert_good(&exec(&lu, &n, &cdb10(0x28, BLOCKS as u32, 0), &[]));
    }

    #[test]
    fn write_beyond_end_is_lba_out_of_range() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &cdb16(0x8A, BLOCKS - 1, 2), &pattern(2, 0));
        assert_check(&r, sense::LBA_OUT_OF_RANGE);
    }

    #[test]
    fn rdprotect_and_wrprotect_are_invalid_field() {
        let (lu, n) = setup();
        let mut c = cdb10(0x28, 0, 1);
        c[1] = 0x20;
        let r = exec(&lu, &n, &c, &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((1, true)));
        let mut c = cdb16(0x8A, 0, 1);
        c[1] = 0xE0;
        assert_check(
            &exec(&lu, &n, &c, &pattern(1, 0)),
            sense::INVALID_FIELD_IN_CDB,
        );
    }

    #[test]
    fn dpo_and_fua_are_accepted() {
        let (lu, n) = setup();
        let mut c = cdb10(0x2A, 0, 1);
        c[1] = 0x18;
        assert_good(&exec(&lu, &n, &c, &pattern(1, 0)));
        let mut c = cdb10(0x28, 0, 1);
        c[1] = 0x18;
        assert_good(&exec(&lu, &n, &c, &[]));
    }

    #[test]
    fn max_transfer_admits_65536_blocks_of_512_bytes() {
        let big = lu_with(LuConfig::default(), 64 * MIB);
        let bn = ready_nexus(&big, 1);
        assert_eq!(limits::max_transfer_blocks(&big), 65536);
        let r = exec(&big, &bn, &cdb16(0x88, 0, 65536), &[]);
        assert_good(&r);
        assert_eq!(r.data_in.len(), 32 * MIB as usize);
    }

    #[test]
    fn transfer_longer_than_block_limits_is_invalid_field() {
        let (lu, n) = setup();
        let too_many = limits::max_transfer_blocks(&lu) + 1;
        let r = exec(&lu, &n, &cdb12(0xA8, 0, too_many), &[]);
        // The LU is smaller than the limit, so the range check fires first.
        assert_eq!(r.status, status::CHECK_CONDITION);
        let big = lu_with(LuConfig::default(), 64 * MIB);
        let bn = ready_nexus(&big, 1);
        let r = exec(&big, &bn, &cdb12(0xA8, 0, too_many), &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((6, true)));
    }

    #[test]
    fn write_with_short_data_out_writes_only_whole_blocks_sent() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 2), &[b'a'; 2 * BS]));
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 2), &[b'b'; BS]));
        let d = exec(&lu, &n, &cdb10(0x28, 0, 2), &[]).data_in;
        assert!(d[..BS].iter().all(|&b| b == b'b'));
        assert!(d[BS..].iter().all(|&b| b == b'a'));
        // Less than one block: nothing is written, still GOOD.
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 1), &[b'c'; 200]));
        assert_eq!(exec(&lu, &n, &cdb10(0x28, 0, 1), &[]).data_in[0], b'b');
    }

    #[test]
    fn write_with_long_data_out_writes_only_cdb_length() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 2), &[b'a'; 2 * BS]));
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 1), &[b'b'; 2 * BS]));
        let d = exec(&lu, &n, &cdb10(0x28, 0, 2), &[]).data_in;
        assert!(d[BS..].iter().all(|&b| b == b'a'));
    }

    #[test]
    fn write_to_read_only_lu_is_write_protected() {
        let cfg = LuConfig {
            read_only: true,
            ..LuConfig::default()
        };
        let lu = lu_with(cfg, MIB);
        let n = ready_nexus(&lu, 1);
        let data = pattern(1, 0);
        for c in [
            &[0x0A, 0, 0, 0, 1, 0][..],
            &cdb10(0x2A, 0, 1)[..],
            &cdb12(0xAA, 0, 1)[..],
            &cdb16(0x8A, 0, 1)[..],
            &cdb10(0x2E, 0, 1)[..],
            &cdb10(0x41, 0, 1)[..],
        ] {
            assert_check(&exec(&lu, &n, c, &data), sense::WRITE_PROTECTED);
        }
        assert_good(&exec(&lu, &n, &cdb10(0x28, 0, 1), &[]));
    }

    #[test]
    fn write_and_verify_writes() {
        let (lu, n) = setup();
        let data = pattern(2, 9);
        assert_good(&exec(&lu, &n, &cdb16(0x8E, 5, 2), &data));
        assert_eq!(
            &exec(&lu, &n, &cdb10(0x28, 5, 2), &[]).data_in[..],
            &data[..]
        );
    }

    #[test]
    fn verify_bytchk_zero_checks_range_only() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2F, 0, 8), &[]));
        assert_check(
            &exec(&lu, &n, &cdb10(0x2F, BLOCKS as u32, 1), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
    }

    #[test]
    fn verify_bytchk_one_compares_and_reports_offset_of_miscompare() {
        let (lu, n) = setup();
        let data = pattern(2, 5);
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 7, 2), &data));
        let mut c = cdb12(0xAF, 7, 2);
        c[1] = 0x02;
        assert_good(&exec(&lu, &n, &c, &data));
        let mut bad = data.clone();
        bad[700] ^= 0xFF;
        let r = exec(&lu, &n, &c, &bad);
        assert_check(&r, sense::MISCOMPARE_DURING_VERIFY);
        assert_eq!(information(&r), Some(700));
    }

    #[test]
    fn verify_bytchk_three_compares_one_block_against_all() {
        let (lu, n) = setup();
        let blk = pattern(1, 3);
        let mut two = blk.clone();
        two.extend_from_slice(&blk);
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 2), &two));
        let mut c = cdb16(0x8F, 0, 2);
        c[1] = 0x06;
        assert_good(&exec(&lu, &n, &c, &blk));
        let mut c = cdb16(0x8F, 0, 3);
        c[1] = 0x06;
        let r = exec(&lu, &n, &c, &blk);
        assert_check(&r, sense::MISCOMPARE_DURING_VERIFY);
    }

    #[test]
    fn verify_vrprotect_and_bytchk_two_are_invalid_field() {
        let (lu, n) = setup();
        let mut c = cdb10(0x2F, 0, 1);
        c[1] = 0x20;
        assert_check(&exec(&lu, &n, &c, &[]), sense::INVALID_FIELD_IN_CDB);
        c[1] = 0x04;
        assert_check(&exec(&lu, &n, &c, &[]), sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn pre_fetch_checks_range() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x34, 0, 10), &[]));
        assert_good(&exec(&lu, &n, &cdb16(0x90, 0, 0), &[]));
        assert_check(
            &exec(&lu, &n, &cdb16(0x90, BLOCKS, 1), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
    }

    #[test]
    fn synchronize_cache_flushes_and_checks_range() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x35, 0, 0), &[]));
        assert_good(&exec(&lu, &n, &cdb16(0x91, 0, 0), &[]));
        assert_check(
            &exec(&lu, &n, &cdb10(0x35, BLOCKS as u32, 2), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
    }

    #[test]
    fn write_same_writes_the_block_everywhere() {
        let (lu, n) = setup();
        let blk = pattern(1, 0x33);
        assert_good(&exec(&lu, &n, &cdb10(0x41, 3, 4), &blk));
        let d = exec(&lu, &n, &cdb10(0x28, 3, 4), &[]).data_in;
        for b in d.chunks(BS) {
            assert_eq!(b, &blk[..]);
        }
    }

    #[test]
    fn write_same_unmap_deallocates_and_reads_zero() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 16), &[0xFF; 16 * BS]));
        let mut c = cdb16(0x93, 0, 16);
        c[1] = 0x08;
        assert_good(&exec(&lu, &n, &c, &[0u8; BS]));
        let d = exec(&lu, &n, &cdb10(0x28, 0, 16), &[]).data_in;
        assert!(d.iter().all(|&b| b == 0));
    }

    #[test]
    fn write_same_unmap_deallocates_even_when_data_out_is_not_zero() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 8, 4), &[0xFF; 4 * BS]));
        let mut c = cdb10(0x41, 8, 4);
        c[1] = 0x08;
        assert_good(&exec(&lu, &n, &c, &[0xFF; BS]));
        let d = exec(&lu, &n, &cdb10(0x28, 8, 4), &[]).data_in;
        assert!(d.iter().all(|&b| b == 0));
    }

    #[test]
    fn write_same_16_ndob_writes_zeros_without_data() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 2), &[0xFF; 2 * BS]));
        let mut c = cdb16(0x93, 0, 2);
        c[1] = 0x09;
        assert_good(&exec(&lu, &n, &c, &[]));
        assert!(exec(&lu, &n, &cdb10(0x28, 0, 2), &[])
            .data_in
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn write_same_zero_blocks_runs_to_end_of_medium() {
        let (lu, n) = setup();
        let blk = pattern(1, 0x44);
        assert_good(&exec(&lu, &n, &cdb16(0x93, BLOCKS - 3, 0), &blk));
        let d = exec(&lu, &n, &cdb16(0x88, BLOCKS - 3, 3), &[]).data_in;
        assert_eq!(&d[2 * BS..], &blk[..]);
        assert_check(
            &exec(&lu, &n, &cdb10(0x41, BLOCKS as u32 + 1, 0), &blk),
            sense::LBA_OUT_OF_RANGE,
        );
        assert_check(
            &exec(&lu, &n, &cdb10(0x41, u32::MAX, 0), &blk),
            sense::LBA_OUT_OF_RANGE,
        );
    }

    #[test]
    fn write_same_wrong_data_out_size_is_illegal_request() {
        let (lu, n) = setup();
        let mut c = cdb10(0x41, 0, 1);
        c[1] = 0x08;
        let r = exec(&lu, &n, &c, &[0u8; BS / 2]);
        assert_eq!(
            r.sense_code().map(|s| s.key),
            Some(sense::key::ILLEGAL_REQUEST)
        );
        let r = exec(&lu, &n, &c, &[0u8; BS * 2]);
        assert_eq!(
            r.sense_code().map(|s| s.key),
            Some(sense::key::ILLEGAL_REQUEST)
        );
    }

    #[test]
    fn write_same_anchor_and_wrprotect_are_invalid_field() {
        let (lu, n) = setup();
        let mut c = cdb16(0x93, 0, 1);
        c[1] = 0x10;
        assert_check(&exec(&lu, &n, &c, &[0u8; BS]), sense::INVALID_FIELD_IN_CDB);
        c[1] = 0x20;
        assert_check(&exec(&lu, &n, &c, &[0u8; BS]), sense::INVALID_FIELD_IN_CDB);
    }

    fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        v[0..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
        v[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
        for (lba, n) in descs {
            v.extend_from_slice(&lba.to_be_bytes());
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        v
    }

    fn unmap_cdb(len: usize) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = 0x42;
        c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
        c
    }

    #[test]
    fn a_read_across_pages_hands_out_each_page_without_a_copy() {
        let (lu, n) = setup();
        // 4 KiB pages: 20 blocks from LBA 4 cross pages 0, 1 and 2.
        let data = pattern(20, 9);
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 4, 20), &data));
        let r = lu.execute(&crate::ScsiTask {
            nexus: &n,
            lun: 0,
            cdb: &cdb10(0x28, 4, 20),
            data_out: &[],
            data_out_buffer: None,
            expected_in_len: 20 * BS as u32,
            attr: crate::TaskAttr::Simple,
            tag: 7,
        });
        assert_good(&r);
        let lens: Vec<usize> = std::iter::once(&r.data_in)
            .chain(&r.data_in_more)
            .map(bytes::Bytes::len)
            .collect();
        assert_eq!(lens, vec![4096 - 4 * BS, 4096, 4096]);
        assert_eq!(r.data_in_len(), 20 * BS);
        assert_eq!(&r.data_in_whole()[..], &data[..]);
    }

    #[test]
    fn unmap_deallocates_listed_ranges() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 32), &[0xFF; 32 * BS]));
        let p = unmap_list(&[(0, 8), (16, 8)]);
        assert_good(&exec(&lu, &n, &unmap_cdb(p.len()), &p));
        let d = exec(&lu, &n, &cdb10(0x28, 0, 32), &[]).data_in;
        assert!(d[..8 * BS].iter().all(|&b| b == 0));
        assert!(d[8 * BS..16 * BS].iter().all(|&b| b == 0xFF));
        assert!(d[16 * BS..24 * BS].iter().all(|&b| b == 0));
    }

    #[test]
    fn unmap_zero_blocks_and_empty_list_are_good() {
        let (lu, n) = setup();
        let p = unmap_list(&[(0, 0), (BLOCKS, 0)]);
        assert_good(&exec(&lu, &n, &unmap_cdb(p.len()), &p));
        let p = unmap_list(&[]);
        assert_good(&exec(&lu, &n, &unmap_cdb(p.len()), &p));
        assert_good(&exec(&lu, &n, &unmap_cdb(0), &[]));
    }

    #[test]
    fn unmap_beyond_end_is_lba_out_of_range() {
        let (lu, n) = setup();
        let p = unmap_list(&[(BLOCKS - 1, 2)]);
        assert_check(
            &exec(&lu, &n, &unmap_cdb(p.len()), &p),
            sense::LBA_OUT_OF_RANGE,
        );
    }

    #[test]
    fn unmap_anchor_is_invalid_field_and_short_list_is_length_error() {
        let (lu, n) = setup();
        let p = unmap_list(&[(0, 1)]);
        let mut c = unmap_cdb(p.len());
        c[1] = 1;
        assert_check(&exec(&lu, &n, &c, &p), sense::INVALID_FIELD_IN_CDB);
        assert_check(
            &exec(&lu, &n, &unmap_cdb(4), &p[..4]),
            sense::PARAMETER_LIST_LENGTH_ERROR,
        );
    }

    #[test]
    fn fully_provisioned_lu_refuses_unmap_and_write_same_unmap() {
        let cfg = LuConfig {
            thin_provisioning: false,
            ..LuConfig::default()
        };
        let lu = lu_with(cfg, MIB);
        let n = ready_nexus(&lu, 1);
        let p = unmap_list(&[(0, 1)]);
        assert_check(
            &exec(&lu, &n, &unmap_cdb(p.len()), &p),
            sense::INVALID_COMMAND_OPERATION_CODE,
        );
        let mut c = cdb10(0x41, 0, 1);
        c[1] = 0x08;
        assert_check(&exec(&lu, &n, &c, &[0u8; BS]), sense::INVALID_FIELD_IN_CDB);
        c[1] = 0;
        assert_good(&exec(&lu, &n, &c, &[0u8; BS]));
        let r = exec(&lu, &n, &cdb16(0x9E, 0, 32).map_with_sa(0x10), &[]);
        assert_eq!(r.data_in[14] & 0xC0, 0);
    }

    #[test]
    fn unmap_too_many_descriptors_is_invalid_parameter() {
        let (lu, n) = setup();
        let descs = vec![(0u64, 1u32); limits::MAX_UNMAP_DESCRIPTORS as usize + 1];
        let p = unmap_list(&descs);
        let r = exec(&lu, &n, &unmap_cdb(p.len().min(0xFFFF)), &p);
        assert_check(&r, sense::INVALID_FIELD_IN_PARAMETER_LIST);
    }

    fn caw(lba: u64, n: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x89;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[13] = n;
        c
    }

    /// A store with its own atomic compare-and-write and write-same that
    /// counts how often the core used them.
    struct SharedStore {
        mem: crate::MemoryBackend,
        caw: std::sync::atomic::AtomicU32,
        ws: std::sync::atomic::AtomicU32,
    }

    impl crate::Backend for SharedStore {
        fn size_bytes(&self) -> u64 {
            self.mem.size_bytes()
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
            self.mem.read_at(o, b)
        }
        fn write_at(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
            self.mem.write_at(o, d)
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn unmap(&self, o: u64, l: u64) -> std::io::Result<()> {
            self.mem.unmap(o, l)
        }
        fn caps(&self) -> crate::BackendCaps {
            self.mem.caps()
        }
        fn write_same(&self, o: u64, l: u64, p: &[u8]) -> std::io::Result<()> {
            self.ws.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let buf: Vec<u8> = p.iter().copied().cycle().take(l as usize).collect();
            self.mem.write_at(o, &buf)
        }
        fn compare_and_write(
            &self,
            o: u64,
            cmp: &[u8],
            w: &[u8],
        ) -> std::io::Result<crate::CompareAndWrite> {
            self.caw.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut cur = vec![0u8; cmp.len()];
            self.mem.read_at(o, &mut cur)?;
            if let Some(i) = cur.iter().zip(cmp).position(|(a, b)| a != b) {
                return Ok(crate::CompareAndWrite::Miscompare(i as u64));
            }
            self.mem.write_at(o, w)?;
            Ok(crate::CompareAndWrite::Written)
        }
    }

    /// An LU on a fresh 1 MiB SharedStore the test keeps a handle on, and a
    /// ready nexus.
    fn on_shared_store() -> (
        std::sync::Arc<SharedStore>,
        std::sync::Arc<crate::LogicalUnit>,
        crate::Nexus,
    ) {
        let store = std::sync::Arc::new(SharedStore {
            mem: crate::MemoryBackend::new(MIB),
            caw: Default::default(),
            ws: Default::default(),
        });
        let lu = crate::LogicalUnit::new(LuConfig::default(), Box::new(ArcStore(store.clone())))
            .unwrap();
        let n = ready_nexus(&lu, 1);
        (store, lu, n)
    }

    #[test]
    fn compare_and_write_and_write_same_use_the_stores_own_operations() {
        let (store, lu, n) = on_shared_store();
        let mut ws = [0u8; 10];
        ws[0] = 0x41;
        ws[8] = 4;
        assert_good(&exec(&lu, &n, &ws, &[7u8; BS]));
        assert_eq!(store.ws.load(std::sync::atomic::Ordering::Relaxed), 1);
        let mut d = vec![7u8; BS];
        d.extend_from_slice(&[9u8; BS]);
        assert_good(&exec(&lu, &n, &caw(1, 1), &d));
        let r = exec(&lu, &n, &caw(1, 1), &d);
        assert_check(&r, sense::MISCOMPARE_DURING_VERIFY);
        assert_eq!(store.caw.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(
            &exec(&lu, &n, &cdb10(0x28, 0, 3), &[]).data_in[..],
            &[[7u8; BS], [9u8; BS], [7u8; BS]].concat()[..]
        );
    }

    /// Lets a test keep a handle on the store it gave the LU.
    struct ArcStore(std::sync::Arc<SharedStore>);

    impl crate::Backend for ArcStore {
        fn size_bytes(&self) -> u64 {
            self.0.size_bytes()
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
            self.0.read_at(o, b)
        }
        fn write_at(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
            self.0.write_at(o, d)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.0.flush()
        }
        fn unmap(&self, o: u64, l: u64) -> std::io::Result<()> {
            self.0.unmap(o, l)
        }
        fn caps(&self) -> crate::BackendCaps {
            self.0.caps()
        }
        fn write_same(&self, o: u64, l: u64, p: &[u8]) -> std::io::Result<()> {
            self.0.write_same(o, l, p)
        }
        fn compare_and_write(
            &self,
            o: u64,
            c: &[u8],
            w: &[u8],
        ) -> std::io::Result<crate::CompareAndWrite> {
            self.0.compare_and_write(o, c, w)
        }
    }

    #[test]
    fn a_store_resized_from_outside_gives_capacity_changed() {
        let (store, lu, n) = on_shared_store();
        crate::Backend::set_size(&store.mem, Some(2 * MIB)).unwrap();
        assert_check(&exec(&lu, &n, &TUR, &[]), sense::CAPACITY_DATA_HAS_CHANGED);
        assert_good(&exec(&lu, &n, &TUR, &[]));
        assert_eq!(lu.num_blocks(), 2 * MIB / BS as u64);
    }

    #[test]
    fn compare_and_write_writes_when_equal() {
        let (lu, n) = setup();
        let old = pattern(2, 1);
        let new = pattern(2, 2);
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 4, 2), &old));
        let mut d = old.clone();
        d.extend_from_slice(&new);
        assert_good(&exec(&lu, &n, &caw(4, 2), &d));
        assert_eq!(
            &exec(&lu, &n, &cdb10(0x28, 4, 2), &[]).data_in[..],
            &new[..]
        );
    }

    #[test]
    fn compare_and_write_miscompare_reports_offset_and_writes_nothing() {
        let (lu, n) = setup();
        let old = pattern(2, 1);
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 4, 2), &old));
        let mut d = old.clone();
        d[600] ^= 1;
        d.extend_from_slice(&pattern(2, 2));
        let r = exec(&lu, &n, &caw(4, 2), &d);
        assert_check(&r, sense::MISCOMPARE_DURING_VERIFY);
        assert_eq!(information(&r), Some(600));
        assert_eq!(
            &exec(&lu, &n, &cdb10(0x28, 4, 2), &[]).data_in[..],
            &old[..]
        );
    }

    #[test]
    fn compare_and_write_checks_length_range_and_data_size() {
        let (lu, n) = setup();
        assert_check(
            &exec(&lu, &n, &caw(BLOCKS, 1), &[0u8; 2 * BS]),
            sense::LBA_OUT_OF_RANGE,
        );
        let r = exec(&lu, &n, &caw(0, 1), &[0u8; BS]);
        assert_eq!(
            r.sense_code().map(|s| s.key),
            Some(sense::key::ILLEGAL_REQUEST)
        );
        assert_good(&exec(&lu, &n, &caw(0, 0), &[]));
    }

    #[test]
    fn compare_and_write_zero_blocks_with_data_out_is_invalid_field() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &caw(0, 0), &[0u8; 2 * 256 * BS]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((13, true)));
    }

    #[test]
    fn compare_and_write_is_atomic_against_concurrent_writers() {
        let (lu, _) = setup();
        let threads = 4;
        let rounds = 50;
        std::thread::scope(|s| {
            for id in 0..threads {
                let lu = &lu;
                s.spawn(move || {
                    let n = ready_nexus(lu, 10 + id);
                    let mut done = 0;
                    while done < rounds {
                        let old = exec(lu, &n, &cdb10(0x28, 0, 1), &[]).data_in;
                        let v = u64::from_be_bytes(old[..8].try_into().unwrap());
                        let mut d = old.to_vec();
                        let mut new = vec![0u8; BS];
                        new[..8].copy_from_slice(&(v + 1).to_be_bytes());
                        d.extend_from_slice(&new);
                        if exec(lu, &n, &caw(0, 1), &d).status == status::GOOD {
                            done += 1;
                        }
                    }
                });
            }
        });
        let n = ready_nexus(&lu, 99);
        let d = exec(&lu, &n, &cdb10(0x28, 0, 1), &[]).data_in;
        assert_eq!(
            u64::from_be_bytes(d[..8].try_into().unwrap()),
            threads * rounds
        );
    }

    #[test]
    fn orwrite_ors_into_the_medium() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 1), &[0x0F; BS]));
        assert_good(&exec(&lu, &n, &cdb16(0x8B, 0, 1), &[0xF0; BS]));
        assert!(exec(&lu, &n, &cdb10(0x28, 0, 1), &[])
            .data_in
            .iter()
            .all(|&b| b == 0xFF));
    }

    #[test]
    fn write_atomic_16_writes() {
        let (lu, n) = setup();
        let mut c = [0u8; 16];
        c[0] = 0x9C;
        c[2..10].copy_from_slice(&9u64.to_be_bytes());
        c[12..14].copy_from_slice(&2u16.to_be_bytes());
        let data = pattern(2, 0x77);
        assert_good(&exec(&lu, &n, &c, &data));
        assert_eq!(
            &exec(&lu, &n, &cdb10(0x28, 9, 2), &[]).data_in[..],
            &data[..]
        );
    }

    fn get_lba_status(lba: u64, alloc: u32) -> [u8; 16] {
        let mut c = cdb16(0x9E, lba, alloc);
        c[1] = 0x12;
        c
    }

    #[test]
    fn get_lba_status_reports_mapped_and_deallocated_runs() {
        let (lu, n) = setup();
        // Memory chunks in tests are 4 KiB = 8 blocks.
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 8, 8), &[1u8; 8 * BS]));
        let r = exec(&lu, &n, &get_lba_status(0, 1024), &[]);
        assert_good(&r);
        let d = &r.data_in;
        let plen = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
        assert_eq!(plen + 4, d.len());
        let desc = |i: usize| {
            let o = 8 + 16 * i;
            (
                u64::from_be_bytes(d[o..o + 8].try_into().unwrap()),
                u32::from_be_bytes(d[o + 8..o + 12].try_into().unwrap()),
                d[o + 12],
            )
        };
        assert_eq!(desc(0), (0, 8, 1));
        assert_eq!(desc(1), (8, 8, 0));
        assert_eq!(desc(2), (16, (BLOCKS - 16) as u32, 1));
    }

    #[test]
    fn get_lba_status_beyond_end_is_lba_out_of_range() {
        let (lu, n) = setup();
        assert_check(
            &exec(&lu, &n, &get_lba_status(BLOCKS, 1024), &[]),
            sense::LBA_OUT_OF_RANGE,
        );
        assert_good(&exec(&lu, &n, &get_lba_status(BLOCKS - 1, 1024), &[]));
    }

    #[test]
    fn read_defect_data_returns_empty_list() {
        let (lu, n) = setup();
        let r = exec(&lu, &n, &[0x37, 0, 0x0D, 0, 0, 0, 0, 0, 255, 0], &[]);
        assert_good(&r);
        assert_eq!(&r.data_in[..], &[0, 0x0D, 0, 0]);
        let r = exec(&lu, &n, &[0xB7, 0x0D, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_eq!(r.data_in.len(), 8);
    }

    #[test]
    fn fua_write_flushes_file_backend() {
        let path = std::env::temp_dir().join(format!("scsi-target-fua-{}", std::process::id()));
        let fb = crate::FileBackend::create(&path, MIB).unwrap();
        let lu = crate::LogicalUnit::new(LuConfig::default(), Box::new(fb)).unwrap();
        assert!(lu.may_block());
        let n = ready_nexus(&lu, 1);
        let mut c = cdb10(0x2A, 0, 1);
        c[1] = 0x08;
        assert_good(&exec(&lu, &n, &c, &[3u8; BS]));
        assert_eq!(exec(&lu, &n, &cdb10(0x28, 0, 1), &[]).data_in[0], 3);
        let _ = std::fs::remove_file(&path);
    }
}
