//! The initiator's half of the data services, sans-IO: how much of a write
//! goes as immediate and unsolicited data ([`WritePlan`]), the Data-Out
//! PDUs for a burst ([`data_out_pdus`]), and the reassembly of Data-In into
//! a read buffer with DataSN and offset checks ([`DataInBuffer`]).
//!
//! The target's side of the same exchanges is in [`crate::datain`] and
//! [`crate::r2t`]; both follow RFC 7143 §11.7 and §11.8.

use bytes::Bytes;
use iscsi_proto::negotiation::NegotiatedParams;
use iscsi_proto::pdu::{DataIn, DataOut, Header, Pdu};
use thiserror::Error;

/// Residual of a completed command (RFC 7143 §11.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    /// The target moved this many bytes less than expected.
    Underflow(u32),
    /// The target had this many bytes more than expected.
    Overflow(u32),
}

impl Residual {
    /// From the U/O bits and the residual count of a response.
    pub fn from_flags(underflow: bool, overflow: bool, count: u32) -> Residual {
        match (underflow, overflow) {
            (true, _) => Residual::Underflow(count),
            (_, true) => Residual::Overflow(count),
            _ => Residual::None,
        }
    }
}

/// Where the write's data goes before the first R2T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritePlan {
    /// Bytes carried in the SCSI Command PDU itself.
    pub immediate: u32,
    /// End of the unsolicited data (immediate + unsolicited Data-Out).
    pub unsolicited_end: u32,
    /// Largest data segment we may send.
    pub segment: u32,
}

impl WritePlan {
    /// RFC 7143 §4.2.5: ImmediateData and InitialR2T decide what may be sent
    /// unasked, and FirstBurstLength bounds it.
    pub fn new(p: &NegotiatedParams, len: u32) -> WritePlan {
        let segment = p.max_xmit_data_segment_length.max(512);
        let first_burst = p.first_burst_length.min(p.max_burst_length);
        let immediate = if p.immediate_data {
            len.min(first_burst).min(segment)
        } else {
            0
        };
        let unsolicited_end = if p.initial_r2t {
            immediate
        } else {
            len.min(first_burst)
        };
        WritePlan {
            immediate,
            unsolicited_end,
            segment,
        }
    }

    /// The F bit of the SCSI Command: no unsolicited Data-Out follows.
    pub fn command_final(&self) -> bool {
        self.unsolicited_end == self.immediate
    }
}

/// Data-Out PDUs for `data[start..end]`, at most `seg` bytes each, DataSN
/// from 0, F on the last (RFC 7143 §11.7). A range outside `data` yields
/// the PDUs for the part inside it.
#[allow(clippy::too_many_arguments)]
pub fn data_out_pdus(
    lun: u64,
    itt: u32,
    ttt: u32,
    data: &Bytes,
    start: u32,
    end: u32,
    seg: u32,
    exp_stat_sn: u32,
) -> Vec<Pdu> {
    let end = end.min(u32::try_from(data.len()).unwrap_or(u32::MAX));
    let mut out = Vec::new();
    let mut offset = start;
    let mut data_sn = 0u32;
    while offset < end {
        let n = (end - offset).min(seg.max(1));
        let chunk = data.slice(offset as usize..(offset + n) as usize);
        out.push(Pdu::new(
            Header::DataOut(DataOut {
                final_: offset + n == end,
                lun,
                itt,
                ttt,
                exp_stat_sn,
                data_sn,
                buffer_offset: offset,
            }),
            chunk,
        ));
        offset += n;
        data_sn = data_sn.wrapping_add(1);
    }
    out
}

/// A Data-In PDU that cannot be placed; it fails its command.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DataInError {
    #[error("Data-In DataSN {got}, expected {expected}")]
    DataSn { got: u32, expected: u32 },
    #[error("Data-In at {offset}+{len} beyond the expected {expected} bytes")]
    Overrun {
        offset: u32,
        len: usize,
        expected: usize,
    },
}

/// The read buffer of one command, filled from its Data-In PDUs.
#[derive(Debug, Default)]
pub struct DataInBuffer {
    buf: Vec<u8>,
    next_data_sn: u32,
}

impl DataInBuffer {
    /// A buffer for `expected` bytes (the command's expected transfer length).
    pub fn new(expected: u32) -> DataInBuffer {
        DataInBuffer {
            buf: vec![0u8; expected as usize],
            next_data_sn: 0,
        }
    }

    /// Places one Data-In PDU; DataSN must be the next in sequence and the
    /// segment must fall inside the expected length.
    pub fn place(&mut self, h: &DataIn, data: &[u8]) -> Result<(), DataInError> {
        if h.data_sn != self.next_data_sn {
            return Err(DataInError::DataSn {
                got: h.data_sn,
                expected: self.next_data_sn,
            });
        }
        let start = h.buffer_offset as usize;
        let overrun = || DataInError::Overrun {
            offset: h.buffer_offset,
            len: data.len(),
            expected: self.buf.len(),
        };
        let end = start.checked_add(data.len()).ok_or_else(overrun)?;
        let err = overrun();
        let dst = self.buf.get_mut(start..end).ok_or(err)?;
        dst.copy_from_slice(data);
        self.next_data_sn = self.next_data_sn.wrapping_add(1);
        Ok(())
    }

    /// The data, cut to what the target moved when it reports an underflow.
    pub fn finish(mut self, residual: Residual) -> Bytes {
        if let Residual::Underflow(n) = residual {
            let keep = self.buf.len().saturating_sub(n as usize);
            self.buf.truncate(keep);
        }
        Bytes::from(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_proto::negotiation::NegotiatedParams;

    fn din(data_sn: u32, offset: u32) -> DataIn {
        DataIn {
            final_: false,
            ack: false,
            overflow: false,
            underflow: false,
            status_present: false,
            status: 0,
            lun: 0,
            itt: 1,
            ttt: u32::MAX,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            data_sn,
            buffer_offset: offset,
            residual_count: 0,
        }
    }

    #[test]
    fn data_in_in_order_fills_and_underflow_truncates() {
        let mut b = DataInBuffer::new(8);
        b.place(&din(0, 0), &[1, 2]).unwrap();
        b.place(&din(1, 2), &[3, 4]).unwrap();
        assert_eq!(&b.finish(Residual::Underflow(4))[..], &[1, 2, 3, 4]);
    }

    #[test]
    fn data_in_gap_and_overrun_are_errors() {
        let mut b = DataInBuffer::new(4);
        assert!(matches!(
            b.place(&din(1, 0), &[1]),
            Err(DataInError::DataSn { .. })
        ));
        assert!(matches!(
            b.place(&din(0, 3), &[1, 2]),
            Err(DataInError::Overrun { .. })
        ));
        assert!(matches!(
            b.place(&din(0, u32::MAX), &[1]),
            Err(DataInError::Overrun { .. })
        ));
    }

    #[test]
    fn data_out_splits_to_segments_with_final_on_last() {
        let data = Bytes::from(vec![7u8; 10]);
        let pdus = data_out_pdus(0, 1, 2, &data, 2, 10, 3, 0);
        assert_eq!(pdus.len(), 3);
        let Header::DataOut(last) = &pdus[2].header else {
            panic!()
        };
        assert!(last.final_);
        assert_eq!(last.data_sn, 2);
        assert_eq!(last.buffer_offset, 8);
        assert!(data_out_pdus(0, 1, 2, &data, 8, 99, 3, 0).len() == 1);
    }

    #[test]
    fn write_plan_honors_initial_r2t_and_immediate_data() {
        let mut p = NegotiatedParams {
            max_xmit_data_segment_length: 8192,
            first_burst_length: 65536,
            max_burst_length: 262144,
            immediate_data: true,
            initial_r2t: false,
            ..NegotiatedParams::default()
        };
        let w = WritePlan::new(&p, 1 << 20);
        assert_eq!((w.immediate, w.unsolicited_end), (8192, 65536));
        p.initial_r2t = true;
        let w = WritePlan::new(&p, 1 << 20);
        assert_eq!((w.immediate, w.unsolicited_end), (8192, 8192));
        assert!(w.command_final());
        p.immediate_data = false;
        assert_eq!(WritePlan::new(&p, 100).immediate, 0);
    }
}
