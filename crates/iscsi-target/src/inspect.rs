//! What live inspection (`itadm inspect`, the old `::iscsi_conn`,
//! `::iscsi_task` and `::iscsi_states`) reads of a connection while it
//! runs: its state with its recent transitions, its negotiated
//! parameters, its PDU and byte counters and its tasks in flight.
//!
//! The connection writes, the inspector reads. Tasks sit in a table of
//! slots made of atomics ([`TaskTable`]): claiming, updating and releasing
//! a slot takes no lock and allocates nothing (slots come 16 at a time the
//! first time a connection has that many tasks at once, and stay), so the
//! data path pays a few atomic stores per command. A reader may see a task a moment
//! late or early; it never sees a torn one (each slot carries a generation
//! that the reader checks before and after).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use idm::state::{ConnEvent, ConnState, SessionState};
/// The negotiated values' type, for readers of [`ConnInfo::params`].
pub use iscsi_proto::negotiation::NegotiatedParams;
use serde::Serialize;

use crate::metrics::{now_ns, Dir, IoStats};
/// The process-wide iSER registered-memory gauge, for the daemon's
/// `inspect` (it is back at its idle value once iSER connections are gone).
pub use iser::{registered_memory as iser_registered_memory, RegisteredMemory};

/// Transitions kept per state machine.
pub const TRANSITIONS_KEPT: usize = 16;

/// One state change.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Transition {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub from: &'static str,
    pub event: String,
    pub to: &'static str,
}

/// A state and its last few transitions (oldest first).
#[derive(Clone, Debug)]
pub struct StateLog<S> {
    pub state: S,
    pub recent: VecDeque<Transition>,
}

impl<S: Copy> StateLog<S> {
    pub fn new(state: S) -> Self {
        StateLog {
            state,
            recent: VecDeque::with_capacity(TRANSITIONS_KEPT),
        }
    }

    /// Records `from --event--> to` and makes `to` current.
    pub fn record(
        &mut self,
        to: S,
        event: &impl std::fmt::Debug,
        name: impl Fn(S) -> &'static str,
    ) {
        if self.recent.len() >= TRANSITIONS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(Transition {
            at_unix_ms: unix_ms(),
            from: name(self.state),
            event: format!("{event:?}"),
            to: name(to),
        });
        self.state = to;
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The RFC 7143 §8.3 name of a session state (Q1..Q5).
pub fn session_state_name(s: SessionState) -> &'static str {
    match s {
        SessionState::Free => "Q1 FREE",
        SessionState::Active => "Q2 ACTIVE",
        SessionState::LoggedIn => "Q3 LOGGED_IN",
        SessionState::Failed => "Q4 FAILED",
        SessionState::InContinue => "Q5 IN_CONTINUE",
    }
}

/// Where a task in flight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum TaskState {
    /// A write collecting its data (immediate, unsolicited, R2T/Data-Out).
    WaitingForData = 1,
    /// With the SCSI core / the LU backend.
    InBackend = 2,
    /// Its response is queued for the connection's writer.
    Sending = 3,
}

const FREE: u8 = 0;
const CLAIMING: u8 = 0xff;

impl TaskState {
    fn from_u8(v: u8) -> Option<TaskState> {
        match v {
            1 => Some(TaskState::WaitingForData),
            2 => Some(TaskState::InBackend),
            3 => Some(TaskState::Sending),
            _ => None,
        }
    }
}

/// What a new task is.
#[derive(Clone, Copy, Debug)]
pub struct NewTask<'a> {
    pub itt: u32,
    pub cmd_sn: u32,
    pub lun: u64,
    pub cdb: &'a [u8],
    pub dir: Dir,
    pub expected: u32,
    pub done: u64,
    pub state: TaskState,
    /// When it arrived ([`now_ns`]).
    pub start_ns: u64,
}

#[derive(Default)]
struct Slot {
    state: AtomicU8,
    generation: AtomicU32,
    itt: AtomicU32,
    cmd_sn: AtomicU32,
    lun: AtomicU64,
    cdb: [AtomicU64; 2],
    dir: AtomicU8,
    expected: AtomicU32,
    done: AtomicU64,
    start_ns: AtomicU64,
    /// In `Sending`: the writer's byte count at which the response is out.
    sent_mark: AtomicU64,
}

/// A task in flight, as the inspector sees it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TaskView {
    pub itt: u32,
    pub cmd_sn: u32,
    pub lun: u64,
    pub opcode: u8,
    pub command: &'static str,
    pub cdb: String,
    pub direction: &'static str,
    pub bytes_done: u64,
    pub bytes_expected: u32,
    pub age_us: u64,
    pub state: TaskState,
}

/// A handle on a claimed slot; `None` inside when the table was full (the
/// task runs all the same, it is just not shown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskSlot(Option<usize>);

/// Slots are allocated this many at a time, as a connection first needs
/// them: an idle connection costs a few hundred bytes, a busy one a chunk
/// per 16 tasks it has had in flight at once (allocated once, kept).
const CHUNK: usize = 16;

/// The tasks in flight on one connection.
pub struct TaskTable {
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
    /// Chunks allocated so far (only the connection's reader claims slots,
    /// so only it grows this).
    used: AtomicUsize,
    hint: AtomicUsize,
    /// Tasks that found no free slot.
    pub untracked: AtomicU64,
}

/// Most slots a connection gets (each is about 80 bytes).
pub const MAX_TASK_SLOTS: usize = 1024;

/// Slots for a session allowed `queue_depth` commands at once: its CmdSN
/// window plus room for immediate commands. More tasks than that still
/// run, uncounted in the table (`untracked`).
pub fn task_slots(queue_depth: u32) -> usize {
    usize::try_from(queue_depth)
        .unwrap_or(MAX_TASK_SLOTS)
        .saturating_add(16)
        .min(MAX_TASK_SLOTS)
}

impl TaskTable {
    /// A table of up to `n` slots (rounded up to whole chunks).
    pub fn new(n: usize) -> TaskTable {
        TaskTable {
            chunks: (0..n.max(1).div_ceil(CHUNK))
                .map(|_| OnceLock::new())
                .collect(),
            used: AtomicUsize::new(0),
            hint: AtomicUsize::new(0),
            untracked: AtomicU64::new(0),
        }
    }

    fn at(&self, i: usize) -> Option<&Slot> {
        self.chunks.get(i / CHUNK)?.get()?.get(i % CHUNK)
    }

    /// The slots allocated so far.
    fn allocated(&self) -> usize {
        self.used.load(Ordering::Acquire) * CHUNK
    }

    /// Takes a free slot for `t` (or one whose response has gone out),
    /// allocating another chunk when all are busy and the table may grow.
    pub fn claim(&self, t: &NewTask<'_>, bytes_sent: u64) -> TaskSlot {
        if let Some(i) = self.claim_in(t, bytes_sent) {
            return TaskSlot(Some(i));
        }
        let used = self.used.load(Ordering::Acquire);
        if let Some(c) = self.chunks.get(used) {
            c.get_or_init(|| (0..CHUNK).map(|_| Slot::default()).collect());
            self.used.store(used + 1, Ordering::Release);
            self.hint.store(used * CHUNK, Ordering::Relaxed);
            if let Some(i) = self.claim_in(t, bytes_sent) {
                return TaskSlot(Some(i));
            }
        }
        self.untracked.fetch_add(1, Ordering::Relaxed);
        TaskSlot(None)
    }

    fn claim_in(&self, t: &NewTask<'_>, bytes_sent: u64) -> Option<usize> {
        let n = self.allocated();
        if n == 0 {
            return None;
        }
        let start = self.hint.load(Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            let Some(s) = self.at(i) else { continue };
            let cur = s.state.load(Ordering::Acquire);
            let free = cur == FREE
                || (cur == TaskState::Sending as u8
                    && s.sent_mark.load(Ordering::Relaxed) <= bytes_sent);
            if !free
                || s.state
                    .compare_exchange(cur, CLAIMING, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            s.generation.fetch_add(1, Ordering::AcqRel);
            s.itt.store(t.itt, Ordering::Relaxed);
            s.cmd_sn.store(t.cmd_sn, Ordering::Relaxed);
            s.lun.store(t.lun, Ordering::Relaxed);
            let mut cdb = [0u8; 16];
            let len = t.cdb.len().min(16);
            if let (Some(dst), Some(src)) = (cdb.get_mut(..len), t.cdb.get(..len)) {
                dst.copy_from_slice(src);
            }
            let (lo, hi) = cdb.split_at(8);
            let word = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
            s.cdb[0].store(word(lo), Ordering::Relaxed);
            s.cdb[1].store(word(hi), Ordering::Relaxed);
            s.dir.store(dir_code(t.dir), Ordering::Relaxed);
            s.expected.store(t.expected, Ordering::Relaxed);
            s.done.store(t.done, Ordering::Relaxed);
            s.start_ns.store(t.start_ns, Ordering::Relaxed);
            s.state.store(t.state as u8, Ordering::Release);
            self.hint.store((i + 1) % n, Ordering::Relaxed);
            return Some(i);
        }
        None
    }

    fn slot(&self, t: TaskSlot) -> Option<&Slot> {
        self.at(t.0?)
    }

    pub fn set_state(&self, t: TaskSlot, state: TaskState) {
        if let Some(s) = self.slot(t) {
            s.state.store(state as u8, Ordering::Release);
        }
    }

    pub fn add_done(&self, t: TaskSlot, n: u64) {
        if let Some(s) = self.slot(t) {
            s.done.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The response is queued; the slot frees itself once the writer has
    /// sent `mark` bytes in all.
    pub fn sending(&self, t: TaskSlot, done: u64, mark: u64) {
        if let Some(s) = self.slot(t) {
            s.done.store(done, Ordering::Relaxed);
            s.sent_mark.store(mark, Ordering::Relaxed);
            s.state.store(TaskState::Sending as u8, Ordering::Release);
        }
    }

    pub fn release(&self, t: TaskSlot) {
        if let Some(s) = self.slot(t) {
            s.state.store(FREE, Ordering::Release);
        }
    }

    /// When the task started ([`now_ns`]); `None` for an untracked task.
    pub fn start_ns(&self, t: TaskSlot) -> Option<u64> {
        self.slot(t).map(|s| s.start_ns.load(Ordering::Relaxed))
    }

    /// The tasks in flight now, oldest first.
    pub fn snapshot(&self, bytes_sent: u64) -> Vec<TaskView> {
        let now = now_ns();
        let mut out = Vec::new();
        for s in (0..self.allocated()).filter_map(|i| self.at(i)) {
            let g = s.generation.load(Ordering::Acquire);
            let st = s.state.load(Ordering::Acquire);
            let Some(state) = TaskState::from_u8(st) else {
                continue;
            };
            if state == TaskState::Sending && s.sent_mark.load(Ordering::Relaxed) <= bytes_sent {
                continue;
            }
            let mut cdb = [0u8; 16];
            let (lo, hi) = cdb.split_at_mut(8);
            lo.copy_from_slice(&s.cdb[0].load(Ordering::Relaxed).to_be_bytes());
            hi.copy_from_slice(&s.cdb[1].load(Ordering::Relaxed).to_be_bytes());
            let start = s.start_ns.load(Ordering::Relaxed);
            let view = TaskView {
                itt: s.itt.load(Ordering::Relaxed),
                cmd_sn: s.cmd_sn.load(Ordering::Relaxed),
                lun: s.lun.load(Ordering::Relaxed),
                opcode: cdb[0],
                command: command_name(&cdb),
                cdb: cdb_hex(&cdb),
                direction: match s.dir.load(Ordering::Relaxed) {
                    1 => Dir::Read,
                    2 => Dir::Write,
                    3 => Dir::Bidi,
                    _ => Dir::None,
                }
                .name(),
                bytes_done: s.done.load(Ordering::Relaxed),
                bytes_expected: s.expected.load(Ordering::Relaxed),
                age_us: now.saturating_sub(start) / 1000,
                state,
            };
            // Claimed again (or freed) while we read: skip rather than mix.
            if s.generation.load(Ordering::Acquire) == g {
                out.push(view);
            }
        }
        out.sort_by_key(|t| std::cmp::Reverse(t.age_us));
        out
    }
}

impl TaskSlot {
    /// Whether the task has a slot (is shown).
    pub fn is_tracked(self) -> bool {
        self.0.is_some()
    }
}

fn dir_code(d: Dir) -> u8 {
    match d {
        Dir::None => 0,
        Dir::Read => 1,
        Dir::Write => 2,
        Dir::Bidi => 3,
    }
}

/// Shows a CDB in hex, trailing zero bytes of a 16-byte buffer trimmed to
/// the command's own length.
fn cdb_hex(cdb: &[u8; 16]) -> String {
    let len = match cdb[0] >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    };
    cdb.iter()
        .take(len)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("")
}

/// The SPC/SBC name of a CDB's command.
pub fn command_name(cdb: &[u8]) -> &'static str {
    let Some(&op) = cdb.first() else {
        return "(none)";
    };
    let sa = cdb.get(1).map_or(0, |b| b & 0x1f);
    match op {
        0x00 => "TEST UNIT READY",
        0x03 => "REQUEST SENSE",
        0x08 => "READ(6)",
        0x0a => "WRITE(6)",
        0x12 => "INQUIRY",
        0x15 => "MODE SELECT(6)",
        0x16 => "RESERVE(6)",
        0x17 => "RELEASE(6)",
        0x1a => "MODE SENSE(6)",
        0x1b => "START STOP UNIT",
        0x1e => "PREVENT ALLOW MEDIUM REMOVAL",
        0x25 => "READ CAPACITY(10)",
        0x28 => "READ(10)",
        0x2a => "WRITE(10)",
        0x2e => "WRITE AND VERIFY(10)",
        0x2f => "VERIFY(10)",
        0x34 => "PRE-FETCH(10)",
        0x35 => "SYNCHRONIZE CACHE(10)",
        0x37 => "READ DEFECT DATA(10)",
        0x41 => "WRITE SAME(10)",
        0x42 => "UNMAP",
        0x48 => "SANITIZE",
        0x55 => "MODE SELECT(10)",
        0x5a => "MODE SENSE(10)",
        0x5e => "PERSISTENT RESERVE IN",
        0x5f => "PERSISTENT RESERVE OUT",
        0x88 => "READ(16)",
        0x89 => "COMPARE AND WRITE",
        0x8a => "WRITE(16)",
        0x8b => "ORWRITE(16)",
        0x8e => "WRITE AND VERIFY(16)",
        0x8f => "VERIFY(16)",
        0x90 => "PRE-FETCH(16)",
        0x91 => "SYNCHRONIZE CACHE(16)",
        0x93 => "WRITE SAME(16)",
        0x9c => "WRITE ATOMIC(16)",
        0x9e if sa == 0x10 => "READ CAPACITY(16)",
        0x9e if sa == 0x12 => "GET LBA STATUS",
        0x9e => "SERVICE ACTION IN(16)",
        0xa0 => "REPORT LUNS",
        0xa3 if sa == 0x0a => "REPORT TARGET PORT GROUPS",
        0xa3 if sa == 0x0c => "REPORT SUPPORTED OPERATION CODES",
        0xa3 if sa == 0x0d => "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
        0xa3 => "MAINTENANCE IN",
        0xa8 => "READ(12)",
        0xaa => "WRITE(12)",
        0xae => "WRITE AND VERIFY(12)",
        0xaf => "VERIFY(12)",
        0xb7 => "READ DEFECT DATA(12)",
        _ => "(vendor or unsupported)",
    }
}

/// A connection's counters (all monotonic).
#[derive(Default)]
pub struct ConnCounters {
    pub pdus_in: AtomicU64,
    pub pdus_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Bytes handed to the writer (BHS + data segment).
    pub bytes_queued: AtomicU64,
    /// Bytes the writer has put on the transport.
    pub bytes_out: AtomicU64,
    pub commands: AtomicU64,
}

/// The live view of one logged-in connection, shared by the connection
/// (which writes it) and the session's connection list (which the
/// inspector reads).
pub struct ConnInfo {
    pub cid: u16,
    pub peer_addr: String,
    pub local_addr: String,
    /// The connection's negotiated values (session-wide keys from the
    /// leading login, its own digests and segment lengths).
    pub params: NegotiatedParams,
    pub logged_in_unix_ms: u64,
    state: Mutex<StateLog<ConnState>>,
    pub counters: ConnCounters,
    pub tasks: TaskTable,
    /// The session's counters (its target's are summed from its sessions').
    pub session_io: Arc<IoStats>,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("cid", &self.cid)
            .field("peer", &self.peer_addr)
            .field("state", &self.state().rfc_name())
            .finish_non_exhaustive()
    }
}

impl ConnInfo {
    pub fn new(
        cid: u16,
        peer_addr: String,
        local_addr: String,
        params: NegotiatedParams,
        log: StateLog<ConnState>,
        session_io: Arc<IoStats>,
        task_slots: usize,
    ) -> ConnInfo {
        crate::metrics::start_clock();
        ConnInfo {
            cid,
            peer_addr,
            local_addr,
            params,
            logged_in_unix_ms: unix_ms(),
            state: Mutex::new(log),
            counters: ConnCounters::default(),
            tasks: TaskTable::new(task_slots),
            session_io,
        }
    }

    pub fn state(&self) -> ConnState {
        self.state
            .lock()
            .map(|s| s.state)
            .unwrap_or(ConnState::Free)
    }

    /// The state and its recent transitions.
    pub fn state_log(&self) -> StateLog<ConnState> {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The one place a logged-in connection's state changes.
    pub fn transition(&self, event: ConnEvent) -> Result<ConnState, idm::state::IllegalTransition> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let next = s.state.next(event)?;
        s.record(next, &event, ConnState::rfc_name);
        Ok(next)
    }

    /// Claims a task slot; counts the command.
    pub fn task_started(&self, t: &NewTask<'_>) -> TaskSlot {
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        self.tasks
            .claim(t, self.counters.bytes_out.load(Ordering::Relaxed))
    }

    /// Counts `bytes` handed to the writer; returns the running total
    /// (the mark a task's response is out at).
    pub fn queued(&self, pdus: usize, bytes: usize) -> u64 {
        self.counters
            .pdus_out
            .fetch_add(pdus as u64, Ordering::Relaxed);
        let b = bytes as u64;
        self.counters.bytes_queued.fetch_add(b, Ordering::Relaxed) + b
    }

    pub fn sent(&self, bytes: usize) {
        self.counters
            .bytes_out
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn received(&self, bytes: usize) {
        self.counters.pdus_in.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_in
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn tasks_in_flight(&self) -> Vec<TaskView> {
        self.tasks
            .snapshot(self.counters.bytes_out.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(itt: u32) -> NewTask<'static> {
        NewTask {
            itt,
            cmd_sn: itt + 100,
            lun: 1,
            cdb: &[0x2a, 0, 0, 0, 0, 8, 0, 0, 8, 0],
            dir: Dir::Write,
            expected: 4096,
            done: 0,
            state: TaskState::WaitingForData,
            start_ns: now_ns(),
        }
    }

    #[test]
    fn tasks_show_until_their_response_is_sent() {
        let t = TaskTable::new(4);
        let a = t.claim(&task(1), 0);
        let b = t.claim(&task(2), 0);
        t.add_done(a, 1024);
        let v = t.snapshot(0);
        assert_eq!(v.len(), 2);
        let one = v.iter().find(|x| x.itt == 1).unwrap();
        assert_eq!(one.command, "WRITE(10)");
        assert_eq!(one.cdb, "2a000000000800000800");
        assert_eq!((one.bytes_done, one.bytes_expected), (1024, 4096));
        assert_eq!(one.state, TaskState::WaitingForData);
        t.release(b);
        t.sending(a, 4096, 500);
        assert_eq!(t.snapshot(499).len(), 1);
        assert!(t.snapshot(500).is_empty(), "sent: gone");
    }

    #[test]
    fn slots_come_a_chunk_at_a_time() {
        let t = TaskTable::new(40);
        assert_eq!(t.allocated(), 0, "an idle connection has none");
        let mut held: Vec<TaskSlot> = (0..17).map(|i| t.claim(&task(i), 0)).collect();
        assert_eq!(t.allocated(), 2 * CHUNK);
        assert!(held.iter().all(|s| s.is_tracked()));
        for s in held.drain(..) {
            t.release(s);
        }
        let _again: Vec<TaskSlot> = (0..20).map(|i| t.claim(&task(i), 0)).collect();
        assert_eq!(t.allocated(), 2 * CHUNK, "freed slots are reused first");
        assert_eq!(t.snapshot(0).len(), 20);
    }

    #[test]
    fn a_full_table_leaves_tasks_untracked_and_reuses_sent_slots() {
        let t = TaskTable::new(2);
        let a = t.claim(&task(1), 0);
        let _b = t.claim(&task(2), 0);
        for i in 3..(CHUNK as u32 + 1) {
            assert!(t.claim(&task(i), 0).is_tracked());
        }
        assert!(!t.claim(&task(3), 0).is_tracked());
        assert_eq!(t.untracked.load(Ordering::Relaxed), 1);
        t.sending(a, 0, 10);
        assert!(!t.claim(&task(4), 9).is_tracked());
        let c = t.claim(&task(5), 10);
        assert!(c.is_tracked());
        assert!(t.snapshot(10).iter().any(|x| x.itt == 5));
    }

    #[test]
    fn state_log_keeps_the_last_transitions() {
        let mut log = StateLog::new(ConnState::Free);
        for _ in 0..(TRANSITIONS_KEPT + 3) {
            let next = if log.state == ConnState::Free {
                ConnState::XptUp
            } else {
                ConnState::Free
            };
            log.record(next, &ConnEvent::TransportUp, ConnState::rfc_name);
        }
        assert_eq!(log.recent.len(), TRANSITIONS_KEPT);
        assert_eq!(log.recent.back().unwrap().to, log.state.rfc_name());
    }
}
