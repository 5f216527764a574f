//! Bad input, end to end: every bad CLI argument, refused change and
//! malformed JSON-RPC request gets a clear error (a non-zero exit with a
//! message naming the tool, or the JSON-RPC error code the spec gives it)
//! and changes nothing: the configuration file's bytes are the same after.
//! A missing or corrupt configuration file stops the daemon with a message
//! and is left as it was. (live.rs covers a few of these inside its
//! scenario; this is the whole list.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: &str = "iqn.2026-11.dev.ironstar:bad0";
const INI: &str = "iqn.1994-05.com.example:ini";

/// A daemon with one TPG, one target, one LU "disk" at LUN 0, a host group.
fn setup(tag: &str) -> (std::path::PathBuf, Daemon) {
    let dir = tmpdir(tag);
    std::fs::write(dir.join("iscsitd.toml"), "").unwrap();
    let d = Daemon::start(&dir);
    let portal = format!("127.0.0.1:{}", free_port());
    d.admin("itadm", &["create-tpg", "1", &portal]);
    d.admin("itadm", &["create-target", "-n", T, "-t", "1"]);
    d.admin(
        "stmfadm",
        &["create-lu", "-s", "4M", "-p", "alias=disk", "memory"],
    );
    d.admin("stmfadm", &["create-hg", "hg"]);
    d.admin("stmfadm", &["add-view", "-n", "0", "disk"]);
    (dir, d)
}

#[test]
fn bad_cli_arguments_and_refused_changes_fail_clearly_and_change_nothing() {
    let (dir, d) = setup("cli");
    let before = std::fs::read_to_string(&d.config).unwrap();
    let img = dir.join("direct.img");
    let img = img.to_str().unwrap();
    let cases: &[(&str, &[&str], &str)] = &[
        // Unknown verbs and options (clap).
        ("itadm", &["frobnicate"], "unrecognized subcommand"),
        (
            "stmfadm",
            &["create-lu", "--bogus", "memory"],
            "unexpected argument",
        ),
        // Bad iSCSI names.
        (
            "itadm",
            &["create-target", "-n", "not a name"],
            "not an iSCSI name",
        ),
        (
            "itadm",
            &["create-target", "-n", "iqn.20x6-11.dev:x"],
            "not an iSCSI name",
        ),
        (
            "stmfadm",
            &["add-hg-member", "-g", "hg", "bogus"],
            "iSCSI name",
        ),
        // Duplicates.
        ("itadm", &["create-target", "-n", T], "already exists"),
        (
            "itadm",
            &["create-tpg", "1", "127.0.0.1:1"],
            "already exists",
        ),
        ("stmfadm", &["create-hg", "hg"], "already exists"),
        ("stmfadm", &["add-view", "-n", "0", "disk"], "LUN 0"),
        // Out of range.
        (
            "stmfadm",
            &["create-lu", "-s", "12 parsecs", "memory"],
            "size",
        ),
        ("stmfadm", &["create-lu", "-s", "0", "memory"], "size"),
        (
            "stmfadm",
            &["create-lu", "-s", "99999999999T", "memory"],
            "size",
        ),
        (
            "stmfadm",
            &["create-lu", "-s", "4M", "-p", "blk=513", "memory"],
            "block_size",
        ),
        (
            "stmfadm",
            &["create-lu", "-s", "4M", "-p", "io_threads=0", img],
            "io_threads=0 is not a number 1..=1024",
        ),
        (
            "stmfadm",
            &["create-lu", "-s", "4M", "-p", "direct=maybe", img],
            "direct",
        ),
        (
            "stmfadm",
            &["create-lu", "-s", "4M", "-p", "direct=true", "memory"],
            "unknown property \"direct\"",
        ),
        ("stmfadm", &["add-view", "-n", "16384", "disk"], "LUN"),
        ("stmfadm", &["modify-lu", "-s", "1M", "disk"], "only grow"),
        ("itadm", &["create-tpg", "70000", "127.0.0.1:2"], "70000"),
        ("itadm", &["create-tpg", "2", "300.1.1.1"], "IP"),
        (
            "itadm",
            &["modify-defaults", "--isns-server", "10.0.0.1,isns server!"],
            "iSNS server",
        ),
        (
            "itadm",
            &["modify-defaults", "--isns-server", "h:70000"],
            "port",
        ),
        // Things that are not there.
        (
            "itadm",
            &["delete-target", "iqn.2026-11.dev.ironstar:none"],
            "no target",
        ),
        ("stmfadm", &["delete-lu", "nosuchlu"], "no LU"),
        (
            "stmfadm",
            &["remove-hg-member", "-g", "nohg", INI],
            "no host group",
        ),
        // Refused while in use.
        ("itadm", &["delete-tpg", "1"], "used by"),
    ];
    let mut failures = Vec::new();
    for (tool, args, says) in cases {
        let out = d.run(tool, args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let ok = !out.status.success()
            && !err.contains("panicked")
            && err.to_lowercase().contains(&says.to_lowercase())
            && (err.starts_with(&format!("{tool}: ")) || err.starts_with("error: "));
        if !ok {
            failures.push(format!(
                "{tool} {args:?}: exit {:?}, stderr {err:?} (wanted {says:?})",
                out.status.code()
            ));
        }
        assert!(
            std::fs::read_to_string(&d.config).unwrap() == before,
            "{tool} {args:?} changed the config file"
        );
    }
    assert!(
        failures.is_empty(),
        "unclear errors:\n{}",
        failures.join("\n")
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_json_rpc_gets_the_right_error_codes_and_changes_nothing() {
    let (dir, d) = setup("rpc");
    let before = std::fs::read(&d.config).unwrap();
    let cases: &[(&[u8], i64)] = &[
        (b"{not json\n", -32700),
        (b"\xff\xfe\x00\n", -32700),
        (b"[]\n", -32600),
        (b"42\n", -32600),
        (br#"{"jsonrpc":"1.0","id":1,"method":"list-lu"}"#, -32600),
        (br#"{"id":1,"method":"list-lu"}"#, -32600),
        (br#"{"jsonrpc":"2.0","id":1}"#, -32600),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":["create-hg"]}"#,
            -32600,
        ),
        (br#"{"jsonrpc":"2.0","id":1,"method":"frobnicate"}"#, -32601),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"create-hg","params":["x"]}"#,
            -32602,
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"create-hg","params":{"name":5}}"#,
            -32602,
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"create-hg","params":{}}"#,
            -32602,
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"add-view","params":{"lu":"disk","lun":-1}}"#,
            -32602,
        ),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"create-tpg","params":{"tag":1,"portals":"x"}}"#,
            -32602,
        ),
    ];
    for (line, code) in cases {
        let mut l = line.to_vec();
        if l.last() != Some(&b'\n') {
            l.push(b'\n');
        }
        let a = d.rpc_lines(&l, 1);
        let v: serde_json::Value = serde_json::from_str(&a[0])
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", a[0]));
        assert_eq!(
            v["error"]["code"].as_i64(),
            Some(*code),
            "{} -> {}",
            String::from_utf8_lossy(line),
            a[0]
        );
        assert_eq!(v["jsonrpc"], "2.0");
        assert!(
            v["error"]["message"].as_str().is_some_and(|m| m.len() > 3),
            "{v}"
        );
    }
    // A notification with a bad method gets no answer; the next line does.
    let a = d.rpc_lines(
        b"{\"jsonrpc\":\"2.0\",\"method\":\"frobnicate\"}\n{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"list-state\"}\n",
        1,
    );
    assert!(a[0].contains("\"id\":9"), "{}", a[0]);
    // A batch answers each member, errors included.
    let a = d.rpc_lines(
        b"[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"list-hg\"},7,{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"nope\"}]\n",
        1,
    );
    let v: serde_json::Value = serde_json::from_str(&a[0]).unwrap();
    let codes: Vec<Option<i64>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["error"]["code"].as_i64())
        .collect();
    assert_eq!(codes, vec![None, Some(-32600), Some(-32601)]);
    assert_eq!(std::fs::read(&d.config).unwrap(), before);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn huge_lines_many_requests_and_silent_clients_do_not_hurt_the_daemon() {
    let (dir, d) = setup("abuse");
    let before = std::fs::read(&d.config).unwrap();
    // Silent clients hold connections open the whole test.
    let silent: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&d.sock).unwrap())
        .collect();
    // A line over 4 MiB: -32600, then the connection ends.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut huge = br#"{"jsonrpc":"2.0","id":1,"method":"create-hg","params":{"name":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 5 << 20));
    huge.extend_from_slice(b"\"}}\n");
    // The daemon may stop reading (and close) before all of it is written.
    let _ = s.write_all(&huge);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.contains("-32600"), "{answer:.200}");
    assert_eq!(answer.lines().count(), 1, "one answer, then closed");
    // Many requests on one connection, all answered in order.
    let n = 2000;
    let mut lines = Vec::new();
    for i in 0..n {
        lines.extend_from_slice(
            format!("{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"list-lu\"}}\n").as_bytes(),
        );
    }
    let t0 = Instant::now();
    let answers = d.rpc_lines(&lines, n);
    for (i, a) in answers.iter().enumerate() {
        assert!(
            a.starts_with("{") && a.contains(&format!("\"id\":{i}")),
            "{a}"
        );
        assert!(a.contains("\"result\""), "{a}");
    }
    eprintln!("{n} requests on one connection: {:?}", t0.elapsed());
    // The CLI still works while the silent clients wait.
    assert!(d.admin("stmfadm", &["list-lu", "-v"]).contains("disk"));
    d.admin("stmfadm", &["create-hg", "after"]);
    drop(silent);
    let v = d.config_json();
    assert!(
        v["host_group"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["name"] == "after")),
        "{v}"
    );
    // Nothing but that last change reached the file.
    let after = std::fs::read_to_string(&d.config).unwrap();
    assert_ne!(after.as_bytes(), &before[..]);
    assert!(after.contains("after") && !after.contains("aaaa"));
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_or_corrupt_config_file_is_reported_and_left_alone() {
    let dir = tmpdir("badfile");
    let iscsitd = bin("iscsitd");
    let missing = dir.join("missing.toml");
    for args in [vec!["--check"], vec!["--socket", "s.sock", "--config"]] {
        let out = Command::new(&iscsitd)
            .current_dir(&dir)
            .args(&args)
            .arg(&missing)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("cannot read") && err.contains("missing.toml"),
            "{err}"
        );
        assert_eq!(
            err.matches("No such file").count(),
            1,
            "the cause once: {err}"
        );
        assert!(!missing.exists(), "a missing config is not created");
    }
    let corrupt = dir.join("corrupt.toml");
    let bytes = b"[[portal_group]]\ntag = 1\nportals = [\"127.0.0.1:3260\"\n[[target]\n";
    std::fs::write(&corrupt, bytes).unwrap();
    for args in [vec!["--check"], vec!["--socket", "s.sock", "--config"]] {
        let out = Command::new(&iscsitd)
            .current_dir(&dir)
            .args(&args)
            .arg(&corrupt)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("corrupt.toml") && err.contains("line"),
            "the error names file and line: {err}"
        );
        assert_eq!(std::fs::read(&corrupt).unwrap(), bytes);
    }
    // Valid TOML, invalid content: every problem reported.
    let wrong = dir.join("wrong.toml");
    let bytes = "[[target]]\niqn = \"nonsense\"\nportal_groups = [9]\n";
    std::fs::write(&wrong, bytes).unwrap();
    let out = check_config(&wrong);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("nonsense") && err.contains('9'), "{err}");
    assert_eq!(std::fs::read_to_string(&wrong).unwrap(), bytes);
    let _ = std::fs::remove_dir_all(&dir);
}
