//! LUN masking on every command path: an initiator outside an LU's view never
//! learns of it (REPORT LUNS), never reads or writes it, cannot register or
//! reserve on it (PERSISTENT RESERVE IN/OUT), and cannot reset or abort
//! anything on it (task management answers "LUN does not exist"). The owner of
//! the view sees none of the other's attempts.

mod common;

use bytes::Bytes;
use common::*;
use iscsi_proto::pdu::{lun_to_wire, tmf, Header, Pdu, TaskMgmtRequest};

const OTHER: &str = "iqn.2026-11.dev.ironstar:other";
/// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
const NOT_SUPPORTED: Option<(u8, u8, u8)> = Some((5, 0x25, 0x00));

fn toml() -> String {
    format!(
        r#"
[[portal_group]]
tag = 1
portals = ["@PG1@"]
[[target]]
iqn = "{TARGET}"
portal_groups = [1]
[[target.lun]]
lun = 0
backend = "memory"
size = "4MiB"
[[lu]]
guid = "600000000000000a"
backend = "memory"
size = "4MiB"
[[host_group]]
name = "mine"
members = ["{INITIATOR}"]
[[view]]
lu = "600000000000000a"
host_group = "mine"
lun = 1
[defaults]
nop_in_interval = 0
"#
    )
}

async fn tmf_on(c: &mut Client, function: u8, lun: u64) -> u8 {
    let itt = c.itt();
    let pdu = Pdu::new(
        Header::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function,
            lun: lun_to_wire(lun),
            itt,
            referenced_task_tag: 0xffff_ffff,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            ref_cmd_sn: 0,
            exp_data_sn: 0,
        }),
        Bytes::new(),
    );
    c.send(&pdu).await;
    match c.recv().await.header {
        Header::TaskMgmtResponse(r) => r.response,
        other => panic!("expected a TMF Response, got {other:?}"),
    }
}

#[tokio::test]
async fn an_initiator_outside_the_view_touches_the_lu_on_no_path() {
    let t = start_toml(&toml()).await;
    let mut mine = Client::login_to(t.addr, LoginOpts::normal(1)).await;
    let mut other = Client::login_to(
        t.addr,
        LoginOpts {
            initiator: OTHER.into(),
            ..LoginOpts::normal(2)
        },
    )
    .await;
    mine.clear_ua_on(0).await;
    mine.clear_ua_on(1).await;
    other.clear_ua_on(0).await;
    let secret = vec![0x5au8; 512];
    assert_eq!(
        mine.run_on(1, &write10_cdb(0, 1), 512, Some(&secret))
            .await
            .status,
        0
    );

    // REPORT LUNS: LUN 1 is not there.
    let rl = other
        .run_on(0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0], 1024, None)
        .await;
    let luns: Vec<u16> = rl
        .data
        .get(8..)
        .unwrap_or_default()
        .chunks(8)
        .map(|e| u16::from_be_bytes([e[0], e[1]]) & 0x3fff)
        .collect();
    assert_eq!(luns, vec![0]);

    // I/O.
    let read = other.run_on(1, &read10_cdb(0, 1), 512, None).await;
    assert_eq!(read.sense_code(), NOT_SUPPORTED);
    assert!(
        read.data.is_empty(),
        "data leaked from an LU outside the view"
    );
    let write = other
        .run_on(1, &write10_cdb(0, 1), 512, Some(&[0xeeu8; 512]))
        .await;
    assert_eq!(write.sense_code(), NOT_SUPPORTED);

    // Persistent reservations: READ KEYS, and REGISTER of a key.
    let keys = other
        .run_on(1, &[0x5E, 0, 0, 0, 0, 0, 0, 0x04, 0, 0], 1024, None)
        .await;
    assert_eq!(keys.sense_code(), NOT_SUPPORTED);
    let mut params = [0u8; 24];
    params[8..16].copy_from_slice(&0x1234u64.to_be_bytes());
    let register = other
        .run_on(1, &[0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0], 24, Some(&params))
        .await;
    assert_eq!(register.sense_code(), NOT_SUPPORTED);

    // Task management.
    assert_eq!(
        tmf_on(&mut other, tmf::LOGICAL_UNIT_RESET, 1).await,
        tmf::LUN_DOES_NOT_EXIST
    );
    assert_eq!(
        tmf_on(&mut other, tmf::ABORT_TASK_SET, 1).await,
        tmf::LUN_DOES_NOT_EXIST
    );
    assert_eq!(
        tmf_on(&mut other, tmf::CLEAR_TASK_SET, 1).await,
        tmf::LUN_DOES_NOT_EXIST
    );

    // The owner saw none of it: no reset unit attention, no registration, data intact.
    let tur = mine.run_on(1, &[0u8; 6], 0, None).await;
    assert_eq!(tur.status, 0, "the owner got {:?}", tur.sense_code());
    let keys = mine
        .run_on(1, &[0x5E, 0, 0, 0, 0, 0, 0, 0x04, 0, 0], 1024, None)
        .await;
    assert_eq!(keys.status, 0);
    assert_eq!(
        keys.data.get(4..8),
        Some(&[0u8, 0, 0, 0][..]),
        "a key was registered from outside the view"
    );
    let back = mine.run_on(1, &read10_cdb(0, 1), 512, None).await;
    assert_eq!(back.data, secret);
}
