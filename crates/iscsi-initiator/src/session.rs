//! A full-feature iSCSI session (one connection, ERL 0) and the SCSI API on
//! top of it: [`Session`] and [`Lun`].
//!
//! ```text
//!  callers ──submit──► task table (ITT → pending) ──► writer task ──► TcpTx
//!                         ▲        CmdSN window (ExpCmdSN..MaxCmdSN)
//!                         └──── reader task ◄── TcpRx: Data-In, R2T, SCSI Response,
//!                                                NOP-In, TMF/Logout responses, Reject
//! ```
//!
//! Many commands may be in flight: each waits on its own channel, a new one
//! waits for room in the window the target opened (MaxCmdSN), and every
//! wait has a deadline. Writes send immediate data and unsolicited Data-Out
//! as negotiated and answer R2Ts; reads are reassembled from Data-In with
//! DataSN and offset checks. A response from the target never panics us: a
//! bad one fails its command or, if it breaks the connection's framing, the
//! session, and every waiter gets an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use idm::sn::{sn_le, sn_lt};
use idm::tcp::{TcpRx, TcpTx};
use idm::transport::{PduRx, PduTx};
use iscsi_proto::negotiation::{Digest, NegotiatedParams, Policy};
use iscsi_proto::pdu::{
    self, logout, task_attr, tmf, DataOut, Header, LogoutRequest, NopOut, Pdu, ScsiCommand,
    TaskMgmtRequest, RESERVED_TAG,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinSet;

use crate::conn;
use crate::error::Error;
use crate::login::{default_policy, Auth, LoginConfig};
use crate::portal::Portal;
use crate::scsi::{self, Capacity, InquiryData, ScsiError, Sense};

/// How a session is set up and how long things may take.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub initiator_name: String,
    pub auth: Auth,
    /// Ask for CRC32C header / data digests.
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our operational wishes (burst lengths, InitialR2T, ImmediateData, ...).
    pub policy: Policy,
    pub login_timeout: Duration,
    /// Deadline of each SCSI command, from submission to status.
    pub command_timeout: Duration,
    /// Largest transfer of one READ/WRITE command; longer I/O is split.
    pub max_io_bytes: u32,
    /// Commands one `Lun::read`/`write` call keeps in flight.
    pub io_depth: usize,
}

impl SessionOptions {
    pub fn new(initiator_name: impl Into<String>) -> Self {
        SessionOptions {
            initiator_name: initiator_name.into(),
            auth: Auth::None,
            header_digest: false,
            data_digest: false,
            policy: default_policy(),
            login_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            max_io_bytes: 1 << 20,
            io_depth: 8,
        }
    }
}

/// The default initiator name of this host's tools.
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "iqn.2026-11.dev.ironstar:initiator.{}",
        host.to_ascii_lowercase()
    )
}

/// Residual of a completed command (RFC 7143 §11.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    /// The target moved this many bytes less than expected.
    Underflow(u32),
    /// The target had this many bytes more than expected.
    Overflow(u32),
}

/// A command that completed with GOOD (or CONDITION MET) status.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u8,
    /// Data-In, cut to the bytes the target actually moved.
    pub data: Bytes,
    pub residual: Residual,
}

struct ScsiTask {
    lun: u64,
    data_out: Bytes,
    data_in: Vec<u8>,
    next_data_sn: u32,
    done: oneshot::Sender<Result<Reply, Error>>,
}

enum Pending {
    Scsi(ScsiTask),
    Nop(oneshot::Sender<()>),
    Tmf(oneshot::Sender<u8>),
    Logout(oneshot::Sender<u8>),
}

struct State {
    /// CmdSN of the next non-immediate command.
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    pending: HashMap<u32, Pending>,
    /// Why the session ended, once it has.
    closed: Option<String>,
}

impl State {
    fn alloc_itt(&mut self) -> u32 {
        loop {
            let itt = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if itt != RESERVED_TAG && !self.pending.contains_key(&itt) {
                return itt;
            }
        }
    }

    /// RFC 7143 §4.2.2.1: a MaxCmdSN below ExpCmdSN-1 is ignored; otherwise
    /// both only move forward. Returns whether the window grew.
    fn update_window(&mut self, exp: u32, max: u32) -> bool {
        if sn_lt(max, exp.wrapping_sub(1)) {
            return false;
        }
        if sn_lt(self.exp_cmd_sn, exp) {
            self.exp_cmd_sn = exp;
        }
        if sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
            return true;
        }
        false
    }

    fn saw_stat_sn(&mut self, stat_sn: u32) {
        if sn_le(self.exp_stat_sn, stat_sn) {
            self.exp_stat_sn = stat_sn.wrapping_add(1);
        }
    }

    fn window_open(&self) -> bool {
        sn_le(self.cmd_sn, self.max_cmd_sn)
    }
}

struct Inner {
    state: Mutex<State>,
    window: Notify,
    out: mpsc::UnboundedSender<Vec<Pdu>>,
    params: NegotiatedParams,
    portal: Portal,
    target: String,
    tsih: u16,
    cid: u16,
    opts: SessionOptions,
}

/// A logged-in session to one target. Cheap to clone; the connection ends
/// with [`Session::logout`] or when the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("target", &self.inner.target)
            .field("portal", &self.inner.portal)
            .field("tsih", &self.inner.tsih)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Connects to `portal` and logs in to `target` (following redirections).
    pub async fn login(
        portal: &Portal,
        target: &str,
        opts: SessionOptions,
    ) -> Result<Session, Error> {
        let mut cfg = LoginConfig::new(opts.initiator_name.clone(), Some(target.to_owned()));
        cfg.auth = opts.auth.clone();
        cfg.policy = opts.policy.clone();
        // Preferred, not demanded: a target without digests answers None.
        if opts.header_digest {
            cfg.policy.header_digest = vec![Digest::Crc32c, Digest::None];
        }
        if opts.data_digest {
            cfg.policy.data_digest = vec![Digest::Crc32c, Digest::None];
        }
        let c = conn::login(portal, &cfg, opts.login_timeout).await?;
        let r = &c.result;
        let state = State {
            cmd_sn: r.cmd_sn,
            exp_cmd_sn: r.exp_cmd_sn,
            max_cmd_sn: r.max_cmd_sn,
            exp_stat_sn: r.exp_stat_sn,
            next_itt: 0x10,
            pending: HashMap::new(),
            closed: None,
        };
        let (out, chan) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            window: Notify::new(),
            out,
            params: r.params.clone(),
            portal: c.portal.clone(),
            target: target.to_owned(),
            tsih: r.tsih,
            cid: r.cid,
            opts,
        });
        tracing::info!(target_name = target, portal = %c.portal, tsih = r.tsih, "session up");
        tokio::spawn(writer(chan, c.tx, Arc::downgrade(&inner)));
        tokio::spawn(reader(c.rx, Arc::downgrade(&inner)));
        Ok(Session { inner })
    }

    /// What login negotiated.
    pub fn params(&self) -> &NegotiatedParams {
        &self.inner.params
    }

    pub fn tsih(&self) -> u16 {
        self.inner.tsih
    }

    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Why the session ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.lock().closed.clone()
    }

    /// A handle on one logical unit.
    pub fn lun(&self, lun: u64) -> Lun {
        Lun {
            session: self.clone(),
            lun,
            capacity: Arc::new(Mutex::new(None)),
        }
    }

    /// REPORT LUNS through LUN 0 (SPC-4 §6.33).
    pub async fn report_luns(&self) -> Result<Vec<u64>, Error> {
        let lun0 = self.lun(0);
        let mut alloc = 4096u32;
        loop {
            let r = lun0.run(&scsi::report_luns(alloc), None, alloc).await?;
            match scsi::report_luns_needed(&r.data) {
                Some(need) if need > alloc && alloc < (1 << 20) => alloc = need.min(1 << 20),
                _ => return Ok(scsi::parse_report_luns(&r.data)),
            }
        }
    }

    /// A NOP-Out ping; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let (tx, rx) = oneshot::channel();
        let start = Instant::now();
        self.inner.send_immediate(|st, itt| {
            st.pending.insert(itt, Pending::Nop(tx));
            Header::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: RESERVED_TAG,
                cmd_sn: st.cmd_sn,
                exp_stat_sn: st.exp_stat_sn,
            })
        })?;
        let t = self.inner.opts.command_timeout;
        match tokio::time::timeout(t, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(self.inner.closed_error()),
            Err(_) => Err(Error::timeout("a NOP-In", t)),
        }
    }

    /// Logs the session out (reason: close the session) and waits for the
    /// target's answer.
    pub async fn logout(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let cid = self.inner.cid;
        self.inner.send_immediate(|st, itt| {
            st.pending.insert(itt, Pending::Logout(tx));
            Header::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: logout::CLOSE_SESSION,
                itt,
                cid,
                cmd_sn: st.cmd_sn,
                exp_stat_sn: st.exp_stat_sn,
            })
        })?;
        let t = self.inner.opts.login_timeout;
        let result = match tokio::time::timeout(t, rx).await {
            Ok(Ok(logout::SUCCESS)) => Ok(()),
            Ok(Ok(code)) => Err(Error::Protocol(format!("logout refused (response {code})"))),
            Ok(Err(_)) => Err(self.inner.closed_error()),
            Err(_) => Err(Error::timeout("the Logout Response", t)),
        };
        self.inner.close("logged out".into());
        result
    }

    /// ABORT TASK for one of our commands (RFC 7143 §11.5).
    async fn abort_task(&self, lun: u64, itt: u32, cmd_sn: u32) -> Result<u8, Error> {
        self.task_management(tmf::ABORT_TASK, lun, itt, cmd_sn)
            .await
    }

    /// LOGICAL UNIT RESET.
    pub async fn lun_reset(&self, lun: u64) -> Result<(), Error> {
        match self
            .task_management(tmf::LOGICAL_UNIT_RESET, lun, RESERVED_TAG, 0)
            .await?
        {
            tmf::FUNCTION_COMPLETE => Ok(()),
            r => Err(Error::TaskManagement(r)),
        }
    }

    async fn task_management(
        &self,
        function: u8,
        lun: u64,
        referenced: u32,
        ref_cmd_sn: u32,
    ) -> Result<u8, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner.send_immediate(|st, itt| {
            st.pending.insert(itt, Pending::Tmf(tx));
            Header::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function,
                lun: pdu::lun_to_wire(lun),
                itt,
                referenced_task_tag: referenced,
                cmd_sn: st.cmd_sn,
                exp_stat_sn: st.exp_stat_sn,
                ref_cmd_sn,
                exp_data_sn: 0,
            })
        })?;
        let t = self.inner.opts.command_timeout;
        match tokio::time::timeout(t, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(self.inner.closed_error()),
            Err(_) => Err(Error::timeout("a task management response", t)),
        }
    }

    /// Sends one SCSI command and waits for its status, within the
    /// session's command timeout.
    async fn submit(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        expected_in: u32,
    ) -> Result<Reply, Error> {
        if cdb.is_empty() || cdb.len() > 16 + 1020 {
            return Err(Error::InvalidArgument(format!(
                "CDB of {} bytes",
                cdb.len()
            )));
        }
        let out_len = u32::try_from(data_out.len())
            .map_err(|_| Error::InvalidArgument("data-out over 4 GiB".into()))?;
        if out_len > 0 && expected_in > 0 {
            return Err(Error::InvalidArgument(
                "bidirectional commands are not supported".into(),
            ));
        }
        let timeout = self.inner.opts.command_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        let (itt, cmd_sn) = loop {
            let notified = self.inner.window.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.inner.lock();
                if let Some(reason) = &st.closed {
                    return Err(Error::SessionClosed(reason.clone()));
                }
                if st.window_open() {
                    let Some(done) = tx.take() else {
                        return Err(Error::Protocol("command submitted twice".into()));
                    };
                    let sent =
                        self.inner
                            .start_command(&mut st, lun, cdb, data_out, expected_in, done);
                    break sent?;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::timeout("room in the target's CmdSN window", timeout));
            }
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.inner.closed_error()),
            Err(_) => {
                let was_pending = self.inner.lock().pending.remove(&itt).is_some();
                if was_pending {
                    tracing::warn!(itt, "command timed out; aborting it");
                    let s = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = s.abort_task(lun, itt, cmd_sn).await {
                            tracing::warn!(itt, error = %e, "ABORT TASK failed");
                        }
                    });
                }
                Err(Error::timeout("the SCSI command", timeout))
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked mid-update; the
        // state is still the best we have.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed_error(&self) -> Error {
        Error::SessionClosed(
            self.lock()
                .closed
                .clone()
                .unwrap_or_else(|| "connection lost".into()),
        )
    }

    /// Ends the session: every waiter gets an error.
    fn close(&self, reason: String) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason.clone());
            }
            std::mem::take(&mut st.pending)
        };
        for (_, p) in pending {
            if let Pending::Scsi(t) = p {
                let _ = t.done.send(Err(Error::SessionClosed(reason.clone())));
            }
            // Other waiters see their channel close.
        }
        self.window.notify_waiters();
    }

    fn send(&self, pdus: Vec<Pdu>) -> Result<(), Error> {
        self.out
            .send(pdus)
            .map_err(|_| Error::SessionClosed("the connection's writer has stopped".into()))
    }

    /// Sends an immediate PDU built under the lock with a fresh ITT.
    fn send_immediate(&self, build: impl FnOnce(&mut State, u32) -> Header) -> Result<(), Error> {
        let mut st = self.lock();
        if let Some(reason) = &st.closed {
            return Err(Error::SessionClosed(reason.clone()));
        }
        let itt = st.alloc_itt();
        let h = build(&mut st, itt);
        self.send(vec![Pdu::new(h, Bytes::new())])
    }

    /// Builds and queues a command with its immediate and unsolicited data;
    /// runs under the lock so CmdSN order is wire order.
    fn start_command(
        &self,
        st: &mut State,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        expected_in: u32,
        done: oneshot::Sender<Result<Reply, Error>>,
    ) -> Result<(u32, u32), Error> {
        let p = &self.params;
        let len = data_out.len() as u32;
        let seg = p.max_xmit_data_segment_length.max(512);
        let first_burst = p.first_burst_length.min(p.max_burst_length);
        let immediate = if p.immediate_data {
            len.min(first_burst).min(seg)
        } else {
            0
        };
        let unsolicited_end = if p.initial_r2t {
            immediate
        } else {
            len.min(first_burst)
        };
        let itt = st.alloc_itt();
        let cmd_sn = st.cmd_sn;
        st.cmd_sn = st.cmd_sn.wrapping_add(1);
        let wire_lun = pdu::lun_to_wire(lun);
        let mut cdb16 = [0u8; 16];
        let head = cdb.get(..16).unwrap_or(cdb);
        if let Some(dst) = cdb16.get_mut(..head.len()) {
            dst.copy_from_slice(head);
        }
        let extended = cdb
            .get(16..)
            .filter(|e| !e.is_empty())
            .map(Bytes::copy_from_slice);
        let cmd = ScsiCommand {
            immediate: false,
            final_: unsolicited_end == immediate,
            read: expected_in > 0,
            write: len > 0,
            attr: task_attr::SIMPLE,
            lun: wire_lun,
            itt,
            expected_data_transfer_length: if len > 0 { len } else { expected_in },
            cmd_sn,
            exp_stat_sn: st.exp_stat_sn,
            cdb: cdb16,
            extended_cdb: extended,
            bidi_read_length: None,
        };
        let mut pdus = vec![Pdu::new(
            Header::ScsiCommand(cmd),
            data_out.slice(..immediate as usize),
        )];
        pdus.extend(data_outs(
            wire_lun,
            itt,
            RESERVED_TAG,
            &data_out,
            immediate,
            unsolicited_end,
            seg,
            st.exp_stat_sn,
        ));
        st.pending.insert(
            itt,
            Pending::Scsi(ScsiTask {
                lun: wire_lun,
                data_out,
                data_in: vec![0u8; expected_in as usize],
                next_data_sn: 0,
                done,
            }),
        );
        if let Err(e) = self.send(pdus) {
            st.pending.remove(&itt);
            return Err(e);
        }
        Ok((itt, cmd_sn))
    }

    /// Handles one PDU from the target. `Err` ends the session.
    fn dispatch(&self, pdu: Pdu) -> Result<(), String> {
        let mut st = self.lock();
        let grew = match window_of(&pdu.header) {
            Some((exp, max)) => st.update_window(exp, max),
            None => false,
        };
        let mut to_send = Vec::new();
        match pdu.header {
            Header::ScsiResponse(h) => {
                st.saw_stat_sn(h.stat_sn);
                if let Some(Pending::Scsi(task)) = take_scsi(&mut st, h.itt) {
                    let result = scsi_result(task.data_in, &h, &pdu.data);
                    let _ = task.done.send(result);
                }
            }
            Header::DataIn(h) => {
                if h.status_present {
                    st.saw_stat_sn(h.stat_sn);
                }
                data_in(&mut st, &h, &pdu.data);
            }
            Header::R2t(h) => {
                let seg = self.params.max_xmit_data_segment_length.max(512);
                let max_burst = self.params.max_burst_length;
                let exp_stat_sn = st.exp_stat_sn;
                let verdict = match st.pending.get(&h.itt) {
                    Some(Pending::Scsi(t)) => {
                        let end = h.buffer_offset.checked_add(h.desired_data_transfer_length);
                        match end {
                            Some(end)
                                if end as usize <= t.data_out.len()
                                    && h.desired_data_transfer_length <= max_burst
                                    && h.desired_data_transfer_length > 0 =>
                            {
                                to_send.extend(data_outs(
                                    t.lun,
                                    h.itt,
                                    h.ttt,
                                    &t.data_out,
                                    h.buffer_offset,
                                    end,
                                    seg,
                                    exp_stat_sn,
                                ));
                                None
                            }
                            _ => Some(format!(
                                "R2T for {}+{} outside the {}-byte write (MaxBurstLength {max_burst})",
                                h.buffer_offset,
                                h.desired_data_transfer_length,
                                t.data_out.len()
                            )),
                        }
                    }
                    _ => None,
                };
                if let Some(why) = verdict {
                    fail_task(&mut st, h.itt, Error::Protocol(why));
                }
            }
            Header::NopIn(h) => {
                if h.itt != RESERVED_TAG {
                    st.saw_stat_sn(h.stat_sn);
                    if let Some(Pending::Nop(tx)) = st.pending.remove(&h.itt) {
                        let _ = tx.send(());
                    }
                }
                if h.ttt != RESERVED_TAG {
                    // The target's ping: echo it back (RFC 7143 §11.18).
                    to_send.push(Pdu::new(
                        Header::NopOut(NopOut {
                            immediate: true,
                            lun: h.lun,
                            itt: RESERVED_TAG,
                            ttt: h.ttt,
                            cmd_sn: st.cmd_sn,
                            exp_stat_sn: st.exp_stat_sn,
                        }),
                        pdu.data,
                    ));
                }
            }
            Header::TaskMgmtResponse(h) => {
                st.saw_stat_sn(h.stat_sn);
                if let Some(Pending::Tmf(tx)) = st.pending.remove(&h.itt) {
                    let _ = tx.send(h.response);
                }
            }
            Header::LogoutResponse(h) => {
                st.saw_stat_sn(h.stat_sn);
                if let Some(Pending::Logout(tx)) = st.pending.remove(&h.itt) {
                    let _ = tx.send(h.response);
                }
            }
            Header::AsyncMessage(h) => {
                st.saw_stat_sn(h.stat_sn);
                tracing::info!(event = h.event, "asynchronous message from the target");
            }
            Header::Reject(h) => {
                st.saw_stat_sn(h.stat_sn);
                let rejected = pdu
                    .data
                    .get(16..20)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                tracing::warn!(reason = h.reason, itt = ?rejected, "target rejected a PDU");
                if let Some(itt) = rejected {
                    fail_task(&mut st, itt, Error::Rejected(h.reason));
                }
            }
            Header::TextResponse(h) => st.saw_stat_sn(h.stat_sn),
            other => return Err(format!("target sent {:?}", other.opcode())),
        }
        drop(st);
        if grew {
            self.window.notify_waiters();
        }
        if !to_send.is_empty() {
            self.send(to_send).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn window_of(h: &Header) -> Option<(u32, u32)> {
    Some(match h {
        Header::NopIn(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::ScsiResponse(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::TaskMgmtResponse(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::TextResponse(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::DataIn(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::LogoutResponse(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::R2t(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::AsyncMessage(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        Header::Reject(h) => (h.exp_cmd_sn, h.max_cmd_sn),
        _ => return None,
    })
}

fn take_scsi(st: &mut State, itt: u32) -> Option<Pending> {
    match st.pending.get(&itt) {
        Some(Pending::Scsi(_)) => st.pending.remove(&itt),
        _ => None,
    }
}

fn fail_task(st: &mut State, itt: u32, e: Error) {
    if let Some(Pending::Scsi(t)) = st.pending.remove(&itt) {
        let _ = t.done.send(Err(e));
    }
}

/// Places one Data-In PDU into its command's buffer, checking DataSN and
/// the offset; completes the command when the PDU carries status.
fn data_in(st: &mut State, h: &pdu::DataIn, data: &[u8]) {
    let Some(Pending::Scsi(task)) = st.pending.get_mut(&h.itt) else {
        // A command that timed out or was failed: drop what is late.
        return;
    };
    if h.data_sn != task.next_data_sn {
        let why = format!(
            "Data-In DataSN {}, expected {}",
            h.data_sn, task.next_data_sn
        );
        fail_task(st, h.itt, Error::Protocol(why));
        return;
    }
    task.next_data_sn = task.next_data_sn.wrapping_add(1);
    let start = h.buffer_offset as usize;
    let Some(dst) = start
        .checked_add(data.len())
        .and_then(|end| task.data_in.get_mut(start..end))
    else {
        let why = format!(
            "Data-In at {}+{} beyond the expected {} bytes",
            h.buffer_offset,
            data.len(),
            task.data_in.len()
        );
        fail_task(st, h.itt, Error::Protocol(why));
        return;
    };
    dst.copy_from_slice(data);
    if !h.status_present {
        return;
    }
    if let Some(Pending::Scsi(task)) = st.pending.remove(&h.itt) {
        let residual = residual(h.underflow, h.overflow, h.residual_count);
        let result = match ScsiError::from_status(h.status, None) {
            Some(e) => Err(Error::Scsi(e)),
            None => Ok(reply(task.data_in, h.status, residual)),
        };
        let _ = task.done.send(result);
    }
}

fn residual(underflow: bool, overflow: bool, count: u32) -> Residual {
    match (underflow, overflow) {
        (true, _) => Residual::Underflow(count),
        (_, true) => Residual::Overflow(count),
        _ => Residual::None,
    }
}

fn reply(mut data: Vec<u8>, status: u8, residual: Residual) -> Reply {
    if let Residual::Underflow(n) = residual {
        let keep = data.len().saturating_sub(n as usize);
        data.truncate(keep);
    }
    Reply {
        status,
        data: Bytes::from(data),
        residual,
    }
}

/// The outcome carried by a SCSI Response PDU (RFC 7143 §11.4).
fn scsi_result(data_in: Vec<u8>, h: &pdu::ScsiResponse, segment: &[u8]) -> Result<Reply, Error> {
    if h.response != pdu::scsi_response::COMMAND_COMPLETED {
        return Err(Error::Scsi(ScsiError::TargetFailure(h.response)));
    }
    let sense = segment.get(..2).and_then(|l| {
        let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
        segment.get(2..2 + len).and_then(Sense::parse)
    });
    if let Some(e) = ScsiError::from_status(h.status, sense.as_ref()) {
        return Err(Error::Scsi(e));
    }
    Ok(reply(
        data_in,
        h.status,
        residual(h.underflow, h.overflow, h.residual_count),
    ))
}

/// Data-Out PDUs for `data[start..end]`, at most `seg` bytes each, DataSN
/// from 0, F on the last (RFC 7143 §11.7).
#[allow(clippy::too_many_arguments)]
fn data_outs(
    lun: u64,
    itt: u32,
    ttt: u32,
    data: &Bytes,
    start: u32,
    end: u32,
    seg: u32,
    exp_stat_sn: u32,
) -> Vec<Pdu> {
    let mut out = Vec::new();
    let mut offset = start;
    let mut data_sn = 0u32;
    while offset < end {
        let n = (end - offset).min(seg.max(1));
        let chunk = data.slice(offset as usize..(offset + n) as usize);
        out.push(Pdu::new(
            Header::DataOut(DataOut {
                final_: offset + n == end,
                lun,
                itt,
                ttt,
                exp_stat_sn,
                data_sn,
                buffer_offset: offset,
            }),
            chunk,
        ));
        offset += n;
        data_sn = data_sn.wrapping_add(1);
    }
    out
}

async fn writer(mut chan: mpsc::UnboundedReceiver<Vec<Pdu>>, mut tx: TcpTx, inner: Weak<Inner>) {
    while let Some(mut batch) = chan.recv().await {
        // Everything ready goes out in one vectored write.
        while batch.len() < 256 {
            match chan.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        if let Err(e) = tx.send(&batch).await {
            if let Some(i) = inner.upgrade() {
                i.close(format!("sending to the target failed: {e}"));
            }
            break;
        }
    }
    tx.shutdown().await;
}

async fn reader(mut rx: TcpRx, inner: Weak<Inner>) {
    let reason = loop {
        let raw = match rx.recv().await {
            Ok(Some(raw)) => raw,
            Ok(None) => break "the target closed the connection".to_owned(),
            Err(e) => break format!("receiving from the target failed: {e}"),
        };
        let Some(i) = inner.upgrade() else {
            return;
        };
        let pdu = match raw.parse() {
            Ok(p) => p,
            Err(e) => break format!("unreadable PDU from the target: {e}"),
        };
        if let Err(e) = i.dispatch(pdu) {
            break format!("target protocol error: {e}");
        }
    };
    if let Some(i) = inner.upgrade() {
        tracing::debug!(%reason, "connection ended");
        i.close(reason);
    }
}

/// One logical unit of a session.
#[derive(Clone, Debug)]
pub struct Lun {
    session: Session,
    lun: u64,
    capacity: Arc<Mutex<Option<Capacity>>>,
}

/// How often a command that met a UNIT ATTENTION is retried.
const UNIT_ATTENTION_RETRIES: usize = 3;

impl Lun {
    pub fn number(&self) -> u64 {
        self.lun
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Runs any CDB (pass-through): `data_out` for writes, or up to
    /// `expected_in_len` bytes of Data-In for reads. Status other than GOOD
    /// comes back as [`Error::Scsi`].
    pub async fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        expected_in_len: u32,
    ) -> Result<Reply, Error> {
        self.session
            .submit(self.lun, cdb, data_out.unwrap_or_default(), expected_in_len)
            .await
    }

    /// `execute`, retrying UNIT ATTENTIONs (a new session, a reset).
    async fn run(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        expected_in_len: u32,
    ) -> Result<Reply, Error> {
        let mut tries = 0;
        loop {
            match self.execute(cdb, data_out.clone(), expected_in_len).await {
                Err(Error::Scsi(e)) if e.is_unit_attention() && tries < UNIT_ATTENTION_RETRIES => {
                    tracing::debug!(lun = self.lun, error = %e, "retrying after unit attention");
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    pub async fn test_unit_ready(&self) -> Result<(), Error> {
        self.run(&scsi::test_unit_ready(), None, 0)
            .await
            .map(|_| ())
    }

    /// Standard INQUIRY data.
    pub async fn inquiry(&self) -> Result<InquiryData, Error> {
        let r = self.run(&scsi::inquiry(None, 255), None, 255).await?;
        InquiryData::parse(&r.data).ok_or_else(|| Error::Protocol("empty INQUIRY data".into()))
    }

    /// A VPD page, raw.
    pub async fn inquiry_vpd(&self, page: u8) -> Result<Bytes, Error> {
        let r = self
            .run(&scsi::inquiry(Some(page), 4096), None, 4096)
            .await?;
        Ok(r.data)
    }

    /// READ CAPACITY (10), or (16) when the LU is too large for it.
    pub async fn read_capacity(&self) -> Result<Capacity, Error> {
        let r = self.run(&scsi::read_capacity10(), None, 8).await?;
        let mut cap = Capacity::parse10(&r.data)
            .ok_or_else(|| Error::Protocol("short READ CAPACITY (10) data".into()))?;
        if cap.last_lba == u64::from(u32::MAX) {
            let r = self.run(&scsi::read_capacity16(), None, 32).await?;
            cap = Capacity::parse16(&r.data)
                .ok_or_else(|| Error::Protocol("short READ CAPACITY (16) data".into()))?;
        }
        if cap.block_size == 0 {
            return Err(Error::Protocol(
                "READ CAPACITY reports a block size of 0".into(),
            ));
        }
        if let Ok(mut c) = self.capacity.lock() {
            *c = Some(cap);
        }
        Ok(cap)
    }

    async fn block_size(&self) -> Result<u32, Error> {
        let known = self.capacity.lock().ok().and_then(|c| *c);
        match known {
            Some(c) => Ok(c.block_size),
            None => Ok(self.read_capacity().await?.block_size),
        }
    }

    /// Blocks per command and the split of `blocks` from `lba` into commands.
    fn chunks(&self, lba: u64, blocks: u64, block_size: u32) -> Vec<(u64, u32)> {
        let per = (self.session.inner.opts.max_io_bytes / block_size).clamp(1, u32::from(u16::MAX));
        let mut out = Vec::new();
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(u64::from(per)) as u32;
            out.push((lba.saturating_add(done), n));
            done += u64::from(n);
        }
        out
    }

    /// Reads `blocks` blocks from `lba`, split into commands of at most
    /// `max_io_bytes` with up to `io_depth` of them in flight.
    pub async fn read(&self, lba: u64, blocks: u32) -> Result<Bytes, Error> {
        let bs = self.block_size().await?;
        let total = u64::from(blocks) * u64::from(bs);
        let total = usize::try_from(total)
            .map_err(|_| Error::InvalidArgument("read larger than memory".into()))?;
        let chunks = self.chunks(lba, u64::from(blocks), bs);
        if let [(l, n)] = chunks.as_slice() {
            return self.read_one(*l, *n, bs).await;
        }
        let mut buf = BytesMut::zeroed(total);
        let depth = self.session.inner.opts.io_depth.max(1);
        let mut set: JoinSet<Result<(u64, Bytes), Error>> = JoinSet::new();
        let mut queue = chunks.into_iter();
        loop {
            while set.len() < depth {
                let Some((l, n)) = queue.next() else { break };
                let me = self.clone();
                set.spawn(async move { me.read_one(l, n, bs).await.map(|d| (l, d)) });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (l, data) =
                joined.map_err(|e| Error::Protocol(format!("I/O task failed: {e}")))??;
            let at = ((l - lba) * u64::from(bs)) as usize;
            if let Some(dst) = buf.get_mut(at..at + data.len()) {
                dst.copy_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    }

    async fn read_one(&self, lba: u64, blocks: u32, bs: u32) -> Result<Bytes, Error> {
        let len = blocks
            .checked_mul(bs)
            .ok_or_else(|| Error::InvalidArgument("read too large".into()))?;
        let r = self.run(&scsi::read(lba, blocks), None, len).await?;
        if r.data.len() != len as usize {
            return Err(Error::Protocol(format!(
                "READ returned {} of {len} bytes",
                r.data.len()
            )));
        }
        Ok(r.data)
    }

    /// Writes `data` (a whole number of blocks) at `lba`.
    pub async fn write(&self, lba: u64, data: Bytes) -> Result<(), Error> {
        let bs = self.block_size().await?;
        if data.len() % bs as usize != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} bytes is not a multiple of the {bs}-byte block",
                data.len()
            )));
        }
        let blocks = (data.len() / bs as usize) as u64;
        let depth = self.session.inner.opts.io_depth.max(1);
        let mut set: JoinSet<Result<(), Error>> = JoinSet::new();
        let mut queue = self.chunks(lba, blocks, bs).into_iter();
        loop {
            while set.len() < depth {
                let Some((l, n)) = queue.next() else { break };
                let at = ((l - lba) * u64::from(bs)) as usize;
                let piece = data.slice(at..at + (n as usize) * (bs as usize));
                let me = self.clone();
                set.spawn(
                    async move { me.run(&scsi::write(l, n), Some(piece), 0).await.map(|_| ()) },
                );
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            joined.map_err(|e| Error::Protocol(format!("I/O task failed: {e}")))??;
        }
        Ok(())
    }
}
