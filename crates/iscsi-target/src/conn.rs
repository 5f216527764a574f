//! One connection on the target, from the first Login Request to close:
//! login through IDM's [`TargetLogin`], then the full feature phase — SCSI
//! commands to the SCSI core in CmdSN order, R2T / Data-Out through IDM's
//! [`WriteCollector`], Data-In through [`build_response`], NOP-Out/NOP-In
//! both ways, task management, text (SendTargets), logout.
//!
//! The reader task owns the task table and answers on its own: it handles
//! every request that has arrived, then sends all their responses in one
//! vectored write without waiting (StatSN / ExpCmdSN / MaxCmdSN stamped at
//! send time), so a command costs no wake-up of another task. A writer task
//! steps in only when the socket cannot take everything at once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use idm::datain::{build_response, Completion, DataInLimits, OutPdu, Residual};
use idm::login::{
    Admission, Binding, ChapRequirement, LoginAuthority, LoginIdentity, LoginOutcome, LoginStep,
    TargetLogin,
};
use idm::r2t::{WriteCollector, WriteLimits};
use idm::state::{ConnEvent, ConnState};
use idm::transport::{DataOutSink, PduRx, PduTx, Received, Transport, TransportError};
use iscsi_proto::chap::ChapAlgorithm;
use iscsi_proto::codec::DecodeError;
use iscsi_proto::negotiation::{Digest, NegotiatedParams, Policy, SessionType};
use iscsi_proto::pdu::{
    self, async_event, login_status, logout, reject_reason, tmf, AsyncMessage, Header,
    LogoutRequest, LogoutResponse, NopIn, NopOut, Pdu, RawPdu, Reject, ScsiCommand,
    TaskMgmtRequest, TaskMgmtResponse, TextRequest, TextResponse, BHS_LEN, RESERVED_TAG,
};
use scsi_target::{ScsiTask, TaskAttr};
use tokio::sync::mpsc;

use crate::config::AuthConfig;
use crate::discovery;
use crate::inspect::{ConnInfo, NewTask, StateLog, TaskSlot, TaskState};
use crate::metrics::{now_ns, Dir, Finished, IoStats};
use crate::registry::Registry;
use crate::session::{ConnHandle, ConnMsg, NewSession, Session};

/// Requests a connection handles in a row, while more keep arriving,
/// before it sends their answers and looks at its other sources (session
/// messages, timers).
const STREAK_MAX: u32 = 64;
/// Largest write we collect for one command.
const MAX_WRITE: u32 = 64 << 20;
/// Write data one connection may hold while collecting it; beyond this,
/// commands get TASK SET FULL, so a peer cannot make us allocate at will.
const MAX_PENDING_WRITE_BYTES: u64 = 256 << 20;

/// Serves one accepted transport connection to its end.
pub async fn serve<T: Transport>(transport: T, registry: Arc<Registry>, portal_group_tag: u16) {
    let info = transport.info();
    let span = tracing::info_span!("conn", peer = %info.peer_addr);
    let _enter = span.enter();
    drop(_enter);
    let (mut rx, mut tx) = transport.into_split();
    let mut state = StateLog::new(ConnState::Free);
    step(&mut state, ConnEvent::TransportUp);
    let authority = Authority {
        registry: registry.clone(),
        portal_group_tag,
        rdma: info.kind == "iser",
        bound: Mutex::new(None),
    };
    let outcome = match tokio::time::timeout(
        Duration::from_secs(registry.defaults().login_timeout.max(1)),
        login(&mut rx, &mut tx, &authority, &mut state),
    )
    .await
    {
        Ok(Ok(o)) => o,
        // A probe, health check or port scan: connect, then close or reset
        // before a word (not worth a line each at info).
        Ok(Err(end @ (LoginEnd::ClosedBeforeLogin | LoginEnd::ResetBeforeLogin(_)))) => {
            tracing::debug!(peer = %info.peer_addr, reason = %end, "login did not complete");
            tx.shutdown().await;
            return;
        }
        Ok(Err(end)) => {
            tracing::info!(peer = %info.peer_addr, reason = %end, "login did not complete");
            tx.shutdown().await;
            return;
        }
        Err(_) => {
            tracing::info!(peer = %info.peer_addr, "login did not complete: login timeout");
            tx.shutdown().await;
            return;
        }
    };
    let Some(session) = authority.bound.lock().ok().and_then(|mut b| b.take()) else {
        return;
    };
    // Session-wide keys (burst lengths, InitialR2T, ImmediateData, ...) are
    // negotiated on the leading connection only (RFC 7143 §13: LO keys); a
    // connection joining the session takes them from the session and keeps
    // its own connection-only keys (digests, MaxRecvDataSegmentLength).
    let params = {
        let own = &outcome.params;
        let mut p = session.params.clone();
        p.header_digest = own.header_digest;
        p.data_digest = own.data_digest;
        p.max_recv_data_segment_length = own.max_recv_data_segment_length;
        p.max_xmit_data_segment_length = own.max_xmit_data_segment_length;
        p.rdma_extensions = own.rdma_extensions;
        p.target_recv_data_segment_length = own.target_recv_data_segment_length;
        p.initiator_recv_data_segment_length = own.initiator_recv_data_segment_length;
        idm::transport::full_feature_limits(&mut p, idm::transport::Role::Target);
        p
    };
    rx.set_digests(params.header_digest, params.data_digest);
    tx.set_digests(params.header_digest, params.data_digest);
    rx.set_max_recv_data_segment_length(params.max_recv_data_segment_length);
    tx.enable_datamover(&params);
    step(&mut state, ConnEvent::LoginSucceeded);
    tracing::info!(
        peer = %info.peer_addr,
        initiator = %outcome.identity.initiator_name,
        target = outcome.identity.target_name.as_deref().unwrap_or("(discovery)"),
        tsih = session.tsih,
        cid = outcome.identity.cid,
        state = state.state.rfc_name(),
        header_digest = params.header_digest,
        data_digest = params.data_digest,
        mrdsl_in = params.max_recv_data_segment_length,
        mrdsl_out = params.max_xmit_data_segment_length,
        "logged in"
    );
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
    // The connection's clock: a tick a second through its inbox (a weak sender, so the inbox
    // still closes when the session lets the connection go).
    tokio::spawn(ticks(inbox_tx.downgrade()));
    let serial = registry.sessions.conn_serial();
    let cid = outcome.identity.cid;
    // One snapshot of the defaults for this connection's limits (set-up, not per command).
    let defaults = registry.defaults();
    let live = Arc::new(ConnInfo::new(
        cid,
        info.peer_addr.clone(),
        info.local_addr.clone(),
        params.clone(),
        state,
        session.io.clone(),
        crate::inspect::task_slots(defaults.queue_depth),
    ));
    session.attach(ConnHandle {
        cid,
        serial,
        inbox: inbox_tx,
        peer_addr: info.peer_addr.clone(),
        local_addr: info.local_addr.clone(),
        info: live.clone(),
    });
    let (outbox, writer) = Outbox::new(
        tx,
        session.clone(),
        outcome.next_stat_sn,
        usize::try_from(defaults.connection_buffer_limit).unwrap_or(usize::MAX),
        live.clone(),
    );
    let writer = tokio::spawn(writer);
    let local: Option<SocketAddr> = info.local_addr.parse().ok();
    let mut conn = Conn {
        registry: registry.clone(),
        session: session.clone(),
        cid,
        params,
        writer: outbox,
        tasks: HashMap::new(),
        pending_write_bytes: 0,
        write_buffer_limit: defaults.write_buffer_limit,
        refused_for_memory: HashSet::new(),
        next_ttt: 1,
        local,
        text_pending: None,
        text_in: None,
        ping: None,
        closing: false,
        logout_session: false,
        info: live,
        lu_io: HashMap::new(),
        last_lu_io: None,
        aborted_work: Vec::new(),
        admitted: Vec::new(),
        placed_immediate: None,
        own_immediate: HashMap::new(),
    };
    conn.run(rx, inbox).await;
    // Leave the session table before the socket closes, so an initiator
    // that saw our logout answer and EOF cannot join the old session.
    let remaining = session.detach(cid, serial);
    if remaining == 0 || conn.logout_session {
        let why = if conn.logout_session {
            idm::state::SessionEvent::Closed
        } else {
            idm::state::SessionEvent::ConnectionsFailed
        };
        registry.sessions.remove(&session, why);
        if conn.logout_session {
            session.close_all();
        }
    }
    conn.writer.close();
    let _ = writer.await;
    tracing::info!(peer = %info.peer_addr, tsih = session.tsih, cid, "connection closed");
}

/// Moves a connection that is not logged in yet (no [`ConnInfo`] so far).
fn step(log: &mut StateLog<ConnState>, event: ConnEvent) -> Option<ConnState> {
    let next = log.state.next(event).ok()?;
    log.record(next, &event, ConnState::rfc_name);
    Some(next)
}

async fn send_now<Tx: PduTx>(tx: &mut Tx, pdu: Pdu) -> bool {
    tx.send(std::slice::from_ref(&pdu)).await.is_ok()
}

/// Why a connection ended during login, for the log line that says so.
#[derive(Debug, thiserror::Error)]
enum LoginEnd {
    #[error("closed before a Login Request")]
    ClosedBeforeLogin,
    #[error("reset before a Login Request: {0}")]
    ResetBeforeLogin(TransportError),
    #[error("closed by the initiator during login")]
    Closed,
    #[error("receive failed: {0}")]
    Receive(#[from] TransportError),
    #[error("unparsable PDU: {0}")]
    Parse(String),
    #[error("a PDU other than a Login Request before full feature phase")]
    NotLogin,
    #[error("the login response could not be sent")]
    Send,
    #[error("refused with status class {0} detail {1}")]
    Refused(u8, u8),
    #[error("connection state machine refused {0:?}")]
    State(ConnEvent),
}

async fn login<Rx: PduRx, Tx: PduTx>(
    rx: &mut Rx,
    tx: &mut Tx,
    authority: &Authority,
    state: &mut StateLog<ConnState>,
) -> Result<LoginOutcome, LoginEnd> {
    let mut machine = TargetLogin::new(authority.portal_group_tag);
    let mut received_any = false;
    loop {
        let received = match rx.recv().await {
            Err(e) if !received_any => return Err(LoginEnd::ResetBeforeLogin(e)),
            other => other?,
        };
        let Some(raw) = received else {
            return Err(if received_any {
                LoginEnd::Closed
            } else {
                LoginEnd::ClosedBeforeLogin
            });
        };
        received_any = true;
        let pdu = raw.parse().map_err(|e| LoginEnd::Parse(e.to_string()))?;
        let Header::LoginRequest(req) = &pdu.header else {
            // Anything but a Login Request before full feature phase ends
            // the connection (RFC 7143 §6.1).
            return Err(LoginEnd::NotLogin);
        };
        if state.state == ConnState::XptUp {
            step(state, ConnEvent::LoginReceived)
                .ok_or(LoginEnd::State(ConnEvent::LoginReceived))?;
        }
        match machine.handle(req, &pdu.data, authority) {
            LoginStep::Continue(resp) => {
                if !send_now(tx, resp).await {
                    return Err(LoginEnd::Send);
                }
            }
            LoginStep::Complete(resp, outcome) => {
                return if send_now(tx, resp).await {
                    Ok(*outcome)
                } else {
                    Err(LoginEnd::Send)
                };
            }
            LoginStep::Fail(resp, status) => {
                let _ = send_now(tx, resp).await;
                step(state, ConnEvent::LoginFailed)
                    .ok_or(LoginEnd::State(ConnEvent::LoginFailed))?;
                return Err(LoginEnd::Refused(status.0, status.1));
            }
        }
    }
}

/// The target's login policy for one connection on one portal group.
struct Authority {
    registry: Arc<Registry>,
    portal_group_tag: u16,
    /// The connection is iSER: offer RDMAExtensions (and no digests).
    rdma: bool,
    bound: Mutex<Option<Arc<Session>>>,
}

impl Authority {
    fn policy(&self) -> Policy {
        let d = &self.registry.defaults();
        Policy {
            max_recv_data_segment_length: d.max_recv_data_segment_length,
            max_burst_length: d.max_burst_length,
            first_burst_length: d.first_burst_length,
            max_outstanding_r2t: d.max_outstanding_r2t,
            max_connections: d.max_connections,
            // Over iSER, data the initiator does not send inline is fetched
            // by RDMA READ, which costs neither side a receive buffer; so ask
            // for InitialR2T=Yes (as LIO's isert does) and keep unsolicited
            // Data-Out SENDs from eating the receives posted for commands.
            initial_r2t: d.initial_r2t || self.rdma,
            immediate_data: d.immediate_data,
            header_digest: vec![Digest::None, Digest::Crc32c],
            data_digest: vec![Digest::None, Digest::Crc32c],
            rdma_extensions: self.rdma,
            // iSER: the unsolicited PDUs the initiator may have in flight are
            // what the receive queue holds (0, no limit, means nothing on TCP).
            max_outstanding_unexpected_pdus: if self.rdma {
                crate::iser_portal::recv_depth(d.queue_depth)
            } else {
                0
            },
            ..Policy::default()
        }
    }

    fn chap_for(
        &self,
        initiator: &str,
        mutual: Option<(String, Vec<u8>)>,
    ) -> Result<ChapRequirement, (u8, u8)> {
        let ini = self
            .registry
            .initiator(initiator)
            .ok_or(login_status::AUTHENTICATION_FAILURE)?;
        // The administrator's choice (itadm modify-defaults), in preference order.
        let algorithms = self
            .registry
            .defaults()
            .chap_algorithms
            .iter()
            .filter_map(|a| match a.as_str() {
                "sha3-256" => Some(ChapAlgorithm::Sha3_256),
                "sha256" => Some(ChapAlgorithm::Sha256),
                "sha1" => Some(ChapAlgorithm::Sha1),
                "md5" => Some(ChapAlgorithm::Md5),
                _ => None,
            })
            .collect();
        Ok(ChapRequirement {
            algorithms,
            initiator_user: ini.chap_user.clone(),
            initiator_secret: ini.chap_secret.as_bytes().to_vec(),
            target_credentials: mutual,
        })
    }
}

impl LoginAuthority for Authority {
    fn admit(&self, who: &LoginIdentity) -> Result<Admission, (u8, u8)> {
        let policy = self.policy();
        if who.session_type == SessionType::Discovery {
            let chap = match self.registry.discovery_auth() {
                AuthConfig::None => None,
                AuthConfig::Chap => Some(self.chap_for(&who.initiator_name, None)?),
            };
            return Ok(Admission { chap, policy });
        }
        let name = who.target_name.as_deref().unwrap_or("");
        let target = self.registry.target(name).ok_or(login_status::NOT_FOUND)?;
        if !target.portal_groups.contains(&self.portal_group_tag) {
            return Err(login_status::NOT_FOUND);
        }
        if !self.registry.snapshot().config.target_online(name) {
            // stmfadm offline-target: the target is there but not serving.
            return Err(login_status::SERVICE_UNAVAILABLE);
        }
        if !target.admits(&who.initiator_name) {
            return Err(login_status::AUTHORIZATION_FAILURE);
        }
        let chap = match target.auth {
            AuthConfig::None => None,
            AuthConfig::Chap => {
                Some(self.chap_for(&who.initiator_name, target.mutual_chap.clone())?)
            }
        };
        Ok(Admission { chap, policy })
    }

    fn bind(&self, outcome: &LoginOutcome) -> Result<Binding, (u8, u8)> {
        let who = &outcome.identity;
        let sessions = &self.registry.sessions;
        let session = if who.tsih == 0 {
            let defaults = self.registry.defaults();
            let target = match who.session_type {
                SessionType::Discovery => None,
                SessionType::Normal => Some(
                    self.registry
                        .target_for(
                            who.target_name.as_deref().unwrap_or(""),
                            &who.initiator_name,
                        )
                        .ok_or(login_status::NOT_FOUND)?,
                ),
            };
            sessions
                .create(NewSession {
                    isid: who.isid,
                    initiator_name: who.initiator_name.clone(),
                    target_name: target.as_ref().map(|t| t.iqn.clone()),
                    session_type: who.session_type,
                    target,
                    portal_group_tag: self.portal_group_tag,
                    params: outcome.params.clone(),
                    first_cmd_sn: outcome.cmd_sn,
                    queue_depth: defaults.queue_depth,
                    max_sessions: usize::try_from(defaults.max_sessions).unwrap_or(usize::MAX),
                })
                .ok_or(login_status::OUT_OF_RESOURCES)?
        } else {
            // A connection joining (MC/S) or reinstating one in a session.
            let s = sessions
                .by_tsih(who.tsih)
                .ok_or(login_status::SESSION_DOES_NOT_EXIST)?;
            if s.isid != who.isid
                || !s.initiator_name.eq_ignore_ascii_case(&who.initiator_name)
                || s.target_name.as_deref().map(str::to_ascii_lowercase)
                    != who.target_name.as_deref().map(str::to_ascii_lowercase)
                || s.is_closed()
            {
                return Err(login_status::SESSION_DOES_NOT_EXIST);
            }
            let existing = s.connections();
            let replacing = existing.iter().any(|c| c.cid == who.cid);
            if !replacing && existing.len() as u32 >= s.params.max_connections.max(1) {
                return Err(login_status::TOO_MANY_CONNECTIONS);
            }
            s
        };
        let binding = Binding {
            tsih: session.tsih,
            exp_cmd_sn: session.exp_cmd_sn(),
            max_cmd_sn: session.max_cmd_sn(),
        };
        if let Ok(mut b) = self.bound.lock() {
            *b = Some(session);
        }
        Ok(binding)
    }
}

/// Sends the connection [`ConnMsg::Tick`] every second (its NOP-In pings and
/// their timeouts) until the connection's loop is gone: the loop then has no
/// timer of its own to poll each time it wakes.
async fn ticks(inbox: mpsc::WeakUnboundedSender<ConnMsg>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let Some(tx) = inbox.upgrade() else {
            return;
        };
        if tx.send(ConnMsg::Tick).is_err() {
            return;
        }
    }
}

/// The writer task: steps in when the transport could not take queued PDUs
/// without waiting (a full socket, or a transport without `try_send`), and
/// then holds the transport, sending, until the queue is empty; closes it at
/// the end of the connection.
async fn writer_loop<Tx: PduTx>(shared: Arc<Shared<Tx>>) {
    let common = shared.common.clone();
    let mut held: Option<Tx> = None;
    loop {
        if held.is_none() {
            common.wake.notified().await;
        }
        if common.writer_gone() {
            break;
        }
        let batch = {
            let Ok(mut s) = shared.slot.lock() else {
                break;
            };
            if held.is_none() {
                held = s.tx.take();
            }
            let batch = shared.stamp(&mut s);
            let unsent = held.as_ref().is_some_and(|t| t.has_unsent());
            if batch.is_empty() && !unsent {
                if s.closing {
                    break;
                }
                // Nothing left: the transport goes back for inline sends.
                if held.is_some() {
                    s.tx = held.take();
                }
                continue;
            }
            batch
        };
        let Some(tx) = held.as_mut() else {
            break;
        };
        let bytes = batch_len(&batch);
        match tokio::time::timeout(SEND_TIMEOUT, tx.send(&batch)).await {
            Ok(Ok(())) => common.sent(bytes),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    common.writer_stopped();
    let tx = held.or_else(|| shared.slot.lock().ok().and_then(|mut s| s.tx.take()));
    if let Some(mut tx) = tx {
        tx.shutdown().await;
    }
}

/// The send side of a connection, shared by its reader, the threads that
/// complete commands of LUs that may block, and its writer task.
///
/// PDUs are queued, then flushed: stamped with StatSN / ExpCmdSN / MaxCmdSN
/// and handed to the transport without waiting ([`PduTx::try_send`]) by
/// whoever flushes — the reader once it has answered every request it has
/// received (one `writev` per batch, and no wake-up of another task on the
/// way), a blocking-pool thread right after its command. The writer task
/// only steps in when the transport cannot take them now.
///
/// Bytes queued and not yet on the wire are counted: the reader stops
/// reading while they are above `connection_buffer_limit`, so a peer that
/// sends requests without reading the answers cannot grow our memory.
#[derive(Clone)]
struct Outbox {
    queue: Arc<dyn SendQueue>,
    common: Arc<Common>,
    /// Counts PDUs and bytes for inspection.
    info: Arc<ConnInfo>,
}

/// The transport-independent half of [`Outbox`].
struct Common {
    bytes: std::sync::atomic::AtomicUsize,
    /// Above this many queued bytes the reader waits.
    limit: usize,
    room: tokio::sync::Notify,
    /// Wakes the writer task (a stored permit: no wake-up is lost).
    wake: tokio::sync::Notify,
    /// The writer has stopped, or a send failed: the connection is over.
    writer_gone: std::sync::atomic::AtomicBool,
    info: Arc<ConnInfo>,
}

/// What [`Outbox`] needs of [`Shared`] without knowing the transport's type.
trait SendQueue: Send + Sync {
    /// Runs `append` on the queue, under its lock.
    fn push_with(&self, append: &mut dyn FnMut(&mut Vec<OutPdu>));
    fn flush(&self);
    fn close(&self);
}

/// The transport and its queue, behind one lock that is never held across
/// an await (the writer task takes the transport out to await on it).
struct Shared<Tx> {
    slot: Mutex<Slot<Tx>>,
    common: Arc<Common>,
    session: Arc<Session>,
}

struct Slot<Tx> {
    /// `None` while the writer task holds it.
    tx: Option<Tx>,
    /// Queued in order, not stamped yet.
    queue: Vec<OutPdu>,
    /// Stamped and in order, for the writer task: the transport took
    /// nothing of them, or still had bytes of an earlier batch to send.
    stamped: Vec<Pdu>,
    /// An empty batch kept for its allocation (one flush per command at QD1).
    spare: Vec<Pdu>,
    stat_sn: u32,
    closing: bool,
}

/// A send that makes no progress for this long ends the connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a task management response waits for aborted commands' work already running on
/// I/O threads (a store that hangs must not hang task management with it).
const ABORT_WAIT: Duration = Duration::from_secs(30);

/// Resolves once every receiver's sender is gone (each command's work is over).
async fn wait_all_closed(pending: Vec<tokio::sync::watch::Receiver<()>>) {
    for mut rx in pending {
        // Nothing is ever sent: changed() returns only when the sender drops.
        while rx.changed().await.is_ok() {}
    }
}

fn wire_len(pdus: &[OutPdu]) -> usize {
    pdus.iter().map(|p| BHS_LEN + p.pdu.data.len()).sum()
}

fn batch_len(pdus: &[Pdu]) -> usize {
    pdus.iter().map(|p| BHS_LEN + p.data.len()).sum()
}

impl<Tx: PduTx> Shared<Tx> {
    /// Everything due to go out, in order, with sequence numbers as of now.
    fn stamp(&self, s: &mut Slot<Tx>) -> Vec<Pdu> {
        let mut batch = std::mem::take(&mut s.stamped);
        if s.queue.is_empty() {
            return batch;
        }
        if batch.is_empty() {
            batch = std::mem::take(&mut s.spare);
        }
        let exp = self.session.exp_cmd_sn();
        let max = self.session.max_cmd_sn();
        batch.reserve(s.queue.len());
        for OutPdu {
            mut pdu,
            carries_status,
        } in s.queue.drain(..)
        {
            pdu.header.set_sequence_numbers(s.stat_sn, exp, max);
            if carries_status {
                s.stat_sn = s.stat_sn.wrapping_add(1);
            }
            batch.push(pdu);
        }
        batch
    }
}

impl<Tx: PduTx> SendQueue for Shared<Tx> {
    fn push_with(&self, append: &mut dyn FnMut(&mut Vec<OutPdu>)) {
        if let Ok(mut s) = self.slot.lock() {
            append(&mut s.queue);
        }
    }

    fn flush(&self) {
        if self.common.writer_gone() {
            return;
        }
        let Ok(mut s) = self.slot.lock() else {
            return;
        };
        if s.queue.is_empty() && s.stamped.is_empty() {
            return;
        }
        let mut batch = self.stamp(&mut s);
        let Some(tx) = s.tx.as_mut() else {
            // The writer task is sending; it takes these before it stops.
            s.stamped = batch;
            return;
        };
        if tx.has_unsent() {
            s.stamped = batch;
            drop(s);
            self.common.wake.notify_one();
            return;
        }
        match tx.try_send(&batch) {
            Ok(true) => {
                let unsent = tx.has_unsent();
                let bytes = batch_len(&batch);
                batch.clear();
                s.spare = batch;
                drop(s);
                self.common.sent(bytes);
                if unsent {
                    self.common.wake.notify_one();
                }
            }
            Ok(false) => {
                s.stamped = batch;
                drop(s);
                self.common.wake.notify_one();
            }
            Err(e) => {
                drop(s);
                tracing::debug!(error = %e, "send failed");
                self.common.writer_stopped();
                self.common.wake.notify_one();
            }
        }
    }

    fn close(&self) {
        if let Ok(mut s) = self.slot.lock() {
            s.closing = true;
        }
        self.common.wake.notify_one();
    }
}

impl Common {
    fn sent(&self, bytes: usize) {
        self.bytes
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
        self.info.sent(bytes);
        self.room.notify_waiters();
    }

    fn writer_stopped(&self) {
        self.writer_gone
            .store(true, std::sync::atomic::Ordering::Release);
        self.room.notify_waiters();
    }

    fn writer_gone(&self) -> bool {
        self.writer_gone.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Outbox {
    /// A connection's send side over `tx`, and the writer task to spawn.
    fn new<Tx: PduTx>(
        tx: Tx,
        session: Arc<Session>,
        stat_sn: u32,
        limit: usize,
        info: Arc<ConnInfo>,
    ) -> (Outbox, impl std::future::Future<Output = ()> + Send) {
        let common = Arc::new(Common {
            bytes: std::sync::atomic::AtomicUsize::new(0),
            limit,
            room: tokio::sync::Notify::new(),
            wake: tokio::sync::Notify::new(),
            writer_gone: std::sync::atomic::AtomicBool::new(false),
            info: info.clone(),
        });
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                tx: Some(tx),
                queue: Vec::new(),
                stamped: Vec::new(),
                spare: Vec::new(),
                stat_sn,
                closing: false,
            }),
            common: common.clone(),
            session,
        });
        let outbox = Outbox {
            queue: shared.clone(),
            common,
            info,
        };
        (outbox, writer_loop(shared))
    }

    /// Queues `pdus` (they go out at the next [`flush`](Self::flush));
    /// returns the connection's running total of queued bytes (they are on
    /// the wire once the sent total reaches it).
    fn send(&self, pdus: Vec<OutPdu>) -> u64 {
        let mut pdus = Some(pdus);
        self.send_with(|queue| queue.extend(pdus.take().into_iter().flatten()))
    }

    /// [`send`](Self::send) for PDUs that `append` puts straight into the
    /// queue: a command's response costs no allocation of its own.
    fn send_with(&self, mut append: impl FnMut(&mut Vec<OutPdu>)) -> u64 {
        let mut mark = 0;
        self.queue.push_with(&mut |queue| {
            let before = queue.len();
            append(queue);
            let added = queue.get(before..).unwrap_or_default();
            let len = wire_len(added);
            // Counted under the queue's lock, before any flush can subtract it.
            self.common
                .bytes
                .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            mark = self.info.queued(added.len(), len);
        });
        mark
    }

    /// Sends what is queued, or has the writer task send it.
    fn flush(&self) {
        self.queue.flush();
    }

    /// Sends what is queued, then closes the transport.
    fn close(&self) {
        self.queue.close();
    }

    fn writer_gone(&self) -> bool {
        self.common.writer_gone()
    }

    fn has_room(&self) -> bool {
        self.common.bytes.load(std::sync::atomic::Ordering::Relaxed) <= self.common.limit
    }

    async fn wait_for_room(&self) {
        loop {
            let room = self.common.room.notified();
            if self.has_room() || self.writer_gone() {
                return;
            }
            room.await;
        }
    }
}

/// Tells the transport where a Data-Out's data goes: straight into the
/// buffer of the write it belongs to, when it passes the write's checks;
/// and a write command's large immediate data: into a pooled buffer of its
/// own (which a memory LU may keep as a page: no copy).
struct Placer<'a> {
    tasks: &'a mut HashMap<u32, PendingWrite>,
    immediate: &'a mut Option<BytesMut>,
}

impl DataOutSink for Placer<'_> {
    fn sink_for(&mut self, bhs: &[u8; BHS_LEN], len: usize, done: usize) -> Option<&mut BytesMut> {
        match Header::parse(bhs, &[]) {
            Ok(Header::DataOut(h)) => {
                let len = u32::try_from(len).ok()?;
                let done = u32::try_from(done).ok()?;
                self.tasks
                    .get_mut(&h.itt)?
                    .collector
                    .placement(&h, len, done)
            }
            // Only a write that brings all its data: that buffer is the
            // write's whole data-out, as the LU needs it to keep it.
            Ok(Header::ScsiCommand(h))
                if h.write && h.final_ && len == h.expected_data_transfer_length as usize =>
            {
                let fresh = self
                    .immediate
                    .as_ref()
                    .is_some_and(|b| b.is_empty() && b.capacity() >= len);
                if done == 0 && !fresh {
                    *self.immediate = Some(scsi_target::bufpool::take_write_buffer(len));
                }
                self.immediate.as_mut().filter(|b| b.len() == done)
            }
            _ => None,
        }
    }
}

/// A write command waiting for its data.
struct PendingWrite {
    /// Its share of the process-wide write budget, returned when the task ends.
    _reservation: crate::budget::Reservation,
    cmd: ScsiCommand,
    collector: WriteCollector,
    /// Its CmdSN turn has come.
    delivered: bool,
    /// Its place in the inspection task table, and when it arrived.
    slot: TaskSlot,
    start_ns: u64,
}

struct Conn {
    registry: Arc<Registry>,
    session: Arc<Session>,
    cid: u16,
    params: NegotiatedParams,
    writer: Outbox,
    tasks: HashMap<u32, PendingWrite>,
    /// Sum of the EDTLs of `tasks`.
    pending_write_bytes: u64,
    /// The process-wide cap on write data being collected (`write_buffer_limit`).
    write_buffer_limit: u64,
    /// Writes refused at arrival because that cap was reached: they get
    /// TASK SET FULL when their CmdSN turn comes.
    refused_for_memory: HashSet<u32>,
    next_ttt: u32,
    local: Option<SocketAddr>,
    /// A long text response being pulled by the initiator: (TTT, rest).
    text_pending: Option<(u32, Vec<u8>)>,
    /// A Text Request the initiator is sending over several PDUs (C bit):
    /// (the TTT we gave it, what came so far, capped).
    text_in: Option<(u32, iscsi_proto::text::TextAccumulator)>,
    /// Our outstanding NOP-In ping: (TTT, sent at).
    ping: Option<(u32, Instant)>,
    closing: bool,
    logout_session: bool,
    /// RFC 7143 §8.1.3 state of this connection (S5 onwards, with its
    /// transitions), counters and tasks in flight.
    info: Arc<ConnInfo>,
    /// The LUs' counters, by NAA id, taken once per LU.
    lu_io: HashMap<u64, Arc<IoStats>>,
    /// The last of `lu_io` used.
    last_lu_io: Option<(u64, Arc<IoStats>)>,
    /// Work of commands the task management function being answered has
    /// aborted, still running on I/O threads: its response waits for it.
    aborted_work: Vec<tokio::sync::watch::Receiver<()>>,
    /// [`Session::admit_into`]'s output, kept for its allocation.
    admitted: Vec<(u16, Pdu)>,
    /// The immediate data being received into a buffer of its own (see [`Placer`]).
    placed_immediate: Option<BytesMut>,
    /// Commands whose immediate data is such a buffer: ITT → its address
    /// and length (checked again at execution: an entry left by a command
    /// that never ran matches nothing else).
    own_immediate: HashMap<u32, (usize, usize)>,
}

/// [`queue_finished`] off the reader's task, which flushes only once it
/// has answered what it received: this sends the response now.
fn finish(
    writer: &Outbox,
    lu_io: Option<&IoStats>,
    slot: TaskSlot,
    start_ns: u64,
    answer: &Answer,
    f: Finished,
) {
    queue_finished(writer, lu_io, slot, start_ns, answer, f);
    writer.flush();
}

/// Counts a finished command (session, target, LU), queues its response
/// and lets its task slot go once the response is on the wire.
fn queue_finished(
    writer: &Outbox,
    lu_io: Option<&IoStats>,
    slot: TaskSlot,
    start_ns: u64,
    answer: &Answer,
    mut f: Finished,
) {
    f.latency_ns = now_ns().saturating_sub(start_ns);
    let info = &writer.info;
    info.session_io.record(&f);
    if let Some(l) = lu_io {
        l.record(&f);
    }
    let mark = writer.send_with(|queue| answer.append_to(queue));
    info.tasks
        .sending(slot, f.bytes_read.max(f.bytes_written), mark);
}

/// What becomes of a command's Data-Out buffer once the LU is done with it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reclaim {
    /// A pooled write buffer of its own: the LU may keep it, else it goes
    /// back to the pool.
    WriteBuffer,
    /// Part of a received PDU: just dropped.
    Nothing,
}

/// What a command's response is made of; its PDUs are built straight into
/// the send queue.
struct Answer {
    itt: u32,
    lun: u64,
    edtl_in: u32,
    completion: Completion,
    limits: DataInLimits,
    read: bool,
}

impl Answer {
    fn append_to(&self, queue: &mut Vec<OutPdu>) {
        build_response(
            queue,
            self.itt,
            self.lun,
            self.edtl_in,
            &self.completion,
            self.limits,
            self.read,
        );
    }
}

/// The next Target Transfer Tag from `next`, never the reserved one.
fn take_ttt(next: &mut u32) -> u32 {
    let t = *next;
    *next = next.wrapping_add(1);
    if *next == RESERVED_TAG {
        *next = 1;
    }
    t
}

fn status_pdu(pdu: Pdu) -> OutPdu {
    OutPdu {
        pdu,
        carries_status: true,
    }
}

impl Conn {
    /// The one place this connection's state changes.
    fn transition(&mut self, event: ConnEvent) {
        match self.info.transition(event) {
            Ok(next) => {
                tracing::debug!(to = next.rfc_name(), ?event, "connection state");
            }
            Err(e) => tracing::debug!(error = %e, "ignored state event"),
        }
    }

    fn send(&self, pdus: Vec<OutPdu>) {
        self.writer.send(pdus);
    }

    /// The counters of `lu`, cached on the connection.
    fn lu_io(&mut self, lu: &scsi_target::LogicalUnit) -> Arc<IoStats> {
        let id = lu.config().naa_id;
        // Most commands go to the LU of the one before.
        if let Some((last, io)) = &self.last_lu_io {
            if *last == id {
                return io.clone();
            }
        }
        let io = match self.lu_io.get(&id) {
            Some(io) => io.clone(),
            None => {
                let io = self.registry.sessions.metrics.lu(id);
                self.lu_io.insert(id, io.clone());
                io
            }
        };
        self.last_lu_io = Some((id, io.clone()));
        io
    }

    /// Counts `n` tasks of LUN `lun` (wire form) ended by task management.
    fn count_aborts(&mut self, n: u64, lun: u64) {
        self.info.session_io.aborted(n);
        let lu = self
            .session
            .target
            .as_ref()
            .and_then(|t| t.luns.get(pdu::lun_from_wire(lun)));
        if let Some(lu) = lu {
            self.lu_io(&lu).aborted(n);
        }
    }

    fn alloc_ttt(&mut self) -> u32 {
        take_ttt(&mut self.next_ttt)
    }

    fn reject(&self, reason: u8, bhs: &[u8; BHS_LEN]) {
        tracing::debug!(reason, opcode = bhs[0] & 0x3f, "reject");
        self.send(vec![status_pdu(Pdu::new(
            Header::Reject(Reject {
                reason,
                data_sn: 0,
                ..Default::default()
            }),
            Bytes::copy_from_slice(bhs),
        ))]);
    }

    async fn run<Rx: PduRx>(&mut self, mut rx: Rx, mut inbox: mpsc::UnboundedReceiver<ConnMsg>) {
        let defaults = self.registry.defaults();
        let idle_limit = Duration::from_secs(defaults.nop_in_interval);
        let ping_limit = Duration::from_secs(defaults.nop_in_timeout.max(1));
        // When the last PDU came, as metrics::now_ns (read per PDU: cheaper than `Instant`).
        let mut last_rx = now_ns();
        // Requests handled in a row without a look at the other sources.
        let mut streak = 0u32;
        while !self.closing && !self.writer.writer_gone() {
            let room = self.writer.has_room();
            if room && streak < STREAK_MAX {
                // A request already here (read ahead, or waiting in the
                // socket) is handled before anything is sent: one send then
                // answers the whole batch. Dropping the pending receive loses
                // nothing (receiving is cancel-safe, as `select!` needs).
                let ready = {
                    let mut next = std::pin::pin!(rx.recv_into(Placer {
                        tasks: &mut self.tasks,
                        immediate: &mut self.placed_immediate,
                    }));
                    std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(match std::future::Future::poll(next.as_mut(), cx) {
                            std::task::Poll::Ready(r) => Some(r),
                            std::task::Poll::Pending => None,
                        })
                    })
                    .await
                };
                if let Some(r) = ready {
                    streak += 1;
                    if !self.on_recv(r, &mut last_rx).await {
                        break;
                    }
                    continue;
                }
            }
            streak = 0;
            // Everything received is handled: answer it before waiting.
            self.writer.flush();
            // In order: no random start to draw on every wake-up. Requests
            // cannot starve the inbox (it comes first) and the loop above
            // hands requests over to here every STREAK_MAX.
            tokio::select! {
                biased;
                _ = self.writer.wait_for_room(), if !room => {}
                m = inbox.recv() => match m {
                    Some(ConnMsg::Deliver(pdu)) => self.dispatch(pdu).await,
                    Some(ConnMsg::RequestLogout) => {
                        self.transition(ConnEvent::LogoutRequestedByTarget);
                        self.send(vec![status_pdu(Pdu::new(
                        Header::AsyncMessage(AsyncMessage {
                            event: async_event::LOGOUT_REQUESTED,
                            parameter3: 10,
                            ..Default::default()
                        }),
                        Bytes::new(),
                        ))]);
                    }
                    Some(ConnMsg::Tick) => {
                        if let Some((_, sent)) = self.ping {
                            if sent.elapsed() > ping_limit {
                                tracing::info!("no answer to NOP-In: dropping the connection");
                                break;
                            }
                        } else if !idle_limit.is_zero()
                            && Duration::from_nanos(now_ns().saturating_sub(last_rx)) > idle_limit
                        {
                            let ttt = self.alloc_ttt();
                            self.ping = Some((ttt, Instant::now()));
                            self.send(vec![OutPdu {
                                pdu: Pdu::new(
                                    Header::NopIn(NopIn {
                                        itt: RESERVED_TAG,
                                        ttt,
                                        ..Default::default()
                                    }),
                                    Bytes::new(),
                                ),
                                carries_status: false,
                            }]);
                        }
                    }
                    Some(ConnMsg::Close) | None => {
                        self.transition(ConnEvent::SessionClosed);
                        break;
                    }
                },
                r = rx.recv_into(Placer {
                        tasks: &mut self.tasks,
                        immediate: &mut self.placed_immediate,
                    }), if room => {
                    if !self.on_recv(r, &mut last_rx).await {
                        break;
                    }
                }
            }
        }
    }

    /// What the transport gave; false when the connection is over.
    async fn on_recv(
        &mut self,
        r: Result<Option<Received>, TransportError>,
        last_rx: &mut u64,
    ) -> bool {
        match r {
            Ok(Some(Received::Placed { bhs, len, dropped })) => {
                *last_rx = now_ns();
                self.info.received(BHS_LEN + len);
                if pdu::Opcode::from_u8(bhs[0]) == Some(pdu::Opcode::ScsiCommand) {
                    self.immediate_placed(bhs, len, dropped).await
                } else {
                    self.data_placed(&bhs, len, dropped).await;
                    true
                }
            }
            Ok(Some(Received::Pdu(raw))) => {
                *last_rx = now_ns();
                self.info.received(BHS_LEN + raw.ahs.len() + raw.data.len());
                self.on_raw(raw).await;
                true
            }
            Ok(None) => {
                self.transition(ConnEvent::TransportFailed);
                false
            }
            Err(TransportError::Decode(DecodeError::DataDigest { bhs })) => {
                self.reject(reject_reason::DATA_DIGEST_ERROR, &bhs);
                true
            }
            Err(TransportError::Decode(DecodeError::DataSegmentTooLong { bhs, len, max })) => {
                tracing::info!(len, max, "data segment too long: closing");
                self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                false
            }
            Err(e) => {
                tracing::info!(error = %e, "connection dropped");
                false
            }
        }
    }

    async fn on_raw(&mut self, raw: RawPdu) {
        let bhs = raw.bhs;
        let pdu = match raw.parse() {
            Ok(p) => p,
            Err(e) => {
                self.reject(e.reject_reason(), &bhs);
                return;
            }
        };
        if !pdu.opcode().is_initiator_opcode() {
            self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
            return;
        }
        let discovery = self.session.session_type == SessionType::Discovery;
        let (immediate, cmd_sn) = match &pdu.header {
            Header::ScsiCommand(h) => {
                if discovery {
                    self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                    return;
                }
                // An ITT must be unique among the tasks in flight (RFC 7143
                // §11.1.4 / SAM overlapped commands): refuse the newcomer.
                let itt = h.itt;
                if self.tasks.contains_key(&itt)
                    || self.session.has_pending(|p| p.header.itt() == Some(itt))
                {
                    self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                    return;
                }
                self.receive_command(h, &pdu.data);
                (h.immediate, h.cmd_sn)
            }
            Header::NopOut(h) => {
                if h.itt == RESERVED_TAG {
                    // Answer to our ping, or a ping needing no answer: no CmdSN use.
                    if self.ping.is_some_and(|(t, _)| t == h.ttt) {
                        self.ping = None;
                    }
                    return;
                }
                (h.immediate, h.cmd_sn)
            }
            Header::TaskMgmtRequest(h) => (h.immediate, h.cmd_sn),
            Header::TextRequest(h) => (h.immediate, h.cmd_sn),
            Header::LogoutRequest(h) => (h.immediate, h.cmd_sn),
            Header::DataOut(_) => {
                self.data_out(pdu, &bhs).await;
                return;
            }
            Header::SnackRequest(_) => {
                // ErrorRecoveryLevel 0: no SNACK support.
                self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &bhs);
                return;
            }
            Header::LoginRequest(_) => {
                // A login in full feature phase is a protocol error.
                self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                return;
            }
            _ => {
                self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                return;
            }
        };
        if immediate {
            self.dispatch(pdu).await;
            return;
        }
        let mut admitted = std::mem::take(&mut self.admitted);
        self.session
            .admit_into(self.cid, cmd_sn, pdu, &mut admitted);
        for (cid, ready) in admitted.drain(..) {
            if cid == self.cid {
                self.dispatch(ready).await;
            } else if let Some(other) = self.session.connection(cid) {
                let _ = other.inbox.send(ConnMsg::Deliver(ready));
            }
        }
        self.admitted = admitted;
    }

    /// A SCSI command whose immediate data the transport received into a
    /// buffer of its own (see [`Placer`]): handled as any command, the
    /// buffer remembered as the command's own.
    /// False when the connection must end.
    async fn immediate_placed(&mut self, bhs: [u8; BHS_LEN], len: usize, dropped: bool) -> bool {
        let Some(data) = self
            .placed_immediate
            .take()
            .filter(|b| !dropped && b.len() == len)
        else {
            // Cannot happen (nothing else takes the buffer while a PDU is
            // placed); a reject would leave a CmdSN hole, so the connection ends.
            tracing::warn!("placed immediate data went missing: closing the connection");
            return false;
        };
        let data = data.freeze();
        if self.own_immediate.len() >= 4096 {
            // Entries of commands that never ran (refused, or outside the window).
            self.own_immediate.clear();
        }
        let itt = u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]);
        self.own_immediate
            .insert(itt, (data.as_ptr() as usize, data.len()));
        self.on_raw(RawPdu {
            bhs,
            ahs: Bytes::new(),
            data,
        })
        .await;
        true
    }

    /// A SCSI command arrived: writes needing more data start collecting now,
    /// because unsolicited Data-Out may follow before the command's turn.
    fn receive_command(&mut self, h: &ScsiCommand, imm: &Bytes) {
        if !h.write || h.expected_data_transfer_length as usize <= imm.len() {
            return;
        }
        let edtl = u64::from(h.expected_data_transfer_length);
        if h.expected_data_transfer_length > MAX_WRITE
            || self.tasks.contains_key(&h.itt)
            || self.pending_write_bytes + edtl > MAX_PENDING_WRITE_BYTES
        {
            return;
        }
        let Some(reservation) = self
            .registry
            .sessions
            .write_budget
            .try_reserve(edtl, self.write_buffer_limit)
        else {
            // Bounded by the CmdSN window; cleared as the commands are delivered.
            if self.refused_for_memory.len() < 4096 {
                self.refused_for_memory.insert(h.itt);
            }
            return;
        };
        let limits = self.write_limits();
        // Pooled: a fresh buffer costs a page fault per page every time (the
        // allocator gives freed large blocks back to the system).
        let spare = Some(scsi_target::bufpool::take_write_buffer(edtl as usize));
        match WriteCollector::with_buffer(
            h.itt,
            h.lun,
            h.expected_data_transfer_length,
            imm.clone(),
            h.final_,
            limits,
            spare,
        ) {
            Ok(collector) => {
                self.pending_write_bytes += edtl;
                let start_ns = now_ns();
                let cdb = h.full_cdb();
                let slot = self.info.task_started(&NewTask {
                    itt: h.itt,
                    cmd_sn: h.cmd_sn,
                    lun: pdu::lun_from_wire(h.lun),
                    cdb: &cdb,
                    dir: Dir::from_flags(h.read, h.write),
                    expected: h.expected_data_transfer_length,
                    done: imm.len() as u64,
                    state: TaskState::WaitingForData,
                    start_ns,
                });
                self.tasks.insert(
                    h.itt,
                    PendingWrite {
                        cmd: h.clone(),
                        collector,
                        _reservation: reservation,
                        delivered: false,
                        slot,
                        start_ns,
                    },
                );
            }
            Err(e) => tracing::debug!(error = %e, "write refused at arrival"),
        }
    }

    fn write_limits(&self) -> WriteLimits {
        WriteLimits {
            first_burst_length: self.params.first_burst_length,
            max_burst_length: self.params.max_burst_length,
            max_outstanding_r2t: self.params.max_outstanding_r2t,
            initial_r2t: self.params.initial_r2t,
            immediate_data: self.params.immediate_data,
            data_pdu_in_order: self.params.data_pdu_in_order,
        }
    }

    async fn dispatch(&mut self, pdu: Pdu) {
        match pdu.header {
            Header::ScsiCommand(h) => self.scsi_command(h, pdu.data).await,
            Header::NopOut(h) => self.nop_out(h, pdu.data),
            Header::TaskMgmtRequest(h) => self.task_management(h).await,
            Header::TextRequest(h) => self.text(h, pdu.data),
            Header::LogoutRequest(h) => self.logout(h),
            _ => {}
        }
    }

    fn nop_out(&mut self, h: NopOut, data: Bytes) {
        let max = self.params.max_xmit_data_segment_length as usize;
        let echo = data.slice(..data.len().min(max));
        self.send(vec![status_pdu(Pdu::new(
            Header::NopIn(NopIn {
                lun: h.lun,
                itt: h.itt,
                ttt: RESERVED_TAG,
                ..Default::default()
            }),
            echo,
        ))]);
    }

    async fn scsi_command(&mut self, h: ScsiCommand, imm: Bytes) {
        let own_buffer = self
            .own_immediate
            .remove(&h.itt)
            .is_some_and(|at| h.write && at == (imm.as_ptr() as usize, imm.len()));
        let needs_data = h.write && h.expected_data_transfer_length as usize > imm.len();
        if needs_data {
            let too_big = h.expected_data_transfer_length > MAX_WRITE;
            let Some(task) = self.tasks.get_mut(&h.itt) else {
                let edtl = u64::from(h.expected_data_transfer_length);
                self.info.session_io.record(&Finished {
                    dir: Dir::Write,
                    bytes_read: 0,
                    bytes_written: 0,
                    status: if too_big {
                        scsi_target::status::CHECK_CONDITION
                    } else {
                        scsi_target::status::TASK_SET_FULL
                    },
                    latency_ns: 0,
                });
                if too_big {
                    self.complete_with_sense(
                        &h,
                        scsi_target::sense::Sense::invalid_cdb(6, None).to_bytes(),
                    );
                } else if self.refused_for_memory.remove(&h.itt)
                    || self.pending_write_bytes + edtl > MAX_PENDING_WRITE_BYTES
                {
                    self.complete_with_status(&h, scsi_target::status::TASK_SET_FULL);
                } else {
                    // The collector refused the command's own data layout.
                    self.reject_command(&h, imm.len());
                }
                return;
            };
            task.delivered = true;
            self.pump_write(h.itt).await;
            return;
        }
        // Data with the command that the session did not allow (RFC 7143
        // §13.11, §13.14): a protocol error, as the collector says for writes
        // that need more data.
        if h.write
            && !imm.is_empty()
            && (!self.params.immediate_data || imm.len() > self.params.first_burst_length as usize)
        {
            self.reject_command(&h, imm.len());
            return;
        }
        let data = if h.write { imm } else { Bytes::new() };
        let start_ns = now_ns();
        let slot = {
            let cdb = h.full_cdb();
            self.info.task_started(&NewTask {
                itt: h.itt,
                cmd_sn: h.cmd_sn,
                lun: pdu::lun_from_wire(h.lun),
                cdb: &cdb,
                dir: Dir::from_flags(h.read, h.write),
                expected: h.expected_data_transfer_length,
                done: data.len() as u64,
                state: TaskState::InBackend,
                start_ns,
            })
        };
        let reclaim = if own_buffer {
            Reclaim::WriteBuffer
        } else {
            Reclaim::Nothing
        };
        self.execute(h, data, slot, start_ns, reclaim).await;
    }

    /// Rejects a command whose header (with its `data_len` bytes of data)
    /// is rebuilt for the Reject.
    fn reject_command(&self, h: &ScsiCommand, data_len: usize) {
        let mut bhs = [0u8; BHS_LEN];
        Header::ScsiCommand(h.clone()).write_bhs(&mut bhs);
        let len = u32::try_from(data_len).unwrap_or(u32::MAX).min(0x00FF_FFFF);
        let [_, l0, l1, l2] = len.to_be_bytes();
        bhs[5] = l0;
        bhs[6] = l1;
        bhs[7] = l2;
        self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
    }

    fn complete_with_sense(&self, h: &ScsiCommand, sense: Bytes) {
        let completion = Completion {
            status: scsi_target::status::CHECK_CONDITION,
            sense: Some(sense),
            data_in: Bytes::new(),
            data_in_more: Default::default(),
            write_residual: None,
        };
        let answer = Answer {
            itt: h.itt,
            lun: h.lun,
            edtl_in: h.expected_data_transfer_length,
            completion,
            limits: self.data_in_limits(),
            read: h.read,
        };
        self.writer.send_with(|queue| answer.append_to(queue));
    }

    fn complete_with_status(&self, h: &ScsiCommand, status: u8) {
        let completion = Completion {
            status,
            sense: None,
            data_in: Bytes::new(),
            data_in_more: Default::default(),
            write_residual: None,
        };
        let answer = Answer {
            itt: h.itt,
            lun: h.lun,
            edtl_in: 0,
            completion,
            limits: self.data_in_limits(),
            read: false,
        };
        self.writer.send_with(|queue| answer.append_to(queue));
    }

    /// Forgets a write that was waiting for data.
    fn drop_write(&mut self, itt: u32) -> Option<PendingWrite> {
        let t = self.tasks.remove(&itt)?;
        self.pending_write_bytes = self
            .pending_write_bytes
            .saturating_sub(u64::from(t.collector.expected_length()));
        Some(t)
    }

    fn drop_writes(&mut self, mut which: impl FnMut(&PendingWrite) -> bool) {
        let itts: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(_, t)| which(t))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in itts {
            self.abort_write(itt);
        }
    }

    /// Ends a write that was waiting for data (task management).
    fn abort_write(&mut self, itt: u32) -> bool {
        let Some(t) = self.drop_write(itt) else {
            return false;
        };
        self.info.tasks.release(t.slot);
        self.count_aborts(1, t.cmd.lun);
        true
    }

    fn data_in_limits(&self) -> DataInLimits {
        DataInLimits {
            max_segment: self.params.max_xmit_data_segment_length,
            max_burst: self.params.max_burst_length,
        }
    }

    /// Sends the R2Ts a write needs, or executes it once all data is here.
    async fn pump_write(&mut self, itt: u32) {
        let complete = match self.tasks.get(&itt) {
            Some(t) if t.delivered => t.collector.is_complete(),
            _ => return,
        };
        if complete {
            if let Some(t) = self.drop_write(itt) {
                let (data, own_buffer) = t.collector.into_collected();
                self.info.tasks.set_state(t.slot, TaskState::InBackend);
                let reclaim = if own_buffer {
                    Reclaim::WriteBuffer
                } else {
                    Reclaim::Nothing
                };
                self.execute(t.cmd, data, t.slot, t.start_ns, reclaim).await;
            }
            return;
        }
        let Some(t) = self.tasks.get_mut(&itt) else {
            return;
        };
        let (collector, next_ttt) = (&mut t.collector, &mut self.next_ttt);
        self.writer.send_with(|queue| {
            collector.next_r2ts(
                || take_ttt(next_ttt),
                |r| {
                    queue.push(OutPdu {
                        pdu: Pdu::new(Header::R2t(r), Bytes::new()),
                        carries_status: false,
                    })
                },
            )
        });
    }

    async fn data_out(&mut self, pdu: Pdu, bhs: &[u8; BHS_LEN]) {
        let Header::DataOut(h) = &pdu.header else {
            return;
        };
        let Some(task) = self.tasks.get_mut(&h.itt) else {
            self.reject(reject_reason::INVALID_PDU_FIELD, bhs);
            return;
        };
        let len = pdu.data.len() as u64;
        if let Err(e) = task.collector.handle_data_out_bytes(h, pdu.data.clone()) {
            tracing::info!(error = %e, itt = h.itt, "bad Data-Out");
            self.reject(reject_reason::PROTOCOL_ERROR, bhs);
            return;
        }
        self.info.tasks.add_done(task.slot, len);
        let itt = h.itt;
        self.pump_write(itt).await;
    }

    /// A Data-Out whose data the transport received straight into its
    /// write's buffer (see [`Placer`]); checked as [`Self::data_out`] does.
    async fn data_placed(&mut self, bhs: &[u8; BHS_LEN], len: usize, dropped: bool) {
        let h = match Header::parse(bhs, &[]) {
            Ok(Header::DataOut(h)) => h,
            _ => {
                self.reject(reject_reason::PROTOCOL_ERROR, bhs);
                return;
            }
        };
        let Some(task) = self.tasks.get_mut(&h.itt).filter(|_| !dropped) else {
            self.reject(reject_reason::INVALID_PDU_FIELD, bhs);
            return;
        };
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        if let Err(e) = task.collector.data_placed(&h, len32) {
            tracing::info!(error = %e, itt = h.itt, "bad Data-Out");
            self.reject(reject_reason::PROTOCOL_ERROR, bhs);
            return;
        }
        self.info.tasks.add_done(task.slot, len as u64);
        self.pump_write(h.itt).await;
    }

    async fn execute(
        &mut self,
        h: ScsiCommand,
        data_out: Bytes,
        slot: TaskSlot,
        start_ns: u64,
        reclaim: Reclaim,
    ) {
        let Some(target) = self.session.target.clone() else {
            self.info.tasks.release(slot);
            return;
        };
        let lun = pdu::lun_from_wire(h.lun);
        let (itt, wire_lun) = (h.itt, h.lun);
        let nexus = self.session.nexus.clone();
        let limits = self.data_in_limits();
        let attr = match h.attr {
            pdu::task_attr::SIMPLE => TaskAttr::Simple,
            pdu::task_attr::ORDERED => TaskAttr::Ordered,
            pdu::task_attr::HEAD_OF_QUEUE => TaskAttr::HeadOfQueue,
            pdu::task_attr::ACA => TaskAttr::Aca,
            _ => TaskAttr::Untagged,
        };
        // One look at the session's LU table per command.
        let map = target.luns.map();
        let the_lu = map.get(lun).cloned();
        let blocking = the_lu.as_ref().is_some_and(|lu| lu.may_block());
        // SANITIZE without IMMED answers when the sanitize ends, minutes
        // later: it waits on the runtime's blocking pool, holding up neither
        // this connection nor one of the LU's I/O threads.
        let waits = the_lu.as_ref().is_some_and(|lu| lu.waits_long(&h.cdb));
        let lu_io = the_lu.as_ref().map(|lu| self.lu_io(lu));
        let lu = the_lu.clone();
        let run = move || {
            let cdb = h.full_cdb();
            let task = ScsiTask {
                nexus: &nexus,
                lun,
                cdb: &cdb,
                data_out: &data_out,
                data_out_buffer: (reclaim == Reclaim::WriteBuffer).then_some(&data_out),
                expected_in_len: if h.read {
                    h.bidi_read_length
                        .unwrap_or(h.expected_data_transfer_length)
                } else {
                    0
                },
                attr,
                tag: u64::from(h.itt),
            };
            let r = target.luns.execute_in(&map, &task);
            let bytes_out = data_out.len() as u64;
            // The buffer goes back to the pool unless the LU kept it.
            if reclaim == Reclaim::WriteBuffer {
                if let Ok(b) = data_out.try_into_mut() {
                    scsi_target::bufpool::recycle(b);
                }
            }
            let good = r.status == scsi_target::status::GOOD;
            let finished = Finished {
                dir: Dir::from_flags(h.read, h.write),
                bytes_read: if h.read {
                    let edtl_in = h
                        .bidi_read_length
                        .unwrap_or(h.expected_data_transfer_length);
                    (r.data_in_len() as u64).min(u64::from(edtl_in))
                } else {
                    0
                },
                bytes_written: if h.write && good { bytes_out } else { 0 },
                status: r.status,
                latency_ns: 0,
            };
            // Write residuals compare the CDB's transfer length with EDTL
            // (RFC 7143 §11.4.5); only the core knows the former.
            let write_residual = lu
                .as_ref()
                .and_then(|lu| lu.expected_data_out_len(&cdb))
                .filter(|tl| *tl > 0 || h.write)
                .and_then(|tl| {
                    let tl = u32::try_from(tl).unwrap_or(u32::MAX);
                    let edtl = if h.write {
                        h.expected_data_transfer_length
                    } else {
                        0
                    };
                    match tl.cmp(&edtl) {
                        std::cmp::Ordering::Greater => Some(Residual::Overflow(tl - edtl)),
                        std::cmp::Ordering::Less => Some(Residual::Underflow(edtl - tl)),
                        std::cmp::Ordering::Equal => None,
                    }
                });
            let completion = Completion {
                status: r.status,
                sense: r.sense,
                data_in: if h.read { r.data_in } else { Bytes::new() },
                data_in_more: if h.read {
                    r.data_in_more
                } else {
                    Default::default()
                },
                write_residual,
            };
            let edtl_in = if h.read {
                h.bidi_read_length
                    .unwrap_or(h.expected_data_transfer_length)
            } else {
                0
            };
            let answer = Answer {
                itt: h.itt,
                lun: h.lun,
                edtl_in,
                completion,
                limits,
                read: h.read,
            };
            (answer, finished)
        };
        if blocking || waits {
            let writer = self.writer.clone();
            // The runtime stays at hand, as on tokio's own blocking threads.
            let rt = tokio::runtime::Handle::current();
            let session = self.session.clone();
            // Closed when the job is over (its sender drops): what an abort waits for. Not for
            // a SANITIZE waiting on its operation, which task management does not stop.
            let (done_tx, done_rx) = tokio::sync::watch::channel(());
            let token = session.running_started(itt, wire_lun, (!waits).then_some(done_rx));
            let job = move || {
                let _done = done_tx;
                let _rt = rt.enter();
                let (answer, f) = run();
                if session.running_finished(itt, token) {
                    finish(&writer, lu_io.as_deref(), slot, start_ns, &answer, f);
                } else {
                    // Aborted while it ran: no response (RFC 7143 §11.5.1).
                    writer.info.tasks.release(slot);
                }
            };
            // The LU's own I/O threads, as many as its device serves at once.
            match the_lu {
                Some(lu) if !waits => lu.spawn_io(job),
                _ => drop(tokio::task::spawn_blocking(job)),
            }
        } else {
            let (answer, f) = run();
            queue_finished(&self.writer, lu_io.as_deref(), slot, start_ns, &answer, f);
        }
    }

    /// [`Session::abort_running`], keeping the work to wait for before the response.
    fn abort_running(&mut self, matches: impl FnMut(u32, u64) -> bool) -> usize {
        let (n, pending) = self.session.abort_running(matches);
        self.aborted_work.extend(pending);
        n
    }

    async fn task_management(&mut self, h: TaskMgmtRequest) {
        let response = self.tmf_response(&h);
        // SAM-5: aborted commands are over before the function completes; work already running
        // on an I/O thread cannot be stopped, so wait for it (bounded, in case a store hangs).
        let pending = std::mem::take(&mut self.aborted_work);
        if !pending.is_empty() {
            let all = wait_all_closed(pending);
            if tokio::time::timeout(ABORT_WAIT, all).await.is_err() {
                tracing::warn!(
                    "task management: aborted commands still running after {ABORT_WAIT:?}; answering anyway"
                );
            }
        }
        self.send(vec![status_pdu(Pdu::new(
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response,
                itt: h.itt,
                ..Default::default()
            }),
            Bytes::new(),
        ))]);
        if h.function == tmf::TARGET_COLD_RESET && response == tmf::FUNCTION_COMPLETE {
            self.session.close_all();
        }
    }

    fn tmf_response(&mut self, h: &TaskMgmtRequest) -> u8 {
        let Some(target) = self.session.target.clone() else {
            return tmf::FUNCTION_REJECTED;
        };
        let lun = pdu::lun_from_wire(h.lun);
        let lun_exists = target.luns.get(lun).is_some();
        match h.function {
            tmf::ABORT_TASK => {
                let reference = h.referenced_task_tag;
                let found_here = self.abort_write(reference);
                let found_pending = self
                    .session
                    .abort_pending(|p| p.header.itt() == Some(reference))
                    > 0;
                // Running: its work goes on (a SANITIZE still completes),
                // but it answers no more.
                let found_running = self.abort_running(|itt, _| itt == reference) > 0;
                if found_pending || found_running {
                    self.count_aborts(1, h.lun);
                }
                if found_here || found_pending || found_running {
                    tmf::FUNCTION_COMPLETE
                } else if idm::sn::sn_le(self.session.exp_cmd_sn(), h.ref_cmd_sn)
                    && idm::sn::sn_lt(h.ref_cmd_sn, h.cmd_sn)
                {
                    // Never received but inside the window: RFC 7143
                    // §11.5.1 says count it as received and report done.
                    for (cid, ready) in self.session.mark_received(h.ref_cmd_sn) {
                        if let Some(c) = self.session.connection(cid) {
                            let _ = c.inbox.send(ConnMsg::Deliver(ready));
                        }
                    }
                    tmf::FUNCTION_COMPLETE
                } else {
                    // Already completed (or never ours).
                    tmf::TASK_DOES_NOT_EXIST
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                if !lun_exists {
                    return tmf::LUN_DOES_NOT_EXIST;
                }
                self.drop_writes(|t| t.cmd.lun == h.lun);
                let n = self.session.abort_pending(
                    |p| matches!(&p.header, Header::ScsiCommand(c) if c.lun == h.lun),
                ) + self.abort_running(|_, lun| lun == h.lun);
                self.count_aborts(n as u64, h.lun);
                tmf::FUNCTION_COMPLETE
            }
            tmf::LOGICAL_UNIT_RESET => {
                let Some(lu) = target.luns.get(lun) else {
                    return tmf::LUN_DOES_NOT_EXIST;
                };
                self.drop_writes(|t| t.cmd.lun == h.lun);
                let n = self.abort_running(|_, lun| lun == h.lun);
                self.count_aborts(n as u64, h.lun);
                // SAM-5 §6.3: the UA goes to every I_T nexus, ours included.
                lu.reset(None);
                tmf::FUNCTION_COMPLETE
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.drop_writes(|_| true);
                self.abort_running(|_, _| true);
                target.luns.reset_all(None);
                tmf::FUNCTION_COMPLETE
            }
            tmf::QUERY_TASK => {
                let reference = h.referenced_task_tag;
                if self.tasks.contains_key(&reference)
                    || self
                        .session
                        .has_pending(|p| p.header.itt() == Some(reference))
                    || self.session.has_running(|itt, _| itt == reference)
                {
                    tmf::FUNCTION_SUCCEEDED
                } else {
                    tmf::FUNCTION_COMPLETE
                }
            }
            tmf::QUERY_TASK_SET => {
                if !lun_exists {
                    return tmf::LUN_DOES_NOT_EXIST;
                }
                if self.tasks.values().any(|t| t.cmd.lun == h.lun)
                    || self.session.has_running(|_, lun| lun == h.lun)
                {
                    tmf::FUNCTION_SUCCEEDED
                } else {
                    tmf::FUNCTION_COMPLETE
                }
            }
            tmf::I_T_NEXUS_RESET => {
                self.drop_writes(|_| true);
                self.abort_running(|_, _| true);
                tmf::FUNCTION_COMPLETE
            }
            tmf::CLEAR_ACA | tmf::QUERY_ASYNC_EVENT => {
                if lun_exists {
                    tmf::FUNCTION_COMPLETE
                } else {
                    tmf::LUN_DOES_NOT_EXIST
                }
            }
            tmf::TASK_REASSIGN => tmf::REASSIGNMENT_NOT_SUPPORTED,
            _ => tmf::FUNCTION_NOT_SUPPORTED,
        }
    }

    fn text(&mut self, h: TextRequest, data: Bytes) {
        let max = (self.params.max_xmit_data_segment_length as usize).max(512);
        let mut bhs = [0u8; BHS_LEN];
        Header::TextRequest(h.clone()).write_bhs(&mut bhs);
        // A request continued over several PDUs (RFC 7143 §11.10.2): gather
        // it, answering each part with an empty response that carries our TTT.
        if h.cont || self.text_in.is_some() {
            let (ttt, mut acc) = match self.text_in.take() {
                Some((ttt, acc)) if ttt == h.ttt => (ttt, acc),
                Some(_) => {
                    self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                    return;
                }
                None => (self.alloc_ttt(), iscsi_proto::text::TextAccumulator::new()),
            };
            match acc.push_raw(&data, h.cont) {
                Err(_) => {
                    // Beyond the cap: refuse rather than grow.
                    self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                }
                Ok(None) => {
                    self.text_in = Some((ttt, acc));
                    self.send(vec![status_pdu(Pdu::new(
                        Header::TextResponse(TextResponse {
                            final_: false,
                            cont: false,
                            lun: h.lun,
                            itt: h.itt,
                            ttt,
                            ..Default::default()
                        }),
                        Bytes::new(),
                    ))]);
                }
                Ok(Some(all)) => self.answer_text(&h, &all, max),
            }
            return;
        }
        // Continuing a long answer of ours.
        if h.ttt != RESERVED_TAG {
            let rest = match self.text_pending.take() {
                Some((ttt, rest)) if ttt == h.ttt => rest,
                _ => {
                    self.reject(reject_reason::INVALID_PDU_FIELD, &bhs);
                    return;
                }
            };
            self.send_text(&h, rest, max);
            return;
        }
        self.answer_text(&h, &data, max);
    }

    fn answer_text(&mut self, h: &TextRequest, data: &[u8], max: usize) {
        let pairs = match iscsi_proto::text::parse(data) {
            Ok(p) => p,
            Err(e) => {
                // Malformed key=value text: say so rather than answer as if empty.
                tracing::debug!(error = %e, "malformed Text Request");
                let mut bhs = [0u8; BHS_LEN];
                Header::TextRequest(h.clone()).write_bhs(&mut bhs);
                self.reject(reject_reason::PROTOCOL_ERROR, &bhs);
                return;
            }
        };
        let mut reply = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                discovery::send_targets(&self.registry, &self.session, v, self.local, &mut reply);
            } else {
                iscsi_proto::text::encode(&[(k.as_str(), "NotUnderstood")], &mut reply);
            }
        }
        self.send_text(h, reply, max);
    }

    fn send_text(&mut self, h: &TextRequest, text: Vec<u8>, max: usize) {
        let (now, rest) = if text.len() > max {
            let rest = text.get(max..).unwrap_or(&[]).to_vec();
            let mut now = text;
            now.truncate(max);
            (now, Some(rest))
        } else {
            (text, None)
        };
        let ttt = match rest {
            Some(rest) => {
                let ttt = self.alloc_ttt();
                self.text_pending = Some((ttt, rest));
                ttt
            }
            None => RESERVED_TAG,
        };
        self.send(vec![status_pdu(Pdu::new(
            Header::TextResponse(TextResponse {
                final_: ttt == RESERVED_TAG,
                cont: ttt != RESERVED_TAG,
                lun: h.lun,
                itt: h.itt,
                ttt,
                ..Default::default()
            }),
            Bytes::from(now),
        ))]);
    }

    fn logout(&mut self, h: LogoutRequest) {
        self.transition(ConnEvent::LogoutStarted);
        let response = match h.reason {
            logout::CLOSE_SESSION => {
                self.logout_session = true;
                self.closing = true;
                logout::SUCCESS
            }
            logout::CLOSE_CONNECTION => {
                if h.cid == self.cid {
                    self.closing = true;
                    logout::SUCCESS
                } else if let Some(other) = self.session.connection(h.cid) {
                    let _ = other.inbox.send(ConnMsg::Close);
                    logout::SUCCESS
                } else {
                    logout::CID_NOT_FOUND
                }
            }
            _ => logout::RECOVERY_NOT_SUPPORTED,
        };
        if self.closing {
            self.transition(ConnEvent::LogoutCompleted);
        }
        self.send(vec![status_pdu(Pdu::new(
            Header::LogoutResponse(LogoutResponse {
                response,
                itt: h.itt,
                time2wait: 0,
                time2retain: 0,
                ..Default::default()
            }),
            Bytes::new(),
        ))]);
    }
}
