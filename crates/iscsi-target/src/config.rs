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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortalGroupConfig {
    pub tag: u16,
    pub portals: Vec<String>,
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
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    #[serde(default)]
    pub chap_user: Option<String>,
    #[serde(default)]
    pub chap_secret: Option<String>,
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunConfig>,
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
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 65_536,
            max_outstanding_r2t: 8,
            max_connections: 8,
            initial_r2t: false,
            immediate_data: true,
            queue_depth: 128,
            nop_in_interval: 10,
            nop_in_timeout: 30,
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
            }],
            targets: vec![TargetConfig {
                iqn: DEFAULT_TARGET_IQN.to_string(),
                alias: Some("target0".to_string()),
                portal_groups: vec![1],
                auth: AuthConfig::None,
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
                }],
            }],
            initiators: vec![],
            discovery: DiscoveryConfig::default(),
            defaults: Defaults::default(),
        }
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
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
        let mut tags = HashSet::new();
        for (i, pg) in self.portal_groups.iter().enumerate() {
            if !tags.insert(pg.tag) {
                errs.push(format!("portal_group[{i}]: duplicate tag {}", pg.tag));
            }
            if pg.tag == 0 {
                errs.push(format!("portal_group[{i}]: tag must be 1..65535"));
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
                match l.backend {
                    BackendKind::File => {
                        if l.path.is_none() {
                            errs.push(format!("{at}: backend \"file\" needs path"));
                        }
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
        let d = &self.defaults;
        if !(512..=16_777_215).contains(&d.max_recv_data_segment_length) {
            errs.push("defaults: max_recv_data_segment_length must be 512..16777215".into());
        }
        if !(512..=16_777_215).contains(&d.max_burst_length)
            || !(512..=16_777_215).contains(&d.first_burst_length)
            || d.first_burst_length > d.max_burst_length
        {
            errs.push("defaults: burst lengths must be 512..16777215 with first <= max".into());
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

/// An iSCSI name of one of the three formats (RFC 7143 §4.2.7).
pub fn is_iscsi_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa."))
        && name.len() <= 223
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
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
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[discovery]\nauth = \"none\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
