//! The text-key table of RFC 7143 §13 (plus §12.1 AuthMethod, RFC 7144's
//! iSCSIProtocolLevel and the iSER keys of RFC 7145 §6): the single source of
//! truth the negotiation engine is driven by, in the manner of SPDK's
//! `{key, default, allowed values, rule}` table.
//!
//! Every row says how the key is negotiated (`KeyKind`), what values it takes
//! (`Syntax`), its default, its range, its scope, in which phase it may be
//! used, who may send it, and when it is irrelevant. The negotiator never
//! names a key's rule in code; it reads it here.

/// How a key's result is obtained (RFC 7143 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Announced by its sender, never answered.
    Declarative,
    /// The responder picks the first value of the offerer's list it supports.
    List,
    /// Result is the smaller of offer and responder's value.
    NumericMin,
    /// Result is the larger of offer and responder's value.
    NumericMax,
    /// Result is offer AND responder's value.
    BoolAnd,
    /// Result is offer OR responder's value.
    BoolOr,
}

/// The shape of a key's value (RFC 7143 §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `Yes` or `No`.
    Boolean,
    /// A `numerical-value` within [`KeyDef::range`].
    Numeric,
    /// One of (or, for [`KeyKind::List`], a comma-separated list of) these names.
    Choice(&'static [&'static str]),
    /// An iSCSI name (`iqn.`, `eui.`, `naa.`), at most 223 bytes.
    IscsiName,
    /// Free text (UTF-8), within the text layer's length limits.
    Text,
}

/// Where a negotiated value applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// SW: the whole session.
    SessionWide,
    /// CO: this connection only.
    ConnectionOnly,
}

/// When a key may be sent (RFC 7143 §13 "Use").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// LO: only during the login of the leading connection.
    LeadingOnly,
    /// IO: only during login (any connection).
    InitializeOnly,
    /// FFPO: only in Full Feature Phase (Text requests).
    FullFeatureOnly,
    /// Only during the Security Negotiation stage.
    SecurityOnly,
    /// ALL: login and Full Feature Phase.
    Any,
}

/// Who may originate a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Senders {
    /// The initiator only.
    Initiator,
    /// The target only.
    Target,
    /// Both sides.
    Both,
}

/// The conditions under which a key is answered `Irrelevant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrrelevantWhen {
    /// `SessionType=Discovery`.
    pub discovery: bool,
    /// `RDMAExtensions=No` (all the iSER keys of RFC 7145 §6).
    pub rdma_off: bool,
    /// `InitialR2T=Yes` and `ImmediateData=No` (FirstBurstLength, §13.14).
    pub no_unsolicited_data: bool,
}

const NEVER: IrrelevantWhen = IrrelevantWhen {
    discovery: false,
    rdma_off: false,
    no_unsolicited_data: false,
};
const IN_DISCOVERY: IrrelevantWhen = IrrelevantWhen {
    discovery: true,
    rdma_off: false,
    no_unsolicited_data: false,
};
const WITHOUT_RDMA: IrrelevantWhen = IrrelevantWhen {
    discovery: true,
    rdma_off: true,
    no_unsolicited_data: false,
};

/// One row of the key table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDef {
    /// The key name, case-sensitive as on the wire.
    pub name: &'static str,
    /// How the result is obtained.
    pub kind: KeyKind,
    /// The value's shape.
    pub syntax: Syntax,
    /// The RFC default, as it would appear on the wire (None: no default).
    pub default: Option<&'static str>,
    /// Inclusive numeric range for [`Syntax::Numeric`].
    pub range: Option<(u64, u64)>,
    /// Session-wide or connection-only.
    pub scope: Scope,
    /// When it may be used.
    pub usage: Usage,
    /// Who may send it.
    pub senders: Senders,
    /// An iSER key (RFC 7145 §6).
    pub iser: bool,
    /// When it is answered `Irrelevant`.
    pub irrelevant_when: IrrelevantWhen,
    /// Obsoleted by RFC 7143 §13.25 (the markers): understood, never enabled.
    pub obsolete: bool,
}

/// Largest data segment length any of the length keys admit: 2^24 - 1.
pub const MAX_SEGMENT_LENGTH: u64 = (1 << 24) - 1;

const DIGESTS: &[&str] = &["CRC32C", "None"];
const AUTH_METHODS: &[&str] = &["KRB5", "SRP", "SPKM1", "SPKM2", "CHAP", "None"];
const SESSION_TYPES: &[&str] = &["Discovery", "Normal"];
const TASK_REPORTING: &[&str] = &["RFC3720", "ResponseFence", "FastAbort"];

/// A row with the fields most keys share; the table below overrides the rest.
const BASE: KeyDef = KeyDef {
    name: "",
    kind: KeyKind::Declarative,
    syntax: Syntax::Text,
    default: None,
    range: None,
    scope: Scope::SessionWide,
    usage: Usage::LeadingOnly,
    senders: Senders::Both,
    iser: false,
    irrelevant_when: NEVER,
    obsolete: false,
};

const fn numeric(
    name: &'static str,
    kind: KeyKind,
    default: &'static str,
    min: u64,
    max: u64,
    irrelevant_when: IrrelevantWhen,
) -> KeyDef {
    KeyDef {
        name,
        kind,
        syntax: Syntax::Numeric,
        default: Some(default),
        range: Some((min, max)),
        irrelevant_when,
        ..BASE
    }
}

const fn boolean(
    name: &'static str,
    kind: KeyKind,
    default: &'static str,
    irrelevant_when: IrrelevantWhen,
) -> KeyDef {
    KeyDef {
        name,
        kind,
        syntax: Syntax::Boolean,
        default: Some(default),
        irrelevant_when,
        ..BASE
    }
}

const fn iser(def: KeyDef) -> KeyDef {
    KeyDef { iser: true, ..def }
}

const fn obsolete(def: KeyDef) -> KeyDef {
    KeyDef {
        obsolete: true,
        usage: Usage::InitializeOnly,
        scope: Scope::ConnectionOnly,
        ..def
    }
}

/// Every key this implementation understands.
pub static KEYS: &[KeyDef] = &[
    // RFC 7143 §12.1
    KeyDef {
        name: "AuthMethod",
        kind: KeyKind::List,
        syntax: Syntax::Choice(AUTH_METHODS),
        default: Some("None"),
        scope: Scope::ConnectionOnly,
        usage: Usage::SecurityOnly,
        ..BASE
    },
    // §13.1
    KeyDef {
        name: "HeaderDigest",
        kind: KeyKind::List,
        syntax: Syntax::Choice(DIGESTS),
        default: Some("None"),
        scope: Scope::ConnectionOnly,
        usage: Usage::InitializeOnly,
        ..BASE
    },
    KeyDef {
        name: "DataDigest",
        kind: KeyKind::List,
        syntax: Syntax::Choice(DIGESTS),
        default: Some("None"),
        scope: Scope::ConnectionOnly,
        usage: Usage::InitializeOnly,
        ..BASE
    },
    // §13.2
    numeric(
        "MaxConnections",
        KeyKind::NumericMin,
        "1",
        1,
        65535,
        IN_DISCOVERY,
    ),
    // §13.3
    KeyDef {
        name: "SendTargets",
        usage: Usage::FullFeatureOnly,
        senders: Senders::Initiator,
        ..BASE
    },
    // §13.4: IO when sent by the initiator; the target sends it only inside a
    // SendTargets response, which the SendTargets code builds itself.
    KeyDef {
        name: "TargetName",
        syntax: Syntax::IscsiName,
        usage: Usage::InitializeOnly,
        ..BASE
    },
    // §13.5
    KeyDef {
        name: "InitiatorName",
        syntax: Syntax::IscsiName,
        usage: Usage::InitializeOnly,
        senders: Senders::Initiator,
        ..BASE
    },
    // §13.6
    KeyDef {
        name: "TargetAlias",
        usage: Usage::Any,
        senders: Senders::Target,
        ..BASE
    },
    // §13.7
    KeyDef {
        name: "InitiatorAlias",
        usage: Usage::Any,
        senders: Senders::Initiator,
        ..BASE
    },
    // §13.8
    KeyDef {
        name: "TargetAddress",
        usage: Usage::Any,
        senders: Senders::Target,
        ..BASE
    },
    // §13.9
    KeyDef {
        name: "TargetPortalGroupTag",
        syntax: Syntax::Numeric,
        range: Some((0, 65535)),
        usage: Usage::InitializeOnly,
        senders: Senders::Target,
        ..BASE
    },
    // §13.10, §13.11
    boolean("InitialR2T", KeyKind::BoolOr, "Yes", IN_DISCOVERY),
    boolean("ImmediateData", KeyKind::BoolAnd, "Yes", IN_DISCOVERY),
    // §13.12: declarative per direction.
    KeyDef {
        name: "MaxRecvDataSegmentLength",
        syntax: Syntax::Numeric,
        default: Some("8192"),
        range: Some((512, MAX_SEGMENT_LENGTH)),
        scope: Scope::ConnectionOnly,
        usage: Usage::Any,
        ..BASE
    },
    // §13.13, §13.14
    numeric(
        "MaxBurstLength",
        KeyKind::NumericMin,
        "262144",
        512,
        MAX_SEGMENT_LENGTH,
        IN_DISCOVERY,
    ),
    numeric(
        "FirstBurstLength",
        KeyKind::NumericMin,
        "65536",
        512,
        MAX_SEGMENT_LENGTH,
        IrrelevantWhen {
            discovery: true,
            rdma_off: false,
            no_unsolicited_data: true,
        },
    ),
    // §13.15, §13.16
    numeric("DefaultTime2Wait", KeyKind::NumericMax, "2", 0, 3600, NEVER),
    numeric(
        "DefaultTime2Retain",
        KeyKind::NumericMin,
        "20",
        0,
        3600,
        NEVER,
    ),
    // §13.17
    numeric(
        "MaxOutstandingR2T",
        KeyKind::NumericMin,
        "1",
        1,
        65535,
        IN_DISCOVERY,
    ),
    // §13.18, §13.19
    boolean("DataPDUInOrder", KeyKind::BoolOr, "Yes", IN_DISCOVERY),
    boolean("DataSequenceInOrder", KeyKind::BoolOr, "Yes", IN_DISCOVERY),
    // §13.20
    numeric("ErrorRecoveryLevel", KeyKind::NumericMin, "0", 0, 2, NEVER),
    // §13.21
    KeyDef {
        name: "SessionType",
        syntax: Syntax::Choice(SESSION_TYPES),
        default: Some("Normal"),
        senders: Senders::Initiator,
        ..BASE
    },
    // §13.23
    KeyDef {
        name: "TaskReporting",
        kind: KeyKind::List,
        syntax: Syntax::Choice(TASK_REPORTING),
        default: Some("RFC3720"),
        irrelevant_when: IN_DISCOVERY,
        ..BASE
    },
    // RFC 7144 §2.1: 0 = RFC 3720, 1 = RFC 7143, 2 = RFC 7144.
    numeric("iSCSIProtocolLevel", KeyKind::NumericMin, "0", 0, 31, NEVER),
    // §13.26 (public extension key, RFC 4850): declarative, informational.
    KeyDef {
        name: "X#NodeArchitecture",
        default: Some("None"),
        ..BASE
    },
    // §13.25: obsolete marker keys, answered but never enabled.
    obsolete(boolean("OFMarker", KeyKind::BoolAnd, "No", NEVER)),
    obsolete(boolean("IFMarker", KeyKind::BoolAnd, "No", NEVER)),
    obsolete(numeric(
        "OFMarkInt",
        KeyKind::NumericMin,
        "2048",
        1,
        65535,
        NEVER,
    )),
    obsolete(numeric(
        "IFMarkInt",
        KeyKind::NumericMin,
        "2048",
        1,
        65535,
        NEVER,
    )),
    // RFC 7145 §6.1: the switch into iSER-assisted mode.
    iser(boolean(
        "RDMAExtensions",
        KeyKind::BoolAnd,
        "No",
        IN_DISCOVERY,
    )),
    // RFC 7145 §6.2 - §6.8.
    iser(KeyDef {
        scope: Scope::ConnectionOnly,
        usage: Usage::InitializeOnly,
        ..numeric(
            "TargetRecvDataSegmentLength",
            KeyKind::NumericMin,
            "8192",
            512,
            MAX_SEGMENT_LENGTH,
            WITHOUT_RDMA,
        )
    }),
    iser(KeyDef {
        scope: Scope::ConnectionOnly,
        usage: Usage::InitializeOnly,
        ..numeric(
            "InitiatorRecvDataSegmentLength",
            KeyKind::NumericMin,
            "8192",
            512,
            MAX_SEGMENT_LENGTH,
            WITHOUT_RDMA,
        )
    }),
    // 0 means "no limit"; otherwise 2 ..= 2^32 - 1 (checked by the negotiator).
    iser(numeric(
        "MaxOutstandingUnexpectedPDUs",
        KeyKind::NumericMin,
        "0",
        0,
        u32::MAX as u64,
        WITHOUT_RDMA,
    )),
    iser(numeric(
        "MaxAHSLength",
        KeyKind::NumericMin,
        "256",
        2,
        65535,
        WITHOUT_RDMA,
    )),
    iser(boolean(
        "TaggedBufferForSolicitedDataOnly",
        KeyKind::BoolOr,
        "No",
        WITHOUT_RDMA,
    )),
    iser(boolean(
        "iSERHelloRequired",
        KeyKind::BoolOr,
        "No",
        WITHOUT_RDMA,
    )),
];

/// The row for `name` (case-sensitive, as RFC 7143 §6.1 requires).
pub fn lookup(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.name == name)
}

/// What kind of name a key not in the table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// `X-...`: a vendor's private key (§13.22): answered NotUnderstood unless known.
    Private,
    /// `X#...`: an IANA-registered public extension key (e.g. `X#NodeArchitecture`).
    Public,
    /// Not an extension key at all.
    None,
}

/// Classifies an extension key name by its prefix.
pub fn extension(name: &str) -> Extension {
    if name.starts_with("X-") {
        Extension::Private
    } else if name.starts_with("X#") {
        Extension::Public
    } else {
        Extension::None
    }
}

/// The keys that belong to an authentication method's exchange rather than to
/// the key table: they are routed to the CHAP code untouched.
pub fn is_auth_exchange_key(name: &str) -> bool {
    name.starts_with("CHAP_")
}

/// Parses an RFC 7143 §6.1 `numerical-value`: a decimal constant or a
/// `0x`-prefixed hex constant, at most 64 bits.
pub fn parse_numeric(value: &str) -> Option<u64> {
    let (digits, radix) = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Parses `Yes` / `No` (case-sensitive).
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// The wire spelling of a boolean.
pub fn bool_str(v: bool) -> &'static str {
    if v {
        "Yes"
    } else {
        "No"
    }
}

/// Checks the light format rules of an iSCSI name (RFC 7143 §4.2.7): one of
/// the three type prefixes, no more than 223 bytes, no spaces or controls.
pub fn is_valid_iscsi_name(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    let prefixed = ["iqn.", "eui.", "naa."]
        .iter()
        .any(|p| lower.starts_with(p));
    prefixed
        && value.len() <= 223
        && value.len() > 4
        && !value.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl KeyDef {
    /// Checks one value (not a list) against this key's syntax and range.
    pub fn accepts(&self, value: &str) -> bool {
        match self.syntax {
            Syntax::Boolean => parse_bool(value).is_some(),
            Syntax::Numeric => match (parse_numeric(value), self.range) {
                (Some(n), Some((lo, hi))) => n >= lo && n <= hi,
                (Some(_), None) => true,
                (None, _) => false,
            },
            Syntax::Choice(names) => names.contains(&value),
            Syntax::IscsiName => is_valid_iscsi_name(value),
            Syntax::Text => true,
        }
    }

    /// The default as a number, for numeric keys.
    pub fn default_numeric(&self) -> Option<u64> {
        self.default.and_then(parse_numeric)
    }

    /// The default as a boolean, for boolean keys.
    pub fn default_bool(&self) -> Option<bool> {
        self.default.and_then(parse_bool)
    }

    /// Whether this key may be negotiated (answered) rather than just declared.
    pub fn is_negotiated(&self) -> bool {
        self.kind != KeyKind::Declarative
    }

    /// Whether `role_is_initiator`'s side may originate this key.
    pub fn sendable_by(&self, role_is_initiator: bool) -> bool {
        match self.senders {
            Senders::Both => true,
            Senders::Initiator => role_is_initiator,
            Senders::Target => !role_is_initiator,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rfc_key_is_in_the_table_once() {
        let names = [
            "HeaderDigest",
            "DataDigest",
            "MaxConnections",
            "SendTargets",
            "TargetName",
            "InitiatorName",
            "TargetAlias",
            "InitiatorAlias",
            "TargetAddress",
            "TargetPortalGroupTag",
            "InitialR2T",
            "ImmediateData",
            "MaxRecvDataSegmentLength",
            "MaxBurstLength",
            "FirstBurstLength",
            "DefaultTime2Wait",
            "DefaultTime2Retain",
            "MaxOutstandingR2T",
            "DataPDUInOrder",
            "DataSequenceInOrder",
            "ErrorRecoveryLevel",
            "SessionType",
            "AuthMethod",
            "TaskReporting",
            "iSCSIProtocolLevel",
            "OFMarker",
            "IFMarker",
            "OFMarkInt",
            "IFMarkInt",
            "RDMAExtensions",
            "TargetRecvDataSegmentLength",
            "InitiatorRecvDataSegmentLength",
            "MaxOutstandingUnexpectedPDUs",
            "MaxAHSLength",
            "TaggedBufferForSolicitedDataOnly",
            "iSERHelloRequired",
        ];
        for n in names {
            assert_eq!(KEYS.iter().filter(|k| k.name == n).count(), 1, "{n}");
        }
    }

    #[test]
    fn defaults_are_admissible_values() {
        for k in KEYS {
            if let Some(d) = k.default {
                if k.syntax != Syntax::Text {
                    assert!(k.accepts(d), "{} default {d}", k.name);
                }
            }
        }
    }

    #[test]
    fn lookup_is_case_sensitive() {
        assert!(lookup("MaxBurstLength").is_some());
        assert!(lookup("maxburstlength").is_none());
        assert!(lookup("X-com.example.Foo").is_none());
    }

    #[test]
    fn table_matches_rfc_7143_rules() {
        let k = lookup("DefaultTime2Wait").unwrap();
        assert_eq!(k.kind, KeyKind::NumericMax);
        assert_eq!(k.range, Some((0, 3600)));
        let k = lookup("InitialR2T").unwrap();
        assert_eq!((k.kind, k.default), (KeyKind::BoolOr, Some("Yes")));
        let k = lookup("ImmediateData").unwrap();
        assert_eq!(k.kind, KeyKind::BoolAnd);
        let k = lookup("MaxRecvDataSegmentLength").unwrap();
        assert_eq!(k.kind, KeyKind::Declarative);
        assert_eq!(k.scope, Scope::ConnectionOnly);
        assert!(
            lookup("FirstBurstLength")
                .unwrap()
                .irrelevant_when
                .no_unsolicited_data
        );
        assert!(lookup("MaxAHSLength").unwrap().iser);
        assert!(lookup("IFMarkInt").unwrap().obsolete);
    }

    #[test]
    fn numeric_values_accept_decimal_and_hex_only() {
        assert_eq!(parse_numeric("8192"), Some(8192));
        assert_eq!(parse_numeric("0x2000"), Some(8192));
        assert_eq!(parse_numeric(""), None);
        assert_eq!(parse_numeric("0x"), None);
        assert_eq!(parse_numeric("-1"), None);
        assert_eq!(parse_numeric("+1"), None);
        assert_eq!(parse_numeric("12a"), None);
        assert_eq!(parse_numeric("99999999999999999999999"), None);
    }

    #[test]
    fn ranges_are_enforced() {
        let k = lookup("MaxBurstLength").unwrap();
        assert!(!k.accepts("511"));
        assert!(k.accepts("512"));
        assert!(k.accepts("16777215"));
        assert!(!k.accepts("16777216"));
        assert!(!lookup("InitialR2T").unwrap().accepts("yes"));
    }

    #[test]
    fn iscsi_names_need_a_type_prefix() {
        assert!(is_valid_iscsi_name("iqn.2004-10.com.ubuntu:01:abc"));
        assert!(is_valid_iscsi_name("eui.02004567A425678D"));
        assert!(!is_valid_iscsi_name("target0"));
        assert!(!is_valid_iscsi_name("iqn."));
        assert!(!is_valid_iscsi_name(&format!("iqn.{}", "a".repeat(220))));
    }
}
