//! Persistence under SIGKILL: a seeded random loop of configuration changes
//! through itadm/stmfadm, each with iscsitd killed (SIGKILL) a random few
//! milliseconds after the change was sent. After each kill: `iscsitd
//! --check` accepts the file, the restarted daemon's configuration
//! (get-config) is exactly the one before the change or exactly the one
//! after it, and a file-backed LU written before the loop (through our
//! `iscsi` CLI, which ends with SYNCHRONIZE CACHE) reads back intact.
//!
//! "Exactly after" is checked without a model of every field: a create is
//! undone by its delete (which must give back the document before) and
//! redone uninterrupted (which must give the document the kill left); a
//! delete's result is the document before minus that object.
//!
//! `IRONSTAR_SIGKILL_ITERS` (default 30) and `IRONSTAR_SIGKILL_SEED`
//! (default: from the clock; printed either way) reproduce a run.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: &str = "iqn.2026-11.dev.ironstar:kill0";
const INI: &str = "iqn.1994-05.com.example:killer";

/// xorshift64*: enough randomness, and a run is reproduced from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn dd(from: &str, to: &str, extra: &[&str]) {
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("iscsi"))
        .args(["--initiator-name", INI, "dd", "--if", from, "--of", to])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "iscsi dd {from} -> {to}: {}",
        text(&out)
    );
}

/// A kind of object the loop creates and deletes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    HostGroup,
    Target,
    Lu,
    View,
    Tpg,
}

const KINDS: [Kind; 5] = [
    Kind::HostGroup,
    Kind::Target,
    Kind::Lu,
    Kind::View,
    Kind::Tpg,
];

/// One change: the CLI call, its inverse (for creates), and how a delete
/// changes the document.
struct Op {
    tool: &'static str,
    args: Vec<String>,
    create: bool,
    kind: Kind,
    n: u64,
}

fn names(kind: Kind, n: u64) -> (String, String) {
    match kind {
        Kind::HostGroup => (format!("hg{n}"), String::new()),
        Kind::Target => (format!("iqn.2026-11.dev.ironstar:k{n}"), String::new()),
        Kind::Lu | Kind::View => (format!("lu{n}"), format!("60000000000000{n:02X}")),
        Kind::Tpg => (format!("{}", 10 + n), String::new()),
    }
}

fn op(kind: Kind, n: u64, create: bool, tpg_port: u16) -> Op {
    let (name, guid) = names(kind, n);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (tool, args) = match (kind, create) {
        (Kind::HostGroup, true) => ("stmfadm", s(&["create-hg", &name])),
        (Kind::HostGroup, false) => ("stmfadm", s(&["delete-hg", &name])),
        (Kind::Target, true) => ("itadm", s(&["create-target", "-n", &name, "-t", "1"])),
        (Kind::Target, false) => ("itadm", s(&["delete-target", "-f", &name])),
        (Kind::Lu, true) => (
            "stmfadm",
            s(&[
                "create-lu",
                "-s",
                "1M",
                "-p",
                &format!("alias={name}"),
                "-p",
                &format!("guid={guid}"),
                "memory",
            ]),
        ),
        (Kind::Lu, false) => ("stmfadm", s(&["delete-lu", &name])),
        (Kind::View, true) => (
            "stmfadm",
            s(&["add-view", "-n", &format!("{}", 100 + n), &name]),
        ),
        (Kind::View, false) => ("stmfadm", s(&["remove-view", "-l", &name, "-a"])),
        (Kind::Tpg, true) => (
            "itadm",
            s(&["create-tpg", &name, &format!("127.0.0.1:{tpg_port}")]),
        ),
        (Kind::Tpg, false) => ("itadm", s(&["delete-tpg", &name])),
    };
    Op {
        tool,
        args,
        create,
        kind,
        n,
    }
}

/// The document after a delete: `before` minus the object (and, for an
/// LU, its views).
fn minus(before: &Value, kind: Kind, n: u64) -> Value {
    let (name, guid) = names(kind, n);
    let mut v = before.clone();
    let is_lu = |x: &Value| {
        x.as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(&guid) || s == name)
    };
    let drop_where = |v: &mut Value, key: &str, gone: &dyn Fn(&Value) -> bool| {
        if let Some(a) = v.get_mut(key).and_then(Value::as_array_mut) {
            a.retain(|x| !gone(x));
        }
    };
    match kind {
        Kind::HostGroup => drop_where(&mut v, "host_group", &|x| x["name"] == name.as_str()),
        Kind::Target => drop_where(&mut v, "target", &|x| x["iqn"] == name.as_str()),
        Kind::Lu => {
            drop_where(&mut v, "lu", &|x| is_lu(&x["guid"]));
            drop_where(&mut v, "view", &|x| is_lu(&x["lu"]));
        }
        Kind::View => drop_where(&mut v, "view", &|x| is_lu(&x["lu"])),
        Kind::Tpg => drop_where(&mut v, "portal_group", &|x| {
            x["tag"].as_u64() == name.parse().ok()
        }),
    }
    v
}

fn check_file(config: &Path) {
    let out = check_config(config);
    assert!(
        out.status.success(),
        "iscsitd --check refused the file a SIGKILL left: {}\n{}",
        text(&out),
        std::fs::read_to_string(config).unwrap_or_default()
    );
}

#[test]
fn configuration_and_lu_data_survive_sigkill_during_changes() {
    let iters: u64 = std::env::var("IRONSTAR_SIGKILL_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("IRONSTAR_SIGKILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    println!("sigkill loop: seed {seed} (IRONSTAR_SIGKILL_SEED={seed}), {iters} iterations");
    let mut rng = Rng(seed);

    let dir = tmpdir("sigkill");
    std::fs::write(dir.join("iscsitd.toml"), "").unwrap();
    let portal = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::start(&dir);
    d.admin("itadm", &["create-tpg", "1", &portal]);
    d.admin("itadm", &["create-target", "-n", T, "-t", "1"]);
    let img = dir.join("data.img");
    d.admin(
        "stmfadm",
        &[
            "create-lu",
            "-s",
            "2M",
            "-p",
            "alias=data",
            img.to_str().unwrap(),
        ],
    );
    d.admin("stmfadm", &["add-view", "-n", "0", "data"]);
    // The data: 2 MiB of a seeded pattern, written through iSCSI and
    // flushed (SYNCHRONIZE CACHE) before the loop starts.
    let pattern: Vec<u8> = {
        let mut r = Rng(seed ^ 0x5eed);
        (0..2 << 20).map(|_| r.next() as u8).collect()
    };
    std::fs::write(dir.join("pattern.bin"), &pattern).unwrap();
    let url = format!("iscsi://{portal}/{T}/0");
    dd(
        dir.join("pattern.bin").to_str().unwrap(),
        &url,
        &["--bs", "256K"],
    );

    let mut present = [[false; 4]; 5];
    // Views need their LU; a TPG port per slot, fixed for the run.
    let tpg_ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let (mut landed, mut lost) = (0, 0);
    let t0 = Instant::now();
    for i in 0..iters {
        // Pick a change that is valid now.
        let (kind, n, create) = loop {
            let k = KINDS[rng.below(5) as usize];
            let n = rng.below(4);
            let ki = KINDS.iter().position(|x| *x == k).unwrap();
            let here = present[ki][n as usize];
            let lu_here = present[2][n as usize];
            let ok = match (k, here) {
                (Kind::View, false) => lu_here,
                (Kind::Lu, true) => !present[3][n as usize],
                _ => true,
            };
            if ok {
                break (k, n, !here);
            }
        };
        let o = op(kind, n, create, tpg_ports[n as usize]);
        let before = d.config_json();
        let args: Vec<&str> = o.args.iter().map(String::as_str).collect();
        let mut cli = Command::new(bin(o.tool))
            .arg("--socket")
            .arg(&d.sock)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = rng.below(30);
        std::thread::sleep(Duration::from_millis(delay));
        d.kill();
        let _ = cli.wait();
        check_file(&dir.join("iscsitd.toml"));
        d = Daemon::start(&dir);
        let after_kill = d.config_json();
        assert!(after_kill.is_object(), "{after_kill}");
        let outcome = if after_kill == before {
            // Not applied: apply it now, uninterrupted, to move on.
            d.admin(o.tool, &args);
            "before"
        } else if o.create {
            // Applied: undoing it must give `before` back, redoing it the
            // document the kill left.
            let undo = op(o.kind, o.n, false, tpg_ports[n as usize]);
            let uargs: Vec<&str> = undo.args.iter().map(String::as_str).collect();
            d.admin(undo.tool, &uargs);
            assert_eq!(
                d.config_json(),
                before,
                "iteration {i} (seed {seed}): {} {args:?} left something else than its result",
                o.tool
            );
            d.admin(o.tool, &args);
            assert_eq!(
                d.config_json(),
                after_kill,
                "iteration {i} (seed {seed}): {} {args:?}",
                o.tool
            );
            "after"
        } else {
            assert_eq!(
                after_kill,
                minus(&before, o.kind, o.n),
                "iteration {i} (seed {seed}): {} {args:?} left neither before nor after",
                o.tool
            );
            "after"
        };
        if outcome == "before" {
            lost += 1;
        } else {
            landed += 1;
        }
        let ki = KINDS.iter().position(|x| *x == kind).unwrap();
        present[ki][n as usize] = create;
        if kind == Kind::Lu && !create {
            present[3][n as usize] = false;
        }
        // The data written before the loop is all there.
        let back = dir.join("back.bin");
        let _ = std::fs::remove_file(&back);
        dd(&url, back.to_str().unwrap(), &["--bs", "256K"]);
        let got = std::fs::read(&back).unwrap();
        assert!(
            got == pattern,
            "iteration {i} (seed {seed}): LU data differs after the kill"
        );
        println!(
            "  {i:>3}: {} {} killed after {delay:>2} ms -> {outcome}",
            o.tool,
            o.args.join(" ")
        );
    }
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    println!(
        "sigkill loop: {iters} kills in {:?}: {landed} changes had landed, {lost} had not; \
         LU data intact every time; {} temp files left behind",
        t0.elapsed(),
        leftovers.len()
    );
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
