//! A full-feature iSCSI session and the SCSI API on top of it: [`Session`]
//! and [`Lun`].
//!
//! ```text
//!  callers ──submit──► task table (ITT → pending) ──► queue ──pump──► conn k writer ──► TcpTx
//!                         ▲        CmdSN window (ExpCmdSN..MaxCmdSN), round-robin over connections
//!                         └──── reader per connection ◄── TcpRx: Data-In, R2T, SCSI Response,
//!                                                NOP-In, TMF/Logout responses, Reject
//! ```
//!
//! Many commands may be in flight: each waits on its own channel; a command
//! goes on the wire when the target's window (MaxCmdSN) has room, on the
//! next connection in turn (MC/S: one CmdSN space across them, connection
//! allegiance for its R2Ts and Data-Out). Writes send immediate data and
//! unsolicited Data-Out as negotiated and answer R2Ts; reads are reassembled
//! from Data-In by `idm::initiator_data`.
//!
//! Recovery (ERL 0). When one connection of an MC/S session fails (EOF,
//! reset, an unanswered ping or ABORT TASK) while others live, only that
//! connection is reinstated: a login with the session's TSIH and the lost
//! connection's CID, so the target logs the old one out and ends its tasks
//! (RFC 7143 §6.3.4). Its unfinished commands are reissued at once on the
//! live connections as new tasks (new ITT, next CmdSN), and the CmdSNs they
//! held are closed with ABORT TASK so no hole stalls the others. When the
//! last connection fails, or the target refuses the connection's login, the
//! session is reinstated — a new login with the same ISID and TSIH 0, so
//! the target ends the old one — with backoff for up to
//! [`SessionOptions::replacement_timeout`]; then every command that had not
//! completed is reissued in its original CmdSN order. With other paths to
//! the target ([`SessionOptions::other_portals`]), the attempts go round
//! them, so the session moves to another gateway when its own is gone. Each command is
//! reissued at most [`SessionOptions::max_reissues`] times. If no
//! replacement comes in time, every waiter gets one clear error. Every wait
//! has a deadline, so nothing hangs forever.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use idm::initiator_data::{data_out_pdus, DataInBuffer, WritePlan};
use idm::sn::{sn_le, sn_lt};
use idm::transport::{PduRx, PduTx};
use iscsi_proto::negotiation::{Digest, NegotiatedParams, Policy};
use iscsi_proto::pdu::{
    self, logout, task_attr, tmf, Header, LogoutRequest, NopOut, Pdu, ScsiCommand, TaskMgmtRequest,
    RESERVED_TAG,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinSet;

pub use idm::initiator_data::Residual;

use crate::conn;
use crate::error::Error;
use crate::login::{default_policy, Auth, LoginConfig, LoginError};
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
    /// Deadline of each SCSI command, from submission to status (time spent
    /// waiting for a replacement session does not count).
    pub command_timeout: Duration,
    /// Largest transfer of one READ/WRITE command; longer I/O is split.
    pub max_io_bytes: u32,
    /// Commands one `Lun::read`/`write` call keeps in flight.
    pub io_depth: usize,
    /// Connections in the session (MC/S); fewer if the target's
    /// MaxConnections is lower.
    pub connections: u16,
    /// How long to keep trying to replace a lost session before failing
    /// every outstanding command (open-iscsi's `replacement_timeout`);
    /// zero turns recovery off.
    pub replacement_timeout: Duration,
    /// How often one command may be reissued after reconnects.
    pub max_reissues: u32,
    /// A NOP-Out ping every so often finds a dead target even when no
    /// command is running (open-iscsi's `noop_out_interval`); zero: never.
    pub nop_interval: Duration,
    /// How long a ping may go unanswered before the session is replaced.
    pub nop_timeout: Duration,
    /// TCP or iSER (and over which verbs backend).
    pub link: conn::Link,
    /// Other portals of the same target, in order of preference (another
    /// gateway, another target portal group): the paths a multipath layer
    /// would fail over to. A login that cannot reach the first portal, and a
    /// recovery that cannot reinstate the session through it, go on to these
    /// in turn; a session that moves starts anew there (a new I_T nexus)
    /// and reissues what had not completed, as after any reinstatement.
    pub other_portals: Vec<Portal>,
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
            connections: 1,
            replacement_timeout: Duration::from_secs(30),
            max_reissues: 5,
            nop_interval: Duration::from_secs(10),
            nop_timeout: Duration::from_secs(10),
            link: conn::Link::Tcp,
            other_portals: Vec::new(),
        }
    }

    /// The portal named first, then [`other_portals`](Self::other_portals).
    fn paths<'a>(&'a self, first: &'a Portal) -> impl Iterator<Item = &'a Portal> {
        std::iter::once(first).chain(self.other_portals.iter().filter(move |p| *p != first))
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

/// A command that completed with GOOD (or CONDITION MET) status.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u8,
    /// Data-In, cut to the bytes the target actually moved.
    pub data: Bytes,
    pub residual: Residual,
}

/// What a command asks for; kept so it can be reissued after a reconnect.
struct Request {
    lun: u64,
    cdb: Bytes,
    data_out: Bytes,
    expected_in: u32,
}

struct ScsiTask {
    req: Arc<Request>,
    data_in: DataInBuffer,
    /// Connection (by id) and CmdSN it went out with; None while queued.
    sent: Option<(u64, u32)>,
    /// Submission order, to reissue in the original order.
    seq: u64,
    reissues: u32,
    done: oneshot::Sender<Result<Reply, Error>>,
}

/// What an ITT stands for. Non-SCSI waiters remember the connection (by
/// id) their request went on: if it fails, nobody will answer them.
enum Pending {
    Scsi(ScsiTask),
    Nop(oneshot::Sender<()>, u64),
    Tmf(oneshot::Sender<u8>, u64),
    Logout(oneshot::Sender<u8>, u64),
}

impl Pending {
    fn immediate_on(&self) -> Option<u64> {
        match self {
            Pending::Scsi(_) => None,
            Pending::Nop(_, c) | Pending::Tmf(_, c) | Pending::Logout(_, c) => Some(*c),
        }
    }
}

/// A connection reinstatement to do: which CID, what its old connection
/// had acknowledged, and the commands it took down with it.
struct ConnJob {
    cid: u16,
    exp_stat_sn: u32,
    epoch: u64,
    orphans: Vec<Orphan>,
}

/// A command lost with its connection, as the target may know it.
struct Orphan {
    wire_lun: u64,
    itt: u32,
    cmd_sn: u32,
}

/// One connection of the current session incarnation.
struct Conn {
    /// Unique over the session's life (CIDs repeat across reinstatements).
    id: u64,
    cid: u16,
    out: mpsc::UnboundedSender<Vec<Pdu>>,
    exp_stat_sn: u32,
    commands: u64,
    reader: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The writer ends when `out` goes; the reader must be told.
        self.reader.abort();
    }
}

struct State {
    /// CmdSN of the next non-immediate command.
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    next_seq: u64,
    pending: HashMap<u32, Pending>,
    /// SCSI commands waiting for the window (or for a replacement session).
    queue: VecDeque<u32>,
    conns: Vec<Conn>,
    next_conn_id: u64,
    rr: usize,
    tsih: u16,
    params: NegotiatedParams,
    portal: Portal,
    /// A replacement session is being logged in.
    recovering: bool,
    reconnects: u64,
    /// Bumped by every session reinstatement: a connection reinstatement
    /// begun in an older incarnation must not install its login.
    epoch: u64,
    /// CIDs whose connection is being reinstated.
    reinstating: Vec<u16>,
    conn_reinstatements: u64,
    /// Commands put on the wire again after their connection failed.
    reissued: u64,
    /// A Logout Request went out: a connection closing is expected.
    logging_out: bool,
    /// Why the session ended for good, once it has.
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

    /// The ITT a command (by submission number) has now.
    fn itt_of(&self, seq: u64) -> Option<u32> {
        self.pending.iter().find_map(|(itt, p)| match p {
            Pending::Scsi(t) if t.seq == seq => Some(*itt),
            _ => None,
        })
    }

    fn conn_index(&self, id: u64) -> Option<usize> {
        self.conns.iter().position(|c| c.id == id)
    }

    fn saw_stat_sn(&mut self, conn: usize, stat_sn: u32) {
        if let Some(c) = self.conns.get_mut(conn) {
            if sn_le(c.exp_stat_sn, stat_sn) {
                c.exp_stat_sn = stat_sn.wrapping_add(1);
            }
        }
    }

    fn window_open(&self) -> bool {
        sn_le(self.cmd_sn, self.max_cmd_sn)
    }

    fn install(&mut self, logged: Vec<conn::LoggedIn>, inner: &Arc<Inner>) {
        self.conns.clear();
        if let Some(first) = logged.first() {
            let r = &first.result;
            self.cmd_sn = r.cmd_sn;
            self.exp_cmd_sn = r.exp_cmd_sn;
            self.max_cmd_sn = r.max_cmd_sn;
            self.tsih = r.tsih;
            self.params = r.params.clone();
            self.portal = first.portal.clone();
        }
        for c in logged {
            self.add_conn(c, inner);
        }
    }

    /// Starts the reader and writer of one logged-in connection and puts it
    /// in the round-robin.
    fn add_conn(&mut self, c: conn::LoggedIn, inner: &Arc<Inner>) {
        // Later logins may have opened the window further.
        self.update_window(c.result.exp_cmd_sn, c.result.max_cmd_sn);
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let (out, chan) = mpsc::unbounded_channel();
        tokio::spawn(writer(chan, c.tx, id, Arc::downgrade(inner)));
        let reader = tokio::spawn(reader(c.rx, id, Arc::downgrade(inner))).abort_handle();
        self.conns.push(Conn {
            id,
            cid: c.result.cid,
            out,
            exp_stat_sn: c.result.exp_stat_sn,
            commands: 0,
            reader,
        });
    }
}

struct Inner {
    state: Mutex<State>,
    changed: Notify,
    target: String,
    /// The portal the user named (a reconnect starts over from it).
    home: Portal,
    /// Login settings, ISID included: the same ISID reinstates the session.
    login: LoginConfig,
    opts: SessionOptions,
}

/// A logged-in session to one target. Cheap to clone; the connections end
/// with [`Session::logout`] or when the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("target", &self.inner.target)
            .field("portal", &self.inner.home)
            .field("tsih", &self.tsih())
            .finish_non_exhaustive()
    }
}

/// Logs in the leading connection and then up to `opts.connections - 1`
/// more with its TSIH (MC/S), as far as MaxConnections allows.
async fn open_connections(
    portal: &Portal,
    cfg: &LoginConfig,
    opts: &SessionOptions,
    timeout: Duration,
) -> Result<Vec<conn::LoggedIn>, Error> {
    let mut cfg = cfg.clone();
    cfg.tsih = 0;
    cfg.cid = 0;
    let lead = conn::login_over(&opts.link, portal, &cfg, timeout).await?;
    let want = u32::from(opts.connections.max(1)).min(lead.result.params.max_connections.max(1));
    let mut all = vec![lead];
    for cid in 1..want {
        let Some(first) = all.first() else { break };
        let mut more = cfg.clone();
        more.tsih = first.result.tsih;
        more.cid = cid as u16;
        more.cmd_sn = first.result.cmd_sn;
        let at = first.portal.clone();
        match conn::login_over(&opts.link, &at, &more, timeout).await {
            Ok(c) => all.push(c),
            Err(e) => {
                tracing::warn!(cid, error = %e, "could not add a connection; continuing with fewer");
                break;
            }
        }
    }
    Ok(all)
}

impl Session {
    /// Connects to `portal` and logs in to `target` (following redirections),
    /// with as many connections as `opts.connections` asks and the target allows.
    pub async fn login(
        portal: &Portal,
        target: &str,
        opts: SessionOptions,
    ) -> Result<Session, Error> {
        let mut cfg =
            crate::login::login_config(opts.initiator_name.clone(), Some(target.to_owned()));
        cfg.auth = opts.auth.clone();
        cfg.policy = opts.policy.clone();
        // Preferred, not demanded: a target without digests answers None.
        if opts.header_digest {
            cfg.policy.header_digest = vec![Digest::Crc32c, Digest::None];
        }
        if opts.data_digest {
            cfg.policy.data_digest = vec![Digest::Crc32c, Digest::None];
        }
        if opts.connections > 1 {
            cfg.policy.max_connections = u32::from(opts.connections);
        }
        let mut logged = open_connections(portal, &cfg, &opts, opts.login_timeout).await;
        // The other paths in turn; the first portal's error if none answers.
        for path in opts.paths(portal).skip(1) {
            let Err(e) = &logged else { break };
            tracing::warn!(error = %e, next = %path, "login failed; trying the next path");
            if let Ok(l) = open_connections(path, &cfg, &opts, opts.login_timeout).await {
                logged = Ok(l);
            }
        }
        let logged = logged?;
        let state = State {
            cmd_sn: 1,
            exp_cmd_sn: 1,
            max_cmd_sn: 0,
            next_itt: 0x10,
            next_seq: 0,
            pending: HashMap::new(),
            queue: VecDeque::new(),
            conns: Vec::new(),
            next_conn_id: 0,
            rr: 0,
            tsih: 0,
            params: NegotiatedParams::default(),
            portal: portal.clone(),
            recovering: false,
            reconnects: 0,
            epoch: 0,
            reinstating: Vec::new(),
            conn_reinstatements: 0,
            reissued: 0,
            logging_out: false,
            closed: None,
        };
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            changed: Notify::new(),
            target: target.to_owned(),
            home: portal.clone(),
            login: cfg,
            opts,
        });
        {
            let mut st = inner.lock();
            st.install(logged, &inner);
            tracing::info!(target_name = target, portal = %st.portal, tsih = st.tsih,
                connections = st.conns.len(), "session up");
        }
        if !inner.opts.nop_interval.is_zero() {
            tokio::spawn(keepalive(Arc::downgrade(&inner)));
        }
        Ok(Session { inner })
    }

    /// What login negotiated (on the current incarnation of the session).
    pub fn params(&self) -> NegotiatedParams {
        self.inner.lock().params.clone()
    }

    pub fn tsih(&self) -> u16 {
        self.inner.lock().tsih
    }

    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The portal the session is on now (another path after a move).
    pub fn portal(&self) -> Portal {
        self.inner.lock().portal.clone()
    }

    /// How many times the session was reinstated after a failure.
    pub fn reconnects(&self) -> u64 {
        self.inner.lock().reconnects
    }

    /// How many times one connection of the session was replaced by
    /// connection reinstatement (MC/S), the session living on.
    pub fn connection_reinstatements(&self) -> u64 {
        self.inner.lock().conn_reinstatements
    }

    /// How many commands were reissued because their connection (or the
    /// whole session) failed before they completed.
    pub fn reissued_commands(&self) -> u64 {
        self.inner.lock().reissued
    }

    /// Each live connection's CID and how many SCSI commands it carried.
    pub fn connection_commands(&self) -> Vec<(u16, u64)> {
        let st = self.inner.lock();
        st.conns.iter().map(|c| (c.cid, c.commands)).collect()
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
        self.ping_within(self.inner.opts.command_timeout).await
    }

    async fn ping_within(&self, t: Duration) -> Result<Duration, Error> {
        self.ping_on(None, t).await
    }

    /// A ping on connection `on` (by id), or on the first one.
    async fn ping_on(&self, on: Option<u64>, t: Duration) -> Result<Duration, Error> {
        let (tx, rx) = oneshot::channel();
        let start = Instant::now();
        self.inner.send_immediate(on, |st, itt, conn| {
            st.pending.insert(itt, Pending::Nop(tx, conn.2));
            Header::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: RESERVED_TAG,
                cmd_sn: st.cmd_sn,
                exp_stat_sn: conn.1,
            })
        })?;
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
        self.inner.send_immediate(None, |st, itt, conn| {
            st.pending.insert(itt, Pending::Logout(tx, conn.2));
            st.logging_out = true;
            Header::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: logout::CLOSE_SESSION,
                itt,
                cid: conn.0,
                cmd_sn: st.cmd_sn,
                exp_stat_sn: conn.1,
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

    /// ABORT TASK for one of our commands (RFC 7143 §11.5), on the
    /// connection it is allegiant to (`on`) while that one lives.
    async fn abort_task(&self, lun: u64, itt: u32, cmd_sn: u32, on: u64) -> Result<u8, Error> {
        self.task_management(
            tmf::ABORT_TASK,
            pdu::lun_to_wire(lun),
            itt,
            cmd_sn,
            Some(on),
        )
        .await
    }

    /// LOGICAL UNIT RESET.
    pub async fn lun_reset(&self, lun: u64) -> Result<(), Error> {
        match self
            .task_management(
                tmf::LOGICAL_UNIT_RESET,
                pdu::lun_to_wire(lun),
                RESERVED_TAG,
                0,
                None,
            )
            .await?
        {
            tmf::FUNCTION_COMPLETE => Ok(()),
            r => Err(Error::TaskManagement(r)),
        }
    }

    /// `wire_lun` is in its wire form.
    async fn task_management(
        &self,
        function: u8,
        wire_lun: u64,
        referenced: u32,
        ref_cmd_sn: u32,
        on: Option<u64>,
    ) -> Result<u8, Error> {
        let rx = self
            .inner
            .send_tmf(on, function, wire_lun, referenced, ref_cmd_sn)?;
        let t = self.inner.opts.command_timeout;
        match tokio::time::timeout(t, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(self.inner.closed_error()),
            Err(_) => Err(Error::timeout("a task management response", t)),
        }
    }

    /// Forces the session through recovery, as if its connections had
    /// dropped (for tests and for callers with their own health checks).
    pub fn reconnect_now(&self, why: &str) {
        self.inner.fail_all_connections(why.to_owned());
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
        if u32::try_from(data_out.len()).is_err() {
            return Err(Error::InvalidArgument("data-out over 4 GiB".into()));
        }
        if !data_out.is_empty() && expected_in > 0 {
            return Err(Error::InvalidArgument(
                "bidirectional commands are not supported".into(),
            ));
        }
        let timeout = self.inner.opts.command_timeout;
        let (tx, mut rx) = oneshot::channel();
        let req = Arc::new(Request {
            lun: pdu::lun_to_wire(lun),
            cdb: Bytes::copy_from_slice(cdb),
            data_out,
            expected_in,
        });
        let seq = {
            let mut st = self.inner.lock();
            if let Some(reason) = &st.closed {
                return Err(Error::SessionClosed(reason.clone()));
            }
            let itt = st.alloc_itt();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.pending.insert(
                itt,
                Pending::Scsi(ScsiTask {
                    data_in: DataInBuffer::new(expected_in),
                    req,
                    sent: None,
                    seq,
                    reissues: 0,
                    done: tx,
                }),
            );
            st.queue.push_back(itt);
            self.inner.pump(&mut st);
            seq
        };
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, &mut rx).await {
                Ok(Ok(r)) => return r,
                Ok(Err(_)) => return Err(self.inner.closed_error()),
                Err(_) => {}
            }
            let sent = {
                let mut st = self.inner.lock();
                if st.recovering {
                    // Waiting for a replacement session is not the
                    // target's slowness; recovery has its own deadline.
                    drop(st);
                    deadline = tokio::time::Instant::now() + timeout;
                    continue;
                }
                // A connection reinstatement gives a command a new ITT.
                let Some(itt) = st.itt_of(seq) else {
                    // Completed just now.
                    continue;
                };
                let sent = match st.pending.remove(&itt) {
                    Some(Pending::Scsi(t)) => t.sent,
                    _ => None,
                };
                st.queue.retain(|q| *q != itt);
                sent.map(|(conn, cmd_sn)| (itt, conn, cmd_sn))
            };
            if let Some((itt, conn, cmd_sn)) = sent {
                tracing::warn!(itt, "command timed out; aborting it");
                let s = self.clone();
                tokio::spawn(async move {
                    match s.abort_task(lun, itt, cmd_sn, conn).await {
                        Ok(_) => {}
                        Err(Error::Timeout { .. }) => {
                            // Its connection answers nothing: replace it
                            // (or the session, if it was the last one).
                            s.inner.connection_failed(
                                Some(conn),
                                "the target did not answer an ABORT TASK".into(),
                            );
                        }
                        Err(e) => tracing::warn!(itt, error = %e, "ABORT TASK failed"),
                    }
                });
                return Err(Error::timeout("the SCSI command", timeout));
            }
            return Err(Error::timeout("room in the target's CmdSN window", timeout));
        }
    }
}
/// Most reconnect attempts in one recovery (each also bounded by time).
const MAX_RECONNECT_ATTEMPTS: u32 = 64;

/// Longest one reconnect attempt (connect and login) may take while recovering, whatever the
/// login timeout: a connection that opens but never answers (a fabric that lost its way after a
/// link flap, a target half up) is dropped and the next attempt starts, instead of one attempt
/// eating the whole replacement time (open-iscsi's login_timeout default is 15 s too).
const RECONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// The bound of one recovery attempt begun `started` ago: the login timeout, at most
/// [`RECONNECT_ATTEMPT_TIMEOUT`], and never past the end of the replacement time (but at least a
/// second, so the last attempt is a real one).
fn attempt_timeout(opts: &SessionOptions, started: Instant) -> Duration {
    let left = opts.replacement_timeout.saturating_sub(started.elapsed());
    opts.login_timeout
        .min(RECONNECT_ATTEMPT_TIMEOUT)
        .min(left.max(Duration::from_secs(1)))
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

    /// Ends the session for good: every waiter gets an error.
    fn close(&self, reason: String) {
        let (pending, conns) = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason.clone());
            }
            st.queue.clear();
            st.recovering = false;
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.conns),
            )
        };
        drop(conns);
        for (_, p) in pending {
            if let Pending::Scsi(t) = p {
                let _ = t.done.send(Err(Error::SessionClosed(reason.clone())));
            }
            // Other waiters see their channel close.
        }
        self.changed.notify_waiters();
    }

    /// A connection of the current incarnation failed (`id`), or all of
    /// them are to be given up (`None`): start recovery, or close the
    /// session if recovery is off or we were logging out.
    fn connection_failed(self: &Arc<Self>, id: Option<u64>, reason: String) {
        let conns = {
            let mut st = self.lock();
            if st.closed.is_some() || st.recovering {
                return;
            }
            if let Some(id) = id {
                if st.conn_index(id).is_none() {
                    // An old connection ending late.
                    return;
                }
            }
            let logging_out = st.logging_out;
            if logging_out {
                // Closing the session ends the other connections first; the
                // answer comes on the first one (where the request went).
                if let Some(k) = id.and_then(|id| st.conn_index(id)).filter(|k| *k > 0) {
                    let gone = st.conns.remove(k);
                    drop(st);
                    drop(gone);
                    return;
                }
            }
            if self.opts.replacement_timeout.is_zero() || logging_out {
                drop(st);
                self.close(reason);
                return;
            }
            if let Some(k) = id.and_then(|id| st.conn_index(id)) {
                if st.params.max_connections > 1 && st.conns.len() > 1 {
                    let gone = st.conns.remove(k);
                    let job = self.orphan_connection(&mut st, &gone, &reason);
                    drop(st);
                    drop(gone);
                    let me = Arc::clone(self);
                    tokio::spawn(async move { me.reinstate_connection(job).await });
                    return;
                }
            }
            tracing::warn!(%reason, "connection lost; reinstating the session");
            st.recovering = true;
            st.epoch = st.epoch.wrapping_add(1);
            st.reinstating.clear();
            // ERL 0: the old session's tasks are gone with it. Non-SCSI
            // waiters fail (their channels close); SCSI commands are
            // requeued in submission order for the replacement.
            let mut scsi: Vec<(u64, u32)> = Vec::new();
            st.pending.retain(|itt, p| match p {
                Pending::Scsi(t) => {
                    scsi.push((t.seq, *itt));
                    true
                }
                _ => false,
            });
            scsi.sort_unstable();
            st.queue = scsi.into_iter().map(|(_, itt)| itt).collect();
            std::mem::take(&mut st.conns)
        };
        drop(conns);
        let me = Arc::clone(self);
        tokio::spawn(async move { me.recover(reason).await });
    }

    fn fail_all_connections(self: &Arc<Self>, reason: String) {
        self.connection_failed(None, reason);
    }

    /// Takes the work of a failed connection (already out of `st.conns`)
    /// away from it while the others carry on: its immediate requests'
    /// waiters fail, and its SCSI commands go back to the head of the queue
    /// as new tasks (new ITT, a fresh CmdSN when they go out, RFC 7143
    /// §6.3.4 at ERL 0), at most `max_reissues` times each.
    fn orphan_connection(&self, st: &mut State, gone: &Conn, reason: &str) -> ConnJob {
        tracing::warn!(cid = gone.cid, %reason, "connection lost; reinstating the connection");
        st.pending.retain(|_, p| p.immediate_on() != Some(gone.id));
        let mut lost: Vec<(u64, u32)> = st
            .pending
            .iter()
            .filter_map(|(itt, p)| match p {
                Pending::Scsi(t) if t.sent.is_some_and(|(c, _)| c == gone.id) => {
                    Some((t.seq, *itt))
                }
                _ => None,
            })
            .collect();
        lost.sort_unstable();
        let max = self.opts.max_reissues;
        let mut orphans = Vec::new();
        let mut requeue = Vec::new();
        for (_, old) in lost {
            let Some(Pending::Scsi(mut t)) = st.pending.remove(&old) else {
                continue;
            };
            if let Some((_, cmd_sn)) = t.sent.take() {
                orphans.push(Orphan {
                    wire_lun: t.req.lun,
                    itt: old,
                    cmd_sn,
                });
            }
            t.reissues += 1;
            if t.reissues > max {
                let _ = t.done.send(Err(Error::SessionClosed(format!(
                    "command reissued {max} times after reconnects; giving up"
                ))));
                continue;
            }
            t.data_in = DataInBuffer::new(t.req.expected_in);
            let itt = st.alloc_itt();
            st.pending.insert(itt, Pending::Scsi(t));
            st.reissued += 1;
            requeue.push(itt);
        }
        tracing::debug!(
            cid = gone.cid,
            reissued = requeue.len(),
            "commands of the lost connection requeued"
        );
        for itt in requeue.into_iter().rev() {
            st.queue.push_front(itt);
        }
        st.reinstating.push(gone.cid);
        self.pump(st);
        ConnJob {
            cid: gone.cid,
            exp_stat_sn: gone.exp_stat_sn,
            epoch: st.epoch,
            orphans,
        }
    }

    /// Connection reinstatement (RFC 7143 §6.3.4): logs in a connection
    /// with the session's TSIH and the lost connection's CID, so the target
    /// logs the old one out and ends its tasks. A refusal (status class 2
    /// or 3) falls back to session reinstatement; a target that cannot be
    /// reached is retried with backoff until `replacement_timeout`, then
    /// the session goes on with fewer connections.
    async fn reinstate_connection(self: Arc<Self>, mut job: ConnJob) {
        let started = Instant::now();
        let limit = self.opts.replacement_timeout;
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let (cfg, portal) = {
                let st = self.lock();
                if st.closed.is_some() || st.epoch != job.epoch {
                    return;
                }
                let mut cfg = self.login.clone();
                cfg.tsih = st.tsih;
                cfg.cid = job.cid;
                cfg.cmd_sn = st.cmd_sn;
                cfg.exp_stat_sn = job.exp_stat_sn;
                (cfg, st.portal.clone())
            };
            let result = conn::login_over(
                &self.opts.link,
                &portal,
                &cfg,
                attempt_timeout(&self.opts, started),
            )
            .await;
            // The old connection is logged out now (or the target is not
            // there to care): its commands may be aborted elsewhere.
            let orphans = std::mem::take(&mut job.orphans);
            if !orphans.is_empty() {
                self.abort_orphans(orphans);
            }
            let last = match result {
                Ok(c) => {
                    let mut st = self.lock();
                    if st.closed.is_some() || st.epoch != job.epoch {
                        // The session was reinstated meanwhile; this login
                        // belongs to the old one and goes with `c`.
                        return;
                    }
                    st.reinstating.retain(|x| *x != job.cid);
                    st.add_conn(c, &self);
                    st.conn_reinstatements += 1;
                    tracing::info!(
                        cid = job.cid,
                        attempt,
                        tsih = st.tsih,
                        connections = st.conns.len(),
                        "connection reinstated"
                    );
                    self.pump(&mut st);
                    return;
                }
                Err(Error::Login(LoginError::Refused { class, detail })) => {
                    tracing::warn!(
                        cid = job.cid,
                        class,
                        detail,
                        "connection reinstatement refused; reinstating the session"
                    );
                    let current = {
                        let mut st = self.lock();
                        st.reinstating.retain(|x| *x != job.cid);
                        st.epoch == job.epoch
                    };
                    if current {
                        self.fail_all_connections(format!(
                            "the target refused to reinstate connection {} (status {class:#04x}/{detail:#04x})",
                            job.cid
                        ));
                    }
                    return;
                }
                Err(e) => e.to_string(),
            };
            tracing::debug!(cid = job.cid, attempt, error = %last, "connection reinstatement failed");
            if started.elapsed() + delay > limit || attempt >= MAX_RECONNECT_ATTEMPTS {
                tracing::warn!(
                    cid = job.cid,
                    error = %last,
                    "could not reinstate the connection; continuing with fewer"
                );
                self.lock().reinstating.retain(|x| *x != job.cid);
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// ABORT TASK, on a live connection, for every command the lost
    /// connection carried: one the target never received has its CmdSN
    /// counted as received (RFC 7143 §11.5.1), so the commands behind it
    /// on other connections are not held up by the hole; one the target
    /// holds waiting for its turn is dropped rather than run late.
    fn abort_orphans(&self, orphans: Vec<Orphan>) {
        let mut waits = Vec::new();
        for o in &orphans {
            match self.send_tmf(None, tmf::ABORT_TASK, o.wire_lun, o.itt, o.cmd_sn) {
                Ok(rx) => waits.push((o.itt, rx)),
                Err(e) => {
                    tracing::debug!(itt = o.itt, error = %e, "could not abort a lost command");
                    return;
                }
            }
        }
        let t = self.opts.command_timeout;
        tokio::spawn(async move {
            for (itt, rx) in waits {
                match tokio::time::timeout(t, rx).await {
                    Ok(Ok(r)) => tracing::debug!(itt, response = r, "lost command aborted"),
                    _ => tracing::debug!(itt, "no answer to the ABORT TASK of a lost command"),
                }
            }
        });
    }

    /// Sends a task management request as an immediate PDU and returns
    /// where its response will arrive.
    fn send_tmf(
        &self,
        on: Option<u64>,
        function: u8,
        wire_lun: u64,
        referenced: u32,
        ref_cmd_sn: u32,
    ) -> Result<oneshot::Receiver<u8>, Error> {
        let (tx, rx) = oneshot::channel();
        self.send_immediate(on, |st, itt, conn| {
            st.pending.insert(itt, Pending::Tmf(tx, conn.2));
            Header::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function,
                lun: wire_lun,
                itt,
                referenced_task_tag: referenced,
                cmd_sn: st.cmd_sn,
                exp_stat_sn: conn.1,
                ref_cmd_sn,
                exp_data_sn: 0,
            })
        })?;
        Ok(rx)
    }

    /// Logs in a replacement session (same ISID, TSIH 0) with backoff until
    /// `replacement_timeout`, then reissues the queued commands.
    async fn recover(self: Arc<Self>, first_reason: String) {
        let started = Instant::now();
        let limit = self.opts.replacement_timeout;
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        tracing::debug!(reason = %first_reason, "recovery started");
        let mut last;
        loop {
            attempt += 1;
            let bound = attempt_timeout(&self.opts, started);
            // The portal named first, then each other path in turn.
            let paths: Vec<&Portal> = self.opts.paths(&self.home).collect();
            let path = paths
                .get((attempt as usize - 1) % paths.len().max(1))
                .copied()
                .unwrap_or(&self.home);
            match open_connections(path, &self.login, &self.opts, bound).await {
                Ok(logged) => {
                    let mut st = self.lock();
                    if st.closed.is_some() {
                        return;
                    }
                    st.install(logged, &self);
                    st.recovering = false;
                    st.reconnects += 1;
                    // Bounded retry per command.
                    let max = self.opts.max_reissues;
                    let queued: Vec<u32> = st.queue.iter().copied().collect();
                    for itt in queued {
                        let mut was_sent = false;
                        let give_up = match st.pending.get_mut(&itt) {
                            Some(Pending::Scsi(t)) => {
                                was_sent = t.sent.take().is_some();
                                t.data_in = DataInBuffer::new(t.req.expected_in);
                                t.reissues += 1;
                                t.reissues > max
                            }
                            _ => false,
                        };
                        if was_sent && !give_up {
                            st.reissued += 1;
                        }
                        if give_up {
                            st.queue.retain(|q| *q != itt);
                            fail_task(
                                &mut st,
                                itt,
                                Error::SessionClosed(format!(
                                    "command reissued {max} times after reconnects; giving up"
                                )),
                            );
                        }
                    }
                    tracing::info!(
                        attempt,
                        portal = %st.portal,
                        tsih = st.tsih,
                        reissued = st.queue.len(),
                        "session reinstated"
                    );
                    self.pump(&mut st);
                    drop(st);
                    self.changed.notify_waiters();
                    return;
                }
                Err(e) => {
                    tracing::info!(attempt, error = %e, "reconnect failed; retrying until the replacement timeout");
                    last = e.to_string();
                }
            }
            if started.elapsed() + delay > limit || attempt >= MAX_RECONNECT_ATTEMPTS {
                self.close(format!(
                    "the session could not be reinstated within {:.1} s ({attempt} attempts; last: {last})",
                    limit.as_secs_f64()
                ));
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Sends an immediate PDU built under the lock with a fresh ITT, on the
    /// first connection; `build` gets (CID, ExpStatSN) of it.
    fn send_immediate(
        &self,
        on: Option<u64>,
        build: impl FnOnce(&mut State, u32, (u16, u32, u64)) -> Header,
    ) -> Result<(), Error> {
        let mut st = self.lock();
        if let Some(reason) = &st.closed {
            return Err(Error::SessionClosed(reason.clone()));
        }
        let chosen = on.and_then(|id| st.conn_index(id)).unwrap_or(0);
        let Some(c) = st.conns.get(chosen) else {
            return Err(Error::SessionClosed("reconnecting".into()));
        };
        let conn = (c.cid, c.exp_stat_sn, c.id);
        let out = c.out.clone();
        let itt = st.alloc_itt();
        let h = build(&mut st, itt, conn);
        out.send(vec![Pdu::new(h, Bytes::new())])
            .map_err(|_| Error::SessionClosed("the connection's writer has stopped".into()))
    }

    /// Puts queued commands on the wire while the window has room, each on
    /// the next connection in turn; under the lock, so CmdSN order is the
    /// order of assignment.
    fn pump(&self, st: &mut State) {
        let credit = command_credit(&st.params);
        while !st.recovering && st.window_open() && !st.conns.is_empty() {
            let Some(k) = pick_connection(st, credit) else {
                // Every connection's receive credit is in use: a response frees one.
                break;
            };
            let Some(itt) = st.queue.pop_front() else {
                break;
            };
            let Some(Pending::Scsi(task)) = st.pending.get(&itt) else {
                continue;
            };
            let req = Arc::clone(&task.req);
            st.rr = k.wrapping_add(1);
            let cmd_sn = st.cmd_sn;
            let Some(exp_stat_sn) = st.conns.get(k).map(|c| c.exp_stat_sn) else {
                break;
            };
            let pdus = command_pdus(&st.params, &req, itt, cmd_sn, exp_stat_sn);
            let Some(c) = st.conns.get_mut(k) else { break };
            if c.out.send(pdus).is_err() {
                // The writer is gone; its failure starts recovery.
                st.queue.push_front(itt);
                break;
            }
            c.commands += 1;
            let conn_id = c.id;
            st.cmd_sn = st.cmd_sn.wrapping_add(1);
            if let Some(Pending::Scsi(t)) = st.pending.get_mut(&itt) {
                t.sent = Some((conn_id, cmd_sn));
            }
        }
    }
}

/// iSER's MaxOutstandingUnexpectedPDUs (RFC 7145), the receive credit of each
/// connection: how many SCSI commands one connection may have outstanding
/// (sent, not yet answered). Two of the agreed number are left for the
/// immediate PDUs (task management, NOP-Out, logout) a target must always be
/// able to take (RFC 7143 §4.2.2.1; the key's minimum of 2 is for them).
/// `None`: no limit (TCP, or 0 agreed).
fn command_credit(p: &NegotiatedParams) -> Option<usize> {
    if !p.rdma_extensions || p.max_outstanding_unexpected_pdus == 0 {
        return None;
    }
    let n = usize::try_from(p.max_outstanding_unexpected_pdus).unwrap_or(usize::MAX);
    Some(n.saturating_sub(2).max(1))
}

/// Unexpected PDUs outstanding on connection `conn_id`: its SCSI commands not
/// yet answered and its immediate requests.
fn outstanding_on(st: &State, conn_id: u64) -> usize {
    st.pending
        .values()
        .filter(|p| match p {
            Pending::Scsi(t) => t.sent.is_some_and(|(c, _)| c == conn_id),
            other => other.immediate_on() == Some(conn_id),
        })
        .count()
}

/// The connection for the next command: round robin from `rr`, skipping those
/// whose receive credit is used up; `None` when all are full.
fn pick_connection(st: &State, credit: Option<usize>) -> Option<usize> {
    let n = st.conns.len();
    if n == 0 {
        return None;
    }
    let Some(credit) = credit else {
        return Some(st.rr % n);
    };
    (0..n).map(|i| st.rr.wrapping_add(i) % n).find(|k| {
        st.conns
            .get(*k)
            .is_some_and(|c| outstanding_on(st, c.id) < credit)
    })
}

/// The SCSI Command PDU with its immediate data, and the unsolicited
/// Data-Out after it, for one (re)issue of `req`.
fn command_pdus(
    p: &NegotiatedParams,
    req: &Request,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
) -> Vec<Pdu> {
    let len = req.data_out.len() as u32;
    let plan = WritePlan::new(p, len);
    let mut cdb16 = [0u8; 16];
    let head = req.cdb.get(..16).unwrap_or(&req.cdb);
    if let Some(dst) = cdb16.get_mut(..head.len()) {
        dst.copy_from_slice(head);
    }
    let extended = req
        .cdb
        .get(16..)
        .filter(|e| !e.is_empty())
        .map(Bytes::copy_from_slice);
    let cmd = ScsiCommand {
        immediate: false,
        final_: plan.command_final(),
        read: req.expected_in > 0,
        write: len > 0,
        attr: task_attr::SIMPLE,
        lun: req.lun,
        itt,
        expected_data_transfer_length: if len > 0 { len } else { req.expected_in },
        cmd_sn,
        exp_stat_sn,
        cdb: cdb16,
        extended_cdb: extended,
        bidi_read_length: None,
    };
    let mut pdus = vec![Pdu::new(
        Header::ScsiCommand(cmd),
        req.data_out.slice(..plan.immediate as usize),
    )];
    pdus.extend(data_out_pdus(
        req.lun,
        itt,
        RESERVED_TAG,
        &req.data_out,
        plan.immediate,
        plan.unsolicited_end,
        plan.segment,
        exp_stat_sn,
    ));
    if p.rdma_extensions && plan.unsolicited_end < len {
        // iSER: the solicited part goes to the transport too, which stages it
        // for the target's RDMA READ instead of waiting for R2Ts
        // (`idm::transport`'s data movement table). Zero-copy slices.
        pdus.extend(data_out_pdus(
            req.lun,
            itt,
            RESERVED_TAG,
            &req.data_out,
            plan.unsolicited_end,
            len,
            len,
            exp_stat_sn,
        ));
    }
    pdus
}

impl Inner {
    /// Handles one PDU from connection `id`. `Err` ends that connection.
    fn dispatch(&self, id: u64, pdu: Pdu) -> Result<(), String> {
        let mut st = self.lock();
        let Some(k) = st.conn_index(id) else {
            // From a connection already replaced.
            return Ok(());
        };
        let grew = match window_of(&pdu.header) {
            Some((exp, max)) => st.update_window(exp, max),
            None => false,
        };
        let mut to_send = Vec::new();
        match pdu.header {
            Header::ScsiResponse(h) => {
                st.saw_stat_sn(k, h.stat_sn);
                if let Some(Pending::Scsi(task)) = take_scsi(&mut st, h.itt) {
                    let result = scsi_result(task.data_in, &h, &pdu.data);
                    let _ = task.done.send(result);
                }
            }
            Header::DataIn(h) => {
                if h.status_present {
                    st.saw_stat_sn(k, h.stat_sn);
                }
                data_in(&mut st, &h, &pdu.data);
            }
            Header::R2t(h) => {
                let seg = st.params.max_xmit_data_segment_length.max(512);
                let max_burst = st.params.max_burst_length;
                let exp_stat_sn = st.conns.get(k).map_or(0, |c| c.exp_stat_sn);
                let verdict = match st.pending.get(&h.itt) {
                    Some(Pending::Scsi(t)) => {
                        let d = &t.req.data_out;
                        let end = h.buffer_offset.checked_add(h.desired_data_transfer_length);
                        match end {
                            Some(end)
                                if end as usize <= d.len()
                                    && h.desired_data_transfer_length <= max_burst
                                    && h.desired_data_transfer_length > 0 =>
                            {
                                to_send.extend(data_out_pdus(
                                    t.req.lun,
                                    h.itt,
                                    h.ttt,
                                    d,
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
                                d.len()
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
                    st.saw_stat_sn(k, h.stat_sn);
                    if let Some(Pending::Nop(tx, _)) = take_immediate(&mut st, h.itt) {
                        let _ = tx.send(());
                    }
                }
                if h.ttt != RESERVED_TAG {
                    // The target's ping: echo it back (RFC 7143 §11.18).
                    let exp_stat_sn = st.conns.get(k).map_or(0, |c| c.exp_stat_sn);
                    to_send.push(Pdu::new(
                        Header::NopOut(NopOut {
                            immediate: true,
                            lun: h.lun,
                            itt: RESERVED_TAG,
                            ttt: h.ttt,
                            cmd_sn: st.cmd_sn,
                            exp_stat_sn,
                        }),
                        pdu.data,
                    ));
                }
            }
            Header::TaskMgmtResponse(h) => {
                st.saw_stat_sn(k, h.stat_sn);
                if let Some(Pending::Tmf(tx, _)) = take_immediate(&mut st, h.itt) {
                    let _ = tx.send(h.response);
                }
            }
            Header::LogoutResponse(h) => {
                st.saw_stat_sn(k, h.stat_sn);
                if let Some(Pending::Logout(tx, _)) = take_immediate(&mut st, h.itt) {
                    let _ = tx.send(h.response);
                }
            }
            Header::AsyncMessage(h) => {
                st.saw_stat_sn(k, h.stat_sn);
                tracing::info!(event = h.event, "asynchronous message from the target");
            }
            Header::Reject(h) => {
                st.saw_stat_sn(k, h.stat_sn);
                let rejected = pdu
                    .data
                    .get(16..20)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                tracing::warn!(reason = h.reason, itt = ?rejected, "target rejected a PDU");
                if let Some(itt) = rejected {
                    fail_task(&mut st, itt, Error::Rejected(h.reason));
                }
            }
            Header::TextResponse(h) => st.saw_stat_sn(k, h.stat_sn),
            other => return Err(format!("target sent {:?}", other.opcode())),
        }
        // With a receive credit, an answer frees room even when the window did not grow.
        if grew || command_credit(&st.params).is_some() {
            self.pump(&mut st);
        }
        if !to_send.is_empty() {
            if let Some(c) = st.conns.get(k) {
                c.out
                    .send(to_send)
                    .map_err(|_| "the connection's writer has stopped".to_owned())?;
            }
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

/// Takes the waiter of an answer to an immediate request; a SCSI task that
/// happens to hold the ITT stays.
fn take_immediate(st: &mut State, itt: u32) -> Option<Pending> {
    match st.pending.get(&itt) {
        Some(p) if p.immediate_on().is_some() => st.pending.remove(&itt),
        _ => None,
    }
}

fn take_scsi(st: &mut State, itt: u32) -> Option<Pending> {
    match st.pending.get(&itt) {
        Some(Pending::Scsi(_)) => st.pending.remove(&itt),
        _ => None,
    }
}

fn fail_task(st: &mut State, itt: u32, e: Error) {
    if let Some(Pending::Scsi(t)) = take_scsi(st, itt) {
        let _ = t.done.send(Err(e));
    }
}

/// Places one Data-In PDU into its command's buffer; completes the command
/// when the PDU carries status.
fn data_in(st: &mut State, h: &pdu::DataIn, data: &[u8]) {
    let Some(Pending::Scsi(task)) = st.pending.get_mut(&h.itt) else {
        // A command that timed out or was failed: drop what is late.
        return;
    };
    if let Err(e) = task.data_in.place(h, data) {
        fail_task(st, h.itt, Error::Protocol(e.to_string()));
        return;
    }
    if !h.status_present {
        return;
    }
    if let Some(Pending::Scsi(task)) = take_scsi(st, h.itt) {
        let residual = Residual::from_flags(h.underflow, h.overflow, h.residual_count);
        let result = match ScsiError::from_status(h.status, None) {
            Some(e) => Err(Error::Scsi(e)),
            None => Ok(Reply {
                status: h.status,
                data: task.data_in.finish(residual),
                residual,
            }),
        };
        let _ = task.done.send(result);
    }
}

/// The outcome carried by a SCSI Response PDU (RFC 7143 §11.4).
fn scsi_result(
    data_in: DataInBuffer,
    h: &pdu::ScsiResponse,
    segment: &[u8],
) -> Result<Reply, Error> {
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
    let residual = Residual::from_flags(h.underflow, h.overflow, h.residual_count);
    Ok(Reply {
        status: h.status,
        data: data_in.finish(residual),
        residual,
    })
}

/// Pings the target on every connection every `nop_interval`; a
/// connection whose ping goes unanswered is replaced (connection
/// reinstatement, or the session's when it was the last). Ends with the
/// session.
async fn keepalive(inner: Weak<Inner>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.opts.nop_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(i) = inner.upgrade() else { return };
        let (closed, recovering) = {
            let st = i.lock();
            (st.closed.is_some(), st.recovering)
        };
        if closed {
            return;
        }
        if recovering {
            continue;
        }
        let ids: Vec<u64> = i.lock().conns.iter().map(|c| c.id).collect();
        let s = Session { inner: i };
        let t = s.inner.opts.nop_timeout;
        let mut pings = JoinSet::new();
        for id in ids {
            let s = s.clone();
            pings.spawn(async move { (id, s.ping_on(Some(id), t).await) });
        }
        while let Some(done) = pings.join_next().await {
            if let Ok((id, Err(Error::Timeout { .. }))) = done {
                s.inner
                    .connection_failed(Some(id), "the target did not answer a NOP-Out ping".into());
            }
        }
    }
}

async fn writer(
    mut chan: mpsc::UnboundedReceiver<Vec<Pdu>>,
    mut tx: conn::ConnTx,
    id: u64,
    inner: Weak<Inner>,
) {
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
                i.connection_failed(Some(id), format!("sending to the target failed: {e}"));
            }
            break;
        }
    }
    tx.shutdown().await;
}

async fn reader(mut rx: conn::ConnRx, id: u64, inner: Weak<Inner>) {
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
        if let Err(e) = i.dispatch(id, pdu) {
            break format!("target protocol error: {e}");
        }
    };
    if let Some(i) = inner.upgrade() {
        tracing::debug!(%reason, "connection ended");
        i.connection_failed(Some(id), reason);
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

    /// SYNCHRONIZE CACHE (10) of the whole LU (SBC-4 §5.24).
    pub async fn synchronize_cache(&self) -> Result<(), Error> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x35;
        self.run(&cdb, None, 0).await.map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_attempt_is_bounded_even_with_a_long_login_timeout() {
        let mut o = SessionOptions::new("iqn.2026-11.dev.ironstar.test:i");
        o.login_timeout = Duration::from_secs(180);
        o.replacement_timeout = Duration::from_secs(180);
        assert_eq!(
            attempt_timeout(&o, Instant::now()),
            RECONNECT_ATTEMPT_TIMEOUT
        );
        o.login_timeout = Duration::from_secs(5);
        assert_eq!(attempt_timeout(&o, Instant::now()), Duration::from_secs(5));
    }

    #[test]
    fn receive_credit_is_the_agreed_unexpected_pdus_less_two_for_immediates_and_only_over_iser() {
        let mut p = NegotiatedParams {
            rdma_extensions: true,
            max_outstanding_unexpected_pdus: 16,
            ..Default::default()
        };
        assert_eq!(command_credit(&p), Some(14));
        p.max_outstanding_unexpected_pdus = 2;
        assert_eq!(command_credit(&p), Some(1));
        p.max_outstanding_unexpected_pdus = 0;
        assert_eq!(command_credit(&p), None);
        p.max_outstanding_unexpected_pdus = 16;
        p.rdma_extensions = false;
        assert_eq!(command_credit(&p), None);
    }

    fn state_with_connections(n: u64) -> State {
        let conns = (0..n)
            .map(|id| Conn {
                id,
                cid: id as u16,
                out: mpsc::unbounded_channel().0,
                exp_stat_sn: 0,
                commands: 0,
                reader: tokio::spawn(async {}).abort_handle(),
            })
            .collect();
        State {
            cmd_sn: 1,
            exp_cmd_sn: 1,
            max_cmd_sn: 0,
            next_itt: 0x10,
            next_seq: 0,
            pending: HashMap::new(),
            queue: VecDeque::new(),
            conns,
            next_conn_id: n,
            rr: 0,
            tsih: 0,
            params: NegotiatedParams::default(),
            portal: Portal::new("127.0.0.1", 3260),
            recovering: false,
            reconnects: 0,
            epoch: 0,
            reinstating: Vec::new(),
            conn_reinstatements: 0,
            reissued: 0,
            logging_out: false,
            closed: None,
        }
    }

    #[tokio::test]
    async fn commands_go_round_robin_to_connections_with_receive_credit_left_and_wait_when_none_has(
    ) {
        let mut st = state_with_connections(2);
        assert_eq!(pick_connection(&st, None), Some(0));
        st.rr = 1;
        assert_eq!(pick_connection(&st, Some(1)), Some(1));
        // Connection 1 has one unexpected PDU outstanding (a ping): with a credit of
        // one, the next command goes to connection 0 instead.
        st.pending
            .insert(0x20, Pending::Nop(oneshot::channel().0, 1));
        assert_eq!(pick_connection(&st, Some(1)), Some(0));
        assert_eq!(pick_connection(&st, Some(2)), Some(1));
        st.pending
            .insert(0x21, Pending::Nop(oneshot::channel().0, 0));
        assert_eq!(pick_connection(&st, Some(1)), None);
        // Without a limit the credit plays no part.
        assert_eq!(pick_connection(&st, None), Some(1));
    }

    #[test]
    fn the_last_recovery_attempt_ends_with_the_replacement_time_but_is_still_a_real_one() {
        let mut o = SessionOptions::new("iqn.2026-11.dev.ironstar.test:i");
        o.login_timeout = Duration::from_secs(30);
        o.replacement_timeout = Duration::from_secs(4);
        let t = attempt_timeout(&o, Instant::now());
        assert!(t <= Duration::from_secs(4) && t > Duration::from_secs(3));
        o.replacement_timeout = Duration::ZERO;
        assert_eq!(attempt_timeout(&o, Instant::now()), Duration::from_secs(1));
    }
}
