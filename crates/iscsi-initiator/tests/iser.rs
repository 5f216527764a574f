//! Our initiator against our target over iSER, in one process, on the
//! in-process verbs emulation (`iser::emulation`, a test double: no RDMA
//! hardware involved). Everything above the Transport seam — login, CmdSN
//! windows, MC/S, task management, recovery — is the same code that runs
//! over TCP; here the data moves by (emulated) RDMA WRITE and READ.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iscsi_initiator::conn::Link;
use iscsi_initiator::portal::Portal;
use iscsi_initiator::{Session, SessionOptions};
use iscsi_target::iser_portal::IserPortal;
use iscsi_target::{Config, Registry};
use iser::emulation::Emulation;
use tokio::task::JoinHandle;

const TARGET: &str = "iqn.2026-11.dev.ironstar:iser0";
const INITIATOR: &str = "iqn.2026-11.dev.ironstar.test:iser-initiator";
const PORTAL: &str = "127.0.0.1:3260";
/// Nothing here may take long: a hang is a failure.
const LIMIT: Duration = Duration::from_secs(20);

struct Fixture {
    fab: Emulation,
    registry: Arc<Registry>,
    portal: JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.portal.abort();
    }
}

async fn start(defaults: &str) -> Fixture {
    let toml = format!(
        r#"
[[portal_group]]
tag = 1
portals = ["{PORTAL}"]

[[target]]
iqn = "{TARGET}"
portal_groups = [1]
[[target.lun]]
lun = 0
backend = "memory"
size = "64MiB"

[defaults]
nop_in_interval = 0
max_connections = 4
{defaults}
"#
    );
    let cfg = Config::from_toml(&toml).unwrap();
    let registry = Arc::new(Registry::build(&cfg).unwrap());
    let fab = Emulation::new();
    let addr: SocketAddr = PORTAL.parse().unwrap();
    let p = IserPortal::bind(&fab, addr, 1).await.unwrap();
    let portal = tokio::spawn(p.run(registry.clone()));
    Fixture {
        fab,
        registry,
        portal,
    }
}

fn options(f: &Fixture) -> SessionOptions {
    let mut o = SessionOptions::new(INITIATOR);
    o.link = Link::Iser(Arc::new(f.fab.clone()));
    o.nop_interval = Duration::ZERO;
    o.login_timeout = Duration::from_secs(5);
    o.command_timeout = Duration::from_secs(10);
    o
}

async fn login(f: &Fixture, o: SessionOptions) -> Session {
    let s = tokio::time::timeout(
        LIMIT,
        Session::login(&Portal::new("127.0.0.1", 3260), TARGET, o),
    )
    .await
    .expect("login hung")
    .expect("login over iSER");
    // The first command of a session meets the power-on unit attention.
    let _ = s.lun(0).test_unit_ready().await;
    let _ = f;
    s
}

fn pattern(len: usize, seed: u32) -> Bytes {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect::<Vec<_>>(),
    )
}

async fn round_trip(s: &Session, lba: u64, data: Bytes) {
    let lun = s.lun(0);
    tokio::time::timeout(LIMIT, lun.write(lba, data.clone()))
        .await
        .expect("write hung")
        .expect("write");
    let blocks = (data.len() / 512) as u32;
    let back = tokio::time::timeout(LIMIT, lun.read(lba, blocks))
        .await
        .expect("read hung")
        .expect("read");
    assert!(
        back == data,
        "data read back differs ({} bytes at lba {lba})",
        data.len()
    );
}

/// Waits until the target has no session and the fabric no connection.
async fn all_gone(f: &Fixture) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let budget = &f.registry.sessions.write_budget;
    while !f.registry.sessions.all().is_empty() || f.fab.connected_qps() > 0 || budget.used() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "left behind: {} sessions, {} queue pairs, {} bytes of write buffers",
            f.registry.sessions.all().len(),
            f.fab.connected_qps(),
            budget.used()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_negotiates_iser_keys_and_no_digests() {
    let f = start("").await;
    let mut o = options(&f);
    o.header_digest = true;
    o.data_digest = true;
    let s = login(&f, o).await;
    let p = s.params();
    assert!(p.rdma_extensions, "RDMAExtensions=Yes over iSER");
    assert!(
        !p.header_digest && !p.data_digest,
        "digests are off on iSER"
    );
    assert_eq!(
        p.max_xmit_data_segment_length,
        p.target_recv_data_segment_length
    );
    // Both declare their receive depth (ours 512, the target's its queue depth 128 + 64):
    // the lower one holds.
    assert!(iser::IserConfig::default().recv_depth > 128 + 64);
    assert_eq!(p.max_outstanding_unexpected_pdus, 128 + 64);
    s.ping().await.unwrap();
    s.logout().await.unwrap();
    all_gone(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_of_4k_and_1m_round_trip() {
    let f = start("").await;
    let s = login(&f, options(&f)).await;
    round_trip(&s, 0, pattern(4096, 1)).await;
    round_trip(&s, 1000, pattern(1 << 20, 2)).await;
    // Unaligned neighbours were not touched.
    round_trip(&s, 8, pattern(512, 3)).await;
    let lun = s.lun(0);
    let first = lun.read(0, 8).await.unwrap();
    assert_eq!(first, pattern(4096, 1));
    s.logout().await.unwrap();
    all_gone(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_send_immediate_data_inline_and_the_rest_by_rdma_read() {
    // Even a target configured for InitialR2T=No asks for Yes over iSER:
    // immediate data rides in the command's SEND, the rest is RDMA READ
    // (the unsolicited Data-Out SEND path is the transport's unit test).
    let f = start("initial_r2t = false\nfirst_burst_length = 65536").await;
    let mut o = options(&f);
    o.policy.initial_r2t = false;
    let s = login(&f, o).await;
    let p = s.params();
    assert!(p.initial_r2t && p.immediate_data);
    round_trip(&s, 0, pattern(1 << 20, 4)).await;
    round_trip(&s, 4096, pattern(48 * 1024, 5)).await;
    // ImmediateData=No, InitialR2T=Yes: everything by RDMA READ.
    let f2 = start("immediate_data = false").await;
    let mut o = options(&f2);
    o.policy.immediate_data = false;
    let s2 = login(&f2, o).await;
    assert!(!s2.params().immediate_data);
    round_trip(&s2, 0, pattern(300 * 1024, 6)).await;
    s.logout().await.unwrap();
    s2.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nop_and_lun_reset_go_over_sends() {
    let f = start("").await;
    let s = login(&f, options(&f)).await;
    s.ping().await.unwrap();
    round_trip(&s, 0, pattern(8192, 7)).await;
    tokio::time::timeout(LIMIT, s.lun_reset(0))
        .await
        .expect("LUN RESET hung")
        .expect("LUN RESET");
    // After the reset's unit attention, I/O goes on.
    let _ = s.lun(0).test_unit_ready().await;
    round_trip(&s, 0, pattern(8192, 8)).await;
    s.logout().await.unwrap();
    all_gone(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_connections_carry_io_in_parallel() {
    let f = start("").await;
    let mut o = options(&f);
    o.connections = 4;
    o.io_depth = 16;
    o.max_io_bytes = 128 * 1024;
    let s = login(&f, o).await;
    assert_eq!(s.connection_commands().len(), 4);
    let mut jobs = Vec::new();
    for i in 0..8u64 {
        let s = s.clone();
        jobs.push(tokio::spawn(async move {
            round_trip(&s, i * 4096, pattern(1 << 20, 10 + i as u32)).await;
        }));
    }
    for j in jobs {
        j.await.unwrap();
    }
    assert!(
        s.connection_commands().iter().all(|(_, n)| *n > 0),
        "every connection carried commands: {:?}",
        s.connection_commands()
    );
    s.logout().await.unwrap();
    all_gone(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_link_mid_io_ends_every_task_and_the_initiator_recovers() {
    let f = start("").await;
    let mut o = options(&f);
    o.connections = 2;
    o.replacement_timeout = Duration::from_secs(15);
    o.io_depth = 8;
    o.max_io_bytes = 64 * 1024;
    let s = login(&f, o).await;
    let mut jobs = Vec::new();
    for i in 0..6u64 {
        let s = s.clone();
        jobs.push(tokio::spawn(async move {
            round_trip(&s, i * 8192, pattern(2 << 20, 40 + i as u32)).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    f.fab.set_link(false);
    // The target ends the old connections and their tasks.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while f.fab.connected_qps() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "QPs survived the pulled link"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.fab.set_link(true);
    for j in jobs {
        tokio::time::timeout(LIMIT, j)
            .await
            .expect("I/O hung across the pulled link")
            .unwrap();
    }
    assert!(s.reconnects() + s.connection_reinstatements() > 0);
    round_trip(&s, 0, pattern(4096, 99)).await;
    s.logout().await.unwrap();
    all_gone(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_of_writes_never_overruns_the_receives() {
    // The initiator keeps the whole CmdSN window busy with writes.
    let f = start("initial_r2t = false\nfirst_burst_length = 65536\nqueue_depth = 128").await;
    let mut o = options(&f);
    o.policy.initial_r2t = false;
    o.io_depth = 64;
    o.max_io_bytes = 128 * 1024;
    let s = login(&f, o).await;
    let mut jobs = Vec::new();
    for i in 0..4u64 {
        let s = s.clone();
        jobs.push(tokio::spawn(async move {
            round_trip(&s, i * 8192, pattern(4 << 20, 70 + i as u32)).await;
        }));
    }
    for j in jobs {
        j.await.unwrap();
    }
    assert_eq!(s.reconnects() + s.connection_reinstatements(), 0);
    s.logout().await.unwrap();
    all_gone(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lost_connection_is_reinstated_and_its_commands_aborted_and_reissued() {
    let f = start("").await;
    let mut o = options(&f);
    o.connections = 2;
    o.io_depth = 8;
    o.max_io_bytes = 64 * 1024;
    let s = login(&f, o).await;
    let mut jobs = Vec::new();
    for i in 0..4u64 {
        let s = s.clone();
        jobs.push(tokio::spawn(async move {
            round_trip(&s, i * 8192, pattern(2 << 20, 80 + i as u32)).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(f.fab.break_one(), "a connection to break");
    for j in jobs {
        tokio::time::timeout(LIMIT, j)
            .await
            .expect("I/O hung across the lost connection")
            .unwrap();
    }
    // The same session went on: one connection reinstated (its lost
    // commands closed with ABORT TASK on the other and reissued), no
    // session reinstatement.
    assert_eq!(s.reconnects(), 0);
    assert!(s.connection_reinstatements() >= 1);
    assert!(s.reissued_commands() > 0, "commands were in flight on it");
    assert_eq!(s.connection_commands().len(), 2);
    round_trip(&s, 0, pattern(4096, 98)).await;
    s.logout().await.unwrap();
    all_gone(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_device_mid_io_frees_everything_on_both_sides_and_the_session_recovers_when_it_returns(
) {
    let f = start("").await;
    let mut o = options(&f);
    o.connections = 4;
    o.replacement_timeout = Duration::from_secs(15);
    o.io_depth = 8;
    o.max_io_bytes = 64 * 1024;
    let s = login(&f, o).await;
    let mut jobs = Vec::new();
    let mut data = Vec::new();
    for i in 0..6u64 {
        let d = pattern(2 << 20, 70 + i as u32);
        data.push(d.clone());
        let s = s.clone();
        jobs.push(tokio::spawn(async move {
            tokio::time::timeout(LIMIT, s.lun(0).write(i * 8192, d))
                .await
                .expect("write hung across the device removal")
                .expect("write across the device removal");
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    f.fab.remove_device();
    // What a real removal waits for: every queue pair and registered region
    // of the device let go, on the target and the initiator alike, and the
    // target holds no session (its tasks ended with it).
    let deadline = tokio::time::Instant::now() + LIMIT;
    while f.fab.live_qps() > 0 || f.fab.live_regions() > 0 || !f.registry.sessions.all().is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "held after the device removal: {} queue pairs, {} regions, {} sessions",
            f.fab.live_qps(),
            f.fab.live_regions(),
            f.registry.sessions.all().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.registry.sessions.write_budget.used(), 0);
    // The initiator keeps trying while the device is away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.fab.add_device();
    for j in jobs {
        tokio::time::timeout(LIMIT, j)
            .await
            .expect("I/O hung after the device came back")
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + LIMIT;
    while s.reconnects() + s.connection_reinstatements() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, d) in data.iter().enumerate() {
        let back = tokio::time::timeout(LIMIT, s.lun(0).read(i as u64 * 8192, 4096))
            .await
            .expect("read hung")
            .expect("read");
        assert!(back == *d, "write {i} does not read back after the removal");
    }
    s.logout().await.unwrap();
    all_gone(&f).await;
    drop(s);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while f.fab.live_qps() > 0 || f.fab.live_regions() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "held after logout: {} queue pairs, {} regions",
            f.fab.live_qps(),
            f.fab.live_regions()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
