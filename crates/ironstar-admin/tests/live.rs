//! End to end: iscsitd started from a temporary config and socket, driven
//! with itadm/stmfadm, checked with libiscsi's tools (iscsi-ls, iscsi-inq,
//! iscsi-readcapacity16; skipped when they are not installed): new targets,
//! LUs and views appear without a restart, masking hides an LU from another
//! initiator, and the configuration survives a SIGKILL and restart.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.dev.ironstar:live0";
const INI_A: &str = "iqn.1994-05.com.example:alpha";
const INI_B: &str = "iqn.1994-05.com.example:beta";

fn bin(name: &str) -> PathBuf {
    match name {
        "itadm" => PathBuf::from(env!("CARGO_BIN_EXE_itadm")),
        "stmfadm" => PathBuf::from(env!("CARGO_BIN_EXE_stmfadm")),
        _ => {
            // The daemon is another package: build it (once) so the test
            // never runs a stale binary.
            static BUILT: std::sync::Once = std::sync::Once::new();
            BUILT.call_once(|| {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let ok = Command::new(cargo)
                    .args(["build", "-p", "iscsitd"])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "cannot build iscsitd");
            });
            Path::new(env!("CARGO_BIN_EXE_itadm")).with_file_name(name)
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Daemon {
    let sock = dir.join("s.sock");
    let child = Command::new(bin("iscsitd"))
        .arg("--config")
        .arg(dir.join("iscsitd.toml"))
        .arg("--socket")
        .arg(&sock)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "iscsitd did not open its socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon { child, sock }
}

fn admin(d: &Daemon, tool: &str, args: &[&str]) -> String {
    let out = run(d, tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(d: &Daemon, tool: &str, args: &[&str]) -> Output {
    Command::new(bin(tool))
        .arg("--socket")
        .arg(&d.sock)
        .args(args)
        .output()
        .unwrap()
}

fn iscsi(tool: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("20")
        .arg(tool)
        .args(args)
        .output()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ironstar-admin-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ls(portal: &str, initiator: &str) -> String {
    let out = iscsi(
        "iscsi-ls",
        &["-s", "-i", initiator, &format!("iscsi://{portal}")],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn targets_lus_and_views_go_live_masking_holds_and_config_survives_restart() {
    if !have("iscsi-ls") {
        eprintln!("skipped: libiscsi-bin (iscsi-ls) is not installed");
        return;
    }
    let dir = tmpdir("live");
    let port = free_port();
    let portal = format!("127.0.0.1:{port}");
    std::fs::write(dir.join("iscsitd.toml"), "").unwrap();
    let d = start(&dir);
    // A portal group and a target, live.
    admin(&d, "itadm", &["create-tpg", "1", &portal]);
    admin(&d, "itadm", &["create-target", "-n", TARGET, "-t", "1"]);
    assert!(ls(&portal, INI_A).contains(TARGET));
    // Two LUs: "secret" only for host group hga at LUN 0, a file LU for all at LUN 1.
    let img = dir.join("shared.img");
    admin(
        &d,
        "stmfadm",
        &["create-lu", "-s", "16M", "-p", "alias=secret", "memory"],
    );
    admin(
        &d,
        "stmfadm",
        &[
            "create-lu",
            "-s",
            "8M",
            "-p",
            "alias=shared",
            img.to_str().unwrap(),
        ],
    );
    admin(&d, "stmfadm", &["create-hg", "hga"]);
    admin(&d, "stmfadm", &["add-hg-member", "-g", "hga", INI_A]);
    admin(
        &d,
        "stmfadm",
        &["add-view", "-h", "hga", "-n", "0", "secret"],
    );
    admin(&d, "stmfadm", &["add-view", "-n", "1", "shared"]);
    let a = ls(&portal, INI_A);
    let b = ls(&portal, INI_B);
    assert!(
        a.contains("Lun:0") && a.contains("Lun:1"),
        "alpha sees both:\n{a}"
    );
    assert!(
        !b.contains("Lun:0") && b.contains("Lun:1"),
        "beta sees LUN 1 only:\n{b}"
    );
    let url0 = format!("iscsi://{portal}/{TARGET}/0");
    assert!(!iscsi("iscsi-inq", &["-i", INI_B, &url0]).status.success());
    assert!(iscsi("iscsi-inq", &["-i", INI_A, &url0]).status.success());
    // Grow online.
    admin(&d, "stmfadm", &["modify-lu", "-s", "32M", "secret"]);
    let cap = iscsi("iscsi-readcapacity16", &["-i", INI_A, &url0]);
    let cap = String::from_utf8_lossy(&cap.stdout).into_owned();
    assert!(
        cap.contains(&format!("{}", 32 * 2048 - 1)) || cap.contains("65536"),
        "{cap}"
    );
    // Tables and JSON.
    let lt = admin(&d, "itadm", &["list-target", "-v"]);
    assert!(lt.contains(TARGET) && lt.contains("SESSIONS"), "{lt}");
    let lv = admin(&d, "stmfadm", &["--json", "list-view", "-l", "secret"]);
    assert!(lv.contains("\"hga\""), "{lv}");
    // Bad input: refused, readable, non-zero, nothing changes.
    for (tool, args) in [
        ("itadm", vec!["create-target", "-n", "not a name"]),
        ("itadm", vec!["create-target", "-n", TARGET]),
        ("stmfadm", vec!["add-view", "-n", "1", "secret"]),
        ("stmfadm", vec!["create-lu", "-s", "12 parsecs", "memory"]),
        ("stmfadm", vec!["modify-lu", "-s", "1M", "secret"]),
    ] {
        let out = run(&d, tool, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tool} {args:?} succeeded");
        assert!(
            err.starts_with(&format!("{tool}: ")) && !err.contains("panicked"),
            "{err}"
        );
    }
    // Malformed JSON-RPC gets an error answer; the daemon carries on.
    let s = UnixStream::connect(&d.sock).unwrap();
    (&s).write_all(
        b"{not json\n[]\n{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"list-lu\",\"params\":5}\n",
    )
    .unwrap();
    let mut r = BufReader::new(&s);
    for want in ["-32700", "-32600", "-32602"] {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(want), "{line}");
    }
    // SIGKILL and restart: the configuration is what it was.
    let before = std::fs::read_to_string(dir.join("iscsitd.toml")).unwrap();
    drop(d);
    let check = Command::new(bin("iscsitd"))
        .arg("--check")
        .arg(dir.join("iscsitd.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let d = start(&dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("iscsitd.toml")).unwrap(),
        before
    );
    let a = ls(&portal, INI_A);
    let b = ls(&portal, INI_B);
    assert!(
        a.contains("Lun:0") && a.contains("Lun:1"),
        "after restart:\n{a}"
    );
    assert!(!b.contains("Lun:0"), "after restart:\n{b}");
    // Delete the target (no session left open): it is gone from discovery.
    admin(&d, "itadm", &["delete-target", TARGET]);
    assert!(!ls(&portal, INI_A).contains(TARGET));
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_sample_config_and_unit_file_ship_and_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sample = root.join("packaging/iscsitd.toml");
    assert!(root.join("packaging/iscsitd.service").exists());
    let out = Command::new(bin("iscsitd"))
        .arg("--check")
        .arg(&sample)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}
