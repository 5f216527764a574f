//! The initiator's side of a SendTargets exchange (RFC 7143 §4.3,
//! Appendix C), sans-IO: `SendTargets=All` in a Text Request, then empty
//! requests carrying the target's TTT until the answer — possibly split
//! mid-pair by the C bit or spread over F=0 responses — is complete. The
//! result is the raw key=value list; reading `TargetAddress` into portals
//! is the caller's business.

use bytes::Bytes;
use iscsi_proto::pdu::{Header, Pdu, TextRequest, TextResponse, RESERVED_TAG};
use iscsi_proto::text;
use thiserror::Error;

/// Largest SendTargets answer we reassemble.
pub const MAX_ANSWER: usize = 1 << 20;

/// The target broke the rules of the Text exchange.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("SendTargets: {0}")]
pub struct SendTargetsError(pub String);

/// What to do after a Text Response.
#[derive(Debug)]
pub enum SendTargetsStep {
    /// Ask for the rest: send [`SendTargets::request`] again.
    More,
    /// The whole answer, as key=value pairs in order.
    Done(Vec<(String, String)>),
}

/// The SendTargets exchange of one Discovery session.
#[derive(Debug)]
pub struct SendTargets {
    itt: u32,
    ttt: u32,
    answer: Vec<u8>,
    started: bool,
}

impl SendTargets {
    pub fn new(itt: u32) -> Self {
        SendTargets {
            itt,
            ttt: RESERVED_TAG,
            answer: Vec::new(),
            started: false,
        }
    }

    /// The next Text Request: `SendTargets=All` first, then empty ones
    /// carrying the target's TTT to pull the continuation.
    pub fn request(&mut self, cmd_sn: u32, exp_stat_sn: u32) -> Pdu {
        let mut data = Vec::new();
        if !self.started {
            text::encode(&[("SendTargets", "All")], &mut data);
            self.started = true;
        }
        Pdu::new(
            Header::TextRequest(TextRequest {
                immediate: false,
                final_: true,
                cont: false,
                lun: 0,
                itt: self.itt,
                ttt: self.ttt,
                cmd_sn,
                exp_stat_sn,
            }),
            Bytes::from(data),
        )
    }

    pub fn handle(
        &mut self,
        resp: &TextResponse,
        data: &[u8],
    ) -> Result<SendTargetsStep, SendTargetsError> {
        let err = |s: String| Err(SendTargetsError(s));
        if resp.itt != self.itt {
            return err(format!("Text Response for ITT {:#x}", resp.itt));
        }
        if self.answer.len().saturating_add(data.len()) > MAX_ANSWER {
            return err("answer larger than 1 MiB".into());
        }
        self.answer.extend_from_slice(data);
        if resp.final_ && resp.cont {
            return err("Text Response with both F and C".into());
        }
        if !resp.final_ {
            if resp.ttt == RESERVED_TAG {
                return err("Text Response continues without a Target Transfer Tag".into());
            }
            self.ttt = resp.ttt;
            return Ok(SendTargetsStep::More);
        }
        let pairs = text::parse_list(&self.answer).map_err(|e| SendTargetsError(e.to_string()))?;
        Ok(SendTargetsStep::Done(pairs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(final_: bool, cont: bool, ttt: u32) -> TextResponse {
        TextResponse {
            final_,
            cont,
            itt: 1,
            ttt,
            ..Default::default()
        }
    }

    #[test]
    fn answer_split_by_the_c_bit_mid_pair_is_reassembled() {
        let mut st = SendTargets::new(1);
        let first = st.request(5, 6);
        assert_eq!(&first.data[..], b"SendTargets=All\0");
        let step = st
            .handle(&resp(false, true, 0x44), b"TargetName=iqn.a:lo")
            .unwrap();
        assert!(matches!(step, SendTargetsStep::More));
        let again = st.request(6, 7);
        let Header::TextRequest(h) = &again.header else {
            panic!()
        };
        assert!(again.data.is_empty());
        assert_eq!(h.ttt, 0x44);
        let SendTargetsStep::Done(pairs) = st
            .handle(
                &resp(true, false, RESERVED_TAG),
                b"ng\0TargetAddress=[::1]:3260,1\0",
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(pairs[0], ("TargetName".into(), "iqn.a:long".into()));
        assert_eq!(pairs[1], ("TargetAddress".into(), "[::1]:3260,1".into()));
    }

    #[test]
    fn bad_flags_and_foreign_itts_are_errors() {
        let mut st = SendTargets::new(1);
        st.request(0, 0);
        assert!(st.handle(&resp(false, false, RESERVED_TAG), b"").is_err());
        let mut st = SendTargets::new(1);
        assert!(st.handle(&resp(true, true, 1), b"").is_err());
        let mut st = SendTargets::new(2);
        assert!(st.handle(&resp(true, false, 1), b"").is_err());
    }
}
