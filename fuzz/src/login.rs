//! `text_negotiation`: sequences of login-phase texts, each through
//! `text::parse`/`TextAccumulator`, the `Negotiator` (target role, and the
//! initiator role reading them as a target's answers), and as Login Request
//! PDUs through `idm::login::TargetLogin` with a fake `LoginAuthority`.

use bytes::BytesMut;
use idm::login::{
    Admission, Binding, ChapRequirement, LoginAuthority, LoginIdentity, LoginOutcome, LoginStep,
    TargetLogin,
};
use iscsi_proto::chap::{ChapAlgorithm, ChapResponder};
use iscsi_proto::codec::PduDecoder;
use iscsi_proto::negotiation::{Digest, Negotiator, Policy, Role, Stage};
use iscsi_proto::pdu::{login_status, Header, LoginRequest, Pdu};
use iscsi_proto::text::{self, TextAccumulator};

use crate::format::{
    read_login_record, LoginRecord, Reader, MODE_BAD_VERSION, MODE_BIND_FAILS, MODE_CHAP,
    MODE_DIGESTS, MODE_MUTUAL, MODE_NON_LEADING,
};

pub const INITIATOR_USER: &str = "client";
pub const INITIATOR_SECRET: &[u8] = b"clientsecret12";
pub const TARGET_USER: &str = "target0";
pub const TARGET_SECRET: &[u8] = b"targetsecret12";
/// A target name the fake authority does not know.
pub const MISSING_TARGET: &str = "iqn.2026-11.dev.ironstar:missing";

const ALL_CHAP: [ChapAlgorithm; 4] = [
    ChapAlgorithm::Sha3_256,
    ChapAlgorithm::Sha256,
    ChapAlgorithm::Sha1,
    ChapAlgorithm::Md5,
];

fn policy(mode: u8) -> Policy {
    if mode & MODE_DIGESTS != 0 {
        // What iscsitd offers (crates/iscsi-target/src/conn.rs).
        Policy {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 65_536,
            max_outstanding_r2t: 8,
            max_connections: 8,
            initial_r2t: false,
            immediate_data: true,
            header_digest: vec![Digest::None, Digest::Crc32c],
            data_digest: vec![Digest::None, Digest::Crc32c],
            ..Policy::default()
        }
    } else {
        Policy::default()
    }
}

struct FakeAuthority {
    mode: u8,
}

impl LoginAuthority for FakeAuthority {
    fn admit(&self, who: &LoginIdentity) -> Result<Admission, (u8, u8)> {
        if who.target_name.as_deref() == Some(MISSING_TARGET) {
            return Err(login_status::NOT_FOUND);
        }
        let chap = (self.mode & MODE_CHAP != 0).then(|| ChapRequirement {
            algorithms: ALL_CHAP.to_vec(),
            initiator_user: INITIATOR_USER.into(),
            initiator_secret: INITIATOR_SECRET.to_vec(),
            target_credentials: (self.mode & MODE_MUTUAL != 0)
                .then(|| (TARGET_USER.to_string(), TARGET_SECRET.to_vec())),
        });
        Ok(Admission {
            chap,
            policy: policy(self.mode),
        })
    }

    fn bind(&self, outcome: &LoginOutcome) -> Result<Binding, (u8, u8)> {
        if self.mode & MODE_BIND_FAILS != 0 {
            return Err(login_status::SESSION_DOES_NOT_EXIST);
        }
        Ok(Binding {
            tsih: if outcome.identity.tsih == 0 {
                7
            } else {
                outcome.identity.tsih
            },
            exp_cmd_sn: outcome.cmd_sn,
            max_cmd_sn: outcome.cmd_sn.wrapping_add(63),
        })
    }
}

fn stage_of(csg: u8) -> Stage {
    match csg {
        0 => Stage::Security,
        1 => Stage::Operational,
        _ => Stage::FullFeature,
    }
}

/// Our own answers must be well-formed text.
fn check_reply(pairs: &[(String, String)], what: &str) {
    let mut out = Vec::new();
    text::encode(pairs, &mut out);
    if let Err(e) = text::parse(&out) {
        panic!("{what} produced a text that does not parse ({e:?}): {pairs:?}");
    }
}

/// The text layer and the negotiation engine on their own.
fn negotiate_texts(mode: u8, records: &[LoginRecord<'_>]) {
    let leading = mode & MODE_NON_LEADING == 0;
    let mut target = Some(Negotiator::new(Role::Target, policy(mode), leading));
    let mut initiator = Some(Negotiator::new(Role::Initiator, Policy::default(), leading));
    if let Some(n) = initiator.as_mut() {
        let offers = n.offers(Stage::Operational);
        check_reply(&offers, "initiator offers");
    }
    let mut acc = TextAccumulator::with_cap(16 * 1024);
    for rec in records {
        let _ = text::parse_list(rec.data);
        let pairs = match acc.push(rec.data, rec.cont) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(_) => continue,
        };
        let stage = stage_of(rec.csg);
        if let Some(n) = target.as_mut() {
            match n.respond(stage, &pairs) {
                Ok(resp) => {
                    check_reply(&resp.reply, "Negotiator::respond (target)");
                    let offers = n.offers(stage);
                    check_reply(&offers, "Negotiator::offers (target)");
                    let _ = n.params();
                    let _ = n.missing_keys();
                    let _ = n.outstanding();
                }
                Err(e) => {
                    let _ = e.login_status();
                    target = None;
                }
            }
        }
        if let Some(n) = initiator.as_mut() {
            match n.absorb_answers(stage, &pairs) {
                Ok(resp) => {
                    check_reply(&resp.reply, "Negotiator::absorb_answers (initiator)");
                    let _ = n.params();
                }
                Err(_) => initiator = None,
            }
        }
    }
}

/// Replaces the CHAP answer keys of `data` with a correct answer to the
/// challenge in `last_reply`, so the fuzzer can get past authentication.
fn auto_chap(
    data: &[u8],
    responder: &mut ChapResponder,
    last_reply: &[(String, String)],
) -> Vec<u8> {
    let mut pairs = text::parse_list(data).unwrap_or_default();
    pairs.retain(|(k, _)| !matches!(k.as_str(), "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C"));
    if let Ok(mut answer) = responder.handle_challenge(last_reply) {
        pairs.append(&mut answer);
    }
    let mut out = Vec::new();
    text::encode(&pairs, &mut out);
    out
}

/// The login machine, one Login Request per record.
fn login(mode: u8, records: &[LoginRecord<'_>]) {
    let authority = FakeAuthority { mode };
    let mut machine = TargetLogin::new(1);
    let mutual =
        (mode & MODE_MUTUAL != 0).then(|| (TARGET_USER.to_string(), TARGET_SECRET.to_vec()));
    let mut responder = ChapResponder::new(
        INITIATOR_USER,
        INITIATOR_SECRET.to_vec(),
        mutual,
        ALL_CHAP.to_vec(),
    );
    let _ = responder.offer_algorithms();
    let mut last_reply: Vec<(String, String)> = Vec::new();
    let mut exp_stat_sn = 0u32;
    let mut resp_text = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        let req = LoginRequest {
            transit: rec.transit,
            cont: rec.cont,
            csg: rec.csg,
            nsg: rec.nsg,
            version_max: 0,
            version_min: u8::from(i == 0 && mode & MODE_BAD_VERSION != 0),
            isid: [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a],
            tsih: if mode & MODE_NON_LEADING != 0 { 7 } else { 0 },
            itt: i as u32,
            cid: u16::from(rec.new_cid),
            cmd_sn: 1,
            exp_stat_sn,
        };
        let data = if rec.auto_chap {
            auto_chap(rec.data, &mut responder, &last_reply)
        } else {
            rec.data.to_vec()
        };
        let step = machine.handle(&req, &data, &authority);
        let (pdu, done) = match &step {
            LoginStep::Continue(p) => (p, false),
            LoginStep::Complete(p, outcome) => {
                let _ = outcome.params.max_recv_data_segment_length;
                (p, true)
            }
            LoginStep::Fail(p, status) => {
                assert!(status.0 >= 1, "a failure with a success status: {status:?}");
                (p, true)
            }
        };
        if let Some(pairs) = check_login_response(pdu, &mut resp_text) {
            last_reply = pairs;
        }
        if let Header::LoginResponse(h) = &pdu.header {
            exp_stat_sn = h.stat_sn.wrapping_add(1);
        }
        if done {
            break;
        }
    }
}

/// A Login Response we send must be a well-formed PDU that a peer decodes to
/// the same thing, within the login-phase segment limit, with valid text.
fn check_login_response(pdu: &Pdu, resp_text: &mut Vec<u8>) -> Option<Vec<(String, String)>> {
    assert!(
        matches!(pdu.header, Header::LoginResponse(_)),
        "login answered with {:?}",
        pdu.header
    );
    assert!(
        pdu.data.len() <= 8192,
        "login response of {} bytes",
        pdu.data.len()
    );
    let mut wire = BytesMut::new();
    pdu.encode(false, false, &mut wire);
    let mut dec = PduDecoder::default();
    match dec.decode(&mut wire) {
        Ok(Some(raw)) => assert_eq!(raw.parse().as_ref(), Ok(pdu), "login response round trip"),
        other => panic!("our login response does not decode: {other:?}"),
    }
    // A long answer spreads over several responses (C bit): parse it whole.
    resp_text.extend_from_slice(&pdu.data);
    let cont = matches!(&pdu.header, Header::LoginResponse(h) if h.cont);
    if cont {
        return None;
    }
    let text = std::mem::take(resp_text);
    match text::parse(&text) {
        Ok(pairs) => Some(pairs),
        Err(e) => panic!("our login response text does not parse ({e:?}): {text:?}"),
    }
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mode = r.u8();
    let mut records = Vec::new();
    // A real login takes a handful of PDUs; a few dozen covers continuation.
    while records.len() < 64 {
        match read_login_record(&mut r) {
            Some(rec) => records.push(rec),
            None => break,
        }
    }
    negotiate_texts(mode, &records);
    login(mode, &records);
}
