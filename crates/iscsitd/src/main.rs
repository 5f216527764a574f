//! # iscsitd — the Ironstar daemon
//!
//! Top of the map (`ARCHITECTURE.md`): loads the configuration (or the
//! embedded default), builds the targets and LUs, binds the portals and
//! serves until SIGINT/SIGTERM.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use iscsi_target::config::{Config, DEFAULT_TARGET_IQN};
use iscsi_target::{portal, Registry};

#[derive(Parser, Debug)]
#[command(name = "iscsitd", version, about = "Ironstar iSCSI target daemon")]
struct Args {
    /// Configuration file (TOML). Without it: one 1 GiB memory LU at 127.0.0.1:3260.
    #[arg(long, short)]
    config: Option<String>,
    /// Validate CONFIG and exit.
    #[arg(long, value_name = "CONFIG")]
    check: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(path) = &args.check {
        Config::load(path)?;
        println!("{path}: OK");
        return Ok(());
    }
    let (config, embedded) = match &args.config {
        Some(path) => (Config::load(path)?, false),
        None => (Config::embedded_default(), true),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(config, embedded))
}

async fn serve(config: Config, embedded: bool) -> anyhow::Result<()> {
    let registry = Arc::new(Registry::build(&config).context("building targets")?);
    let portals = portal::bind_all(&registry).await?;
    for p in &portals {
        tracing::info!(portal = %p.addr, tpgt = p.portal_group_tag, "listening");
    }
    for t in &registry.snapshot().targets {
        tracing::info!(target = %t.iqn, luns = t.luns.len(), "target ready");
    }
    if embedded {
        if let Some(p) = portals.first() {
            eprintln!(
                "iscsitd: serving {DEFAULT_TARGET_IQN} (LUN 0: 1 GiB in memory) on {addr}\n\
                 connect with:\n  iscsi-ls -s iscsi://{addr}\n  \
                 iscsi-inq iscsi://{addr}/{DEFAULT_TARGET_IQN}/0\n  \
                 qemu-img info iscsi://{addr}/{DEFAULT_TARGET_IQN}/0\n  \
                 iscsiadm -m discovery -t st -p {addr}",
                addr = p.addr
            );
        }
    }
    let mut tasks = Vec::new();
    for p in portals {
        tasks.push(tokio::spawn(p.run(registry.clone())));
    }
    shutdown_signal().await;
    tracing::info!("shutting down: asking initiators to log out");
    for p in &tasks {
        p.abort();
    }
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
    for t in tasks {
        t.abort();
    }
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
