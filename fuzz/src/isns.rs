//! Harness for `isns_decoder`: any bytes, cut into pieces chosen by the
//! first byte, into `iscsi_target::isns::Decoder` (what an iSNS server
//! sends the daemon's client).
//!
//! Checks besides "no panic": feeding the pieces gives the same messages
//! and the same first error as feeding everything at once; every message
//! encodes and decodes back equal; the answers the client would give (ESI
//! response, response check) never panic.

use iscsi_target::isns::{self, Decoder, Message};

fn run_all(pieces: &[&[u8]]) -> (Vec<Message>, Option<isns::IsnsError>) {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for p in pieces {
        d.push(p);
        loop {
            match d.next_message() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

pub fn run(data: &[u8]) {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 64) + 1;
    let pieces: Vec<&[u8]> = bytes.chunks(step).collect();
    let (whole, whole_err) = run_all(&[bytes]);
    let (split, split_err) = run_all(&pieces);
    assert_eq!(whole, split, "split feeding changed the messages");
    assert_eq!(whole_err, split_err, "split feeding changed the error");
    for m in &whole {
        let mut d = Decoder::new();
        d.push(&m.encode());
        let back = d.next_message();
        assert_eq!(back.as_ref().ok().and_then(|b| b.as_ref()), Some(m));
        let _ = isns::answer_server_message(m);
        let req = Message {
            function: m.function & !isns::function::RESPONSE,
            flags: isns::flags::CLIENT,
            xid: m.xid,
            status: None,
            attrs: vec![],
        };
        let _ = isns::check_response(&req, m);
        for a in &m.attrs {
            let _ = (a.as_str(), a.as_u32(), a.as_ip());
        }
    }
}
