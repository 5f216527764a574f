//! The daemon's TOML configuration, built in code and rendered by hand (the format is small,
//! and writing it out keeps this crate free of dependencies).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{GIB, INITIATOR_IQN, MIB, TARGET_IQN};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    Chap,
}

impl Auth {
    fn as_str(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Chap => "chap",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Backend {
    Memory { size: u64 },
    Null { size: u64 },
    File { path: PathBuf },
}

#[derive(Clone, Debug)]
pub struct Lun {
    pub lun: u32,
    pub backend: Backend,
    pub block_size: u32,
}

impl Lun {
    pub fn memory(lun: u32, size: u64) -> Self {
        Lun {
            lun,
            backend: Backend::Memory { size },
            block_size: 512,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    pub iqn: String,
    pub alias: Option<String>,
    pub auth: Auth,
    pub allowed_initiators: Vec<String>,
    /// The target's own CHAP credentials, for mutual CHAP.
    pub chap: Option<(String, String)>,
    pub luns: Vec<Lun>,
}

#[derive(Clone, Debug)]
pub struct Initiator {
    pub name: String,
    pub chap_user: String,
    pub chap_secret: String,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub targets: Vec<Target>,
    pub initiators: Vec<Initiator>,
    pub discovery_auth: Auth,
    /// Raw TOML lines for `[defaults]` (e.g. `nop_in_interval = 0`).
    pub defaults: Vec<String>,
}

impl Config {
    /// One target, [`TARGET_IQN`], no authentication, LUN 0 a memory LU of `size` bytes.
    pub fn single_memory_lu(size: u64) -> Self {
        Config {
            targets: vec![Target {
                iqn: TARGET_IQN.to_string(),
                alias: Some("target0".to_string()),
                auth: Auth::None,
                allowed_initiators: Vec::new(),
                chap: None,
                luns: vec![Lun::memory(0, size)],
            }],
            initiators: Vec::new(),
            discovery_auth: Auth::None,
            defaults: Vec::new(),
        }
    }

    /// Turns on one-way CHAP for every target, with `user`/`secret` kept for [`INITIATOR_IQN`].
    pub fn with_chap(mut self, user: &str, secret: &str) -> Self {
        for t in &mut self.targets {
            t.auth = Auth::Chap;
        }
        self.initiators.push(Initiator {
            name: INITIATOR_IQN.to_string(),
            chap_user: user.to_string(),
            chap_secret: secret.to_string(),
        });
        self
    }

    /// Renders the config with one portal group (tag 1) holding `portal`.
    pub fn to_toml(&self, portal: SocketAddr) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            s,
            "[[portal_group]]\ntag = 1\nportals = [{}]\n",
            quote(&portal.to_string())
        );
        for t in &self.targets {
            let _ = writeln!(s, "[[target]]\niqn = {}", quote(&t.iqn));
            if let Some(alias) = &t.alias {
                let _ = writeln!(s, "alias = {}", quote(alias));
            }
            let _ = writeln!(s, "portal_groups = [1]\nauth = {}", quote(t.auth.as_str()));
            let allowed: Vec<String> = t.allowed_initiators.iter().map(|i| quote(i)).collect();
            let _ = writeln!(s, "allowed_initiators = [{}]", allowed.join(", "));
            if let Some((user, secret)) = &t.chap {
                let _ = writeln!(
                    s,
                    "chap_user = {}\nchap_secret = {}",
                    quote(user),
                    quote(secret)
                );
            }
            s.push('\n');
            for l in &t.luns {
                let _ = writeln!(s, "[[target.lun]]\nlun = {}", l.lun);
                match &l.backend {
                    Backend::Memory { size } => {
                        let _ = writeln!(
                            s,
                            "backend = \"memory\"\nsize = {}",
                            quote(&size_str(*size))
                        );
                    }
                    Backend::Null { size } => {
                        let _ =
                            writeln!(s, "backend = \"null\"\nsize = {}", quote(&size_str(*size)));
                    }
                    Backend::File { path } => {
                        let _ = writeln!(
                            s,
                            "backend = \"file\"\npath = {}",
                            quote(&path.display().to_string())
                        );
                    }
                }
                let _ = writeln!(s, "block_size = {}\n", l.block_size);
            }
        }
        for i in &self.initiators {
            let _ = writeln!(
                s,
                "[[initiator]]\nname = {}\nchap_user = {}\nchap_secret = {}\n",
                quote(&i.name),
                quote(&i.chap_user),
                quote(&i.chap_secret)
            );
        }
        let _ = writeln!(
            s,
            "[discovery]\nauth = {}",
            quote(self.discovery_auth.as_str())
        );
        if !self.defaults.is_empty() {
            let _ = writeln!(s, "\n[defaults]\n{}", self.defaults.join("\n"));
        }
        s
    }
}

/// A TOML basic string.
fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Sizes in the config's human form ("1GiB", "64MiB"); plain bytes when not a whole unit.
fn size_str(bytes: u64) -> String {
    if bytes != 0 && bytes % GIB == 0 {
        format!("{}GiB", bytes / GIB)
    } else if bytes != 0 && bytes % MIB == 0 {
        format!("{}MiB", bytes / MIB)
    } else if bytes != 0 && bytes % 1024 == 0 {
        format!("{}KiB", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_format() {
        let cfg = Config::single_memory_lu(GIB).with_chap("client", "clientsecret12");
        let text = cfg.to_toml("127.0.0.1:3260".parse().unwrap());
        for want in [
            "[[portal_group]]\ntag = 1\nportals = [\"127.0.0.1:3260\"]",
            "[[target]]\niqn = \"iqn.2026-11.dev.ironstar:target0\"",
            "portal_groups = [1]\nauth = \"chap\"",
            "allowed_initiators = []",
            "[[target.lun]]\nlun = 0\nbackend = \"memory\"\nsize = \"1GiB\"\nblock_size = 512",
            "[[initiator]]\nname = \"iqn.2026-11.dev.ironstar:client\"\nchap_user = \"client\"\nchap_secret = \"clientsecret12\"",
            "[discovery]\nauth = \"none\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn ipv6_portals_keep_their_brackets() {
        let text = Config::single_memory_lu(MIB).to_toml("[::1]:3260".parse().unwrap());
        assert!(text.contains("portals = [\"[::1]:3260\"]"), "{text}");
    }

    #[test]
    fn sizes_use_the_largest_whole_unit() {
        assert_eq!(size_str(GIB), "1GiB");
        assert_eq!(size_str(64 * MIB), "64MiB");
        assert_eq!(size_str(3 * GIB / 2), "1536MiB");
        assert_eq!(size_str(4096), "4KiB");
        assert_eq!(size_str(1000), "1000");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
