//! I/O counters and latency histograms per target, per logical unit and
//! per session, as the administration API and the Prometheus exposition
//! show them.
//!
//! The hot path only adds to atomics ([`IoStats::record`]): no lock, no
//! allocation per command. A session takes its target's and each LU's
//! counters once (from [`Metrics`], behind a lock) and keeps the `Arc`s.
//! Latencies go into fixed log2 buckets of microseconds, so a histogram is
//! a fixed array whatever the load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

/// Number of latency buckets: bucket 0 counts latencies under 1 µs, bucket
/// `i` (1..BUCKETS-1) those under 2^i µs and at least 2^(i-1) µs; the last
/// one is everything slower (+Inf).
pub const BUCKETS: usize = 26;

/// Upper bound of bucket `i` in microseconds (`None`: +Inf).
pub fn bucket_le_us(i: usize) -> Option<u64> {
    (i + 1 < BUCKETS).then(|| 1u64 << i)
}

/// Monotonic nanoseconds since the clock started: cheap to store in an
/// atomic, unlike `Instant`, and cheap to read. On x86_64 with an
/// invariant TSC it reads the TSC (about 10–30 ns; `Instant::now` costs
/// 140–300 ns on the VMs we run on, too much twice per command); elsewhere
/// it falls back to `Instant`. Only differences are meaningful.
pub fn now_ns() -> u64 {
    clock().now()
}

/// Starts (calibrates) the clock now rather than on the first command;
/// calibration takes about 10 ms.
pub fn start_clock() {
    clock();
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(Clock::calibrate)
}

struct Clock {
    epoch: Instant,
    /// (TSC at the epoch, nanoseconds per tick as a 32.32 fixed point).
    tsc: Option<(u64, u64)>,
}

impl Clock {
    fn calibrate() -> Clock {
        let epoch = Instant::now();
        let tsc = tsc::read().and_then(|t0| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            let (i1, t1) = (Instant::now(), tsc::read()?);
            let ns = u64::try_from(i1.duration_since(epoch).as_nanos()).ok()?;
            let ticks = t1.checked_sub(t0).filter(|t| *t > 0)?;
            let mult = u64::try_from((u128::from(ns) << 32) / u128::from(ticks)).ok()?;
            Some((t0, mult))
        });
        Clock { epoch, tsc }
    }

    fn now(&self) -> u64 {
        if let Some((t0, mult)) = self.tsc {
            if let Some(t) = tsc::read() {
                let ticks = t.saturating_sub(t0);
                return u64::try_from((u128::from(ticks) * u128::from(mult)) >> 32)
                    .unwrap_or(u64::MAX);
            }
        }
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(target_arch = "x86_64")]
mod tsc {
    use std::sync::OnceLock;

    /// The TSC, when it ticks at a constant rate in every power state
    /// (Linux's `constant_tsc` and `nonstop_tsc` flags).
    pub fn read() -> Option<u64> {
        static INVARIANT: OnceLock<bool> = OnceLock::new();
        let ok = *INVARIANT.get_or_init(|| {
            std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
                c.lines().find(|l| l.starts_with("flags")).is_some_and(|f| {
                    f.split_whitespace().any(|x| x == "constant_tsc")
                        && f.split_whitespace().any(|x| x == "nonstop_tsc")
                })
            })
        });
        // SAFETY: RDTSC exists on every x86_64 CPU and has no memory effects.
        ok.then(|| unsafe { core::arch::x86_64::_rdtsc() })
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod tsc {
    pub fn read() -> Option<u64> {
        None
    }
}

/// A latency histogram with fixed log2 buckets.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A histogram read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HistogramSnapshot {
    /// Per-bucket (not cumulative) counts; see [`BUCKETS`].
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
    pub count: u64,
}

impl Histogram {
    pub fn record(&self, ns: u64) {
        let us = ns / 1000;
        let i = (u64::BITS - us.leading_zeros()) as usize;
        let i = i.min(BUCKETS - 1);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            buckets,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// The upper bound (µs) of the bucket holding quantile `q` (0..=1);
    /// `None` when empty or in the +Inf bucket.
    pub fn quantile_le_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return bucket_le_us(i);
            }
        }
        None
    }
}

/// The direction of a finished command's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    None,
    Read,
    Write,
    Bidi,
}

impl Dir {
    pub fn from_flags(read: bool, write: bool) -> Dir {
        match (read, write) {
            (true, true) => Dir::Bidi,
            (true, false) => Dir::Read,
            (false, true) => Dir::Write,
            (false, false) => Dir::None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dir::None => "none",
            Dir::Read => "read",
            Dir::Write => "write",
            Dir::Bidi => "bidi",
        }
    }
}

/// One finished command, as the counters see it.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    pub dir: Dir,
    /// Data-In bytes sent to the initiator.
    pub bytes_read: u64,
    /// Data-Out bytes taken from the initiator.
    pub bytes_written: u64,
    /// SCSI status.
    pub status: u8,
    pub latency_ns: u64,
}

/// SAM status codes the counters tell apart.
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const CONDITION_MET: u8 = 0x04;

/// Counters of one LU or session (a target's are its sessions' summed,
/// see `SessionTable::target_io`). The command count is the latency
/// histogram's, one atomic less per command.
#[derive(Default)]
pub struct IoStats {
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Commands that ended with CHECK CONDITION.
    pub check_conditions: AtomicU64,
    /// Other non-GOOD statuses (BUSY, TASK SET FULL, RESERVATION CONFLICT).
    pub other_errors: AtomicU64,
    /// Tasks ended by task management (ABORT TASK, ABORT/CLEAR TASK SET,
    /// resets) before they completed.
    pub task_aborts: AtomicU64,
    pub latency: Histogram,
}

/// [`IoStats`] read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IoSnapshot {
    pub commands: u64,
    pub read_commands: u64,
    pub write_commands: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub check_conditions: u64,
    pub other_errors: u64,
    pub task_aborts: u64,
    pub latency: HistogramSnapshot,
}

impl IoStats {
    /// Counts one finished command: a handful of relaxed atomic adds.
    pub fn record(&self, f: &Finished) {
        let add = |a: &AtomicU64, n: u64| {
            if n != 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        match f.dir {
            Dir::Read => add(&self.read_commands, 1),
            Dir::Write => add(&self.write_commands, 1),
            Dir::Bidi => {
                add(&self.read_commands, 1);
                add(&self.write_commands, 1);
            }
            Dir::None => {}
        }
        add(&self.bytes_read, f.bytes_read);
        add(&self.bytes_written, f.bytes_written);
        match f.status {
            GOOD | CONDITION_MET => {}
            CHECK_CONDITION => add(&self.check_conditions, 1),
            _ => add(&self.other_errors, 1),
        }
        self.latency.record(f.latency_ns);
    }

    pub fn aborted(&self, n: u64) {
        if n != 0 {
            self.task_aborts.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> IoSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let latency = self.latency.snapshot();
        IoSnapshot {
            commands: latency.count,
            read_commands: l(&self.read_commands),
            write_commands: l(&self.write_commands),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            check_conditions: l(&self.check_conditions),
            other_errors: l(&self.other_errors),
            task_aborts: l(&self.task_aborts),
            latency,
        }
    }

    /// Adds a finished session's counters (its target keeps them).
    pub fn absorb(&self, s: &IoSnapshot) {
        let add = |a: &AtomicU64, n: u64| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.read_commands, s.read_commands);
        add(&self.write_commands, s.write_commands);
        add(&self.bytes_read, s.bytes_read);
        add(&self.bytes_written, s.bytes_written);
        add(&self.check_conditions, s.check_conditions);
        add(&self.other_errors, s.other_errors);
        add(&self.task_aborts, s.task_aborts);
        for (b, n) in self.latency.buckets.iter().zip(&s.latency.buckets) {
            add(b, *n);
        }
        add(&self.latency.sum_ns, s.latency.sum_ns);
    }
}

impl IoSnapshot {
    /// Sums `other` into `self`.
    pub fn add(&mut self, o: &IoSnapshot) {
        self.commands += o.commands;
        self.read_commands += o.read_commands;
        self.write_commands += o.write_commands;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.check_conditions += o.check_conditions;
        self.other_errors += o.other_errors;
        self.task_aborts += o.task_aborts;
        let l = &mut self.latency;
        if l.buckets.len() < o.latency.buckets.len() {
            l.buckets.resize(o.latency.buckets.len(), 0);
        }
        for (b, n) in l.buckets.iter_mut().zip(&o.latency.buckets) {
            *b += n;
        }
        l.sum_ns += o.latency.sum_ns;
        l.count += o.latency.count;
    }
}

/// The process's counters per target (by lower-case name: what its ended
/// sessions did) and per LU (by the LU's NAA id, i.e. its GUID). They outlive configuration changes:
/// a target or LU keeps its counters while it exists, and the daemon
/// forgets them ([`Metrics::retain`]) when it goes away.
#[derive(Default)]
pub struct Metrics {
    targets: Mutex<HashMap<String, Arc<IoStats>>>,
    lus: Mutex<HashMap<u64, Arc<IoStats>>>,
}

impl Metrics {
    /// The counters of target `iqn` (made on first use).
    pub fn target(&self, iqn: &str) -> Arc<IoStats> {
        let mut m = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(iqn.to_ascii_lowercase()).or_default().clone()
    }

    /// The counters of the LU whose NAA id is `id` (made on first use).
    pub fn lu(&self, id: u64) -> Arc<IoStats> {
        let mut m = self.lus.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id).or_default().clone()
    }

    /// The counters of a target, if it has any yet.
    pub fn target_if_any(&self, iqn: &str) -> Option<Arc<IoStats>> {
        let m = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&iqn.to_ascii_lowercase()).cloned()
    }

    pub fn lu_if_any(&self, id: u64) -> Option<Arc<IoStats>> {
        let m = self.lus.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&id).cloned()
    }

    /// Forgets the counters of targets and LUs no longer configured.
    pub fn retain(&self, targets: &[String], lus: &[u64]) {
        let targets: Vec<String> = targets.iter().map(|t| t.to_ascii_lowercase()).collect();
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| targets.contains(k));
        self.lus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| lus.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_follows_real_time() {
        let a = now_ns();
        let i = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ns = now_ns() - a;
        let real = i.elapsed().as_nanos() as u64;
        // Within 5% (the TSC is calibrated over 10 ms).
        assert!(
            ns.abs_diff(real) < real / 20,
            "clock {ns} ns, real {real} ns"
        );
    }

    #[test]
    fn latencies_land_in_log2_microsecond_buckets() {
        let h = Histogram::default();
        h.record(500); // 0 µs
        h.record(1_000); // 1 µs
        h.record(3_999); // 3 µs
        h.record(4_000); // 4 µs
        h.record(u64::MAX); // beyond the last bound
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[2], 1);
        assert_eq!(s.buckets[3], 1);
        assert_eq!(s.buckets[BUCKETS - 1], 1);
        assert_eq!(bucket_le_us(3), Some(8));
        assert_eq!(bucket_le_us(BUCKETS - 1), None);
    }

    #[test]
    fn record_counts_bytes_directions_and_errors() {
        let s = IoStats::default();
        let f = |dir, r, w, status| Finished {
            dir,
            bytes_read: r,
            bytes_written: w,
            status,
            latency_ns: 10_000,
        };
        s.record(&f(Dir::Write, 0, 4096, GOOD));
        s.record(&f(Dir::Read, 512, 0, GOOD));
        s.record(&f(Dir::None, 0, 0, CHECK_CONDITION));
        s.record(&f(Dir::None, 0, 0, 0x28));
        s.aborted(2);
        let n = s.snapshot();
        let t = IoStats::default();
        t.absorb(&n);
        let mut twice = t.snapshot();
        twice.add(&n);
        assert_eq!(twice.bytes_written, 8192);
        assert_eq!(twice.latency.count, 8);
        assert_eq!(n.commands, 4);
        assert_eq!((n.read_commands, n.write_commands), (1, 1));
        assert_eq!((n.bytes_read, n.bytes_written), (512, 4096));
        assert_eq!((n.check_conditions, n.other_errors), (1, 1));
        assert_eq!(n.task_aborts, 2);
        assert_eq!(n.latency.quantile_le_us(0.5), Some(16));
    }

    #[test]
    fn metrics_are_shared_by_name_and_forgotten_when_gone() {
        let m = Metrics::default();
        let a = m.target("iqn.2026-11.x:A");
        assert!(Arc::ptr_eq(&a, &m.target("IQN.2026-11.X:a")));
        m.lu(7);
        m.retain(&[], &[7]);
        assert!(m.target_if_any("iqn.2026-11.x:a").is_none());
        assert!(m.lu_if_any(7).is_some());
    }
}
