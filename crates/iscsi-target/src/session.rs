//! Sessions on the target: the session table (ISID + initiator + target →
//! session, TSIH → session), session reinstatement and connection
//! reinstatement at ErrorRecoveryLevel 0, and CmdSN ordering across all
//! connections of a session (MC/S).
//!
//! A session is held by `Arc`: the table holds one reference while it is
//! logged in, each connection task one while it runs. Dropping the last
//! connection at ERL 0 removes it from the table; the `Arc`s are the
//! refcount, nothing is counted by hand.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use idm::datain::OutPdu;
use idm::sn::{CmdSnCheck, CmdWindow};
use idm::state::{SessionEvent, SessionState};
use iscsi_proto::negotiation::{NegotiatedParams, SessionType};
use iscsi_proto::pdu::{Header, Pdu};
use scsi_target::Nexus;
use tokio::sync::{mpsc, watch};

use crate::inspect::{session_state_name, unix_ms, ConnInfo, StateLog};
use crate::metrics::{IoStats, Metrics};
use crate::registry::Target;

/// Messages to a connection's task.
#[derive(Debug)]
pub enum ConnMsg {
    /// A command whose turn came (CmdSN order) although it arrived here.
    Deliver(Pdu),
    /// Send an Async Message asking the initiator to log out, then close.
    RequestLogout,
    /// Close now (session closed, reinstated, or connection reinstated).
    Close,
    /// A second went by: time to look at NOP-In pings and idleness.
    Tick,
}

/// Messages to a connection's writer.
#[derive(Debug)]
pub enum WriterMsg {
    Pdus(Vec<OutPdu>),
    /// Flush what came before and close the transport.
    Close,
}

/// What the session keeps of one of its connections.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub cid: u16,
    pub serial: u64,
    pub inbox: mpsc::UnboundedSender<ConnMsg>,
    pub peer_addr: String,
    pub local_addr: String,
    /// The connection's live state, counters and tasks (for inspection).
    pub info: Arc<ConnInfo>,
}

/// A command held for its CmdSN turn, as inspection shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldCommand {
    pub cmd_sn: u32,
    /// The connection it arrived on.
    pub cid: u16,
    pub itt: u32,
    pub lun: u64,
    pub command: &'static str,
}

/// A command executing off its connection's task.
struct RunningTask {
    /// LUN in wire form.
    lun: u64,
    /// Names this execution (an aborted ITT may come back for a new command).
    token: u64,
    /// Closes when the command's work is over; `None` for work that task management does not
    /// wait for (a SANITIZE command waiting on its LU's sanitize operation, which goes on).
    done: Option<watch::Receiver<()>>,
}

#[derive(Default)]
struct Running {
    tasks: HashMap<u32, RunningTask>,
    next_token: u64,
}

struct Ordering_ {
    window: CmdWindow,
    /// Commands that arrived ahead of ExpCmdSN, with the connection they
    /// came on; `None` marks a CmdSN counted as received without a command
    /// (aborted while waiting, or named by an ABORT TASK before it arrived).
    pending: BTreeMap<u32, Option<(u16, Pdu)>>,
}

pub struct Session {
    pub tsih: u16,
    pub isid: [u8; 6],
    pub initiator_name: String,
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub target: Option<Arc<Target>>,
    pub nexus: Nexus,
    pub params: NegotiatedParams,
    ordering: Mutex<Ordering_>,
    exp_cmd_sn: AtomicU32,
    max_cmd_sn: AtomicU32,
    conns: Mutex<HashMap<u16, ConnHandle>>,
    /// Commands executing off their connection's task, by ITT: (LUN in
    /// wire form, a token of this execution). Task management takes them
    /// out to abort them; a command no longer here sends no response.
    running: Mutex<Running>,
    closed: AtomicBool,
    state: Mutex<StateLog<SessionState>>,
    pub created_unix_ms: u64,
    /// This session's counters.
    pub io: Arc<IoStats>,
    /// Its target's counters, which take this session's when it ends.
    pub target_io: Option<Arc<IoStats>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tsih", &self.tsih)
            .field("initiator", &self.initiator_name)
            .field("target", &self.target_name)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// RFC 7143 §8.3 state of the session.
    pub fn state(&self) -> SessionState {
        self.state
            .lock()
            .map(|s| s.state)
            .unwrap_or(SessionState::Free)
    }

    /// The state and its recent transitions.
    pub fn state_log(&self) -> StateLog<SessionState> {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The one place the session's state changes.
    fn transition(&self, event: SessionEvent) {
        if let Ok(mut s) = self.state.lock() {
            match s.state.next(event) {
                Ok(next) => s.record(next, &event, session_state_name),
                Err(e) => tracing::debug!(error = %e, tsih = self.tsih, "ignored session event"),
            }
        }
    }

    /// Commands that arrived ahead of their CmdSN turn and wait for it.
    pub fn held_commands(&self) -> Vec<HeldCommand> {
        let Ok(o) = self.ordering.lock() else {
            return vec![];
        };
        o.pending
            .iter()
            .filter_map(|(sn, slot)| {
                let (cid, pdu) = slot.as_ref()?;
                let Header::ScsiCommand(h) = &pdu.header else {
                    return None;
                };
                Some(HeldCommand {
                    cmd_sn: *sn,
                    cid: *cid,
                    itt: h.itt,
                    lun: iscsi_proto::pdu::lun_from_wire(h.lun),
                    command: crate::inspect::command_name(&h.full_cdb()),
                })
            })
            .collect()
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.load(Ordering::Acquire)
    }

    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn publish(&self, w: &CmdWindow) {
        self.max_cmd_sn.store(w.max_cmd_sn(), Ordering::Release);
        self.exp_cmd_sn.store(w.exp_cmd_sn(), Ordering::Release);
    }

    /// Admits a non-immediate command that arrived on connection `cid`.
    /// Returns the commands now deliverable, in CmdSN order, each with the
    /// connection that must execute it (its allegiance). A command outside
    /// the window is dropped, as RFC 7143 §3.2.2.1 says.
    pub fn admit(&self, cid: u16, cmd_sn: u32, pdu: Pdu) -> Vec<(u16, Pdu)> {
        let mut out = Vec::new();
        self.admit_into(cid, cmd_sn, pdu, &mut out);
        out
    }

    /// [`admit`](Self::admit), appending to `out`: a connection passes the
    /// same vector each time, so admitting a command allocates nothing.
    pub fn admit_into(&self, cid: u16, cmd_sn: u32, pdu: Pdu, out: &mut Vec<(u16, Pdu)>) {
        let Ok(mut o) = self.ordering.lock() else {
            return;
        };
        match o.window.check(cmd_sn) {
            CmdSnCheck::OutOfWindow => {
                tracing::debug!(cmd_sn, exp = o.window.exp_cmd_sn(), "CmdSN outside window");
                return;
            }
            CmdSnCheck::Ahead => {
                // A tombstone here means the command was aborted first.
                o.pending.entry(cmd_sn).or_insert(Some((cid, pdu)));
                return;
            }
            CmdSnCheck::InOrder => {
                o.window.advance();
                out.push((cid, pdu));
            }
        }
        Self::drain(&mut o, out);
        self.publish(&o.window);
    }

    /// Delivers every held command whose turn has come, skipping tombstones.
    fn drain(o: &mut Ordering_, out: &mut Vec<(u16, Pdu)>) {
        loop {
            let next = o.window.exp_cmd_sn();
            match o.pending.remove(&next) {
                Some(item) => {
                    o.window.advance();
                    out.extend(item);
                }
                None => break,
            }
        }
    }

    /// Counts `cmd_sn` as received without a command (RFC 7143 §11.5.1:
    /// an ABORT TASK naming a task that never arrived). Returns the held
    /// commands this lets through.
    pub fn mark_received(&self, cmd_sn: u32) -> Vec<(u16, Pdu)> {
        let mut out = Vec::new();
        let Ok(mut o) = self.ordering.lock() else {
            return out;
        };
        match o.window.check(cmd_sn) {
            CmdSnCheck::OutOfWindow => return out,
            CmdSnCheck::Ahead => {
                o.pending.entry(cmd_sn).or_insert(None);
                return out;
            }
            CmdSnCheck::InOrder => o.window.advance(),
        }
        Self::drain(&mut o, &mut out);
        self.publish(&o.window);
        out
    }

    /// Aborts commands still waiting for their turn; their CmdSNs stay
    /// counted as received (tombstones), so later commands are not stuck.
    pub fn abort_pending(&self, mut matches: impl FnMut(&Pdu) -> bool) -> usize {
        let Ok(mut o) = self.ordering.lock() else {
            return 0;
        };
        let mut n = 0;
        for slot in o.pending.values_mut() {
            if slot.as_ref().is_some_and(|(_, p)| matches(p)) {
                *slot = None;
                n += 1;
            }
        }
        n
    }

    /// A command starts executing off its connection's task; the token
    /// names this execution (an aborted ITT may come back for a new one).
    /// `done` closes when its work is over (see [`Self::abort_running`]).
    pub fn running_started(&self, itt: u32, lun: u64, done: Option<watch::Receiver<()>>) -> u64 {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        r.next_token = r.next_token.wrapping_add(1);
        let token = r.next_token;
        r.tasks.insert(itt, RunningTask { lun, token, done });
        token
    }

    /// The command finished: true when it was not aborted meanwhile, so
    /// its response goes out.
    pub fn running_finished(&self, itt: u32, token: u64) -> bool {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match r.tasks.get(&itt) {
            Some(t) if t.token == token => {
                r.tasks.remove(&itt);
                true
            }
            _ => false,
        }
    }

    /// Aborts executing commands for which `matches(itt, lun)`: they send
    /// no response. Their work cannot be stopped mid-call, so the task
    /// management response must wait for the returned signals (each closes
    /// when one command's work is over): an aborted write must not land after
    /// the initiator was told it is gone. How many were aborted, and those.
    pub fn abort_running(
        &self,
        mut matches: impl FnMut(u32, u64) -> bool,
    ) -> (usize, Vec<watch::Receiver<()>>) {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut aborted = 0;
        let mut pending = Vec::new();
        r.tasks.retain(|itt, t| {
            if !matches(*itt, t.lun) {
                return true;
            }
            aborted += 1;
            pending.extend(t.done.take());
            false
        });
        (aborted, pending)
    }

    /// Whether an executing command matches.
    pub fn has_running(&self, mut matches: impl FnMut(u32, u64) -> bool) -> bool {
        let r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        r.tasks.iter().any(|(itt, t)| matches(*itt, t.lun))
    }

    pub fn has_pending(&self, mut matches: impl FnMut(&Pdu) -> bool) -> bool {
        self.ordering
            .lock()
            .map(|o| {
                o.pending
                    .values()
                    .any(|slot| slot.as_ref().is_some_and(|(_, p)| matches(p)))
            })
            .unwrap_or(false)
    }

    pub fn connection(&self, cid: u16) -> Option<ConnHandle> {
        self.conns.lock().ok()?.get(&cid).cloned()
    }

    pub fn connections(&self) -> Vec<ConnHandle> {
        self.conns
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Attaches a connection; an existing one with the same CID is closed
    /// (connection reinstatement).
    pub fn attach(&self, handle: ConnHandle) {
        if let Ok(mut c) = self.conns.lock() {
            if let Some(old) = c.insert(handle.cid, handle) {
                let _ = old.inbox.send(ConnMsg::Close);
            }
        }
    }

    /// Detaches a connection if it is still the one registered under its
    /// CID; returns how many remain.
    pub fn detach(&self, cid: u16, serial: u64) -> usize {
        let Ok(mut c) = self.conns.lock() else {
            return 0;
        };
        if c.get(&cid).is_some_and(|h| h.serial == serial) {
            c.remove(&cid);
        }
        c.len()
    }

    /// Asks the initiator to log out (Async Message on every connection).
    pub fn request_logout(&self) {
        for h in self.connections() {
            let _ = h.inbox.send(ConnMsg::RequestLogout);
        }
    }

    /// Closes every connection of the session.
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        for h in self.connections() {
            let _ = h.inbox.send(ConnMsg::Close);
        }
    }
}

/// Key of a session: an initiator port (name + ISID) at a target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    initiator: String,
    isid: [u8; 6],
    target: String,
}

#[derive(Default)]
pub struct SessionTable {
    sessions: Mutex<HashMap<u16, Arc<Session>>>,
    /// Counters per target and LU (sessions carry their own).
    pub metrics: Metrics,
    /// Write data being collected, across every session.
    pub write_budget: Arc<crate::budget::ByteBudget>,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
    next_conn: AtomicU64,
}

/// Parameters of a new session.
pub struct NewSession {
    pub isid: [u8; 6],
    pub initiator_name: String,
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub target: Option<Arc<Target>>,
    pub portal_group_tag: u16,
    pub params: NegotiatedParams,
    pub first_cmd_sn: u32,
    pub queue_depth: u32,
    /// Refuse the session if this many exist already (a reinstated one does not count).
    pub max_sessions: usize,
}

impl SessionTable {
    pub fn conn_serial(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn by_tsih(&self, tsih: u16) -> Option<Arc<Session>> {
        self.sessions.lock().ok()?.get(&tsih).cloned()
    }

    /// Target `iqn`'s counters: its ended sessions' and its live ones'.
    pub fn target_io(&self, iqn: &str) -> crate::metrics::IoSnapshot {
        let Ok(sessions) = self.sessions.lock() else {
            return Default::default();
        };
        let mut total = self
            .metrics
            .target_if_any(iqn)
            .map(|t| t.snapshot())
            .unwrap_or_default();
        for s in sessions.values() {
            if s.target_name
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(iqn))
            {
                total.add(&s.io.snapshot());
            }
        }
        total
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.sessions
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates a session; an existing one of the same initiator port at the
    /// same target is closed first (session reinstatement, RFC 7143 §6.3.5).
    /// None when `max_sessions` are open already.
    pub fn create(&self, new: NewSession) -> Option<Arc<Session>> {
        let key = SessionKey {
            initiator: new.initiator_name.to_ascii_lowercase(),
            isid: new.isid,
            target: new
                .target_name
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase(),
        };
        let old: Vec<Arc<Session>> = self
            .all()
            .into_iter()
            .filter(|s| {
                s.session_type == new.session_type
                    && SessionKey {
                        initiator: s.initiator_name.to_ascii_lowercase(),
                        isid: s.isid,
                        target: s
                            .target_name
                            .clone()
                            .unwrap_or_default()
                            .to_ascii_lowercase(),
                    } == key
            })
            .collect();
        let open = self.sessions.lock().map(|s| s.len()).unwrap_or(0);
        if open.saturating_sub(old.len()) >= new.max_sessions {
            tracing::warn!(open, max = new.max_sessions, initiator = %new.initiator_name,
                "session refused: max_sessions reached");
            return None;
        }
        for s in old {
            tracing::info!(tsih = s.tsih, initiator = %s.initiator_name, "session reinstated");
            self.remove(&s, SessionEvent::Reinstated);
            s.close_all();
        }
        let isid_hex: String = new.isid.iter().map(|b| format!("{b:02x}")).collect();
        let nexus = Nexus {
            id: self.next_nexus.fetch_add(1, Ordering::Relaxed) + 1,
            initiator_port_name: Arc::from(format!("{},i,0x{isid_hex}", new.initiator_name)),
            target_port_name: Arc::from(format!(
                "{},t,0x{:04x}",
                new.target_name.as_deref().unwrap_or(""),
                new.portal_group_tag
            )),
            relative_target_port_id: new.portal_group_tag,
            target_port_group_id: 1,
        };
        let window = CmdWindow::new(new.first_cmd_sn, new.queue_depth);
        let target_io = new.target_name.as_deref().map(|t| self.metrics.target(t));
        let mut sessions = match self.sessions.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut tsih = 0;
        for _ in 0..=u16::MAX {
            let t = self
                .next_tsih
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if t != 0 && !sessions.contains_key(&t) {
                tsih = t;
                break;
            }
        }
        let session = Arc::new(Session {
            tsih,
            isid: new.isid,
            initiator_name: new.initiator_name,
            target_name: new.target_name,
            session_type: new.session_type,
            target: new.target,
            nexus,
            params: new.params,
            exp_cmd_sn: AtomicU32::new(window.exp_cmd_sn()),
            max_cmd_sn: AtomicU32::new(window.max_cmd_sn()),
            ordering: Mutex::new(Ordering_ {
                window,
                pending: BTreeMap::new(),
            }),
            conns: Mutex::new(HashMap::new()),
            running: Mutex::new(Running::default()),
            closed: AtomicBool::new(false),
            state: Mutex::new(StateLog::new(SessionState::Free)),
            created_unix_ms: unix_ms(),
            io: Arc::new(IoStats::default()),
            target_io,
        });
        // N1 then N2: the leading login started and has just succeeded.
        session.transition(SessionEvent::LeadingLogin);
        session.transition(SessionEvent::LoginSucceeded);
        sessions.insert(tsih, session.clone());
        drop(sessions);
        if let Some(t) = &session.target {
            for lun in t.luns.luns() {
                if let Some(lu) = t.luns.get(lun) {
                    lu.nexus_established(&session.nexus);
                }
            }
        }
        Some(session)
    }

    /// Takes a session out of the table (logout, reinstatement, last
    /// connection gone) and tells its LUs the nexus is gone. Its counters
    /// go to its target's (under the table's lock, so a reader of
    /// [`SessionTable::target_io`] sees them once, never twice).
    pub fn remove(&self, session: &Arc<Session>, why: SessionEvent) {
        let removed = self
            .sessions
            .lock()
            .ok()
            .and_then(|mut s| match s.get(&session.tsih) {
                Some(cur) if Arc::ptr_eq(cur, session) => {
                    if let Some(t) = &session.target_io {
                        t.absorb(&session.io.snapshot());
                    }
                    s.remove(&session.tsih)
                }
                _ => None,
            });
        if removed.is_some() {
            session.transition(why);
            if let Some(t) = &session.target {
                // Also the LUs a view change took away since its last command.
                t.luns.nexus_lost(session.nexus.id);
            }
        }
    }
}
