//! Hostile initiator: raw PDUs that break the rules — truncated or oversized PDUs, wrong
//! opcodes for the phase, bad digests, CmdSN outside the window, duplicate tags, stray
//! Data-Out, endless logins and text negotiations, logout mid-write, connection churn —
//! each sent while a well-behaved libiscsi / qemu-img session works beside it. For each the
//! daemon must answer per RFC 7143 (Reject, a login failure, or dropping that connection),
//! stay alive with bounded memory, and the neighbour must see no error.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use ironstar_interop::command::run;
use ironstar_interop::config::Config;
use ironstar_interop::daemon::Daemon;
use ironstar_interop::raw::{isid_for, login_response, reject_reason as reason, rss_bytes};
use ironstar_interop::raw::{rw10, RawConn, Recv};
use ironstar_interop::{peers, INITIATOR_IQN, MIB};
use iscsi_proto::pdu::{
    reject_reason, DataOut, Header, LoginRequest, LogoutRequest, NopOut, Pdu, RawPdu, TextRequest,
    BHS_LEN,
};

/// The LU the tests serve from memory.
const LU_SIZE: u64 = 64 * MIB;
/// How much the daemon's RSS may grow during one hostile case (the neighbour's traffic
/// included); a 16 MiB buffer per bad PDU, or an unbounded login/text buffer, breaks it.
const RSS_GROWTH_LIMIT: u64 = 48 * MIB;
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

fn hostile_iqn(case: &str) -> String {
    format!("iqn.2026-11.dev.ironstar:hostile-{case}")
}

/// A well-behaved client looping beside the hostile one until told to stop.
struct Neighbour {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<u32, String>>,
}

impl Neighbour {
    fn start(cmds: Vec<Vec<String>>) -> Neighbour {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            let mut runs = 0u32;
            loop {
                for argv in &cmds {
                    let o = run(
                        Command::new(&argv[0]).args(&argv[1..]),
                        Duration::from_secs(120),
                    );
                    if !o.success() {
                        return Err(format!("well-behaved client failed:\n{o}"));
                    }
                    runs += 1;
                }
                if stop2.load(Ordering::Relaxed) {
                    return Ok(runs);
                }
            }
        });
        Neighbour { stop, handle }
    }

    fn finish(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join().expect("neighbour thread panicked") {
            Ok(runs) => runs,
            Err(e) => panic!("{e}"),
        }
    }
}

/// A daemon, a neighbour session and the RSS baseline for one hostile case.
struct Scene {
    d: Daemon,
    nb: Option<Neighbour>,
    rss0: u64,
}

impl Scene {
    /// None when libiscsi's tools are missing (a skip, unless strict).
    fn start() -> Option<Scene> {
        if !peers::require(&["iscsi-inq", "iscsi-readcapacity16"]) {
            return None;
        }
        let d = Daemon::start(&Config::single_memory_lu(LU_SIZE));
        let url = d.lun_url(0);
        let nb = Neighbour::start(vec![
            vec![
                "iscsi-inq".into(),
                "-i".into(),
                INITIATOR_IQN.into(),
                url.clone(),
            ],
            vec![
                "iscsi-readcapacity16".into(),
                "-i".into(),
                INITIATOR_IQN.into(),
                url,
            ],
        ]);
        Some(Scene::with(d, nb))
    }

    fn with(d: Daemon, nb: Neighbour) -> Scene {
        // Let the daemon and the neighbour settle before the baseline.
        thread::sleep(Duration::from_millis(300));
        let rss0 = rss_bytes(d.pid());
        Scene {
            d,
            nb: Some(nb),
            rss0,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.d.addr()
    }

    fn finish(mut self) {
        let runs = self.nb.take().map(Neighbour::finish).unwrap_or(0);
        assert!(runs >= 1, "the well-behaved client never completed a run");
        self.d.assert_alive();
        let rss = rss_bytes(self.d.pid());
        println!(
            "neighbour runs {runs}; daemon RSS {} KiB -> {} KiB",
            self.rss0 / 1024,
            rss / 1024
        );
        assert!(
            rss < self.rss0 + RSS_GROWTH_LIMIT,
            "daemon RSS grew from {} KiB to {} KiB",
            self.rss0 / 1024,
            rss / 1024
        );
        // A fresh session still works after the abuse.
        let mut c = RawConn::login(self.addr(), &hostile_iqn("after"), false);
        assert!(
            c.ping(),
            "a fresh session gets no NOP-In after the hostile case"
        );
        c.close();
    }
}

fn nop(c: &mut RawConn, immediate: bool, data: &'static [u8]) -> (u32, Pdu) {
    let itt = c.itt();
    let p = Pdu::new(
        Header::NopOut(NopOut {
            immediate,
            lun: 0,
            itt,
            ttt: 0xffff_ffff,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
        }),
        Bytes::from_static(data),
    );
    (itt, p)
}

fn opcodes(pdus: &[RawPdu]) -> Vec<u8> {
    pdus.iter().map(RawPdu::opcode_byte).collect()
}

#[test]
fn truncated_pdus_then_close() {
    let Some(s) = Scene::start() else { return };
    // Half a BHS, then close.
    let mut a = RawConn::connect(s.addr());
    let login = Pdu::new(
        Header::LoginRequest(a.login_header(isid_for("trunc"), 0, 1, true)),
        Bytes::from_static(b"InitiatorName=x\0"),
    )
    .to_bytes(false, false);
    assert!(a.send_raw(&login[..20]));
    a.close();
    // A whole BHS announcing 100 data bytes, 10 sent, then close — in full feature phase.
    let mut b = RawConn::login(s.addr(), &hostile_iqn("trunc"), false);
    let (_, p) = nop(&mut b, true, b"0123456789");
    let mut bytes = p.to_bytes(false, false).to_vec();
    bytes[5..8].copy_from_slice(&100u32.to_be_bytes()[1..]);
    assert!(b.send_raw(&bytes[..BHS_LEN + 10]));
    b.close();
    s.finish();
}

#[test]
fn data_segment_length_16mib_is_rejected_and_dropped() {
    let Some(s) = Scene::start() else { return };
    for round in 0..4 {
        let mut c = RawConn::login(s.addr(), &hostile_iqn(&format!("dsl{round}")), false);
        let (_, p) = nop(&mut c, true, b"");
        let mut bhs = p.to_bytes(false, false).to_vec();
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(c.send_raw(&bhs));
        // Some of the announced data, as a real sender would stream it.
        let _ = c.send_raw(&vec![0u8; 64 * 1024]);
        let got = c.expect_close(CLOSE_WITHIN);
        let reject = got.iter().find_map(reason);
        assert_eq!(
            reject,
            Some(reject_reason::PROTOCOL_ERROR),
            "expected Reject(protocol error) before the close, got opcodes {:?}",
            opcodes(&got)
        );
    }
    // The same during login: the login-phase limit is 8192.
    let mut c = RawConn::connect(s.addr());
    let p = Pdu::new(
        Header::LoginRequest(c.login_header(isid_for("dsl-login"), 0, 1, true)),
        Bytes::new(),
    );
    let mut bhs = p.to_bytes(false, false).to_vec();
    bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    assert!(c.send_raw(&bhs));
    let got = c.expect_close(CLOSE_WITHIN);
    assert!(
        !got.iter()
            .any(|p| p.opcode_byte() == 0x23 && p.bhs[36] == 0),
        "an oversized login PDU was answered with success"
    );
    s.finish();
}

#[test]
fn scsi_command_before_login_drops_the_connection() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::connect(s.addr());
    let inquiry = c.scsi_command(7, &[0x12, 0, 0, 0, 96, 0], true, false, 96);
    assert!(c.send(&inquiry));
    let got = c.expect_close(CLOSE_WITHIN);
    assert!(
        !got.iter().any(|p| matches!(p.opcode_byte(), 0x21 | 0x25)),
        "a SCSI command was executed before login: {:?}",
        opcodes(&got)
    );
    s.finish();
}

#[test]
fn login_in_full_feature_phase_is_rejected() {
    let Some(s) = Scene::start() else { return };
    let iqn = hostile_iqn("relogin");
    let mut c = RawConn::login(s.addr(), &iqn, false);
    let req = LoginRequest {
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        ..c.login_header(isid_for(&iqn), 1, 3, true)
    };
    let r = c.login_pdu(req, &[("InitiatorName", &iqn)]);
    match r {
        Recv::Pdu(p) => assert_eq!(
            reason(&p),
            Some(reject_reason::PROTOCOL_ERROR),
            "expected Reject(protocol error), got opcode {:#x}",
            p.opcode_byte()
        ),
        Recv::Closed => {}
        Recv::Timeout => panic!("no answer to a Login in full feature phase"),
    }
    s.finish();
}

#[test]
fn unknown_opcode_is_rejected_and_the_connection_continues() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("opcode"), false);
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = 0x1c;
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&0x77u32.to_be_bytes());
    bhs[24..28].copy_from_slice(&c.cmd_sn.to_be_bytes());
    bhs[28..32].copy_from_slice(&c.exp_stat_sn.to_be_bytes());
    assert!(c.send_raw(&bhs));
    let p = c.recv().pdu();
    assert_eq!(reason(&p), Some(reject_reason::COMMAND_NOT_SUPPORTED));
    assert_eq!(&p.data[..BHS_LEN], &bhs[..], "the Reject carries the BHS");
    assert!(
        c.ping(),
        "the connection stopped answering after the Reject"
    );
    s.finish();
}

#[test]
fn reserved_bits_set_are_ignored_or_rejected() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("reserved"), false);
    let (itt, p) = nop(&mut c, true, b"");
    let mut bhs = p.to_bytes(false, false).to_vec();
    bhs[1] |= 0x7f;
    bhs[2] = 0xa5;
    bhs[3] = 0x5a;
    for b in &mut bhs[32..48] {
        *b = 0xff;
    }
    assert!(c.send_raw(&bhs));
    match c.recv() {
        Recv::Pdu(p) => assert!(
            (p.opcode_byte() == 0x20 && p.itt() == itt) || reason(&p).is_some(),
            "unexpected answer opcode {:#x}",
            p.opcode_byte()
        ),
        other => panic!("no answer to a NOP-Out with reserved bits set: {other:?}"),
    }
    assert!(c.ping(), "the connection stopped answering");
    s.finish();
}

#[test]
fn bad_header_digest_closes_and_bad_data_digest_is_rejected() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("hdigest"), true);
    assert!(c.ping(), "a ping with good digests is answered");
    let (_, p) = nop(&mut c, true, b"");
    let mut bytes = p.to_bytes(true, true).to_vec();
    bytes[BHS_LEN] ^= 0xff;
    assert!(c.send_raw(&bytes));
    let got = c.expect_close(CLOSE_WITHIN);
    assert!(
        !got.iter().any(|p| p.opcode_byte() == 0x20),
        "a PDU with a bad header digest was answered"
    );

    let mut c = RawConn::login(s.addr(), &hostile_iqn("ddigest"), true);
    let (_, p) = nop(&mut c, true, b"pingdata");
    let mut bytes = p.to_bytes(true, true).to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    assert!(c.send_raw(&bytes));
    let p = c.recv().pdu();
    assert_eq!(reason(&p), Some(reject_reason::DATA_DIGEST_ERROR));
    assert!(
        c.ping(),
        "the connection stopped answering after the data digest Reject"
    );
    s.finish();
}

#[test]
fn cmdsn_outside_the_window_is_ignored() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("cmdsn"), false);
    let good = c.cmd_sn;
    for off in [100_000u32, 0x8000_0000, 0xffff_fff0] {
        c.cmd_sn = good.wrapping_add(off);
        let (_, p) = nop(&mut c, false, b"");
        assert!(c.send(&p));
        c.cmd_sn = good;
        match c.recv_within(Duration::from_secs(1)) {
            Recv::Timeout => {}
            Recv::Pdu(p) => panic!(
                "a PDU with CmdSN {off:#x} past the window was answered: opcode {:#x}",
                p.opcode_byte()
            ),
            Recv::Closed => panic!("the connection was closed for a CmdSN outside the window"),
        }
    }
    // In-window commands still run.
    let (itt, p) = nop(&mut c, false, b"");
    c.cmd_sn = c.cmd_sn.wrapping_add(1);
    assert!(c.send(&p));
    assert!(matches!(c.recv_until(|p| p.itt() == itt), Recv::Pdu(_)));
    assert!(c.ping());
    s.finish();
}

/// Sends WRITE(10) of `blocks` and returns the first R2T.
fn write_until_r2t(c: &mut RawConn, itt: u32, blocks: u16) -> RawPdu {
    let w = c.scsi_command(
        itt,
        &rw10(0x2a, 0, blocks),
        false,
        true,
        u32::from(blocks) * 512,
    );
    assert!(c.send(&w));
    match c.recv_until(|p| p.opcode_byte() == 0x31) {
        Recv::Pdu(p) => p,
        other => panic!("no R2T for a WRITE: {other:?}"),
    }
}

/// What the target sends within two seconds, and whether it closed.
fn drain(c: &mut RawConn) -> (Vec<RawPdu>, bool) {
    let mut got = Vec::new();
    loop {
        match c.recv_within(Duration::from_secs(2)) {
            Recv::Pdu(p) => got.push(p),
            Recv::Closed => return (got, true),
            Recv::Timeout => return (got, false),
        }
    }
}

/// A WRITE waits for its data (R2T sent) when a READ arrives with the same ITT. The
/// session must go on; the answer is logged (see `duplicate_itt_is_refused`).
#[test]
fn duplicate_itt_in_flight_keeps_the_session_working() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("dupitt"), false);
    c.clear_unit_attention();
    let itt = c.itt();
    let _r2t = write_until_r2t(&mut c, itt, 8);
    let r = c.scsi_command(itt, &rw10(0x28, 0, 8), true, false, 4096);
    assert!(c.send(&r));
    let (got, closed) = drain(&mut c);
    for p in &got {
        println!(
            "duplicate ITT answer: opcode {:#x} flags {:#x} response {:#x} status {:#x} data {} bytes",
            p.opcode_byte(),
            p.bhs[1],
            p.bhs[2],
            p.bhs[3],
            p.data.len()
        );
    }
    if !closed {
        assert!(c.ping(), "the connection stopped answering");
    }
    s.finish();
}

/// SAM-5 §5.9 (overlapped commands) / RFC 7143 §11.2.1.8 (ITTs unique per session): a
/// second task with the tag of one in flight must be refused — Reject, CHECK CONDITION with
/// OVERLAPPED COMMANDS ATTEMPTED (ASC 0x4E), or the connection dropped — not executed.
#[test]

fn duplicate_itt_is_refused() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("dupitt2"), false);
    c.clear_unit_attention();
    let itt = c.itt();
    let _r2t = write_until_r2t(&mut c, itt, 8);
    let r = c.scsi_command(itt, &rw10(0x28, 0, 8), true, false, 4096);
    assert!(c.send(&r));
    let (got, closed) = drain(&mut c);
    let executed = got.iter().any(|p| {
        p.opcode_byte() == 0x25 || (p.opcode_byte() == 0x21 && p.bhs[2] == 0 && p.bhs[3] == 0)
    });
    assert!(
        closed || !executed,
        "the READ with a duplicate ITT ran: {:?}",
        opcodes(&got)
    );
    s.finish();
}

#[test]
fn data_out_for_unknown_task_is_rejected() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("dataout"), false);
    let d = Pdu::new(
        Header::DataOut(DataOut {
            final_: true,
            lun: 0,
            itt: 0xdead,
            ttt: 0xbeef,
            exp_stat_sn: c.exp_stat_sn,
            data_sn: 0,
            buffer_offset: 0,
        }),
        Bytes::from(vec![0x5au8; 512]),
    );
    assert!(c.send(&d));
    match c.recv() {
        Recv::Pdu(p) => {
            assert!(
                reason(&p).is_some(),
                "expected a Reject, got {:#x}",
                p.opcode_byte()
            );
            println!("Data-Out for an unknown task: Reject {:#x}", p.bhs[2]);
            assert!(
                c.ping(),
                "the connection stopped answering after the Reject"
            );
        }
        Recv::Closed => println!("Data-Out for an unknown task: connection dropped"),
        Recv::Timeout => panic!("no answer to a Data-Out for an unknown task"),
    }
    s.finish();
}

/// A login offering `n` private keys (`X-ironstar-kN=v`) beside the usual ones.
fn login_with_keys(s: &Scene, case: &str, n: usize) -> LoginOutcome {
    let iqn = hostile_iqn(case);
    let mut text = Vec::new();
    let mut pairs: Vec<(String, String)> = vec![
        ("InitiatorName".into(), iqn.clone()),
        ("TargetName".into(), ironstar_interop::TARGET_IQN.into()),
        ("SessionType".into(), "Normal".into()),
        ("AuthMethod".into(), "None".into()),
    ];
    pairs.extend((0..n).map(|i| (format!("X-ironstar-k{i}"), "v".to_string())));
    iscsi_proto::text::encode(&pairs, &mut text);
    login_segments(s, &iqn, &text)
}

/// A thousand unknown keys (18 KB of text, three continued login PDUs) are legal: each is
/// answered NotUnderstood, over continued login responses; the login proceeds.
#[test]
fn login_with_a_thousand_keys_is_answered_key_by_key() {
    let Some(s) = Scene::start() else { return };
    let LoginOutcome::Answered {
        class,
        transit,
        text,
    } = login_with_keys(&s, "keys1000", 1000)
    else {
        panic!("no complete answer to a login with a thousand keys");
    };
    assert_eq!(class, 0);
    assert!(
        transit,
        "the login did not move on to the operational stage"
    );
    let pairs = iscsi_proto::text::parse(&text).expect("the answer parses");
    let not_understood = pairs
        .iter()
        .filter(|(k, v)| k.starts_with("X-ironstar-k") && v == "NotUnderstood")
        .count();
    assert_eq!(
        not_understood, 1000,
        "every private key answered NotUnderstood"
    );
    s.finish();
}

/// Five thousand keys (94 KB of login text) exceed the target's cap on login text: the
/// login fails with an initiator error (class 2) instead of buffering without bound.
#[test]
fn login_with_too_many_keys_fails_with_class_2() {
    let Some(s) = Scene::start() else { return };
    match login_with_keys(&s, "keys5000", 5000) {
        LoginOutcome::Answered { class, .. } => assert_eq!(class, 2),
        LoginOutcome::Closed => {}
        LoginOutcome::Other { opcode } => panic!("a login with 5000 keys got opcode {opcode:#x}"),
        LoginOutcome::Timeout => panic!("a login with 5000 keys got no answer"),
    }
    s.finish();
}

#[test]
fn login_with_an_endless_key_value_fails_without_hanging() {
    let Some(s) = Scene::start() else { return };
    let iqn = hostile_iqn("endless");
    let mut c = RawConn::connect(s.addr());
    let head = format!("InitiatorName={iqn}\0X-ironstar-endless=");
    let mut chunk = head.into_bytes();
    let mut sent = 0usize;
    let outcome = loop {
        chunk.resize(8192, b'a');
        let mut req = c.login_header(isid_for(&iqn), 0, 1, false);
        req.cont = true;
        if !c.send(&Pdu::new(
            Header::LoginRequest(req),
            Bytes::from(chunk.clone()),
        )) {
            break "closed".to_string();
        }
        sent += chunk.len();
        chunk.clear();
        match c.recv() {
            Recv::Pdu(p) if p.opcode_byte() == 0x23 && p.bhs[36] == 0 => {}
            Recv::Pdu(p) if p.opcode_byte() == 0x23 => {
                break format!("class {} detail {}", p.bhs[36], p.bhs[37])
            }
            Recv::Pdu(p) => break format!("opcode {:#x}", p.opcode_byte()),
            Recv::Closed => break "closed".to_string(),
            Recv::Timeout => break "timeout".to_string(),
        }
        assert!(
            sent < 16 * MIB as usize,
            "the target took 16 MiB of one key value"
        );
    };
    println!("endless key value: {outcome} after {sent} bytes");
    assert!(
        outcome.starts_with("class 2") || outcome == "closed",
        "an endless key value: {outcome}"
    );
    s.finish();
}

#[derive(Debug)]
enum LoginOutcome {
    /// The final login response: its status class, its T bit and the whole answer text
    /// (continued responses joined).
    Answered {
        class: u8,
        transit: bool,
        text: Vec<u8>,
    },
    Closed,
    Timeout,
    Other {
        opcode: u8,
    },
}

/// Sends `text` as a security-stage login in continued segments of 8 KiB, then pulls a
/// continued answer with empty requests; returns the final answer (the first refusal, or
/// the response that moves to the next stage).
fn login_segments(s: &Scene, iqn: &str, text: &[u8]) -> LoginOutcome {
    let mut c = RawConn::connect(s.addr());
    let mut answer = Vec::new();
    let segs: Vec<(Vec<u8>, bool)> = iscsi_proto::text::segments(text, 8192)
        .into_iter()
        .map(|(seg, more)| (seg.to_vec(), more))
        .collect();
    let mut requests = segs.into_iter();
    for _ in 0..64 {
        let (seg, more) = requests.next().unwrap_or((Vec::new(), false));
        let mut req = c.login_header(isid_for(iqn), 0, 1, !more);
        req.cont = more;
        if !c.send(&Pdu::new(Header::LoginRequest(req), Bytes::from(seg))) {
            return LoginOutcome::Closed;
        }
        match c.recv() {
            Recv::Pdu(p) if p.opcode_byte() == 0x23 => {
                let r = login_response(&p);
                answer.extend_from_slice(&p.data);
                // Done when refused, or when our text is all sent and the target moves on
                // (it may first finish a continued answer, then answer T=0 once more).
                if r.status_class != 0 || (!more && !r.cont && r.transit) {
                    return LoginOutcome::Answered {
                        class: r.status_class,
                        transit: r.transit,
                        text: answer,
                    };
                }
            }
            Recv::Pdu(p) => {
                return LoginOutcome::Other {
                    opcode: p.opcode_byte(),
                }
            }
            Recv::Closed => return LoginOutcome::Closed,
            Recv::Timeout => return LoginOutcome::Timeout,
        }
    }
    panic!("the login exchange never ended");
}

#[test]
fn text_negotiation_that_never_ends_is_bounded() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("text"), false);
    let itt = c.itt();
    let mut ttt = 0xffff_ffffu32;
    let mut chunk = b"X-ironstar-endless=".to_vec();
    let mut sent = 0usize;
    let outcome = loop {
        chunk.resize(8192, b'a');
        let req = Pdu::new(
            Header::TextRequest(TextRequest {
                immediate: true,
                final_: false,
                cont: true,
                lun: 0,
                itt,
                ttt,
                cmd_sn: c.cmd_sn,
                exp_stat_sn: c.exp_stat_sn,
            }),
            Bytes::from(std::mem::take(&mut chunk)),
        );
        if !c.send(&req) {
            break "closed".to_string();
        }
        sent += 8192;
        match c.recv() {
            Recv::Pdu(p)
                if p.opcode_byte() == 0x24 && p.data.is_empty() && p.bhs[1] & 0x80 == 0 =>
            {
                ttt = u32::from_be_bytes([p.bhs[20], p.bhs[21], p.bhs[22], p.bhs[23]]);
            }
            Recv::Pdu(p) => break format!("opcode {:#x} reason {:?}", p.opcode_byte(), reason(&p)),
            Recv::Closed => break "closed".to_string(),
            Recv::Timeout => break "timeout".to_string(),
        }
        assert!(
            sent < 16 * MIB as usize,
            "the target buffered 16 MiB of one text value"
        );
    };
    println!("endless text negotiation: {outcome} after {sent} bytes");
    assert_ne!(
        outcome, "timeout",
        "the target stopped answering the text negotiation"
    );
    s.finish();
}

/// RFC 7143 §11.10.2 / §11.11.1: a Text Request with C=1 (and so F=0) is answered with an
/// empty, non-final Text Response; the text is complete only with the last PDU, and a final
/// response to a non-final request is a protocol error.
#[test]

fn text_request_continued_over_two_pdus_is_answered_once() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("textsplit"), false);
    let itt = c.itt();
    let text = |c: &RawConn, final_: bool, ttt: u32, data: &'static [u8]| {
        Pdu::new(
            Header::TextRequest(TextRequest {
                immediate: true,
                final_,
                cont: !final_,
                lun: 0,
                itt,
                ttt,
                cmd_sn: c.cmd_sn,
                exp_stat_sn: c.exp_stat_sn,
            }),
            Bytes::from_static(data),
        )
    };
    assert!(c.send(&text(&c, false, 0xffff_ffff, b"X-ironstar-split=ab")));
    let p = c.recv().pdu();
    assert_eq!(p.opcode_byte(), 0x24);
    assert_eq!(
        p.bhs[1] & 0x80,
        0,
        "a final Text Response to a C=1 Text Request"
    );
    assert!(
        p.data.is_empty(),
        "data in the answer to a partial Text Request"
    );
    let ttt = u32::from_be_bytes([p.bhs[20], p.bhs[21], p.bhs[22], p.bhs[23]]);
    assert!(c.send(&text(&c, true, ttt, b"cd\0")));
    let p = c.recv().pdu();
    assert_eq!(p.bhs[1] & 0x80, 0x80);
    assert_eq!(&p.data[..], b"X-ironstar-split=NotUnderstood\0");
    s.finish();
}

#[test]
fn logout_in_the_middle_of_a_write() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("logout"), false);
    let itt = c.itt();
    let r2t = write_until_r2t(&mut c, itt, 2048);
    let ttt = u32::from_be_bytes([r2t.bhs[20], r2t.bhs[21], r2t.bhs[22], r2t.bhs[23]]);
    // Part of the first burst, then a logout instead of the rest.
    let d = Pdu::new(
        Header::DataOut(DataOut {
            final_: false,
            lun: 0,
            itt,
            ttt,
            exp_stat_sn: c.exp_stat_sn,
            data_sn: 0,
            buffer_offset: 0,
        }),
        Bytes::from(vec![0xa5u8; 4096]),
    );
    assert!(c.send(&d));
    let lo_itt = c.itt();
    let lo = Pdu::new(
        Header::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: 0,
            itt: lo_itt,
            cid: 0,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
        }),
        Bytes::new(),
    );
    assert!(c.send(&lo));
    let got = c.expect_close(CLOSE_WITHIN);
    println!("logout mid-write: answers {:?}", opcodes(&got));
    assert!(
        got.iter()
            .all(|p| p.opcode_byte() != 0x21 || p.bhs[3] != 0 || p.bhs[2] != 0),
        "the half-written WRITE completed with GOOD"
    );
    s.finish();
}

#[test]
fn two_hundred_connections_opened_and_closed_quickly() {
    if !peers::require_qemu_iscsi() {
        return;
    }
    let d = Daemon::start(&Config::single_memory_lu(LU_SIZE));
    let url = d.lun_url(0);
    let nb = Neighbour::start(vec![[
        "qemu-img", "bench", "-f", "raw", "-t", "none", "-c", "20000", "-d", "8", "-s", "4k", &url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()]);
    let s = Scene::with(d, nb);
    for i in 0..200 {
        match i % 3 {
            0 => RawConn::connect(s.addr()).close(),
            1 => {
                let mut c = RawConn::connect(s.addr());
                let login = Pdu::new(
                    Header::LoginRequest(c.login_header(isid_for("churn"), 0, 1, true)),
                    Bytes::from_static(b"InitiatorName=iqn.x\0"),
                )
                .to_bytes(false, false);
                let _ = c.send_raw(&login[..30]);
                c.close();
            }
            _ => RawConn::login(s.addr(), &hostile_iqn(&format!("churn{i}")), false).close(),
        }
    }
    s.finish();
}

/// The R2T's TTT from its header.
fn r2t_ttt(r2t: &RawPdu) -> u32 {
    u32::from_be_bytes([r2t.bhs[20], r2t.bhs[21], r2t.bhs[22], r2t.bhs[23]])
}

/// Whether the answers hold a GOOD SCSI Response for `itt`.
fn good_response(got: &[RawPdu], itt: u32) -> bool {
    got.iter()
        .any(|p| p.opcode_byte() == 0x21 && p.itt() == itt && p.bhs[2] == 0 && p.bhs[3] == 0)
}

/// Data-Out past the end of what the R2T asked for (and past the command's expected
/// length): the target must refuse it (Reject, a failed command, or the connection
/// dropped) and must never write the surplus beyond the command's blocks.
#[test]
fn data_out_beyond_the_burst_is_refused_and_writes_nothing_beyond() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("burst"), false);
    c.clear_unit_attention();
    let itt = c.itt();
    let r2t = write_until_r2t(&mut c, itt, 8); // 4 KiB at LBA 0
    let desired = u32::from_be_bytes([r2t.bhs[44], r2t.bhs[45], r2t.bhs[46], r2t.bhs[47]]);
    assert_eq!(desired, 4096, "R2T asks for the whole 4 KiB");
    // 8 KiB in one Data-Out: twice what was asked.
    let d = c.data_out(itt, r2t_ttt(&r2t), 0, true, Bytes::from(vec![0xeeu8; 8192]));
    assert!(c.send(&d));
    let (got, closed) = drain(&mut c);
    println!(
        "Data-Out beyond the burst: answers {:?}, closed {closed}",
        opcodes(&got)
    );
    assert!(
        !good_response(&got, itt),
        "an overrunning WRITE completed with GOOD"
    );
    let mut c = if closed {
        RawConn::login(s.addr(), &hostile_iqn("burst-check"), false)
    } else {
        c
    };
    c.clear_unit_attention();
    let beyond = c.read_blocks(8, 8);
    assert!(
        beyond.iter().all(|&b| b == 0),
        "bytes past the command's blocks were written"
    );
    assert!(c.ping());
    s.finish();
}

/// Two Data-Outs for one R2T whose offsets run past its window (an R2T overrun): refused,
/// never a GOOD status, and the session survives or only this connection drops.
#[test]
fn data_out_past_the_r2t_window_is_refused() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("r2tover"), false);
    c.clear_unit_attention();
    let itt = c.itt();
    let r2t = write_until_r2t(&mut c, itt, 8);
    let ttt = r2t_ttt(&r2t);
    let first = c.data_out(itt, ttt, 0, false, Bytes::from(vec![0x11u8; 2048]));
    assert!(c.send(&first));
    // Offset 4096 is the first byte after the window.
    let past = c.data_out(itt, ttt, 4096, true, Bytes::from(vec![0x22u8; 2048]));
    assert!(c.send(&past));
    let (got, closed) = drain(&mut c);
    println!(
        "Data-Out past the R2T window: answers {:?}, closed {closed}",
        opcodes(&got)
    );
    assert!(
        !good_response(&got, itt),
        "a WRITE with data outside its R2T completed with GOOD"
    );
    if !closed {
        assert!(c.ping(), "the connection stopped answering");
    }
    s.finish();
}

fn tmf(
    c: &mut RawConn,
    function: u8,
    lun: u64,
    referenced_task_tag: u32,
    ref_cmd_sn: u32,
) -> (u32, Pdu) {
    let itt = c.itt();
    let p = Pdu::new(
        Header::TaskMgmtRequest(iscsi_proto::pdu::TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt,
            referenced_task_tag,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        }),
        Bytes::new(),
    );
    (itt, p)
}

/// The TMF Response code for `itt` (or a panic naming what came instead).
fn tmf_response(c: &mut RawConn, itt: u32) -> u8 {
    match c.recv_until(|p| p.itt() == itt) {
        Recv::Pdu(p) => {
            assert_eq!(p.opcode_byte(), 0x22, "expected a TMF Response");
            p.bhs[2]
        }
        other => panic!("no TMF Response: {other:?}"),
    }
}

/// Task management naming things that do not exist (RFC 7143 §11.5.1, §11.6.1): an
/// unknown task whose RefCmdSN is outside the window → "Task does not exist"; a LUN that
/// is not mapped → "LUN does not exist"; an undefined function → "not supported" (or a
/// Reject). The session goes on.
#[test]
fn task_management_for_unknown_tasks_and_luns() {
    use iscsi_proto::pdu::tmf;
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("tmf"), false);
    let outside = c.cmd_sn.wrapping_add(100_000);
    let (itt, p) = tmf(&mut c, tmf::ABORT_TASK, 0, 0x00de_ad01, outside);
    assert!(c.send(&p));
    assert_eq!(tmf_response(&mut c, itt), tmf::TASK_DOES_NOT_EXIST);

    // Within the window and before the TMF's own CmdSN: "function complete".
    let before = c.cmd_sn.wrapping_sub(1);
    let (itt, p) = tmf(&mut c, tmf::ABORT_TASK, 0, 0x00de_ad02, before);
    assert!(c.send(&p));
    let r = tmf_response(&mut c, itt);
    assert!(
        r == tmf::FUNCTION_COMPLETE || r == tmf::TASK_DOES_NOT_EXIST,
        "ABORT TASK of a task never seen: response {r}"
    );

    let lun77 = iscsi_proto::pdu::lun_to_wire(77);
    let (itt, p) = tmf(&mut c, tmf::LOGICAL_UNIT_RESET, lun77, 0xffff_ffff, 0);
    assert!(c.send(&p));
    assert_eq!(tmf_response(&mut c, itt), tmf::LUN_DOES_NOT_EXIST);

    let (itt, p) = tmf(&mut c, tmf::ABORT_TASK_SET, lun77, 0xffff_ffff, 0);
    assert!(c.send(&p));
    assert_eq!(tmf_response(&mut c, itt), tmf::LUN_DOES_NOT_EXIST);

    let (itt, p) = tmf(&mut c, 0x7e, 0, 0xffff_ffff, 0);
    assert!(c.send(&p));
    match c.recv_until(|p| p.itt() == itt || p.opcode_byte() == 0x3f) {
        Recv::Pdu(p) if p.opcode_byte() == 0x22 => assert!(
            p.bhs[2] == tmf::FUNCTION_NOT_SUPPORTED || p.bhs[2] == tmf::FUNCTION_REJECTED,
            "an undefined TMF function got response {}",
            p.bhs[2]
        ),
        Recv::Pdu(p) => assert!(reason(&p).is_some()),
        other => panic!("no answer to an undefined TMF function: {other:?}"),
    }
    assert!(c.ping(), "the connection stopped answering after the TMFs");
    s.finish();
}

/// An initiator that queues a full window of 1 MiB READs and never reads the answers: the
/// daemon must not buffer a window's worth of data for it (bytes buffered per connection are
/// bounded), and the neighbour goes on.
#[test]
fn a_reader_that_stops_reading_cannot_grow_the_daemon() {
    let Some(s) = Scene::start() else { return };
    let mut c = RawConn::login(s.addr(), &hostile_iqn("stall"), false);
    c.clear_unit_attention();
    let mut sent = 0;
    for _ in 0..128 {
        let itt = c.itt();
        let r = c.scsi_command(itt, &rw10(0x28, 0, 2048), true, false, MIB as u32);
        if !c.send(&r) {
            break;
        }
        sent += 1;
    }
    thread::sleep(Duration::from_secs(2));
    let rss = rss_bytes(s.d.pid());
    println!(
        "{sent} x 1 MiB READs unread: daemon RSS {} KiB -> {} KiB",
        s.rss0 / 1024,
        rss / 1024
    );
    assert!(
        rss < s.rss0 + 20 * MIB,
        "the daemon buffers {} KiB for a client that does not read",
        (rss - s.rss0) / 1024
    );
    s.finish();
    drop(c);
}

/// The daemon-wide cap on write data being collected (`write_buffer_limit`): while one
/// session holds the whole budget with a 1 MiB WRITE waiting for data, another session's
/// WRITE gets TASK SET FULL (never a hang, never GOOD without its data); once the first
/// completes, the second goes through.
#[test]
fn writes_beyond_the_daemon_wide_write_budget_get_task_set_full() {
    let mut cfg = Config::single_memory_lu(LU_SIZE);
    cfg.defaults.push(format!("write_buffer_limit = {MIB}"));
    let d = Daemon::start(&cfg);
    let mut a = RawConn::login(d.addr(), &hostile_iqn("budget-a"), false);
    let mut b = RawConn::login(d.addr(), &hostile_iqn("budget-b"), false);
    a.clear_unit_attention();
    b.clear_unit_attention();
    let itt = a.itt();
    let r2t = write_until_r2t(&mut a, itt, 2048); // 1 MiB: the whole budget
    let small = vec![0x5au8; 4096];
    let st = b.write_blocks(64, &small, false);
    println!("second session's WRITE while the budget is taken: {st:?}");
    assert_eq!(st.status, 0x28, "expected TASK SET FULL, got {st:?}");
    // The first write gets its data and completes; the budget returns.
    let data = vec![0xa5u8; 1 << 20];
    assert!(
        a.answer_r2ts(itt, &data, Some(r2t)).good(),
        "the first WRITE failed"
    );
    assert!(b.write_blocks(64, &small, false).good());
    assert_eq!(b.read_blocks(64, 8), small);
    let mut d = d;
    d.assert_alive();
}
