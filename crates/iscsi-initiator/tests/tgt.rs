//! The initiator against a target we did not write: Debian's tgtd, started
//! and stopped by each test (see `common`). Fails, never skips, when tgtd is
//! missing.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{random_bytes, Tgt, INITIATOR, IQN, LU_BYTES};
use iscsi_initiator::discovery::discover;
use iscsi_initiator::login::{Auth, ChapCredentials};
use iscsi_initiator::portal::Portal;
use iscsi_initiator::scsi::{sense_key, ScsiError};
use iscsi_initiator::{Error, Session, SessionOptions};

fn portal(t: &Tgt) -> Portal {
    Portal::parse(&t.portal()).unwrap()
}

fn opts() -> SessionOptions {
    let mut o = SessionOptions::new(INITIATOR);
    o.command_timeout = Duration::from_secs(20);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_every_target_with_its_portal_and_tpgt() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    t.add_target(2, &format!("{IQN}-second"));
    let found = discover(&portal(&t), INITIATOR, Auth::None, Duration::from_secs(10))
        .await
        .unwrap();
    let names: Vec<&str> = found.iter().map(|d| d.name.as_str()).collect();
    assert!(
        names.contains(&IQN) && names.contains(&format!("{IQN}-second").as_str()),
        "{names:?}"
    );
    for d in &found {
        assert!(
            d.portals
                .iter()
                .any(|(p, tpgt)| p.port == t.port && tpgt.is_some()),
            "{d:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_inquiry_readcap_report_luns_and_logout() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    let s = Session::login(&portal(&t), IQN, opts()).await.unwrap();
    let luns = s.report_luns().await.unwrap();
    assert_eq!(luns, vec![0, 1]);
    let lun = s.lun(1);
    lun.test_unit_ready().await.unwrap();
    let inq = lun.inquiry().await.unwrap();
    assert_eq!(inq.device_type, 0);
    assert_eq!(inq.vendor, "IET");
    let cap = lun.read_capacity().await.unwrap();
    assert_eq!(cap.bytes(), LU_BYTES);
    assert_eq!(cap.block_size, 512);
    let vpd = lun.inquiry_vpd(0x80).await.unwrap();
    assert_eq!(vpd.get(1), Some(&0x80));
    s.ping().await.unwrap();
    s.logout().await.unwrap();
    assert!(s.closed_reason().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scsi_errors_come_back_typed() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    let s = Session::login(&portal(&t), IQN, opts()).await.unwrap();
    let lun = s.lun(1);
    let blocks = LU_BYTES / 512;
    let err = lun.read(blocks, 1).await.unwrap_err();
    match err {
        Error::Scsi(ScsiError::CheckCondition { key, asc, .. }) => {
            assert_eq!(key, sense_key::ILLEGAL_REQUEST);
            assert_eq!(asc, 0x21, "LBA out of range");
        }
        other => panic!("expected CHECK CONDITION, got {other}"),
    }
    // An unknown opcode through the pass-through.
    let err = lun
        .execute(&[0xff, 0, 0, 0, 0, 0], None, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Scsi(ScsiError::CheckCondition { key: 5, .. })),
        "{err}"
    );
    s.logout().await.unwrap();
}

async fn round_trip(s: &Session, len: usize, seed: u64) {
    let lun = s.lun(1);
    let data = Bytes::from(random_bytes(len, seed));
    let start = Instant::now();
    lun.write(2048, data.clone()).await.unwrap();
    let wrote = start.elapsed();
    let back = lun.read(2048, (len / 512) as u32).await.unwrap();
    eprintln!(
        "{} MiB written in {:?}, read in {:?}",
        len >> 20,
        wrote,
        start.elapsed() - wrote
    );
    assert!(back == data, "data read back differs from data written");
}

/// tgt's defaults: InitialR2T=Yes, 8 KiB segments: every write is R2T-driven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_round_trip_with_r2t_and_defaults() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    let s = Session::login(&portal(&t), IQN, opts()).await.unwrap();
    assert!(s.params().initial_r2t);
    round_trip(&s, 16 << 20, 0x1badb002).await;
    s.logout().await.unwrap();
}

/// InitialR2T=No and ImmediateData: immediate data, unsolicited Data-Out up
/// to FirstBurstLength, then R2Ts; digests on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_round_trip_with_unsolicited_data_and_digests() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    t.set(1, "InitialR2T", "No");
    t.set(1, "MaxRecvDataSegmentLength", "65536");
    t.set(1, "FirstBurstLength", "131072");
    t.set(1, "MaxBurstLength", "262144");
    t.set(1, "HeaderDigest", "CRC32C");
    t.set(1, "DataDigest", "CRC32C");
    let mut o = opts();
    o.header_digest = true;
    o.data_digest = true;
    let s = Session::login(&portal(&t), IQN, o).await.unwrap();
    let p = s.params();
    assert!(!p.initial_r2t && p.immediate_data && p.header_digest && p.data_digest);
    assert_eq!(p.max_xmit_data_segment_length, 65536);
    assert_eq!(p.first_burst_length, 131072);
    round_trip(&s, 16 << 20, 0xfeed_f00d).await;
    s.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_commands_in_flight_at_once() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    let s = Session::login(&portal(&t), IQN, opts()).await.unwrap();
    let lun = s.lun(1);
    lun.read_capacity().await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let lun = lun.clone();
        set.spawn(async move {
            let data = Bytes::from(random_bytes(4096, i + 1));
            lun.write(i * 8, data.clone()).await.unwrap();
            assert_eq!(lun.read(i * 8, 8).await.unwrap(), data);
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    s.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_one_way_against_tgt() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    t.chap(1, "ini-user", "ini-secret-123", None);
    let mut o = opts();
    o.auth = Auth::Chap(ChapCredentials::new("ini-user", "ini-secret-123"));
    let s = Session::login(&portal(&t), IQN, o).await.unwrap();
    s.lun(1).read_capacity().await.unwrap();
    s.logout().await.unwrap();

    let mut o = opts();
    o.auth = Auth::Chap(ChapCredentials::new("ini-user", "wrong-secret-99"));
    let err = Session::login(&portal(&t), IQN, o).await.unwrap_err();
    assert!(err.to_string().contains("authentication failure"), "{err}");

    let err = Session::login(&portal(&t), IQN, opts()).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_mutual_against_tgt() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    t.chap(
        1,
        "ini-user",
        "ini-secret-123",
        Some(("tgt-user", "tgt-secret-456")),
    );
    let mut o = opts();
    o.auth = Auth::Chap(
        ChapCredentials::new("ini-user", "ini-secret-123")
            .with_mutual("tgt-user", "tgt-secret-456"),
    );
    let s = Session::login(&portal(&t), IQN, o).await.unwrap();
    s.lun(1).inquiry().await.unwrap();
    s.logout().await.unwrap();

    // The target proves itself with a secret we do not expect: we refuse it.
    let mut o = opts();
    o.auth = Auth::Chap(
        ChapCredentials::new("ini-user", "ini-secret-123")
            .with_mutual("tgt-user", "other-secret-789"),
    );
    let err = Session::login(&portal(&t), IQN, o).await.unwrap_err();
    assert!(err.to_string().contains("CHAP"), "{err}");
}

/// The target's side of our TCP connection is killed (`ss -K`) in the middle
/// of a long write: the session is reinstated (same ISID, TSIH 0), the
/// unfinished commands are reissued, and the data reads back intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_mid_write_is_recovered() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    let mut o = opts();
    o.replacement_timeout = Duration::from_secs(20);
    o.max_io_bytes = 256 << 10;
    let s = Session::login(&portal(&t), IQN, o).await.unwrap();
    let lun = s.lun(1);
    let len = 32usize << 20;
    let data = Bytes::from(random_bytes(len, 0x5eed));
    let writer = common::write_in_background(&lun, data.clone()).await;
    let filter = format!("sport = :{}", t.port);
    let killed = std::process::Command::new("ss")
        .args(["-K", "-t", &filter])
        .output()
        .unwrap();
    assert!(killed.status.success(), "ss -K failed: {killed:?}");
    let (outcome, passes) = writer.finish().await;
    outcome.unwrap();
    eprintln!("passes written: {passes}");
    assert!(s.reconnects() >= 1, "no reconnect happened");
    let back = lun.read(0, (len / 512) as u32).await.unwrap();
    assert!(back == data, "data read back differs after the reconnect");
    eprintln!("reconnects: {}", s.reconnects());
    s.logout().await.unwrap();
}

/// Several sessions to several targets at once, each with its own I/O in
/// flight at the same time, and a second session to the first target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sessions_to_several_targets_at_once() {
    let mut t = Tgt::start();
    let second = format!("{IQN}-second");
    t.add_target(1, IQN);
    t.add_target(2, &second);
    let p = portal(&t);
    let a = Session::login(&p, IQN, opts()).await.unwrap();
    let b = Session::login(&p, &second, opts()).await.unwrap();
    let a2 = Session::login(&p, IQN, opts()).await.unwrap();
    tokio::join!(
        round_trip(&a, 4 << 20, 11),
        round_trip(&b, 4 << 20, 22),
        async {
            let lun = a2.lun(1);
            lun.test_unit_ready().await.ok();
            lun.read_capacity().await.unwrap();
        }
    );
    for s in [a, b, a2] {
        s.logout().await.unwrap();
    }
}
