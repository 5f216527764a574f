//! What live inspection reads of a running connection, driven over real
//! TCP with hand-made PDUs: the connection's and session's states with
//! their transitions, a write waiting for its data (with its progress), a
//! command held for its CmdSN turn, and the counters after it all.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use iscsi_proto::pdu::{DataOut, Header, Pdu};
use iscsi_target::inspect::TaskState;

#[tokio::test]
async fn a_write_waiting_for_data_shows_its_progress_then_counts_its_bytes() {
    let t = start("").await;
    let opts = LoginOpts::normal(1)
        .key("InitialR2T", "Yes")
        .key("ImmediateData", "No");
    let mut c = Client::login_to(t.addr, opts).await;
    c.clear_ua().await;
    let s = t.registry.sessions.all().pop().unwrap();
    let conn = s.connections().pop().unwrap();
    let states: Vec<&str> = conn.info.state_log().recent.iter().map(|x| x.to).collect();
    assert_eq!(states, ["S3 XPT_UP", "S4 IN_LOGIN", "S5 LOGGED_IN"]);
    let qs: Vec<&str> = s.state_log().recent.iter().map(|x| x.to).collect();
    assert_eq!(qs, ["Q2 ACTIVE", "Q3 LOGGED_IN"]);
    let before = s.io.snapshot();

    // WRITE(10) of 4 KiB: the target asks for it with an R2T; we send
    // the first 1 KiB only.
    let data = pattern(4096, 7);
    let (itt, pdu) = c.command(&write10_cdb(8, 8), 4096, false, true, true, Bytes::new());
    c.send(&pdu).await;
    let r2t = match c.recv().await.header {
        Header::R2t(h) => h,
        other => panic!("expected an R2T, got {other:?}"),
    };
    let part = Pdu::new(
        Header::DataOut(DataOut {
            final_: false,
            lun: 0,
            itt,
            ttt: r2t.ttt,
            exp_stat_sn: c.exp_stat_sn,
            data_sn: 0,
            buffer_offset: 0,
        }),
        Bytes::copy_from_slice(&data[..1024]),
    );
    c.send(&part).await;
    let mut seen = None;
    for _ in 0..50 {
        let tasks = conn.info.tasks_in_flight();
        if let Some(w) = tasks.iter().find(|x| x.itt == itt && x.bytes_done == 1024) {
            seen = Some(w.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = seen.expect("the write shows with 1 KiB of 4 done");
    assert_eq!(w.state, TaskState::WaitingForData);
    assert_eq!(w.command, "WRITE(10)");
    assert_eq!((w.direction, w.bytes_expected, w.lun), ("write", 4096, 0));

    // The rest, in a second PDU; the task completes and leaves the table.
    let rest = Pdu::new(
        Header::DataOut(DataOut {
            final_: true,
            lun: 0,
            itt,
            ttt: r2t.ttt,
            exp_stat_sn: c.exp_stat_sn,
            data_sn: 1,
            buffer_offset: 1024,
        }),
        Bytes::copy_from_slice(&data[1024..]),
    );
    c.send(&rest).await;
    let r = c.finish(itt, None).await;
    assert_eq!(r.status, 0);
    let after = s.io.snapshot();
    assert_eq!(after.bytes_written - before.bytes_written, 4096);
    assert_eq!(after.write_commands - before.write_commands, 1);
    assert_eq!(after.commands - before.commands, 1);
    // Its response is on the wire: nothing left in flight.
    let mut left = conn.info.tasks_in_flight();
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = conn.info.tasks_in_flight();
    }
    assert!(left.is_empty(), "{left:?}");

    // A command ahead of its CmdSN turn is held by the session, and shown.
    let (_, skipped) = c.command(&read10_cdb(0, 1), 512, true, false, true, Bytes::new());
    let (ahead_itt, ahead) = c.command(&read10_cdb(1, 1), 512, true, false, true, Bytes::new());
    c.send(&ahead).await;
    let mut held = vec![];
    for _ in 0..50 {
        held = s.held_commands();
        if !held.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].itt, held[0].command), (ahead_itt, "READ(10)"));
    c.send(&skipped).await;
    let _ = c.recv().await;
    let _ = c.recv().await;
    assert!(s.held_commands().is_empty());
    // Both reads count, with their latency.
    let end = s.io.snapshot();
    assert_eq!(end.read_commands - after.read_commands, 2);
    assert_eq!(end.latency.count, end.commands);

    // ABORT TASK of a write waiting for its data: counted for the session
    // and the LU, and the task leaves the table.
    let naa = t
        .registry
        .snapshot()
        .lus
        .values()
        .next()
        .unwrap()
        .lu
        .config()
        .naa_id;
    let lu_aborts = || {
        t.registry
            .sessions
            .metrics
            .lu_if_any(naa)
            .map_or(0, |m| m.snapshot().task_aborts)
    };
    let lu_before = lu_aborts();
    let sn = c.cmd_sn;
    let (itt, pdu) = c.command(&write10_cdb(16, 8), 4096, false, true, true, Bytes::new());
    c.send(&pdu).await;
    assert!(matches!(c.recv().await.header, Header::R2t(_)));
    let r = c.tmf(iscsi_proto::pdu::tmf::ABORT_TASK, 0, itt, sn).await;
    assert_eq!(r, iscsi_proto::pdu::tmf::FUNCTION_COMPLETE);
    assert_eq!(s.io.snapshot().task_aborts - end.task_aborts, 1);
    assert_eq!(lu_aborts() - lu_before, 1);
    assert!(!conn.info.tasks_in_flight().iter().any(|x| x.itt == itt));
}
