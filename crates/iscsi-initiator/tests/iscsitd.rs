//! The initiator against our own daemon, when a release `iscsitd` is at hand
//! (`$IRONSTAR_ISCSITD`, else `target/release/iscsitd` of the workspace).
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

struct Daemon {
    child: Child,
    port: u16,
    dir: PathBuf,
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
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/iscsitd")
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
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "iscsitd did not listen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
