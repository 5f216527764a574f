//! The daemon's configuration document (TOML): portal groups, targets with
//! their LUNs, per-initiator CHAP credentials, discovery authentication.
//! Parsing and validation are separate from building the live objects, so
//! `iscsitd --check` can report every problem with where it is.

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "portal_group")]
    pub portal_groups: Vec<PortalGroupConfig>,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    #[serde(default, rename = "initiator")]
    pub initiators: Vec<InitiatorConfig>,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub defaults: Defaults,
    /// Logical units registered once and shown through views (COMSTAR's
    /// model); `[[target.lun]]` stays as a shorthand for an LU seen by
    /// every initiator of one target.
    #[serde(default, rename = "lu")]
    pub lus: Vec<LuDef>,
    #[serde(default, rename = "host_group")]
    pub host_groups: Vec<GroupConfig>,
    #[serde(default, rename = "target_group")]
    pub target_groups: Vec<GroupConfig>,
    #[serde(default, rename = "view")]
    pub views: Vec<ViewConfig>,
    /// ALUA target port groups, the same list on every gateway of a set
    /// (each gateway's portal group tags in its own group); empty: one
    /// active/optimized group.
    #[serde(default, rename = "alua_group", skip_serializing_if = "Vec::is_empty")]
    pub alua_groups: Vec<AluaGroupConfig>,
    #[serde(default, skip_serializing_if = "MetricsConfig::is_off")]
    pub metrics: MetricsConfig,
}

/// The optional Prometheus endpoint (`GET /metrics`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback IP:port to serve on ("127.0.0.1:9283"); absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

impl MetricsConfig {
    pub fn is_off(&self) -> bool {
        self.listen.is_none()
    }

    /// The address to serve on, if valid: only loopback, because the
    /// endpoint has no authentication.
    pub fn addr(&self) -> Result<Option<SocketAddr>, String> {
        let Some(l) = &self.listen else {
            return Ok(None);
        };
        match l.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => Ok(Some(a)),
            Ok(_) => Err(format!(
                "metrics: listen {l:?} is not a loopback address (127.0.0.1 or [::1])"
            )),
            Err(_) => Err(format!("metrics: listen {l:?} is not IP:port")),
        }
    }
}

/// A logical unit of the COMSTAR model, named by its GUID.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LuDef {
    /// 16 hex digits starting with 6: the NAA IEEE Registered Extended
    /// designator's high half (VPD 83h), also the LU's name for the tools.
    pub guid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub backend: BackendKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_cache: Option<bool>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin: Option<bool>,
    /// backend "file": O_DIRECT, bypassing the page cache (the file system
    /// must support it; requests not aligned to 4096 bytes go through the
    /// page cache).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    /// backend "file": how many of the LU's I/Os run at once, each on its
    /// own thread (default: the device's queue size capped at 64, or 16
    /// for a regular file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_threads: Option<u32>,
    /// An offline LU stays registered but no view shows it.
    #[serde(default = "default_true")]
    pub online: bool,
    /// backend "rbd": the Ceph pool and image, the cluster's ceph.conf
    /// (default: librados's search) and the cephx client id (default "admin").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_conf: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_id: Option<String>,
}

fn default_true() -> bool {
    true
}

/// One ALUA target port group: a gateway's portal group tags (its relative
/// target port ids) and the state initiators see them in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AluaGroupConfig {
    pub id: u16,
    /// "active-optimized" or "active-non-optimized".
    pub state: String,
    pub portal_groups: Vec<u16>,
}

/// A host group (initiator names) or a target group (target names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    #[serde(default)]
    pub members: Vec<String>,
}

/// LU → (host group, target group) at a LUN. No host group: every
/// initiator; no target group: every target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub lu: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_group: Option<String>,
    pub lun: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortalGroupConfig {
    pub tag: u16,
    pub portals: Vec<String>,
    /// Also listen for iSER (RFC 7145) on these addresses, beside TCP
    /// (LIO's np `iser` attribute; needs an RDMA device on the address).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iser: bool,
    /// Listen for iSCSI over TCP (`false` with `iser = true`: iSER only).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub tcp: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthConfig {
    #[default]
    None,
    Chap,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub iqn: String,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default = "default_tpgs")]
    pub portal_groups: Vec<u16>,
    /// None: the defaults' auth method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    #[serde(default)]
    pub chap_user: Option<String>,
    #[serde(default)]
    pub chap_secret: Option<String>,
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunConfig>,
    /// An offline target refuses logins and is not discovered (stmfadm
    /// offline-target); it keeps its configuration.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub online: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_tpgs() -> Vec<u16> {
    vec![1]
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Memory,
    File,
    Null,
    /// A Ceph RBD image (`[[lu]]` only), shared by every gateway that opens it.
    Rbd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    pub lun: u64,
    pub backend: BackendKind,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub write_cache: Option<bool>,
    #[serde(default)]
    pub read_only: bool,
    /// backend "file": O_DIRECT, bypassing the page cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    /// backend "file": I/O threads of the LU (default: from the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_threads: Option<u32>,
}

fn default_block_size() -> u32 {
    512
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitiatorConfig {
    pub name: String,
    pub chap_user: String,
    pub chap_secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    #[serde(default)]
    pub auth: AuthConfig,
    /// SendTargets=All in a discovery session lists every online target, not
    /// only those whose access list admits the asking initiator (off: an
    /// initiator learns only of targets it may log in to).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub list_all_targets: bool,
}

/// Operational defaults offered to initiators.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub max_connections: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Commands an initiator may queue per session (MaxCmdSN - ExpCmdSN + 1).
    pub queue_depth: u32,
    /// Seconds of silence before the target pings with NOP-In (0: never).
    pub nop_in_interval: u64,
    /// Seconds to wait for the NOP-Out answer before dropping the connection.
    pub nop_in_timeout: u64,
    /// Bytes of responses a connection may have queued and unsent before the
    /// target stops reading its requests (what a client that stops reading can cost).
    pub connection_buffer_limit: u64,
    /// Bytes of write data the whole daemon may hold while collecting it
    /// (R2T / Data-Out) across every session; beyond it, writes get TASK SET FULL.
    pub write_buffer_limit: u64,
    /// Sessions the daemon serves at once (discovery included); more get a
    /// login failure "out of resources" (3/2).
    pub max_sessions: u32,
    /// Seconds a login may take before the connection is dropped.
    pub login_timeout: u64,
    /// Auth method of targets that do not name one.
    pub auth: AuthConfig,
    /// CHAP algorithms offered, in order of preference: sha3-256, sha256, sha1, md5.
    pub chap_algorithms: Vec<String>,
    /// iSNS registration on/off, and the servers (IP[:port], port 3205
    /// by default) iscsitd registers its entity, targets and portals with.
    pub isns: bool,
    pub isns_servers: Vec<String>,
}

/// CHAP algorithm names the defaults accept.
pub const CHAP_ALGORITHMS: [&str; 4] = ["sha3-256", "sha256", "sha1", "md5"];

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 8,
            max_connections: 8,
            initial_r2t: false,
            immediate_data: true,
            queue_depth: 128,
            nop_in_interval: 10,
            nop_in_timeout: 30,
            connection_buffer_limit: 8 << 20,
            write_buffer_limit: 512 << 20,
            max_sessions: 4096,
            login_timeout: 30,
            auth: AuthConfig::None,
            chap_algorithms: CHAP_ALGORITHMS.iter().map(|s| s.to_string()).collect(),
            isns: false,
            isns_servers: vec![],
        }
    }
}

/// The embedded default: one 1 GiB memory LU at 127.0.0.1:3260.
pub const DEFAULT_TARGET_IQN: &str = "iqn.2026-11.dev.ironstar:target0";

impl Config {
    pub fn embedded_default() -> Config {
        Config {
            portal_groups: vec![PortalGroupConfig {
                tag: 1,
                portals: vec!["127.0.0.1:3260".to_string()],
                iser: false,
                tcp: true,
            }],
            targets: vec![TargetConfig {
                iqn: DEFAULT_TARGET_IQN.to_string(),
                alias: Some("target0".to_string()),
                portal_groups: vec![1],
                auth: None,
                allowed_initiators: vec![],
                chap_user: None,
                chap_secret: None,
                luns: vec![LunConfig {
                    lun: 0,
                    backend: BackendKind::Memory,
                    size: Some("1GiB".to_string()),
                    path: None,
                    block_size: 512,
                    serial: None,
                    write_cache: None,
                    read_only: false,
                    direct: false,
                    io_threads: None,
                }],
                online: true,
            }],
            initiators: vec![],
            discovery: DiscoveryConfig::default(),
            defaults: Defaults::default(),
            lus: vec![],
            host_groups: vec![],
            target_groups: vec![],
            alua_groups: vec![],
            views: vec![],
            metrics: MetricsConfig::default(),
        }
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether target `iqn` exists and is online (accepts logins).
    pub fn target_online(&self, iqn: &str) -> bool {
        self.targets
            .iter()
            .any(|t| t.iqn.eq_ignore_ascii_case(iqn) && t.online)
    }

    pub fn load(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{path}: {m}")),
            other => other,
        })
    }

    /// Every problem, each with its location.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        if let Err(e) = self.metrics.addr() {
            errs.push(e);
        }
        let mut tags = HashSet::new();
        for (i, pg) in self.portal_groups.iter().enumerate() {
            if !tags.insert(pg.tag) {
                errs.push(format!("portal_group[{i}]: duplicate tag {}", pg.tag));
            }
            if pg.tag == 0 {
                errs.push(format!("portal_group[{i}]: tag must be 1..65535"));
            }
            if !pg.tcp && !pg.iser {
                errs.push(format!(
                    "portal_group[{i}]: tcp = false needs iser = true (it would listen on nothing)"
                ));
            }
            for p in &pg.portals {
                if p.parse::<SocketAddr>().is_err() {
                    errs.push(format!(
                        "portal_group[{i}]: portal {p:?} is not IP:port (IPv6 as [addr]:port)"
                    ));
                }
            }
        }
        let mut iqns = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("target[{i}] ({})", t.iqn);
            if !is_iscsi_name(&t.iqn) {
                errs.push(format!("{at}: {:?} is not an iqn./eui./naa. name", t.iqn));
            }
            if !iqns.insert(t.iqn.to_ascii_lowercase()) {
                errs.push(format!("{at}: duplicate target name"));
            }
            for tag in &t.portal_groups {
                if !tags.contains(tag) {
                    errs.push(format!("{at}: portal group {tag} is not defined"));
                }
            }
            if t.chap_user.is_some() != t.chap_secret.is_some() {
                errs.push(format!("{at}: chap_user and chap_secret go together"));
            }
            if let Some(s) = &t.chap_secret {
                if s.len() < 12 || s.len() > 255 {
                    errs.push(format!("{at}: chap_secret must be 12..255 characters"));
                }
            }
            let mut luns = HashSet::new();
            for (j, l) in t.luns.iter().enumerate() {
                let at = format!("{at} lun[{j}]");
                if !luns.insert(l.lun) {
                    errs.push(format!("{at}: duplicate LUN {}", l.lun));
                }
                if l.lun > 16383 {
                    errs.push(format!("{at}: LUN must be 0..16383"));
                }
                if l.block_size != 512 && l.block_size != 4096 {
                    errs.push(format!("{at}: block_size must be 512 or 4096"));
                }
                check_file_props(&at, l.backend, l.direct, l.io_threads, &mut errs);
                match l.backend {
                    BackendKind::File => {
                        if l.path.is_none() {
                            errs.push(format!("{at}: backend \"file\" needs path"));
                        }
                    }
                    BackendKind::Rbd => {
                        errs.push(format!("{at}: backend \"rbd\" is for [[lu]] only"));
                    }
                    BackendKind::Memory | BackendKind::Null => match l.size.as_deref() {
                        None => errs.push(format!("{at}: backend needs size (e.g. \"1GiB\")")),
                        Some(s) => match parse_size(s) {
                            Some(n)
                                if n >= u64::from(l.block_size)
                                    && n % u64::from(l.block_size) == 0 => {}
                            _ => errs.push(format!(
                                "{at}: size {s:?} is not a positive multiple of the block size"
                            )),
                        },
                    },
                }
            }
        }
        for (i, ini) in self.initiators.iter().enumerate() {
            if !is_iscsi_name(&ini.name) {
                errs.push(format!(
                    "initiator[{i}]: {:?} is not an iSCSI name",
                    ini.name
                ));
            }
            if ini.chap_secret.len() < 12 || ini.chap_secret.len() > 255 {
                errs.push(format!(
                    "initiator[{i}] ({}): chap_secret must be 12..255 characters",
                    ini.name
                ));
            }
        }
        self.validate_model(&mut errs);
        let mut alua_ids = HashSet::new();
        for (i, g) in self.alua_groups.iter().enumerate() {
            if g.id == 0 || !alua_ids.insert(g.id) {
                errs.push(format!("alua_group[{i}]: id must be 1..65535 and unique"));
            }
            if scsi_target::AluaState::parse(&g.state).is_none() {
                errs.push(format!(
                    "alua_group[{i}]: state {:?} is not active-optimized or active-non-optimized",
                    g.state
                ));
            }
        }
        let d = &self.defaults;
        for a in &d.chap_algorithms {
            if !CHAP_ALGORITHMS.contains(&a.to_ascii_lowercase().as_str()) {
                errs.push(format!(
                    "defaults: chap_algorithms: {a:?} is not one of {}",
                    CHAP_ALGORITHMS.join(", ")
                ));
            }
        }
        if d.chap_algorithms.is_empty() {
            errs.push("defaults: chap_algorithms must name at least one algorithm".into());
        }
        for s in &d.isns_servers {
            if let Err(e) = crate::isns::parse_server(s) {
                errs.push(format!("defaults: isns_servers: {e}"));
            }
        }
        if d.isns_servers.len() > 8 {
            errs.push("defaults: isns_servers: at most 8 servers".into());
        }
        if !(512..=16_777_215).contains(&d.max_recv_data_segment_length) {
            errs.push("defaults: max_recv_data_segment_length must be 512..16777215".into());
        }
        if !(512..=16_777_215).contains(&d.max_burst_length)
            || !(512..=16_777_215).contains(&d.first_burst_length)
            || d.first_burst_length > d.max_burst_length
        {
            errs.push("defaults: burst lengths must be 512..16777215 with first <= max".into());
        }
        if !(1 << 20..=1 << 30).contains(&d.connection_buffer_limit) {
            errs.push("defaults: connection_buffer_limit must be 1MiB..1GiB (in bytes)".into());
        }
        if !(1 << 20..=1 << 40).contains(&d.write_buffer_limit) {
            errs.push("defaults: write_buffer_limit must be 1MiB..1TiB (in bytes)".into());
        }
        if d.max_sessions == 0 || !(1..=3600).contains(&d.login_timeout) {
            errs.push("defaults: max_sessions must be >= 1, login_timeout 1..3600 seconds".into());
        }
        if d.queue_depth == 0 || d.queue_depth > 4096 || d.max_outstanding_r2t == 0 {
            errs.push("defaults: queue_depth must be 1..4096, max_outstanding_r2t >= 1".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }
}

impl Config {
    /// Every LU: the registered ones, then the `[[target.lun]]` shorthands
    /// (with the target and LUN they stand for).
    pub fn all_lus(&self) -> Vec<(LuDef, Option<(String, u64)>)> {
        let mut out: Vec<(LuDef, Option<(String, u64)>)> =
            self.lus.iter().map(|l| (l.clone(), None)).collect();
        for t in &self.targets {
            for l in &t.luns {
                out.push((implicit_lu(&t.iqn, l), Some((t.iqn.clone(), l.lun))));
            }
        }
        out
    }

    /// Finds a registered LU by GUID or alias.
    pub fn find_lu(&self, name: &str) -> Option<usize> {
        self.lus
            .iter()
            .position(|l| l.guid.eq_ignore_ascii_case(name))
            .or_else(|| {
                self.lus
                    .iter()
                    .position(|l| l.alias.as_deref() == Some(name))
            })
    }

    pub fn host_group(&self, name: &str) -> Option<&GroupConfig> {
        self.host_groups.iter().find(|g| g.name == name)
    }

    pub fn target_group(&self, name: &str) -> Option<&GroupConfig> {
        self.target_groups.iter().find(|g| g.name == name)
    }

    /// Who a view reaches: `None` is everyone.
    fn view_scope(&self, v: &ViewConfig) -> (Option<Vec<String>>, Option<Vec<String>>) {
        let members = |g: Option<&GroupConfig>| {
            g.map(|g| g.members.iter().map(|m| m.to_ascii_lowercase()).collect())
                .unwrap_or_default()
        };
        (
            v.host_group.as_deref().map(|h| members(self.host_group(h))),
            v.target_group
                .as_deref()
                .map(|t| members(self.target_group(t))),
        )
    }

    /// The LUNs `initiator` sees at `target` (`None`: only views for all
    /// hosts), with the GUID of each LU; offline LUs are left out.
    pub fn lun_map_for(&self, initiator: Option<&str>, target: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let target_lc = target.to_ascii_lowercase();
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| t.iqn.eq_ignore_ascii_case(target))
        {
            for l in &t.luns {
                out.push((l.lun, implicit_lu(&t.iqn, l).guid));
            }
        }
        let ini_lc = initiator.map(str::to_ascii_lowercase);
        for v in &self.views {
            let Some(lu) = self.find_lu(&v.lu).and_then(|i| self.lus.get(i)) else {
                continue;
            };
            if !lu.online {
                continue;
            }
            let (hosts, targets) = self.view_scope(v);
            let host_ok = match (&hosts, &ini_lc) {
                (None, _) => true,
                (Some(h), Some(i)) => h.contains(i),
                (Some(_), None) => false,
            };
            let target_ok = targets.as_ref().is_none_or(|t| t.contains(&target_lc));
            if host_ok && target_ok && !out.iter().any(|(n, _)| *n == v.lun) {
                out.push((v.lun, lu.guid.clone()));
            }
        }
        out.sort();
        out
    }

    /// The lowest LUN free for a new view of this scope.
    pub fn free_lun(&self, host_group: Option<&str>, target_group: Option<&str>) -> Option<u64> {
        let probe = ViewConfig {
            lu: String::new(),
            host_group: host_group.map(String::from),
            target_group: target_group.map(String::from),
            lun: 0,
        };
        (0..=MAX_LUN).find(|&lun| {
            let v = ViewConfig {
                lun,
                ..probe.clone()
            };
            self.view_conflict(&v, None).is_none()
        })
    }

    /// Another view or a `[[target.lun]]` that could meet `v` at the same
    /// LUN for some (initiator, target) pair; `skip` is `v`'s own index.
    pub fn view_conflict(&self, v: &ViewConfig, skip: Option<usize>) -> Option<String> {
        let (h1, t1) = self.view_scope(v);
        let meets = |a: &Option<Vec<String>>, b: &Option<Vec<String>>| match (a, b) {
            (Some(a), Some(b)) => a.iter().any(|x| b.contains(x)),
            _ => true,
        };
        for (i, w) in self.views.iter().enumerate() {
            if Some(i) == skip || w.lun != v.lun {
                continue;
            }
            let (h2, t2) = self.view_scope(w);
            let same_groups = w.host_group == v.host_group && w.target_group == v.target_group;
            if same_groups || (meets(&h1, &h2) && meets(&t1, &t2)) {
                return Some(format!(
                    "view[{i}] of LU {} already uses LUN {}",
                    w.lu, w.lun
                ));
            }
        }
        for t in &self.targets {
            let reached = t1
                .as_ref()
                .is_none_or(|m| m.contains(&t.iqn.to_ascii_lowercase()));
            if reached && t.luns.iter().any(|l| l.lun == v.lun) {
                return Some(format!(
                    "target {} has LUN {} in its [[target.lun]]",
                    t.iqn, v.lun
                ));
            }
        }
        None
    }

    fn validate_model(&self, errs: &mut Vec<String>) {
        let mut guids = HashSet::new();
        let mut aliases = HashSet::new();
        for (i, (l, implicit)) in self.all_lus().iter().enumerate() {
            let at = match implicit {
                Some((t, n)) => format!("target {t} LUN {n}"),
                None => format!("lu[{i}] ({})", l.guid),
            };
            if implicit.is_none() {
                if !is_guid(&l.guid) {
                    errs.push(format!(
                        "{at}: guid {:?} must be 16 hex digits starting with 6",
                        l.guid
                    ));
                }
                check_lu_backend(
                    &at,
                    l.backend,
                    l.size.as_deref(),
                    l.path.is_some(),
                    l.block_size,
                    errs,
                );
                check_file_props(&at, l.backend, l.direct, l.io_threads, errs);
                if l.backend == BackendKind::Rbd && (l.pool.is_none() || l.image.is_none()) {
                    errs.push(format!("{at}: backend \"rbd\" needs pool and image"));
                }
                if let Some(a) = &l.alias {
                    if a.is_empty() || !aliases.insert(a.clone()) {
                        errs.push(format!("{at}: alias {a:?} is empty or used twice"));
                    }
                }
                for (what, v, max) in [
                    ("vid", &l.vid, 8),
                    ("pid", &l.pid, 16),
                    ("serial", &l.serial, 64),
                ] {
                    if let Some(v) = v {
                        if v.is_empty()
                            || v.len() > max
                            || !v.bytes().all(|b| (0x20..0x7f).contains(&b))
                        {
                            errs.push(format!(
                                "{at}: {what} must be 1..{max} printable ASCII characters"
                            ));
                        }
                    }
                }
            }
            if !guids.insert(l.guid.to_ascii_lowercase()) {
                errs.push(format!("{at}: duplicate LU guid {}", l.guid));
            }
        }
        for (kind, groups, names_ok) in [
            ("host_group", &self.host_groups, "initiator"),
            ("target_group", &self.target_groups, "target"),
        ] {
            let mut names = HashSet::new();
            for (i, g) in groups.iter().enumerate() {
                let at = format!("{kind}[{i}] ({})", g.name);
                if !is_group_name(&g.name) {
                    errs.push(format!(
                        "{at}: name must be 1..64 letters, digits, '.', '-', '_' or ':'"
                    ));
                }
                if !names.insert(g.name.clone()) {
                    errs.push(format!("{at}: duplicate {kind} name"));
                }
                let mut seen = HashSet::new();
                for m in &g.members {
                    if !is_iscsi_name(m) {
                        errs.push(format!(
                            "{at}: member {m:?} is not an {names_ok} iSCSI name"
                        ));
                    }
                    if !seen.insert(m.to_ascii_lowercase()) {
                        errs.push(format!("{at}: member {m} listed twice"));
                    }
                }
            }
        }
        for (i, v) in self.views.iter().enumerate() {
            let at = format!("view[{i}] (LU {} LUN {})", v.lu, v.lun);
            if self.find_lu(&v.lu).is_none() {
                errs.push(format!("{at}: no LU {:?} (give a [[lu]] guid)", v.lu));
            }
            if let Some(h) = &v.host_group {
                if self.host_group(h).is_none() {
                    errs.push(format!("{at}: host group {h:?} is not defined"));
                }
            }
            if let Some(t) = &v.target_group {
                if self.target_group(t).is_none() {
                    errs.push(format!("{at}: target group {t:?} is not defined"));
                }
            }
            if v.lun > MAX_LUN {
                errs.push(format!("{at}: LUN must be 0..{MAX_LUN}"));
            }
            if let Some(why) = self.view_conflict(v, Some(i)) {
                // Report each clash once, at the later view.
                let earlier = self.views.iter().take(i).any(|w| w.lun == v.lun);
                if earlier || why.starts_with("target ") {
                    errs.push(format!("{at}: {why}"));
                }
            }
        }
    }
}

/// Highest LUN of the flat addressing the target uses.
pub const MAX_LUN: u64 = 16383;

/// Most I/O threads one LU may have.
pub const MAX_IO_THREADS: u32 = 1024;

/// `direct` and `io_threads` are properties of file LUs.
fn check_file_props(
    at: &str,
    backend: BackendKind,
    direct: bool,
    io_threads: Option<u32>,
    errs: &mut Vec<String>,
) {
    if backend != BackendKind::File && (direct || io_threads.is_some()) {
        errs.push(format!(
            "{at}: direct and io_threads are for backend \"file\" only"
        ));
    }
    if let Some(n) = io_threads.filter(|n| !(1..=MAX_IO_THREADS).contains(n)) {
        errs.push(format!("{at}: io_threads {n} must be 1..={MAX_IO_THREADS}"));
    }
}

fn check_lu_backend(
    at: &str,
    backend: BackendKind,
    size: Option<&str>,
    has_path: bool,
    block_size: u32,
    errs: &mut Vec<String>,
) {
    if block_size != 512 && block_size != 4096 {
        errs.push(format!("{at}: block_size must be 512 or 4096"));
    }
    let size_ok = |s: &str| matches!(parse_size(s), Some(n) if n >= u64::from(block_size) && n % u64::from(block_size) == 0);
    match backend {
        BackendKind::File => {
            if !has_path {
                errs.push(format!("{at}: backend \"file\" needs path"));
            }
            if let Some(s) = size {
                if !size_ok(s) {
                    errs.push(format!(
                        "{at}: size {s:?} is not a positive multiple of the block size"
                    ));
                }
            }
        }
        BackendKind::Rbd => {
            if let Some(s) = size.filter(|s| !size_ok(s)) {
                errs.push(format!(
                    "{at}: size {s:?} is not a positive multiple of the block size"
                ));
            }
        }
        BackendKind::Memory | BackendKind::Null => match size {
            None => errs.push(format!("{at}: backend needs size (e.g. \"1GiB\")")),
            Some(s) if !size_ok(s) => errs.push(format!(
                "{at}: size {s:?} is not a positive multiple of the block size"
            )),
            Some(_) => {}
        },
    }
}

/// The FNV-1a hash the `[[target.lun]]` shorthand has always used for its
/// NAA id and serial, so they stay what initiators saw before.
pub fn stable_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A GUID as the tools print it: 16 hex digits, the NAA 6 nibble first.
pub fn guid_from_id(id: u64) -> String {
    format!(
        "{:016X}",
        (id & 0x0FFF_FFFF_FFFF_FFFF) | 0x6000_0000_0000_0000
    )
}

pub fn is_guid(s: &str) -> bool {
    s.len() == 16 && s.starts_with('6') && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_group_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

/// The LU a `[[target.lun]]` stands for.
pub fn implicit_lu(iqn: &str, l: &LunConfig) -> LuDef {
    let id = stable_hash(&format!("{iqn}/{}", l.lun));
    LuDef {
        guid: guid_from_id(id),
        alias: None,
        backend: l.backend,
        size: l.size.clone(),
        path: l.path.clone(),
        block_size: l.block_size,
        serial: Some(l.serial.clone().unwrap_or_else(|| format!("{id:016x}"))),
        vid: None,
        pid: None,
        write_cache: l.write_cache,
        read_only: l.read_only,
        thin: None,
        direct: l.direct,
        io_threads: l.io_threads,
        online: true,
        pool: None,
        image: None,
        ceph_conf: None,
        ceph_id: None,
    }
}

/// An iSCSI name of one of the three formats (RFC 7143 §4.2.7).
pub fn is_iscsi_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let chars_ok = name.len() <= 223
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':');
    let hex = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    chars_ok
        && if let Some(rest) = lower.strip_prefix("iqn.") {
            is_iqn_body(rest)
        } else if let Some(rest) = lower.strip_prefix("eui.") {
            hex(rest, &[16])
        } else if let Some(rest) = lower.strip_prefix("naa.") {
            hex(rest, &[16, 32])
        } else {
            false
        }
}

/// RFC 7143 §4.2.7.3: `yyyy-mm.reversed.domain[:unique]` after "iqn.".
fn is_iqn_body(rest: &str) -> bool {
    let (date, authority) = match rest.split_once('.') {
        Some(p) => p,
        None => return false,
    };
    let b = date.as_bytes();
    let month = date.get(5..7).and_then(|m| m.parse::<u8>().ok());
    let date_ok = b.len() == 7
        && b.iter().take(4).all(u8::is_ascii_digit)
        && b.get(4) == Some(&b'-')
        && matches!(month, Some(1..=12));
    let domain = authority.split(':').next().unwrap_or("");
    date_ok
        && !domain.is_empty()
        && domain
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'))
}

/// "1GiB", "512MiB", "100M", "4096" → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        Config::embedded_default().validate().unwrap();
    }

    #[test]
    fn iscsi_names_follow_rfc_7143_formats() {
        for good in [
            "iqn.2026-11.dev.ironstar:t0",
            "iqn.1994-05.com.redhat:client",
            "IQN.2001-04.com.example",
            "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
            "eui.02004567A425678D",
            "naa.52004567BA64678D",
            "naa.62004567BA64678D0123456789ABCDEF",
        ] {
            assert!(is_iscsi_name(good), "{good}");
        }
        for bad in [
            "not a name",
            "iqn.20x6-11.dev:x",
            "iqn.2026-13.dev.x",
            "iqn.2026-11",
            "iqn.2026-11.:x",
            "iqn.2026-11.dev..x",
            "iqn.2026-1.dev.x",
            "eui.0200",
            "naa.52004567BA64678DX",
            "wwn.1234",
        ] {
            assert!(!is_iscsi_name(bad), "{bad}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let text = r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1"]

[[target]]
iqn = "not-a-name"
portal_groups = [2]
[[target.lun]]
lun = 0
backend = "memory"
size = "1000"
[[target.lun]]
lun = 0
backend = "file"
"#;
        let err = Config::from_toml(text).unwrap_err().to_string();
        for want in [
            "portal_group[0]: portal \"127.0.0.1\"",
            "target[0] (not-a-name): \"not-a-name\" is not",
            "portal group 2 is not defined",
            "lun[0]: size \"1000\"",
            "lun[1]: duplicate LUN 0",
            "lun[1]: backend \"file\" needs path",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
    }

    #[test]
    fn views_are_checked_against_lus_groups_and_each_other() {
        let text = r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]
[[target]]
iqn = "iqn.2026-11.dev.ironstar:t"
[[target.lun]]
lun = 0
backend = "memory"
size = "1MiB"
[[lu]]
guid = "6000000000000001"
backend = "memory"
size = "1MiB"
[[lu]]
guid = "zz"
backend = "memory"
size = "1MiB"
[[host_group]]
name = "a"
members = ["iqn.1994-05.com.example:a", "bad name"]
[[view]]
lu = "6000000000000001"
lun = 0
[[view]]
lu = "6000000000000001"
host_group = "nope"
lun = 2
[[view]]
lu = "6000000000000001"
host_group = "a"
lun = 3
[[view]]
lu = "6000000000000001"
lun = 3
"#;
        let err = Config::from_toml(text).unwrap_err().to_string();
        for want in [
            "lu[1] (zz): guid \"zz\" must be 16 hex digits",
            "host_group[0] (a): member \"bad name\"",
            "view[0] (LU 6000000000000001 LUN 0): target iqn.2026-11.dev.ironstar:t has LUN 0",
            "view[1] (LU 6000000000000001 LUN 2): host group \"nope\" is not defined",
            "view[3] (LU 6000000000000001 LUN 3): view[2] of LU 6000000000000001 already uses LUN 3",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
    }

    #[test]
    fn free_lun_skips_what_overlapping_views_use() {
        let mut c = Config::embedded_default();
        c.lus.push(implicit_lu("x", &c.targets[0].luns[0].clone()));
        c.lus[0].guid = "6000000000000009".into();
        assert_eq!(
            c.free_lun(None, None),
            Some(1),
            "LUN 0 is the target's shorthand"
        );
        c.views.push(ViewConfig {
            lu: "6000000000000009".into(),
            host_group: None,
            target_group: None,
            lun: 1,
        });
        assert_eq!(c.free_lun(None, None), Some(2));
    }

    #[test]
    fn a_config_with_every_section_round_trips_through_toml() {
        let mut c = Config::embedded_default();
        c.lus
            .push(implicit_lu("iqn.x", &c.targets[0].luns[0].clone()));
        c.host_groups.push(GroupConfig {
            name: "h".into(),
            members: vec!["iqn.1994-05.com.example:a".into()],
        });
        c.views.push(ViewConfig {
            lu: c.lus[0].guid.clone(),
            host_group: Some("h".into()),
            target_group: None,
            lun: 4,
        });
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
    }

    #[test]
    fn an_rbd_lu_names_pool_and_image() {
        let ok = r#"
[[lu]]
guid = "600144F0AAAA0001"
backend = "rbd"
pool = "rbd"
image = "lu0"
ceph_conf = "/etc/ceph/ceph.conf"
ceph_id = "admin"
"#;
        let c = Config::from_toml(ok).unwrap();
        assert_eq!(c.lus[0].backend, BackendKind::Rbd);
        assert_eq!(c.lus[0].image.as_deref(), Some("lu0"));
        let err = Config::from_toml(&ok.replace("image = \"lu0\"\n", "")).unwrap_err();
        assert!(err.to_string().contains("needs pool and image"), "{err}");
    }

    #[test]
    fn direct_and_io_threads_are_file_lu_properties() {
        let ok = r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]
[[target]]
iqn = "iqn.2026-11.dev.ironstar:t"
[[target.lun]]
lun = 0
backend = "file"
path = "/var/tmp/lu0.img"
direct = true
io_threads = 8

[[lu]]
guid = "600144F0AAAA0002"
backend = "file"
path = "/var/tmp/lu1.img"
direct = true
"#;
        let c = Config::from_toml(ok).unwrap();
        let l = &c.targets[0].luns[0];
        assert_eq!((l.direct, l.io_threads), (true, Some(8)));
        let d = implicit_lu(&c.targets[0].iqn, l);
        assert_eq!((d.direct, d.io_threads), (true, Some(8)));
        assert_eq!((c.lus[0].direct, c.lus[0].io_threads), (true, None));
        let out = toml::to_string(&c).unwrap();
        assert_eq!(Config::from_toml(&out).unwrap(), c);
        // Off and unset are not written out.
        let plain = Config::from_toml(&ok.replace("direct = true\n", "")).unwrap();
        assert!(!toml::to_string(&plain.lus[0]).unwrap().contains("direct"));
        let err = Config::from_toml(&ok.replace("io_threads = 8", "io_threads = 0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("io_threads 0 must be 1..=1024"), "{err}");
        let mem = "[[lu]]\nguid = \"600144F0AAAA0003\"\nbackend = \"memory\"\nsize = \"1MiB\"\ndirect = true\n";
        let err = Config::from_toml(mem).unwrap_err().to_string();
        assert!(err.contains("for backend \"file\" only"), "{err}");
    }

    #[test]
    fn an_iser_portal_group_round_trips_and_tcp_groups_stay_unmarked() {
        let text = "[[portal_group]]\ntag = 1\nportals = [\"10.0.0.1:3260\"]\niser = true\n\n[[portal_group]]\ntag = 2\nportals = [\"10.0.0.1:3261\"]\n";
        let c = Config::from_toml(text).unwrap();
        assert!(c.portal_groups[0].iser && !c.portal_groups[1].iser);
        assert!(c.portal_groups.iter().all(|g| g.tcp));
        let out = toml::to_string(&c).unwrap();
        assert_eq!(out.matches("iser").count(), 1, "{out}");
        assert!(!out.contains("tcp"), "{out}");
        assert_eq!(Config::from_toml(&out).unwrap(), c);
        let only =
            "[[portal_group]]\ntag = 1\nportals = [\"10.0.0.1:3260\"]\niser = true\ntcp = false\n";
        let c = Config::from_toml(only).unwrap();
        assert!(c.portal_groups[0].iser && !c.portal_groups[0].tcp);
        let neither = "[[portal_group]]\ntag = 1\nportals = [\"10.0.0.1:3260\"]\ntcp = false\n";
        assert!(Config::from_toml(neither).is_err());
    }

    #[test]
    fn alua_groups_need_unique_ids_and_known_states() {
        let text = "[[alua_group]]\nid = 1\nstate = \"active-optimized\"\nportal_groups = [1]\n\
                    [[alua_group]]\nid = 2\nstate = \"active-non-optimized\"\nportal_groups = [2]\n";
        assert_eq!(Config::from_toml(text).unwrap().alua_groups.len(), 2);
        let err = Config::from_toml(
            &text
                .replace("id = 2", "id = 1")
                .replace("active-non", "standby"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unique") && err.contains("standby"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[discovery]\nauth = \"none\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
