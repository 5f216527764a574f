//! The `iscsi` binary against tgtd: discover, ls, inquiry, readcap, write
//! and read back a file, CHAP from a secret file and from the environment
//! (one-way and mutual), digests on and off, a 64 MiB `dd` round trip, a
//! 10 s `bench` at queue depth 32, the `nbd` export round trip through
//! qemu-img, and readable errors.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{checksum, random_bytes, Tgt, INITIATOR, IQN};

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
    let vpd = ok(&["inq", &url, "--vpd", "0x00", "--hex"]);
    assert!(
        vpd.contains("VPD page 0x00: Supported VPD pages") && vpd.contains("0000  00 00"),
        "{vpd}"
    );

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
    // A path to another target is refused before any login, and a bad one is named.
    let out = iscsi(&[
        "--path",
        "iscsi://127.0.0.1:1/iqn.x:other/0",
        "inq",
        "iscsi://127.0.0.1:1/iqn.x:none/0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("leads to iqn.x:other, not iqn.x:none"),
        "{err}"
    );
    let out = iscsi(&["--path", "nope", "inq", "iscsi://127.0.0.1:1/iqn.x:none/0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--path nope") && err.contains("invalid iSCSI URL"),
        "{err}"
    );
}

const SECRET: &str = "cli-secret-123";
const TARGET_SECRET: &str = "tgt-secret-4567";

/// `iscsi` with the CHAP secrets in the environment (never on the command line).
fn iscsi_env(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iscsi"))
        .args(["--initiator-name", INITIATOR, "--timeout", "20"])
        .args(args)
        .env("IRONSTAR_CHAP_SECRET", SECRET)
        .env("IRONSTAR_TARGET_SECRET", TARGET_SECRET)
        .output()
        .expect("run iscsi")
}

fn ok_env(args: &[&str]) -> (String, String) {
    let out = iscsi_env(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "iscsi {args:?} failed: {err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

fn file_sum(p: &Path) -> u64 {
    checksum(&std::fs::read(p).unwrap())
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("iscsi-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `iscsi nbd` and waits for its "NBD server on ..." line.
fn nbd_server(args: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_iscsi"))
        .args(["--initiator-name", INITIATOR, "--timeout", "20", "nbd"])
        .args(args)
        .env("IRONSTAR_CHAP_SECRET", SECRET)
        .env("IRONSTAR_TARGET_SECRET", TARGET_SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut lines = BufReader::new(err).lines();
    let first = lines.next().map(|l| l.unwrap()).unwrap_or_default();
    assert!(
        first.starts_with("NBD server on "),
        "iscsi nbd said: {first}"
    );
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (Server(child), first)
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img not found: install Debian's qemu-utils to run the NBD test");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A target with two LUNs and one-way CHAP, a second with mutual CHAP.
fn two_lun_targets() -> Tgt {
    let mut t = Tgt::start();
    t.add_target(1, IQN);
    t.add_lun(1, 2);
    t.chap(1, "cli-user", SECRET, None);
    t.add_target(2, "iqn.2026-11.dev.ironstar.test:mutual");
    t.chap(2, "cli-user2", SECRET, Some(("tgt-user", TARGET_SECRET)));
    t
}

#[test]
fn two_luns_chap_from_env_digests_and_a_64_mib_dd_round_trip() {
    let t = two_lun_targets();
    let portal = t.portal();
    let chap = ["--chap-user", "cli-user"];
    let url2 = format!("iscsi://{portal}/{IQN}/2");

    let (ls, _) = ok_env(&["ls", &portal, "--chap-user", "cli-user"]);
    assert!(
        ls.contains("Lun 1: disk") && ls.contains("Lun 2: disk"),
        "{ls}"
    );
    let (inq, _) = ok_env(&["inquiry", &url2, chap[0], chap[1]]);
    assert!(
        inq.contains("Vendor:     IET")
            && inq.contains("VPD page 0x83: Device identification")
            && inq.contains("VPD page 0x80: Unit serial number"),
        "{inq}"
    );
    let (cap, _) = ok_env(&["readcap", &url2, chap[0], chap[1], "--digests"]);
    assert!(cap.contains("Blocks:     131072"), "{cap}");

    // Mutual CHAP on the second target.
    let mutual = format!("iscsi://{portal}/iqn.2026-11.dev.ironstar.test:mutual/1");
    let (cap, _) = ok_env(&[
        "readcap",
        &mutual,
        "--chap-user",
        "cli-user2",
        "--target-user",
        "tgt-user",
    ]);
    assert!(cap.contains("Block size: 512"), "{cap}");

    let dir = scratch("dd");
    let src = dir.0.join("src.bin");
    let dst = dir.0.join("dst.bin");
    std::fs::write(&src, random_bytes(64 << 20, 64)).unwrap();
    let start = Instant::now();
    let (_, err) = ok_env(&[
        "dd",
        "--if",
        src.to_str().unwrap(),
        "--of",
        &url2,
        "--digests",
        "--progress",
        chap[0],
        chap[1],
    ]);
    assert!(err.contains("67108864 bytes (64.0 MiB) copied"), "{err}");
    let (_, err) = ok_env(&[
        "dd",
        "--if",
        &url2,
        "--of",
        dst.to_str().unwrap(),
        chap[0],
        chap[1],
    ]);
    assert!(err.contains("67108864 bytes (64.0 MiB) copied"), "{err}");
    eprintln!("64 MiB dd out and back in {:?}", start.elapsed());
    assert_eq!(file_sum(&src), file_sum(&dst), "checksums differ");

    // stdin to the LUN and the LUN to stdout.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 1048576 {} | {} --initiator-name {INITIATOR} dd --if - --of {url2} --lba 8 --chap-user cli-user && {} --initiator-name {INITIATOR} dd --if {url2} --lba 8 --count 1 --bs 1M --of - --chap-user cli-user > {}",
            src.display(),
            env!("CARGO_BIN_EXE_iscsi"),
            env!("CARGO_BIN_EXE_iscsi"),
            dst.display()
        ))
        .env("IRONSTAR_CHAP_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read(&src).unwrap();
    assert!(
        std::fs::read(&dst).unwrap() == head[..1 << 20],
        "stdin/stdout copy differs"
    );
}

#[test]
fn bench_for_ten_seconds_at_queue_depth_32() {
    let t = two_lun_targets();
    let url = format!("iscsi://{}/{IQN}/1", t.portal());
    let (out, _) = ok_env(&[
        "bench",
        &url,
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--qd",
        "32",
        "--duration",
        "10",
        "--chap-user",
        "cli-user",
    ]);
    eprintln!("{out}");
    let iops: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("IOPS: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no IOPS line in {out}"));
    assert!(iops > 0.0, "{out}");
    assert!(out.contains("p50") && out.contains("p99"), "{out}");
}

#[test]
fn bench_runs_four_sessions_from_one_process() {
    let t = two_lun_targets();
    let url = format!("iscsi://{}/{IQN}/1", t.portal());
    let (out, _) = ok_env(&[
        "bench",
        &url,
        "--sessions",
        "4",
        "--qd",
        "2",
        "--duration",
        "2",
        "--chap-user",
        "cli-user",
    ]);
    eprintln!("{out}");
    assert!(out.contains(" qd=2 sessions=4 "), "{out}");
    assert!(out.contains("errors: 0"), "{out}");
    let iops: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("IOPS: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no IOPS line in {out}"));
    assert!(iops > 0.0, "{out}");
    let bad = iscsi_env(&["bench", &url, "--sessions", "0", "--chap-user", "cli-user"]);
    assert!(!bad.status.success());
}

#[test]
fn nbd_export_round_trips_64_mib_through_qemu_img() {
    let t = two_lun_targets();
    let url = format!("iscsi://{}/{IQN}/2", t.portal());
    let dir = scratch("nbd");
    let src = dir.0.join("src.img");
    let dst = dir.0.join("dst.img");
    std::fs::write(&src, random_bytes(64 << 20, 0xdb)).unwrap();

    // Write through a Unix socket...
    let sock = dir.0.join("nbd.sock");
    let (server, said) = nbd_server(&[
        &url,
        "--socket",
        sock.to_str().unwrap(),
        "--chap-user",
        "cli-user",
    ]);
    assert!(said.contains("64.0 MiB"), "{said}");
    let nbd_unix = format!("nbd+unix:///?socket={}", sock.display());
    let start = Instant::now();
    qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &nbd_unix,
    ]);
    drop(server);

    // ... and read back through a loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_server, said) =
        nbd_server(&[&url, "--port", &port.to_string(), "--chap-user", "cli-user"]);
    assert!(said.contains(&format!("nbd://127.0.0.1:{port}")), "{said}");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &format!("nbd://127.0.0.1:{port}"),
        dst.to_str().unwrap(),
    ]);
    eprintln!("64 MiB through NBD and back in {:?}", start.elapsed());
    assert_eq!(file_sum(&src), file_sum(&dst), "checksums differ");
    let _ = Duration::ZERO;
}
