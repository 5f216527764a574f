//! SendTargets discovery (RFC 7143 §4.3, Appendix C): a Discovery session,
//! `SendTargets=All` in a Text Request, and the answer — possibly spread over
//! several Text Responses with the C bit or F=0 — read into targets with all
//! their portals and portal group tags (IPv4 and IPv6).
//!
//! [`SendTargets`] wraps `idm`'s sans-IO exchange; [`discover`] drives it
//! over TCP.

use std::time::Duration;

use bytes::Bytes;
use idm::transport::{PduRx, PduTx};
use iscsi_proto::pdu::{logout, Header, LogoutRequest, Pdu, TextResponse};

use crate::conn;
use crate::error::Error;
use crate::login::Auth;
use crate::portal::Portal;

/// One target a portal told us about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    /// Each portal with its target portal group tag (None if the target
    /// omitted it, or listed no address: then the portal asked is implied).
    pub portals: Vec<(Portal, Option<u16>)>,
}

/// Reads the `TargetName` / `TargetAddress` list of a SendTargets answer.
pub fn parse_send_targets(pairs: &[(String, String)]) -> Result<Vec<DiscoveredTarget>, Error> {
    let mut out: Vec<DiscoveredTarget> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => out.push(DiscoveredTarget {
                name: v.clone(),
                portals: Vec::new(),
            }),
            "TargetAddress" => {
                let Some(t) = out.last_mut() else {
                    return Err(Error::Protocol(
                        "TargetAddress before any TargetName".into(),
                    ));
                };
                t.portals.push(Portal::parse_target_address(v)?);
            }
            // TargetAlias and anything vendor-specific are of no use here.
            _ => {}
        }
    }
    Ok(out)
}

/// What to do after a Text Response.
#[derive(Debug)]
pub enum SendTargetsStep {
    /// Ask for the rest: send [`SendTargets::request`] again.
    More,
    Done(Vec<DiscoveredTarget>),
}

/// The SendTargets exchange of one Discovery session: `idm`'s sans-IO
/// exchange, with the answer read into targets and portals.
#[derive(Debug)]
pub struct SendTargets(idm::send_targets::SendTargets);

impl SendTargets {
    pub fn new(itt: u32) -> Self {
        SendTargets(idm::send_targets::SendTargets::new(itt))
    }

    /// The next Text Request.
    pub fn request(&mut self, cmd_sn: u32, exp_stat_sn: u32) -> Pdu {
        self.0.request(cmd_sn, exp_stat_sn)
    }

    pub fn handle(&mut self, resp: &TextResponse, data: &[u8]) -> Result<SendTargetsStep, Error> {
        match self.0.handle(resp, data) {
            Ok(idm::send_targets::SendTargetsStep::More) => Ok(SendTargetsStep::More),
            Ok(idm::send_targets::SendTargetsStep::Done(pairs)) => {
                Ok(SendTargetsStep::Done(parse_send_targets(&pairs)?))
            }
            Err(e) => Err(Error::Protocol(e.to_string())),
        }
    }
}

/// Discovers the targets behind `portal` with a SendTargets Discovery session.
pub async fn discover(
    portal: &Portal,
    initiator_name: &str,
    auth: Auth,
    timeout: Duration,
) -> Result<Vec<DiscoveredTarget>, Error> {
    discover_over(&conn::Link::Tcp, portal, initiator_name, auth, timeout).await
}

/// [`discover`] over the transport `link` names (iSER discovery sessions
/// are what `iscsiadm -m discovery -I iser` does).
pub async fn discover_over(
    link: &conn::Link,
    portal: &Portal,
    initiator_name: &str,
    auth: Auth,
    timeout: Duration,
) -> Result<Vec<DiscoveredTarget>, Error> {
    let mut cfg = crate::login::login_config(initiator_name, None);
    cfg.auth = auth;
    let mut conn = conn::login_over(link, portal, &cfg, timeout).await?;
    let work = async {
        let mut cmd_sn = conn.result.cmd_sn;
        let mut exp_stat_sn = conn.result.exp_stat_sn;
        let mut st = SendTargets::new(1);
        let targets = loop {
            let req = st.request(cmd_sn, exp_stat_sn);
            cmd_sn = cmd_sn.wrapping_add(1);
            conn.tx.send(&[req]).await?;
            let pdu = next_pdu(&mut conn.rx).await?;
            match &pdu.header {
                Header::TextResponse(h) => {
                    exp_stat_sn = h.stat_sn.wrapping_add(1);
                    match st.handle(h, &pdu.data)? {
                        SendTargetsStep::More => continue,
                        SendTargetsStep::Done(t) => break t,
                    }
                }
                Header::Reject(r) => return Err(Error::Rejected(r.reason)),
                Header::NopIn(_) | Header::AsyncMessage(_) => continue,
                other => {
                    return Err(Error::Protocol(format!(
                        "{:?} in answer to SendTargets",
                        other.opcode()
                    )))
                }
            }
        };
        let req = Pdu::new(
            Header::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: logout::CLOSE_SESSION,
                itt: 2,
                cid: conn.result.cid,
                cmd_sn,
                exp_stat_sn,
            }),
            Bytes::new(),
        );
        conn.tx.send(&[req]).await?;
        // A target that drops the connection instead of answering is fine:
        // we have what we came for.
        if let Ok(pdu) = next_pdu(&mut conn.rx).await {
            if let Header::LogoutResponse(h) = &pdu.header {
                tracing::debug!(response = h.response, "discovery session logged out");
            }
        }
        conn.tx.shutdown().await;
        Ok(targets)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| Error::timeout("the SendTargets answer", timeout))?
}

async fn next_pdu(rx: &mut crate::conn::ConnRx) -> Result<Pdu, Error> {
    let raw = rx
        .recv()
        .await?
        .ok_or_else(|| Error::SessionClosed("target closed the discovery connection".into()))?;
    raw.parse().map_err(|e| Error::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_proto::pdu::RESERVED_TAG;
    use iscsi_proto::text;

    /// The last Text Response of exchange ITT 1; with `cont` a bad one
    /// (F and C both set).
    fn last(cont: bool) -> TextResponse {
        TextResponse {
            final_: true,
            cont,
            itt: 1,
            ttt: RESERVED_TAG,
            ..Default::default()
        }
    }

    #[test]
    fn targets_with_several_portals_ipv4_and_ipv6() {
        let data = b"TargetName=iqn.a:one\0TargetAddress=10.0.0.1:3260,1\0TargetAddress=[fd00::1]:3261,2\0TargetName=iqn.a:two\0TargetAlias=x\0";
        let pairs = text::parse_list(data).unwrap();
        let t = parse_send_targets(&pairs).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "iqn.a:one");
        assert_eq!(
            t[0].portals,
            vec![
                (Portal::new("10.0.0.1", 3260), Some(1)),
                (Portal::new("fd00::1", 3261), Some(2))
            ]
        );
        assert!(t[1].portals.is_empty());
    }

    // The exchange itself (continuations, the C bit, flag checks) is
    // `idm::send_targets`'s and tested there; these pin what the wrapper
    // adds: the finished answer read into targets, errors as protocol errors.
    #[test]
    fn finished_answer_is_read_into_targets() {
        let mut st = SendTargets::new(1);
        st.request(5, 6);
        let answer = b"TargetName=iqn.a:long\0TargetAddress=[::1]:3260,1\0";
        let Ok(SendTargetsStep::Done(t)) = st.handle(&last(false), answer) else {
            panic!("a finished answer is Done")
        };
        assert_eq!(t[0].name, "iqn.a:long");
        assert_eq!(t[0].portals, vec![(Portal::new("::1", 3260), Some(1))]);
    }

    #[test]
    fn address_before_name_and_exchange_errors_are_protocol_errors() {
        let pairs = text::parse_list(b"TargetAddress=1.2.3.4\0").unwrap();
        assert!(matches!(
            parse_send_targets(&pairs),
            Err(Error::Protocol(_))
        ));
        let mut st = SendTargets::new(1);
        assert!(matches!(
            st.handle(&last(true), b""),
            Err(Error::Protocol(_))
        ));
    }
}
