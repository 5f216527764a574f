//! A private tgtd (Debian's `tgt`) per test: its own control port, its own
//! iSCSI port on 127.0.0.1, and sparse backing files in /dev/shm; torn down
//! (targets deleted, daemon stopped, files removed) when dropped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use iscsi_initiator::{Error, Lun};
use tokio::task::JoinHandle;

pub const IQN: &str = "iqn.2026-11.dev.ironstar.test:tgt";
pub const INITIATOR: &str = "iqn.2026-11.dev.ironstar.test:initiator";
pub const LU_BYTES: u64 = 64 << 20;

static NEXT: AtomicU16 = AtomicU16::new(0);

pub struct Tgt {
    pub port: u16,
    control: u16,
    child: Child,
    files: Vec<PathBuf>,
    tids: Vec<u32>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        || PathBuf::from("/usr/sbin").join(tool).is_file()
}

impl Tgt {
    /// Starts tgtd; panics with a clear message if it is not installed.
    /// Starts are serialized within a test binary and retried on fresh
    /// ports: two tgtd instances coming up at the same instant sometimes
    /// never answer on their control socket.
    pub fn start() -> Tgt {
        assert!(
            which("tgtd") && which("tgtadm"),
            "tgtd/tgtadm not found: install Debian's `tgt` package (apt-get install tgt) to run these tests"
        );
        static START: Mutex<()> = Mutex::new(());
        let _one_at_a_time = START.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..3 {
            if let Some(t) = Self::try_start() {
                return t;
            }
        }
        panic!("tgtd did not come up after 3 attempts");
    }

    fn try_start() -> Option<Tgt> {
        let port = free_port();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // tgtd refuses control ports above 32767 (exit status 34, ERANGE).
        let control = 20000 + (std::process::id() % 10000) as u16 + (n * 7) % 1000;
        let child = Command::new("tgtd")
            .args([
                "-f",
                "--control-port",
                &control.to_string(),
                "--iscsi",
                &format!("portal=127.0.0.1:{port}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tgtd");
        let mut t = Tgt {
            port,
            control,
            child,
            files: Vec::new(),
            tids: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if t.try_adm(&["--mode", "system", "--op", "show"]).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return Some(t);
            }
            if let Ok(Some(status)) = t.child.try_wait() {
                eprintln!("tgtd exited at start ({status}); control port {control} busy?");
                return None;
            }
            if Instant::now() > deadline {
                eprintln!("tgtd (control port {control}, portal {port}) did not answer within 5 s; retrying");
                // Drop stops it.
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_adm(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("tgtadm")
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn adm(&self, args: &[&str]) -> String {
        self.try_adm(args)
            .unwrap_or_else(|e| panic!("tgtadm {args:?} failed: {e}"))
    }

    /// A target with one LUN (1) backed by a sparse 64 MiB file in /dev/shm,
    /// open to every initiator address.
    pub fn add_target(&mut self, tid: u32, name: &str) {
        let tid_s = tid.to_string();
        self.adm(&[
            "--mode",
            "target",
            "--op",
            "new",
            "--tid",
            &tid_s,
            "--targetname",
            name,
        ]);
        self.tids.push(tid);
        self.add_lun(tid, 1);
        self.adm(&[
            "--mode",
            "target",
            "--op",
            "bind",
            "--tid",
            &tid_s,
            "--initiator-address",
            "ALL",
        ]);
    }

    /// Another LUN of `tid`, backed by its own sparse 64 MiB file.
    pub fn add_lun(&mut self, tid: u32, lun: u32) {
        let file = PathBuf::from(format!(
            "/dev/shm/ironstar-ini-{}-{}-{tid}-{lun}.img",
            std::process::id(),
            self.port
        ));
        let f = std::fs::File::create(&file).expect("create backing file");
        f.set_len(LU_BYTES).expect("size backing file");
        self.files.push(file.clone());
        self.adm(&[
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            &tid.to_string(),
            "--lun",
            &lun.to_string(),
            "--backing-store",
            file.to_str().expect("utf-8 path"),
        ]);
    }

    pub fn set(&self, tid: u32, key: &str, value: &str) {
        self.adm(&[
            "--mode",
            "target",
            "--op",
            "update",
            "--tid",
            &tid.to_string(),
            "--name",
            key,
            "--value",
            value,
        ]);
    }

    /// CHAP for `tid`: the initiator's account, and the target's for mutual.
    pub fn chap(&self, tid: u32, user: &str, secret: &str, mutual: Option<(&str, &str)>) {
        let tid_s = tid.to_string();
        self.adm(&[
            "--mode",
            "account",
            "--op",
            "new",
            "--user",
            user,
            "--password",
            secret,
        ]);
        self.adm(&[
            "--mode", "account", "--op", "bind", "--tid", &tid_s, "--user", user,
        ]);
        if let Some((tu, ts)) = mutual {
            self.adm(&[
                "--mode",
                "account",
                "--op",
                "new",
                "--user",
                tu,
                "--password",
                ts,
            ]);
            self.adm(&[
                "--mode",
                "account",
                "--op",
                "bind",
                "--tid",
                &tid_s,
                "--user",
                tu,
                "--outgoing",
            ]);
        }
    }

    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        for tid in &self.tids {
            let _ = self.try_adm(&[
                "--mode",
                "target",
                "--op",
                "delete",
                "--force",
                "--tid",
                &tid.to_string(),
            ]);
        }
        let _ = self.try_adm(&["--mode", "system", "--op", "delete"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure can be replayed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a over `data`: equal checksums, equal copies (for the tests' purposes).
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A write that goes on, pass after pass of the same data, until it is told
/// to finish: a connection broken while it runs always breaks it mid-write,
/// however fast the machine (a single pass could end before the break).
pub struct BackgroundWrite {
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicUsize>,
    task: JoinHandle<Result<(), Error>>,
}

impl BackgroundWrite {
    /// Lets the pass in progress complete, then returns the write's outcome
    /// and the number of passes written; the LU then holds `data` exactly.
    pub async fn finish(self) -> (Result<(), Error>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let outcome = self.task.await.expect("the writer task panicked");
        (outcome, self.passes.load(Ordering::SeqCst))
    }

    /// Whether the writer stopped by itself (only an error can do that).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Writes `data` to `lun` from LBA 0 in 1 MiB commands on a task of its
/// own, over and over until [`BackgroundWrite::finish`], and returns once a
/// quarter of the first pass is written, so that the caller can break a
/// connection mid-write.
pub async fn write_in_background(lun: &Lun, data: Bytes) -> BackgroundWrite {
    let len = data.len();
    let progress = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicUsize::new(0));
    let task = {
        let (lun, progress) = (lun.clone(), Arc::clone(&progress));
        let (stop, passes) = (Arc::clone(&stop), Arc::clone(&passes));
        tokio::spawn(async move {
            let step = 1usize << 20;
            loop {
                for at in (0..len).step_by(step) {
                    lun.write((at / 512) as u64, data.slice(at..at + step))
                        .await?;
                    progress.fetch_add(step, Ordering::SeqCst);
                }
                passes.fetch_add(1, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
        })
    };
    while progress.load(Ordering::SeqCst) < len / 4 && !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    BackgroundWrite { stop, passes, task }
}
