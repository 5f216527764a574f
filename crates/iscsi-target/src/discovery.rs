//! SendTargets (RFC 7143 §12.3 and Appendix C): the targets an initiator may
//! see, each with a TargetAddress per portal of its portal groups.

use std::net::SocketAddr;

use iscsi_proto::negotiation::SessionType;

use crate::registry::Registry;
use crate::session::Session;

/// Formats a portal for TargetAddress: `ip:port,tpgt`, IPv6 in brackets.
pub fn target_address(addr: SocketAddr, tag: u16) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{},{tag}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{},{tag}", a.ip(), a.port()),
    }
}

/// Appends the answer to `SendTargets=<value>` to `out`.
///
/// In a discovery session `All` lists every target the initiator may log in
/// to (every online target with `[discovery] list_all_targets`); in a normal
/// session only the session's own target is reported.
/// A wildcard portal (0.0.0.0 / ::) is reported as the address the
/// initiator reached us on.
pub fn send_targets(
    registry: &Registry,
    session: &Session,
    value: &str,
    local: Option<SocketAddr>,
    out: &mut Vec<u8>,
) {
    let wanted = |iqn: &str| match session.session_type {
        SessionType::Discovery => value == "All" || value.eq_ignore_ascii_case(iqn),
        SessionType::Normal => {
            session
                .target_name
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(iqn))
                && (value == "All" || value.is_empty() || value.eq_ignore_ascii_case(iqn))
        }
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    let model = registry.snapshot();
    for t in &model.targets {
        let admitted = t.admits(&session.initiator_name)
            || (session.session_type == SessionType::Discovery
                && model.config.discovery.list_all_targets);
        if !wanted(&t.iqn) || !admitted || !model.config.target_online(&t.iqn) {
            continue;
        }
        pairs.push(("TargetName".into(), t.iqn.clone()));
        for tag in &t.portal_groups {
            let Some(pg) = model.portal_group(*tag) else {
                continue;
            };
            for p in &pg.portals {
                let addr = match (p.ip().is_unspecified(), local) {
                    (true, Some(l)) => SocketAddr::new(l.ip(), p.port()),
                    _ => *p,
                };
                pairs.push(("TargetAddress".into(), target_address(addr, *tag)));
            }
        }
    }
    // SendTargets answers repeat TargetAddress keys: encode without the
    // duplicate check of the negotiation text.
    iscsi_proto::text::encode(&pairs, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_formatted_per_family() {
        assert_eq!(
            target_address("127.0.0.1:3260".parse().unwrap(), 1),
            "127.0.0.1:3260,1"
        );
        assert_eq!(
            target_address("[::1]:3261".parse().unwrap(), 7),
            "[::1]:3261,7"
        );
    }
}
