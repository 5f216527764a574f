//! Data-In service (RFC 7143 §11.7): cuts a command's read data into Data-In
//! PDUs no larger than the initiator's MaxRecvDataSegmentLength, marks the end
//! of each MaxBurstLength sequence with F, numbers them with DataSN, and puts
//! the status in the final Data-In when no sense data has to travel (S bit).
//!
//! Sans-IO: returns PDUs whose StatSN/ExpCmdSN/MaxCmdSN the connection's
//! writer fills at send time. Data segments are zero-copy slices of the buffers.

use bytes::Bytes;
use iscsi_proto::pdu::{DataIn, Header, Pdu, ScsiResponse, RESERVED_TAG};

/// The pieces of read data after the first: inline up to four.
pub type MoreData = smallvec::SmallVec<[Bytes; 4]>;

/// What the SCSI layer produced for one command.
#[derive(Debug, Clone)]
pub struct Completion {
    pub status: u8,
    pub sense: Option<Bytes>,
    pub data_in: Bytes,
    /// Where the data goes on, piece after piece (a read across a memory
    /// LU's pages): Data-In PDUs are cut at the pieces' ends, so each
    /// PDU's data stays a slice of one piece, never a copy.
    pub data_in_more: MoreData,
    /// Bytes the initiator sent for a write that the command did not consume,
    /// or did not send that it needed; used for write residuals.
    pub write_residual: Option<Residual>,
}

/// A residual count with its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    Underflow(u32),
    Overflow(u32),
}

/// Limits that shape the Data-In stream.
#[derive(Debug, Clone, Copy)]
pub struct DataInLimits {
    /// The initiator's MaxRecvDataSegmentLength.
    pub max_segment: u32,
    /// MaxBurstLength: a Data-In sequence ends (F bit) at this many bytes.
    pub max_burst: u32,
}

/// One PDU of a response and whether it consumes a StatSN.
#[derive(Debug, Clone)]
pub struct OutPdu {
    pub pdu: Pdu,
    /// True for PDUs that carry status (they take the next StatSN).
    pub carries_status: bool,
}

fn residual_of(len: usize, edtl: u32) -> Option<Residual> {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    match len.cmp(&edtl) {
        std::cmp::Ordering::Less => Some(Residual::Underflow(edtl - len)),
        std::cmp::Ordering::Greater => Some(Residual::Overflow(len - edtl)),
        std::cmp::Ordering::Equal => None,
    }
}

/// Appends the Data-In PDUs and, when needed, the SCSI Response of a
/// command to `out` (the connection's send queue: no allocation of its own).
///
/// `edtl` is the initiator's Expected Data Transfer Length for the read
/// direction; data beyond it is not sent and reported as overflow.
pub fn build_response(
    out: &mut Vec<OutPdu>,
    itt: u32,
    lun: u64,
    edtl: u32,
    completion: &Completion,
    limits: DataInLimits,
    is_read: bool,
) {
    let mut pieces = std::iter::once(&completion.data_in)
        .chain(&completion.data_in_more)
        .filter(|p| !p.is_empty());
    let total: usize = completion.data_in.len()
        + completion
            .data_in_more
            .iter()
            .map(Bytes::len)
            .sum::<usize>();
    let send_len = total.min(edtl as usize);
    let residual = if is_read {
        residual_of(total, edtl)
    } else {
        completion.write_residual
    };
    let (underflow, overflow, residual_count) = match residual {
        Some(Residual::Underflow(n)) => (true, false, n),
        Some(Residual::Overflow(n)) => (false, true, n),
        None => (false, false, 0),
    };
    let status_in_data = completion.sense.is_none() && send_len > 0;
    let max_segment = limits.max_segment.max(512) as usize;
    let max_burst = limits.max_burst.max(512) as usize;
    let mut offset = 0usize;
    let mut data_sn = 0u32;
    let mut burst_used = 0usize;
    let mut piece = pieces.next();
    let mut in_piece = 0usize;
    while offset < send_len {
        let Some(data) = piece else {
            // Cannot happen: send_len is at most what the pieces hold.
            debug_assert!(false, "read data ran out at {offset} of {send_len}");
            break;
        };
        let room_in_burst = max_burst - burst_used;
        let len = (send_len - offset)
            .min(max_segment)
            .min(room_in_burst)
            .min(data.len() - in_piece);
        let last = offset + len == send_len;
        burst_used += len;
        let end_of_sequence = last || burst_used == max_burst;
        if burst_used == max_burst {
            burst_used = 0;
        }
        let with_status = last && status_in_data;
        out.push(OutPdu {
            pdu: Pdu::new(
                Header::DataIn(DataIn {
                    final_: end_of_sequence,
                    ack: false,
                    overflow: with_status && overflow,
                    underflow: with_status && underflow,
                    status_present: with_status,
                    status: if with_status { completion.status } else { 0 },
                    lun: if with_status { 0 } else { lun },
                    itt,
                    ttt: RESERVED_TAG,
                    data_sn,
                    buffer_offset: offset as u32,
                    residual_count: if with_status { residual_count } else { 0 },
                    ..Default::default()
                }),
                data.slice(in_piece..in_piece + len),
            ),
            carries_status: with_status,
        });
        offset += len;
        data_sn += 1;
        in_piece += len;
        if in_piece == data.len() {
            piece = pieces.next();
            in_piece = 0;
        }
    }
    if !status_in_data {
        let sense = completion
            .sense
            .as_ref()
            .map(|s| {
                // RFC 7143 §11.4.7: SenseLength (2 bytes) then the sense data.
                let mut v = Vec::with_capacity(2 + s.len());
                v.extend_from_slice(&(s.len() as u16).to_be_bytes());
                v.extend_from_slice(s);
                Bytes::from(v)
            })
            .unwrap_or_default();
        out.push(OutPdu {
            pdu: Pdu::new(
                Header::ScsiResponse(ScsiResponse {
                    overflow,
                    underflow,
                    response: iscsi_proto::pdu::scsi_response::COMMAND_COMPLETED,
                    status: completion.status,
                    itt,
                    exp_data_sn: data_sn,
                    residual_count,
                    ..Default::default()
                }),
                sense,
            ),
            carries_status: true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(
        itt: u32,
        lun: u64,
        edtl: u32,
        c: &Completion,
        limits: DataInLimits,
        is_read: bool,
    ) -> Vec<OutPdu> {
        let mut out = Vec::new();
        build_response(&mut out, itt, lun, edtl, c, limits, is_read);
        out
    }

    fn done(len: usize, sense: Option<&'static [u8]>) -> Completion {
        Completion {
            status: if sense.is_some() { 2 } else { 0 },
            sense: sense.map(Bytes::from_static),
            data_in: Bytes::from(vec![0xab; len]),
            data_in_more: MoreData::new(),
            write_residual: None,
        }
    }

    /// A read whose data comes as `lens.len()` pieces, piece i filled with byte i.
    fn in_pieces(lens: &[usize]) -> Completion {
        let mut pieces = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]));
        Completion {
            status: 0,
            sense: None,
            data_in: pieces.next().unwrap_or_default(),
            data_in_more: pieces.collect(),
            write_residual: None,
        }
    }

    fn data_ins(pdus: &[OutPdu]) -> Vec<&DataIn> {
        pdus.iter()
            .filter_map(|p| match &p.pdu.header {
                Header::DataIn(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn read_is_split_by_segment_and_burst_with_status_in_last() {
        let limits = DataInLimits {
            max_segment: 8192,
            max_burst: 16384,
        };
        let pdus = built(5, 0, 40960, &done(40960, None), limits, true);
        let d = data_ins(&pdus);
        assert_eq!(pdus.len(), 5, "status rides on the last Data-In");
        assert_eq!(
            d.iter().map(|d| d.data_sn).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(
            d.iter().map(|d| d.final_).collect::<Vec<_>>(),
            vec![false, true, false, true, true]
        );
        assert_eq!(
            d.iter().map(|d| d.buffer_offset).collect::<Vec<_>>(),
            vec![0, 8192, 16384, 24576, 32768]
        );
        assert!(d[4].status_present && !d[3].status_present);
        assert!(pdus[4].carries_status && !pdus[0].carries_status);
    }

    #[test]
    fn pieces_are_sent_as_slices_of_themselves_cut_at_their_ends() {
        let limits = DataInLimits {
            max_segment: 8192,
            max_burst: 16384,
        };
        // 12 KiB, 20 KiB, 8 KiB: 40 KiB in all, as in the contiguous test above.
        let c = in_pieces(&[12288, 20480, 8192]);
        let pdus = built(5, 0, 40960, &c, limits, true);
        let d = data_ins(&pdus);
        let lens: Vec<usize> = pdus.iter().map(|p| p.pdu.data.len()).collect();
        assert_eq!(lens, vec![8192, 4096, 4096, 8192, 8192, 8192]);
        assert_eq!(
            d.iter().map(|d| d.buffer_offset).collect::<Vec<_>>(),
            vec![0, 8192, 12288, 16384, 24576, 32768]
        );
        // Bursts of 16 KiB end where they would with one buffer.
        assert_eq!(
            d.iter().map(|d| d.final_).collect::<Vec<_>>(),
            vec![false, false, true, false, true, true]
        );
        assert_eq!(
            d.iter().map(|d| d.data_sn).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 5]
        );
        assert!(d[5].status_present && pdus[5].carries_status);
        assert!(!d[..5].iter().any(|d| d.status_present));
        // Every PDU's data is one piece's own memory, in order.
        let pieces: Vec<&Bytes> = std::iter::once(&c.data_in).chain(&c.data_in_more).collect();
        let owner = [0, 0, 1, 1, 1, 2];
        for (p, &i) in pdus.iter().zip(&owner) {
            let piece = pieces[i].as_ptr_range();
            let data = p.pdu.data.as_ptr_range();
            assert!(piece.start <= data.start && data.end <= piece.end);
            assert!(p.pdu.data.iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn pieces_beyond_the_expected_length_are_not_sent_and_count_as_overflow() {
        let limits = DataInLimits {
            max_segment: 65536,
            max_burst: 262144,
        };
        let c = in_pieces(&[0, 4096, 4096, 4096]);
        let pdus = built(1, 0, 6144, &c, limits, true);
        let d = data_ins(&pdus);
        let lens: Vec<usize> = pdus.iter().map(|p| p.pdu.data.len()).collect();
        assert_eq!(lens, vec![4096, 2048]);
        assert!(d[1].overflow && d[1].status_present);
        assert_eq!(d[1].residual_count, 12288 - 6144);
    }

    #[test]
    fn any_cut_into_pieces_sends_what_one_buffer_would() {
        // A small LCG: the same cases on every run.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        for _ in 0..2000 {
            let lens: Vec<usize> = (0..1 + next(6))
                .map(|_| next(3) as usize * 4096 + next(2) as usize * 512)
                .collect();
            let total: usize = lens.iter().sum();
            let mut pieced = in_pieces(&lens);
            if next(4) == 0 {
                pieced.status = 2;
                pieced.sense = Some(Bytes::from_static(&[0x70, 0, 5]));
            }
            let whole = Completion {
                data_in: Bytes::from(
                    lens.iter()
                        .enumerate()
                        .flat_map(|(i, &n)| vec![i as u8; n])
                        .collect::<Vec<u8>>(),
                ),
                data_in_more: MoreData::new(),
                ..pieced.clone()
            };
            let limits = DataInLimits {
                max_segment: 512 * (1 + next(24) as u32),
                max_burst: 512 * (1 + next(64) as u32),
            };
            let edtl = match next(3) {
                0 => total as u32,
                1 => next(total as u64 + 1) as u32,
                _ => total as u32 + next(8192) as u32,
            };
            let a = built(3, 0, edtl, &pieced, limits, true);
            let b = built(3, 0, edtl, &whole, limits, true);
            let bytes = |p: &[OutPdu]| {
                p.iter()
                    .flat_map(|p| p.pdu.data.to_vec())
                    .collect::<Vec<u8>>()
            };
            assert_eq!(bytes(&a), bytes(&b), "{lens:?} {limits:?} edtl {edtl}");
            let ends = |p: &[OutPdu]| -> Vec<(u32, bool)> {
                data_ins(p)
                    .iter()
                    .zip(p)
                    .map(|(d, o)| (d.buffer_offset + o.pdu.data.len() as u32, d.final_))
                    .filter(|(_, f)| *f)
                    .collect()
            };
            assert_eq!(ends(&a), ends(&b), "F bits at other offsets");
            for (i, d) in data_ins(&a).iter().enumerate() {
                assert_eq!(d.data_sn, i as u32);
                assert!(a[i].pdu.data.len() <= limits.max_segment as usize);
                assert!(!a[i].pdu.data.is_empty());
            }
            assert_eq!(a.iter().filter(|p| p.carries_status).count(), 1);
            let last = |p: &[OutPdu]| p.last().map(|o| o.pdu.header.clone());
            let (la, lb) = (last(&a), last(&b));
            match (la, lb) {
                (Some(Header::DataIn(x)), Some(Header::DataIn(y))) => {
                    assert_eq!(
                        (x.residual_count, x.overflow, x.underflow),
                        (y.residual_count, y.overflow, y.underflow)
                    );
                }
                (Some(Header::ScsiResponse(x)), Some(Header::ScsiResponse(y))) => {
                    assert_eq!(
                        (x.residual_count, x.overflow, x.underflow),
                        (y.residual_count, y.overflow, y.underflow)
                    );
                    // Pieces may mean more Data-Ins: ExpDataSN counts them.
                    assert_eq!(x.exp_data_sn as usize, data_ins(&a).len());
                }
                other => panic!("different endings: {other:?}"),
            }
        }
    }

    #[test]
    fn short_read_reports_underflow_in_final_data_in() {
        let limits = DataInLimits {
            max_segment: 65536,
            max_burst: 262144,
        };
        let pdus = built(1, 0, 4096, &done(36, None), limits, true);
        let d = data_ins(&pdus);
        assert_eq!(d.len(), 1);
        assert!(d[0].underflow && d[0].status_present);
        assert_eq!(d[0].residual_count, 4060);
        assert_eq!(pdus[0].pdu.data.len(), 36);
    }

    #[test]
    fn long_read_is_truncated_and_reports_overflow() {
        let limits = DataInLimits {
            max_segment: 65536,
            max_burst: 262144,
        };
        let pdus = built(1, 0, 512, &done(1024, None), limits, true);
        let d = data_ins(&pdus);
        assert_eq!(pdus[0].pdu.data.len(), 512);
        assert!(d[0].overflow);
        assert_eq!(d[0].residual_count, 512);
    }

    #[test]
    fn sense_goes_in_a_scsi_response_with_length_prefix() {
        let limits = DataInLimits {
            max_segment: 8192,
            max_burst: 262144,
        };
        let pdus = built(9, 0, 0, &done(0, Some(&[0x70, 0, 5])), limits, false);
        assert_eq!(pdus.len(), 1);
        let Header::ScsiResponse(r) = &pdus[0].pdu.header else {
            panic!("expected a SCSI Response")
        };
        assert_eq!(r.status, 2);
        assert_eq!(&pdus[0].pdu.data[..], &[0, 3, 0x70, 0, 5]);
    }

    #[test]
    fn no_data_gives_a_plain_response() {
        let limits = DataInLimits {
            max_segment: 8192,
            max_burst: 262144,
        };
        let pdus = built(9, 0, 0, &done(0, None), limits, false);
        assert!(matches!(pdus[0].pdu.header, Header::ScsiResponse(_)));
        assert!(pdus[0].pdu.data.is_empty());
    }
}
