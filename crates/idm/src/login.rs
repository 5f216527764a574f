//! The target side of the login phase (RFC 7143 §6, §11.12–11.13), sans-IO.
//!
//! Stages are SecurityNegotiation (CSG 0) → LoginOperationalNegotiation
//! (CSG 1) → FullFeaturePhase (NSG 3), moved by the T bit; multi-PDU text
//! (C bit) is reassembled on the way in and split on the way out. The
//! machine takes one Login Request at a time and says what to answer; who
//! may log in to what, and with which secrets, is asked of a
//! [`LoginAuthority`] (the iSCSI target's policy), so this file knows no
//! configuration.

use bytes::Bytes;
use iscsi_proto::chap::{ChapAlgorithm, ChapAuthenticator};
use iscsi_proto::negotiation::{
    AuthMethod, NegotiatedParams, Negotiator, Policy, Role, SessionType, Stage,
};
use iscsi_proto::pdu::{login_status, stage, Header, LoginRequest, LoginResponse, Pdu};
use iscsi_proto::text::{self, TextAccumulator};

type Pairs = Vec<(String, String)>;

/// Largest data segment we send during login (RFC 7143 §6.1: 8192 until
/// MaxRecvDataSegmentLength is negotiated).
const LOGIN_SEGMENT: usize = 8192;

/// Who is logging in, known from the first Login Request.
#[derive(Debug, Clone)]
pub struct LoginIdentity {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
}

/// CHAP requirements for one login.
#[derive(Clone)]
pub struct ChapRequirement {
    pub algorithms: Vec<ChapAlgorithm>,
    /// The initiator's CHAP user name and secret.
    pub initiator_user: String,
    pub initiator_secret: Vec<u8>,
    /// The target's own credentials, for mutual CHAP.
    pub target_credentials: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ChapRequirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapRequirement")
            .field("algorithms", &self.algorithms)
            .field("initiator_user", &self.initiator_user)
            .field("mutual", &self.target_credentials.is_some())
            .finish_non_exhaustive()
    }
}

/// What the authority allows for this login.
#[derive(Debug, Clone)]
pub struct Admission {
    /// `None`: AuthMethod=None is accepted.
    pub chap: Option<ChapRequirement>,
    /// Our side of the operational negotiation for this target.
    pub policy: Policy,
}

/// The session a completed login joins.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub tsih: u16,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Everything the login established.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    pub identity: LoginIdentity,
    pub params: NegotiatedParams,
    /// CmdSN of the leading Login Request: the session's first ExpCmdSN.
    pub cmd_sn: u32,
    /// StatSN of the next response on this connection.
    pub next_stat_sn: u32,
    /// The CHAP user the initiator authenticated as, if any.
    pub chap_user: Option<String>,
}

/// The target's policy, consulted during login.
pub trait LoginAuthority {
    /// Decides whether this initiator may log in to this target here.
    fn admit(&self, who: &LoginIdentity) -> Result<Admission, (u8, u8)>;
    /// Binds the finished login to a session (new, reinstated or joined)
    /// and returns its TSIH and command window.
    fn bind(&self, outcome: &LoginOutcome) -> Result<Binding, (u8, u8)>;
}

/// What to do after one Login Request.
#[derive(Debug)]
pub enum LoginStep {
    /// Send this response and wait for the next request.
    Continue(Pdu),
    /// Send this final response; the connection is in full feature phase.
    Complete(Pdu, Box<LoginOutcome>),
    /// Send this response (status class 1, 2 or 3) and close the connection.
    Fail(Pdu, (u8, u8)),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthState {
    NotNeeded,
    AwaitAlgorithms,
    AwaitResponse,
    Done,
}

/// Login state of one connection on the target.
pub struct TargetLogin {
    first: Option<LoginRequest>,
    identity: Option<LoginIdentity>,
    admission: Option<Admission>,
    negotiator: Option<Negotiator>,
    chap: Option<ChapAuthenticator>,
    auth: AuthState,
    chap_user: Option<String>,
    incoming: TextAccumulator,
    outgoing: Vec<u8>,
    stat_sn: u32,
    current_stage: u8,
    portal_group_tag: u16,
    sent_first_response: bool,
    leading: bool,
}

impl TargetLogin {
    pub fn new(portal_group_tag: u16) -> Self {
        TargetLogin {
            first: None,
            identity: None,
            admission: None,
            negotiator: None,
            chap: None,
            auth: AuthState::NotNeeded,
            chap_user: None,
            incoming: TextAccumulator::new(),
            outgoing: Vec::new(),
            stat_sn: 0,
            current_stage: stage::SECURITY,
            portal_group_tag,
            sent_first_response: false,
            leading: true,
        }
    }

    fn response(&mut self, req: &LoginRequest, transit: bool, data: Vec<u8>) -> Pdu {
        let cont = data.len() > LOGIN_SEGMENT;
        let now: Vec<u8> = if cont {
            self.outgoing = data.get(LOGIN_SEGMENT..).unwrap_or(&[]).to_vec();
            data.get(..LOGIN_SEGMENT).unwrap_or(&[]).to_vec()
        } else {
            data
        };
        let cmd_sn = self.first.as_ref().map_or(req.cmd_sn, |f| f.cmd_sn);
        let h = LoginResponse {
            transit: transit && !cont,
            cont,
            csg: req.csg,
            nsg: if transit && !cont { req.nsg } else { 0 },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: 0,
            itt: req.itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: cmd_sn,
            max_cmd_sn: cmd_sn,
            status_class: 0,
            status_detail: 0,
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        self.sent_first_response = true;
        Pdu::new(Header::LoginResponse(h), Bytes::from(now))
    }

    fn fail(&mut self, req: &LoginRequest, status: (u8, u8)) -> LoginStep {
        let h = LoginResponse {
            csg: req.csg,
            isid: req.isid,
            itt: req.itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn,
            status_class: status.0,
            status_detail: status.1,
            ..Default::default()
        };
        tracing::info!(
            class = status.0,
            detail = status.1,
            initiator = self
                .identity
                .as_ref()
                .map(|i| i.initiator_name.as_str())
                .unwrap_or("?"),
            "login refused"
        );
        LoginStep::Fail(Pdu::new(Header::LoginResponse(h), Bytes::new()), status)
    }

    /// Takes one Login Request and its data segment.
    pub fn handle(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        authority: &dyn LoginAuthority,
    ) -> LoginStep {
        if self.first.is_none() {
            if req.version_min > 0 {
                return self.fail(req, login_status::UNSUPPORTED_VERSION);
            }
            self.stat_sn = req.exp_stat_sn;
            self.leading = req.tsih == 0;
            self.current_stage = req.csg;
            self.first = Some(req.clone());
        } else if let Some(first) = &self.first {
            // RFC 7143 §6.1: ISID, TSIH and CID stay the same through login.
            if req.isid != first.isid || req.tsih != first.tsih || req.cid != first.cid {
                return self.fail(req, login_status::INITIATOR_ERROR);
            }
        }
        if req.csg == 2 || req.csg == stage::FULL_FEATURE || req.csg < self.current_stage {
            return self.fail(req, login_status::INITIATOR_ERROR);
        }
        if req.transit && (req.nsg == 2 || req.nsg <= req.csg) {
            return self.fail(req, login_status::INITIATOR_ERROR);
        }
        // The initiator is pulling the rest of a long response of ours.
        if !self.outgoing.is_empty() {
            if !data.is_empty() {
                return self.fail(req, login_status::INITIATOR_ERROR);
            }
            let rest = std::mem::take(&mut self.outgoing);
            return LoginStep::Continue(self.response(req, false, rest));
        }
        let pairs = match self.incoming.push(data, req.cont) {
            Ok(Some(p)) => p,
            Ok(None) => return LoginStep::Continue(self.response(req, false, Vec::new())),
            Err(_) => return self.fail(req, login_status::INITIATOR_ERROR),
        };
        if req.cont {
            return self.fail(req, login_status::INITIATOR_ERROR);
        }
        if self.identity.is_none() {
            if let Err(status) = self.admit(req, &pairs, authority) {
                return self.fail(req, status);
            }
        }
        self.current_stage = req.csg;
        match req.csg {
            stage::SECURITY => self.security_stage(req, &pairs, authority),
            _ => self.operational_stage(req, &pairs, authority),
        }
    }

    fn admit(
        &mut self,
        req: &LoginRequest,
        pairs: &[(String, String)],
        authority: &dyn LoginAuthority,
    ) -> Result<(), (u8, u8)> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let initiator_name = get("InitiatorName").ok_or(login_status::MISSING_PARAMETER)?;
        let session_type = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(login_status::SESSION_TYPE_NOT_SUPPORTED),
        };
        let target_name = get("TargetName");
        if session_type == SessionType::Normal && target_name.is_none() {
            return Err(login_status::MISSING_PARAMETER);
        }
        let identity = LoginIdentity {
            initiator_name,
            initiator_alias: get("InitiatorAlias"),
            target_name,
            session_type,
            isid: req.isid,
            tsih: req.tsih,
            cid: req.cid,
        };
        let admission = authority.admit(&identity)?;
        let mut policy = admission.policy.clone();
        policy.target_portal_group_tag = Some(self.portal_group_tag);
        policy.auth_methods = if admission.chap.is_some() {
            vec![AuthMethod::Chap]
        } else {
            vec![AuthMethod::None]
        };
        self.auth = if admission.chap.is_some() {
            AuthState::AwaitAlgorithms
        } else {
            AuthState::NotNeeded
        };
        if let Some(chap) = &admission.chap {
            self.chap = Some(ChapAuthenticator::new(chap.algorithms.clone()));
        }
        self.negotiator = Some(Negotiator::new(Role::Target, policy, self.leading));
        self.identity = Some(identity);
        self.admission = Some(admission);
        Ok(())
    }

    fn negotiate(
        &mut self,
        stage: Stage,
        pairs: &[(String, String)],
    ) -> Result<(Pairs, Pairs), (u8, u8)> {
        let first_response = !self.sent_first_response;
        let Some(neg) = self.negotiator.as_mut() else {
            return Err(login_status::TARGET_ERROR);
        };
        let resp = neg.respond(stage, pairs).map_err(|e| {
            tracing::info!(error = %e, "negotiation failed");
            let status = e.login_status();
            ((status >> 8) as u8, (status & 0xff) as u8)
        })?;
        let mut reply = resp.reply;
        reply.extend(neg.offers(stage));
        if first_response && !reply.iter().any(|(k, _)| k == "TargetPortalGroupTag") {
            reply.push((
                "TargetPortalGroupTag".to_string(),
                self.portal_group_tag.to_string(),
            ));
        }
        Ok((reply, resp.auth_keys))
    }

    fn security_stage(
        &mut self,
        req: &LoginRequest,
        pairs: &[(String, String)],
        authority: &dyn LoginAuthority,
    ) -> LoginStep {
        let (mut reply, auth_keys) = match self.negotiate(Stage::Security, pairs) {
            Ok(r) => r,
            Err(status) => return self.fail(req, status),
        };
        let chosen = self.negotiator.as_ref().map(|n| n.params().auth_method);
        if self.auth != AuthState::NotNeeded
            && pairs.iter().any(|(k, _)| k == "AuthMethod")
            && chosen != Some(AuthMethod::Chap)
        {
            return self.fail(req, login_status::AUTHENTICATION_FAILURE);
        }
        if !auth_keys.is_empty() {
            match self.chap_step(&auth_keys) {
                Ok(mut more) => reply.append(&mut more),
                Err(status) => return self.fail(req, status),
            }
        }
        // Until authentication is done we do not agree to leave the
        // security stage: answer T=0 (RFC 7143 §6.2); skipping it anyway
        // is refused in the operational stage.
        let mut transit =
            req.transit && (self.auth == AuthState::NotNeeded || self.auth == AuthState::Done);
        if transit && self.auth == AuthState::NotNeeded && chosen != Some(AuthMethod::None) {
            // AuthMethod was never agreed to: only None is acceptable.
            if pairs.iter().any(|(k, _)| k == "AuthMethod") {
                return self.fail(req, login_status::AUTHENTICATION_FAILURE);
            }
        }
        if transit && req.nsg == stage::FULL_FEATURE {
            return self.finish(req, reply, authority);
        }
        if self.auth == AuthState::AwaitResponse {
            transit = false;
        }
        let mut out = Vec::new();
        text::encode(&reply, &mut out);
        LoginStep::Continue(self.response(req, transit, out))
    }

    fn chap_step(&mut self, keys: &[(String, String)]) -> Result<Vec<(String, String)>, (u8, u8)> {
        let Some(chap) = self.chap.as_mut() else {
            return Err(login_status::INITIATOR_ERROR);
        };
        let Some(req) = self.admission.as_ref().and_then(|a| a.chap.clone()) else {
            return Err(login_status::INITIATOR_ERROR);
        };
        match self.auth {
            AuthState::AwaitAlgorithms => {
                let a = keys
                    .iter()
                    .find(|(k, _)| k == "CHAP_A")
                    .map(|(_, v)| v.as_str())
                    .ok_or(login_status::INITIATOR_ERROR)?;
                let reply = chap
                    .handle_algorithms(a)
                    .map_err(|_| login_status::AUTHENTICATION_FAILURE)?;
                self.auth = AuthState::AwaitResponse;
                Ok(reply)
            }
            AuthState::AwaitResponse => {
                let user = req.initiator_user.clone();
                let secret = req.initiator_secret.clone();
                let lookup = move |name: &str| (name == user).then(|| secret.clone());
                let target = req
                    .target_credentials
                    .as_ref()
                    .map(|(u, s)| (u.as_str(), s.as_slice()));
                let outcome = chap.handle_response(keys, &lookup, target).map_err(|e| {
                    tracing::info!(error = %e, "CHAP failed");
                    login_status::AUTHENTICATION_FAILURE
                })?;
                self.chap_user = Some(outcome.initiator_user);
                self.auth = AuthState::Done;
                Ok(outcome.reply)
            }
            AuthState::NotNeeded | AuthState::Done => Err(login_status::INITIATOR_ERROR),
        }
    }

    fn operational_stage(
        &mut self,
        req: &LoginRequest,
        pairs: &[(String, String)],
        authority: &dyn LoginAuthority,
    ) -> LoginStep {
        if self.auth != AuthState::NotNeeded && self.auth != AuthState::Done {
            return self.fail(req, login_status::AUTHENTICATION_FAILURE);
        }
        if pairs
            .iter()
            .any(|(k, _)| k == "AuthMethod" || k.starts_with("CHAP_"))
        {
            return self.fail(req, login_status::INITIATOR_ERROR);
        }
        let (reply, _) = match self.negotiate(Stage::Operational, pairs) {
            Ok(r) => r,
            Err(status) => return self.fail(req, status),
        };
        let outstanding = self.negotiator.as_ref().is_some_and(|n| n.outstanding());
        if req.transit && req.nsg == stage::FULL_FEATURE && !outstanding {
            return self.finish(req, reply, authority);
        }
        let mut out = Vec::new();
        text::encode(&reply, &mut out);
        LoginStep::Continue(self.response(req, req.transit && !outstanding, out))
    }

    /// Only `handle` calls this, after the stage checks.
    fn finish(
        &mut self,
        req: &LoginRequest,
        reply: Vec<(String, String)>,
        authority: &dyn LoginAuthority,
    ) -> LoginStep {
        let (Some(identity), Some(neg), Some(first)) = (
            self.identity.clone(),
            self.negotiator.as_ref(),
            self.first.as_ref(),
        ) else {
            return self.fail(req, login_status::TARGET_ERROR);
        };
        let mut outcome = LoginOutcome {
            identity,
            params: neg.params(),
            cmd_sn: first.cmd_sn,
            next_stat_sn: 0,
            chap_user: self.chap_user.clone(),
        };
        let mut data = Vec::new();
        text::encode(&reply, &mut data);
        if data.len() > LOGIN_SEGMENT {
            // Rare: let the initiator pull the text first, then finish.
            return LoginStep::Continue(self.response(req, false, data));
        }
        outcome.next_stat_sn = self.stat_sn.wrapping_add(1);
        let binding = match authority.bind(&outcome) {
            Ok(b) => b,
            Err(status) => return self.fail(req, status),
        };
        let mut pdu = self.response(req, true, data);
        apply_binding(&mut pdu, &binding);
        LoginStep::Complete(pdu, Box::new(outcome))
    }
}

/// Fills the binding (TSIH and window) into a final Login Response.
pub fn apply_binding(pdu: &mut Pdu, binding: &Binding) {
    if let Header::LoginResponse(h) = &mut pdu.header {
        h.tsih = binding.tsih;
        h.exp_cmd_sn = binding.exp_cmd_sn;
        h.max_cmd_sn = binding.max_cmd_sn;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_proto::chap::ChapResponder;
    use std::cell::Cell;

    struct Fake {
        chap: bool,
        bound: Cell<bool>,
    }

    impl LoginAuthority for Fake {
        fn admit(&self, who: &LoginIdentity) -> Result<Admission, (u8, u8)> {
            if who.target_name.as_deref() == Some("iqn.2026-11.dev.ironstar:missing") {
                return Err(login_status::NOT_FOUND);
            }
            Ok(Admission {
                chap: self.chap.then(|| ChapRequirement {
                    algorithms: vec![ChapAlgorithm::Sha256, ChapAlgorithm::Md5],
                    initiator_user: "client".into(),
                    initiator_secret: b"clientsecret12".to_vec(),
                    target_credentials: None,
                }),
                policy: Policy::default(),
            })
        }
        fn bind(&self, _outcome: &LoginOutcome) -> Result<Binding, (u8, u8)> {
            self.bound.set(true);
            Ok(Binding {
                tsih: 7,
                exp_cmd_sn: 1,
                max_cmd_sn: 64,
            })
        }
    }

    fn req(csg: u8, nsg: u8, transit: bool) -> LoginRequest {
        LoginRequest {
            transit,
            csg,
            nsg,
            isid: [0x80, 0, 0, 0, 0, 1],
            itt: 1,
            cid: 0,
            cmd_sn: 1,
            ..Default::default()
        }
    }

    fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        text::encode(pairs, &mut out);
        out
    }

    fn response_of(step: &LoginStep) -> &LoginResponse {
        let pdu = match step {
            LoginStep::Continue(p) | LoginStep::Complete(p, _) | LoginStep::Fail(p, _) => p,
        };
        match &pdu.header {
            Header::LoginResponse(h) => h,
            other => panic!("not a login response: {other:?}"),
        }
    }

    const NAMES: &[(&str, &str)] = &[
        ("InitiatorName", "iqn.2026-11.dev.ironstar:client"),
        ("TargetName", "iqn.2026-11.dev.ironstar:target0"),
        ("SessionType", "Normal"),
    ];

    #[test]
    fn login_without_auth_reaches_full_feature_phase() {
        let auth = Fake {
            chap: false,
            bound: Cell::new(false),
        };
        let mut m = TargetLogin::new(1);
        let mut first = NAMES.to_vec();
        first.push(("AuthMethod", "None"));
        let step = m.handle(&req(0, 1, true), &text(&first), &auth);
        let r = response_of(&step);
        assert!(matches!(step, LoginStep::Continue(_)));
        assert!(r.transit && r.nsg == 1 && r.status_class == 0);
        let LoginStep::Continue(pdu) = &step else {
            unreachable!()
        };
        let answer = text::parse(&pdu.data).unwrap();
        assert!(answer
            .iter()
            .any(|(k, v)| k == "TargetPortalGroupTag" && v == "1"));
        let step = m.handle(
            &req(1, 3, true),
            &text(&[
                ("HeaderDigest", "None"),
                ("MaxRecvDataSegmentLength", "65536"),
            ]),
            &auth,
        );
        let r = response_of(&step);
        assert_eq!((r.transit, r.nsg, r.tsih), (true, 3, 7));
        let LoginStep::Complete(_, outcome) = step else {
            panic!("login did not complete")
        };
        assert!(auth.bound.get());
        assert_eq!(outcome.params.max_xmit_data_segment_length, 65536);
    }

    #[test]
    fn missing_initiator_name_is_a_missing_parameter() {
        let auth = Fake {
            chap: false,
            bound: Cell::new(false),
        };
        let mut m = TargetLogin::new(1);
        let step = m.handle(&req(0, 1, true), &text(&[("SessionType", "Normal")]), &auth);
        assert!(matches!(step, LoginStep::Fail(_, s) if s == login_status::MISSING_PARAMETER));
    }

    #[test]
    fn unknown_target_is_not_found() {
        let auth = Fake {
            chap: false,
            bound: Cell::new(false),
        };
        let mut m = TargetLogin::new(1);
        let step = m.handle(
            &req(0, 1, true),
            &text(&[
                ("InitiatorName", "iqn.2026-11.dev.ironstar:client"),
                ("TargetName", "iqn.2026-11.dev.ironstar:missing"),
            ]),
            &auth,
        );
        assert!(matches!(step, LoginStep::Fail(_, s) if s == login_status::NOT_FOUND));
    }

    #[test]
    fn unsupported_version_is_refused() {
        let auth = Fake {
            chap: false,
            bound: Cell::new(false),
        };
        let mut m = TargetLogin::new(1);
        let mut r = req(0, 1, true);
        r.version_min = 2;
        r.version_max = 2;
        let step = m.handle(&r, &text(NAMES), &auth);
        assert!(matches!(step, LoginStep::Fail(_, s) if s == login_status::UNSUPPORTED_VERSION));
    }

    #[test]
    fn skipping_security_when_chap_is_required_fails_authentication() {
        let auth = Fake {
            chap: true,
            bound: Cell::new(false),
        };
        let mut m = TargetLogin::new(1);
        let step = m.handle(&req(1, 3, true), &text(NAMES), &auth);
        assert!(matches!(step, LoginStep::Fail(_, s) if s == login_status::AUTHENTICATION_FAILURE));
        assert!(!auth.bound.get());
    }

    fn chap_login(secret: &[u8]) -> LoginStep {
        let auth = Fake {
            chap: true,
            bound: Cell::new(false),
        };
        let mut m = TargetLogin::new(1);
        let mut first = NAMES.to_vec();
        first.push(("AuthMethod", "CHAP,None"));
        // libiscsi asks to transit (T=1) in its very first PDU: the target
        // must answer T=0 until CHAP is done, not fail the login.
        let step = m.handle(&req(0, 1, true), &text(&first), &auth);
        assert!(!response_of(&step).transit);
        let LoginStep::Continue(pdu) = step else {
            panic!("AuthMethod not accepted")
        };
        assert!(text::parse(&pdu.data)
            .unwrap()
            .contains(&("AuthMethod".into(), "CHAP".into())));
        let mut ini = ChapResponder::new(
            "client",
            secret,
            None,
            vec![ChapAlgorithm::Sha256, ChapAlgorithm::Md5],
        );
        let offer = ini.offer_algorithms();
        let LoginStep::Continue(pdu) = m.handle(&req(0, 1, false), &text_of(&offer), &auth) else {
            panic!("CHAP_A not answered")
        };
        let challenge = text::parse(&pdu.data).unwrap();
        let answer = ini.handle_challenge(&challenge).unwrap();
        m.handle(&req(0, 1, true), &text_of(&answer), &auth)
    }

    fn text_of(pairs: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        text::encode(pairs, &mut out);
        out
    }

    #[test]
    fn chap_with_the_right_secret_moves_to_operational() {
        let step = chap_login(b"clientsecret12");
        let r = response_of(&step);
        assert!(matches!(step, LoginStep::Continue(_)));
        assert!(r.transit && r.nsg == 1 && r.status_class == 0);
    }

    #[test]
    fn chap_with_a_wrong_secret_fails_authentication() {
        let step = chap_login(b"wrongsecret123");
        assert!(matches!(step, LoginStep::Fail(_, s) if s == login_status::AUTHENTICATION_FAILURE));
    }

    #[test]
    fn isid_change_during_login_is_an_initiator_error() {
        let auth = Fake {
            chap: false,
            bound: Cell::new(false),
        };
        let mut m = TargetLogin::new(1);
        let _ = m.handle(&req(0, 1, false), &text(NAMES), &auth);
        let mut r = req(0, 1, true);
        r.isid = [0x80, 0, 0, 0, 0, 2];
        let step = m.handle(&r, &[], &auth);
        assert!(matches!(step, LoginStep::Fail(_, s) if s == login_status::INITIATOR_ERROR));
    }
}
