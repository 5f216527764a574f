//! The initiator against our own daemon, when a release `iscsitd` is at hand
//! (`$IRONSTAR_ISCSITD`, else `release/iscsitd` under `$CARGO_TARGET_DIR` or the
//! workspace's `target/`).
//! tgt (tests/tgt.rs) is the proof; this one skips, saying so, without a
//! daemon, unless `IRONSTAR_REQUIRE_PEERS=1` or `CI=true`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::random_bytes;
use iscsi_initiator::discovery::discover;
use iscsi_initiator::login::{Auth, ChapCredentials};
use iscsi_initiator::portal::Portal;
use iscsi_initiator::{Session, SessionOptions};

const INITIATOR: &str = "iqn.2026-11.dev.ironstar.test:initiator";
const PLAIN: &str = "iqn.2026-11.dev.ironstar:target0";
const CHAP: &str = "iqn.2026-11.dev.ironstar:chap0";
const FILE: &str = "iqn.2026-11.dev.ironstar:file0";
const FILE_LU_BYTES: u64 = 64 << 20;

struct Daemon {
    child: Child,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    cfg: PathBuf,
}

impl Daemon {
    fn spawn(bin: &PathBuf, cfg: &PathBuf) -> Child {
        Command::new(bin)
            .arg("--config")
            .arg(cfg)
            .arg("--socket")
            .arg(cfg.with_extension("sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "iscsitd did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the daemon (SIGKILL: no logout, no goodbye) and starts it again
    /// with the same configuration on the same port.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.bin, &self.cfg);
        self.wait_listening();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn strict() -> bool {
    ["CI", "IRONSTAR_REQUIRE_PEERS"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes")))
}

fn start() -> Option<Daemon> {
    let bin = std::env::var_os("IRONSTAR_ISCSITD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
                .join("release/iscsitd")
        });
    if !bin.is_file() {
        let msg = format!(
            "no iscsitd at {} (cargo build --release --bin iscsitd, or set IRONSTAR_ISCSITD)",
            bin.display()
        );
        assert!(!strict(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let dir = std::env::temp_dir().join(format!("ini-iscsitd-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lu = dir.join("file-lu.img");
    std::fs::File::create(&lu)
        .unwrap()
        .set_len(FILE_LU_BYTES)
        .unwrap();
    let lu = lu.display();
    let cfg = format!(
        r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:{port}", "[::1]:{port}"]

[[target]]
iqn = "{PLAIN}"
portal_groups = [1]
auth = "none"

[[target.lun]]
lun = 0
backend = "memory"
size = "64MiB"
block_size = 512

[[target]]
iqn = "{FILE}"
portal_groups = [1]
auth = "none"

[[target.lun]]
lun = 0
backend = "file"
path = "{lu}"
block_size = 512

[[target]]
iqn = "{CHAP}"
portal_groups = [1]
auth = "chap"
chap_user = "target0"
chap_secret = "targetsecret12"

[[target.lun]]
lun = 0
backend = "memory"
size = "16MiB"
block_size = 4096

[[initiator]]
name = "{INITIATOR}"
chap_user = "client"
chap_secret = "clientsecret12"

[discovery]
auth = "none"
"#
    );
    let cfg_path = dir.join("iscsitd.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let child = Daemon::spawn(&bin, &cfg_path);
    let d = Daemon {
        child,
        port,
        dir,
        bin,
        cfg: cfg_path,
    };
    d.wait_listening();
    Some(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_login_round_trip_and_chap_against_iscsitd() {
    let Some(d) = start() else { return };
    let v4 = Portal::new("127.0.0.1", d.port);
    let found = discover(&v4, INITIATOR, Auth::None, Duration::from_secs(10))
        .await
        .unwrap();
    let plain = found.iter().find(|t| t.name == PLAIN).unwrap();
    assert!(
        plain.portals.iter().any(|(p, _)| p.host == "::1"),
        "{plain:?}"
    );

    // IPv6 portal, digests on, a verified 16 MiB round trip.
    let mut o = SessionOptions::new(INITIATOR);
    o.header_digest = true;
    o.data_digest = true;
    let s = Session::login(&Portal::new("::1", d.port), PLAIN, o)
        .await
        .unwrap();
    let lun = s.lun(0);
    assert_eq!(lun.read_capacity().await.unwrap().bytes(), 64 << 20);
    let data = Bytes::from(random_bytes(16 << 20, 7));
    lun.write(0, data.clone()).await.unwrap();
    assert!(lun.read(0, 32768).await.unwrap() == data);
    s.logout().await.unwrap();

    // Mutual CHAP with a SHA-256 preference.
    let mut o = SessionOptions::new(INITIATOR);
    o.auth = Auth::Chap(
        ChapCredentials::new("client", "clientsecret12")
            .with_mutual("target0", "targetsecret12")
            .with_algorithms(vec![
                iscsi_proto::chap::ChapAlgorithm::Sha256,
                iscsi_proto::chap::ChapAlgorithm::Md5,
            ]),
    );
    let s = Session::login(&v4, CHAP, o).await.unwrap();
    assert_eq!(s.lun(0).read_capacity().await.unwrap().block_size, 4096);
    s.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_mid_write_reconnects_and_the_copy_completes() {
    let Some(mut d) = start() else { return };
    let v4 = Portal::new("127.0.0.1", d.port);
    let mut o = SessionOptions::new(INITIATOR);
    o.replacement_timeout = Duration::from_secs(20);
    o.command_timeout = Duration::from_secs(10);
    o.max_io_bytes = 256 << 10;
    o.io_depth = 4;
    let s = Session::login(&v4, FILE, o).await.unwrap();
    let tsih_before = s.tsih();
    let lun = s.lun(0);
    assert_eq!(lun.read_capacity().await.unwrap().bytes(), FILE_LU_BYTES);
    let data = Bytes::from(random_bytes(FILE_LU_BYTES as usize, 11));
    let writer = common::write_in_background(&lun, data.clone()).await;
    // Kill the daemon a quarter of the way through the copy.
    tokio::task::block_in_place(|| d.restart());
    let (outcome, passes) = writer.finish().await;
    outcome.unwrap();
    eprintln!("passes written: {passes}");
    assert!(s.reconnects() >= 1, "no reconnect happened");
    let back = lun.read(0, (FILE_LU_BYTES / 512) as u32).await.unwrap();
    assert_eq!(common::checksum(&back), common::checksum(&data));
    eprintln!(
        "reconnects: {}, TSIH {tsih_before} -> {}",
        s.reconnects(),
        s.tsih()
    );
    s.logout().await.unwrap();
}

/// Two daemons serve the same file LU on two portals, as two gateways of one
/// LU would. A session logged in through A, with B as its other path, is
/// writing when A is killed for good: the session moves to B by itself, the
/// write completes, and what it wrote is all there. A later login naming A
/// first gets B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_its_other_path_when_its_portal_dies() {
    let Some(mut a) = start() else { return };
    let port_b = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let cfg_b = a.dir.join("iscsitd-b.toml");
    let cfg = std::fs::read_to_string(&a.cfg).unwrap();
    std::fs::write(
        &cfg_b,
        cfg.replace(&format!(":{}\"", a.port), &format!(":{port_b}\"")),
    )
    .unwrap();
    let b = Daemon {
        child: Daemon::spawn(&a.bin, &cfg_b),
        port: port_b,
        dir: a.dir.clone(),
        bin: a.bin.clone(),
        cfg: cfg_b,
    };
    b.wait_listening();
    let (pa, pb) = (
        Portal::new("127.0.0.1", a.port),
        Portal::new("127.0.0.1", b.port),
    );
    let mut o = SessionOptions::new(INITIATOR);
    o.replacement_timeout = Duration::from_secs(20);
    o.command_timeout = Duration::from_secs(10);
    o.max_io_bytes = 256 << 10;
    o.io_depth = 4;
    o.other_portals = vec![pb.clone()];
    let s = Session::login(&pa, FILE, o.clone()).await.unwrap();
    assert_eq!(s.portal(), pa);
    let lun = s.lun(0);
    let data = Bytes::from(random_bytes(FILE_LU_BYTES as usize, 23));
    let writer = common::write_in_background(&lun, data.clone()).await;
    // A goes for good, a quarter of the way through the first pass.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let (outcome, passes) = writer.finish().await;
    outcome.unwrap();
    assert!(s.reconnects() >= 1, "no reconnect happened");
    assert_eq!(s.portal(), pb, "the session is not on the other path");
    let back = lun.read(0, (FILE_LU_BYTES / 512) as u32).await.unwrap();
    assert_eq!(common::checksum(&back), common::checksum(&data));
    eprintln!("passes written: {passes}, now through {}", s.portal());
    s.logout().await.unwrap();
    // A is still gone: a login that names it first gets B.
    let s = Session::login(&pa, FILE, o).await.unwrap();
    assert_eq!(s.portal(), pb);
    s.logout().await.unwrap();
    // Without the other path the same login fails.
    let mut alone = SessionOptions::new(INITIATOR);
    alone.login_timeout = Duration::from_secs(5);
    assert!(Session::login(&pa, FILE, alone).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_gives_up_with_a_clear_error_when_the_target_stays_away() {
    let Some(mut d) = start() else { return };
    let v4 = Portal::new("127.0.0.1", d.port);
    let mut o = SessionOptions::new(INITIATOR);
    o.replacement_timeout = Duration::from_secs(2);
    let s = Session::login(&v4, PLAIN, o).await.unwrap();
    let lun = s.lun(0);
    lun.read_capacity().await.unwrap();
    let _ = d.child.kill();
    let _ = d.child.wait();
    let started = Instant::now();
    let e = lun.read(0, 8).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15), "{e}");
    assert!(e.to_string().contains("could not be reinstated"), "{e}");
    d.restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_connections_share_one_session_and_all_carry_commands() {
    let Some(d) = start() else { return };
    let v4 = Portal::new("127.0.0.1", d.port);
    let mut o = SessionOptions::new(INITIATOR);
    o.connections = 4;
    o.max_io_bytes = 128 << 10;
    o.io_depth = 16;
    let s = Session::login(&v4, PLAIN, o).await.unwrap();
    assert!(s.params().max_connections >= 4, "{:?}", s.params());
    let conns = s.connection_commands();
    assert_eq!(conns.len(), 4, "{conns:?}");
    let lun = s.lun(0);
    let data = Bytes::from(random_bytes(32 << 20, 5));
    lun.write(0, data.clone()).await.unwrap();
    let back = lun.read(0, (32 << 20) / 512).await.unwrap();
    assert_eq!(common::checksum(&back), common::checksum(&data));
    let conns = s.connection_commands();
    eprintln!("commands per connection (CID, count): {conns:?}");
    assert!(conns.iter().all(|(_, n)| *n > 0), "{conns:?}");
    s.logout().await.unwrap();
}

/// One of four connections is killed (`ss -K` on our side of it) in the
/// middle of a long write: only that connection is reinstated (same ISID,
/// TSIH and CID), its unfinished commands are reissued on the live ones,
/// the session itself is not reinstated, and the copy completes intact
/// with four connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_killed_connection_mid_write_is_reinstated_alone() {
    let Some(d) = start() else { return };
    let v4 = Portal::new("127.0.0.1", d.port);
    let mut o = SessionOptions::new(INITIATOR);
    o.connections = 4;
    o.replacement_timeout = Duration::from_secs(20);
    o.max_io_bytes = 128 << 10;
    o.io_depth = 16;
    let s = Session::login(&v4, FILE, o).await.unwrap();
    assert_eq!(s.connection_commands().len(), 4);
    let tsih = s.tsih();
    let lun = s.lun(0);
    let len = FILE_LU_BYTES as usize;
    let data = Bytes::from(random_bytes(len, 13));
    let writer = common::write_in_background(&lun, data.clone()).await;
    // Our side of one connection: its local port is the target's peer port.
    let listing = Command::new("ss")
        .args([
            "-t",
            "-n",
            "-H",
            "state",
            "established",
            &format!("dport = :{}", d.port),
        ])
        .output()
        .unwrap();
    let first = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .find_map(|local| local.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()))
        .expect("an established connection");
    let killed = Command::new("ss")
        .args(["-K", "-t", &format!("sport = :{first}")])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{killed:?}");
    assert!(!writer.is_finished(), "the write failed before the kill");
    let (outcome, passes) = writer.finish().await;
    outcome.unwrap();
    eprintln!("passes written: {passes}");
    let alive = wait_for_connections(&s, 4).await;
    assert_eq!(s.connection_reinstatements(), 1, "{alive:?}");
    assert_eq!(s.reconnects(), 0, "the session was reinstated");
    assert_eq!(s.tsih(), tsih);
    let mut cids: Vec<u16> = alive.iter().map(|(cid, _)| *cid).collect();
    cids.sort_unstable();
    assert_eq!(cids, [0, 1, 2, 3]);
    let back = lun.read(0, (len / 512) as u32).await.unwrap();
    assert_eq!(common::checksum(&back), common::checksum(&data));
    // Not asserted: now and then the kill lands between two 1 MiB writes,
    // when the connection carries nothing (usually it carries two).
    eprintln!(
        "connection reinstatements: {}, session reinstatements: {}, TSIH {tsih}, \
         commands reissued: {}, commands per connection (CID, count): {:?}",
        s.connection_reinstatements(),
        s.reconnects(),
        s.reissued_commands(),
        s.connection_commands()
    );
    s.logout().await.unwrap();
}

/// A restarted daemon has forgotten the session, so no connection can be
/// reinstated into it: a four-connection session falls back to session
/// reinstatement, comes back with four connections, and the copy
/// completes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcs_daemon_restart_mid_write_falls_back_to_session_reinstatement() {
    let Some(mut d) = start() else { return };
    let v4 = Portal::new("127.0.0.1", d.port);
    let mut o = SessionOptions::new(INITIATOR);
    o.connections = 4;
    o.replacement_timeout = Duration::from_secs(20);
    o.command_timeout = Duration::from_secs(10);
    o.max_io_bytes = 256 << 10;
    o.io_depth = 8;
    let s = Session::login(&v4, FILE, o).await.unwrap();
    assert_eq!(s.connection_commands().len(), 4);
    let tsih_before = s.tsih();
    let lun = s.lun(0);
    let data = Bytes::from(random_bytes(FILE_LU_BYTES as usize, 19));
    let writer = common::write_in_background(&lun, data.clone()).await;
    tokio::task::block_in_place(|| d.restart());
    let (outcome, passes) = writer.finish().await;
    outcome.unwrap();
    eprintln!("passes written: {passes}");
    assert!(s.reconnects() >= 1, "no session reinstatement happened");
    wait_for_connections(&s, 4).await;
    let back = lun.read(0, (FILE_LU_BYTES / 512) as u32).await.unwrap();
    assert_eq!(common::checksum(&back), common::checksum(&data));
    eprintln!(
        "session reinstatements: {}, connection reinstatements: {}, commands reissued: {}, \
         TSIH {tsih_before} -> {}",
        s.reconnects(),
        s.connection_reinstatements(),
        s.reissued_commands(),
        s.tsih()
    );
    s.logout().await.unwrap();
}

/// The session's live connections once there are `n` of them (a
/// reinstated connection may log in after the I/O that needed it is done).
async fn wait_for_connections(s: &Session, n: usize) -> Vec<(u16, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive = s.connection_commands();
        if alive.len() == n || Instant::now() > deadline {
            assert_eq!(alive.len(), n, "{alive:?}");
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The CLI against our daemon: a 32 MiB `dd` round trip over four
/// connections, a short `bench` over four connections, and the NBD export
/// through qemu-img.
#[test]
fn cli_dd_bench_and_nbd_over_four_connections() {
    let Some(d) = start() else { return };
    let url = format!("iscsi://127.0.0.1:{}/{PLAIN}/0", d.port);
    let bin = env!("CARGO_BIN_EXE_iscsi");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(["--initiator-name", INITIATOR, "--connections", "4"])
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iscsi {args:?}: {text}");
        text
    };
    let src = d.dir.join("src.bin");
    let dst = d.dir.join("dst.bin");
    std::fs::write(&src, random_bytes(32 << 20, 17)).unwrap();
    run(&["dd", "--if", src.to_str().unwrap(), "--of", &url]);
    run(&[
        "dd",
        "--if",
        &url,
        "--of",
        dst.to_str().unwrap(),
        "--count",
        "4",
    ]);
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(common::checksum(&a), common::checksum(&b));

    let bench = run(&["bench", &url, "--qd", "32", "--duration", "2"]);
    assert!(bench.contains("connections=4"), "{bench}");

    let sock = d.dir.join("nbd.sock");
    let mut server = Command::new(bin)
        .args(["--initiator-name", INITIATOR, "nbd", &url, "--socket"])
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no NBD socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let nbd = format!("nbd+unix:///?socket={}", sock.display());
    let back = d.dir.join("back.bin");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &nbd])
        .arg(&back)
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = std::fs::read(&back).unwrap();
    assert_eq!(whole.len(), 64 << 20);
    assert_eq!(common::checksum(&whole[..32 << 20]), common::checksum(&a));
}
