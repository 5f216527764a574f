//! Soak: many sessions doing verified writes and reads while connections churn — closed
//! cleanly, dropped in the middle of a write, or logged in again over an open session
//! (reinstatement) — for `IRONSTAR_SOAK_SECS` seconds (default 20 here; the documented long
//! run is 1800). At the end: no verification error, the daemon alive, its file descriptors
//! back to where they started, and its memory bounded; the figures are printed.
//!
//!     IRONSTAR_SOAK_SECS=1800 cargo test --release -p ironstar-interop --test soak -- --nocapture

use std::collections::HashMap;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironstar_interop::config::Config;
use ironstar_interop::daemon::Daemon;
use ironstar_interop::raw::{rss_bytes, rw10, RawConn};
use ironstar_interop::MIB;

const WORKERS: usize = 16;
/// Each worker owns its own region of the LU, so verification needs no coordination.
const REGION_BLOCKS: u32 = 4096; // 2 MiB of 512-byte blocks
const IO_BLOCKS: u16 = 8;

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

#[derive(Default, Debug)]
struct Tally {
    writes: u64,
    reads: u64,
    reconnects: u64,
    torn_writes: u64,
}

/// One worker: its own session(s) on its own region; returns what it did.
fn worker(addr: std::net::SocketAddr, id: usize, until: Instant) -> Tally {
    let name = format!("iqn.2026-11.dev.ironstar:soak-{id}");
    let base = id as u32 * REGION_BLOCKS;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1) << 17);
    // lba -> seed of what was acknowledged there (None: unknown after a torn write).
    let mut known: HashMap<u32, Option<u64>> = HashMap::new();
    let mut t = Tally::default();
    let mut c = RawConn::login(addr, &name, false);
    c.clear_unit_attention();
    while Instant::now() < until {
        let lba = base
            + (rng.next() % u64::from(REGION_BLOCKS / u32::from(IO_BLOCKS))) as u32
                * u32::from(IO_BLOCKS);
        match rng.next() % 100 {
            0..=44 => {
                let seed = rng.next();
                let data = fill(seed, usize::from(IO_BLOCKS) * 512);
                let st = c.write_blocks(lba, &data, rng.next() % 4 == 0);
                assert!(st.good(), "worker {id}: WRITE at {lba} failed: {st:?}");
                known.insert(lba, Some(seed));
                t.writes += 1;
            }
            45..=89 => {
                let data = c.read_blocks(lba, IO_BLOCKS);
                if let Some(Some(seed)) = known.get(&lba) {
                    assert!(
                        data == fill(*seed, data.len()),
                        "worker {id}: LBA {lba} does not hold what was acknowledged"
                    );
                }
                t.reads += 1;
            }
            90..=94 => {
                // Clean close, new session.
                c.close();
                c = RawConn::login(addr, &name, false);
                c.clear_unit_attention();
                t.reconnects += 1;
            }
            95..=97 => {
                // A WRITE torn off mid-data: half its data, then the socket goes.
                let itt = c.itt();
                let w = c.scsi_command(itt, &rw10(0x2a, lba, IO_BLOCKS), false, true, 4096);
                assert!(c.send(&w));
                let r2t = c
                    .recv_until(|p| p.itt() == itt && p.opcode_byte() == 0x31)
                    .pdu();
                let ttt = u32::from_be_bytes([r2t.bhs[20], r2t.bhs[21], r2t.bhs[22], r2t.bhs[23]]);
                let half = c.data_out(itt, ttt, 0, false, Bytes::from(vec![0xffu8; 2048]));
                assert!(c.send(&half));
                c.close();
                known.insert(lba, None);
                c = RawConn::login(addr, &name, false);
                c.clear_unit_attention();
                t.torn_writes += 1;
            }
            _ => {
                // Session reinstatement: log in again over the open session, then drop the old.
                let fresh = RawConn::login(addr, &name, false);
                drop(std::mem::replace(&mut c, fresh));
                c.clear_unit_attention();
                t.reconnects += 1;
            }
        }
    }
    // Final sweep: everything acknowledged is there.
    for (lba, seed) in &known {
        if let Some(seed) = seed {
            let data = c.read_blocks(*lba, IO_BLOCKS);
            assert!(
                data == fill(*seed, data.len()),
                "worker {id}: LBA {lba} lost at the final sweep"
            );
        }
    }
    c.close();
    t
}

#[test]
fn soak_many_sessions_verified_io_with_connection_churn() {
    let secs: u64 = std::env::var("IRONSTAR_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut cfg = Config::single_memory_lu(u64::from(REGION_BLOCKS) * 512 * WORKERS as u64 + MIB);
    cfg.defaults.push("nop_in_interval = 5".into());
    let mut d = Daemon::start(&cfg);
    thread::sleep(Duration::from_millis(300));
    let (rss0, fds0) = (rss_bytes(d.pid()), open_fds(d.pid()));
    let until = Instant::now() + Duration::from_secs(secs);
    let addr = d.addr();
    let handles: Vec<_> = (0..WORKERS)
        .map(|id| thread::spawn(move || worker(addr, id, until)))
        .collect();
    let mut peak_rss = rss0;
    while Instant::now() < until {
        thread::sleep(Duration::from_millis(500));
        peak_rss = peak_rss.max(rss_bytes(d.pid()));
        d.assert_alive();
    }
    let mut total = Tally::default();
    for h in handles {
        let t = h.join().expect("a soak worker failed");
        total.writes += t.writes;
        total.reads += t.reads;
        total.reconnects += t.reconnects;
        total.torn_writes += t.torn_writes;
    }
    // Let the daemon notice the last closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(d.pid()) > fds0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let (rss1, fds1) = (rss_bytes(d.pid()), open_fds(d.pid()));
    println!(
        "soak {secs} s, {WORKERS} sessions: {} verified writes, {} verified reads, {} reconnects, \
         {} torn writes, 0 errors; daemon RSS {} KiB at start, {} KiB peak, {} KiB at end; \
         fds {fds0} at start, {fds1} at end",
        total.writes,
        total.reads,
        total.reconnects,
        total.torn_writes,
        rss0 / 1024,
        peak_rss / 1024,
        rss1 / 1024
    );
    d.assert_alive();
    assert!(total.writes > 0 && total.reads > 0);
    assert!(fds1 <= fds0, "file descriptors leaked: {fds0} -> {fds1}");
    // The LU's own pages (up to its size) plus bounded per-session state.
    let lu_bytes = u64::from(REGION_BLOCKS) * 512 * WORKERS as u64;
    assert!(
        rss1 < rss0 + lu_bytes + 32 * MIB,
        "daemon memory grew from {rss0} to {rss1} bytes"
    );
}
