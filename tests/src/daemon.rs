//! Starting the real `iscsitd` for one test: a config file in a fresh temp dir, a free
//! loopback port, a bounded wait until the portal accepts, and on drop a kill — plus, when
//! the test failed or the daemon died under it, the daemon's log in the test's output.

use std::env;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::TARGET_IQN;

/// How long the daemon may take to accept connections on its portal.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How many lines of the daemon's log a failing test shows.
const LOG_TAIL_LINES: usize = 300;

/// A directory removed on drop, unless the thread is panicking (then it is kept for a look).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path)?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Where the daemon binary is: `$IRONSTAR_ISCSITD`, else `release/iscsitd` under
/// `$CARGO_TARGET_DIR` if set, else `<workspace>/target/release/iscsitd`.
pub fn binary() -> PathBuf {
    if let Some(p) = env::var_os("IRONSTAR_ISCSITD") {
        return PathBuf::from(p);
    }
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    target_dir.join("release").join("iscsitd")
}

/// The LUN a client sees for configured LUN `lun`: the same, unless
/// `IRONSTAR_TEST_LUN_OFFSET` is set. That exists only to check the harness itself against
/// tgt (scripts/tgt-as-iscsitd.sh), whose LUN 0 is always its controller.
pub fn client_lun(lun: u32) -> u32 {
    let offset = env::var("IRONSTAR_TEST_LUN_OFFSET")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    lun.saturating_add(offset)
}

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A running daemon; killed on drop.
pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    dir: TempDir,
    /// Set by [`Daemon::kill`]: the exit was ours.
    killed: bool,
}

impl Daemon {
    /// Starts `iscsitd --config FILE` with `cfg` on a free loopback port and waits until the
    /// portal accepts. Panics with the daemon's log if it does not come up.
    pub fn start(cfg: &Config) -> Daemon {
        let bin = binary();
        assert!(
            bin.is_file(),
            "daemon binary {} not found: build it with `cargo build --release --bins` \
             (or point IRONSTAR_ISCSITD at one)",
            bin.display()
        );
        let dir = TempDir::new("ironstar-iscsitd").expect("create temp dir");
        // Another process may take the port between our probe and the daemon's bind: retry.
        let mut last_err = String::new();
        let mut last_conf = String::new();
        for attempt in 1..=3 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let conf = dir.path().join("iscsitd.toml");
            last_conf = cfg.to_toml(addr);
            fs::write(&conf, &last_conf).expect("write config");
            let log = dir.path().join(format!("iscsitd-{attempt}.log"));
            let log_file = fs::File::create(&log).expect("create log");
            let log_file2 = log_file.try_clone().expect("dup log");
            let mut child = Command::new(&bin)
                .arg("--config")
                .arg(&conf)
                .arg("--socket")
                .arg(dir.path().join("iscsitd.sock"))
                .env(
                    "RUST_LOG",
                    env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::from(log_file))
                .stderr(Stdio::from(log_file2))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            match wait_ready(&mut child, addr) {
                Ok(()) => {
                    println!(
                        "iscsitd pid {} listening on {addr} (log {})",
                        child.id(),
                        log.display()
                    );
                    return Daemon {
                        child,
                        addr,
                        log,
                        dir,
                        killed: false,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = format!(
                        "{e}\n--- iscsitd log ({}) ---\n{}",
                        log.display(),
                        tail(&log)
                    );
                    eprintln!("iscsitd attempt {attempt} failed: {last_err}");
                }
            }
        }
        panic!("iscsitd did not come up: {last_err}\nconfig was:\n{last_conf}");
    }

    /// The daemon's process id (for reading its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The portal as libiscsi wants it: `127.0.0.1:PORT`.
    pub fn portal(&self) -> String {
        self.addr.to_string()
    }

    /// `iscsi://127.0.0.1:PORT` (for discovery tools such as iscsi-ls).
    pub fn portal_url(&self) -> String {
        format!("iscsi://{}", self.addr)
    }

    /// `iscsi://127.0.0.1:PORT/IQN/LUN` for the configured LUN `lun` of the default target.
    pub fn lun_url(&self, lun: u32) -> String {
        format!("iscsi://{}/{TARGET_IQN}/{}", self.addr, client_lun(lun))
    }

    /// As [`Daemon::lun_url`], with CHAP credentials in libiscsi's `user%secret@` form.
    pub fn lun_url_chap(&self, user: &str, secret: &str, lun: u32) -> String {
        format!(
            "iscsi://{user}%{secret}@{}/{TARGET_IQN}/{}",
            self.addr,
            client_lun(lun)
        )
    }

    /// A scratch directory that lives as long as the daemon.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the daemon with SIGKILL (no goodbye to anyone) and reaps it.
    pub fn kill(&mut self) {
        self.killed = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while the process runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics with the log if the daemon has died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "iscsitd died during the test ({status}); log:\n{}",
                self.log_tail()
            );
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

fn wait_ready(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "iscsitd exited before accepting on {addr}: {status}"
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "iscsitd did not accept on {addr} within {START_TIMEOUT:?}"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file.
fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_else(|e| format!("(cannot read log: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!(
            "[... {skip} earlier lines in {} ...]\n",
            log.display()
        ));
    }
    for l in lines.iter().skip(skip) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let died = !self.killed && matches!(self.child.try_wait(), Ok(Some(_)));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- iscsitd log (test failed) ---\n{}", self.log_tail());
        } else if died {
            // A daemon that crashed under a test that otherwise passed is still a failure.
            panic!("iscsitd exited during the test; log:\n{}", self.log_tail());
        }
    }
}
