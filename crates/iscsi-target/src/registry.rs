//! The live model built from the configuration: targets with their LUN
//! maps, portal groups, initiator credentials. Logins consult it; the
//! session table lives beside it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use scsi_target::{
    Backend, FileBackend, LogicalUnit, LuConfig, LunMap, MemoryBackend, NullBackend,
};
use thiserror::Error;

use crate::config::{AuthConfig, BackendKind, Config, Defaults, InitiatorConfig, LunConfig};
use crate::session::SessionTable;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("target {target} LUN {lun}: {what}")]
    Lun {
        target: String,
        lun: u64,
        what: String,
    },
}

/// One iSCSI target node.
pub struct Target {
    pub iqn: String,
    pub alias: Option<String>,
    pub portal_groups: Vec<u16>,
    pub auth: AuthConfig,
    /// Empty: every initiator may log in.
    pub allowed_initiators: Vec<String>,
    /// The target's own CHAP credentials, for mutual CHAP.
    pub mutual_chap: Option<(String, Vec<u8>)>,
    pub luns: LunMap,
}

impl Target {
    pub fn admits(&self, initiator: &str) -> bool {
        self.allowed_initiators.is_empty()
            || self
                .allowed_initiators
                .iter()
                .any(|a| a.eq_ignore_ascii_case(initiator))
    }
}

pub struct PortalGroup {
    pub tag: u16,
    pub portals: Vec<SocketAddr>,
}

/// Everything a login needs to know.
pub struct Registry {
    pub targets: Vec<Arc<Target>>,
    pub portal_groups: Vec<PortalGroup>,
    pub initiators: HashMap<String, InitiatorConfig>,
    pub discovery_auth: AuthConfig,
    pub defaults: Defaults,
    pub sessions: SessionTable,
}

impl Registry {
    pub fn build(config: &Config) -> Result<Registry, BuildError> {
        let mut targets = Vec::new();
        for t in &config.targets {
            let mut luns = LunMap::new();
            for l in &t.luns {
                let lu = build_lu(&t.iqn, l).map_err(|what| BuildError::Lun {
                    target: t.iqn.clone(),
                    lun: l.lun,
                    what,
                })?;
                luns.insert(l.lun, lu);
            }
            let mutual_chap = match (&t.chap_user, &t.chap_secret) {
                (Some(u), Some(s)) => Some((u.clone(), s.as_bytes().to_vec())),
                _ => None,
            };
            targets.push(Arc::new(Target {
                iqn: t.iqn.clone(),
                alias: t.alias.clone(),
                portal_groups: t.portal_groups.clone(),
                auth: t.auth,
                allowed_initiators: t.allowed_initiators.clone(),
                mutual_chap,
                luns,
            }));
        }
        let portal_groups = config
            .portal_groups
            .iter()
            .map(|pg| PortalGroup {
                tag: pg.tag,
                portals: pg.portals.iter().filter_map(|p| p.parse().ok()).collect(),
            })
            .collect();
        let initiators = config
            .initiators
            .iter()
            .map(|i| (i.name.to_ascii_lowercase(), i.clone()))
            .collect();
        Ok(Registry {
            targets,
            portal_groups,
            initiators,
            discovery_auth: config.discovery.auth,
            defaults: config.defaults.clone(),
            sessions: SessionTable::default(),
        })
    }

    pub fn target(&self, iqn: &str) -> Option<&Arc<Target>> {
        self.targets
            .iter()
            .find(|t| t.iqn.eq_ignore_ascii_case(iqn))
    }

    pub fn initiator(&self, name: &str) -> Option<&InitiatorConfig> {
        self.initiators.get(&name.to_ascii_lowercase())
    }

    pub fn portal_group(&self, tag: u16) -> Option<&PortalGroup> {
        self.portal_groups.iter().find(|pg| pg.tag == tag)
    }
}

/// A stable 64-bit value from text (FNV-1a), for identifiers that must not
/// change across restarts (NAA id, serial number).
fn stable_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn build_lu(target_iqn: &str, l: &LunConfig) -> Result<Arc<LogicalUnit>, String> {
    let size = l
        .size
        .as_deref()
        .and_then(crate::config::parse_size)
        .unwrap_or(0);
    let backend: Box<dyn Backend> = match l.backend {
        BackendKind::Memory => Box::new(MemoryBackend::new(size)),
        BackendKind::Null => Box::new(NullBackend::new(size)),
        BackendKind::File => {
            let path = l.path.as_deref().ok_or("backend \"file\" needs path")?;
            Box::new(FileBackend::open(path, l.read_only).map_err(|e| format!("{path}: {e}"))?)
        }
    };
    let id = stable_hash(&format!("{target_iqn}/{}", l.lun));
    let serial = l.serial.clone().unwrap_or_else(|| format!("{:016x}", id));
    let config = LuConfig {
        block_size: l.block_size,
        vendor: "IRONSTAR".to_string(),
        product: match l.backend {
            BackendKind::Memory => "MEMORY LU".to_string(),
            BackendKind::File => "FILE LU".to_string(),
            BackendKind::Null => "NULL LU".to_string(),
        },
        revision: "0001".to_string(),
        serial,
        naa_id: id,
        write_cache: l.write_cache.unwrap_or(true),
        read_only: l.read_only,
        thin_provisioning: matches!(l.backend, BackendKind::Memory | BackendKind::File),
    };
    LogicalUnit::new(config, backend).map_err(|e| e.to_string())
}
