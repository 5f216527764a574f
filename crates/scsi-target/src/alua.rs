//! Asymmetric logical unit access (SPC-4 §5.16) for LUs served by several
//! gateways: each gateway's ports form a target port group, one group is
//! active/optimized and the others active/non-optimized, so an initiator's
//! multipath layer prefers one gateway and fails over to the others.
//!
//! Implicit ALUA only (TPGS = 01b): the states come from the configuration
//! and SET TARGET PORT GROUPS is not offered. Both states accept every
//! command, so no command is refused for its path.

use crate::Nexus;

/// The asymmetric access states a group can be configured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluaState {
    ActiveOptimized,
    ActiveNonOptimized,
}

impl AluaState {
    /// The ASYMMETRIC ACCESS STATE code of REPORT TARGET PORT GROUPS.
    fn code(self) -> u8 {
        match self {
            AluaState::ActiveOptimized => 0x0,
            AluaState::ActiveNonOptimized => 0x1,
        }
    }

    /// "active-optimized" / "active-non-optimized" (also "optimized",
    /// "non-optimized", "ao", "ano").
    pub fn parse(s: &str) -> Option<AluaState> {
        match s.to_ascii_lowercase().as_str() {
            "active-optimized" | "optimized" | "ao" => Some(AluaState::ActiveOptimized),
            "active-non-optimized" | "non-optimized" | "ano" => Some(AluaState::ActiveNonOptimized),
            _ => None,
        }
    }
}

/// One target port group: its id, state and relative target port ids
/// (for iSCSI, the portal group tags of the gateway's portals).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AluaGroup {
    pub id: u16,
    pub state: AluaState,
    pub relative_ports: Vec<u16>,
}

/// The target port group of the nexus's port: the configured group that
/// holds it, else what the port said.
pub(crate) fn group_of(groups: &[AluaGroup], nexus: &Nexus) -> u16 {
    groups
        .iter()
        .find(|g| g.relative_ports.contains(&nexus.relative_target_port_id))
        .map_or(nexus.target_port_group_id, |g| g.id)
}

/// The target port group descriptors of REPORT TARGET PORT GROUPS: every
/// configured group, or without configuration one active/optimized group
/// holding the nexus's own port.
pub(crate) fn descriptors(groups: &[AluaGroup], nexus: &Nexus) -> Vec<u8> {
    let own = AluaGroup {
        id: nexus.target_port_group_id,
        state: AluaState::ActiveOptimized,
        relative_ports: vec![nexus.relative_target_port_id],
    };
    let list = if groups.is_empty() {
        std::slice::from_ref(&own)
    } else {
        groups
    };
    let mut v = Vec::with_capacity(list.len() * 12);
    for g in list {
        let pref = if g.state == AluaState::ActiveOptimized {
            0x80
        } else {
            0
        };
        v.push(pref | g.state.code());
        // Supported states: active/non-optimized (AN_SUP), active/optimized (AO_SUP).
        v.push(if groups.is_empty() { 0x01 } else { 0x03 });
        v.extend_from_slice(&g.id.to_be_bytes());
        v.push(0);
        v.push(0); // status code: no status available
        v.push(0);
        let ports = &g.relative_ports[..g.relative_ports.len().min(255)];
        v.push(ports.len() as u8);
        for p in ports {
            v.extend_from_slice(&[0, 0]);
            v.extend_from_slice(&p.to_be_bytes());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn two_gateways() -> Vec<AluaGroup> {
        vec![
            AluaGroup {
                id: 1,
                state: AluaState::ActiveOptimized,
                relative_ports: vec![1],
            },
            AluaGroup {
                id: 2,
                state: AluaState::ActiveNonOptimized,
                relative_ports: vec![2],
            },
        ]
    }

    #[test]
    fn report_target_port_groups_lists_every_gateway_with_its_state() {
        let lu = mem_lu();
        lu.set_alua(two_gateways());
        let n = ready_nexus(&lu, 1);
        let r = exec(&lu, &n, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
        assert_good(&r);
        let d = &r.data_in;
        assert_eq!(&d[..4], &[0, 0, 0, 24]);
        // Group 1: PREF, active/optimized, one port (1).
        assert_eq!(&d[4..8], &[0x80, 0x03, 0, 1]);
        assert_eq!((d[11], &d[14..16]), (1, &[0u8, 1][..]));
        // Group 2: active/non-optimized, one port (2).
        assert_eq!(&d[16..20], &[0x01, 0x03, 0, 2]);
        assert_eq!((d[23], &d[26..28]), (1, &[0u8, 2][..]));
    }

    #[test]
    fn device_identification_names_the_group_of_the_nexus_port() {
        let lu = mem_lu();
        lu.set_alua(two_gateways());
        let mut n = nexus(1);
        n.relative_target_port_id = 2;
        let r = exec(&lu, &n, &[0x12, 1, 0x83, 0, 255, 0], &[]);
        assert_good(&r);
        // The target port group designator (type 5) carries group 2.
        let d = &r.data_in[4..];
        let mut at = 0;
        let mut found = None;
        while at + 4 <= d.len() {
            let len = usize::from(d[at + 3]);
            if d[at + 1] & 0x0F == 5 {
                found = Some(u16::from_be_bytes([d[at + 6], d[at + 7]]));
            }
            at += 4 + len;
        }
        assert_eq!(found, Some(2));
    }

    #[test]
    fn states_parse_by_name() {
        assert_eq!(
            AluaState::parse("active-non-optimized"),
            Some(AluaState::ActiveNonOptimized)
        );
        assert_eq!(AluaState::parse("AO"), Some(AluaState::ActiveOptimized));
        assert_eq!(AluaState::parse("standby"), None);
    }
}
