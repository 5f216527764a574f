//! Live inspection, metrics and the lifecycle verbs against real clients:
//! a libiscsi session (iscsi-perf, run in the background so it is live
//! while we look) shows in `itadm list-session -v` and `itadm inspect`
//! with the values libiscsi itself reports having negotiated; tasks in
//! flight show under load; counters move by exactly the bytes a known
//! write (qemu-img) carried; the Prometheus text parses; import-lu keeps
//! data and identity; offline-target refuses logins. Skipped when the
//! libiscsi or qemu tools are not installed.

mod common;

use std::io::{Read, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TARGET: &str = "iqn.2026-11.dev.ironstar:inspect0";

/// A daemon (common's) with one TPG on a free loopback portal and TARGET on
/// it; its directory goes when it does.
struct Fixture {
    d: Daemon,
    dir: PathBuf,
    portal: String,
}

impl Deref for Fixture {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.d
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The daemon first, so nothing writes into the directory as it goes.
        let _ = self.d.child.kill();
        let _ = self.d.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fixture {
    fn url(&self, lun: u32) -> String {
        format!("iscsi://{}/{TARGET}/{lun}", self.portal)
    }
}

fn start(tag: &str) -> Fixture {
    let dir = tmpdir(&format!("inspect-{tag}"));
    std::fs::write(dir.join("iscsitd.toml"), "").unwrap();
    let d = Daemon::start(&dir);
    let portal = format!("127.0.0.1:{}", free_port());
    d.admin("itadm", &["create-tpg", "1", &portal]);
    d.admin("itadm", &["create-target", "-n", TARGET, "-t", "1"]);
    Fixture { d, dir, portal }
}

/// `qemu-img convert` (raw to raw) with a deadline; `extra` goes before the
/// formats.
fn qemu_convert(
    extra: &[&str],
    from: impl AsRef<std::ffi::OsStr>,
    to: impl AsRef<std::ffi::OsStr>,
) -> Output {
    Command::new("timeout")
        .args(["30", "qemu-img", "convert"])
        .args(extra)
        .args(["-f", "raw", "-O", "raw"])
        .arg(from)
        .arg(to)
        .output()
        .unwrap()
}

/// iscsi-perf in the background, its libiscsi log (LIBISCSI_DEBUG=6: the
/// target's login answers) going to a file.
struct Load {
    child: Child,
    log: PathBuf,
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(d: &Fixture, lun: u32, tag: &str) -> Load {
    let log = d.dir.join(format!("perf-{tag}.log"));
    let child = Command::new("iscsi-perf")
        .args([
            "-m",
            "32",
            "-b",
            "8",
            "-i",
            &format!("iqn.1994-05.com.example:{tag}"),
        ])
        .arg(d.url(lun))
        .env("LIBISCSI_DEBUG", "6")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Load { child, log }
}

/// What libiscsi says the target answered at login: key → value.
fn libiscsi_negotiated(log: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once("TargetLoginReply: "))
        .filter_map(|(_, kv)| {
            let kv = kv.split(" [").next()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// libiscsi's own end of the connection ("connection established (A -> B)").
fn libiscsi_local_addr(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let l = text
        .lines()
        .find(|l| l.contains("connection established ("))?;
    let inner = l.split("connection established (").nth(1)?;
    Some(inner.split(" -> ").next()?.to_string())
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sessions_in_inspect(v: &Value) -> Vec<Value> {
    v["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["tpgs"].as_array().cloned().unwrap_or_default())
        .flat_map(|g| g["sessions"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn a_libiscsi_session_shows_with_the_values_it_negotiated_and_its_tasks_in_flight() {
    if !require(&["iscsi-perf"]) {
        return;
    }
    let d = start("session");
    // A file LU: its commands run on blocking threads, so tasks stay in
    // flight long enough to be seen.
    let img = d.dir.join("f.img");
    d.admin(
        "stmfadm",
        &[
            "create-lu",
            "-s",
            "32M",
            "-p",
            "alias=f",
            img.to_str().unwrap(),
        ],
    );
    d.admin("stmfadm", &["add-view", "-n", "0", "f"]);
    let perf = load(&d, 0, "perf");
    let sessions = wait_for("the session", || {
        let v = d.json("itadm", &["list-session", "-v"]);
        let a = v.as_array()?.clone();
        // The session exists from the login's bind; its connection joins
        // it once the final Login Response is out.
        let joined = a.first()?["connections"].as_array()?.len() == 1;
        let logged =
            std::fs::read_to_string(&perf.log).is_ok_and(|l| l.contains("login successful"));
        (joined && logged && libiscsi_local_addr(&perf.log).is_some()).then_some(a)
    });
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let s = &sessions[0];
    assert_eq!(s["initiator"], "iqn.1994-05.com.example:perf");
    assert_eq!(s["target"], TARGET);
    assert_eq!(s["state"], "Q3 LOGGED_IN");
    // Every value libiscsi reports from the target's login answers is the
    // value we show.
    let negotiated = libiscsi_negotiated(&perf.log);
    let mut compared = 0;
    for (k, v) in &negotiated {
        let ours = match k.as_str() {
            "TargetPortalGroupTag" => s["tpgt"].to_string(),
            "IFMarker" | "OFMarker" => continue,
            _ => match &s["params"][k] {
                Value::String(x) => x.clone(),
                Value::Null => panic!("{k} is not shown: {}", s["params"]),
                other => other.to_string(),
            },
        };
        assert_eq!(&ours, v, "{k}: libiscsi says {v}, we show {ours}");
        compared += 1;
    }
    assert!(compared >= 12, "compared only {compared}: {negotiated:?}");
    // The connection is the one libiscsi opened.
    let conn = &s["connections"][0];
    assert_eq!(
        conn["peer"].as_str(),
        libiscsi_local_addr(&perf.log).as_deref()
    );
    assert_eq!(conn["state"], "S5 LOGGED_IN");
    let text = d.admin("itadm", &["list-session", "-v"]);
    assert!(
        text.contains("iqn.1994-05.com.example:perf") && text.contains("MaxBurstLength"),
        "{text}"
    );
    // inspect: the same session under target → TPG, its transitions, its
    // connection's transitions (S1 → S3 → S4 → S5), tasks in flight.
    let (sess, tasks) = wait_for("tasks in flight", || {
        let v = d.json("itadm", &["inspect"]);
        let ss = sessions_in_inspect(&v);
        let s = ss.first()?.clone();
        let tasks = s["connections"][0]["tasks"].as_array()?.clone();
        (!tasks.is_empty()).then_some((s, tasks))
    });
    assert_eq!(sess["tsih"], s["tsih"]);
    assert_eq!(sess["params"], s["params"]);
    let qs: Vec<&str> = sess["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap())
        .collect();
    assert_eq!(qs, ["Q2 ACTIVE", "Q3 LOGGED_IN"]);
    let ss: Vec<&str> = sess["connections"][0]["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap())
        .collect();
    assert_eq!(ss, ["S3 XPT_UP", "S4 IN_LOGIN", "S5 LOGGED_IN"]);
    let t = &tasks[0];
    assert!(t["command"].as_str().unwrap().starts_with("READ"), "{t}");
    assert_eq!(t["lun"], 0);
    assert_eq!(t["bytes_expected"], 4096);
    assert!(
        ["in-backend", "sending", "waiting-for-data"].contains(&t["state"].as_str().unwrap()),
        "{t}"
    );
    // Holders: the table and the connection's tasks hold the session; the
    // LU is held by the registry and by the session's LUN map.
    let holders = sess["holders"].to_string();
    assert!(holders.contains("session table"), "{holders}");
    let v = d.json("itadm", &["inspect", TARGET]);
    let lu = v["lus"][0]["holders"].to_string();
    assert!(
        lu.contains("LU registry") && lu.contains(&format!("session TSIH {}", s["tsih"])),
        "{lu}"
    );
    // The readable tree shows the same.
    let tree = d.admin("itadm", &["inspect"]);
    for want in [
        "Target iqn.2026-11.dev.ironstar:inspect0",
        "TPG 1",
        "Session TSIH",
        "S5 LOGGED_IN",
        "Tasks in flight",
        "held by",
    ] {
        assert!(tree.contains(want), "{want} missing:\n{tree}");
    }
    // list-target -v counts the session and its I/O.
    let lt = d.json("itadm", &["list-target", "-v"]);
    assert_eq!(lt[0]["sessions"], 1);
    assert!(lt[0]["counters"]["read_commands"].as_u64().unwrap() > 0);
    drop(perf);
}

fn metrics_of(d: &Daemon) -> Value {
    d.json("itadm", &["metrics"])
}

fn lu_counter(m: &Value, guid: &str, k: &str) -> u64 {
    m["lus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["guid"] == guid)
        .map(|l| l["counters"][k].as_u64().unwrap())
        .unwrap()
}

fn target_counter(m: &Value, k: &str) -> u64 {
    m["targets"][0]["counters"][k].as_u64().unwrap()
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn counters_move_by_the_bytes_written_and_prometheus_text_parses() {
    if !require(&["qemu-img"]) {
        return;
    }
    let d = start("metrics");
    let lu = d.json(
        "stmfadm",
        &["create-lu", "-s", "16M", "-p", "alias=m", "memory"],
    );
    let guid = lu["guid"].as_str().unwrap().to_string();
    d.admin("stmfadm", &["add-view", "-n", "0", "m"]);
    // Exactly 1 MiB + 4 KiB of random data (no zero run to skip).
    let n: u64 = (1 << 20) + 4096;
    let src = d.dir.join("src.bin");
    let mut data = vec![0u8; n as usize];
    let mut x: u32 = 0x1234_5678;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = (x as u8) | 1;
    }
    std::fs::write(&src, &data).unwrap();
    let before = metrics_of(&d);
    let out = qemu_convert(&["-n", "-S", "0"], &src, d.url(0));
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Unknown protocol") || err.contains("iscsi") && err.contains("not") {
            eprintln!("skipped: qemu-img has no iSCSI driver: {err}");
            return;
        }
        panic!("qemu-img: {err}");
    }
    let after = metrics_of(&d);
    let moved = |k: &str| lu_counter(&after, &guid, k) - lu_counter(&before, &guid, k);
    assert_eq!(moved("bytes_written"), n, "LU bytes written");
    assert_eq!(
        target_counter(&after, "bytes_written") - target_counter(&before, "bytes_written"),
        n,
        "target bytes written"
    );
    assert!(moved("write_commands") >= 1);
    assert_eq!(moved("task_aborts"), 0);
    let lat = &after["lus"][0]["counters"]["latency"];
    assert_eq!(
        lat["count"].as_u64().unwrap(),
        lu_counter(&after, &guid, "commands"),
        "every command has a latency"
    );
    // list-lu -v shows the same numbers.
    let l = d.json("stmfadm", &["list-lu", "-v", &guid]);
    assert_eq!(
        l[0]["counters"]["bytes_written"].as_u64().unwrap(),
        lu_counter(&after, &guid, "bytes_written")
    );
    // Prometheus: only loopback, switched on live, every line parses.
    let bad = d.run(
        "itadm",
        &["modify-defaults", "--metrics-listen", "0.0.0.0:9"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("loopback"));
    let addr = format!("127.0.0.1:{}", free_port());
    d.admin("itadm", &["modify-defaults", "--metrics-listen", &addr]);
    let defaults = d.json("itadm", &["list-defaults"]);
    assert_eq!(defaults["metrics_listen"], addr.as_str());
    let resp = http_get(&addr, "/metrics");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let mut written = None;
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        let (name, labels) = series.split_once('{').unwrap_or_else(|| panic!("{line:?}"));
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line:?}"
        );
        assert!(labels.ends_with('}'), "{line:?}");
        for pair in labels
            .trim_end_matches('}')
            .split("\",")
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
            assert!(
                k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line:?}"
            );
            assert!(!v.contains('\n'));
        }
        if name == "ironstar_lu_written_bytes_total" && labels.contains(&guid) {
            written = Some(value as u64);
        }
    }
    assert_eq!(
        written,
        Some(lu_counter(&after, &guid, "bytes_written")),
        "{body}"
    );
    assert!(
        body.contains("ironstar_lu_latency_seconds_bucket{"),
        "{body}"
    );
    assert!(http_get(&addr, "/other").starts_with("HTTP/1.1 404"));
    // Off again: the port closes; the setting survives in the document.
    d.admin("itadm", &["modify-defaults", "--metrics-listen", "off"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(std::net::TcpStream::connect(&addr).is_err());
}

#[test]
fn import_lu_brings_back_data_and_identity() {
    if !require(&["qemu-img", "iscsi-inq"]) {
        return;
    }
    let d = start("import");
    let img = d.dir.join("db.img");
    let created = d.json(
        "stmfadm",
        &[
            "create-lu",
            "-s",
            "8M",
            "-p",
            "alias=db",
            "-p",
            "blk=4096",
            "-p",
            "serial=SN-DB-1",
            "-p",
            "pid=DBLU",
            img.to_str().unwrap(),
        ],
    );
    let guid = created["guid"].as_str().unwrap().to_string();
    assert!(created["metadata"]
        .as_str()
        .unwrap()
        .ends_with("db.img.ironstar-lu"));
    d.admin("stmfadm", &["add-view", "-n", "0", "db"]);
    let src = d.dir.join("data.bin");
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&src, &data).unwrap();
    let w = qemu_convert(&["-n", "-S", "0"], &src, d.url(0));
    if !w.status.success() {
        eprintln!(
            "skipped: qemu-img cannot write over iSCSI: {}",
            String::from_utf8_lossy(&w.stderr)
        );
        return;
    }
    let before = d.json("stmfadm", &["list-lu", "-v", "db"]);
    // Gone from the registry; data and sidecar stay.
    d.admin("stmfadm", &["delete-lu", "db"]);
    assert!(!d.run("stmfadm", &["list-lu", "db"]).status.success());
    assert!(img.exists());
    // A file with no metadata is refused with a reason.
    let bare = d.dir.join("bare.img");
    std::fs::write(&bare, vec![0u8; 1 << 20]).unwrap();
    let r = d.run("stmfadm", &["import-lu", bare.to_str().unwrap()]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("ironstar-lu"));
    // Imported: the same identity.
    let imported = d.json("stmfadm", &["import-lu", img.to_str().unwrap()]);
    assert_eq!(imported["guid"], guid.as_str());
    let after = d.json("stmfadm", &["list-lu", "-v", "db"]);
    for k in [
        "guid",
        "alias",
        "size",
        "block_size",
        "serial",
        "vendor_id",
        "product_id",
        "thin",
        "write_protect",
    ] {
        assert_eq!(after[0][k], before[0][k], "{k}");
    }
    // Importing it twice is refused.
    assert!(!d
        .run("stmfadm", &["import-lu", img.to_str().unwrap()])
        .status
        .success());
    // The data is there, and the initiator sees the same serial.
    d.admin("stmfadm", &["add-view", "-n", "0", "db"]);
    let back = d.dir.join("back.bin");
    let r = qemu_convert(&[], d.url(0), &back);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.get(..data.len()), Some(&data[..]));
    let inq = iscsi("iscsi-inq", &["-e", "1", "-c", "128", &d.url(0)]);
    assert!(
        String::from_utf8_lossy(&inq.stdout).contains("SN-DB-1"),
        "{}",
        String::from_utf8_lossy(&inq.stdout)
    );
}

#[test]
fn an_offline_target_logs_its_sessions_out_and_refuses_logins() {
    if !require(&["iscsi-perf", "iscsi-inq", "iscsi-ls"]) {
        return;
    }
    let d = start("offline");
    d.admin(
        "stmfadm",
        &["create-lu", "-s", "16M", "-p", "alias=m", "memory"],
    );
    d.admin("stmfadm", &["add-view", "-n", "0", "m"]);
    let perf = load(&d, 0, "victim");
    wait_for("the session", || {
        let v = d.json("itadm", &["list-session"]);
        (v.as_array()?.len() == 1).then_some(())
    });
    let off = d.json("stmfadm", &["offline-target", TARGET]);
    assert_eq!(off["sessions_logged_out"], 1);
    wait_for("no session", || {
        let v = d.json("itadm", &["list-session"]);
        v.as_array()?.is_empty().then_some(())
    });
    let lt = d.json("itadm", &["list-target", TARGET]);
    assert_eq!(lt[0]["operational_status"], "offline");
    // Logins are refused, discovery does not offer it.
    let inq = iscsi("iscsi-inq", &[&d.url(0)]);
    assert!(!inq.status.success());
    let ls = iscsi("iscsi-ls", &[&format!("iscsi://{}", d.portal)]);
    assert!(!String::from_utf8_lossy(&ls.stdout).contains(TARGET));
    // Twice is refused with a reason; online again serves.
    let again = d.run("stmfadm", &["offline-target", TARGET]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already offline"));
    drop(perf);
    d.admin("stmfadm", &["online-target", TARGET]);
    let inq = iscsi("iscsi-inq", &[&d.url(0)]);
    assert!(
        inq.status.success(),
        "{}",
        String::from_utf8_lossy(&inq.stderr)
    );
    assert!(!d
        .run(
            "stmfadm",
            &["offline-target", "iqn.2026-11.dev.ironstar:nope"]
        )
        .status
        .success());
}
