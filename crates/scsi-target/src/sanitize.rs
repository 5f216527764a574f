//! SANITIZE (SBC-4 §4.11 and the SANITIZE command): an operation of the
//! logical unit, not of the command that asked for it.
//!
//! The command checks its CDB and parameter list, and the operation then
//! runs on a thread of its own (one at most per LU, so it neither waits
//! behind nor holds up the LU's command threads). While it runs, every
//! command but INQUIRY, REPORT LUNS and REQUEST SENSE ends with NOT READY,
//! LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS and a progress indication;
//! REQUEST SENSE returns that sense data. Task management and I_T nexus
//! loss do not touch it: it lives in the LU, not in a task. With IMMED set
//! the command returns GOOD once the operation has started; without, its
//! status comes when the operation ends (and if the task was aborted in the
//! meantime, the operation still completes).
//!
//! A failed operation leaves the LU in the sanitize failure mode: medium
//! access commands (and TEST UNIT READY) end with MEDIUM ERROR, MEDIUM
//! FORMAT CORRUPTED and REQUEST SENSE reports SANITIZE COMMAND FAILED,
//! until a sanitize completes without error or, when the failed one had
//! AUSE set, EXIT FAILURE MODE. After a failure with AUSE clear, a
//! SANITIZE with AUSE set is refused (the restricted completion mode).
//!
//! The state changes in [`Phase`]'s methods, which take no locks and do no
//! I/O, so the rules are tested on their own.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::cdb::{be_at, op, sa, Cdb};
use crate::lu::LogicalUnit;
use crate::sbc::limits;
use crate::sense::{self, Sense};
use crate::{CmdResult, Fail, ScsiResponse, ScsiTask};

/// SANITIZE service actions.
mod action {
    pub const OVERWRITE: u8 = 0x01;
    pub const BLOCK_ERASE: u8 = 0x02;
    pub const EXIT_FAILURE_MODE: u8 = 0x1F;
}

/// A store that repeats the pattern itself (RBD's writesame) is asked for
/// this much at a time: librbd sends one request per object of it (64 of
/// 4 MiB) at once, and progress moves between steps. Others get buffers of
/// [`limits::PATTERN_PIECE_BYTES`].
const STORE_STEP_BYTES: u64 = 256 << 20;

/// Where the logical unit stands with regard to sanitize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No operation running; the last one, if any, succeeded.
    Idle,
    Running,
    /// The last operation failed; `ause` as its SANITIZE command had it.
    Failed {
        ause: bool,
    },
}

/// How a command meets the sanitize state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Proceed,
    InProgress,
    FormatCorrupted,
}

impl Phase {
    /// What a command with this operation code (and service action) meets.
    fn gate(self, opcode: u8, service_action: u8) -> Gate {
        match self {
            Phase::Idle => Gate::Proceed,
            Phase::Running => {
                if matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) {
                    Gate::Proceed
                } else {
                    Gate::InProgress
                }
            }
            Phase::Failed { .. } => {
                if medium_access(opcode, service_action) {
                    Gate::FormatCorrupted
                } else {
                    Gate::Proceed
                }
            }
        }
    }

    /// A sanitize operation with this AUSE may start.
    fn start(self, ause: bool) -> Result<Phase, Fail> {
        match self {
            Phase::Running => Err(Sense::new(sense::LU_NOT_READY_SANITIZE_IN_PROGRESS).into()),
            // Restricted completion mode: only another operation with AUSE
            // clear may end it.
            Phase::Failed { ause: false } if ause => Err(Sense::invalid_cdb(1, Some(5)).into()),
            _ => Ok(Phase::Running),
        }
    }

    /// EXIT FAILURE MODE.
    fn exit_failure_mode(self) -> Result<Phase, Fail> {
        match self {
            Phase::Running => Err(Sense::new(sense::LU_NOT_READY_SANITIZE_IN_PROGRESS).into()),
            Phase::Failed { ause: false } => Err(Sense::invalid_cdb(1, Some(4)).into()),
            // Nothing to leave when not failed: GOOD, as before.
            Phase::Failed { ause: true } | Phase::Idle => Ok(Phase::Idle),
        }
    }

    /// The operation that made this phase `Running` ended.
    fn finish(ok: bool, ause: bool) -> Phase {
        if ok {
            Phase::Idle
        } else {
            Phase::Failed { ause }
        }
    }
}

/// The commands that read or write the medium, refused in failure mode.
/// TEST UNIT READY is among them: it says whether they would work.
fn medium_access(opcode: u8, service_action: u8) -> bool {
    match opcode {
        op::SERVICE_ACTION_IN_16 => service_action == sa::GET_LBA_STATUS,
        op::TEST_UNIT_READY
        | op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_VERIFY_10
        | op::WRITE_VERIFY_12
        | op::WRITE_VERIFY_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
        | op::UNMAP
        | op::COMPARE_AND_WRITE
        | op::ORWRITE_16
        | op::WRITE_ATOMIC_16 => true,
        _ => false,
    }
}

/// The end of one operation, for the command that waits for it.
#[derive(Default)]
struct Outcome {
    ok: Mutex<Option<bool>>,
    ended: Condvar,
}

impl Outcome {
    fn set(&self, ok: bool) {
        *self.ok.lock().unwrap_or_else(|e| e.into_inner()) = Some(ok);
        self.ended.notify_all();
    }

    fn wait(&self) -> bool {
        let mut g = self.ok.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(ok) = *g {
                return ok;
            }
            g = self.ended.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The sanitize state of one logical unit.
pub(crate) struct SanitizeState {
    phase: Mutex<Phase>,
    /// Not `Idle`: lets every command skip the lock while nothing is on.
    active: AtomicBool,
    /// Bytes done and to do of the running operation (progress indication).
    done: AtomicU64,
    total: AtomicU64,
}

impl Default for SanitizeState {
    fn default() -> Self {
        SanitizeState {
            phase: Mutex::new(Phase::Idle),
            active: AtomicBool::new(false),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }
}

impl SanitizeState {
    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, p: &mut Phase, next: Phase) {
        *p = next;
        self.active.store(next != Phase::Idle, Ordering::Release);
    }

    /// The fraction done, in 65536ths.
    fn progress(&self) -> u16 {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        if total == 0 {
            return 0;
        }
        let f = u128::from(done) * 65536 / u128::from(total);
        u16::try_from(f).unwrap_or(u16::MAX)
    }

    fn in_progress(&self) -> Sense {
        Sense::new(sense::LU_NOT_READY_SANITIZE_IN_PROGRESS).with_progress(self.progress())
    }
}

/// Refuses the command if the sanitize state says so (called for every
/// command after unit attentions and reservations are checked).
pub(crate) fn gate(lu: &LogicalUnit, cdb: Cdb<'_>) -> Result<(), Fail> {
    let s = &lu.sanitize;
    if !s.active.load(Ordering::Acquire) {
        return Ok(());
    }
    match s.phase().gate(cdb.opcode(), cdb.service_action()) {
        Gate::Proceed => Ok(()),
        Gate::InProgress => Err(s.in_progress().into()),
        Gate::FormatCorrupted => Err(sense::MEDIUM_FORMAT_CORRUPTED.into()),
    }
}

/// What REQUEST SENSE reports when no unit attention is pending: the
/// sanitize in progress (with its progress), or its failure.
pub(crate) fn condition(lu: &LogicalUnit) -> Option<Sense> {
    let s = &lu.sanitize;
    if !s.active.load(Ordering::Acquire) {
        return None;
    }
    match s.phase() {
        Phase::Idle => None,
        Phase::Running => Some(s.in_progress()),
        Phase::Failed { .. } => Some(Sense::new(sense::SANITIZE_COMMAND_FAILED)),
    }
}

/// Whether this CDB is a SANITIZE that returns only when its operation
/// ends (IMMED clear), which may take minutes.
pub(crate) fn waits_for_operation(cdb: &[u8]) -> bool {
    match (cdb.first(), cdb.get(1)) {
        (Some(&op::SANITIZE), Some(b)) => b & 0x80 == 0 && b & 0x1F != action::EXIT_FAILURE_MODE,
        _ => false,
    }
}

/// How the medium is sanitized.
#[derive(Clone, Debug)]
enum Method {
    BlockErase,
    /// One logical block of the pattern (already inverted if INVERT).
    Overwrite(Vec<u8>),
}

/// SANITIZE: checks the CDB and parameter list, then starts the operation.
pub(crate) fn sanitize(lu: &LogicalUnit, t: &ScsiTask<'_>, cdb: Cdb<'_>) -> CmdResult {
    let action = cdb.service_action();
    let immed = cdb.bit(1, 7);
    let ause = cdb.bit(1, 5);
    let plen = usize::from(cdb.u16(7));
    if cdb.bit(1, 6) {
        // ZNR only means something on zoned devices; we are not one.
        return Err(Sense::invalid_cdb(1, Some(6)).into());
    }
    if let Some(at) = (2..=6u16).find(|&i| cdb.byte(usize::from(i)) != 0) {
        return Err(Sense::invalid_cdb(at, None).into());
    }
    if matches!(action, action::BLOCK_ERASE | action::EXIT_FAILURE_MODE) && plen != 0 {
        return Err(Sense::invalid_cdb(7, None).into());
    }
    let s = &lu.sanitize;
    let method = match action {
        action::EXIT_FAILURE_MODE => {
            let mut p = s.phase.lock().unwrap_or_else(|e| e.into_inner());
            let next = p.exit_failure_mode()?;
            s.set(&mut p, next);
            return Ok(ScsiResponse::good_empty());
        }
        action::BLOCK_ERASE => Method::BlockErase,
        action::OVERWRITE => Method::Overwrite(overwrite_pattern(lu, t, plen)?),
        _ => return Err(Sense::invalid_cdb(1, Some(4)).into()),
    };
    lu.check_writable()?;
    let outcome = Arc::new(Outcome::default());
    {
        let mut p = s.phase.lock().unwrap_or_else(|e| e.into_inner());
        let next = p.start(ause)?;
        let Some(me) = lu.arc() else {
            return Err(sense::INTERNAL_TARGET_FAILURE.into());
        };
        let total = lu.bytes_of(lu.num_blocks()).unwrap_or(u64::MAX);
        s.done.store(0, Ordering::Relaxed);
        s.total.store(total, Ordering::Relaxed);
        let previous = *p;
        s.set(&mut p, next);
        let end = outcome.clone();
        let started = std::thread::Builder::new()
            .name(format!("lu-sanitize-{:x}", lu.config.naa_id & 0xFFFF_FFFF))
            .spawn(move || {
                let ok = run(&me, &method, ause);
                end.set(ok);
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the sanitize thread");
            s.set(&mut p, previous);
            return Err(sense::INTERNAL_TARGET_FAILURE.into());
        }
    }
    if immed || outcome.wait() {
        Ok(ScsiResponse::good_empty())
    } else {
        Err(sense::SANITIZE_COMMAND_FAILED.into())
    }
}

/// The OVERWRITE parameter list, checked, as one logical block of pattern.
fn overwrite_pattern(lu: &LogicalUnit, t: &ScsiTask<'_>, plen: usize) -> Result<Vec<u8>, Fail> {
    let bs = lu.config.block_size as usize;
    if plen < 5 {
        return Err(Sense::invalid_cdb(7, None).into());
    }
    let data = t
        .data_out
        .get(..plen)
        .ok_or(Fail::from(sense::PARAMETER_LIST_LENGTH_ERROR))?;
    let first = data.first().copied().unwrap_or(0);
    let invert = first & 0x80 != 0;
    if first & 0x1F == 0 {
        // OVERWRITE COUNT 0 is reserved.
        return Err(Sense::invalid_param(0, Some(4)).into());
    }
    let pat_len = be_at(data, 2, 2) as usize;
    if pat_len == 0 || pat_len > bs {
        return Err(Sense::invalid_param(2, None).into());
    }
    if plen != 4 + pat_len {
        return Err(Sense::invalid_cdb(7, None).into());
    }
    let pat = data
        .get(4..4 + pat_len)
        .ok_or(Fail::from(sense::PARAMETER_LIST_LENGTH_ERROR))?;
    let mut block: Vec<u8> = pat.iter().copied().cycle().take(bs).collect();
    if invert {
        // With INVERT the last pass writes the complement: one pass here.
        block.iter_mut().for_each(|b| *b = !*b);
    }
    Ok(block)
}

/// The operation itself, on its own thread; true when it succeeded. The
/// LU leaves `Running` here and nowhere else.
fn run(lu: &LogicalUnit, method: &Method, ause: bool) -> bool {
    let started = std::time::Instant::now();
    let what = match method {
        Method::BlockErase => "block erase",
        Method::Overwrite(_) => "overwrite",
    };
    let bytes = lu.sanitize.total.load(Ordering::Relaxed);
    tracing::info!(serial = %lu.config.serial, method = what, bytes, "sanitize started");
    let r = {
        // Writes already past the gate finish first; later ones are refused.
        let _x = lu.write_order.write().unwrap_or_else(|e| e.into_inner());
        sanitize_medium(lu, method).and_then(|()| {
            if lu.caps.volatile_cache {
                lu.backend.flush()?;
            }
            Ok(())
        })
    };
    let took_ms = started.elapsed().as_millis();
    match &r {
        Ok(()) => {
            tracing::info!(serial = %lu.config.serial, method = what, bytes, took_ms, "sanitize done")
        }
        Err(e) => {
            tracing::warn!(serial = %lu.config.serial, method = what, took_ms, error = %e, "sanitize failed")
        }
    }
    let ok = r.is_ok();
    let s = &lu.sanitize;
    let mut p = s.phase.lock().unwrap_or_else(|e| e.into_inner());
    s.set(&mut p, Phase::finish(ok, ause));
    lu.counters.write_commands.fetch_add(1, Ordering::Relaxed);
    ok
}

/// Erases or overwrites every block, step by step so the progress moves.
fn sanitize_medium(lu: &LogicalUnit, method: &Method) -> io::Result<()> {
    let total = lu.sanitize.total.load(Ordering::Relaxed);
    let done = &lu.sanitize.done;
    let mut at = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    while at < total {
        let n = match method {
            Method::BlockErase => {
                let n = (total - at).min(STORE_STEP_BYTES);
                lu.backend.unmap(at, n)?;
                n
            }
            Method::Overwrite(block) if buf.is_empty() => {
                let n = (total - at).min(STORE_STEP_BYTES);
                match lu.backend.write_same(at, n, block) {
                    Ok(()) => n,
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                        // Write the pattern out ourselves from here on.
                        let piece = limits::PATTERN_PIECE_BYTES.min(total);
                        buf = block
                            .iter()
                            .copied()
                            .cycle()
                            .take(usize::try_from(piece).unwrap_or(usize::MAX))
                            .collect();
                        if buf.is_empty() {
                            return Err(io::Error::from(io::ErrorKind::InvalidInput));
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            Method::Overwrite(_) => {
                let n = (total - at).min(buf.len() as u64);
                let piece = buf
                    .get(..usize::try_from(n).unwrap_or(usize::MAX))
                    .unwrap_or(&buf);
                lu.backend.write_at(at, piece)?;
                piece.len() as u64
            }
        };
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        at += n;
        done.store(at, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::SenseCode;
    use crate::status;
    use crate::testutil::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    const BS: usize = 512;
    const BLOCKS: u64 = MIB / 512;
    const IN_PROGRESS: SenseCode = sense::LU_NOT_READY_SANITIZE_IN_PROGRESS;

    fn setup() -> (Arc<LogicalUnit>, crate::Nexus) {
        let lu = mem_lu();
        let n = ready_nexus(&lu, 1);
        (lu, n)
    }

    fn overwrite(immed: bool, ause: bool) -> [u8; 10] {
        let mut c = [0x48, 0x01, 0, 0, 0, 0, 0, 0, 6, 0];
        c[1] |= if immed { 0x80 } else { 0 } | if ause { 0x20 } else { 0 };
        c
    }

    const PATTERN: [u8; 6] = [0x01, 0, 0, 2, 0xAB, 0xCD];
    const EXIT_FAILURE_MODE: [u8; 10] = [0x48, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0];

    fn read16(lba: u64) -> [u8; 16] {
        cdb16(0x88, lba, 1)
    }

    // ----- the rules, without locks or I/O -----

    #[test]
    fn while_running_only_inquiry_report_luns_and_request_sense_proceed() {
        let p = Phase::Running;
        for opcode in [op::INQUIRY, op::REPORT_LUNS, op::REQUEST_SENSE] {
            assert_eq!(p.gate(opcode, 0), Gate::Proceed, "{opcode:#x}");
        }
        for opcode in [
            op::TEST_UNIT_READY,
            op::START_STOP_UNIT,
            op::READ_16,
            op::WRITE_10,
            op::MODE_SENSE_6,
            op::READ_CAPACITY_10,
            op::SANITIZE,
            op::PERSISTENT_RESERVE_OUT,
            op::MAINTENANCE_IN,
        ] {
            assert_eq!(p.gate(opcode, 0), Gate::InProgress, "{opcode:#x}");
        }
        assert_eq!(Phase::Idle.gate(op::READ_16, 0), Gate::Proceed);
    }

    #[test]
    fn failure_mode_refuses_medium_access_only() {
        let p = Phase::Failed { ause: true };
        for opcode in [op::TEST_UNIT_READY, op::READ_10, op::WRITE_16, op::UNMAP] {
            assert_eq!(p.gate(opcode, 0), Gate::FormatCorrupted, "{opcode:#x}");
        }
        assert_eq!(
            p.gate(op::SERVICE_ACTION_IN_16, sa::GET_LBA_STATUS),
            Gate::FormatCorrupted
        );
        for opcode in [
            op::INQUIRY,
            op::REQUEST_SENSE,
            op::SANITIZE,
            op::MODE_SENSE_10,
        ] {
            assert_eq!(p.gate(opcode, 0), Gate::Proceed, "{opcode:#x}");
        }
        assert_eq!(
            p.gate(op::SERVICE_ACTION_IN_16, sa::READ_CAPACITY_16),
            Gate::Proceed
        );
    }

    #[test]
    fn phase_transitions_follow_sbc() {
        assert_eq!(Phase::Idle.start(false), Ok(Phase::Running));
        assert!(Phase::Running.start(false).is_err());
        assert_eq!(Phase::finish(true, false), Phase::Idle);
        assert_eq!(Phase::finish(false, true), Phase::Failed { ause: true });
        // Unrestricted: EXIT FAILURE MODE leaves it; so does a new operation.
        let f = Phase::Failed { ause: true };
        assert_eq!(f.exit_failure_mode(), Ok(Phase::Idle));
        assert_eq!(f.start(true), Ok(Phase::Running));
        // Restricted: only a new operation with AUSE clear.
        let r = Phase::Failed { ause: false };
        assert!(r.exit_failure_mode().is_err());
        assert!(r.start(true).is_err());
        assert_eq!(r.start(false), Ok(Phase::Running));
        assert_eq!(Phase::Idle.exit_failure_mode(), Ok(Phase::Idle));
    }

    #[test]
    fn only_sanitize_without_immed_waits() {
        assert!(waits_for_operation(&overwrite(false, false)));
        assert!(!waits_for_operation(&overwrite(true, false)));
        assert!(!waits_for_operation(&EXIT_FAILURE_MODE));
        assert!(!waits_for_operation(&TUR));
        assert!(!waits_for_operation(&[]));
    }

    // ----- an LU whose store the test holds back -----

    /// A memory store whose writes, unmaps and write-sames each wait for a
    /// permit from the test, and which can be told to fail them.
    struct HeldStore {
        mem: crate::MemoryBackend,
        permits: Mutex<usize>,
        granted: Condvar,
        fail: AtomicBool,
        /// Writes that reached the store (and are held or done).
        writes: AtomicUsize,
        same: bool,
    }

    impl HeldStore {
        fn hold(&self) -> io::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            let mut g = self.permits.lock().unwrap();
            while *g == 0 {
                g = self.granted.wait(g).unwrap();
            }
            if *g != usize::MAX {
                *g -= 1;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::other("injected"));
            }
            Ok(())
        }

        fn allow(&self, n: usize) {
            let mut g = self.permits.lock().unwrap();
            *g = g.saturating_add(n);
            self.granted.notify_all();
        }
    }

    struct Held(Arc<HeldStore>);

    impl crate::Backend for Held {
        fn size_bytes(&self) -> u64 {
            self.0.mem.size_bytes()
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> io::Result<()> {
            self.0.mem.read_at(o, b)
        }
        fn write_at(&self, o: u64, d: &[u8]) -> io::Result<()> {
            self.0.hold()?;
            self.0.mem.write_at(o, d)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn unmap(&self, o: u64, l: u64) -> io::Result<()> {
            self.0.hold()?;
            self.0.mem.unmap(o, l)
        }
        fn caps(&self) -> crate::BackendCaps {
            self.0.mem.caps()
        }
        fn write_same(&self, o: u64, l: u64, p: &[u8]) -> io::Result<()> {
            if !self.0.same {
                return Err(io::Error::from(io::ErrorKind::Unsupported));
            }
            self.0.hold()?;
            let buf: Vec<u8> = p.iter().copied().cycle().take(l as usize).collect();
            self.0.mem.write_at(o, &buf)
        }
    }

    fn held_lu(size: u64, same: bool) -> (Arc<HeldStore>, Arc<LogicalUnit>, crate::Nexus) {
        let store = Arc::new(HeldStore {
            mem: crate::MemoryBackend::with_chunk_shift(size, 12),
            permits: Mutex::new(0),
            granted: Condvar::new(),
            fail: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
            same,
        });
        let lu =
            LogicalUnit::new(crate::LuConfig::default(), Box::new(Held(store.clone()))).unwrap();
        let n = ready_nexus(&lu, 1);
        (store, lu, n)
    }

    fn open(store: &HeldStore) {
        store.allow(usize::MAX);
    }

    /// Waits until the store has seen `n` writes.
    fn wait_writes(store: &HeldStore, n: usize) {
        let t = std::time::Instant::now();
        while store.writes.load(Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no write reached the store"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Polls TEST UNIT READY until the sanitize is over.
    fn wait_idle(lu: &LogicalUnit, n: &crate::Nexus) -> crate::ScsiResponse {
        let t = std::time::Instant::now();
        loop {
            let r = exec(lu, n, &TUR, &[]);
            if r.sense_code() != Some(IN_PROGRESS) {
                return r;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sanitize never ended"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn progress(r: &crate::ScsiResponse) -> Option<u16> {
        let s = r.sense.as_ref()?;
        (s.get(15)? & 0x80 != 0).then(|| u16::from_be_bytes([s[16], s[17]]))
    }

    #[test]
    fn immed_sanitize_returns_at_once_and_the_lu_is_not_ready_until_it_ends() {
        let (store, lu, n) = held_lu(MIB, true);
        assert_good(&exec(&lu, &n, &overwrite(true, false), &PATTERN));
        wait_writes(&store, 1);
        let r = exec(&lu, &n, &TUR, &[]);
        assert_check(&r, IN_PROGRESS);
        assert_eq!(progress(&r), Some(0));
        for cdb in [
            &[0x1B, 1, 0, 0, 0x01, 0][..],
            &read16(0),
            &cdb10(0x2A, 0, 1),
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0x1A, 0, 0x3F, 0, 255, 0],
            &overwrite(true, false),
        ] {
            assert_check(&exec(&lu, &n, cdb, &[0u8; BS]), IN_PROGRESS);
        }
        assert_good(&exec(&lu, &n, &[0x12, 0, 0, 0, 255, 0], &[]));
        assert_good(&exec(
            &lu,
            &n,
            &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            &[],
        ));
        let rs = exec(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
        assert_good(&rs);
        assert_eq!(
            (rs.data_in[2], rs.data_in[12], rs.data_in[13]),
            (0x02, 0x04, 0x1B)
        );
        assert_eq!(rs.data_in[15], 0x80, "SKSV: progress indication");
        open(&store);
        assert_good(&wait_idle(&lu, &n));
        let d = exec(&lu, &n, &read16(BLOCKS - 1), &[]).data_in;
        assert_eq!(&d[..4], &[0xAB, 0xCD, 0xAB, 0xCD]);
        let rs = exec(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
        assert_eq!(rs.data_in[2], 0, "NO SENSE once done");
    }

    #[test]
    fn sanitize_without_immed_returns_when_the_operation_ends() {
        let (store, lu, n) = held_lu(MIB, true);
        let (tx, rx) = std::sync::mpsc::channel();
        let (lu2, n2) = (lu.clone(), n.clone());
        std::thread::spawn(move || {
            tx.send(exec(&lu2, &n2, &overwrite(false, false), &PATTERN))
                .unwrap()
        });
        wait_writes(&store, 1);
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "status before the end"
        );
        assert_check(&exec(&lu, &n, &TUR, &[]), IN_PROGRESS);
        open(&store);
        assert_good(&rx.recv_timeout(Duration::from_secs(10)).unwrap());
        assert_good(&exec(&lu, &n, &TUR, &[]));
    }

    #[test]
    fn resets_and_nexus_loss_do_not_stop_a_sanitize() {
        let (store, lu, n) = held_lu(MIB, true);
        assert_good(&exec(&lu, &n, &overwrite(true, false), &PATTERN));
        wait_writes(&store, 1);
        lu.reset(Some(n.id));
        lu.reset(None);
        lu.nexus_lost(n.id);
        // A new nexus: its unit attention first, then still in progress.
        let m = nexus(2);
        assert_check(&exec(&lu, &m, &TUR, &[]), sense::POWER_ON_RESET_OCCURRED);
        assert_check(&exec(&lu, &m, &TUR, &[]), IN_PROGRESS);
        open(&store);
        assert_good(&wait_idle(&lu, &m));
        let d = exec(&lu, &m, &read16(0), &[]).data_in;
        assert_eq!(&d[..2], &[0xAB, 0xCD]);
    }

    #[test]
    fn progress_moves_as_pieces_are_written() {
        // No write-same: 8 MiB pieces of a 32 MiB LU, one held at a time.
        let (store, lu, n) = held_lu(32 * MIB, false);
        assert_good(&exec(&lu, &n, &overwrite(true, false), &PATTERN));
        wait_writes(&store, 1);
        assert_eq!(progress(&exec(&lu, &n, &TUR, &[])), Some(0));
        store.allow(1);
        wait_writes(&store, 2);
        let r = exec(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
        assert_eq!(&r.data_in[15..18], &[0x80, 0x40, 0x00], "a quarter done");
        open(&store);
        assert_good(&wait_idle(&lu, &n));
        assert_eq!(store.writes.load(Ordering::SeqCst), 4);
        assert_eq!(lu.sanitize.progress(), u16::MAX);
        assert_eq!(lu.sanitize.done.load(Ordering::Relaxed), 32 * MIB);
    }

    #[test]
    fn a_failed_sanitize_leaves_the_medium_format_corrupted_until_exit_failure_mode() {
        let (store, lu, n) = held_lu(MIB, true);
        store.fail.store(true, Ordering::SeqCst);
        open(&store);
        let r = exec(&lu, &n, &overwrite(false, true), &PATTERN);
        assert_check(&r, sense::SANITIZE_COMMAND_FAILED);
        assert_check(&exec(&lu, &n, &TUR, &[]), sense::MEDIUM_FORMAT_CORRUPTED);
        assert_check(
            &exec(&lu, &n, &read16(0), &[]),
            sense::MEDIUM_FORMAT_CORRUPTED,
        );
        assert_good(&exec(&lu, &n, &[0x12, 0, 0, 0, 255, 0], &[]));
        assert_good(&exec(&lu, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
        let rs = exec(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]);
        assert_eq!(
            (rs.data_in[2], rs.data_in[12], rs.data_in[13]),
            (0x03, 0x31, 0x03)
        );
        // AUSE was set: EXIT FAILURE MODE ends it.
        assert_good(&exec(&lu, &n, &EXIT_FAILURE_MODE, &[]));
        assert_good(&exec(&lu, &n, &TUR, &[]));
    }

    #[test]
    fn after_a_restricted_failure_only_a_successful_sanitize_clears_it() {
        let (store, lu, n) = held_lu(MIB, true);
        store.fail.store(true, Ordering::SeqCst);
        open(&store);
        let r = exec(&lu, &n, &overwrite(false, false), &PATTERN);
        assert_check(&r, sense::SANITIZE_COMMAND_FAILED);
        let r = exec(&lu, &n, &EXIT_FAILURE_MODE, &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        let r = exec(&lu, &n, &overwrite(false, true), &PATTERN);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((1, true)));
        assert_check(&exec(&lu, &n, &TUR, &[]), sense::MEDIUM_FORMAT_CORRUPTED);
        store.fail.store(false, Ordering::SeqCst);
        assert_good(&exec(&lu, &n, &overwrite(false, false), &PATTERN));
        assert_good(&exec(&lu, &n, &TUR, &[]));
    }

    #[test]
    fn write_protected_lu_refuses_sanitize_without_starting_it() {
        let cfg = crate::LuConfig {
            read_only: true,
            ..crate::LuConfig::default()
        };
        let lu = lu_with(cfg, MIB);
        let n = ready_nexus(&lu, 1);
        assert_check(
            &exec(&lu, &n, &overwrite(true, false), &PATTERN),
            sense::WRITE_PROTECTED,
        );
        assert_good(&exec(&lu, &n, &TUR, &[]));
    }

    // ----- the command's checks (moved here from sbc.rs) -----

    #[test]
    fn sanitize_block_erase_unmaps_everything() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &cdb10(0x2A, 0, 4), &[7u8; 4 * BS]));
        assert_good(&exec(&lu, &n, &[0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
        assert!(exec(&lu, &n, &cdb10(0x28, 0, 4), &[])
            .data_in
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn sanitize_overwrite_writes_pattern() {
        let (lu, n) = setup();
        assert_good(&exec(&lu, &n, &overwrite(false, false), &PATTERN));
        let d = exec(&lu, &n, &cdb10(0x28, BLOCKS as u32 - 1, 1), &[]).data_in;
        assert_eq!(&d[..4], &[0xAB, 0xCD, 0xAB, 0xCD]);
    }

    #[test]
    fn sanitize_bad_parameters_are_invalid_field() {
        let (lu, n) = setup();
        assert_check(
            &exec(&lu, &n, &[0x48, 0x02, 0, 0, 0, 0, 0, 0, 4, 0], &[0; 4]),
            sense::INVALID_FIELD_IN_CDB,
        );
        assert_check(
            &exec(&lu, &n, &[0x48, 0x03, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
            sense::INVALID_FIELD_IN_CDB,
        );
        let p = [0x01, 0, 0, 0];
        assert_check(
            &exec(&lu, &n, &[0x48, 0x01, 0, 0, 0, 0, 0, 0, 4, 0], &p),
            sense::INVALID_FIELD_IN_CDB,
        );
        assert_check(
            &exec(&lu, &n, &[0x48, 0x1F, 0, 0, 0, 0, 0, 0, 8, 0], &[0; 8]),
            sense::INVALID_FIELD_IN_CDB,
        );
    }

    #[test]
    fn sanitize_reserved_cdb_bits_and_bytes_are_invalid_field() {
        let (lu, n) = setup();
        let mut c = [0x48, 0x42, 0, 0, 0, 0, 0, 0, 0, 0];
        let r = exec(&lu, &n, &c, &[]);
        assert_check(&r, sense::INVALID_FIELD_IN_CDB);
        assert_eq!(field_pointer(&r), Some((1, true)));
        for i in 2..=6 {
            c = [0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0];
            c[i] = 1;
            let r = exec(&lu, &n, &c, &[]);
            assert_check(&r, sense::INVALID_FIELD_IN_CDB);
            assert_eq!(field_pointer(&r), Some((i as u16, true)));
        }
        // IMMED and AUSE are not reserved.
        assert_good(&exec(&lu, &n, &[0x48, 0xA2, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
        assert_eq!(wait_idle(&lu, &n).status, status::GOOD);
    }

    #[test]
    fn sanitize_overwrite_count_zero_is_invalid_parameter() {
        let (lu, n) = setup();
        let p = [0x00, 0, 0, 2, 0xAB, 0xCD];
        assert_check(
            &exec(&lu, &n, &overwrite(false, false), &p),
            sense::INVALID_FIELD_IN_PARAMETER_LIST,
        );
    }
}
