//! iSNS interop: the real `isnsd` (open-isns) on loopback, iscsitd pointed at it with
//! `itadm modify-defaults`, and open-isns's own `isnsadm` asked what the server holds: our
//! entity, targets (with alias and node type), portals and portal groups; a target created
//! live appears, a deleted one disappears, and a daemon stopped with SIGTERM deregisters.
//!
//! `isnsd` always listens on port 3205 on every address (PEERS.md), so this test owns that
//! port while it runs; if something else holds it the test says so and skips (fails in CI).

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironstar_interop::command::run;
use ironstar_interop::config::Config;
use ironstar_interop::daemon::{binary, Daemon, TempDir};
use ironstar_interop::{peers, TARGET_IQN};

const SECOND_IQN: &str = "iqn.2026-11.dev.ironstar:isns-second";

/// isnsd with a private config and database, stopped on drop.
struct Isnsd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Isnsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Isnsd {
    fn start(dir: &Path) -> Option<Isnsd> {
        if TcpStream::connect(("127.0.0.1", 3205)).is_ok() {
            let msg = "port 3205 is taken: another iSNS server runs here";
            assert!(!peers::strict(), "{msg}");
            eprintln!("skipped: {msg}");
            return None;
        }
        let db = dir.join("db");
        fs::create_dir_all(&db).unwrap();
        let conf = dir.join("isnsd.conf");
        fs::write(
            &conf,
            format!(
                "Database = {}\nSecurity = 0\nRegistrationPeriod = 10m\n\
                 DefaultDiscoveryDomain = 1\nSLPRegister = 0\nControlSocket = {}\n\
                 PIDFile = {}\n",
                db.display(),
                dir.join("control").display(),
                dir.join("isnsd.pid").display()
            ),
        )
        .unwrap();
        fs::write(
            dir.join("isnsadm.conf"),
            "ServerAddress = 127.0.0.1\nSecurity = 0\n\
             SourceName = iqn.2026-11.dev.ironstar:isnsadm\n",
        )
        .unwrap();
        let log = fs::File::create(dir.join("isnsd.log")).unwrap();
        let child = Command::new(peers::which("isnsd").unwrap())
            .args(["-f", "-4", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let s = Isnsd {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", 3205)).is_err() {
            assert!(Instant::now() < deadline, "isnsd did not listen on 3205");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(s)
    }

    /// `isnsadm --list WHAT` as text.
    fn list(&self, what: &str) -> String {
        let out = run(
            Command::new(peers::which("isnsadm").unwrap())
                .arg("-c")
                .arg(self.dir.join("isnsadm.conf"))
                .args(["--list", what]),
            Duration::from_secs(20),
        );
        out.stdout
    }

    /// Waits until `isnsadm --list WHAT` satisfies `ok`; returns the last listing.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let l = self.list(what);
            if ok(&l) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(l);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn itadm(sock: &Path, args: &[&str]) -> String {
    let bin = binary().with_file_name("itadm");
    assert!(bin.is_file(), "{} not built", bin.display());
    let out = run(
        Command::new(bin).arg("--socket").arg(sock).args(args),
        Duration::from_secs(20),
    );
    out.assert_success();
    out.stdout
}

fn named(iqn: &str) -> String {
    format!("iSCSI name = \"{iqn}\"")
}

#[test]
fn targets_and_portals_are_registered_followed_and_deregistered_with_isnsd() {
    if !peers::require(&["isnsd", "isnsadm"]) {
        return;
    }
    let tmp = TempDir::new("ironstar-isns").unwrap();
    let Some(isnsd) = Isnsd::start(tmp.path()) else {
        return;
    };
    let mut d = Daemon::start(&Config::single_memory_lu(ironstar_interop::MIB * 8));
    let sock = d.scratch().join("iscsitd.sock");
    // Off by default: nothing registered.
    std::thread::sleep(Duration::from_millis(600));
    assert!(!isnsd.list("nodes").contains(TARGET_IQN));

    itadm(
        &sock,
        &[
            "modify-defaults",
            "-i",
            "enable",
            "--isns-server",
            "127.0.0.1",
        ],
    );
    let nodes = isnsd
        .wait_for("nodes", |l| l.contains(&named(TARGET_IQN)))
        .unwrap_or_else(|l| panic!("target not registered:\n{l}\n{}", d.log_tail()));
    assert!(nodes.contains("iSCSI node type = Target"), "{nodes}");
    let defaults = itadm(&sock, &["list-defaults"]);
    assert!(
        defaults.contains("127.0.0.1: registered: 1 target(s), 1 portal(s)"),
        "{defaults}"
    );
    let port = d.port().to_string();
    let portals = isnsd.list("portals");
    assert!(
        portals.contains("Portal IP address = 127.0.0.1")
            && portals.contains(&format!("Portal TCP/UDP port = {port}/tcp")),
        "{portals}"
    );
    let pgs = isnsd.list("portal-groups");
    assert!(
        pgs.contains(&format!("Portal group name = \"{TARGET_IQN}\""))
            && pgs.contains(&format!("Portal group port = {port}/tcp"))
            && pgs.contains("Portal group tag = 1"),
        "{pgs}"
    );

    // A target created live appears, with its alias.
    itadm(
        &sock,
        &["create-target", "-n", SECOND_IQN, "-t", "1", "-l", "second"],
    );
    let nodes = isnsd
        .wait_for("nodes", |l| l.contains(&named(SECOND_IQN)))
        .unwrap_or_else(|l| panic!("new target not registered:\n{l}"));
    assert!(nodes.contains("iSCSI alias = \"second\""), "{nodes}");
    assert!(nodes.contains(&named(TARGET_IQN)), "{nodes}");

    // A deleted target disappears; the other stays.
    itadm(&sock, &["delete-target", SECOND_IQN]);
    let nodes = isnsd
        .wait_for("nodes", |l| !l.contains(&named(SECOND_IQN)))
        .unwrap_or_else(|l| panic!("deleted target still registered:\n{l}"));
    assert!(nodes.contains(&named(TARGET_IQN)), "{nodes}");

    // Off, and on again at once: the late deregistration of the old
    // worker must not undo the new registration.
    itadm(&sock, &["modify-defaults", "-i", "disable"]);
    std::thread::sleep(Duration::from_millis(300));
    itadm(&sock, &["modify-defaults", "-i", "enable"]);
    std::thread::sleep(Duration::from_millis(1500));
    let nodes = isnsd.list("nodes");
    assert!(nodes.contains(&named(TARGET_IQN)), "{nodes}");

    // A clean stop deregisters the whole entity.
    let pid = d.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let gone = isnsd.wait_for("nodes", |l| !l.contains(&named(TARGET_IQN)));
    assert!(gone.is_ok(), "still registered after SIGTERM:\n{gone:?}");
    assert!(
        !isnsd.list("entities").contains("iscsitd:"),
        "entity left behind"
    );
    d.kill();
}

#[test]
fn an_absent_isns_server_neither_blocks_admin_nor_data() {
    // Port 9 (discard) on loopback: nothing listens, connects are refused at once; the
    // client backs off. Admin calls and discovery go on as usual.
    if !peers::require(&["iscsi-ls"]) {
        return;
    }
    let d = Daemon::start(&Config::single_memory_lu(ironstar_interop::MIB * 8));
    let sock = d.scratch().join("iscsitd.sock");
    itadm(
        &sock,
        &[
            "modify-defaults",
            "-i",
            "enable",
            "--isns-server",
            "127.0.0.1:9,192.0.2.1",
        ],
    );
    let t0 = Instant::now();
    for _ in 0..5 {
        itadm(&sock, &["list-target"]);
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let ls = run(
        Command::new("iscsi-ls").args(["-s", &d.portal_url()]),
        Duration::from_secs(20),
    );
    ls.assert_success();
    assert!(ls.stdout.contains(TARGET_IQN), "{}", ls.stdout);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d.log().contains("iSNS: server unreachable"),
        "{}",
        d.log_tail()
    );
    let defaults = itadm(&sock, &["list-defaults"]);
    assert!(
        defaults.contains("127.0.0.1:9: not registered: connect"),
        "{defaults}"
    );
}
