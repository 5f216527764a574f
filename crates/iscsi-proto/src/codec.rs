//! Framing: cuts PDUs out of a byte stream (RFC 7143 §11.1 layout:
//! BHS, AHS, header digest, data segment, pad, data digest).
//!
//! Shaped like tokio-util's `Decoder`: `decode(&mut BytesMut)` returns
//! `Ok(None)` for "need more bytes" and never consumes a partial PDU, so the
//! caller may feed bytes in any split. Lengths are checked before anything is
//! buffered: a peer cannot make us reserve more than the negotiated
//! MaxRecvDataSegmentLength (plus a fixed slack for the login phase).

use bytes::{Buf, BytesMut};
use thiserror::Error;

use crate::digest;
use crate::pdu::{self, RawPdu, BHS_LEN};

/// Why the stream cannot be framed any further, or one PDU must be refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header digest did not match: the lengths cannot be trusted, so the
    /// connection must be dropped (RFC 7143 §7.8).
    #[error("header digest mismatch (got {got:#010x}, expected {expected:#010x})")]
    HeaderDigest { got: u32, expected: u32 },
    /// The data digest did not match: the PDU was consumed and must be
    /// answered with a Reject (reason 0x02) carrying this BHS.
    #[error("data digest mismatch")]
    DataDigest { bhs: Box<[u8; BHS_LEN]> },
    /// DataSegmentLength beyond what we declared we can receive: protocol
    /// error, the connection is closed after a Reject.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong {
        len: u32,
        max: u32,
        bhs: Box<[u8; BHS_LEN]>,
    },
}

/// Framing state for one direction of one connection.
#[derive(Debug, Clone)]
pub struct PduDecoder {
    /// CRC32C on headers (negotiated HeaderDigest).
    pub header_digest: bool,
    /// CRC32C on data segments (negotiated DataDigest).
    pub data_digest: bool,
    /// The largest data segment we accept (our MaxRecvDataSegmentLength).
    pub max_data_segment_length: u32,
}

impl Default for PduDecoder {
    fn default() -> Self {
        PduDecoder {
            header_digest: false,
            data_digest: false,
            // RFC 7143 §6.1: during login the limit is 8192 bytes.
            max_data_segment_length: 8192,
        }
    }
}

impl PduDecoder {
    pub fn new(max_data_segment_length: u32) -> Self {
        PduDecoder {
            max_data_segment_length,
            ..Default::default()
        }
    }

    /// The total wire length of the PDU whose BHS starts `buf`, if the BHS is there.
    fn frame_len(&self, bhs: &[u8; BHS_LEN]) -> usize {
        let ahs = pdu::total_ahs_length(bhs);
        let data = pdu::data_segment_length(bhs) as usize;
        let mut len = BHS_LEN + ahs;
        if self.header_digest {
            len += 4;
        }
        if data > 0 {
            len += data + digest::pad_len(data);
            if self.data_digest {
                len += 4;
            }
        }
        len
    }

    /// Cuts one PDU from the front of `buf`, or returns `Ok(None)` when more
    /// bytes are needed. On `Err`, see [`DecodeError`] for what was consumed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<RawPdu>, DecodeError> {
        let Some(head) = buf.get(..BHS_LEN) else {
            buf.reserve(BHS_LEN);
            return Ok(None);
        };
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(head);
        let ahs_len = pdu::total_ahs_length(&bhs);
        if self.header_digest {
            // Verify as soon as the digest is here, before trusting lengths.
            let Some(hd) = buf.get(BHS_LEN + ahs_len..BHS_LEN + ahs_len + 4) else {
                buf.reserve(ahs_len + 4);
                return Ok(None);
            };
            let got = digest::from_wire([hd[0], hd[1], hd[2], hd[3]]);
            let expected = digest::crc32c(buf.get(..BHS_LEN + ahs_len).unwrap_or(&[]));
            if got != expected {
                return Err(DecodeError::HeaderDigest { got, expected });
            }
        }
        let dlen = pdu::data_segment_length(&bhs);
        if dlen > self.max_data_segment_length {
            return Err(DecodeError::DataSegmentTooLong {
                len: dlen,
                max: self.max_data_segment_length,
                bhs: Box::new(bhs),
            });
        }
        let total = self.frame_len(&bhs);
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(BHS_LEN);
        let ahs = frame.split_to(ahs_len);
        if self.header_digest {
            frame.advance(4);
        }
        let dlen = dlen as usize;
        let data = frame.split_to(dlen);
        if dlen > 0 && self.data_digest {
            let pad = digest::pad_len(dlen);
            let expected = digest::data_digest(&data, pad);
            let got = frame
                .get(pad..pad + 4)
                .map(|d| digest::from_wire([d[0], d[1], d[2], d[3]]));
            if got != Some(expected) {
                return Err(DecodeError::DataDigest { bhs: Box::new(bhs) });
            }
        }
        Ok(Some(RawPdu { bhs, ahs, data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{DataOut, Header, NopOut, Pdu, ScsiCommand};
    use bytes::Bytes;

    fn sample_pdus() -> Vec<Pdu> {
        vec![
            Pdu::new(
                Header::NopOut(NopOut {
                    itt: 1,
                    ..Default::default()
                }),
                Bytes::from_static(b"abc"),
            ),
            Pdu::new(
                Header::ScsiCommand(ScsiCommand {
                    write: true,
                    extended_cdb: Some(Bytes::from_static(&[9; 5])),
                    ..Default::default()
                }),
                Bytes::from(vec![7u8; 1001]),
            ),
            Pdu::new(
                Header::DataOut(DataOut {
                    final_: true,
                    ..Default::default()
                }),
                Bytes::new(),
            ),
        ]
    }

    #[test]
    fn decodes_any_split_of_the_stream() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let pdus = sample_pdus();
            let mut wire = BytesMut::new();
            for p in &pdus {
                p.encode(hd, dd, &mut wire);
            }
            let wire = wire.freeze();
            for chunk in [1usize, 3, 47, 48, 49, 1000, wire.len()] {
                let mut dec = PduDecoder {
                    header_digest: hd,
                    data_digest: dd,
                    max_data_segment_length: 8192,
                };
                let mut buf = BytesMut::new();
                let mut out = Vec::new();
                for piece in wire.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    while let Some(raw) = dec.decode(&mut buf).unwrap() {
                        out.push(raw.parse().unwrap());
                    }
                }
                assert_eq!(out, pdus, "split {chunk} digests {hd}/{dd}");
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn need_more_consumes_nothing() {
        let wire = sample_pdus()[1].to_bytes(false, false);
        let mut dec = PduDecoder::default();
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), wire.len() - 1);
    }

    #[test]
    fn oversized_data_segment_is_refused_before_buffering() {
        let mut bhs = [0u8; BHS_LEN];
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]); // 16 MiB - 1
        let mut buf = BytesMut::from(&bhs[..]);
        let err = PduDecoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::DataSegmentTooLong { len: 0xff_ffff, .. }
        ));
        assert!(buf.capacity() < 1 << 20);
    }

    /// Fuzz finding F1: a Data-In with S=0 carried its reserved Status byte
    /// through parsing, so parse -> encode -> parse was not the identity.
    #[test]
    fn data_in_without_status_round_trips() {
        let mut wire = BytesMut::from(
            &b"\x25\x80\x00\x32\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
\x00\x00\x00\x01\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\
\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"[..],
        );
        let pdu = PduDecoder::default()
            .decode(&mut wire)
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        let mut again = BytesMut::from(&pdu.to_bytes(false, false)[..]);
        let back = PduDecoder::default()
            .decode(&mut again)
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(back, pdu);
    }

    #[test]
    fn bad_header_digest_is_fatal() {
        let mut wire = BytesMut::from(&sample_pdus()[0].to_bytes(true, false)[..]);
        wire[20] ^= 1;
        let mut dec = PduDecoder {
            header_digest: true,
            ..Default::default()
        };
        assert!(matches!(
            dec.decode(&mut wire),
            Err(DecodeError::HeaderDigest { .. })
        ));
    }

    #[test]
    fn bad_data_digest_consumes_the_pdu_and_keeps_the_stream() {
        let pdus = sample_pdus();
        let mut wire = BytesMut::new();
        pdus[0].encode(false, true, &mut wire);
        let flip = BHS_LEN + 1;
        wire[flip] ^= 0x40;
        pdus[2].encode(false, true, &mut wire);
        let mut dec = PduDecoder {
            data_digest: true,
            ..Default::default()
        };
        assert!(matches!(
            dec.decode(&mut wire),
            Err(DecodeError::DataDigest { .. })
        ));
        let next = dec.decode(&mut wire).unwrap().unwrap().parse().unwrap();
        assert_eq!(next, pdus[2]);
    }
}
