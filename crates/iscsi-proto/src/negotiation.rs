//! The text-key negotiation engine of RFC 7143 §5.2 / §6, for both roles.
//!
//! Everything key-specific comes from the table in [`crate::keys`]; this file
//! only knows the rules of each [`KeyKind`] and the RFC's context rules
//! (stage, sender, leading connection, session type, RDMAExtensions).
//!
//! One [`Negotiator`] lives for the login of one connection (and may then
//! serve its Full Feature Phase Text exchanges). Peer input goes in through
//! [`Negotiator::respond`] (or [`Negotiator::absorb_answers`], its twin for
//! the side that mostly originates); our own offers and declarations come out
//! of [`Negotiator::offers`]. Answers to our offers may arrive mixed with new
//! offers from the peer in the same PDU, so both entry points accept both.
//!
//! CHAP keys are not interpreted here: they are handed back in
//! [`Response::auth_keys`] for [`crate::chap`].

use std::collections::HashMap;

use thiserror::Error;

use crate::keys::{self, bool_str, parse_bool, parse_numeric, KeyDef, KeyKind, Syntax, Usage};

const NOT_UNDERSTOOD: &str = "NotUnderstood";
const IRRELEVANT: &str = "Irrelevant";
const REJECT: &str = "Reject";

/// Which end of the nexus this negotiator speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The iSCSI initiator.
    Initiator,
    /// The iSCSI target.
    Target,
}

/// The stage a key arrives in (the login CSG, or Full Feature Phase for Text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Login, Security Negotiation (CSG 0).
    Security,
    /// Login, Operational Parameter Negotiation (CSG 1).
    Operational,
    /// Full Feature Phase (Text Request/Response).
    FullFeature,
}

/// `SessionType` (RFC 7143 §13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    /// A session that carries SCSI commands.
    #[default]
    Normal,
    /// A session for SendTargets only.
    Discovery,
}

impl SessionType {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionType::Normal => "Normal",
            SessionType::Discovery => "Discovery",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "Normal" => Some(SessionType::Normal),
            "Discovery" => Some(SessionType::Discovery),
            _ => None,
        }
    }
}

/// A HeaderDigest / DataDigest value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    /// No digest.
    None,
    /// CRC32C (RFC 7143 §13.1).
    Crc32c,
}

impl Digest {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Digest::None => "None",
            Digest::Crc32c => "CRC32C",
        }
    }
}

/// An AuthMethod this implementation can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No authentication.
    None,
    /// CHAP (RFC 7143 §12.1.3).
    Chap,
}

impl AuthMethod {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "None",
            AuthMethod::Chap => "CHAP",
        }
    }
}

/// A TaskReporting value (RFC 7143 §13.23).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskReporting {
    /// RFC 3720 semantics.
    #[default]
    Rfc3720,
    /// RFC 3720 plus the Response Fence of RFC 7143 §4.2.2.3.3.
    ResponseFence,
    /// ResponseFence plus FastAbort (RFC 7143 §4.2.3.4).
    FastAbort,
}

impl TaskReporting {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskReporting::Rfc3720 => "RFC3720",
            TaskReporting::ResponseFence => "ResponseFence",
            TaskReporting::FastAbort => "FastAbort",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "RFC3720" => Some(TaskReporting::Rfc3720),
            "ResponseFence" => Some(TaskReporting::ResponseFence),
            "FastAbort" => Some(TaskReporting::FastAbort),
            _ => None,
        }
    }
}

/// What this side supports and prefers. `Default` is the RFC default of
/// every key, so a default policy never needs to offer anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Our MaxRecvDataSegmentLength declaration (512 ..= 2^24-1).
    pub max_recv_data_segment_length: u32,
    /// Largest MaxBurstLength we accept.
    pub max_burst_length: u32,
    /// Largest FirstBurstLength we accept.
    pub first_burst_length: u32,
    /// Our InitialR2T preference.
    pub initial_r2t: bool,
    /// Our ImmediateData preference.
    pub immediate_data: bool,
    /// Largest MaxOutstandingR2T we accept.
    pub max_outstanding_r2t: u32,
    /// Largest MaxConnections we accept.
    pub max_connections: u32,
    /// Header digests we support, in preference order.
    pub header_digest: Vec<Digest>,
    /// Data digests we support, in preference order.
    pub data_digest: Vec<Digest>,
    /// Highest ErrorRecoveryLevel we implement.
    pub error_recovery_level: u8,
    /// Our DefaultTime2Wait.
    pub default_time2wait: u32,
    /// Our DefaultTime2Retain.
    pub default_time2retain: u32,
    /// Our DataPDUInOrder preference (`false`: we can take them out of order).
    pub data_pdu_in_order: bool,
    /// Our DataSequenceInOrder preference.
    pub data_sequence_in_order: bool,
    /// Authentication methods we accept, in preference order.
    pub auth_methods: Vec<AuthMethod>,
    /// TaskReporting levels we implement, in preference order.
    pub task_reporting: Vec<TaskReporting>,
    /// Highest iSCSIProtocolLevel we implement (RFC 7144).
    pub iscsi_protocol_level: u8,
    /// Whether we can run iSER (RDMAExtensions=Yes).
    pub rdma_extensions: bool,
    /// iSER: TargetRecvDataSegmentLength.
    pub target_recv_data_segment_length: u32,
    /// iSER: InitiatorRecvDataSegmentLength.
    pub initiator_recv_data_segment_length: u32,
    /// iSER: MaxOutstandingUnexpectedPDUs (0 = no limit).
    pub max_outstanding_unexpected_pdus: u32,
    /// iSER: MaxAHSLength.
    pub max_ahs_length: u32,
    /// iSER: TaggedBufferForSolicitedDataOnly.
    pub tagged_buffer_for_solicited_data_only: bool,
    /// iSER: iSERHelloRequired.
    pub iser_hello_required: bool,
    /// Initiator: the session type to ask for.
    pub session_type: SessionType,
    /// Initiator: our InitiatorName.
    pub initiator_name: Option<String>,
    /// Initiator: our InitiatorAlias.
    pub initiator_alias: Option<String>,
    /// Initiator: the TargetName to log in to (Normal sessions).
    pub target_name: Option<String>,
    /// Target: our TargetAlias.
    pub target_alias: Option<String>,
    /// Target: the portal group tag of the portal this connection arrived on.
    pub target_portal_group_tag: Option<u16>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            header_digest: vec![Digest::None],
            data_digest: vec![Digest::None],
            error_recovery_level: 0,
            default_time2wait: 2,
            default_time2retain: 20,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            auth_methods: vec![AuthMethod::None],
            task_reporting: vec![TaskReporting::Rfc3720],
            iscsi_protocol_level: 0,
            rdma_extensions: false,
            target_recv_data_segment_length: 8192,
            initiator_recv_data_segment_length: 8192,
            max_outstanding_unexpected_pdus: 0,
            max_ahs_length: 256,
            tagged_buffer_for_solicited_data_only: false,
            iser_hello_required: false,
            session_type: SessionType::Normal,
            initiator_name: None,
            initiator_alias: None,
            target_name: None,
            target_alias: None,
            target_portal_group_tag: None,
        }
    }
}

/// Operational keys an initiator always offers in a Normal session.
const ALWAYS_OFFERED: &[&str] = &[
    "HeaderDigest",
    "DataDigest",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "ErrorRecoveryLevel",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "MaxConnections",
];

/// iSER keys an initiator offers even at their defaults once it asks for
/// RDMAExtensions=Yes, as FreeBSD's iscsid does: LIO proposes them itself
/// when the initiator leaves them out, logs "No response for proposed key"
/// and holds the stage open for one more round trip to get our answers.
const ISER_ALWAYS_OFFERED: &[&str] = &[
    "TargetRecvDataSegmentLength",
    "InitiatorRecvDataSegmentLength",
];

/// What to send back after reading the peer's pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// Answers to the peer's offers (`NotUnderstood`, `Irrelevant`, `Reject`
    /// included), in the order the offers came.
    pub reply: Vec<(String, String)>,
    /// `CHAP_*` keys, untouched, for the CHAP code.
    pub auth_keys: Vec<(String, String)>,
    /// Keys served by other code (SendTargets in Full Feature Phase).
    pub deferred: Vec<(String, String)>,
}

/// The outcome of negotiation; `Default` is every RFC default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedParams {
    /// CRC32C header digests on this connection.
    pub header_digest: bool,
    /// CRC32C data digests on this connection.
    pub data_digest: bool,
    /// Largest data segment WE receive (our declaration).
    pub max_recv_data_segment_length: u32,
    /// Largest data segment we may SEND (the peer's declaration).
    pub max_xmit_data_segment_length: u32,
    /// MaxBurstLength.
    pub max_burst_length: u32,
    /// FirstBurstLength (never above MaxBurstLength).
    pub first_burst_length: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// MaxConnections.
    pub max_connections: u32,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// DefaultTime2Wait (seconds).
    pub default_time2wait: u32,
    /// DefaultTime2Retain (seconds).
    pub default_time2retain: u32,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u8,
    /// TaskReporting.
    pub task_reporting: TaskReporting,
    /// iSCSIProtocolLevel.
    pub iscsi_protocol_level: u8,
    /// RDMAExtensions (iSER-assisted mode).
    pub rdma_extensions: bool,
    /// iSER: TargetRecvDataSegmentLength.
    pub target_recv_data_segment_length: u32,
    /// iSER: InitiatorRecvDataSegmentLength.
    pub initiator_recv_data_segment_length: u32,
    /// iSER: MaxOutstandingUnexpectedPDUs (0 = no limit).
    pub max_outstanding_unexpected_pdus: u32,
    /// iSER: MaxAHSLength.
    pub max_ahs_length: u32,
    /// iSER: TaggedBufferForSolicitedDataOnly.
    pub tagged_buffer_for_solicited_data_only: bool,
    /// iSER: iSERHelloRequired.
    pub iser_hello_required: bool,
    /// SessionType.
    pub session_type: SessionType,
    /// The AuthMethod agreed (None if never negotiated).
    pub auth_method: AuthMethod,
    /// InitiatorName.
    pub initiator_name: Option<String>,
    /// TargetName.
    pub target_name: Option<String>,
    /// InitiatorAlias.
    pub initiator_alias: Option<String>,
    /// TargetAlias.
    pub target_alias: Option<String>,
    /// TargetPortalGroupTag.
    pub target_portal_group_tag: Option<u16>,
    /// The last TargetAddress the target declared (redirection).
    pub target_address: Option<String>,
}

impl Default for NegotiatedParams {
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 8192,
            max_xmit_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            task_reporting: TaskReporting::Rfc3720,
            iscsi_protocol_level: 0,
            rdma_extensions: false,
            target_recv_data_segment_length: 8192,
            initiator_recv_data_segment_length: 8192,
            max_outstanding_unexpected_pdus: 0,
            max_ahs_length: 256,
            tagged_buffer_for_solicited_data_only: false,
            iser_hello_required: false,
            session_type: SessionType::Normal,
            auth_method: AuthMethod::None,
            initiator_name: None,
            target_name: None,
            initiator_alias: None,
            target_alias: None,
            target_portal_group_tag: None,
            target_address: None,
        }
    }
}

/// What the peer did wrong; every variant fails the login (or, in Full
/// Feature Phase, the Text exchange). [`login_status`](Self::login_status)
/// gives the Login Response status class/detail a target should send.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NegotiationError {
    /// A key used outside the stage its "Use" allows (e.g. an operational
    /// key in the Security stage, AuthMethod after it, LO keys in FFP).
    #[error("{key} may not be sent in the {stage:?} stage")]
    KeyNotAllowedInStage {
        /// The key.
        key: String,
        /// Where it arrived.
        stage: Stage,
    },
    /// A key the peer's role may not send (e.g. a target sending InitiatorName).
    #[error("{key} may not be sent by the {sender:?}")]
    WrongSender {
        /// The key.
        key: String,
        /// The role that sent it.
        sender: Role,
    },
    /// A key declared or negotiated a second time in this login with a
    /// different value (RFC 7143 §6.2 forbids renegotiation).
    #[error("{key} renegotiated: {first:?} then {second:?}")]
    KeyRenegotiated {
        /// The key.
        key: String,
        /// The first value.
        first: String,
        /// The second value.
        second: String,
    },
    /// A declaration whose value is malformed or out of range.
    #[error("invalid value {value:?} declared for {key}")]
    InvalidDeclaration {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A SessionType other than Normal or Discovery.
    #[error("unsupported SessionType {value:?}")]
    UnsupportedSessionType {
        /// The value.
        value: String,
    },
    /// The peer's answer to our offer is not admissible under the key's rule
    /// (e.g. a value not in our list, a Minimum answer above our offer).
    #[error("answer {answer:?} to our offer {key}={offered:?} is not admissible")]
    InvalidAnswer {
        /// The key.
        key: String,
        /// What we offered.
        offered: String,
        /// What came back.
        answer: String,
    },
    /// `NotUnderstood` / `Irrelevant` / `Reject` for a key we never offered.
    #[error("{key}={value} answers an offer that was never made")]
    UnexpectedAnswer {
        /// The key.
        key: String,
        /// The answer constant.
        value: String,
    },
    /// No common AuthMethod (offered by the peer, or our offer rejected).
    #[error("no acceptable AuthMethod in {offered:?}")]
    AuthMethodRejected {
        /// The list in question.
        offered: String,
    },
    /// The initiator left the Security stage (or skipped it) without an
    /// AuthMethod this target accepts.
    #[error("authentication is required but was not negotiated")]
    AuthenticationRequired,
    /// A CHAP key outside the Security stage.
    #[error("authentication key {key} outside the Security stage")]
    AuthKeyOutOfStage {
        /// The key.
        key: String,
    },
}

impl NegotiationError {
    /// The Login Response status (class << 8 | detail) a target answers with:
    /// 0x0201 authentication failure, 0x0209 session type not supported,
    /// 0x0200 initiator error for everything else.
    pub fn login_status(&self) -> u16 {
        match self {
            NegotiationError::AuthMethodRejected { .. }
            | NegotiationError::AuthenticationRequired => 0x0201,
            NegotiationError::UnsupportedSessionType { .. } => 0x0209,
            _ => 0x0200,
        }
    }
}

/// The negotiation state of one connection's login (and its later Text
/// exchanges).
#[derive(Debug, Clone)]
pub struct Negotiator {
    role: Role,
    policy: Policy,
    leading: bool,
    session_type: Option<SessionType>,
    /// Outcome of every negotiated key settled so far.
    results: HashMap<&'static str, String>,
    /// The peer's declarations.
    peer_declared: HashMap<&'static str, String>,
    /// Our declarations already sent.
    our_declared: HashMap<&'static str, String>,
    /// The peer's offers and our answer, to spot renegotiation.
    answered: HashMap<&'static str, (String, Option<String>)>,
    /// Our offers still awaiting an answer.
    outstanding: HashMap<&'static str, String>,
    /// Every offer we made (for late optional answers).
    our_offers: HashMap<&'static str, String>,
    /// Whether the first-PDU declarations went out.
    introduced: bool,
}

/// The value a responder answers with, or `None` when no answer is owed.
type Answer = Option<String>;

fn join<I: IntoIterator<Item = &'static str>>(items: I) -> String {
    items.into_iter().collect::<Vec<_>>().join(",")
}

fn is_answer_constant(v: &str) -> bool {
    matches!(v, NOT_UNDERSTOOD | IRRELEVANT | REJECT)
}

/// Minimum where 0 means "no limit" (MaxOutstandingUnexpectedPDUs).
fn min_unlimited_zero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

impl Negotiator {
    /// A negotiator for one connection; `leading_connection` is false for a
    /// connection joining an existing session (LO keys are then irrelevant).
    pub fn new(role: Role, policy: Policy, leading_connection: bool) -> Self {
        Self {
            role,
            policy,
            leading: leading_connection,
            session_type: None,
            results: HashMap::new(),
            peer_declared: HashMap::new(),
            our_declared: HashMap::new(),
            answered: HashMap::new(),
            outstanding: HashMap::new(),
            our_offers: HashMap::new(),
            introduced: false,
        }
    }

    fn peer_role(&self) -> Role {
        match self.role {
            Role::Initiator => Role::Target,
            Role::Target => Role::Initiator,
        }
    }

    /// Answers the peer's offers, records its declarations and absorbs its
    /// answers to our outstanding offers. Returns what to send back.
    ///
    /// For a target, entering the Operational stage without an AuthMethod its
    /// policy accepts fails with [`NegotiationError::AuthenticationRequired`].
    pub fn respond(
        &mut self,
        stage: Stage,
        pairs: &[(String, String)],
    ) -> Result<Response, NegotiationError> {
        let response = self.process(stage, pairs)?;
        if self.role == Role::Target && stage == Stage::Operational {
            self.check_authenticated()?;
        }
        Ok(response)
    }

    /// The peer's answers to our offers. The peer may mix in declarations
    /// and offers of its own (a target's counter-offers); the answers owed
    /// for those come back in the returned [`Response::reply`], to be sent in
    /// the next PDU together with [`offers`](Self::offers).
    pub fn absorb_answers(
        &mut self,
        stage: Stage,
        pairs: &[(String, String)],
    ) -> Result<Response, NegotiationError> {
        self.process(stage, pairs)
    }

    /// Whether some offer of ours still awaits its answer (a login stage
    /// must not be left before this is false).
    pub fn outstanding(&self) -> bool {
        !self.outstanding.is_empty()
    }

    /// The session type declared by the initiator, once known.
    pub fn session_type(&self) -> Option<SessionType> {
        self.session_type
    }

    /// A declaration received from the peer (InitiatorName, TargetAlias, ...).
    pub fn declared(&self, key: &str) -> Option<&str> {
        self.peer_declared.get(key).map(String::as_str)
    }

    /// Keys the RFC requires of the initiator's login that have not arrived:
    /// InitiatorName, and TargetName for a Normal session (status 0x0207).
    pub fn missing_keys(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.role == Role::Target {
            if !self.peer_declared.contains_key("InitiatorName") {
                missing.push("InitiatorName");
            }
            if self.session_type.unwrap_or_default() == SessionType::Normal
                && !self.peer_declared.contains_key("TargetName")
            {
                missing.push("TargetName");
            }
        }
        missing
    }

    fn check_authenticated(&self) -> Result<(), NegotiationError> {
        let agreed = self
            .results
            .get("AuthMethod")
            .map(String::as_str)
            .unwrap_or("None");
        let accepted = self
            .policy
            .auth_methods
            .iter()
            .any(|m| m.as_str() == agreed);
        if accepted {
            Ok(())
        } else {
            Err(NegotiationError::AuthenticationRequired)
        }
    }

    // ---- reading the peer's pairs -------------------------------------

    fn process(
        &mut self,
        stage: Stage,
        pairs: &[(String, String)],
    ) -> Result<Response, NegotiationError> {
        let mut response = Response::default();
        for (i, (k, _)) in pairs.iter().enumerate() {
            if let Some((_, (_, first))) = pairs
                .iter()
                .enumerate()
                .find(|(j, (pk, _))| *j < i && pk == k)
            {
                return Err(NegotiationError::KeyRenegotiated {
                    key: k.clone(),
                    first: first.clone(),
                    second: pairs.get(i).map(|p| p.1.clone()).unwrap_or_default(),
                });
            }
        }
        // SessionType and the keys others depend on go first, the dependent
        // ones (FirstBurstLength, the iSER keys) last; answers keep the
        // peer's order.
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| pairs.get(i).map(|(k, _)| priority(k)).unwrap_or(1));
        let mut answers: Vec<Answer> = vec![None; pairs.len()];
        for i in order {
            let Some((key, value)) = pairs.get(i) else {
                continue;
            };
            let answer = self.process_pair(stage, key, value, &mut response)?;
            if let Some(slot) = answers.get_mut(i) {
                *slot = answer;
            }
        }
        for ((key, _), answer) in pairs.iter().zip(answers) {
            if let Some(a) = answer {
                response.reply.push((key.clone(), a));
            }
        }
        Ok(response)
    }

    fn process_pair(
        &mut self,
        stage: Stage,
        key: &str,
        value: &str,
        response: &mut Response,
    ) -> Result<Answer, NegotiationError> {
        if keys::is_auth_exchange_key(key) {
            if stage != Stage::Security {
                return Err(NegotiationError::AuthKeyOutOfStage {
                    key: key.to_owned(),
                });
            }
            response.auth_keys.push((key.to_owned(), value.to_owned()));
            return Ok(None);
        }
        let Some(def) = keys::lookup(key) else {
            if is_answer_constant(value) {
                return Err(NegotiationError::UnexpectedAnswer {
                    key: key.to_owned(),
                    value: value.to_owned(),
                });
            }
            return Ok(Some(NOT_UNDERSTOOD.to_owned()));
        };
        if let Some(offered) = self.our_offers.get(def.name).cloned() {
            return self.absorb_answer(def, &offered, value).map(|()| None);
        }
        if is_answer_constant(value) {
            if self.our_declared.contains_key(def.name) {
                // A peer may say it ignores one of our declarations.
                return Ok(None);
            }
            return Err(NegotiationError::UnexpectedAnswer {
                key: key.to_owned(),
                value: value.to_owned(),
            });
        }
        if !def.sendable_by(self.peer_role() == Role::Initiator) {
            return Err(NegotiationError::WrongSender {
                key: key.to_owned(),
                sender: self.peer_role(),
            });
        }
        if !allowed_in(def, stage) {
            return Err(NegotiationError::KeyNotAllowedInStage {
                key: key.to_owned(),
                stage,
            });
        }
        if def.usage == Usage::FullFeatureOnly {
            response.deferred.push((key.to_owned(), value.to_owned()));
            return Ok(None);
        }
        if def.kind == KeyKind::Declarative {
            self.record_declaration(def, value, stage)?;
            return Ok(None);
        }
        if let Some((first, earlier)) = self.answered.get(def.name) {
            if stage != Stage::FullFeature {
                if first == value {
                    // Some initiators (libiscsi) repeat their offers in every
                    // PDU of a stage; the same offer gets the same answer.
                    return Ok(earlier.clone());
                }
                return Err(NegotiationError::KeyRenegotiated {
                    key: key.to_owned(),
                    first: first.clone(),
                    second: value.to_owned(),
                });
            }
        }
        let answer = self.answer_offer(def, value)?;
        self.answered
            .insert(def.name, (value.to_owned(), answer.clone()));
        Ok(answer)
    }

    fn record_declaration(
        &mut self,
        def: &'static KeyDef,
        value: &str,
        stage: Stage,
    ) -> Result<(), NegotiationError> {
        let invalid = || NegotiationError::InvalidDeclaration {
            key: def.name.to_owned(),
            value: value.to_owned(),
        };
        match def.syntax {
            Syntax::Choice(_) if def.name == "SessionType" => {
                let st = SessionType::parse(value).ok_or_else(|| {
                    NegotiationError::UnsupportedSessionType {
                        value: value.to_owned(),
                    }
                })?;
                if self.session_type.is_some_and(|old| old != st) {
                    return Err(NegotiationError::KeyRenegotiated {
                        key: def.name.to_owned(),
                        first: self.session_type.unwrap_or_default().as_str().to_owned(),
                        second: value.to_owned(),
                    });
                }
                self.session_type = Some(st);
            }
            Syntax::Text => {}
            _ if !def.accepts(value) => return Err(invalid()),
            _ => {}
        }
        let repeatable = def.name == "TargetAddress" || stage == Stage::FullFeature;
        match self.peer_declared.get(def.name) {
            Some(old) if old != value && !repeatable => Err(NegotiationError::KeyRenegotiated {
                key: def.name.to_owned(),
                first: old.clone(),
                second: value.to_owned(),
            }),
            _ => {
                self.peer_declared.insert(def.name, value.to_owned());
                Ok(())
            }
        }
    }

    // ---- context -------------------------------------------------------

    fn result_bool(&self, name: &str) -> Option<bool> {
        self.results.get(name).and_then(|v| parse_bool(v))
    }

    fn effective_bool(&self, name: &str) -> bool {
        self.result_bool(name)
            .or_else(|| keys::lookup(name).and_then(KeyDef::default_bool))
            .unwrap_or(false)
    }

    fn effective_numeric(&self, name: &str) -> u64 {
        self.results
            .get(name)
            .and_then(|v| parse_numeric(v))
            .or_else(|| keys::lookup(name).and_then(KeyDef::default_numeric))
            .unwrap_or(0)
    }

    fn rdma_agreed(&self) -> bool {
        self.result_bool("RDMAExtensions").unwrap_or(false)
    }

    /// Whether `def` is irrelevant now; `planning` predicts unsettled
    /// outcomes from our own policy (used when making our offers).
    fn irrelevant(&self, def: &KeyDef, planning: bool) -> bool {
        let when = def.irrelevant_when;
        let discovery = self.session_type == Some(SessionType::Discovery)
            || (self.role == Role::Initiator && self.policy.session_type == SessionType::Discovery);
        let rdma = if planning {
            self.result_bool("RDMAExtensions")
                .unwrap_or(self.policy.rdma_extensions)
        } else {
            self.rdma_agreed()
        };
        let (r2t, immediate) = if planning {
            (
                self.result_bool("InitialR2T")
                    .unwrap_or(self.policy.initial_r2t),
                self.result_bool("ImmediateData")
                    .unwrap_or(self.policy.immediate_data),
            )
        } else {
            (
                self.effective_bool("InitialR2T"),
                self.effective_bool("ImmediateData"),
            )
        };
        (when.discovery && discovery)
            || (def.usage == Usage::LeadingOnly && !self.leading)
            || (when.rdma_off && !rdma)
            || (when.no_unsolicited_data && r2t && !immediate)
    }

    // ---- our side of each key --------------------------------------------

    /// Our value for a negotiated key: a single value, or for List keys our
    /// supported values in preference order.
    fn own_value(&self, def: &KeyDef) -> Option<String> {
        let p = &self.policy;
        let rdma = self.rdma_agreed();
        Some(match def.name {
            "AuthMethod" => join(p.auth_methods.iter().map(|m| m.as_str())),
            // Digests are the RDMA fabric's business in iSER-assisted mode.
            "HeaderDigest" if rdma => "None".to_owned(),
            "DataDigest" if rdma => "None".to_owned(),
            "HeaderDigest" => join(p.header_digest.iter().map(|d| d.as_str())),
            "DataDigest" => join(p.data_digest.iter().map(|d| d.as_str())),
            "TaskReporting" => join(p.task_reporting.iter().map(|t| t.as_str())),
            "MaxConnections" => p.max_connections.to_string(),
            "InitialR2T" => bool_str(p.initial_r2t).to_owned(),
            "ImmediateData" => bool_str(p.immediate_data).to_owned(),
            "MaxBurstLength" => p.max_burst_length.to_string(),
            "FirstBurstLength" => p.first_burst_length.min(p.max_burst_length).to_string(),
            "DefaultTime2Wait" => p.default_time2wait.to_string(),
            "DefaultTime2Retain" => p.default_time2retain.to_string(),
            "MaxOutstandingR2T" => p.max_outstanding_r2t.to_string(),
            "DataPDUInOrder" => bool_str(p.data_pdu_in_order).to_owned(),
            "DataSequenceInOrder" => bool_str(p.data_sequence_in_order).to_owned(),
            "ErrorRecoveryLevel" => p.error_recovery_level.to_string(),
            "iSCSIProtocolLevel" => p.iscsi_protocol_level.to_string(),
            "RDMAExtensions" => bool_str(p.rdma_extensions).to_owned(),
            "TargetRecvDataSegmentLength" => p.target_recv_data_segment_length.to_string(),
            "InitiatorRecvDataSegmentLength" => p.initiator_recv_data_segment_length.to_string(),
            "MaxOutstandingUnexpectedPDUs" => p.max_outstanding_unexpected_pdus.to_string(),
            "MaxAHSLength" => p.max_ahs_length.to_string(),
            "TaggedBufferForSolicitedDataOnly" => {
                bool_str(p.tagged_buffer_for_solicited_data_only).to_owned()
            }
            "iSERHelloRequired" => bool_str(p.iser_hello_required).to_owned(),
            _ => return None,
        })
    }

    fn admissible_number(def: &KeyDef, value: &str) -> Option<u64> {
        let n = parse_numeric(value)?;
        let (lo, hi) = def.range?;
        // MaxOutstandingUnexpectedPDUs: 0 (no limit) or 2 ..= 2^32-1.
        let hole = def.name == "MaxOutstandingUnexpectedPDUs" && n == 1;
        (n >= lo && n <= hi && !hole).then_some(n)
    }

    fn combine(def: &KeyDef, a: u64, b: u64) -> u64 {
        match def.kind {
            KeyKind::NumericMax => a.max(b),
            _ if def.name == "MaxOutstandingUnexpectedPDUs" => min_unlimited_zero(a, b),
            _ => a.min(b),
        }
    }

    /// The responder's side of RFC 7143 §6.2 for one offer.
    fn answer_offer(
        &mut self,
        def: &'static KeyDef,
        value: &str,
    ) -> Result<Answer, NegotiationError> {
        if def.obsolete {
            // §13.25: never NotUnderstood; markers answered Reject (or No
            // to an offer of No, which every RFC 3720 peer understands),
            // the marker intervals always Reject.
            let is_marker = def.syntax == Syntax::Boolean;
            return Ok(Some(
                if is_marker && value == "No" {
                    "No"
                } else {
                    REJECT
                }
                .to_owned(),
            ));
        }
        if self.irrelevant(def, false) {
            return Ok(Some(IRRELEVANT.to_owned()));
        }
        let Some(own) = self.own_value(def) else {
            return Ok(Some(NOT_UNDERSTOOD.to_owned()));
        };
        let (result, answer) = match def.kind {
            KeyKind::List => {
                let offered: Vec<&str> = value.split(',').collect();
                let well_formed = offered.iter().all(|v| !v.is_empty());
                let supported: Vec<&str> = own.split(',').collect();
                let pick = offered.iter().find(|v| supported.contains(v)).copied();
                match pick {
                    Some(v) if well_formed => (Some(v.to_owned()), Some(v.to_owned())),
                    _ if def.name == "AuthMethod" => {
                        return Err(NegotiationError::AuthMethodRejected {
                            offered: value.to_owned(),
                        })
                    }
                    _ => (None, Some(REJECT.to_owned())),
                }
            }
            KeyKind::NumericMin | KeyKind::NumericMax => {
                match (Self::admissible_number(def, value), parse_numeric(&own)) {
                    (Some(offer), Some(mine)) => {
                        let mut n = Self::combine(def, offer, mine);
                        if def.name == "FirstBurstLength" {
                            n = n.min(self.effective_numeric("MaxBurstLength"));
                        }
                        (Some(n.to_string()), Some(n.to_string()))
                    }
                    _ => (None, Some(REJECT.to_owned())),
                }
            }
            KeyKind::BoolAnd | KeyKind::BoolOr => match (parse_bool(value), parse_bool(&own)) {
                (Some(offer), Some(mine)) => {
                    let and = def.kind == KeyKind::BoolAnd;
                    let result = if and { offer && mine } else { offer || mine };
                    // The offer alone settles AND=No and OR=Yes: no answer owed.
                    let settled = offer != and;
                    let answer = (!settled).then(|| bool_str(result).to_owned());
                    (Some(bool_str(result).to_owned()), answer)
                }
                _ => (None, Some(REJECT.to_owned())),
            },
            KeyKind::Declarative => (None, None),
        };
        if let Some(r) = result {
            self.results.insert(def.name, r);
        }
        Ok(answer)
    }

    /// The originator's side: check the peer's answer to our offer.
    fn absorb_answer(
        &mut self,
        def: &'static KeyDef,
        offered: &str,
        answer: &str,
    ) -> Result<(), NegotiationError> {
        let invalid = || NegotiationError::InvalidAnswer {
            key: def.name.to_owned(),
            offered: offered.to_owned(),
            answer: answer.to_owned(),
        };
        let was_outstanding = self.outstanding.remove(def.name).is_some();
        if !was_outstanding {
            // Only the optional answer to an offer that settled itself may
            // come late, and it must agree with the settled outcome.
            return match self.results.get(def.name) {
                Some(r) if r == answer => Ok(()),
                _ => Err(NegotiationError::KeyRenegotiated {
                    key: def.name.to_owned(),
                    first: offered.to_owned(),
                    second: answer.to_owned(),
                }),
            };
        }
        if is_answer_constant(answer) {
            if def.name == "AuthMethod" {
                return Err(NegotiationError::AuthMethodRejected {
                    offered: offered.to_owned(),
                });
            }
            // The key keeps its default (RFC 7143 §6.2).
            self.results.remove(def.name);
            return Ok(());
        }
        let result = match def.kind {
            KeyKind::List => {
                if !offered.split(',').any(|v| v == answer) {
                    return Err(invalid());
                }
                answer.to_owned()
            }
            KeyKind::NumericMin | KeyKind::NumericMax => {
                let (Some(mine), Some(theirs)) =
                    (parse_numeric(offered), Self::admissible_number(def, answer))
                else {
                    return Err(invalid());
                };
                if Self::combine(def, mine, theirs) != theirs {
                    return Err(invalid());
                }
                theirs.to_string()
            }
            KeyKind::BoolAnd | KeyKind::BoolOr => {
                let (Some(mine), Some(theirs)) = (parse_bool(offered), parse_bool(answer)) else {
                    return Err(invalid());
                };
                let and = def.kind == KeyKind::BoolAnd;
                let possible = if and {
                    mine || !theirs
                } else {
                    !mine || theirs
                };
                if !possible {
                    return Err(invalid());
                }
                bool_str(theirs).to_owned()
            }
            KeyKind::Declarative => return Ok(()),
        };
        self.results.insert(def.name, result);
        Ok(())
    }

    // ---- our offers -----------------------------------------------------------

    /// Our declarations and offers for `stage` that have not been sent yet.
    ///
    /// Initiator: InitiatorName, InitiatorAlias, SessionType, TargetName in the
    /// first PDU; AuthMethod in the Security stage; in the Operational stage
    /// its MaxRecvDataSegmentLength and every key its policy wants changed
    /// from the RFC default. Target: TargetPortalGroupTag and TargetAlias in
    /// its first response; in the Operational stage its
    /// MaxRecvDataSegmentLength and counter-offers for the keys the initiator
    /// left at a default this target cannot live with.
    pub fn offers(&mut self, stage: Stage) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.introduced && stage != Stage::FullFeature {
            self.introduced = true;
            self.introduce(&mut out);
        }
        match stage {
            Stage::Security => {
                if self.role == Role::Initiator && !self.our_offers.contains_key("AuthMethod") {
                    if let Some(def) = keys::lookup("AuthMethod") {
                        if let Some(v) = self.own_value(def) {
                            self.offer(def, v, &mut out);
                        }
                    }
                }
            }
            Stage::Operational => {
                if let Some(def) = keys::lookup("MaxRecvDataSegmentLength") {
                    let v = self.policy.max_recv_data_segment_length.to_string();
                    self.declare(def, v, &mut out);
                }
                for def in keys::KEYS {
                    if self.should_offer(def) {
                        if let Some(v) = self.own_value(def) {
                            self.offer(def, v, &mut out);
                        }
                    }
                }
            }
            Stage::FullFeature => {}
        }
        out
    }

    fn introduce(&mut self, out: &mut Vec<(String, String)>) {
        let p = self.policy.clone();
        let mut declarations: Vec<(&str, Option<String>)> = Vec::new();
        match self.role {
            Role::Initiator => {
                declarations.push(("InitiatorName", p.initiator_name));
                declarations.push(("InitiatorAlias", p.initiator_alias));
                if p.session_type == SessionType::Normal {
                    declarations.push(("TargetName", p.target_name));
                }
                declarations.push(("SessionType", Some(p.session_type.as_str().to_owned())));
                self.session_type = Some(p.session_type);
            }
            Role::Target => {
                declarations.push((
                    "TargetPortalGroupTag",
                    p.target_portal_group_tag.map(|t| t.to_string()),
                ));
                declarations.push(("TargetAlias", p.target_alias));
            }
        }
        for (name, value) in declarations {
            if let (Some(def), Some(v)) = (keys::lookup(name), value) {
                self.declare(def, v, out);
            }
        }
    }

    fn declare(&mut self, def: &'static KeyDef, value: String, out: &mut Vec<(String, String)>) {
        if self.our_declared.contains_key(def.name) {
            return;
        }
        self.our_declared.insert(def.name, value.clone());
        out.push((def.name.to_owned(), value));
    }

    fn offer(&mut self, def: &'static KeyDef, value: String, out: &mut Vec<(String, String)>) {
        self.our_offers.insert(def.name, value.clone());
        // AND=No and OR=Yes settle themselves; everything else awaits an answer.
        let settled = matches!(
            (def.kind, parse_bool(&value)),
            (KeyKind::BoolAnd, Some(false)) | (KeyKind::BoolOr, Some(true))
        );
        if settled {
            self.results.insert(def.name, value.clone());
        } else {
            self.outstanding.insert(def.name, value.clone());
        }
        out.push((def.name.to_owned(), value));
    }

    fn should_offer(&self, def: &'static KeyDef) -> bool {
        let negotiable_here = def.is_negotiated()
            && !def.obsolete
            && matches!(def.usage, Usage::LeadingOnly | Usage::InitializeOnly);
        if !negotiable_here
            || self.our_offers.contains_key(def.name)
            || self.answered.contains_key(def.name)
            || self.results.contains_key(def.name)
            || self.irrelevant(def, true)
        {
            return false;
        }
        let (Some(own), Some(default)) = (self.own_value(def), def.default) else {
            return false;
        };
        match self.role {
            // Offer the RFC 3720 operational keys even at their defaults,
            // as open-iscsi does: a target that proposes a key we left out
            // (LIO does) expects an answer we could only give after it has
            // already ended the stage. Newer keys only when changed.
            // The iSER ones only when RDMA is planned: `irrelevant` above.
            Role::Initiator => {
                own != default
                    || ALWAYS_OFFERED.contains(&def.name)
                    || ISER_ALWAYS_OFFERED.contains(&def.name)
            }
            // A target only speaks up when the default would bind it to
            // something it cannot do. MaxOutstandingUnexpectedPDUs it
            // answers but never volunteers: an iSER initiator that does not
            // offer it (ib_iser through iscsid) is never asked about it.
            Role::Target if def.name == "MaxOutstandingUnexpectedPDUs" => false,
            Role::Target => match def.kind {
                KeyKind::List => !own.split(',').any(|v| v == default),
                KeyKind::NumericMin | KeyKind::NumericMax => {
                    match (parse_numeric(&own), parse_numeric(default)) {
                        (Some(o), Some(d)) => Self::combine(def, o, d) != d,
                        _ => false,
                    }
                }
                KeyKind::BoolAnd => default == "Yes" && own == "No",
                KeyKind::BoolOr => default == "No" && own == "Yes",
                KeyKind::Declarative => false,
            },
        }
    }

    // ---- results ------------------------------------------------------------------

    /// Everything negotiated so far, defaults elsewhere.
    pub fn params(&self) -> NegotiatedParams {
        let num = |name: &str| u32::try_from(self.effective_numeric(name)).unwrap_or(u32::MAX);
        let flag = |name: &str| self.effective_bool(name);
        let rdma = self.rdma_agreed();
        let decl = |name: &str| {
            self.peer_declared
                .get(name)
                .or_else(|| self.our_declared.get(name))
                .cloned()
        };
        let declared_len = |map: &HashMap<&'static str, String>| {
            map.get("MaxRecvDataSegmentLength")
                .and_then(|v| parse_numeric(v))
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(8192)
        };
        let max_burst = num("MaxBurstLength");
        NegotiatedParams {
            header_digest: !rdma
                && self
                    .results
                    .get("HeaderDigest")
                    .is_some_and(|v| v == "CRC32C"),
            data_digest: !rdma
                && self
                    .results
                    .get("DataDigest")
                    .is_some_and(|v| v == "CRC32C"),
            max_recv_data_segment_length: declared_len(&self.our_declared),
            max_xmit_data_segment_length: declared_len(&self.peer_declared),
            max_burst_length: max_burst,
            first_burst_length: num("FirstBurstLength").min(max_burst),
            initial_r2t: flag("InitialR2T"),
            immediate_data: flag("ImmediateData"),
            max_outstanding_r2t: num("MaxOutstandingR2T"),
            max_connections: num("MaxConnections"),
            data_pdu_in_order: flag("DataPDUInOrder"),
            data_sequence_in_order: flag("DataSequenceInOrder"),
            default_time2wait: num("DefaultTime2Wait"),
            default_time2retain: num("DefaultTime2Retain"),
            error_recovery_level: u8::try_from(num("ErrorRecoveryLevel")).unwrap_or(0),
            task_reporting: self
                .results
                .get("TaskReporting")
                .and_then(|v| TaskReporting::parse(v))
                .unwrap_or_default(),
            iscsi_protocol_level: u8::try_from(num("iSCSIProtocolLevel")).unwrap_or(0),
            rdma_extensions: rdma,
            target_recv_data_segment_length: num("TargetRecvDataSegmentLength"),
            initiator_recv_data_segment_length: num("InitiatorRecvDataSegmentLength"),
            max_outstanding_unexpected_pdus: num("MaxOutstandingUnexpectedPDUs"),
            max_ahs_length: num("MaxAHSLength"),
            tagged_buffer_for_solicited_data_only: flag("TaggedBufferForSolicitedDataOnly"),
            iser_hello_required: flag("iSERHelloRequired"),
            session_type: self.session_type.unwrap_or_default(),
            auth_method: match self.results.get("AuthMethod").map(String::as_str) {
                Some("CHAP") => AuthMethod::Chap,
                _ => AuthMethod::None,
            },
            initiator_name: decl("InitiatorName"),
            target_name: decl("TargetName"),
            initiator_alias: decl("InitiatorAlias"),
            target_alias: decl("TargetAlias"),
            target_portal_group_tag: decl("TargetPortalGroupTag")
                .and_then(|v| parse_numeric(&v))
                .and_then(|n| u16::try_from(n).ok()),
            target_address: decl("TargetAddress"),
        }
    }
}

/// Processing order within one PDU: SessionType first (it decides what is
/// relevant), FirstBurstLength and the iSER keys last (they depend on
/// InitialR2T / ImmediateData / MaxBurstLength / RDMAExtensions), as do
/// the digests (forced to None under RDMAExtensions=Yes).
fn priority(key: &str) -> u8 {
    match keys::lookup(key) {
        Some(def) if def.name == "SessionType" => 0,
        Some(def)
            if def.irrelevant_when.no_unsolicited_data
                || def.irrelevant_when.rdma_off
                || matches!(def.name, "HeaderDigest" | "DataDigest") =>
        {
            2
        }
        _ => 1,
    }
}

/// Whether a key's "Use" admits it in `stage`.
fn allowed_in(def: &KeyDef, stage: Stage) -> bool {
    match stage {
        Stage::Security => {
            def.usage == Usage::SecurityOnly
                || (def.kind == KeyKind::Declarative && def.usage != Usage::FullFeatureOnly)
        }
        Stage::Operational => !matches!(def.usage, Usage::SecurityOnly | Usage::FullFeatureOnly),
        Stage::FullFeature => matches!(def.usage, Usage::Any | Usage::FullFeatureOnly),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn target(policy: Policy) -> Negotiator {
        Negotiator::new(Role::Target, policy, true)
    }

    /// A target that has seen the usual first PDU of a Normal session.
    fn target_after_hello(policy: Policy) -> Negotiator {
        let mut t = target(policy);
        t.respond(
            Stage::Operational,
            &kv(&[
                ("InitiatorName", "iqn.1994-05.com.redhat:client"),
                ("TargetName", "iqn.2024-01.org.ironstar:disk0"),
                ("SessionType", "Normal"),
            ]),
        )
        .unwrap();
        t
    }

    fn answer(t: &mut Negotiator, key: &str, value: &str) -> Option<String> {
        let r = t.respond(Stage::Operational, &kv(&[(key, value)])).unwrap();
        get(&r.reply, key).map(str::to_owned)
    }

    #[test]
    fn list_key_picks_first_offered_value_we_support() {
        let p = Policy {
            header_digest: vec![Digest::Crc32c, Digest::None],
            ..Policy::default()
        };
        let mut t = target_after_hello(p.clone());
        assert_eq!(
            answer(&mut t, "HeaderDigest", "None,CRC32C").as_deref(),
            Some("None")
        );
        let mut t = target_after_hello(p);
        assert_eq!(
            answer(&mut t, "HeaderDigest", "CRC32C,None").as_deref(),
            Some("CRC32C")
        );
        assert!(t.params().header_digest);
        let mut t = target_after_hello(Policy::default());
        assert_eq!(
            answer(&mut t, "DataDigest", "CRC32C").as_deref(),
            Some("Reject")
        );
        assert!(!t.params().data_digest);
        // An unknown digest name in the list is skipped, not fatal.
        let mut t = target_after_hello(Policy::default());
        assert_eq!(
            answer(&mut t, "DataDigest", "MD5,None").as_deref(),
            Some("None")
        );
    }

    #[test]
    fn numeric_min_and_max_keys() {
        let mut t = target_after_hello(Policy::default());
        assert_eq!(
            answer(&mut t, "MaxBurstLength", "16776192").as_deref(),
            Some("262144")
        );
        assert_eq!(
            answer(&mut t, "MaxOutstandingR2T", "8").as_deref(),
            Some("1")
        );
        assert_eq!(
            answer(&mut t, "DefaultTime2Wait", "0").as_deref(),
            Some("2")
        );
        assert_eq!(
            answer(&mut t, "DefaultTime2Retain", "0").as_deref(),
            Some("0")
        );
        assert_eq!(
            answer(&mut t, "ErrorRecoveryLevel", "0x2").as_deref(),
            Some("0")
        );
        let p = t.params();
        assert_eq!(
            (
                p.max_burst_length,
                p.default_time2wait,
                p.default_time2retain
            ),
            (262_144, 2, 0)
        );
    }

    #[test]
    fn bool_and_key() {
        let mut t = target_after_hello(Policy {
            immediate_data: false,
            ..Policy::default()
        });
        assert_eq!(
            answer(&mut t, "ImmediateData", "Yes").as_deref(),
            Some("No")
        );
        assert!(!t.params().immediate_data);
        // "No" settles AND by itself: no answer owed.
        let mut t = target_after_hello(Policy::default());
        assert_eq!(answer(&mut t, "ImmediateData", "No"), None);
        assert!(!t.params().immediate_data);
    }

    #[test]
    fn bool_or_key() {
        let mut t = target_after_hello(Policy::default());
        assert_eq!(answer(&mut t, "InitialR2T", "No").as_deref(), Some("Yes"));
        assert!(t.params().initial_r2t);
        let mut t = target_after_hello(Policy {
            initial_r2t: false,
            ..Policy::default()
        });
        assert_eq!(answer(&mut t, "InitialR2T", "No").as_deref(), Some("No"));
        assert!(!t.params().initial_r2t);
        // "Yes" settles OR by itself.
        let mut t = target_after_hello(Policy::default());
        assert_eq!(answer(&mut t, "DataPDUInOrder", "Yes"), None);
    }

    #[test]
    fn declarative_keys_are_recorded_not_answered() {
        let mut t = target_after_hello(Policy::default());
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[
                    ("MaxRecvDataSegmentLength", "262144"),
                    ("InitiatorAlias", "client"),
                ]),
            )
            .unwrap();
        assert!(r.reply.is_empty());
        assert_eq!(t.params().max_xmit_data_segment_length, 262_144);
        assert_eq!(t.params().max_recv_data_segment_length, 8192);
        assert_eq!(t.declared("InitiatorAlias"), Some("client"));
        assert_eq!(
            t.declared("InitiatorName"),
            Some("iqn.1994-05.com.redhat:client")
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        let mut t = target_after_hello(Policy::default());
        assert_eq!(
            answer(&mut t, "MaxBurstLength", "511").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            answer(&mut t, "FirstBurstLength", "16777216").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            answer(&mut t, "MaxOutstandingR2T", "abc").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            answer(&mut t, "MaxConnections", "99999999999999999999999").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            answer(&mut t, "InitialR2T", "yes").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            answer(&mut t, "HeaderDigest", "CRC32C,,None").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            answer(&mut t, "ErrorRecoveryLevel", "3").as_deref(),
            Some("Reject")
        );
        // Rejected keys keep their defaults.
        assert_eq!(t.params().max_burst_length, 262_144);
    }

    #[test]
    fn bad_declarations_fail_the_login() {
        let mut t = target(Policy::default());
        let e = t
            .respond(
                Stage::Operational,
                &kv(&[("MaxRecvDataSegmentLength", "100")]),
            )
            .unwrap_err();
        assert!(matches!(e, NegotiationError::InvalidDeclaration { .. }));
        assert_eq!(e.login_status(), 0x0200);
        let e = t
            .respond(Stage::Security, &kv(&[("SessionType", "Boot")]))
            .unwrap_err();
        assert_eq!(e.login_status(), 0x0209);
        let e = t
            .respond(Stage::Security, &kv(&[("InitiatorName", "not-a-name")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::InvalidDeclaration { .. }));
    }

    #[test]
    fn unknown_keys_are_not_understood() {
        let mut t = target_after_hello(Policy::default());
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[
                    ("X-com.example.Turbo", "Yes"),
                    ("FooBar", "1"),
                    ("X#Unregistered", "1"),
                ]),
            )
            .unwrap();
        assert_eq!(
            r.reply,
            kv(&[
                ("X-com.example.Turbo", "NotUnderstood"),
                ("FooBar", "NotUnderstood"),
                ("X#Unregistered", "NotUnderstood")
            ])
        );
        // The registered public extension is a declaration.
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[("X#NodeArchitecture", "Linux,6.1")]),
            )
            .unwrap();
        assert!(r.reply.is_empty());
    }

    #[test]
    fn discovery_session_makes_operational_keys_irrelevant() {
        let mut t = target(Policy::default());
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[
                    ("InitiatorName", "iqn.1994-05.com.redhat:client"),
                    ("MaxBurstLength", "65536"),
                    ("InitialR2T", "No"),
                    ("SessionType", "Discovery"),
                    ("HeaderDigest", "None"),
                ]),
            )
            .unwrap();
        assert_eq!(get(&r.reply, "MaxBurstLength"), Some("Irrelevant"));
        assert_eq!(get(&r.reply, "InitialR2T"), Some("Irrelevant"));
        assert_eq!(get(&r.reply, "HeaderDigest"), Some("None"));
        assert_eq!(t.session_type(), Some(SessionType::Discovery));
        assert!(t.missing_keys().is_empty());
    }

    #[test]
    fn first_burst_length_irrelevant_without_unsolicited_data() {
        let mut t = target_after_hello(Policy::default());
        // FirstBurstLength comes first, yet its relevance follows the others.
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[
                    ("FirstBurstLength", "65536"),
                    ("InitialR2T", "Yes"),
                    ("ImmediateData", "No"),
                ]),
            )
            .unwrap();
        assert_eq!(get(&r.reply, "FirstBurstLength"), Some("Irrelevant"));
    }

    #[test]
    fn first_burst_length_never_exceeds_max_burst_length() {
        let mut t = target_after_hello(Policy {
            first_burst_length: 262_144,
            ..Policy::default()
        });
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[("FirstBurstLength", "262144"), ("MaxBurstLength", "131072")]),
            )
            .unwrap();
        assert_eq!(get(&r.reply, "FirstBurstLength"), Some("131072"));
        assert_eq!(t.params().first_burst_length, 131_072);
    }

    #[test]
    fn iser_keys_irrelevant_unless_rdma_negotiated() {
        let mut t = target_after_hello(Policy::default());
        assert_eq!(
            answer(&mut t, "MaxAHSLength", "256").as_deref(),
            Some("Irrelevant")
        );
        let mut t = target_after_hello(Policy {
            rdma_extensions: true,
            header_digest: vec![Digest::Crc32c, Digest::None],
            ..Policy::default()
        });
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[
                    ("MaxOutstandingUnexpectedPDUs", "0"),
                    ("RDMAExtensions", "Yes"),
                    ("InitiatorRecvDataSegmentLength", "262144"),
                    ("HeaderDigest", "CRC32C,None"),
                ]),
            )
            .unwrap();
        assert_eq!(get(&r.reply, "RDMAExtensions"), Some("Yes"));
        assert_eq!(get(&r.reply, "MaxOutstandingUnexpectedPDUs"), Some("0"));
        assert_eq!(
            get(&r.reply, "InitiatorRecvDataSegmentLength"),
            Some("8192")
        );
        assert_eq!(get(&r.reply, "HeaderDigest"), Some("None"));
        let p = t.params();
        assert!(p.rdma_extensions && !p.header_digest);
        assert_eq!(
            answer(&mut t, "MaxAHSLength", "1").as_deref(),
            Some("Reject")
        );
    }

    #[test]
    fn max_outstanding_unexpected_pdus_zero_means_unlimited() {
        let mut t = target_after_hello(Policy {
            rdma_extensions: true,
            max_outstanding_unexpected_pdus: 0,
            ..Policy::default()
        });
        answer(&mut t, "RDMAExtensions", "Yes");
        assert_eq!(
            answer(&mut t, "MaxOutstandingUnexpectedPDUs", "16").as_deref(),
            Some("16")
        );
        let mut t = target_after_hello(Policy {
            rdma_extensions: true,
            max_outstanding_unexpected_pdus: 8,
            ..Policy::default()
        });
        answer(&mut t, "RDMAExtensions", "Yes");
        assert_eq!(
            answer(&mut t, "MaxOutstandingUnexpectedPDUs", "0").as_deref(),
            Some("8")
        );
        let mut t = target_after_hello(Policy {
            rdma_extensions: true,
            ..Policy::default()
        });
        answer(&mut t, "RDMAExtensions", "Yes");
        assert_eq!(
            answer(&mut t, "MaxOutstandingUnexpectedPDUs", "1").as_deref(),
            Some("Reject")
        );
    }

    #[test]
    fn leading_only_keys_on_a_non_leading_connection_are_irrelevant() {
        let mut t = Negotiator::new(Role::Target, Policy::default(), false);
        let r = t
            .respond(
                Stage::Operational,
                &kv(&[
                    ("MaxConnections", "4"),
                    ("HeaderDigest", "None"),
                    ("MaxRecvDataSegmentLength", "65536"),
                ]),
            )
            .unwrap();
        assert_eq!(
            r.reply,
            kv(&[("MaxConnections", "Irrelevant"), ("HeaderDigest", "None")])
        );
    }

    #[test]
    fn keys_out_of_their_stage_are_errors() {
        let mut t = target(Policy::default());
        let e = t
            .respond(Stage::Security, &kv(&[("MaxBurstLength", "512")]))
            .unwrap_err();
        assert!(matches!(
            e,
            NegotiationError::KeyNotAllowedInStage {
                stage: Stage::Security,
                ..
            }
        ));
        let e = t
            .respond(Stage::Operational, &kv(&[("AuthMethod", "None")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::KeyNotAllowedInStage { .. }));
        let e = t
            .respond(Stage::FullFeature, &kv(&[("InitialR2T", "No")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::KeyNotAllowedInStage { .. }));
        let e = t
            .respond(Stage::Operational, &kv(&[("SendTargets", "All")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::KeyNotAllowedInStage { .. }));
        let e = t
            .respond(Stage::Operational, &kv(&[("CHAP_A", "5")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::AuthKeyOutOfStage { .. }));
        // In Full Feature Phase, SendTargets goes to its own code and
        // MaxRecvDataSegmentLength may be declared again.
        let r = t
            .respond(
                Stage::FullFeature,
                &kv(&[
                    ("SendTargets", "All"),
                    ("MaxRecvDataSegmentLength", "16384"),
                ]),
            )
            .unwrap();
        assert_eq!(r.deferred, kv(&[("SendTargets", "All")]));
        assert_eq!(t.params().max_xmit_data_segment_length, 16384);
    }

    #[test]
    fn keys_from_the_wrong_sender_are_errors() {
        let mut t = target(Policy::default());
        let e = t
            .respond(Stage::Security, &kv(&[("TargetAlias", "x")]))
            .unwrap_err();
        assert_eq!(
            e,
            NegotiationError::WrongSender {
                key: "TargetAlias".into(),
                sender: Role::Initiator
            }
        );
        let mut i = Negotiator::new(Role::Initiator, Policy::default(), true);
        let e = i
            .absorb_answers(Stage::Security, &kv(&[("SessionType", "Normal")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::WrongSender { .. }));
    }

    #[test]
    fn renegotiation_is_an_error_but_a_repeat_is_answered_again() {
        let mut t = target_after_hello(Policy::default());
        assert_eq!(
            answer(&mut t, "MaxBurstLength", "65536").as_deref(),
            Some("65536")
        );
        assert_eq!(
            answer(&mut t, "MaxBurstLength", "65536").as_deref(),
            Some("65536")
        );
        let e = t
            .respond(Stage::Operational, &kv(&[("MaxBurstLength", "131072")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::KeyRenegotiated { .. }));
        let e = t
            .respond(
                Stage::Operational,
                &kv(&[("InitiatorName", "iqn.2000-01.com.other:x")]),
            )
            .unwrap_err();
        assert!(matches!(e, NegotiationError::KeyRenegotiated { .. }));
        let e = t
            .respond(
                Stage::Operational,
                &kv(&[("InitialR2T", "No"), ("InitialR2T", "Yes")]),
            )
            .unwrap_err();
        assert!(matches!(e, NegotiationError::KeyRenegotiated { .. }));
    }

    #[test]
    fn obsolete_marker_keys_are_answered_per_rfc_7143_13_25() {
        let mut t = target_after_hello(Policy::default());
        assert_eq!(answer(&mut t, "IFMarker", "No").as_deref(), Some("No"));
        assert_eq!(answer(&mut t, "OFMarker", "Yes").as_deref(), Some("Reject"));
        assert_eq!(
            answer(&mut t, "OFMarkInt", "2048~8192").as_deref(),
            Some("Reject")
        );
        assert_eq!(
            answer(&mut t, "IFMarkInt", "2048").as_deref(),
            Some("Reject")
        );
    }

    #[test]
    fn task_reporting_and_protocol_level() {
        let mut t = target_after_hello(Policy {
            task_reporting: vec![TaskReporting::ResponseFence, TaskReporting::Rfc3720],
            iscsi_protocol_level: 1,
            ..Policy::default()
        });
        assert_eq!(
            answer(&mut t, "TaskReporting", "FastAbort,ResponseFence,RFC3720").as_deref(),
            Some("ResponseFence")
        );
        assert_eq!(
            answer(&mut t, "iSCSIProtocolLevel", "2").as_deref(),
            Some("1")
        );
        let p = t.params();
        assert_eq!(
            (p.task_reporting, p.iscsi_protocol_level),
            (TaskReporting::ResponseFence, 1)
        );
    }

    #[test]
    fn auth_method_negotiation_and_enforcement() {
        let chap_only = Policy {
            auth_methods: vec![AuthMethod::Chap],
            ..Policy::default()
        };
        // libiscsi offers CHAP,None.
        let mut t = target(chap_only.clone());
        let r = t
            .respond(Stage::Security, &kv(&[("AuthMethod", "CHAP,None")]))
            .unwrap();
        assert_eq!(r.reply, kv(&[("AuthMethod", "CHAP")]));
        assert_eq!(t.params().auth_method, AuthMethod::Chap);
        // No acceptable method: authentication failure.
        let mut t = target(chap_only.clone());
        let e = t
            .respond(Stage::Security, &kv(&[("AuthMethod", "None")]))
            .unwrap_err();
        assert_eq!(e.login_status(), 0x0201);
        // Skipping the Security stage when CHAP is required.
        let mut t = target(chap_only);
        let e = t
            .respond(
                Stage::Operational,
                &kv(&[("InitiatorName", "iqn.1994-05.com.redhat:c")]),
            )
            .unwrap_err();
        assert_eq!(e, NegotiationError::AuthenticationRequired);
        // A target accepting None answers None to CHAP,None offered as None,CHAP.
        let mut t = target(Policy::default());
        let r = t
            .respond(Stage::Security, &kv(&[("AuthMethod", "None,CHAP")]))
            .unwrap();
        assert_eq!(r.reply, kv(&[("AuthMethod", "None")]));
    }

    #[test]
    fn open_iscsi_login_is_answered_like_a_real_target() {
        // The keys open-iscsi (usr/login.c) sends with its default iscsid.conf.
        let mut t = target(Policy {
            target_portal_group_tag: Some(1),
            target_alias: Some("ironstar".into()),
            max_recv_data_segment_length: 262_144,
            ..Policy::default()
        });
        let sec = kv(&[
            ("InitiatorName", "iqn.1994-05.com.redhat:5b7d1e3c4a"),
            ("InitiatorAlias", "host1"),
            ("TargetName", "iqn.2024-01.org.ironstar:disk0"),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]);
        let r = t.respond(Stage::Security, &sec).unwrap();
        assert_eq!(r.reply, kv(&[("AuthMethod", "None")]));
        let ours = t.offers(Stage::Security);
        assert_eq!(
            ours,
            kv(&[("TargetPortalGroupTag", "1"), ("TargetAlias", "ironstar")])
        );
        let op = kv(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("ErrorRecoveryLevel", "0"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("MaxOutstandingR2T", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
        ]);
        let r = t.respond(Stage::Operational, &op).unwrap();
        assert_eq!(
            r.reply,
            kv(&[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
                ("IFMarker", "No"),
                ("OFMarker", "No"),
                ("ErrorRecoveryLevel", "0"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
                ("MaxConnections", "1"),
                ("MaxOutstandingR2T", "1"),
            ])
        );
        assert_eq!(
            t.offers(Stage::Operational),
            kv(&[("MaxRecvDataSegmentLength", "262144")])
        );
        assert!(!t.outstanding());
        assert!(t.missing_keys().is_empty());
        let p = t.params();
        assert_eq!(p.max_xmit_data_segment_length, 262_144);
        assert_eq!(p.max_recv_data_segment_length, 262_144);
        assert_eq!(
            (p.max_burst_length, p.first_burst_length),
            (262_144, 65_536)
        );
        assert!(p.initial_r2t && p.immediate_data && !p.header_digest);
        assert_eq!(
            p.initiator_name.as_deref(),
            Some("iqn.1994-05.com.redhat:5b7d1e3c4a")
        );
        assert_eq!(
            p.target_name.as_deref(),
            Some("iqn.2024-01.org.ironstar:disk0")
        );
        assert_eq!(p.target_portal_group_tag, Some(1));
    }

    #[test]
    fn libiscsi_chap_login_with_repeated_declarations() {
        // libiscsi (lib/login.c) re-sends its names in the Operational stage
        // and re-sends every operational key in each PDU of the stage.
        let mut t = target(Policy {
            auth_methods: vec![AuthMethod::Chap],
            header_digest: vec![Digest::Crc32c, Digest::None],
            ..Policy::default()
        });
        let names = [
            (
                "InitiatorName",
                "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
            ),
            ("TargetName", "iqn.2024-01.org.ironstar:disk0"),
            ("SessionType", "Normal"),
        ];
        let mut first = kv(&names);
        first.extend(kv(&[("AuthMethod", "CHAP,None")]));
        assert_eq!(
            t.respond(Stage::Security, &first).unwrap().reply,
            kv(&[("AuthMethod", "CHAP")])
        );
        let r = t.respond(Stage::Security, &kv(&[("CHAP_A", "5")])).unwrap();
        assert_eq!(r.auth_keys, kv(&[("CHAP_A", "5")]));
        let r = t
            .respond(
                Stage::Security,
                &kv(&[("CHAP_N", "user"), ("CHAP_R", "0x00")]),
            )
            .unwrap();
        assert_eq!(r.auth_keys.len(), 2);
        assert!(r.reply.is_empty());
        let mut op = kv(&names);
        op.extend(kv(&[
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("MaxConnections", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ]));
        let r1 = t.respond(Stage::Operational, &op).unwrap();
        assert_eq!(get(&r1.reply, "HeaderDigest"), Some("None"));
        assert_eq!(get(&r1.reply, "FirstBurstLength"), Some("65536"));
        let r2 = t.respond(Stage::Operational, &op).unwrap();
        assert_eq!(r1, r2);
        assert_eq!(t.params().auth_method, AuthMethod::Chap);
    }

    #[test]
    fn target_counter_offers_what_the_default_would_break() {
        let mut t = target_after_hello(Policy {
            max_burst_length: 65_536,
            first_burst_length: 65_536,
            immediate_data: false,
            data_digest: vec![Digest::Crc32c],
            ..Policy::default()
        });
        let offers = t.offers(Stage::Operational);
        assert_eq!(get(&offers, "MaxBurstLength"), Some("65536"));
        assert_eq!(get(&offers, "ImmediateData"), Some("No"));
        assert_eq!(get(&offers, "DataDigest"), Some("CRC32C"));
        assert_eq!(get(&offers, "InitialR2T"), None);
        assert_eq!(get(&offers, "FirstBurstLength"), None);
        // ImmediateData=No settles itself; the other two await answers.
        assert!(t.outstanding());
        t.respond(
            Stage::Operational,
            &kv(&[("MaxBurstLength", "65536"), ("DataDigest", "CRC32C")]),
        )
        .unwrap();
        assert!(!t.outstanding());
        assert!(t.params().data_digest);
        assert!(t.offers(Stage::Operational).is_empty());
    }

    #[test]
    fn initiator_offers_the_classic_operational_keys_even_at_defaults() {
        let mut i = Negotiator::new(
            Role::Initiator,
            Policy {
                initiator_name: Some("iqn.2024-01.org.ironstar:init".into()),
                target_name: Some("iqn.2024-01.org.ironstar:disk0".into()),
                ..Policy::default()
            },
            true,
        );
        let offers = i.offers(Stage::Operational);
        for key in ALWAYS_OFFERED {
            assert!(get(&offers, key).is_some(), "{key} not offered: {offers:?}");
        }
    }

    #[test]
    fn initiator_offers_the_iser_segment_lengths_at_defaults_only_over_rdma() {
        let policy = |rdma: bool, session_type: SessionType| Policy {
            initiator_name: Some("iqn.2024-01.org.ironstar:init".into()),
            target_name: (session_type == SessionType::Normal)
                .then(|| "iqn.2024-01.org.ironstar:disk0".into()),
            session_type,
            rdma_extensions: rdma,
            ..Policy::default()
        };
        let mut i = Negotiator::new(Role::Initiator, policy(true, SessionType::Normal), true);
        let offers = i.offers(Stage::Operational);
        assert_eq!(get(&offers, "RDMAExtensions"), Some("Yes"));
        for key in ISER_ALWAYS_OFFERED {
            assert_eq!(get(&offers, key), Some("8192"), "{key}: {offers:?}");
        }
        for (rdma, st) in [(false, SessionType::Normal), (true, SessionType::Discovery)] {
            let mut i = Negotiator::new(Role::Initiator, policy(rdma, st), true);
            let offers = i.offers(Stage::Operational);
            for key in ISER_ALWAYS_OFFERED {
                assert_eq!(get(&offers, key), None, "{key} offered: {offers:?}");
            }
        }
    }

    #[test]
    fn inadmissible_answers_are_errors() {
        let mut i = Negotiator::new(
            Role::Initiator,
            Policy {
                initiator_name: Some("iqn.2024-01.org.ironstar:init".into()),
                target_name: Some("iqn.2024-01.org.ironstar:disk0".into()),
                max_burst_length: 65_536,
                header_digest: vec![Digest::Crc32c, Digest::None],
                ..Policy::default()
            },
            true,
        );
        let offers = i.offers(Stage::Operational);
        assert_eq!(get(&offers, "MaxBurstLength"), Some("65536"));
        let e = i
            .absorb_answers(Stage::Operational, &kv(&[("MaxBurstLength", "131072")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::InvalidAnswer { .. }));
        let e = i
            .absorb_answers(Stage::Operational, &kv(&[("HeaderDigest", "MD5")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::InvalidAnswer { .. }));
        let e = i
            .absorb_answers(Stage::Operational, &kv(&[("TaskReporting", "Reject")]))
            .unwrap_err();
        assert!(matches!(e, NegotiationError::UnexpectedAnswer { .. }));
    }

    #[test]
    fn rejected_offer_falls_back_to_default_and_auth_reject_fails() {
        let mut i = Negotiator::new(
            Role::Initiator,
            Policy {
                max_burst_length: 65_536,
                auth_methods: vec![AuthMethod::Chap],
                ..Policy::default()
            },
            true,
        );
        i.offers(Stage::Operational);
        i.absorb_answers(Stage::Operational, &kv(&[("MaxBurstLength", "Reject")]))
            .unwrap();
        assert_eq!(i.params().max_burst_length, 262_144);
        let mut i = Negotiator::new(
            Role::Initiator,
            Policy {
                auth_methods: vec![AuthMethod::Chap],
                ..Policy::default()
            },
            true,
        );
        assert_eq!(get(&i.offers(Stage::Security), "AuthMethod"), Some("CHAP"));
        let e = i
            .absorb_answers(Stage::Security, &kv(&[("AuthMethod", "Reject")]))
            .unwrap_err();
        assert_eq!(e.login_status(), 0x0201);
    }

    /// Runs a whole login between two engines, stage by stage, the way the
    /// login state machines will, and returns both sides' parameters.
    fn login(ip: Policy, tp: Policy) -> (NegotiatedParams, NegotiatedParams) {
        let mut i = Negotiator::new(Role::Initiator, ip, true);
        let mut t = Negotiator::new(Role::Target, tp, true);
        for stage in [Stage::Security, Stage::Operational] {
            let mut to_target = i.offers(stage);
            for _round in 0..8 {
                let r = t.respond(stage, &to_target).unwrap();
                let mut to_initiator = r.reply;
                to_initiator.extend(t.offers(stage));
                let a = i.absorb_answers(stage, &to_initiator).unwrap();
                let mut next = a.reply;
                next.extend(i.offers(stage));
                if next.is_empty() && !i.outstanding() && !t.outstanding() {
                    break;
                }
                to_target = next;
            }
            assert!(
                !i.outstanding() && !t.outstanding(),
                "{stage:?} did not settle"
            );
        }
        (i.params(), t.params())
    }

    fn initiator_policy() -> Policy {
        Policy {
            initiator_name: Some("iqn.2024-01.org.ironstar:initiator".into()),
            initiator_alias: Some("ironstar-init".into()),
            target_name: Some("iqn.2024-01.org.ironstar:disk0".into()),
            ..Policy::default()
        }
    }

    fn assert_mirrored(i: &NegotiatedParams, t: &NegotiatedParams) {
        assert_eq!(
            i.max_xmit_data_segment_length,
            t.max_recv_data_segment_length
        );
        assert_eq!(
            i.max_recv_data_segment_length,
            t.max_xmit_data_segment_length
        );
        let strip = |p: &NegotiatedParams| NegotiatedParams {
            max_recv_data_segment_length: 0,
            max_xmit_data_segment_length: 0,
            ..p.clone()
        };
        assert_eq!(strip(i), strip(t));
    }

    #[test]
    fn initiator_and_target_engines_agree_with_defaults() {
        let (i, t) = login(initiator_policy(), Policy::default());
        assert_mirrored(&i, &t);
        assert_eq!(i.max_burst_length, 262_144);
        assert_eq!(
            t.initiator_name.as_deref(),
            Some("iqn.2024-01.org.ironstar:initiator")
        );
    }

    #[test]
    fn initiator_and_target_engines_agree_on_a_tuned_session() {
        let ip = Policy {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1 << 20,
            first_burst_length: 262_144,
            initial_r2t: false,
            header_digest: vec![Digest::Crc32c, Digest::None],
            data_digest: vec![Digest::Crc32c, Digest::None],
            max_outstanding_r2t: 16,
            default_time2retain: 0,
            error_recovery_level: 2,
            auth_methods: vec![AuthMethod::Chap, AuthMethod::None],
            task_reporting: vec![TaskReporting::ResponseFence, TaskReporting::Rfc3720],
            iscsi_protocol_level: 2,
            ..initiator_policy()
        };
        let tp = Policy {
            max_recv_data_segment_length: 65_536,
            max_burst_length: 131_072,
            first_burst_length: 262_144,
            initial_r2t: false,
            immediate_data: false,
            header_digest: vec![Digest::Crc32c, Digest::None],
            data_digest: vec![Digest::None],
            max_outstanding_r2t: 4,
            default_time2wait: 5,
            error_recovery_level: 1,
            auth_methods: vec![AuthMethod::Chap],
            task_reporting: vec![TaskReporting::ResponseFence, TaskReporting::Rfc3720],
            iscsi_protocol_level: 1,
            target_portal_group_tag: Some(7),
            target_alias: Some("disk zero".into()),
            ..Policy::default()
        };
        let (i, t) = login(ip, tp);
        assert_mirrored(&i, &t);
        assert_eq!(t.auth_method, AuthMethod::Chap);
        assert!(i.header_digest && !i.data_digest);
        assert_eq!(i.max_xmit_data_segment_length, 65_536);
        assert_eq!(t.max_xmit_data_segment_length, 262_144);
        assert_eq!(
            (i.max_burst_length, i.first_burst_length),
            (131_072, 131_072)
        );
        assert!(!i.initial_r2t && !i.immediate_data);
        assert_eq!((i.max_outstanding_r2t, i.error_recovery_level), (4, 1));
        assert_eq!((i.default_time2wait, i.default_time2retain), (5, 0));
        assert_eq!(
            (i.task_reporting, i.iscsi_protocol_level),
            (TaskReporting::ResponseFence, 1)
        );
        assert_eq!(i.target_portal_group_tag, Some(7));
        assert_eq!(i.target_alias.as_deref(), Some("disk zero"));
    }

    #[test]
    fn initiator_and_target_engines_agree_on_iser() {
        let iser = |p: Policy| Policy {
            rdma_extensions: true,
            header_digest: vec![Digest::Crc32c, Digest::None],
            initiator_recv_data_segment_length: 262_144,
            target_recv_data_segment_length: 262_144,
            max_outstanding_unexpected_pdus: 32,
            ..p
        };
        let (i, t) = login(iser(initiator_policy()), iser(Policy::default()));
        assert_mirrored(&i, &t);
        assert!(i.rdma_extensions && !i.header_digest);
        assert_eq!(i.initiator_recv_data_segment_length, 262_144);
        assert_eq!(i.max_outstanding_unexpected_pdus, 32);
        // A TCP-only target turns the iSER offers down cleanly.
        let (i, t) = login(iser(initiator_policy()), Policy::default());
        assert_mirrored(&i, &t);
        assert!(!i.rdma_extensions);
    }

    #[test]
    fn discovery_login_between_engines() {
        let ip = Policy {
            session_type: SessionType::Discovery,
            target_name: None,
            max_burst_length: 65_536,
            ..initiator_policy()
        };
        let (i, t) = login(ip, Policy::default());
        assert_mirrored(&i, &t);
        assert_eq!(t.session_type, SessionType::Discovery);
        assert_eq!(i.max_burst_length, 262_144);
    }
}
