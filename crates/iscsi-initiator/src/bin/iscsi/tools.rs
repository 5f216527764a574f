//! The longer-running subcommands: `dd` (copies with a progress line),
//! `bench` (IOPS, throughput and latency percentiles) and `nbd` (a LUN as
//! an NBD export).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use iscsi_initiator::nbd::{self, Export};
use iscsi_initiator::scsi;
use iscsi_initiator::url::IscsiUrl;

use crate::{human, open_lun, Common};

/// Reads `4k`, `1M`, `64MiB`, `512` (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().with_context(|| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => bail!("unknown size unit {other:?} in {s:?}"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("{s:?} is too large"))
}

#[derive(Args)]
pub struct DdArgs {
    /// Source: an iscsi:// URL, a file, or `-` for stdin.
    #[arg(long = "if")]
    input: String,
    /// Destination: an iscsi:// URL, a file, or `-` for stdout.
    #[arg(long = "of")]
    output: String,
    /// Bytes moved per step (a multiple of the block size).
    #[arg(long, default_value = "8M")]
    bs: String,
    /// Steps to copy (default: until the end of the source).
    #[arg(long)]
    count: Option<u64>,
    /// First LBA on the LUN side.
    #[arg(long, default_value_t = 0)]
    lba: u64,
    /// Show the progress line even when stderr is not a terminal.
    #[arg(long)]
    progress: bool,
}

struct Progress {
    enabled: bool,
    started: Instant,
    last: Instant,
    total: Option<u64>,
}

impl Progress {
    fn new(force: bool, total: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            enabled: force || std::io::stderr().is_terminal(),
            started: now,
            last: now,
            total,
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs / (1 << 20) as f64;
        match self.total {
            Some(t) if t > 0 => format!(
                "{} / {} ({:.0}%) {:.1} MiB/s",
                human(done),
                human(t),
                done as f64 * 100.0 / t as f64,
                rate
            ),
            _ => format!("{} {:.1} MiB/s", human(done), rate),
        }
    }

    fn update(&mut self, done: u64) {
        // Long copies only: short ones would just flicker.
        if self.enabled
            && self.last.elapsed() >= Duration::from_millis(500)
            && self.started.elapsed() >= Duration::from_secs(1)
        {
            eprint!("\r{}\x1b[K", self.line(done));
            let _ = std::io::stderr().flush();
            self.last = Instant::now();
        }
    }

    fn finish(&self, done: u64) {
        if self.enabled && self.started.elapsed() >= Duration::from_secs(1) {
            eprint!("\r\x1b[K");
        }
        let secs = self.started.elapsed().as_secs_f64();
        eprintln!(
            "{done} bytes ({}) copied in {secs:.2} s, {:.1} MiB/s",
            human(done),
            done as f64 / secs.max(1e-9) / (1 << 20) as f64
        );
    }
}

pub async fn dd(c: &Common, a: DdArgs) -> Result<()> {
    let bs = parse_size(&a.bs)?;
    if bs == 0 {
        bail!("--bs must be above 0");
    }
    let from_lun = a.input.starts_with("iscsi://");
    let to_lun = a.output.starts_with("iscsi://");
    match (from_lun, to_lun) {
        (true, false) => dd_from_lun(c, &a, bs).await,
        (false, true) => dd_to_lun(c, &a, bs).await,
        (true, true) => bail!("LUN to LUN copies are not supported; go through a file or a pipe"),
        (false, false) => bail!("one side of dd must be an iscsi:// URL"),
    }
}

async fn dd_from_lun(c: &Common, a: &DdArgs, bs: u64) -> Result<()> {
    let (s, lun) = open_lun(c, &a.input).await?;
    let cap = lun.read_capacity().await.context("READ CAPACITY")?;
    let block = u64::from(cap.block_size);
    if bs % block != 0 {
        bail!("--bs {bs} is not a multiple of the {block}-byte block");
    }
    let available = cap.bytes().saturating_sub(a.lba.saturating_mul(block));
    let total = match a.count {
        Some(n) => n.saturating_mul(bs).min(available),
        None => available,
    };
    let mut out: Box<dyn Write> = if a.output == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(&a.output).with_context(|| format!("creating {}", a.output))?,
        )
    };
    let mut p = Progress::new(a.progress, Some(total));
    let mut done = 0u64;
    let lun2 = lun.clone();
    let read = move |at: u64, n: u64| {
        let lun = lun2.clone();
        tokio::spawn(async move {
            let blocks = u32::try_from(n / block).map_err(|_| anyhow!("--bs too large"))?;
            lun.read(at, blocks)
                .await
                .with_context(|| format!("reading {n} bytes at LBA {at}"))
        })
    };
    // One step read ahead while the previous one is written out.
    let mut next = (total > 0).then(|| read(a.lba, bs.min(total)));
    while let Some(pending) = next.take() {
        let data = pending.await.context("read task")??;
        let len = data.len() as u64;
        done += len;
        if done < total {
            next = Some(read(a.lba + done / block, bs.min(total - done)));
        }
        out.write_all(&data).context("writing the output")?;
        p.update(done);
    }
    out.flush().context("writing the output")?;
    p.finish(done);
    let _ = s.logout().await;
    Ok(())
}

/// Fills `buf` from `r` as far as it goes; returns the bytes read.
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(buf.get_mut(n..).unwrap_or(&mut [])) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn dd_to_lun(c: &Common, a: &DdArgs, bs: u64) -> Result<()> {
    let (s, lun) = open_lun(c, &a.output).await?;
    let cap = lun.read_capacity().await.context("READ CAPACITY")?;
    let block = u64::from(cap.block_size);
    if bs % block != 0 {
        bail!("--bs {bs} is not a multiple of the {block}-byte block");
    }
    let (mut input, size): (Box<dyn Read>, Option<u64>) = if a.input == "-" {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let f = std::fs::File::open(&a.input).with_context(|| format!("opening {}", a.input))?;
        let size = f.metadata().ok().map(|m| m.len());
        (Box::new(f), size)
    };
    let room = cap.bytes().saturating_sub(a.lba.saturating_mul(block));
    let limit = a.count.map(|n| n.saturating_mul(bs));
    let total = match (size, limit) {
        (Some(s), Some(l)) => Some(s.min(l)),
        (s, l) => s.or(l),
    };
    let mut p = Progress::new(a.progress, total);
    let mut done = 0u64;
    let mut padded = 0u64;
    let mut inflight: Option<tokio::task::JoinHandle<Result<()>>> = None;
    loop {
        let want = match limit {
            Some(l) => bs.min(l - done.min(l)),
            None => bs,
        };
        if want == 0 {
            break;
        }
        let mut buf = vec![0u8; want as usize];
        let n = fill(&mut input, &mut buf).context("reading the input")? as u64;
        if n == 0 {
            break;
        }
        let whole = n.div_ceil(block) * block;
        padded += whole - n;
        buf.truncate(whole as usize);
        if done + whole > room {
            bail!(
                "the input is larger than the LUN ({} from LBA {})",
                human(cap.bytes()),
                a.lba
            );
        }
        // Write this step while the next one is read.
        if let Some(prev) = inflight.take() {
            prev.await.context("write task")??;
        }
        let (lun2, at) = (lun.clone(), a.lba + done / block);
        inflight = Some(tokio::spawn(async move {
            lun2.write(at, Bytes::from(buf))
                .await
                .with_context(|| format!("writing {whole} bytes at LBA {at}"))
        }));
        done += n;
        p.update(done);
        if n < want {
            break;
        }
    }
    if let Some(prev) = inflight.take() {
        prev.await.context("write task")??;
    }
    lun.synchronize_cache().await.context("SYNCHRONIZE CACHE")?;
    p.finish(done);
    if padded > 0 {
        eprintln!("the last block was padded with {padded} zero bytes");
    }
    s.logout().await.context("logout")?;
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    url: String,
    /// read, write, randread or randwrite (writes destroy the LUN's data).
    #[arg(long, default_value = "randread")]
    rw: String,
    /// Bytes per command.
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Commands in flight (per session with --sessions).
    #[arg(long, alias = "iodepth", default_value_t = 32)]
    qd: usize,
    /// Sessions to log in, each with --qd commands in flight: many sessions
    /// from one process (fio runs a process per session).
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Bytes of the LUN to use from LBA 0 (default: all of it).
    #[arg(long)]
    span: Option<String>,
}

pub async fn bench(c: &Common, a: BenchArgs) -> Result<()> {
    let (write, random) = match a.rw.as_str() {
        "read" => (false, false),
        "write" => (true, false),
        "randread" => (false, true),
        "randwrite" => (true, true),
        other => bail!("--rw {other:?}: expected read, write, randread or randwrite"),
    };
    let bs = parse_size(&a.bs)?;
    if a.sessions == 0 || a.sessions > 1024 {
        bail!("--sessions {}: expected 1 to 1024", a.sessions);
    }
    let mut opened = Vec::with_capacity(a.sessions);
    for _ in 0..a.sessions {
        let (s, lun) = open_lun(c, &a.url).await?;
        // A new I_T nexus starts with a unit attention: take it here, not in the timed loop.
        lun.read_capacity().await.context("READ CAPACITY")?;
        opened.push((s, lun));
    }
    let Some((s, lun)) = opened.first() else {
        bail!("no session");
    };
    let cap = lun.read_capacity().await.context("READ CAPACITY")?;
    let block = u64::from(cap.block_size);
    if bs == 0 || bs % block != 0 || bs > 16 << 20 {
        bail!("--bs {bs} must be a multiple of the {block}-byte block, at most 16 MiB");
    }
    let span = match &a.span {
        Some(x) => parse_size(x)?.min(cap.bytes()),
        None => cap.bytes(),
    };
    let slots = span / bs;
    if slots == 0 {
        bail!("the LUN is smaller than one --bs");
    }
    let blocks = (bs / block) as u32;
    let qd = a.qd.max(1);
    let duration = Duration::from_secs_f64(a.duration.max(0.1));
    let seq = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from(
        (0..bs)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = tokio::task::JoinSet::new();
    let workers = opened
        .iter()
        .flat_map(|(_, lun)| std::iter::repeat_n(lun, qd))
        .enumerate();
    for (w, lun) in workers {
        let (lun, seq, errors, payload) = (
            lun.clone(),
            Arc::clone(&seq),
            Arc::clone(&errors),
            payload.clone(),
        );
        set.spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut x =
                0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            while Instant::now() < deadline {
                let slot = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % slots
                } else {
                    seq.fetch_add(1, Ordering::Relaxed) % slots
                };
                let lba = slot * (bs / block);
                let t = Instant::now();
                let r = if write {
                    lun.execute(&scsi::write(lba, blocks), Some(payload.clone()), 0)
                        .await
                } else {
                    lun.execute(&scsi::read(lba, blocks), None, bs as u32).await
                };
                match r {
                    Ok(_) => lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("iscsi: bench: {e}");
                        }
                    }
                }
            }
            lat
        });
    }
    let mut lat: Vec<u32> = Vec::new();
    while let Some(r) = set.join_next().await {
        lat.extend(r.context("bench worker")?);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let ios = lat.len() as f64;
    let pct = |q: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat.get(i).copied().unwrap_or(0)
    };
    let avg = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|v| f64::from(*v)).sum::<f64>() / ios
    };
    let p = s.params();
    println!(
        "bench: {} bs={} qd={} sessions={} connections={} duration={:.1} s span={}",
        a.rw,
        bs,
        qd,
        opened.len(),
        s.connection_commands().len(),
        secs,
        human(span)
    );
    println!(
        "  digests: header {} data {}",
        if p.header_digest { "CRC32C" } else { "None" },
        if p.data_digest { "CRC32C" } else { "None" }
    );
    println!(
        "IOPS: {:.0}  MB/s: {:.1}  (MiB/s: {:.1})",
        ios / secs,
        ios * bs as f64 / secs / 1e6,
        ios * bs as f64 / secs / (1 << 20) as f64
    );
    println!(
        "latency (us): avg {avg:.0}  p50 {}  p99 {}  p99.9 {}  max {}",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0)
    );
    println!("errors: {}", errors.load(Ordering::Relaxed));
    for (s, _) in &opened {
        let _ = s.logout().await;
    }
    if lat.is_empty() {
        bail!("no command completed");
    }
    Ok(())
}

#[derive(Args)]
pub struct NbdArgs {
    url: String,
    /// Serve on this Unix socket (`nbd+unix:///?socket=PATH`).
    #[arg(long, conflicts_with = "port")]
    socket: Option<PathBuf>,
    /// Serve on this TCP port (`nbd://ADDR:PORT`); 0 picks one.
    #[arg(long)]
    port: Option<u16>,
    /// Address for --port (loopback unless you mean it).
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Export name (clients asking for another still get this export).
    #[arg(long, default_value = "")]
    name: String,
    /// Exit after the first client disconnects.
    #[arg(long)]
    once: bool,
}

pub async fn nbd(c: &Common, a: NbdArgs) -> Result<()> {
    let (s, lun) = open_lun(c, &a.url).await?;
    let target = IscsiUrl::parse(&a.url)?.target;
    let export = Arc::new(
        Export::new(lun, a.name.clone())
            .await
            .context("READ CAPACITY")?,
    );
    let what = format!(
        "{} ({}, {}-byte blocks) of {target}",
        a.url.rsplit('/').next().map_or("LUN", |l| l),
        human(export.size),
        export.block_size
    );
    let log = |e: nbd::NbdError| tracing::warn!(error = %e, "NBD client ended");
    match (&a.socket, a.port) {
        (Some(path), _) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            eprintln!(
                "NBD server on nbd+unix:///?socket={} exporting LUN {what}",
                path.display()
            );
            loop {
                let (stream, _) = l.accept().await.context("accept")?;
                let job = nbd::serve(stream, Arc::clone(&export));
                if a.once {
                    job.await.unwrap_or_else(log);
                    break;
                }
                tokio::spawn(async move { job.await.unwrap_or_else(log) });
            }
            let _ = std::fs::remove_file(path);
        }
        (None, Some(port)) => {
            let l = tokio::net::TcpListener::bind((a.bind.as_str(), port))
                .await
                .with_context(|| format!("binding {}:{port}", a.bind))?;
            let at = l.local_addr().context("local address")?;
            eprintln!("NBD server on nbd://{at} exporting LUN {what}");
            loop {
                let (stream, _) = l.accept().await.context("accept")?;
                let _ = stream.set_nodelay(true);
                let job = nbd::serve(stream, Arc::clone(&export));
                if a.once {
                    job.await.unwrap_or_else(log);
                    break;
                }
                tokio::spawn(async move { job.await.unwrap_or_else(log) });
            }
        }
        (None, None) => bail!("give --socket PATH or --port PORT"),
    }
    let _ = s.logout().await;
    Ok(())
}
