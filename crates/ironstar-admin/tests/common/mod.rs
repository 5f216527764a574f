//! What the admin end-to-end tests share: the freshly built binaries, an
//! `iscsitd` on a temporary config and socket (killed on drop), the CLIs
//! run against it, raw JSON-RPC lines, and libiscsi's tools.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `itadm`, `stmfadm` (this package), `iscsi` (the initiator CLI) or
/// `iscsitd` (both built once, so a test never runs a stale binary).
pub fn bin(name: &str) -> PathBuf {
    match name {
        "itadm" => PathBuf::from(env!("CARGO_BIN_EXE_itadm")),
        "stmfadm" => PathBuf::from(env!("CARGO_BIN_EXE_stmfadm")),
        "iscsi" => built("iscsi-initiator", name),
        _ => built("iscsitd", name),
    }
}

/// Binary `name` of another workspace package, built by the first test
/// of this process that asks for it.
fn built(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut done = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !done.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot build {name} ({package})");
        done.push(name.to_string());
    }
    Path::new(env!("CARGO_BIN_EXE_itadm")).with_file_name(name)
}

/// `iscsitd --check <config>`.
pub fn check_config(config: &Path) -> Output {
    Command::new(bin("iscsitd"))
        .arg("--check")
        .arg(config)
        .output()
        .unwrap()
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// True if the tools are there; otherwise says so and the test returns
/// (a skip), except under CI or IRONSTAR_REQUIRE_PEERS=1, where it fails.
pub fn require(tools: &[&str]) -> bool {
    let missing: Vec<&&str> = tools.iter().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let strict = ["CI", "IRONSTAR_REQUIRE_PEERS"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| v == "1" || v == "true"));
    assert!(!strict, "missing peer tools: {missing:?}");
    eprintln!("skipped: {missing:?} not installed");
    false
}

pub struct Daemon {
    pub child: Child,
    pub sock: PathBuf,
    pub config: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts iscsitd on `dir/iscsitd.toml` (which must exist) and waits
    /// for its socket.
    pub fn start(dir: &Path) -> Daemon {
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let config = dir.join("iscsitd.toml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("iscsitd.log"))
            .unwrap();
        let mut child = Command::new(bin("iscsitd"))
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&sock)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while UnixStream::connect(&sock).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "iscsitd exited ({st}): {}",
                    std::fs::read_to_string(dir.join("iscsitd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "iscsitd did not open its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            sock,
            config,
        }
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs a CLI verb; asserts it succeeded; its stdout.
    pub fn admin(&self, tool: &str, args: &[&str]) -> String {
        let out = self.run(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a CLI verb with `--json`; asserts it succeeded; its answer.
    pub fn json(&self, tool: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.admin(tool, &all)).unwrap()
    }

    pub fn run(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(bin(tool))
            .arg("--socket")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap()
    }

    /// Sends raw lines on one connection; reads `answers` lines back.
    pub fn rpc_lines(&self, lines: &[u8], answers: usize) -> Vec<String> {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        (&s).write_all(lines).unwrap();
        let mut r = BufReader::new(&s);
        (0..answers)
            .map(|_| {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                line
            })
            .collect()
    }

    /// One JSON-RPC call: the whole answer object.
    pub fn call(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let a = self.rpc_lines(format!("{req}\n").as_bytes(), 1);
        serde_json::from_str(&a[0]).unwrap()
    }

    /// The live configuration document (get-config).
    pub fn config_json(&self) -> serde_json::Value {
        self.call("get-config", serde_json::json!({}))["result"].clone()
    }
}

/// A fresh temporary directory for one test.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ironstar-admin-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A libiscsi tool with a deadline.
pub fn iscsi(tool: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("20")
        .arg(tool)
        .args(args)
        .output()
        .unwrap()
}

/// `iscsi-ls -s` as `initiator`: its output (empty when it failed).
pub fn ls(portal: &str, initiator: &str, extra: &[&str]) -> Output {
    let url = format!("iscsi://{portal}");
    let mut args = vec!["-s", "-i", initiator];
    args.extend_from_slice(extra);
    args.push(&url);
    iscsi("iscsi-ls", &args)
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
