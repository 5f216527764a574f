//! libiscsi-style URLs: `iscsi://[user[%password]@]host[:port]/target-iqn/lun`
//! (host may be `[ipv6]`), and the same with `iser://` for iSER (RFC 7145)
//! instead of TCP. A URL without the LUN part names a target.

use crate::portal::Portal;

/// A parsed `iscsi://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    pub portal: Portal,
    pub target: String,
    pub lun: Option<u64>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// `iser://`: the connections are iSER, not TCP.
    pub iser: bool,
}

impl std::fmt::Debug for IscsiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiUrl")
            .field("portal", &self.portal)
            .field("target", &self.target)
            .field("lun", &self.lun)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("iser", &self.iser)
            .finish()
    }
}

/// Why a URL was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid iSCSI URL: {0} (expected iscsi://[user[%password]@]host[:port]/iqn/lun, or iser://...)")]
pub struct UrlError(pub String);

impl IscsiUrl {
    pub fn parse(s: &str) -> Result<IscsiUrl, UrlError> {
        let (rest, iser) = match (s.strip_prefix("iscsi://"), s.strip_prefix("iser://")) {
            (Some(r), _) => (r, false),
            (None, Some(r)) => (r, true),
            (None, None) => {
                return Err(UrlError(
                    "it does not start with iscsi:// or iser://".into(),
                ))
            }
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| UrlError("no target name".into()))?;
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once('%') {
                Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
                None => (Some(u.to_owned()), None),
            },
        };
        let portal = Portal::parse(hostport).map_err(|e| UrlError(e.to_string()))?;
        let path = path.trim_end_matches('/');
        let (target, lun) = match path.rsplit_once('/') {
            Some((t, l)) => {
                let lun = l
                    .parse()
                    .map_err(|_| UrlError(format!("LUN {l:?} is not a number")))?;
                (t, Some(lun))
            }
            None => (path, None),
        };
        if target.is_empty() {
            return Err(UrlError("empty target name".into()));
        }
        Ok(IscsiUrl {
            portal,
            target: target.to_owned(),
            lun,
            user,
            password,
            iser,
        })
    }
}

/// A portal for discovery: `host[:port]`, `iscsi://host[:port]` or
/// `iser://host[:port]`; says whether it is iSER.
pub fn parse_portal(s: &str) -> Result<(Portal, bool), UrlError> {
    let (rest, iser) = match (s.strip_prefix("iscsi://"), s.strip_prefix("iser://")) {
        (Some(r), _) => (r, false),
        (None, Some(r)) => (r, true),
        (None, None) => (s, false),
    };
    let portal = Portal::parse(rest.trim_end_matches('/')).map_err(|e| UrlError(e.to_string()))?;
    Ok((portal, iser))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url_with_credentials_and_port() {
        let u =
            IscsiUrl::parse("iscsi://bob%s3cret@10.1.1.1:3261/iqn.2001-04.com.ex:disk/2").unwrap();
        assert_eq!(u.portal, Portal::new("10.1.1.1", 3261));
        assert_eq!(u.target, "iqn.2001-04.com.ex:disk");
        assert_eq!(u.lun, Some(2));
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert!(!format!("{u:?}").contains("s3cret"));
    }

    #[test]
    fn ipv6_host_default_port_and_no_lun() {
        let u = IscsiUrl::parse("iscsi://[::1]/iqn.x:y").unwrap();
        assert_eq!(u.portal, Portal::new("::1", 3260));
        assert_eq!(u.lun, None);
    }

    #[test]
    fn iser_urls_name_the_same_things_over_iser() {
        let u = IscsiUrl::parse("iser://10.0.0.2/iqn.2001-04.com.ex:disk/1").unwrap();
        assert!(u.iser);
        assert_eq!(u.portal, Portal::new("10.0.0.2", 3260));
        assert_eq!(
            (u.target.as_str(), u.lun),
            ("iqn.2001-04.com.ex:disk", Some(1))
        );
        assert!(!IscsiUrl::parse("iscsi://h/iqn.x:y/0").unwrap().iser);
        assert_eq!(
            parse_portal("iser://[::1]:3261").unwrap(),
            (Portal::new("::1", 3261), true)
        );
        assert_eq!(
            parse_portal("10.0.0.1").unwrap(),
            (Portal::new("10.0.0.1", 3260), false)
        );
        assert!(IscsiUrl::parse("rdma://h/iqn.x:y/0").is_err());
    }

    #[test]
    fn malformed_urls_are_errors() {
        for s in [
            "http://h/iqn/0",
            "iscsi://h",
            "iscsi://h/",
            "iscsi://h/iqn/x",
            "iscsi://[::1/iqn/0",
        ] {
            assert!(IscsiUrl::parse(s).is_err(), "{s}");
        }
    }
}
