//! `pdu_decoder`: any bytes, cut into any pieces, through `PduDecoder` and
//! `RawPdu::parse`; every parsed PDU must survive encode → decode → parse.

use bytes::BytesMut;
use iscsi_proto::codec::{DecodeError, PduDecoder};
use iscsi_proto::pdu::{Pdu, RawPdu};

use crate::format::{pdu_max_dsl, Reader, PDU_DATA_DIGEST, PDU_HEADER_DIGEST};

/// What the decoder did, in order; compared between split and whole feeding.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Pdu(RawPdu),
    Error(DecodeError),
}

fn decoder(flags: u8) -> PduDecoder {
    PduDecoder {
        header_digest: flags & PDU_HEADER_DIGEST != 0,
        data_digest: flags & PDU_DATA_DIGEST != 0,
        max_data_segment_length: pdu_max_dsl(flags),
    }
}

/// Decodes what `buf` holds; returns false once the connection would be
/// dropped (a header digest or a length we refuse).
fn drain(dec: &mut PduDecoder, buf: &mut BytesMut, events: &mut Vec<Event>) -> bool {
    loop {
        let before = buf.len();
        match dec.decode(buf) {
            Ok(Some(raw)) => {
                assert!(buf.len() < before, "a PDU was decoded from nothing");
                events.push(Event::Pdu(raw));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return true;
            }
            Err(e @ DecodeError::DataDigest { .. }) => {
                // The PDU was consumed; the connection goes on after a Reject.
                assert!(buf.len() < before, "a data digest error consumed nothing");
                events.push(Event::Error(e));
            }
            Err(e) => {
                events.push(Event::Error(e));
                return false;
            }
        }
    }
}

fn round_trip(pdu: &Pdu, flags: u8) {
    let hd = flags & PDU_HEADER_DIGEST != 0;
    let dd = flags & PDU_DATA_DIGEST != 0;
    let mut wire = BytesMut::new();
    pdu.encode(hd, dd, &mut wire);
    let mut dec = PduDecoder {
        header_digest: hd,
        data_digest: dd,
        max_data_segment_length: 16_777_215,
    };
    let raw = match dec.decode(&mut wire) {
        Ok(Some(raw)) => raw,
        other => panic!("our own encoding of {pdu:?} does not decode: {other:?}"),
    };
    assert!(
        wire.is_empty(),
        "our encoding of {pdu:?} left {} bytes",
        wire.len()
    );
    match raw.parse() {
        Ok(again) => assert_eq!(&again, pdu, "PDU changed through encode/decode"),
        Err(e) => panic!("our own encoding of {pdu:?} does not parse: {e:?}"),
    }
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let nsplits = usize::from(r.u8() % 16);
    let splits = r.take(nsplits);
    let stream = r.rest();

    // Fed in pieces.
    let mut dec = decoder(flags);
    let mut buf = BytesMut::new();
    let mut split_events = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = match splits.get(i % splits.len().max(1)) {
            Some(&s) if s > 0 => usize::from(s).min(rest.len()),
            _ => rest.len(),
        };
        i += 1;
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(piece);
        if !drain(&mut dec, &mut buf, &mut split_events) {
            break;
        }
    }

    // Fed at once: the same PDUs and errors, in the same order.
    let mut dec = decoder(flags);
    let mut whole = BytesMut::from(stream);
    let mut whole_events = Vec::new();
    drain(&mut dec, &mut whole, &mut whole_events);
    assert_eq!(split_events, whole_events, "split and whole feeding differ");

    for ev in split_events {
        if let Event::Pdu(raw) = ev {
            let opcode = raw.opcode_byte();
            let itt = raw.itt();
            if let Ok(pdu) = raw.parse() {
                assert_eq!(
                    pdu.opcode() as u8,
                    opcode & 0x3f,
                    "opcode changed by parsing"
                );
                if let Some(parsed_itt) = pdu.header.itt() {
                    assert_eq!(parsed_itt, itt, "ITT changed by parsing");
                }
                round_trip(&pdu, flags);
            }
        }
    }
}
