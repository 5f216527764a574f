//! The `iscsi` binary against tgtd: discover, ls, inq, readcap, write and
//! read back a file, CHAP from a secret file, and readable errors.

mod common;

use std::process::{Command, Output};

use common::{random_bytes, Tgt, INITIATOR, IQN};

fn iscsi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iscsi"))
        .args(["--initiator-name", INITIATOR, "--timeout", "10"])
        .args(args)
        .output()
        .expect("run iscsi")
}

fn ok(args: &[&str]) -> String {
    let out = iscsi(args);
    assert!(
        out.status.success(),
        "iscsi {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn discover_ls_inq_readcap_write_read() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    let portal = t.portal();
    let url = format!("iscsi://{portal}/{IQN}/1");

    let d = ok(&["discover", &portal]);
    assert!(d.contains(&format!("{portal},1 {IQN}")), "{d}");

    let ls = ok(&["ls", &portal]);
    assert!(
        ls.contains("Lun 1: disk") && ls.contains("64.0 MiB"),
        "{ls}"
    );

    let inq = ok(&["inq", &url]);
    assert!(inq.contains("Vendor:     IET"), "{inq}");
    let vpd = ok(&["inq", &url, "--vpd", "0x00"]);
    assert!(vpd.starts_with("0000  00 00"), "{vpd}");

    let cap = ok(&["readcap", &url]);
    assert!(
        cap.contains("Blocks:     131072") && cap.contains("Block size: 512"),
        "{cap}"
    );

    let dir = std::env::temp_dir().join(format!("iscsi-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.bin");
    let output = dir.join("out.bin");
    let data = random_bytes(1 << 20, 42);
    std::fs::write(&input, &data).unwrap();
    ok(&["write", &url, "--lba", "100", "-i", input.to_str().unwrap()]);
    ok(&[
        "read",
        &url,
        "--lba",
        "100",
        "--blocks",
        "2048",
        "-o",
        output.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&output).unwrap() == data, "read-back differs");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chap_from_a_secret_file_and_readable_errors() {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    t.chap(1, "cli-user", "cli-secret-123", None);
    let portal = t.portal();
    let url = format!("iscsi://{portal}/{IQN}/1");
    let secret = std::env::temp_dir().join(format!("iscsi-cli-secret-{}", std::process::id()));
    std::fs::write(&secret, "cli-secret-123\n").unwrap();
    let cap = ok(&[
        "readcap",
        &url,
        "--chap-user",
        "cli-user",
        "--chap-secret-file",
        secret.to_str().unwrap(),
    ]);
    assert!(cap.contains("Blocks:"), "{cap}");
    std::fs::remove_file(&secret).unwrap();

    let out = iscsi(&["readcap", &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("iscsi: error: logging in to") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = iscsi(&["inq", "iscsi://127.0.0.1:1/iqn.x:none/0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot connect"),
        "{err}"
    );

    let out = iscsi(&["inq", "not-a-url"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("invalid iSCSI URL"),
        "{err}"
    );
}
