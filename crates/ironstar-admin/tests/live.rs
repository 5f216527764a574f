//! End to end: iscsitd started from a temporary config and socket, driven
//! with itadm/stmfadm, checked with libiscsi's tools (iscsi-ls, iscsi-inq,
//! iscsi-readcapacity16; skipped when they are not installed): new targets,
//! LUs and views appear without a restart, masking hides an LU from another
//! initiator, and the configuration survives a SIGKILL and restart.

mod common;

use std::path::Path;

use common::*;

const TARGET: &str = "iqn.2026-11.dev.ironstar:live0";
const INI_A: &str = "iqn.1994-05.com.example:alpha";
const INI_B: &str = "iqn.1994-05.com.example:beta";

/// What `iscsi-ls -s` shows `initiator` (empty when it failed).
fn listing(portal: &str, initiator: &str) -> String {
    String::from_utf8_lossy(&ls(portal, initiator, &[]).stdout).into_owned()
}

#[test]
fn targets_lus_and_views_go_live_masking_holds_and_config_survives_restart() {
    if !require(&["iscsi-ls"]) {
        return;
    }
    let dir = tmpdir("live");
    let port = free_port();
    let portal = format!("127.0.0.1:{port}");
    std::fs::write(dir.join("iscsitd.toml"), "").unwrap();
    let d = Daemon::start(&dir);
    // A portal group and a target, live.
    d.admin("itadm", &["create-tpg", "1", &portal]);
    d.admin("itadm", &["create-target", "-n", TARGET, "-t", "1"]);
    assert!(listing(&portal, INI_A).contains(TARGET));
    // Two LUs: "secret" only for host group hga at LUN 0, a file LU for all at LUN 1.
    let img = dir.join("shared.img");
    d.admin(
        "stmfadm",
        &["create-lu", "-s", "16M", "-p", "alias=secret", "memory"],
    );
    d.admin(
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
    d.admin("stmfadm", &["create-hg", "hga"]);
    d.admin("stmfadm", &["add-hg-member", "-g", "hga", INI_A]);
    d.admin("stmfadm", &["add-view", "-h", "hga", "-n", "0", "secret"]);
    d.admin("stmfadm", &["add-view", "-n", "1", "shared"]);
    let a = listing(&portal, INI_A);
    let b = listing(&portal, INI_B);
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
    d.admin("stmfadm", &["modify-lu", "-s", "32M", "secret"]);
    let cap = iscsi("iscsi-readcapacity16", &["-i", INI_A, &url0]);
    let cap = String::from_utf8_lossy(&cap.stdout).into_owned();
    assert!(
        cap.contains(&format!("{}", 32 * 2048 - 1)) || cap.contains("65536"),
        "{cap}"
    );
    // Tables and JSON.
    let lt = d.admin("itadm", &["list-target", "-v"]);
    assert!(lt.contains(TARGET) && lt.contains("SESSIONS"), "{lt}");
    let lv = d.admin("stmfadm", &["--json", "list-view", "-l", "secret"]);
    assert!(lv.contains("\"hga\""), "{lv}");
    // Bad input: refused, readable, non-zero, nothing changes.
    for (tool, args) in [
        ("itadm", vec!["create-target", "-n", "not a name"]),
        ("itadm", vec!["create-target", "-n", TARGET]),
        ("stmfadm", vec!["add-view", "-n", "1", "secret"]),
        ("stmfadm", vec!["create-lu", "-s", "12 parsecs", "memory"]),
        ("stmfadm", vec!["modify-lu", "-s", "1M", "secret"]),
    ] {
        let out = d.run(tool, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tool} {args:?} succeeded");
        assert!(
            err.starts_with(&format!("{tool}: ")) && !err.contains("panicked"),
            "{err}"
        );
    }
    // Malformed JSON-RPC gets an error answer; the daemon carries on.
    let answers = d.rpc_lines(
        b"{not json\n[]\n{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"list-lu\",\"params\":5}\n",
        3,
    );
    for (line, want) in answers.iter().zip(["-32700", "-32600", "-32602"]) {
        assert!(line.contains(want), "{line}");
    }
    // SIGKILL and restart: the configuration is what it was.
    let before = std::fs::read_to_string(dir.join("iscsitd.toml")).unwrap();
    drop(d);
    let check = check_config(&dir.join("iscsitd.toml"));
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let d = Daemon::start(&dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("iscsitd.toml")).unwrap(),
        before
    );
    let a = listing(&portal, INI_A);
    let b = listing(&portal, INI_B);
    assert!(
        a.contains("Lun:0") && a.contains("Lun:1"),
        "after restart:\n{a}"
    );
    assert!(!b.contains("Lun:0"), "after restart:\n{b}");
    // Delete the target (no session left open): it is gone from discovery.
    d.admin("itadm", &["delete-target", TARGET]);
    assert!(!listing(&portal, INI_A).contains(TARGET));
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_sample_config_and_unit_file_ship_and_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sample = root.join("packaging/iscsitd.toml");
    assert!(root.join("packaging/iscsitd.service").exists());
    let out = check_config(&sample);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}
