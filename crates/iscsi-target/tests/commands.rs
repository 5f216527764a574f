//! Full feature phase behaviour of the target over real TCP: CmdSN ordering
//! and window, NOP-Out / NOP-In both ways, Reject, task management.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use iscsi_proto::pdu::{
    reject_reason, tmf, DataOut, Header, LoginRequest, NopOut, Pdu, SnackRequest, TaskMgmtRequest,
    BHS_LEN, RESERVED_TAG,
};

#[tokio::test]
async fn mcs_commands_execute_in_cmdsn_order_across_connections() {
    let t = start("").await;
    let opts = LoginOpts::normal(1).key("MaxConnections", "2");
    let mut a = Client::login_to(t.addr, opts.clone()).await;
    a.clear_ua().await;
    let mut b = join(t.addr, &a, &opts, 2).await;
    let n = a.cmd_sn;
    assert_eq!(b.cmd_sn, n);

    // N+1 on B first: it must wait for N.
    b.cmd_sn = n.wrapping_add(1);
    let (itt_b, pdu_b) = b.command(&[0u8; 6], 0, false, false, true, Bytes::new());
    b.send(&pdu_b).await;
    b.expect_silence(Duration::from_millis(300)).await;

    a.cmd_sn = n;
    let (itt_a, pdu_a) = a.command(&read10_cdb(0, 1), 512, true, false, true, Bytes::new());
    a.send(&pdu_a).await;

    let ra = a.finish(itt_a, None).await;
    let rb = b.finish(itt_b, None).await;
    assert_eq!(ra.status, 0, "{ra:?}");
    assert_eq!(rb.status, 0, "{rb:?}");
    assert_eq!(ra.data.len(), 512);
    let exp_b = rb.response.as_ref().unwrap().exp_cmd_sn;
    assert_eq!(exp_b, n.wrapping_add(2), "ExpCmdSN in B's response");
    let exp_a = ra.data_ins.last().unwrap().exp_cmd_sn;
    assert!(
        exp_a == n.wrapping_add(1) || exp_a == n.wrapping_add(2),
        "ExpCmdSN {exp_a} in A's response, N = {n}"
    );
    // Nothing strayed onto the other connection.
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn cmdsn_outside_the_window_is_ignored_and_the_session_goes_on() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(2)).await;
    c.clear_ua().await;
    let n = c.cmd_sn;
    assert_eq!(c.exp_cmd_sn, n);
    let beyond = c.max_cmd_sn.wrapping_add(1);
    let behind = n.wrapping_sub(1);
    for sn in [beyond, behind] {
        c.cmd_sn = sn;
        let (_, pdu) = c.command(&[0u8; 6], 0, false, false, true, Bytes::new());
        c.send(&pdu).await;
        c.expect_silence(Duration::from_secs(1)).await;
    }
    c.cmd_sn = n;
    let r = c.tur().await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(c.exp_cmd_sn, n.wrapping_add(1));
}

#[tokio::test]
async fn nop_out_ping_gets_nop_in_echoing_itt_and_data() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(3)).await;
    let payload: Vec<u8> = (0..1001u32).map(|i| (i % 251) as u8).collect();
    let (itt, pdu) = c.nop_out(&payload);
    c.send(&pdu).await;
    let p = c.recv().await;
    let Header::NopIn(h) = p.header else {
        panic!("expected NOP-In, got {:?}", p.header);
    };
    assert_eq!(h.itt, itt);
    assert_eq!(h.ttt, RESERVED_TAG);
    assert_eq!(&p.data[..], &payload[..]);
}

/// Waits for the target's NOP-In ping; returns its TTT.
async fn target_ping(c: &mut Client, wait: Duration) -> u32 {
    let p = c
        .recv_within(wait)
        .await
        .unwrap_or_else(|e| panic!("no NOP-In ping from the target: {e:?}"));
    let Header::NopIn(h) = p.header else {
        panic!("expected a NOP-In ping, got {:?}", p.header);
    };
    assert_eq!(h.itt, RESERVED_TAG, "a target ping has the reserved ITT");
    assert_ne!(h.ttt, RESERVED_TAG, "a ping wanting an answer has a TTT");
    h.ttt
}

async fn answer_ping(c: &mut Client, ttt: u32) {
    let pdu = Pdu::new(
        Header::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: RESERVED_TAG,
            ttt,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
        }),
        Bytes::new(),
    );
    c.send(&pdu).await;
}

#[tokio::test]
async fn target_pings_idle_connection_and_drops_it_when_unanswered() {
    let t = start("nop_in_interval = 1\nnop_in_timeout = 2").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(4)).await;
    let ttt = target_ping(&mut c, Duration::from_secs(4)).await;
    answer_ping(&mut c, ttt).await;

    // Answering keeps the connection well past the timeout.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut answered = 1;
    while tokio::time::Instant::now() < until {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_within(left).await {
            Ok(p) => {
                let Header::NopIn(h) = p.header else {
                    panic!("unexpected {:?}", p.header);
                };
                assert_eq!(h.itt, RESERVED_TAG);
                answer_ping(&mut c, h.ttt).await;
                answered += 1;
            }
            Err(RecvEnd::Timeout) => break,
            Err(RecvEnd::Eof) => panic!("dropped although every ping ({answered}) was answered"),
        }
    }
    c.ping().await;

    // Not answering: dropped after nop_in_timeout.
    let _ttt = target_ping(&mut c, Duration::from_secs(4)).await;
    let started = tokio::time::Instant::now();
    c.expect_eof(Duration::from_secs(6)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "dropped after {:?}, before the 2 s timeout",
        started.elapsed()
    );
}

/// Expects a Reject carrying `bhs` and returns its reason.
async fn expect_reject(c: &mut Client, bhs: &[u8; BHS_LEN]) -> u8 {
    let (reason, rejected) = c.recv_reject().await;
    assert_eq!(
        &rejected[..],
        &bhs[..],
        "the Reject carries the rejected header"
    );
    reason
}

#[tokio::test]
async fn unknown_opcode_gets_reject_command_not_supported_and_connection_goes_on() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(5)).await;
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = 0x1c;
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&0x1234u32.to_be_bytes());
    bhs[24..28].copy_from_slice(&c.cmd_sn.to_be_bytes());
    c.send_bytes(&bhs).await;
    let reason = expect_reject(&mut c, &bhs).await;
    assert_eq!(reason, reject_reason::COMMAND_NOT_SUPPORTED);
    c.ping().await;
}

#[tokio::test]
async fn login_request_in_full_feature_phase_is_rejected() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(6)).await;
    let pdu = Pdu::new(
        Header::LoginRequest(LoginRequest {
            transit: true,
            csg: 1,
            nsg: 3,
            isid: c.isid,
            tsih: c.tsih,
            itt: 0x777,
            cid: c.cid,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            ..Default::default()
        }),
        Bytes::new(),
    );
    c.send(&pdu).await;
    let reason = expect_reject(&mut c, &bhs_of(&pdu)).await;
    assert_eq!(reason, reject_reason::PROTOCOL_ERROR);
    c.ping().await;
}

#[tokio::test]
async fn scsi_command_before_login_ends_the_connection() {
    let t = start("").await;
    let mut c = Client::connect(t.addr).await;
    let (_, pdu) = c.command(&[0u8; 6], 0, false, false, true, Bytes::new());
    c.send(&pdu).await;
    let seen = c.expect_eof(Duration::from_secs(3)).await;
    assert!(
        seen.iter()
            .all(|p| !matches!(p.header, Header::ScsiResponse(_))),
        "a command was executed before login: {seen:?}"
    );
}

#[tokio::test]
async fn data_out_for_unknown_itt_is_rejected() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(7)).await;
    let pdu = Pdu::new(
        Header::DataOut(DataOut {
            final_: true,
            lun: 0,
            itt: 0xdead,
            ttt: 5,
            exp_stat_sn: c.exp_stat_sn,
            data_sn: 0,
            buffer_offset: 0,
        }),
        Bytes::from(vec![0xa5u8; 512]),
    );
    c.send(&pdu).await;
    let reason = expect_reject(&mut c, &bhs_of(&pdu)).await;
    assert!(
        reason == reject_reason::INVALID_PDU_FIELD || reason == reject_reason::PROTOCOL_ERROR,
        "reason {reason:#x}"
    );
    c.ping().await;
}

#[tokio::test]
async fn snack_is_rejected_at_error_recovery_level_0() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(8)).await;
    let pdu = Pdu::new(
        Header::SnackRequest(SnackRequest {
            snack_type: 1, // status SNACK
            lun: 0,
            itt: RESERVED_TAG,
            ttt: 0,
            exp_stat_sn: c.exp_stat_sn,
            beg_run: 0,
            run_length: 0,
        }),
        Bytes::new(),
    );
    c.send(&pdu).await;
    let reason = expect_reject(&mut c, &bhs_of(&pdu)).await;
    assert!(
        reason == reject_reason::COMMAND_NOT_SUPPORTED
            || reason == reject_reason::PROTOCOL_ERROR
            || reason == reject_reason::SNACK_REJECT,
        "reason {reason:#x}"
    );
    c.ping().await;
}

#[tokio::test]
async fn abort_task_for_unknown_itt_says_task_does_not_exist() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(9)).await;
    c.clear_ua().await;
    // RefCmdSN of a command that already completed.
    let done = c.cmd_sn.wrapping_sub(1);
    let r = c.tmf(tmf::ABORT_TASK, 0, 0xdead_beef, done).await;
    assert_eq!(r, tmf::TASK_DOES_NOT_EXIST);
    c.ping().await;
}

#[tokio::test]
/// SAM-5 §6.3: a LOGICAL UNIT RESET establishes 29/03 for every I_T nexus,
/// the resetting one included (libiscsi's MultipathIO.Reset checks both paths).
async fn lun_reset_gives_every_session_a_unit_attention() {
    let t = start("").await;
    let mut a = Client::login_to(t.addr, LoginOpts::normal(10)).await;
    let mut b = Client::login_to(t.addr, LoginOpts::normal(11)).await;
    a.clear_ua().await;
    b.clear_ua().await;
    assert_eq!(
        a.tmf(tmf::LOGICAL_UNIT_RESET, 0, RESERVED_TAG, 0).await,
        tmf::FUNCTION_COMPLETE
    );
    let r = b.tur().await;
    assert_eq!(r.status, 2, "CHECK CONDITION expected: {r:?}");
    let (key, asc, ascq) = r.sense_code().expect("sense data");
    assert_eq!((key, asc), (6, 0x29), "unit attention 29/xx expected");
    assert_eq!(ascq, 0x03, "BUS DEVICE RESET FUNCTION OCCURRED");
    assert_eq!(b.tur().await.status, 0, "the unit attention clears");
    let r = a.tur().await;
    assert_eq!(r.status, 2, "the resetting nexus sees the UA too: {r:?}");
    assert_eq!(r.sense_code(), Some((6, 0x29, 0x03)));
    assert_eq!(a.tur().await.status, 0, "the unit attention clears");
}

#[tokio::test]
async fn tmf_for_a_missing_lun_says_lun_does_not_exist() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(12)).await;
    assert_eq!(
        c.tmf(tmf::LOGICAL_UNIT_RESET, 7, RESERVED_TAG, 0).await,
        tmf::LUN_DOES_NOT_EXIST
    );
    assert_eq!(
        c.tmf(tmf::ABORT_TASK_SET, 7, RESERVED_TAG, 0).await,
        tmf::LUN_DOES_NOT_EXIST
    );
    c.ping().await;
}

#[tokio::test]

async fn abort_task_of_a_command_waiting_for_its_cmdsn_keeps_the_window_moving() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(13)).await;
    c.clear_ua().await;
    let n = c.cmd_sn;
    // N+1 arrives before N and waits for its turn.
    c.cmd_sn = n.wrapping_add(1);
    let (held, pdu) = c.command(&[0u8; 6], 0, false, false, true, Bytes::new());
    c.send(&pdu).await;
    c.expect_silence(Duration::from_millis(300)).await;
    // The TMF is immediate and carries the next CmdSN to be used (N+2).
    assert_eq!(
        c.tmf(tmf::ABORT_TASK, 0, held, n.wrapping_add(1)).await,
        tmf::FUNCTION_COMPLETE
    );
    // N fills the gap; the aborted N+1 still counts as received, so N+2
    // must run too.
    c.cmd_sn = n;
    let r = c.tur().await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(
        c.exp_cmd_sn,
        n.wrapping_add(2),
        "ExpCmdSN after CmdSN N ran and N+1 was aborted (N = {n})"
    );
    c.cmd_sn = n.wrapping_add(2);
    let (itt, pdu) = c.command(&[0u8; 6], 0, false, false, true, Bytes::new());
    c.send(&pdu).await;
    let r = c.finish(itt, None).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(c.exp_cmd_sn, n.wrapping_add(3));
}

#[tokio::test]

async fn abort_task_of_a_lost_command_inside_the_window_counts_its_cmdsn_as_received() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(14)).await;
    c.clear_ua().await;
    // The command with CmdSN N never reached the target.
    let n = c.cmd_sn;
    let lost_itt = c.itt();
    c.cmd_sn = n.wrapping_add(1);
    assert_eq!(
        c.tmf(tmf::ABORT_TASK, 0, lost_itt, n).await,
        tmf::FUNCTION_COMPLETE
    );
    assert_eq!(
        c.exp_cmd_sn,
        n.wrapping_add(1),
        "ExpCmdSN in the TMF response once CmdSN N (= {n}) counts as received"
    );
    // RFC 7143 §11.5.1: the target considers CmdSN N received, so N+1 runs.
    let (itt, pdu) = c.command(&[0u8; 6], 0, false, false, true, Bytes::new());
    c.send(&pdu).await;
    let r = c.finish(itt, None).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(c.exp_cmd_sn, n.wrapping_add(2));
}

#[tokio::test]
async fn a_connection_beyond_max_connections_is_refused() {
    let t = start("").await;
    let opts = LoginOpts::normal(15).key("MaxConnections", "2");
    let a = Client::login_to(t.addr, opts.clone()).await;
    let _b = join(t.addr, &a, &opts, 2).await;
    let mut c = Client::connect(t.addr).await;
    let r = c
        .login(&LoginOpts {
            tsih: a.tsih,
            cid: 3,
            ..opts.clone()
        })
        .await;
    assert_eq!((r.status_class, r.status_detail), (2, 6), "{r:?}");
}

#[tokio::test]
async fn logout_close_session_closes_every_connection_of_the_session() {
    let t = start("").await;
    let opts = LoginOpts::normal(16).key("MaxConnections", "2");
    let mut a = Client::login_to(t.addr, opts.clone()).await;
    let mut b = join(t.addr, &a, &opts, 2).await;
    assert_eq!(
        a.logout(iscsi_proto::pdu::logout::CLOSE_SESSION, a.cid)
            .await,
        0
    );
    a.expect_eof(Duration::from_secs(3)).await;
    b.expect_eof(Duration::from_secs(3)).await;
}

#[tokio::test]
async fn nop_out_with_reserved_itt_gets_no_answer() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(17)).await;
    let pdu = Pdu::new(
        Header::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: RESERVED_TAG,
            ttt: RESERVED_TAG,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
        }),
        Bytes::new(),
    );
    c.send(&pdu).await;
    c.expect_silence(Duration::from_millis(500)).await;
    c.ping().await;
}

#[tokio::test]
async fn malformed_text_request_is_rejected_and_the_connection_goes_on() {
    let t = start("").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(40)).await;
    let itt = c.itt();
    let pdu = Pdu::new(
        Header::TextRequest(iscsi_proto::pdu::TextRequest {
            immediate: true,
            final_: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            ..Default::default()
        }),
        Bytes::from_static(b"no-equals-sign-here\0"),
    );
    c.send(&pdu).await;
    let (reason, _) = c.recv_reject().await;
    assert_eq!(reason, reject_reason::PROTOCOL_ERROR);
    c.ping().await;
}

/// SANITIZE OVERWRITE, one pass of pattern A55A.
const SANITIZE_PARAM: [u8; 6] = [0x01, 0, 0, 2, 0xA5, 0x5A];

/// A target whose LUN 0 is a 256 MiB memory LU: overwriting it takes long
/// enough for commands to land during the sanitize (a zero pattern would
/// only deallocate, in no time).
async fn sanitize_target() -> TestTarget {
    start_toml(&basic_toml("").replace("size = \"64MiB\"", "size = \"256MiB\"")).await
}

/// Sends SANITIZE OVERWRITE with IMMED clear; its ITT and CmdSN.
async fn send_sanitize(c: &mut Client) -> (u32, u32) {
    let cdb = [0x48, 0x01, 0, 0, 0, 0, 0, 0, SANITIZE_PARAM.len() as u8, 0];
    let imm = if c.param("ImmediateData", "Yes") == "Yes" {
        Bytes::copy_from_slice(&SANITIZE_PARAM)
    } else {
        Bytes::new()
    };
    let cmd_sn = c.cmd_sn;
    let (itt, pdu) = c.command(&cdb, SANITIZE_PARAM.len() as u32, false, true, true, imm);
    c.send(&pdu).await;
    (itt, cmd_sn)
}

/// What a TEST UNIT READY answered: status and (key, ASC, ASCQ).
type TurAnswer = (u8, Option<(u8, u8, u8)>);

/// TEST UNIT READY, one at a time, until one answers `want`, or the
/// SANITIZE `sanitize` answers (its status is returned then). The first
/// ones may come before the sanitize's thread has started (simple tasks
/// run in any order).
async fn tur_until(c: &mut Client, sanitize: u32, want: TurAnswer) -> (Vec<TurAnswer>, Option<u8>) {
    let mut turs = Vec::new();
    loop {
        let (tur, pdu) = c.command(&[0; 6], 0, false, false, true, Bytes::new());
        c.send(&pdu).await;
        loop {
            let p = c
                .recv_within(Duration::from_secs(60))
                .await
                .expect("a response");
            match p.header {
                Header::R2t(h) if h.itt == sanitize => c.answer_r2t(&h, &SANITIZE_PARAM).await,
                Header::ScsiResponse(h) if h.itt == sanitize => {
                    c.finish(tur, None).await;
                    return (turs, Some(h.status));
                }
                Header::ScsiResponse(h) if h.itt == tur => {
                    let s = p.data.get(2..).unwrap_or_default();
                    let code = match (s.get(2), s.get(12), s.get(13)) {
                        (Some(k), Some(a), Some(q)) => Some((k & 0x0F, *a, *q)),
                        _ => None,
                    };
                    turs.push((h.status, code));
                    if (h.status, code) == want {
                        return (turs, None);
                    }
                    break;
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }
}

const SANITIZE_IN_PROGRESS: TurAnswer = (2, Some((0x02, 0x04, 0x1B)));

#[tokio::test]
/// SANITIZE without IMMED answers only when the sanitize ends; the connection
/// meanwhile goes on, and the LU answers NOT READY, SANITIZE IN PROGRESS
/// (SBC-4 §4.11). Before, the sanitize ran on the connection's own task and
/// its GOOD came before the answer to anything sent after it.
async fn sanitize_without_immed_leaves_the_connection_free_and_the_lu_not_ready() {
    let t = sanitize_target().await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(14)).await;
    c.clear_ua().await;
    let (sanitize, _) = send_sanitize(&mut c).await;
    let (turs, end) = tur_until(&mut c, sanitize, SANITIZE_IN_PROGRESS).await;
    assert_eq!(
        end, None,
        "the sanitize answered before any NOT READY: {turs:?}"
    );
    let (_, end) = tur_until(&mut c, sanitize, (0xFF, None)).await;
    assert_eq!(end, Some(0), "SANITIZE GOOD at its end");
    assert_eq!(c.tur().await.status, 0);
    let r = c.read10(0, 1).await;
    assert_eq!(&r.data[..4], &[0xA5, 0x5A, 0xA5, 0x5A]);
}

#[tokio::test]
/// ABORT TASK of a SANITIZE that is running: FUNCTION COMPLETE, no response
/// for it ever, and the sanitize itself goes on to its end (SBC-4: task
/// management does not stop a sanitize). Before, a command executing off
/// the connection's task was not found ("task does not exist") and answered
/// later anyway.
async fn abort_task_of_a_running_sanitize_ends_the_task_not_the_sanitize() {
    let t = sanitize_target().await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(15)).await;
    c.clear_ua().await;
    let (sanitize, cmd_sn) = send_sanitize(&mut c).await;
    let (turs, end) = tur_until(&mut c, sanitize, SANITIZE_IN_PROGRESS).await;
    assert_eq!(
        end, None,
        "the sanitize answered before any NOT READY: {turs:?}"
    );
    assert_eq!(
        c.tmf(tmf::ABORT_TASK, 0, sanitize, cmd_sn).await,
        tmf::FUNCTION_COMPLETE
    );
    assert_eq!(
        c.tmf(tmf::QUERY_TASK, 0, sanitize, cmd_sn).await,
        tmf::FUNCTION_COMPLETE,
        "the aborted task is gone"
    );
    // Still in progress after the abort, then ready, and never an answer
    // for the aborted SANITIZE (tur_until would return it).
    let (turs, end) = tur_until(&mut c, sanitize, (0, None)).await;
    assert_eq!(end, None, "a response for the aborted SANITIZE");
    assert!(turs.contains(&SANITIZE_IN_PROGRESS), "{turs:?}");
    let r = c.read10(0, 1).await;
    assert_eq!(
        &r.data[..4],
        &[0xA5, 0x5A, 0xA5, 0x5A],
        "the sanitize completed"
    );
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
/// ABORT TASK of a WRITE SAME running on a file LU's I/O threads: FUNCTION
/// COMPLETE comes only once its work is over (SAM-5: the aborted task has
/// ended when the function completes), so a read sent after it, on another
/// of the LU's threads, sees every block written. Before, the response went
/// out while the pwrite calls went on, and such a read could see old data.
async fn abort_of_a_write_running_on_a_file_lu_answers_after_its_work() {
    const BLOCKS: u64 = (256 << 20) / 512;
    let path = std::env::temp_dir().join(format!("ironstar-abort-{}.img", std::process::id()));
    let file = std::fs::File::create(&path).expect("scratch file");
    file.set_len(BLOCKS * 512).expect("scratch file size");
    drop(file);
    let toml = basic_toml("").replace(
        "backend = \"memory\"\nsize = \"64MiB\"",
        &format!("backend = \"file\"\npath = {:?}\nio_threads = 4", path),
    );
    let t = start_toml(&toml).await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(16)).await;
    c.clear_ua().await;
    // WRITE SAME(16) of the whole LU with one block of 0xA5.
    let mut cdb = [0u8; 16];
    cdb[0] = 0x93;
    cdb[10..14].copy_from_slice(&(BLOCKS as u32).to_be_bytes());
    let pattern = vec![0xA5u8; 512];
    let cmd_sn = c.cmd_sn;
    let (ws, pdu) = c.command(&cdb, 512, false, true, true, Bytes::from(pattern.clone()));
    c.send(&pdu).await;
    // Let it start on an I/O thread (256 MiB of pwrite takes far longer).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let tmf_itt = c.itt();
    let abort = Pdu::new(
        Header::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function: tmf::ABORT_TASK,
            lun: 0,
            itt: tmf_itt,
            referenced_task_tag: ws,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            ref_cmd_sn: cmd_sn,
            exp_data_sn: 0,
        }),
        Bytes::new(),
    );
    c.send(&abort).await;
    // The WRITE SAME may also have ended first: then its response comes and
    // the abort finds nothing. Either way the data is all there afterwards.
    loop {
        let p = c
            .recv_within(Duration::from_secs(60))
            .await
            .expect("a response");
        match p.header {
            Header::TaskMgmtResponse(h) if h.itt == tmf_itt => break,
            Header::ScsiResponse(h) if h.itt == ws => assert_eq!(h.status, 0),
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    let last = (BLOCKS - 1) as u32;
    let r = c.read10(last, 1).await;
    let _ = std::fs::remove_file(&path);
    assert_eq!(r.status, 0);
    assert_eq!(
        r.data, pattern,
        "the last block read after the abort's answer"
    );
}
