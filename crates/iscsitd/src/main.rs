//! # iscsitd — the Ironstar daemon
//!
//! Top of the map (`ARCHITECTURE.md`): loads the configuration document,
//! builds the live registry (targets, LUs, views), binds the portals,
//! serves the JSON-RPC administration API on a Unix socket ([`rpc`],
//! [`admin`]) and writes every change back atomically ([`store`]) before
//! answering, and keeps the configured iSNS servers informed ([`isns`]).
//! Runs until SIGINT/SIGTERM.

mod admin;
mod inspect;
mod isns;
mod jsonrpc;
mod lu_meta;
mod metrics_http;
mod rpc;
mod store;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use iscsi_target::config::{Config, DEFAULT_TARGET_IQN};
use iscsi_target::Registry;

/// Where the configuration lives unless `--config` says otherwise.
const DEFAULT_CONFIG: &str = "/etc/ironstar/iscsitd.toml";
/// Where the administration socket lives unless `--socket` says otherwise.
const DEFAULT_SOCKET: &str = "/run/ironstar/iscsitd.sock";

#[derive(Parser, Debug)]
#[command(
    name = "iscsitd",
    version,
    about = "Ironstar iSCSI target daemon",
    after_help = "Examples:\n  iscsitd --config /etc/ironstar/iscsitd.toml\n  iscsitd --check packaging/iscsitd.toml\n  iscsitd            # one 1 GiB memory LU at 127.0.0.1:3260 when /etc/ironstar/iscsitd.toml is absent"
)]
struct Args {
    /// Configuration file (TOML); changes made with itadm/stmfadm are written
    /// back to it. Default: /etc/ironstar/iscsitd.toml, or (when that is
    /// absent) one 1 GiB memory LU at 127.0.0.1:3260.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The JSON-RPC administration socket (mode 0600).
    #[arg(long, short, env = "IRONSTAR_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Validate CONFIG, report every problem, and exit.
    #[arg(long, value_name = "CONFIG")]
    check: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iscsitd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(path) = &args.check {
        let config = Config::load(path).map_err(one_line)?;
        // A file LU without a size must exist (with one, it is created).
        let missing: Vec<String> = config
            .all_lus()
            .iter()
            .filter_map(|(l, at)| {
                let p = l.path.as_deref()?;
                (l.size.is_none() && !Path::new(p).exists()).then(|| match at {
                    Some((t, lun)) => format!("target {t} LUN {lun}: {p} does not exist"),
                    None => format!("LU {}: {p} does not exist", l.guid),
                })
            })
            .collect();
        if !missing.is_empty() {
            anyhow::bail!("{path}: invalid configuration:\n  {}", missing.join("\n  "));
        }
        println!("{path}: OK");
        return Ok(());
    }
    let (config, path, embedded) = match &args.config {
        Some(path) => (load(path)?, path.clone(), false),
        None if Path::new(DEFAULT_CONFIG).exists() => (
            load(Path::new(DEFAULT_CONFIG))?,
            DEFAULT_CONFIG.into(),
            false,
        ),
        None => (Config::embedded_default(), DEFAULT_CONFIG.into(), true),
    };
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(args, config, path, embedded))
}

/// Each connection is a socket: lift the soft open-file limit to the hard one (what
/// systemd's LimitNOFILE would set), so a shell's default of 1024 does not cap sessions.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(soft, "could not raise the open-file limit");
            }
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(&path.to_string_lossy()).map_err(one_line)
}

/// The error's own text: it already names its cause, and `{:#}` would
/// repeat it.
fn one_line(e: iscsi_target::config::ConfigError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

async fn serve(args: Args, config: Config, path: PathBuf, embedded: bool) -> anyhow::Result<()> {
    let swept = store::sweep_stale_temps(&path);
    if swept > 0 {
        tracing::info!(
            swept,
            "removed temporary files of an interrupted configuration write"
        );
    }
    let registry = Arc::new(Registry::build(&config).context("building targets")?);
    let admin = Arc::new(admin::Admin::start(registry.clone(), path.clone()).await?);
    for t in &registry.snapshot().targets {
        tracing::info!(target = %t.iqn, luns = t.luns.len(), "target ready");
    }
    let isns = isns::IsnsClient::spawn(registry.clone(), &path);
    admin.set_isns_status(isns.status());
    let socket_explicit = args.socket != Path::new(DEFAULT_SOCKET);
    let rpc_task = match rpc::bind(&args.socket).await {
        Ok(l) => {
            tracing::info!(socket = %args.socket.display(), config = %path.display(), "administration socket ready");
            Some(tokio::spawn(rpc::serve(
                l,
                admin.clone(),
                args.socket.clone(),
            )))
        }
        Err(e) if !socket_explicit => {
            // Several daemons on one host (tests, or a second instance
            // with its own --config) must not refuse to serve because the
            // default socket is taken; only an explicit --socket is fatal.
            tracing::warn!(error = %e, "no administration socket (pass --socket PATH for one)");
            None
        }
        Err(e) => return Err(e),
    };
    if embedded {
        if let Some(addr) = admin.portal_addrs().await.first() {
            eprintln!(
                "iscsitd: serving {DEFAULT_TARGET_IQN} (LUN 0: 1 GiB in memory) on {addr}\n\
                 connect with:\n  iscsi-ls -s iscsi://{addr}\n  \
                 iscsi-inq iscsi://{addr}/{DEFAULT_TARGET_IQN}/0\n  \
                 qemu-img info iscsi://{addr}/{DEFAULT_TARGET_IQN}/0\n  \
                 iscsiadm -m discovery -t st -p {addr}"
            );
        }
    }
    shutdown_signal().await;
    tracing::info!("shutting down: asking initiators to log out");
    if let Some(t) = &rpc_task {
        t.abort();
        let _ = std::fs::remove_file(&args.socket);
    }
    admin.stop_portals().await;
    isns.shutdown().await;
    // RFC 7143 §11.9: Async Message "logout requested" lets initiators
    // finish in-flight I/O and log out cleanly; whoever is left after the
    // grace period is disconnected.
    for s in registry.sessions.all() {
        s.request_logout();
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while !registry.sessions.all().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for s in registry.sessions.all() {
        s.close_all();
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
