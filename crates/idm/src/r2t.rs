//! Data-Out service (RFC 7143 §11.7, §11.8, §4.2.4): collects a write
//! command's data from immediate data, unsolicited Data-Out (FirstBurstLength,
//! InitialR2T=No) and solicited Data-Out answering our R2Ts, honouring
//! MaxBurstLength and MaxOutstandingR2T, and checks every Data-Out against
//! what was asked for (offset, length, DataSN, Target Transfer Tag).
//!
//! Sans-IO: `handle_data_out` takes a PDU, `next_r2ts` says what to send.
//! A transport that can receive a Data-Out's data straight into the
//! command's buffer asks [`WriteCollector::placement`] where, then reports
//! it with [`WriteCollector::data_placed`]: write data then reaches the LU
//! without a copy of ours on the way.

use bytes::{Bytes, BytesMut};
use iscsi_proto::pdu::{DataOut, R2t, RESERVED_TAG};
use smallvec::SmallVec;
use thiserror::Error;

/// Negotiated parameters that shape the write data flow.
#[derive(Debug, Clone, Copy)]
pub struct WriteLimits {
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub data_pdu_in_order: bool,
}

/// A Data-Out (or immediate data) that breaks the rules.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataOutError {
    #[error(
        "immediate data of {len} bytes exceeds FirstBurstLength {first_burst} or the transfer"
    )]
    ImmediateTooLong { len: u32, first_burst: u32 },
    #[error("immediate data sent although ImmediateData=No")]
    ImmediateNotAllowed,
    #[error("unsolicited Data-Out although InitialR2T=Yes or F was set on the command")]
    UnsolicitedNotAllowed,
    #[error("Data-Out for unknown Target Transfer Tag {0:#x}")]
    UnknownTtt(u32),
    #[error("Data-Out at offset {offset}+{len} outside the requested range {start}..{end}")]
    OutOfRange {
        offset: u32,
        len: u32,
        start: u32,
        end: u32,
    },
    #[error("Data-Out DataSN {got}, expected {expected}")]
    DataSnMismatch { got: u32, expected: u32 },
    #[error("Data-Out at offset {got}, expected {expected} (DataPDUInOrder=Yes)")]
    OutOfOrder { got: u32, expected: u32 },
}

#[derive(Debug, Clone)]
struct Sequence {
    /// TTT of the R2T, or RESERVED_TAG for the unsolicited burst.
    ttt: u32,
    start: u32,
    end: u32,
    next_offset: u32,
    next_data_sn: u32,
    received: u32,
}

/// The data collection of one write command.
#[derive(Debug)]
pub struct WriteCollector {
    pub itt: u32,
    pub lun: u64,
    edtl: u32,
    limits: WriteLimits,
    /// The data, from offset 0; grown as it arrives, in order normally.
    buf: BytesMut,
    /// Zero-copy fast path: the immediate data is the whole transfer.
    whole: Option<Bytes>,
    received: u32,
    unsolicited: Option<Sequence>,
    /// Outstanding R2Ts (MaxOutstandingR2T, most often 1): inline.
    solicited: SmallVec<[Sequence; 4]>,
    next_request_offset: u32,
    r2t_sn: u32,
}

impl WriteCollector {
    /// Starts collecting for a command with `edtl` bytes to write.
    /// `command_final` is the F bit of the SCSI Command PDU.
    pub fn new(
        itt: u32,
        lun: u64,
        edtl: u32,
        immediate: Bytes,
        command_final: bool,
        limits: WriteLimits,
    ) -> Result<Self, DataOutError> {
        Self::with_buffer(itt, lun, edtl, immediate, command_final, limits, None)
    }

    /// [`new`](Self::new), collecting into `spare` (emptied) when it holds
    /// the whole transfer: a buffer of an earlier write, whose pages are
    /// already mapped.
    pub fn with_buffer(
        itt: u32,
        lun: u64,
        edtl: u32,
        immediate: Bytes,
        command_final: bool,
        limits: WriteLimits,
        spare: Option<BytesMut>,
    ) -> Result<Self, DataOutError> {
        let imm_len = u32::try_from(immediate.len()).unwrap_or(u32::MAX);
        if imm_len > 0 && !limits.immediate_data {
            return Err(DataOutError::ImmediateNotAllowed);
        }
        if imm_len > limits.first_burst_length || imm_len > edtl {
            return Err(DataOutError::ImmediateTooLong {
                len: imm_len,
                first_burst: limits.first_burst_length,
            });
        }
        let mut c = WriteCollector {
            itt,
            lun,
            edtl,
            limits,
            buf: BytesMut::new(),
            whole: None,
            received: imm_len,
            unsolicited: None,
            solicited: SmallVec::new(),
            next_request_offset: imm_len,
            r2t_sn: 0,
        };
        if imm_len == edtl {
            c.whole = Some(immediate);
            return Ok(c);
        }
        // Grown as data arrives (in order, normally): zero-filling the whole
        // transfer up front cost a memset and page faults per large write.
        c.buf = match spare {
            Some(mut b) if b.capacity() >= edtl as usize => {
                b.clear();
                b
            }
            _ => BytesMut::with_capacity(edtl as usize),
        };
        c.buf.extend_from_slice(&immediate);
        let unsolicited_end = limits.first_burst_length.min(edtl);
        if !command_final && !limits.initial_r2t && unsolicited_end > imm_len {
            let end = unsolicited_end;
            c.unsolicited = Some(Sequence {
                ttt: RESERVED_TAG,
                start: imm_len,
                end,
                next_offset: imm_len,
                next_data_sn: 0,
                received: 0,
            });
        }
        Ok(c)
    }

    /// The Expected Data Transfer Length of the command.
    pub fn expected_length(&self) -> u32 {
        self.edtl
    }

    /// All data is here.
    pub fn is_complete(&self) -> bool {
        self.received >= self.edtl && self.unsolicited.is_none() && self.solicited.is_empty()
    }

    /// Takes one Data-Out PDU's header and data.
    pub fn handle_data_out(&mut self, hdr: &DataOut, data: &[u8]) -> Result<(), DataOutError> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.check(hdr, len)?;
        let start = hdr.buffer_offset as usize;
        let end = start + data.len();
        if start > self.buf.len() {
            self.buf.resize(start, 0);
        }
        let overlap = end.min(self.buf.len()).saturating_sub(start);
        if let (Some(dst), Some(src)) = (
            self.buf.get_mut(start..start + overlap),
            data.get(..overlap),
        ) {
            dst.copy_from_slice(src);
        }
        if let Some(rest) = data.get(overlap..) {
            self.buf.extend_from_slice(rest);
        }
        self.advance(hdr, len);
        Ok(())
    }

    /// [`handle_data_out`](Self::handle_data_out) for data the caller owns:
    /// a Data-Out that alone carries the whole transfer is kept as it is,
    /// not copied (an iSER RDMA READ of the whole write, or a TCP Data-Out
    /// that arrived whole).
    pub fn handle_data_out_bytes(
        &mut self,
        hdr: &DataOut,
        data: Bytes,
    ) -> Result<(), DataOutError> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let alone = self.whole.is_none()
            && self.received == 0
            && self.buf.is_empty()
            && hdr.buffer_offset == 0
            && len == self.edtl;
        if !alone {
            return self.handle_data_out(hdr, &data);
        }
        self.check(hdr, len)?;
        self.whole = Some(data);
        self.advance(hdr, len);
        Ok(())
    }

    /// Where the `len` data bytes of this Data-Out go if they are received
    /// straight into the command's buffer (appended to the returned buffer),
    /// `done` of them already there: only for a Data-Out that passes every
    /// check of [`handle_data_out`](Self::handle_data_out) and continues the
    /// data received so far; otherwise `None` (receive it as usual).
    pub fn placement(&mut self, hdr: &DataOut, len: u32, done: u32) -> Option<&mut BytesMut> {
        if self.whole.is_some() || done > len {
            return None;
        }
        self.check(hdr, len).ok()?;
        let at = (hdr.buffer_offset as usize).checked_add(done as usize)?;
        (at == self.buf.len()).then_some(&mut self.buf)
    }

    /// The `len` data bytes of this Data-Out were received into the buffer
    /// [`placement`](Self::placement) gave: account for them.
    pub fn data_placed(&mut self, hdr: &DataOut, len: u32) -> Result<(), DataOutError> {
        self.check(hdr, len)?;
        let end = u64::from(hdr.buffer_offset) + u64::from(len);
        if (self.buf.len() as u64) < end {
            // Not what placement handed out: the data is not there.
            return Err(DataOutError::OutOfOrder {
                got: hdr.buffer_offset,
                expected: u32::try_from(self.buf.len()).unwrap_or(u32::MAX),
            });
        }
        self.advance(hdr, len);
        Ok(())
    }

    /// Whether a Data-Out of `len` bytes with this header may be taken.
    fn check(&self, hdr: &DataOut, len: u32) -> Result<(), DataOutError> {
        let seq = if hdr.ttt == RESERVED_TAG {
            self.unsolicited
                .as_ref()
                .ok_or(DataOutError::UnsolicitedNotAllowed)?
        } else {
            self.solicited
                .iter()
                .find(|s| s.ttt == hdr.ttt)
                .ok_or(DataOutError::UnknownTtt(hdr.ttt))?
        };
        let end = hdr.buffer_offset.checked_add(len);
        if hdr.buffer_offset < seq.start || end.is_none_or(|e| e > seq.end) {
            return Err(DataOutError::OutOfRange {
                offset: hdr.buffer_offset,
                len,
                start: seq.start,
                end: seq.end,
            });
        }
        if hdr.data_sn != seq.next_data_sn {
            return Err(DataOutError::DataSnMismatch {
                got: hdr.data_sn,
                expected: seq.next_data_sn,
            });
        }
        if self.limits.data_pdu_in_order && hdr.buffer_offset != seq.next_offset {
            return Err(DataOutError::OutOfOrder {
                got: hdr.buffer_offset,
                expected: seq.next_offset,
            });
        }
        Ok(())
    }

    /// Counts a checked Data-Out of `len` bytes as received.
    fn advance(&mut self, hdr: &DataOut, len: u32) {
        let seq = if hdr.ttt == RESERVED_TAG {
            self.unsolicited.as_mut()
        } else {
            self.solicited.iter_mut().find(|s| s.ttt == hdr.ttt)
        };
        let Some(seq) = seq else {
            return;
        };
        seq.next_offset = hdr.buffer_offset.saturating_add(len);
        seq.next_data_sn = seq.next_data_sn.wrapping_add(1);
        seq.received = seq.received.saturating_add(len);
        self.received = self.received.saturating_add(len);
        let seq_done = hdr.final_ || seq.received >= seq.end - seq.start;
        if seq_done {
            if hdr.ttt == RESERVED_TAG {
                // The unsolicited burst ended (F bit); request the rest by R2T.
                if let Some(u) = self.unsolicited.take() {
                    self.next_request_offset = self.next_request_offset.max(u.next_offset);
                }
            } else if seq.received >= seq.end - seq.start {
                let ttt = hdr.ttt;
                self.solicited.retain(|s| s.ttt != ttt);
            }
        }
    }

    /// Gives `emit` the R2Ts to send now, each with a fresh TTT from
    /// `alloc_ttt`.
    pub fn next_r2ts(&mut self, mut alloc_ttt: impl FnMut() -> u32, mut emit: impl FnMut(R2t)) {
        if self.unsolicited.is_some() {
            return;
        }
        while self.next_request_offset < self.edtl
            && (self.solicited.len() as u32) < self.limits.max_outstanding_r2t.max(1)
        {
            let offset = self.next_request_offset;
            let len = (self.edtl - offset).min(self.limits.max_burst_length.max(512));
            let ttt = alloc_ttt();
            self.solicited.push(Sequence {
                ttt,
                start: offset,
                end: offset + len,
                next_offset: offset,
                next_data_sn: 0,
                received: 0,
            });
            emit(R2t {
                lun: self.lun,
                itt: self.itt,
                ttt,
                r2t_sn: self.r2t_sn,
                buffer_offset: offset,
                desired_data_transfer_length: len,
                ..Default::default()
            });
            self.r2t_sn += 1;
            self.next_request_offset += len;
        }
    }

    /// The collected data (call when complete).
    pub fn into_data(self) -> Bytes {
        self.into_collected().0
    }

    /// [`into_data`](Self::into_data), and whether the data is in the
    /// collector's own buffer (true) or is the data segment of the one PDU
    /// that brought all of it.
    pub fn into_collected(self) -> (Bytes, bool) {
        match self.whole {
            Some(b) => (b, false),
            None => {
                let mut buf = self.buf;
                buf.resize(self.edtl as usize, 0);
                (buf.freeze(), true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r2ts(c: &mut WriteCollector, alloc_ttt: impl FnMut() -> u32) -> Vec<R2t> {
        let mut out = Vec::new();
        c.next_r2ts(alloc_ttt, |r| out.push(r));
        out
    }

    fn limits(initial_r2t: bool) -> WriteLimits {
        WriteLimits {
            first_burst_length: 65536,
            max_burst_length: 262144,
            max_outstanding_r2t: 1,
            initial_r2t,
            immediate_data: true,
            data_pdu_in_order: true,
        }
    }

    fn dout(ttt: u32, data_sn: u32, offset: u32, final_: bool) -> DataOut {
        DataOut {
            final_,
            itt: 1,
            ttt,
            data_sn,
            buffer_offset: offset,
            ..Default::default()
        }
    }

    #[test]
    fn immediate_data_covering_the_transfer_needs_no_r2t() {
        let data = Bytes::from(vec![3u8; 4096]);
        let mut c = WriteCollector::new(1, 0, 4096, data.clone(), true, limits(true)).unwrap();
        assert!(c.is_complete());
        assert!(r2ts(&mut c, || 1).is_empty());
        assert_eq!(c.into_data(), data);
    }

    #[test]
    fn r2t_respects_max_burst_and_max_outstanding() {
        let mut lim = limits(true);
        lim.max_burst_length = 8192;
        lim.max_outstanding_r2t = 2;
        let mut c = WriteCollector::new(1, 0, 32768, Bytes::new(), true, lim).unwrap();
        let mut ttt = 100;
        let r = r2ts(&mut c, || {
            ttt += 1;
            ttt
        });
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].buffer_offset, r[0].desired_data_transfer_length),
            (0, 8192)
        );
        assert_eq!((r[1].buffer_offset, r[1].r2t_sn), (8192, 1));
        assert!(r2ts(&mut c, || 0).is_empty(), "two already outstanding");
        c.handle_data_out(&dout(101, 0, 0, true), &[1; 8192])
            .unwrap();
        let r = r2ts(&mut c, || 200);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].buffer_offset, 16384);
        assert!(!c.is_complete());
    }

    #[test]
    fn unsolicited_burst_then_r2t_for_the_rest() {
        let mut c = WriteCollector::new(
            1,
            0,
            131072,
            Bytes::from(vec![1u8; 8192]),
            false,
            limits(false),
        )
        .unwrap();
        assert!(
            r2ts(&mut c, || 5).is_empty(),
            "wait for the unsolicited burst"
        );
        c.handle_data_out(&dout(RESERVED_TAG, 0, 8192, false), &[2; 8192])
            .unwrap();
        c.handle_data_out(&dout(RESERVED_TAG, 1, 16384, true), &[2; 49152])
            .unwrap();
        let r = r2ts(&mut c, || 5);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].buffer_offset, r[0].desired_data_transfer_length),
            (65536, 65536)
        );
        c.handle_data_out(&dout(5, 0, 65536, true), &[9; 65536])
            .unwrap();
        assert!(c.is_complete());
        let d = c.into_data();
        assert_eq!((d[0], d[8192], d[65536], d.len()), (1, 2, 9, 131072));
    }

    #[test]
    fn unsolicited_data_out_refused_when_initial_r2t() {
        let mut c = WriteCollector::new(1, 0, 8192, Bytes::new(), false, limits(true)).unwrap();
        assert_eq!(
            c.handle_data_out(&dout(RESERVED_TAG, 0, 0, true), &[0; 512]),
            Err(DataOutError::UnsolicitedNotAllowed)
        );
    }

    #[test]
    fn data_out_checks_ttt_range_datasn_and_order() {
        let mut c = WriteCollector::new(1, 0, 16384, Bytes::new(), true, limits(true)).unwrap();
        let _ = r2ts(&mut c, || 7);
        assert_eq!(
            c.handle_data_out(&dout(8, 0, 0, true), &[0; 512]),
            Err(DataOutError::UnknownTtt(8))
        );
        assert!(matches!(
            c.handle_data_out(&dout(7, 0, 16000, true), &[0; 1024]),
            Err(DataOutError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.handle_data_out(&dout(7, 3, 0, false), &[0; 512]),
            Err(DataOutError::DataSnMismatch { .. })
        ));
        assert!(matches!(
            c.handle_data_out(&dout(7, 0, 512, false), &[0; 512]),
            Err(DataOutError::OutOfOrder { .. })
        ));
        c.handle_data_out(&dout(7, 0, 0, false), &[0; 8192])
            .unwrap();
        c.handle_data_out(&dout(7, 1, 8192, true), &[0; 8192])
            .unwrap();
        assert!(c.is_complete());
    }

    #[test]
    fn out_of_order_data_lands_at_its_offsets() {
        let mut lim = limits(true);
        lim.data_pdu_in_order = false;
        let mut c = WriteCollector::new(1, 0, 3072, Bytes::new(), true, lim).unwrap();
        let _ = r2ts(&mut c, || 7);
        c.handle_data_out(&dout(7, 0, 2048, false), &[3; 1024])
            .unwrap();
        c.handle_data_out(&dout(7, 1, 0, false), &[1; 1024])
            .unwrap();
        c.handle_data_out(&dout(7, 2, 1024, true), &[2; 1024])
            .unwrap();
        assert!(c.is_complete());
        let d = c.into_data();
        assert_eq!(
            (d.len(), d[0], d[1023], d[1024], d[2047], d[2048], d[3071]),
            (3072, 1, 1, 2, 2, 3, 3)
        );
    }

    #[test]
    fn immediate_data_beyond_first_burst_is_refused() {
        let mut lim = limits(true);
        lim.first_burst_length = 4096;
        assert!(matches!(
            WriteCollector::new(1, 0, 8192, Bytes::from(vec![0; 8192]), true, lim),
            Err(DataOutError::ImmediateTooLong { .. })
        ));
        lim.immediate_data = false;
        assert_eq!(
            WriteCollector::new(1, 0, 8192, Bytes::from(vec![0; 512]), true, lim).unwrap_err(),
            DataOutError::ImmediateNotAllowed
        );
    }

    #[test]
    fn placement_is_given_only_to_a_data_out_that_passes_the_checks_and_continues_the_data() {
        let mut c = WriteCollector::new(
            1,
            0,
            16384,
            Bytes::from(vec![1u8; 4096]),
            true,
            limits(true),
        )
        .unwrap();
        let r = r2ts(&mut c, || 9);
        assert_eq!(
            (r[0].buffer_offset, r[0].desired_data_transfer_length),
            (4096, 12288)
        );
        // Wrong TTT, wrong DataSN, beyond the burst, not where the data ends so far: no buffer.
        assert!(c.placement(&dout(8, 0, 4096, false), 4096, 0).is_none());
        assert!(c.placement(&dout(9, 1, 4096, false), 4096, 0).is_none());
        assert!(c.placement(&dout(9, 0, 4096, false), 16384, 0).is_none());
        assert!(c.placement(&dout(9, 0, 8192, false), 4096, 0).is_none());
        // In order: the buffer, to append to (part of it may already be there).
        let hdr = dout(9, 0, 4096, false);
        c.placement(&hdr, 8192, 0)
            .unwrap()
            .extend_from_slice(&[2; 5000]);
        assert!(c.placement(&hdr, 8192, 0).is_none());
        c.placement(&hdr, 8192, 5000)
            .unwrap()
            .extend_from_slice(&[2; 3192]);
        c.data_placed(&hdr, 8192).unwrap();
        assert!(!c.is_complete());
        // The next one through the copying path, then one more placed.
        c.handle_data_out(&dout(9, 1, 12288, true), &[3; 4096])
            .unwrap();
        assert!(c.is_complete());
        assert!(c.placement(&dout(9, 2, 16384, true), 4096, 0).is_none());
        let d = c.into_data();
        assert_eq!(
            (d.len(), d[4095], d[4096], d[12287], d[12288], d[16383]),
            (16384, 1, 2, 2, 3, 3)
        );
    }

    #[test]
    fn data_placed_without_the_data_in_the_buffer_is_refused() {
        let mut c = WriteCollector::new(1, 0, 8192, Bytes::new(), true, limits(true)).unwrap();
        let _ = r2ts(&mut c, || 4);
        assert!(c.data_placed(&dout(4, 0, 0, true), 8192).is_err());
        assert!(!c.is_complete());
    }

    #[test]
    fn a_reused_buffer_shows_nothing_of_its_earlier_write() {
        let mut spare = BytesMut::with_capacity(16384);
        spare.extend_from_slice(&[0xee; 16384]);
        let mut lim = limits(true);
        lim.data_pdu_in_order = false;
        let mut c =
            WriteCollector::with_buffer(1, 0, 8192, Bytes::new(), true, lim, Some(spare)).unwrap();
        let _ = r2ts(&mut c, || 3);
        // Only the second half arrives: the first reads as zeros, not 0xee.
        c.handle_data_out(&dout(3, 0, 4096, true), &[1; 4096])
            .unwrap();
        let d = c.into_data();
        assert_eq!((d.len(), d[0], d[4095], d[4096]), (8192, 0, 0, 1));
    }

    #[test]
    fn a_data_out_carrying_the_whole_transfer_is_kept_not_copied() {
        let mut c = WriteCollector::new(1, 0, 8192, Bytes::new(), true, limits(true)).unwrap();
        let _ = r2ts(&mut c, || 6);
        let data = Bytes::from(vec![4u8; 8192]);
        // Checked all the same.
        assert!(c
            .handle_data_out_bytes(&dout(7, 0, 0, true), data.clone())
            .is_err());
        c.handle_data_out_bytes(&dout(6, 0, 0, true), data.clone())
            .unwrap();
        assert!(c.is_complete());
        let d = c.into_data();
        assert_eq!(d, data);
        assert_eq!(d.as_ptr(), data.as_ptr());
    }
}
