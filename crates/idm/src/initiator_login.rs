//! The initiator side of the login phase (RFC 7143 §6, §11.12–11.13), sans-IO.
//!
//! ```text
//!   start() ──► SecurityNegotiation (CSG 0) ──T──► LoginOperationalNegotiation (CSG 1) ──T──► FullFeaturePhase
//!                 AuthMethod=None: one exchange with T=1
//!                 AuthMethod=CHAP: AuthMethod → CHAP_A → CHAP_C/CHAP_R (→ mutual CHAP_R check)
//! ```
//!
//! The machine is fed Login Responses and answers with the next Login
//! Request, a finished [`LoginResult`], or a [`Redirect`] (status 0x0101 /
//! 0x0102). It owns the negotiation through `iscsi_proto::negotiation` in
//! the initiator role and CHAP through `iscsi_proto::chap::ChapResponder`;
//! it has no sockets and no clocks (the driver in `conn` adds those).
//!
//! It sits beside [`crate::login::TargetLogin`] so both ends of a login share
//! one crate and one negotiation engine; `iscsi-initiator` drives it.

use bytes::Bytes;
use iscsi_proto::chap::{ChapAlgorithm, ChapError, ChapResponder};
use iscsi_proto::negotiation::{
    AuthMethod, NegotiatedParams, NegotiationError, Negotiator, Policy, Role, SessionType, Stage,
};
use iscsi_proto::pdu::{stage, Header, LoginRequest, LoginResponse, Pdu};
use iscsi_proto::text::{self, TextAccumulator, TextError};
use thiserror::Error;

type Pairs = Vec<(String, String)>;

/// CHAP credentials of the initiator, and the target's for mutual CHAP.
#[derive(Clone)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: Vec<u8>,
    /// (the CHAP_N the target must present, its secret) for mutual CHAP.
    pub mutual: Option<(String, Vec<u8>)>,
    /// Algorithms we accept, in preference order.
    pub algorithms: Vec<ChapAlgorithm>,
}

impl ChapCredentials {
    /// One-way CHAP with MD5, the one algorithm RFC 7143 requires and every
    /// target knows. Stronger ones are opt-in ([`with_algorithms`](Self::with_algorithms)):
    /// tgt 1.0.85 answers `CHAP_A=7` (SHA-256 in the IANA registry) and then
    /// computes SHA-1, so offering them by default breaks logins to it.
    pub fn new(user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        ChapCredentials {
            user: user.into(),
            secret: secret.into(),
            mutual: None,
            algorithms: vec![ChapAlgorithm::Md5],
        }
    }

    /// The algorithms to offer, in preference order.
    pub fn with_algorithms(mut self, algorithms: Vec<ChapAlgorithm>) -> Self {
        self.algorithms = algorithms;
        self
    }

    /// Adds mutual CHAP: the target must answer as `user` with `secret`.
    pub fn with_mutual(mut self, user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        self.mutual = Some((user.into(), secret.into()));
        self
    }
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// How we authenticate.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Chap(ChapCredentials),
}

/// Everything one login needs.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// `None` logs in to a Discovery session.
    pub target_name: Option<String>,
    pub isid: [u8; 6],
    /// 0 for a new session; the session's TSIH to add or reinstate a connection.
    pub tsih: u16,
    pub cid: u16,
    /// CmdSN of the first Login Request (the session's first CmdSN).
    pub cmd_sn: u32,
    /// ExpStatSN of the first Login Request (0 on a new connection).
    pub exp_stat_sn: u32,
    pub itt: u32,
    pub auth: Auth,
    /// Our side of the operational keys; names and session type are filled
    /// in from the fields above.
    pub policy: Policy,
}

impl LoginConfig {
    /// A config with our usual operational wishes: large bursts, immediate
    /// and unsolicited data, no digests.
    pub fn new(initiator_name: impl Into<String>, target_name: Option<String>) -> Self {
        LoginConfig {
            initiator_name: initiator_name.into(),
            initiator_alias: None,
            target_name,
            isid: clock_isid(),
            tsih: 0,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 0,
            auth: Auth::None,
            policy: default_policy(),
        }
    }
}

/// The operational keys we ask for unless told otherwise.
pub fn default_policy() -> Policy {
    Policy {
        max_recv_data_segment_length: 262_144,
        max_burst_length: 1_048_576,
        first_burst_length: 262_144,
        initial_r2t: false,
        immediate_data: true,
        max_outstanding_r2t: 1,
        ..Policy::default()
    }
}

/// An ISID of type 0x80 ("random" qualifier, RFC 7143 §11.12.5) drawn
/// from the clock and a process-wide counter; callers with a better random
/// source overwrite [`LoginConfig::isid`].
pub fn clock_isid() -> [u8; 6] {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0) as u64;
    let n = u64::from(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mix = t ^ (n << 29) ^ u64::from(std::process::id()).rotate_left(17);
    let b = mix.to_be_bytes();
    [0x80, b[3], b[4], b[5], b[6], b[7]]
}

/// The outcome of a successful login.
#[derive(Debug, Clone)]
pub struct LoginResult {
    pub params: NegotiatedParams,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
    /// CmdSN of the first command in full feature phase.
    pub cmd_sn: u32,
    /// ExpStatSN for the first PDU in full feature phase.
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// The target sent us elsewhere (status class 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The raw TargetAddress value (`host[:port][,tpgt]`).
    pub target_address: String,
    /// 0x0102 (moved permanently) rather than 0x0101 (temporarily).
    pub permanent: bool,
}

/// What to do after a Login Response.
#[derive(Debug)]
pub enum LoginEvent {
    /// Send this Login Request and wait for the next response.
    Send(Pdu),
    /// The connection is in full feature phase.
    Complete(Box<LoginResult>),
    /// Log in again at another address.
    Redirect(Redirect),
}

/// Why a login failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoginError {
    /// Status class 2 (initiator error) or 3 (target error).
    #[error("target refused the login: {} (status {class:#04x}/{detail:#04x})", status_text(*.class, *.detail))]
    Refused { class: u8, detail: u8 },
    #[error("negotiation: {0}")]
    Negotiation(#[from] NegotiationError),
    #[error("CHAP: {0}")]
    Chap(#[from] ChapError),
    #[error("login text: {0}")]
    Text(#[from] TextError),
    /// The target did something RFC 7143 §6 does not allow.
    #[error("target protocol error during login: {0}")]
    Protocol(String),
}

/// A readable name for a login status.
pub fn status_text(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (0, 0) => "success",
        (1, 1) => "target moved temporarily",
        (1, 2) => "target moved permanently",
        (2, 0) => "initiator error",
        (2, 1) => "authentication failure",
        (2, 2) => "authorization failure",
        (2, 3) => "target not found",
        (2, 4) => "target removed",
        (2, 5) => "unsupported version",
        (2, 6) => "too many connections",
        (2, 7) => "missing parameter",
        (2, 8) => "cannot include in session",
        (2, 9) => "session type not supported",
        (2, 10) => "session does not exist",
        (2, 11) => "invalid request during login",
        (3, 0) => "target error",
        (3, 1) => "service unavailable",
        (3, 2) => "out of resources",
        _ => "unknown status",
    }
}

/// Where CHAP stands within the Security stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChapStep {
    /// AuthMethod offered, answer pending.
    AwaitAuthMethod,
    /// CHAP_A sent, challenge pending.
    AwaitChallenge,
    /// CHAP_R sent (with our challenge for mutual CHAP).
    AwaitVerdict,
    Done,
}

/// The login stage of the last request we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Security(Option<ChapStep>),
    Operational,
    Finished,
}

/// Login state of one connection on the initiator.
pub struct InitiatorLogin {
    cfg: LoginConfig,
    negotiator: Negotiator,
    chap: Option<ChapResponder>,
    phase: Phase,
    incoming: TextAccumulator,
    cmd_sn: u32,
    exp_stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    /// The (csg, nsg, transit) of the last request, to repeat while pulling
    /// a continued response.
    last: (u8, u8, bool),
}

impl std::fmt::Debug for InitiatorLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitiatorLogin")
            .field("phase", &self.phase)
            .field("cmd_sn", &self.cmd_sn)
            .field("exp_stat_sn", &self.exp_stat_sn)
            .finish_non_exhaustive()
    }
}

impl InitiatorLogin {
    pub fn new(cfg: LoginConfig) -> Self {
        let mut policy = cfg.policy.clone();
        policy.initiator_name = Some(cfg.initiator_name.clone());
        policy.initiator_alias = cfg.initiator_alias.clone();
        policy.target_name = cfg.target_name.clone();
        policy.session_type = if cfg.target_name.is_some() {
            SessionType::Normal
        } else {
            SessionType::Discovery
        };
        policy.auth_methods = match cfg.auth {
            Auth::None => vec![AuthMethod::None],
            Auth::Chap(_) => vec![AuthMethod::Chap],
        };
        let chap = match &cfg.auth {
            Auth::None => None,
            Auth::Chap(c) => Some(ChapResponder::new(
                c.user.clone(),
                c.secret.clone(),
                c.mutual.clone(),
                c.algorithms.clone(),
            )),
        };
        InitiatorLogin {
            negotiator: Negotiator::new(Role::Initiator, policy, cfg.tsih == 0),
            chap,
            phase: Phase::Security(None),
            incoming: TextAccumulator::new(),
            cmd_sn: cfg.cmd_sn,
            exp_stat_sn: cfg.exp_stat_sn,
            exp_cmd_sn: cfg.cmd_sn,
            max_cmd_sn: cfg.cmd_sn,
            last: (stage::SECURITY, stage::OPERATIONAL, true),
            cfg,
        }
    }

    /// The first Login Request: our names, SessionType and AuthMethod in
    /// the Security stage; T=1 straight away when no authentication is used.
    pub fn start(&mut self) -> Pdu {
        let offers = self.negotiator.offers(Stage::Security);
        let chap = self.chap.is_some();
        self.phase = Phase::Security(chap.then_some(ChapStep::AwaitAuthMethod));
        self.request(stage::SECURITY, stage::OPERATIONAL, !chap, &offers)
    }

    fn request(&mut self, csg: u8, nsg: u8, transit: bool, pairs: &[(String, String)]) -> Pdu {
        let mut data = Vec::new();
        text::encode(pairs, &mut data);
        self.last = (csg, nsg, transit);
        let h = LoginRequest {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_min: 0,
            isid: self.cfg.isid,
            tsih: self.cfg.tsih,
            itt: self.cfg.itt,
            cid: self.cfg.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        Pdu::new(Header::LoginRequest(h), Bytes::from(data))
    }

    /// Takes one Login Response and its data segment.
    pub fn handle(&mut self, resp: &LoginResponse, data: &[u8]) -> Result<LoginEvent, LoginError> {
        if self.phase == Phase::Finished {
            return Err(LoginError::Protocol(
                "Login Response after login ended".into(),
            ));
        }
        match (resp.status_class, resp.status_detail) {
            (0, _) => {}
            (1, detail) => return self.redirect(detail, data),
            (class, detail) => return Err(LoginError::Refused { class, detail }),
        }
        if resp.itt != self.cfg.itt || resp.isid != self.cfg.isid {
            return Err(LoginError::Protocol(format!(
                "response for ITT {:#x} ISID {:02x?}, not ours",
                resp.itt, resp.isid
            )));
        }
        if resp.version_active != 0 {
            return Err(LoginError::Protocol(format!(
                "unsupported active version {}",
                resp.version_active
            )));
        }
        self.exp_stat_sn = resp.stat_sn.wrapping_add(1);
        self.exp_cmd_sn = resp.exp_cmd_sn;
        self.max_cmd_sn = resp.max_cmd_sn;
        let Some(raw) = self.incoming.push_raw(data, resp.cont)? else {
            // RFC 7143 §6.1: answer a continued response with an empty request.
            let (csg, nsg, _) = self.last;
            return Ok(LoginEvent::Send(self.request(csg, nsg, false, &[])));
        };
        if resp.cont {
            return Err(LoginError::Protocol("C and T both set".into()));
        }
        let pairs = text::parse(&raw)?;
        match (self.phase, resp.csg) {
            (Phase::Security(step), stage::SECURITY) => self.security(resp, &pairs, step),
            (Phase::Operational, stage::OPERATIONAL) => self.operational(resp, &pairs),
            (phase, csg) => Err(LoginError::Protocol(format!(
                "response for stage {csg} while we are in {phase:?}"
            ))),
        }
    }

    fn redirect(&mut self, detail: u8, data: &[u8]) -> Result<LoginEvent, LoginError> {
        if detail != 1 && detail != 2 {
            return Err(LoginError::Refused { class: 1, detail });
        }
        let pairs = text::parse(data)?;
        let target_address = pairs
            .into_iter()
            .find(|(k, _)| k == "TargetAddress")
            .map(|(_, v)| v)
            .ok_or_else(|| LoginError::Protocol("redirection without TargetAddress".into()))?;
        self.phase = Phase::Finished;
        Ok(LoginEvent::Redirect(Redirect {
            target_address,
            permanent: detail == 2,
        }))
    }

    fn security(
        &mut self,
        resp: &LoginResponse,
        pairs: &Pairs,
        step: Option<ChapStep>,
    ) -> Result<LoginEvent, LoginError> {
        let answer = self.negotiator.absorb_answers(Stage::Security, pairs)?;
        let mut reply = answer.reply;
        let step = match (step, self.chap.as_mut()) {
            (None, _) => None,
            (Some(ChapStep::AwaitAuthMethod), Some(chap)) => {
                if self.negotiator.outstanding() {
                    // AuthMethod not answered yet: keep asking.
                    return Ok(LoginEvent::Send(self.request(
                        stage::SECURITY,
                        stage::OPERATIONAL,
                        false,
                        &reply,
                    )));
                }
                if self.negotiator.params().auth_method != AuthMethod::Chap {
                    return Err(LoginError::Protocol("target did not agree to CHAP".into()));
                }
                reply.extend(chap.offer_algorithms());
                self.phase = Phase::Security(Some(ChapStep::AwaitChallenge));
                return Ok(LoginEvent::Send(self.request(
                    stage::SECURITY,
                    stage::OPERATIONAL,
                    false,
                    &reply,
                )));
            }
            (Some(ChapStep::AwaitChallenge), Some(chap)) => {
                reply.extend(chap.handle_challenge(&answer.auth_keys)?);
                self.phase = Phase::Security(Some(ChapStep::AwaitVerdict));
                return Ok(LoginEvent::Send(self.request(
                    stage::SECURITY,
                    stage::OPERATIONAL,
                    true,
                    &reply,
                )));
            }
            (Some(ChapStep::AwaitVerdict), Some(chap)) => {
                // One-way CHAP: no keys expected; mutual: the target's CHAP_N/CHAP_R.
                chap.verify_target(&answer.auth_keys)?;
                Some(ChapStep::Done)
            }
            (Some(ChapStep::Done), _) => Some(ChapStep::Done),
            (Some(_), None) => {
                return Err(LoginError::Protocol(
                    "CHAP state without credentials".into(),
                ))
            }
        };
        self.phase = Phase::Security(step);
        if !resp.transit {
            // The target wants another round in this stage.
            return Ok(LoginEvent::Send(self.request(
                stage::SECURITY,
                stage::OPERATIONAL,
                true,
                &reply,
            )));
        }
        match resp.nsg {
            stage::OPERATIONAL => {
                self.phase = Phase::Operational;
                reply.extend(self.negotiator.offers(Stage::Operational));
                Ok(LoginEvent::Send(self.request(
                    stage::OPERATIONAL,
                    stage::FULL_FEATURE,
                    true,
                    &reply,
                )))
            }
            stage::FULL_FEATURE => Ok(self.finish(resp)),
            nsg => Err(LoginError::Protocol(format!("target moved to stage {nsg}"))),
        }
    }

    fn operational(
        &mut self,
        resp: &LoginResponse,
        pairs: &Pairs,
    ) -> Result<LoginEvent, LoginError> {
        let answer = self.negotiator.absorb_answers(Stage::Operational, pairs)?;
        if resp.transit {
            if resp.nsg != stage::FULL_FEATURE {
                return Err(LoginError::Protocol(format!(
                    "target moved to stage {}",
                    resp.nsg
                )));
            }
            if self.negotiator.outstanding() {
                return Err(LoginError::Protocol(
                    "target ended the login with our offers unanswered".into(),
                ));
            }
            return Ok(self.finish(resp));
        }
        let mut reply = answer.reply;
        reply.extend(self.negotiator.offers(Stage::Operational));
        Ok(LoginEvent::Send(self.request(
            stage::OPERATIONAL,
            stage::FULL_FEATURE,
            true,
            &reply,
        )))
    }

    fn finish(&mut self, resp: &LoginResponse) -> LoginEvent {
        self.phase = Phase::Finished;
        LoginEvent::Complete(Box::new(LoginResult {
            params: self.negotiator.params(),
            isid: self.cfg.isid,
            tsih: resp.tsih,
            cid: self.cfg.cid,
            // The Login Requests do not consume CmdSN (RFC 7143 §4.2.2.1: the
            // first command of the session carries the leading login's CmdSN).
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            exp_cmd_sn: resp.exp_cmd_sn,
            max_cmd_sn: resp.max_cmd_sn,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{
        Admission, Binding, ChapRequirement, LoginAuthority, LoginIdentity, LoginOutcome,
        LoginStep, TargetLogin,
    };
    use iscsi_proto::pdu::login_status;

    struct Authority {
        chap: Option<ChapRequirement>,
        policy: Policy,
    }

    impl LoginAuthority for Authority {
        fn admit(&self, who: &LoginIdentity) -> Result<Admission, (u8, u8)> {
            if who.target_name.as_deref() == Some("iqn.2026-11.dev.ironstar:missing") {
                return Err(login_status::NOT_FOUND);
            }
            Ok(Admission {
                chap: self.chap.clone(),
                policy: self.policy.clone(),
            })
        }
        fn bind(&self, _outcome: &LoginOutcome) -> Result<Binding, (u8, u8)> {
            Ok(Binding {
                tsih: 9,
                exp_cmd_sn: 1,
                max_cmd_sn: 32,
            })
        }
    }

    fn target_policy() -> Policy {
        Policy {
            max_recv_data_segment_length: 65_536,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: false,
            ..Policy::default()
        }
    }

    fn chap_requirement(mutual: bool) -> ChapRequirement {
        ChapRequirement {
            algorithms: vec![ChapAlgorithm::Sha256, ChapAlgorithm::Md5],
            initiator_user: "client".into(),
            initiator_secret: b"clientsecret12".to_vec(),
            target_credentials: mutual.then(|| ("target".into(), b"targetsecret34".to_vec())),
        }
    }

    /// Runs both machines against each other until one of them stops.
    fn run(cfg: LoginConfig, authority: &Authority) -> Result<LoginEvent, String> {
        let mut ini = InitiatorLogin::new(cfg);
        let mut tgt = TargetLogin::new(1);
        let mut pdu = ini.start();
        for _ in 0..16 {
            let Header::LoginRequest(req) = &pdu.header else {
                return Err("initiator sent a non-login PDU".into());
            };
            let step = tgt.handle(req, &pdu.data, authority);
            let resp = match step {
                LoginStep::Continue(p) | LoginStep::Complete(p, _) | LoginStep::Fail(p, _) => p,
            };
            let Header::LoginResponse(h) = &resp.header else {
                return Err("target sent a non-login PDU".into());
            };
            match ini.handle(h, &resp.data).map_err(|e| e.to_string())? {
                LoginEvent::Send(next) => pdu = next,
                done => return Ok(done),
            }
        }
        Err("login did not converge".into())
    }

    fn config(auth: Auth) -> LoginConfig {
        let mut cfg = LoginConfig::new(
            "iqn.2026-11.dev.ironstar:initiator",
            Some("iqn.2026-11.dev.ironstar:target0".into()),
        );
        cfg.auth = auth;
        cfg
    }

    fn complete(ev: Result<LoginEvent, String>) -> LoginResult {
        match ev {
            Ok(LoginEvent::Complete(r)) => *r,
            other => panic!("login did not complete: {other:?}"),
        }
    }

    #[test]
    fn login_without_auth_reaches_full_feature_with_negotiated_limits() {
        let auth = Authority {
            chap: None,
            policy: target_policy(),
        };
        let r = complete(run(config(Auth::None), &auth));
        assert_eq!(r.tsih, 9);
        assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (1, 32));
        assert_eq!(r.cmd_sn, 1);
        assert_eq!(r.params.max_xmit_data_segment_length, 65_536);
        assert_eq!(r.params.max_recv_data_segment_length, 262_144);
        assert_eq!(r.params.max_burst_length, 262_144);
        assert_eq!(r.params.first_burst_length, 65_536);
        assert!(!r.params.initial_r2t);
        assert!(r.params.immediate_data);
        assert_eq!(r.params.target_portal_group_tag, Some(1));
    }

    #[test]
    fn target_insisting_on_initial_r2t_wins() {
        let auth = Authority {
            chap: None,
            policy: Policy::default(),
        };
        let r = complete(run(config(Auth::None), &auth));
        assert!(r.params.initial_r2t);
        assert_eq!(r.params.max_burst_length, 262_144);
    }

    #[test]
    fn discovery_login_needs_no_target_name() {
        let auth = Authority {
            chap: None,
            policy: Policy::default(),
        };
        let mut cfg = config(Auth::None);
        cfg.target_name = None;
        let r = complete(run(cfg, &auth));
        assert_eq!(r.params.session_type, SessionType::Discovery);
    }

    #[test]
    fn discovery_login_with_chap() {
        let auth = Authority {
            chap: Some(chap_requirement(false)),
            policy: Policy::default(),
        };
        let mut cfg = config(Auth::Chap(ChapCredentials::new(
            "client",
            b"clientsecret12".to_vec(),
        )));
        cfg.target_name = None;
        let r = complete(run(cfg, &auth));
        assert_eq!(r.params.session_type, SessionType::Discovery);
        assert_eq!(r.params.auth_method, AuthMethod::Chap);
    }

    #[test]
    fn stronger_chap_algorithms_are_used_when_both_sides_allow_them() {
        let auth = Authority {
            chap: Some(chap_requirement(true)),
            policy: target_policy(),
        };
        let creds = ChapCredentials::new("client", b"clientsecret12".to_vec())
            .with_mutual("target", b"targetsecret34".to_vec())
            .with_algorithms(vec![ChapAlgorithm::Sha3_256, ChapAlgorithm::Sha256]);
        complete(run(config(Auth::Chap(creds)), &auth));
    }

    #[test]
    fn one_way_chap_logs_in() {
        let auth = Authority {
            chap: Some(chap_requirement(false)),
            policy: target_policy(),
        };
        let creds = ChapCredentials::new("client", b"clientsecret12".to_vec());
        let r = complete(run(config(Auth::Chap(creds)), &auth));
        assert_eq!(r.params.auth_method, AuthMethod::Chap);
        assert_eq!(r.tsih, 9);
    }

    #[test]
    fn mutual_chap_logs_in_and_checks_the_target() {
        let auth = Authority {
            chap: Some(chap_requirement(true)),
            policy: target_policy(),
        };
        let creds = ChapCredentials::new("client", b"clientsecret12".to_vec())
            .with_mutual("target", b"targetsecret34".to_vec());
        complete(run(config(Auth::Chap(creds)), &auth));

        let wrong = ChapCredentials::new("client", b"clientsecret12".to_vec())
            .with_mutual("target", b"notthesecret56".to_vec());
        let err = run(config(Auth::Chap(wrong)), &auth).unwrap_err();
        assert!(err.contains("CHAP"), "{err}");
    }

    #[test]
    fn chap_with_wrong_secret_is_an_authentication_failure() {
        let auth = Authority {
            chap: Some(chap_requirement(false)),
            policy: target_policy(),
        };
        let creds = ChapCredentials::new("client", b"wrongsecret123".to_vec());
        let err = run(config(Auth::Chap(creds)), &auth).unwrap_err();
        assert!(err.contains("authentication failure"), "{err}");
    }

    #[test]
    fn no_auth_against_a_chap_target_is_refused() {
        let auth = Authority {
            chap: Some(chap_requirement(false)),
            policy: target_policy(),
        };
        let err = run(config(Auth::None), &auth).unwrap_err();
        // idm's TargetLogin answers 0x0200 here (NegotiationError::login_status
        // would say 0x0201); either way the login is refused.
        assert!(err.contains("target refused the login"), "{err}");
    }

    #[test]
    fn unknown_target_is_refused_with_not_found() {
        let auth = Authority {
            chap: None,
            policy: target_policy(),
        };
        let mut cfg = config(Auth::None);
        cfg.target_name = Some("iqn.2026-11.dev.ironstar:missing".into());
        let err = run(cfg, &auth).unwrap_err();
        assert!(err.contains("target not found"), "{err}");
    }

    fn redirect_response(detail: u8, isid: [u8; 6]) -> (LoginResponse, Vec<u8>) {
        let h = LoginResponse {
            isid,
            status_class: 1,
            status_detail: detail,
            ..Default::default()
        };
        let mut data = Vec::new();
        text::encode(&[("TargetAddress", "[fd00::5]:3261,2")], &mut data);
        (h, data)
    }

    #[test]
    fn redirection_is_surfaced_with_the_target_address() {
        let cfg = config(Auth::None);
        let isid = cfg.isid;
        let mut ini = InitiatorLogin::new(cfg);
        ini.start();
        let (h, data) = redirect_response(1, isid);
        let ev = ini.handle(&h, &data).unwrap();
        let LoginEvent::Redirect(r) = ev else {
            panic!("not a redirect: {ev:?}")
        };
        assert_eq!(r.target_address, "[fd00::5]:3261,2");
        assert!(!r.permanent);
        let mut ini = InitiatorLogin::new(config(Auth::None));
        ini.start();
        let (h, data) = redirect_response(2, isid);
        assert!(matches!(
            ini.handle(&h, &data).unwrap(),
            LoginEvent::Redirect(Redirect {
                permanent: true,
                ..
            })
        ));
    }

    #[test]
    fn continued_response_is_pulled_with_an_empty_request() {
        let cfg = config(Auth::None);
        let isid = cfg.isid;
        let mut ini = InitiatorLogin::new(cfg);
        ini.start();
        let h = LoginResponse {
            cont: true,
            isid,
            stat_sn: 5,
            ..Default::default()
        };
        let ev = ini.handle(&h, b"TargetAl").unwrap();
        let LoginEvent::Send(pdu) = ev else {
            panic!("expected a request")
        };
        let Header::LoginRequest(req) = &pdu.header else {
            panic!()
        };
        assert!(pdu.data.is_empty() && !req.transit && !req.cont);
        assert_eq!(req.exp_stat_sn, 6);
    }

    #[test]
    fn login_response_for_another_itt_is_a_protocol_error() {
        let mut ini = InitiatorLogin::new(config(Auth::None));
        ini.start();
        let h = LoginResponse {
            itt: 77,
            ..Default::default()
        };
        assert!(matches!(ini.handle(&h, b""), Err(LoginError::Protocol(_))));
    }
}
