//! CHAP secrets never leave the daemon except where they must: not in its log (at trace
//! level, through good and failed logins), not in any `itadm` / `stmfadm` listing (plain or
//! `--json`), not in error messages. Listings say whether a secret is set.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ironstar_interop::command::{run, Outcome};
use ironstar_interop::config::Config;
use ironstar_interop::daemon::{binary, Daemon};
use ironstar_interop::{peers, INITIATOR_IQN};

const SECRET: &str = "Kq7-zz-secret-0001";
const TARGET_SECRET: &str = "Tq9-zz-secret-0002";
const OTHER_SECRET: &str = "Wq3-zz-secret-0003";

fn tool(name: &str) -> PathBuf {
    binary().with_file_name(name)
}

fn admin(d: &Daemon, name: &str, args: &[&str]) -> Outcome {
    run(
        Command::new(tool(name))
            .arg("--socket")
            .arg(d.scratch().join("iscsitd.sock"))
            .args(args),
        Duration::from_secs(30),
    )
}

#[test]
fn secrets_stay_out_of_logs_listings_and_errors() {
    if !peers::require(&["iscsi-inq"]) {
        return;
    }
    // Trace level: the most the daemon ever logs.
    std::env::set_var("RUST_LOG", "trace");
    let d = Daemon::start(&Config::single_memory_lu(16 << 20).with_chap("client", SECRET));
    let secret_file = d.scratch().join("tsecret");
    fs::write(&secret_file, format!("{TARGET_SECRET}\n")).unwrap();
    let other_file = d.scratch().join("osecret");
    fs::write(&other_file, format!("{OTHER_SECRET}\n")).unwrap();
    let target = ironstar_interop::TARGET_IQN;

    let mut seen = String::new();
    let mut must = |o: Outcome| {
        assert!(o.success(), "{o}");
        seen.push_str(&o.to_string());
    };
    must(admin(
        &d,
        "itadm",
        &[
            "modify-target",
            "-u",
            "tgt",
            "-S",
            secret_file.to_str().unwrap(),
            target,
        ],
    ));
    must(admin(
        &d,
        "itadm",
        &[
            "create-initiator",
            "-u",
            "other",
            "-S",
            other_file.to_str().unwrap(),
            "iqn.2026-11.dev.ironstar:other",
        ],
    ));
    for args in [
        vec!["list-initiator", "-v"],
        vec!["--json", "list-initiator", "-v"],
        vec!["list-target", "-v"],
        vec!["--json", "list-target", "-v"],
        vec!["list-defaults"],
        vec!["list-session", "-v"],
        vec!["--json", "inspect"],
    ] {
        let o = admin(&d, "itadm", &args);
        assert!(o.success(), "{o}");
        seen.push_str(&o.to_string());
    }
    let listing = admin(&d, "itadm", &["list-initiator", "-v"]).to_string();
    assert!(
        listing.to_ascii_lowercase().contains("set"),
        "list-initiator -v does not say whether a secret is set:\n{listing}"
    );
    // Refused changes: a too-short secret, an unknown initiator.
    let short = d.scratch().join("short");
    fs::write(&short, "short\n").unwrap();
    let o = admin(
        &d,
        "itadm",
        &[
            "modify-initiator",
            "-S",
            short.to_str().unwrap(),
            INITIATOR_IQN,
        ],
    );
    assert!(!o.success(), "a 5-character secret was accepted");
    seen.push_str(&o.to_string());
    assert!(
        !o.to_string().contains("short\n"),
        "the refused secret is echoed: {o}"
    );

    // Logins: the right secret, a wrong one.
    let good = run(
        Command::new("iscsi-inq")
            .args(["-i", INITIATOR_IQN])
            .arg(d.lun_url_chap("client", SECRET, 0)),
        Duration::from_secs(30),
    );
    assert!(good.success(), "CHAP login failed: {good}");
    let bad = run(
        Command::new("iscsi-inq")
            .args(["-i", INITIATOR_IQN])
            .arg(d.lun_url_chap("client", "Xq1-wrong-secret-99", 0)),
        Duration::from_secs(30),
    );
    assert!(!bad.success(), "a wrong secret logged in");

    let log = d.log();
    assert!(log.len() > 1000, "the trace log is suspiciously short");
    for s in [SECRET, TARGET_SECRET, OTHER_SECRET] {
        assert!(!log.contains(s), "a CHAP secret is in the daemon's log");
        assert!(!seen.contains(s), "a CHAP secret is in the tools' output");
    }
}

/// The RPC socket answers root (and the daemon's own user) only: even with the socket and
/// its directory opened to everyone by a mistaken chmod, another user's `itadm` gets a
/// readable refusal and changes nothing.
#[test]
fn the_admin_socket_refuses_other_users_even_when_chmodded_open() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || peers::which("setpriv").is_none() {
        assert!(!peers::strict(), "this test needs root and setpriv");
        println!("skipped: needs root and setpriv");
        return;
    }
    let d = Daemon::start(&Config::single_memory_lu(16 << 20));
    let sock = d.scratch().join("iscsitd.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "no admin socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in [d.scratch().to_path_buf(), sock.clone()] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let config_before = admin(&d, "itadm", &["--json", "list-target"]).stdout;
    let o = run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(tool("itadm"))
            .arg("--socket")
            .arg(&sock)
            .args(["create-tpg", "9", "127.0.0.1:3299"]),
        Duration::from_secs(30),
    );
    println!("{o}");
    assert!(!o.success(), "uid 65534 administered the daemon");
    assert!(
        o.stderr.contains("may not administer"),
        "the refusal is not readable: {o}"
    );
    let o = admin(&d, "itadm", &["--json", "list-target"]);
    assert!(o.success());
    assert_eq!(o.stdout, config_before, "the refused change took effect");
    assert!(!admin(&d, "itadm", &["list-tpg"]).stdout.contains("3299"));
}
