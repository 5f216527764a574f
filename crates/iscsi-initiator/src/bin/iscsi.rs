//! `iscsi`: the command-line initiator (discover, ls, inquiry, readcap,
//! read, write, dd, bench, nbd), a thin client of the `iscsi_initiator`
//! library.
//!
//! URLs are libiscsi's: `iscsi://[user[%password]@]host[:port]/iqn/lun`, and
//! `iser://...` for the same over iSER (RFC 7145, through rdma-core).
//! Secrets are better given by file (`--chap-secret-file`) or the
//! environment (`IRONSTAR_CHAP_SECRET` or `ISCSI_CHAP_SECRET`,
//! `IRONSTAR_TARGET_SECRET` or `ISCSI_TARGET_SECRET`) than on the command
//! line, where other users can read them.

/// `println!` that ends the program quietly when stdout is gone (`| head`),
/// as a shell tool should, instead of panicking on EPIPE.
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(141);
        }
    }};
}

#[path = "iscsi/tools.rs"]
mod tools;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use iscsi_initiator::conn::Link;
use iscsi_initiator::discovery::discover_over;
use iscsi_initiator::login::{Auth, ChapCredentials};
use iscsi_initiator::portal::Portal;
use iscsi_initiator::session::default_initiator_name;
use iscsi_initiator::url::{parse_portal, IscsiUrl};
use iscsi_initiator::{vpd, Lun, Session, SessionOptions};
use iscsi_proto::chap::ChapAlgorithm;

#[derive(Parser)]
#[command(name = "iscsi", version, about = "Ironstar iSCSI initiator")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone)]
pub(crate) struct Common {
    /// Our InitiatorName (default: derived from the host name).
    #[arg(long, global = true)]
    initiator_name: Option<String>,
    /// CHAP user name (the URL's user part also sets it).
    #[arg(long, global = true)]
    chap_user: Option<String>,
    /// File holding the CHAP secret (else $ISCSI_CHAP_SECRET, else the URL).
    #[arg(long, global = true)]
    chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP: the name the target must answer with.
    #[arg(long, global = true)]
    target_user: Option<String>,
    /// Mutual CHAP: file holding the target's secret (else $ISCSI_TARGET_SECRET).
    #[arg(long, global = true)]
    target_secret_file: Option<PathBuf>,
    /// CHAP algorithms to offer, in order: md5, sha1, sha256, sha3-256
    /// (default md5, which every target knows).
    #[arg(long, global = true, value_delimiter = ',')]
    chap_alg: Vec<String>,
    /// Ask for CRC32C header and data digests.
    #[arg(long, global = true)]
    digests: bool,
    /// Seconds allowed for a login and for each command.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    /// `ls`: use the CHAP credentials on the discovery session too (by
    /// default only the logins to each target use them).
    #[arg(long, global = true)]
    discovery_chap: bool,
    /// Connections per session (MC/S), as far as the target allows.
    #[arg(long, global = true, default_value_t = 1)]
    connections: u16,
    /// Seconds to keep trying to reinstate a lost session before failing
    /// its commands (0: no recovery).
    #[arg(long, global = true, default_value_t = 30)]
    replacement_timeout: u64,
    /// Another path to the same target, as `iscsi://host[:port]/iqn[/lun]`
    /// (another gateway's portal; the target must be the same). Repeatable. A
    /// login that cannot reach the URL's portal, or a lost session that cannot
    /// be reinstated there, moves to these in turn.
    #[arg(long = "path", global = true, value_name = "URL")]
    paths: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// SendTargets discovery: targets and their portals
    /// (`host[:port]`, or `iser://host[:port]` for iSER).
    Discover { portal: String },
    /// Targets behind a portal, with their LUNs, types and sizes
    /// (`iser://host[:port]`: discovery and logins over iSER).
    Ls { portal: String },
    /// Standard INQUIRY data and every supported VPD page, decoded (or one
    /// VPD page with --vpd).
    #[command(alias = "inq")]
    Inquiry {
        url: String,
        /// VPD page number (decimal or 0x..).
        #[arg(long)]
        vpd: Option<String>,
        /// Also dump each VPD page in hex.
        #[arg(long)]
        hex: bool,
    },
    /// READ CAPACITY: block count and size.
    Readcap { url: String },
    /// Read blocks to a file (or stdout).
    Read {
        url: String,
        #[arg(long)]
        lba: u64,
        #[arg(long)]
        blocks: u32,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Write a file (or stdin, `-`) at an LBA.
    Write {
        url: String,
        #[arg(long)]
        lba: u64,
        #[arg(short = 'i', long)]
        input: PathBuf,
    },
    /// Copy between a LUN and a file or stdin/stdout, either direction.
    Dd(tools::DdArgs),
    /// Measure IOPS, throughput and latency.
    Bench(tools::BenchArgs),
    /// Export a LUN as an NBD server (Unix socket or loopback port).
    Nbd(tools::NbdArgs),
}

fn read_secret(file: Option<&PathBuf>, env: &[&str]) -> Result<Option<Vec<u8>>> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f)
            .with_context(|| format!("reading the secret file {}", f.display()))?;
        return Ok(Some(s.trim_end_matches(['\n', '\r']).as_bytes().to_vec()));
    }
    Ok(env
        .iter()
        .find_map(|e| std::env::var(e).ok())
        .map(String::into_bytes))
}

impl Common {
    fn auth(&self, url: Option<&IscsiUrl>) -> Result<Auth> {
        let user = self
            .chap_user
            .clone()
            .or_else(|| url.and_then(|u| u.user.clone()));
        let secret = match read_secret(
            self.chap_secret_file.as_ref(),
            &["IRONSTAR_CHAP_SECRET", "ISCSI_CHAP_SECRET"],
        )? {
            Some(s) => Some(s),
            None => {
                let p = url.and_then(|u| u.password.clone());
                if p.is_some() {
                    eprintln!(
                        "iscsi: warning: a secret in the URL is visible to other users; \
                         prefer --chap-secret-file or $IRONSTAR_CHAP_SECRET"
                    );
                }
                p.map(String::into_bytes)
            }
        };
        let Some(user) = user else {
            if secret.is_some() {
                bail!("a CHAP secret was given without a CHAP user (--chap-user)");
            }
            return Ok(Auth::None);
        };
        let secret = secret.ok_or_else(|| {
            anyhow!(
                "CHAP user {user:?} needs a secret: --chap-secret-file or $IRONSTAR_CHAP_SECRET"
            )
        })?;
        let mut creds = ChapCredentials::new(user, secret);
        if !self.chap_alg.is_empty() {
            let algs = self
                .chap_alg
                .iter()
                .map(|a| match a.to_ascii_lowercase().as_str() {
                    "md5" => Ok(ChapAlgorithm::Md5),
                    "sha1" | "sha-1" => Ok(ChapAlgorithm::Sha1),
                    "sha256" | "sha-256" => Ok(ChapAlgorithm::Sha256),
                    "sha3-256" | "sha3_256" => Ok(ChapAlgorithm::Sha3_256),
                    other => Err(anyhow!("unknown CHAP algorithm {other:?}")),
                })
                .collect::<Result<Vec<_>>>()?;
            creds = creds.with_algorithms(algs);
        }
        if let Some(tuser) = &self.target_user {
            let tsecret = read_secret(
                self.target_secret_file.as_ref(),
                &["IRONSTAR_TARGET_SECRET", "ISCSI_TARGET_SECRET"],
            )?
            .ok_or_else(|| {
                anyhow!("mutual CHAP needs --target-secret-file or $IRONSTAR_TARGET_SECRET")
            })?;
            creds = creds.with_mutual(tuser.clone(), tsecret);
        }
        Ok(Auth::Chap(creds))
    }

    /// The portals of `--path`, checked against the main URL.
    fn other_portals(&self, url: &IscsiUrl) -> Result<Vec<Portal>> {
        self.paths
            .iter()
            .map(|p| {
                let other = IscsiUrl::parse(p).with_context(|| format!("--path {p}"))?;
                if other.target != url.target {
                    bail!(
                        "--path {p} leads to {}, not {}: a path is another way to the same target",
                        other.target,
                        url.target
                    );
                }
                if other.iser != url.iser {
                    bail!("--path {p}: every path uses the main URL's transport");
                }
                Ok(other.portal)
            })
            .collect()
    }

    fn initiator_name(&self) -> String {
        self.initiator_name
            .clone()
            .unwrap_or_else(default_initiator_name)
    }

    fn options(&self, url: Option<&IscsiUrl>) -> Result<SessionOptions> {
        let mut o = SessionOptions::new(self.initiator_name());
        o.auth = self.auth(url)?;
        o.header_digest = self.digests;
        o.data_digest = self.digests;
        o.login_timeout = Duration::from_secs(self.timeout);
        o.command_timeout = Duration::from_secs(self.timeout);
        o.connections = self.connections.max(1);
        o.replacement_timeout = Duration::from_secs(self.replacement_timeout);
        Ok(o)
    }
}

pub(crate) async fn open_lun(common: &Common, url: &str) -> Result<(Session, Lun)> {
    let url = IscsiUrl::parse(url)?;
    let lun = url
        .lun
        .ok_or_else(|| anyhow!("the URL names no LUN (iscsi://host/iqn/LUN)"))?;
    let mut opts = common.options(Some(&url))?;
    if url.iser {
        opts.link = Link::rdma();
    }
    opts.other_portals = common.other_portals(&url)?;
    let session = Session::login(&url.portal, &url.target, opts)
        .await
        .with_context(|| format!("logging in to {} at {}", url.target, url.portal))?;
    let l = session.lun(lun);
    Ok((session, l))
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS.get(u).copied().unwrap_or("B"))
    }
}

fn hex_dump(data: &[u8]) {
    for (i, row) in data.chunks(16).enumerate() {
        let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
        let txt: String = row
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!("  {:04x}  {:<48} {txt}", i * 16, hex.join(" "));
    }
}

fn parse_number(s: &str) -> Result<u8> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u8::from_str_radix(h, 16),
        None => s.parse(),
    };
    v.with_context(|| format!("{s:?} is not a page number (0-255)"))
}

async fn run(cli: Cli) -> Result<()> {
    let c = &cli.common;
    let timeout = Duration::from_secs(c.timeout);
    match cli.cmd {
        Command::Discover { portal } => {
            let (p, iser) = parse_portal(&portal)?;
            let link = if iser { Link::rdma() } else { Link::Tcp };
            let targets = discover_over(&link, &p, &c.initiator_name(), c.auth(None)?, timeout)
                .await
                .with_context(|| format!("discovery at {p}"))?;
            for t in targets {
                if t.portals.is_empty() {
                    println!("{p},? {}", t.name);
                }
                for (addr, tpgt) in &t.portals {
                    let tag = tpgt.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
                    println!("{addr},{tag} {}", t.name);
                }
            }
        }
        Command::Ls { portal } => {
            let (p, iser) = parse_portal(&portal)?;
            let link = if iser { Link::rdma() } else { Link::Tcp };
            let auth = if c.discovery_chap {
                c.auth(None)?
            } else {
                Auth::None
            };
            let targets = discover_over(&link, &p, &c.initiator_name(), auth, timeout)
                .await
                .with_context(|| format!("discovery at {p}"))?;
            for t in targets {
                println!("Target: {}", t.name);
                for (addr, tpgt) in &t.portals {
                    let tag = tpgt.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
                    println!("  Portal: {addr},{tag}");
                }
                let mut opts = c.options(None)?;
                opts.link = link.clone();
                let s = match Session::login(&p, &t.name, opts).await {
                    Ok(s) => s,
                    Err(e) => {
                        println!("  (cannot log in: {e})");
                        continue;
                    }
                };
                let luns = s.report_luns().await.context("REPORT LUNS")?;
                for n in luns {
                    let lun = s.lun(n);
                    let inq = lun.inquiry().await;
                    let (kind, ident) = match &inq {
                        Ok(i) => (
                            i.device_type_name(),
                            format!("{} {} {}", i.vendor, i.product, i.revision),
                        ),
                        Err(e) => ("?", format!("INQUIRY failed: {e}")),
                    };
                    let size = match (&inq, kind) {
                        (Ok(_), "disk") => match lun.read_capacity().await {
                            Ok(cap) => format!(
                                "{} ({} blocks of {})",
                                human(cap.bytes()),
                                cap.blocks(),
                                cap.block_size
                            ),
                            Err(e) => format!("READ CAPACITY failed: {e}"),
                        },
                        _ => "-".into(),
                    };
                    println!("  Lun {n}: {kind:<8} {ident:<40} {size}");
                }
                let _ = s.logout().await;
            }
        }
        Command::Inquiry { url, vpd, hex } => {
            let (s, lun) = open_lun(c, &url).await?;
            let pages = match vpd {
                None => {
                    let i = lun.inquiry().await.context("INQUIRY")?;
                    println!(
                        "Peripheral: {} (type {:#04x}, qualifier {})",
                        i.device_type_name(),
                        i.device_type,
                        i.peripheral_qualifier
                    );
                    println!("Removable:  {}", if i.removable { "yes" } else { "no" });
                    println!("Version:    {:#04x}", i.version);
                    println!("Vendor:     {}", i.vendor);
                    println!("Product:    {}", i.product);
                    println!("Revision:   {}", i.revision);
                    match lun.inquiry_vpd(0).await {
                        Ok(p0) => vpd::supported_pages(&p0),
                        Err(e) => {
                            println!("(no VPD pages: {e})");
                            Vec::new()
                        }
                    }
                }
                Some(page) => vec![parse_number(&page)?],
            };
            for page in pages {
                let data = lun
                    .inquiry_vpd(page)
                    .await
                    .with_context(|| format!("INQUIRY VPD page {page:#04x}"))?;
                println!();
                println!("VPD page {page:#04x}: {}", vpd::page_name(page));
                let fields = vpd::decode(&data);
                for (k, v) in &fields {
                    println!("  {k}: {v}");
                }
                if hex || fields.is_empty() {
                    hex_dump(&data);
                }
            }
            let _ = s.logout().await;
        }
        Command::Readcap { url } => {
            let (s, lun) = open_lun(c, &url).await?;
            let cap = lun.read_capacity().await.context("READ CAPACITY")?;
            println!("Block size: {}", cap.block_size);
            println!("Blocks:     {}", cap.blocks());
            println!("Last LBA:   {}", cap.last_lba);
            println!("Size:       {} bytes ({})", cap.bytes(), human(cap.bytes()));
            let _ = s.logout().await;
        }
        Command::Read {
            url,
            lba,
            blocks,
            output,
        } => {
            let (s, lun) = open_lun(c, &url).await?;
            let data = lun
                .read(lba, blocks)
                .await
                .with_context(|| format!("reading {blocks} blocks at LBA {lba}"))?;
            match output {
                Some(path) if path.as_os_str() != "-" => std::fs::write(&path, &data)
                    .with_context(|| format!("writing {}", path.display()))?,
                _ => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&data).context("writing to stdout")?;
                    out.flush().context("writing to stdout")?;
                }
            }
            let _ = s.logout().await;
        }
        Command::Write { url, lba, input } => {
            let data = if input.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut v)
                    .context("reading stdin")?;
                v
            } else {
                std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?
            };
            let (s, lun) = open_lun(c, &url).await?;
            let len = data.len();
            lun.write(lba, Bytes::from(data))
                .await
                .with_context(|| format!("writing {len} bytes at LBA {lba}"))?;
            eprintln!("wrote {len} bytes at LBA {lba}");
            s.logout().await.context("logout")?;
        }
        Command::Dd(a) => tools::dd(c, a).await?,
        Command::Bench(a) => tools::bench(c, a).await?,
        Command::Nbd(a) => tools::nbd(c, a).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISCSI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not escape codes in a piped or logged stderr.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // Two workers: one can read responses while the other sends (bench
    // measured 1.5x the IOPS of one); ISCSI_WORKERS overrides.
    let workers = std::env::var("ISCSI_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(2)
        .clamp(1, 64);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iscsi: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iscsi: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
