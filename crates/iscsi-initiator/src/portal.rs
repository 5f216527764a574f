//! Network portals as iSCSI spells them: `host[:port]` with IPv6 literals in
//! brackets (`[fd00::1]:3260`), optionally followed by `,tpgt` in a
//! TargetAddress (RFC 7143 §13.9).

use std::fmt;

/// The well-known iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;

/// A host and TCP port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Portal {
    /// A host name, an IPv4 literal or an IPv6 literal without brackets.
    pub host: String,
    pub port: u16,
}

/// A portal string we cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid portal {0:?} (expected host[:port] or [ipv6][:port])")]
pub struct PortalError(pub String);

impl Portal {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Portal {
            host: host.into(),
            port,
        }
    }

    /// Reads `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal.
    pub fn parse(s: &str) -> Result<Portal, PortalError> {
        let bad = || PortalError(s.to_owned());
        let s = s.trim();
        if s.is_empty() {
            return Err(bad());
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            if host.is_empty() {
                return Err(bad());
            }
            let port = match after {
                "" => DEFAULT_PORT,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(bad)?,
            };
            return Ok(Portal::new(host, port));
        }
        match s.matches(':').count() {
            0 => Ok(Portal::new(s, DEFAULT_PORT)),
            1 => {
                let (host, port) = s.split_once(':').ok_or_else(bad)?;
                let port = port.parse().map_err(|_| bad())?;
                if host.is_empty() {
                    return Err(bad());
                }
                Ok(Portal::new(host, port))
            }
            // An IPv6 literal without brackets has no room for a port.
            _ => Ok(Portal::new(s, DEFAULT_PORT)),
        }
    }

    /// Reads a TargetAddress value: `portal[,tpgt]`.
    pub fn parse_target_address(s: &str) -> Result<(Portal, Option<u16>), PortalError> {
        match s.rsplit_once(',') {
            Some((addr, tpgt)) => {
                let tpgt = tpgt.parse().map_err(|_| PortalError(s.to_owned()))?;
                Ok((Portal::parse(addr)?, Some(tpgt)))
            }
            None => Ok((Portal::parse(s)?, None)),
        }
    }
}

impl fmt::Display for Portal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_names_with_and_without_port() {
        assert_eq!(
            Portal::parse("10.0.0.1").unwrap(),
            Portal::new("10.0.0.1", 3260)
        );
        assert_eq!(
            Portal::parse("storage:3261").unwrap(),
            Portal::new("storage", 3261)
        );
    }

    #[test]
    fn ipv6_in_brackets_and_bare() {
        assert_eq!(
            Portal::parse("[fd00::1]:3262").unwrap(),
            Portal::new("fd00::1", 3262)
        );
        assert_eq!(Portal::parse("[::1]").unwrap(), Portal::new("::1", 3260));
        assert_eq!(
            Portal::parse("fe80::2").unwrap(),
            Portal::new("fe80::2", 3260)
        );
        assert_eq!(Portal::new("::1", 5).to_string(), "[::1]:5");
    }

    #[test]
    fn target_address_with_tpgt() {
        assert_eq!(
            Portal::parse_target_address("[::1]:3260,7").unwrap(),
            (Portal::new("::1", 3260), Some(7))
        );
        assert_eq!(
            Portal::parse_target_address("192.168.1.2:3260,1").unwrap(),
            (Portal::new("192.168.1.2", 3260), Some(1))
        );
        assert_eq!(
            Portal::parse_target_address("host").unwrap(),
            (Portal::new("host", 3260), None)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for s in ["", "[", "[]", "[::1]x", "h:99999", ":3260", "h:p", "a:1,x"] {
            assert!(Portal::parse_target_address(s).is_err(), "{s}");
        }
    }
}
