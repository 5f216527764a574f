//! One RC connection's verbs resources over sideway: the device context and protection domain
//! (shared per device), a completion queue with its completion channel read from tokio through
//! `AsyncFd` (no busy polling), the queue pair, registered regions, and the bookkeeping that
//! gives exactly one completion per posted work request — flushes included.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use rdma_mummy_sys as sys;
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, QueuePair as _, QueuePairAttribute, QueuePairState,
};
use sideway::ibverbs::AccessFlags;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::cm::CmId;
use crate::verbs::{
    Access, Completion, LocalSlice, MemoryRegion, QpConfig, QueuePair, RegionMemory, RemoteAddr,
    VerbsError, WcOpcode, WcStatus,
};

fn backend(what: &str, e: impl std::fmt::Display) -> VerbsError {
    VerbsError::Backend(format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device context and its protection domain, opened once per device and shared by every
/// connection on it while any holds it (so removing the device can finish once they are gone).
pub(crate) struct Device {
    pub(crate) name: String,
    pub(crate) pd: Arc<ProtectionDomain>,
    pub(crate) ctx: Arc<DeviceContext>,
    /// Device limits for RDMA READ depth (responder, initiator).
    pub(crate) max_rd_atom: u8,
    pub(crate) max_init_rd_atom: u8,
    /// Removed (DEVICE_REMOVAL) or failed (IBV_EVENT_DEVICE_FATAL): no new connection uses it,
    /// and [`device`] opens the device afresh when one of that name comes back.
    dead: AtomicBool,
    /// Every connection made on this context, so one removal or fatal event ends them all.
    conns: Mutex<Vec<Weak<Shared>>>,
    /// The task reading the context's async events; it holds its own reference to the context
    /// (dropped after its fd leaves tokio), and is stopped when the device is dropped.
    events: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.events).take() {
            t.abort();
        }
    }
}

impl Device {
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn track(&self, conn: &Arc<Shared>) {
        let mut conns = lock(&self.conns);
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(conn));
    }

    /// The device is gone (or unusable): stop every connection on it at once — each flushes all
    /// its outstanding work requests here, so the layers above end their tasks and drop their
    /// QPs, CQs and regions promptly, and with the last of them this context and protection
    /// domain close — and make sure librdmacm lets go of its own context too.
    pub(crate) fn kill(&self, why: &str) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "iser rdma: device {} {why}: closing every connection on it",
                self.name
            );
            forget_device(&self.name);
            super::cm::unpin_device(&self.name);
            release_rdmacm_contexts();
        }
        let conns: Vec<Arc<Shared>> = lock(&self.conns).iter().filter_map(Weak::upgrade).collect();
        for c in conns {
            c.shut(true);
        }
    }
}

static DEVICES: Mutex<Option<HashMap<String, Weak<Device>>>> = Mutex::new(None);

/// Drops a dead device from the cache, so a device of the same name added later is opened anew.
fn forget_device(name: &str) {
    let mut g = lock(&DEVICES);
    if let Some(map) = g.as_mut() {
        let dead = map
            .get(name)
            .and_then(Weak::upgrade)
            .is_none_or(|d| d.is_dead());
        if dead {
            map.remove(name);
        }
    }
}

/// RDMA_CM_EVENT_DEVICE_REMOVAL seen on some CM id bound to `name` (a listener, or a connection
/// still being set up): kills our context of that device, if open, and releases librdmacm's.
pub(crate) fn device_removed(name: Option<String>) {
    if let Some(n) = &name {
        super::cm::unpin_device(n);
    }
    let dev = name.and_then(|n| {
        lock(&DEVICES)
            .as_ref()
            .and_then(|m| m.get(&n).and_then(Weak::upgrade))
    });
    match dev {
        Some(d) => d.kill("removed (RDMA_CM_EVENT_DEVICE_REMOVAL)"),
        None => release_rdmacm_contexts(),
    }
}

/// After a device removal, or a connect that found no device for its address: has librdmacm
/// re-read its device list now (while our CM ids on a removed device still exist it marks the
/// device dead and closes its context with the last of them; with none left, at once), and again
/// a few times over the next seconds in case the kernel still listed the device the first time.
/// One such round at a time; cheap, and harmless when nothing was removed.
pub(crate) fn release_rdmacm_contexts() {
    static RUNNING: AtomicBool = AtomicBool::new(false);
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        super::cm::pin_devices();
        return;
    };
    if RUNNING.swap(true, Ordering::SeqCst) {
        return;
    }
    rt.spawn(async {
        for ms in [0u64, 200, 500, 1000, 2000, 4000] {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            let _ = tokio::task::spawn_blocking(super::cm::pin_devices).await;
        }
        RUNNING.store(false, Ordering::SeqCst);
    });
}

/// The verbs devices present (empty without rdma-core or without a device).
pub fn device_names() -> Vec<String> {
    match DeviceList::new() {
        Ok(list) => list.iter().map(|d| d.name()).collect(),
        Err(_) => Vec::new(),
    }
}

pub(crate) fn device(name: &str) -> Result<Arc<Device>, VerbsError> {
    let mut g = lock(&DEVICES);
    let map = g.get_or_insert_with(HashMap::new);
    map.retain(|_, w| w.upgrade().is_some_and(|d| !d.is_dead()));
    if let Some(d) = map.get(name).and_then(Weak::upgrade) {
        return Ok(d);
    }
    let list = DeviceList::new().map_err(|e| backend("ibv_get_device_list", e))?;
    let dev = list
        .iter()
        .find(|d| d.name() == name)
        .ok_or_else(|| VerbsError::Backend(format!("no verbs device {name}")))?;
    let ctx = dev.open().map_err(|e| backend("ibv_open_device", e))?;
    let attr = ctx
        .query_device()
        .map_err(|e| backend("ibv_query_device", e))?;
    let clamp = |v: i32| u8::try_from(v.max(1)).unwrap_or(u8::MAX);
    let pd = ctx.alloc_pd().map_err(|e| backend("ibv_alloc_pd", e))?;
    let d = Arc::new(Device {
        name: name.to_string(),
        pd,
        ctx: Arc::clone(&ctx),
        max_rd_atom: clamp(attr.max_qp_rd_atom()),
        max_init_rd_atom: clamp(attr.max_qp_init_rd_atom()),
        dead: AtomicBool::new(false),
        conns: Mutex::new(Vec::new()),
        events: Mutex::new(None),
    });
    match spawn_async_events(ctx, Arc::downgrade(&d)) {
        Ok(t) => *lock(&d.events) = Some(t),
        Err(e) => tracing::debug!("iser rdma: {name}: not watching async events: {e}"),
    }
    map.insert(name.to_string(), Arc::downgrade(&d));
    Ok(d)
}

/// Reads the context's async events (`ibv_get_async_event`, each acknowledged at once):
/// IBV_EVENT_DEVICE_FATAL kills the device like a removal does; the rest are logged.
fn spawn_async_events(
    ctx: Arc<DeviceContext>,
    dev: Weak<Device>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the context is live while `ctx` is held; async_fd is its descriptor.
    let raw_ctx = unsafe { ctx.context() };
    // SAFETY: as above.
    let fd = unsafe { raw_ctx.as_ref().async_fd };
    super::cm::set_nonblocking(fd)?;
    // SAFETY: the fd stays open while `ctx` lives; the task drops `afd` before `ctx`.
    let afd = unsafe { AsyncFd::register(Fd(fd)) }.map_err(io::Error::from)?;
    let raw = RawCtx(raw_ctx);
    Ok(tokio::spawn(async move {
        // Declared in this order so the fd leaves tokio before the context can close.
        let _ctx = ctx;
        let raw = raw;
        let afd = afd;
        loop {
            let Ok(mut guard) = afd.readable().await else {
                return;
            };
            // SAFETY: all-zero is a valid ibv_async_event (a null element and event 0).
            let mut ev: sys::ibv_async_event = unsafe { std::mem::zeroed() };
            // SAFETY: the context is live (held by `_ctx`); the fd is non-blocking.
            let r = unsafe { sys::ibv_get_async_event(raw.0.as_ptr(), &mut ev) };
            if r != 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return;
            }
            let kind = ev.event_type;
            // SAFETY: acknowledges the event just read, once (ibv_destroy_* wait for that).
            unsafe { sys::ibv_ack_async_event(&mut ev) };
            if kind == sys::ibv_event_type::IBV_EVENT_DEVICE_FATAL {
                if let Some(d) = dev.upgrade() {
                    d.kill("reported a fatal error (IBV_EVENT_DEVICE_FATAL)");
                }
            } else {
                tracing::debug!("iser rdma: async event {}", kind as u32);
            }
        }
    }))
}

/// The raw context pointer, carried into the async-event task beside the `Arc` that keeps it.
struct RawCtx(NonNull<sys::ibv_context>);
// SAFETY: libibverbs' async-event calls are thread-safe; the context outlives the task's use.
unsafe impl Send for RawCtx {}

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A posted work request until its completion: the caller's wr_id, what it was, and the slice
/// that keeps its memory alive (the ownership rule of `verbs`).
struct Posted {
    wr_id: u64,
    opcode: WcOpcode,
    _slice: LocalSlice,
}

#[derive(Default)]
struct State {
    posted: HashMap<u64, Posted>,
    next: u64,
    sends: u32,
    recvs: u32,
    /// No more posting: disconnected, errored, or the device is gone.
    down: bool,
    /// Flushes made up here for WRs the device can no longer complete (device removed).
    synthesized: Vec<Completion>,
}

/// Verbs objects of one connection. Field order is drop order: the fd leaves tokio before the
/// channel closes it; the QP goes before its CQ, the CQ before its channel, then the device.
pub(crate) struct Conn {
    chan_fd: AsyncFd<Fd>,
    qp: Mutex<BasicQueuePair>,
    qp_raw: NonNull<sys::ibv_qp>,
    cq: Arc<BasicCompletionQueue>,
    chan_raw: NonNull<sys::ibv_comp_channel>,
    _chan: Arc<CompletionChannel>,
    pub(crate) dev: Arc<Device>,
    unacked: AtomicU32,
}

// SAFETY: the raw pointers are borrowed from the sideway objects held beside them and live as
// long as they do; libibverbs' post/poll/notify calls are thread-safe for one QP/CQ.
unsafe impl Send for Conn {}
// SAFETY: as above; the QP's modify (the one &mut call) is behind a Mutex.
unsafe impl Sync for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        let n = self.unacked.swap(0, Ordering::Relaxed);
        if n > 0 {
            // SAFETY: the CQ is live; destroying a CQ waits until its events are acknowledged.
            unsafe { sys::ibv_ack_cq_events(self.cq.cq().as_ptr(), n) };
        }
    }
}

impl Conn {
    pub(crate) fn new(id: &CmId, config: &QpConfig) -> Result<Conn, VerbsError> {
        let name = id
            .device_name()
            .ok_or_else(|| VerbsError::Backend("the CM id has no device".into()))?;
        let dev = device(&name)?;
        let chan =
            CompletionChannel::new(&dev.ctx).map_err(|e| backend("ibv_create_comp_channel", e))?;
        chan.set_nonblocking(true)?;
        let cqe = config
            .max_send_wr
            .saturating_add(config.max_recv_wr)
            .saturating_add(16);
        let cq = dev
            .ctx
            .create_cq_builder()
            .setup_cqe(cqe)
            .setup_comp_channel(&chan, 0)
            .build()
            .map_err(|e| backend("ibv_create_cq", e))?;
        let mut builder = dev.pd.create_qp_builder();
        builder
            .setup_max_send_wr(config.max_send_wr)
            .setup_max_recv_wr(config.max_recv_wr)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone());
        let qp = builder.build().map_err(|e| backend("ibv_create_qp", e))?;
        // SAFETY: the pointers are only used while `qp` and `chan` are held by this Conn.
        let (qp_raw, chan_raw) = unsafe { (qp.qp(), chan.comp_channel()) };
        // SAFETY: the channel's fd stays open until `_chan` drops, which is after `chan_fd`.
        let chan_fd =
            unsafe { AsyncFd::register(Fd(chan.as_raw_fd())) }.map_err(io::Error::from)?;
        let conn = Conn {
            chan_fd,
            qp: Mutex::new(qp),
            qp_raw,
            cq,
            chan_raw,
            _chan: chan,
            dev,
            unacked: AtomicU32::new(0),
        };
        conn.arm()?;
        Ok(conn)
    }

    pub(crate) fn qp_num(&self) -> u32 {
        // SAFETY: the QP is live while self is.
        unsafe { self.qp_raw.as_ref().qp_num }
    }

    /// Moves the QP to `state` with the attributes the CM computed (path, PSNs, remote QPN),
    /// RDMA READ depths set to what was agreed in the CM exchange.
    pub(crate) fn modify_from_cm(
        &self,
        id: &CmId,
        state: QueuePairState,
        rd_atomic: u8,
        dest_rd_atomic: u8,
    ) -> Result<(), VerbsError> {
        let (raw, mask) = id.qp_attr(state as u32)?;
        let mut attr = QueuePairAttribute::from(&raw, mask);
        match state {
            // The CM grants remote read only once it knows the responder resources (after the
            // REQ); the active side reaches INIT before that, so ask for it here.
            QueuePairState::Init => {
                attr.setup_access_flags(
                    AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
                );
            }
            QueuePairState::ReadyToReceive => {
                attr.setup_max_dest_read_atomic(dest_rd_atomic.max(1));
            }
            QueuePairState::ReadyToSend => {
                attr.setup_max_read_atomic(rd_atomic.max(1));
            }
            _ => {}
        }
        lock(&self.qp)
            .modify(&attr)
            .map_err(|e| backend("ibv_modify_qp", e))
    }

    /// The error state: every outstanding work request completes with a flush error.
    fn to_error(&self) {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        if let Err(e) = lock(&self.qp).modify(&attr) {
            tracing::debug!("iser rdma: QP to error: {e}");
        }
    }

    fn arm(&self) -> Result<(), VerbsError> {
        // SAFETY: the CQ is live.
        let r = unsafe { sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r).into());
        }
        Ok(())
    }
}

/// What every handle of one connection shares; the CM watcher holds it weakly.
pub(crate) struct Shared {
    conn: Conn,
    state: Mutex<State>,
    wake: Notify,
    config: QpConfig,
    local: SocketAddr,
    peer: SocketAddr,
    /// Dropped after `conn` (field order): the QP goes before its CM id.
    pub(crate) id: CmId,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(w) = lock(&self.watcher).take() {
            w.abort();
        }
        if !lock(&self.state).down {
            // Tell the peer (DREQ) rather than leave it to time out.
            let _ = self.id.disconnect();
        }
    }
}

impl Shared {
    pub(crate) fn new(id: CmId, conn: Conn, config: QpConfig) -> Arc<Shared> {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let shared = Arc::new(Shared {
            local: id.local_addr().unwrap_or(unspecified),
            peer: id.peer_addr().unwrap_or(unspecified),
            conn,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            config,
            id,
            watcher: Mutex::new(None),
        });
        shared.conn.dev.track(&shared);
        if shared.conn.dev.is_dead() {
            // Removed while this connection was being set up.
            shared.shut(true);
        }
        shared
    }

    pub(crate) fn conn(&self) -> &Conn {
        &self.conn
    }

    /// Watches the connection's own CM channel: a DISCONNECTED (the peer's DREQ, or the link
    /// gone) or DEVICE_REMOVAL moves the QP to error so every outstanding WR flushes.
    pub(crate) fn spawn_watcher(self: &Arc<Shared>) {
        let weak = Arc::downgrade(self);
        let channel = Arc::clone(self.id.channel());
        let task = tokio::spawn(async move {
            loop {
                let ev = match channel.next_event().await {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::warn!("iser rdma: CM channel: {e}");
                        break;
                    }
                };
                let Some(shared) = weak.upgrade() else { break };
                use super::cm::EventKind as K;
                match ev.kind {
                    K::Disconnected | K::TimewaitExit => {
                        tracing::debug!("iser rdma: {} disconnected ({:?})", shared.peer, ev.kind);
                        shared.shut(false);
                    }
                    K::DeviceRemoval => {
                        tracing::warn!("iser rdma: device removed under {}", shared.peer);
                        shared.shut(true);
                        shared
                            .conn
                            .dev
                            .kill("removed (RDMA_CM_EVENT_DEVICE_REMOVAL)");
                        // Nothing more comes on this id; the watcher ends with it.
                        break;
                    }
                    K::ConnectError | K::Unreachable | K::Rejected => shared.shut(false),
                    other => tracing::debug!("iser rdma: CM event {other:?} on a connection"),
                }
            }
        });
        *lock(&self.watcher) = Some(task);
    }

    /// Stops posting, disconnects (idempotent) and flushes. With `device_gone`, no completion
    /// can come from the device any more: every outstanding WR is flushed here instead.
    pub(crate) fn shut(&self, device_gone: bool) {
        let first = {
            let mut st = lock(&self.state);
            let first = !st.down;
            st.down = true;
            first
        };
        if first {
            // Also answers a peer's DREQ with a DREP.
            let _ = self.id.disconnect();
            self.conn.to_error();
        }
        if device_gone {
            let mut st = lock(&self.state);
            let gone: Vec<Completion> = st.posted.drain().map(|(_, p)| flushed(&p)).collect();
            st.sends = 0;
            st.recvs = 0;
            st.synthesized.extend(gone);
        }
        self.wake.notify_waiters();
    }
}

fn flushed(p: &Posted) -> Completion {
    Completion {
        wr_id: p.wr_id,
        status: WcStatus::WrFlushErr,
        opcode: p.opcode,
        byte_len: 0,
        invalidated_rkey: None,
    }
}

fn wc_status(s: u32) -> WcStatus {
    use sys::ibv_wc_status as w;
    match s {
        w::IBV_WC_SUCCESS => WcStatus::Success,
        w::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLengthErr,
        w::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtErr,
        w::IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlushErr,
        w::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccessErr,
        w::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteInvalidRequestErr,
        w::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        w::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
        other => WcStatus::Other(other),
    }
}

fn access_flags(a: Access) -> AccessFlags {
    let mut f = AccessFlags::none();
    if a.contains(Access::LOCAL_WRITE) {
        f |= AccessFlags::LocalWrite;
    }
    if a.contains(Access::REMOTE_WRITE) {
        // The verbs API requires local write with remote write.
        f |= AccessFlags::RemoteWrite | AccessFlags::LocalWrite;
    }
    if a.contains(Access::REMOTE_READ) {
        f |= AccessFlags::RemoteRead;
    }
    f
}

/// The backend's queue pair: an RC QP on rdma-core, reached through librdmacm.
pub struct RdmaQp {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for RdmaQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaQp")
            .field("qp_num", &self.shared.conn.qp_num())
            .field("local", &self.shared.local)
            .field("peer", &self.shared.peer)
            .finish()
    }
}

impl Drop for RdmaQp {
    fn drop(&mut self) {
        // The watcher holds only a Weak: this was the last handle of the connection.
        tracing::trace!(
            "iser rdma: QP {} to {} dropped",
            self.shared.conn.qp_num(),
            self.shared.peer
        );
    }
}

enum Kind {
    Send(Option<u32>),
    Write(RemoteAddr),
    Read(RemoteAddr),
}

impl RdmaQp {
    fn post(&self, wr_id: u64, slice: LocalSlice, kind: Kind) -> Result<(), VerbsError> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        if st.down {
            return Err(VerbsError::Disconnected);
        }
        if st.sends >= sh.config.max_send_wr {
            return Err(VerbsError::QueueFull("send"));
        }
        let mut sge = sys::ibv_sge {
            addr: slice.addr(),
            length: slice.len(),
            lkey: slice.lkey(),
        };
        // SAFETY: all-zero is a valid ibv_send_wr (null pointers, zero scalars, empty unions).
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        let id = st.next;
        st.next = st.next.wrapping_add(1);
        wr.wr_id = id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        let opcode = match kind {
            Kind::Send(None) => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND;
                WcOpcode::Send
            }
            Kind::Send(Some(rkey)) => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND_WITH_INV;
                wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
                WcOpcode::Send
            }
            Kind::Write(r) => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = sys::rdma_t {
                    remote_addr: r.addr,
                    rkey: r.rkey,
                };
                WcOpcode::RdmaWrite
            }
            Kind::Read(r) => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = sys::rdma_t {
                    remote_addr: r.addr,
                    rkey: r.rkey,
                };
                WcOpcode::RdmaRead
            }
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: wr and sge are valid for the call and the provider copies them; the memory
        // they name is kept alive by `slice`, held in `posted` until the completion.
        let r = unsafe { sys::ibv_post_send(sh.conn.qp_raw.as_ptr(), &mut wr, &mut bad) };
        if r != 0 {
            return Err(post_error(r, "send"));
        }
        st.sends += 1;
        st.posted.insert(
            id,
            Posted {
                wr_id,
                opcode,
                _slice: slice,
            },
        );
        Ok(())
    }

    /// Takes up to `max` completions now, without waiting.
    fn take(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsError> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        let mut n = 0;
        while n < max {
            let Some(c) = st.synthesized.pop() else { break };
            out.push(c);
            n += 1;
        }
        // SAFETY: all-zero is a valid ibv_wc.
        let mut wcs: [sys::ibv_wc; 32] = unsafe { std::mem::zeroed() };
        while n < max {
            let want = (max - n).min(wcs.len()) as i32;
            // SAFETY: wcs has room for `want` entries; the CQ is live.
            let got = unsafe { sys::ibv_poll_cq(sh.conn.cq.cq().as_ptr(), want, wcs.as_mut_ptr()) };
            if got < 0 {
                return Err(VerbsError::Backend("ibv_poll_cq failed".into()));
            }
            let got = got as usize;
            for wc in wcs.iter().take(got) {
                let Some(p) = st.posted.remove(&wc.wr_id) else {
                    // Already flushed here after a device removal.
                    continue;
                };
                match p.opcode {
                    WcOpcode::Recv => st.recvs = st.recvs.saturating_sub(1),
                    _ => st.sends = st.sends.saturating_sub(1),
                }
                let status = wc_status(wc.status);
                let invalidated_rkey = if status == WcStatus::Success
                    && wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_INV.0 != 0
                {
                    // SAFETY: with IBV_WC_WITH_INV the union holds the invalidated rkey.
                    Some(unsafe { wc.imm_data_invalidated_rkey_union.invalidated_rkey })
                } else {
                    None
                };
                let byte_len = match p.opcode {
                    WcOpcode::Recv | WcOpcode::RdmaRead if status == WcStatus::Success => {
                        wc.byte_len
                    }
                    _ => 0,
                };
                if status != WcStatus::Success && !st.down {
                    // The QP is in error now: no more posting; flushes follow.
                    tracing::debug!("iser rdma: {:?} completion {:?}", p.opcode, status);
                    st.down = true;
                    let _ = sh.id.disconnect();
                }
                out.push(Completion {
                    wr_id: p.wr_id,
                    status,
                    opcode: p.opcode,
                    byte_len,
                    invalidated_rkey,
                });
                n += 1;
            }
            if got < want as usize {
                break;
            }
        }
        Ok(n)
    }

    fn finished(&self) -> bool {
        let st = lock(&self.shared.state);
        st.down && st.posted.is_empty() && st.synthesized.is_empty()
    }

    /// Waits on the completion channel's fd (or a disconnect) once.
    async fn wait(&self) -> Result<(), VerbsError> {
        let sh = &self.shared;
        let woken = sh.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if self.finished() {
            return Ok(());
        }
        tokio::select! {
            ready = sh.conn.chan_fd.readable() => {
                let mut guard = ready?;
                let mut cq = std::ptr::null_mut();
                let mut ctx = std::ptr::null_mut();
                // SAFETY: non-blocking channel; out-pointers to locals.
                let r = unsafe { sys::ibv_get_cq_event(sh.conn.chan_raw.as_ptr(), &mut cq, &mut ctx) };
                if r != 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        guard.clear_ready();
                        return Ok(());
                    }
                    return Err(e.into());
                }
                let n = sh.conn.unacked.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= 32 {
                    sh.conn.unacked.fetch_sub(n, Ordering::Relaxed);
                    // SAFETY: acknowledges events taken from this CQ.
                    unsafe { sys::ibv_ack_cq_events(cq, n) };
                }
            }
            _ = &mut woken => {}
        }
        Ok(())
    }
}

fn post_error(r: i32, queue: &'static str) -> VerbsError {
    if r == libc::ENOMEM {
        VerbsError::QueueFull(queue)
    } else {
        io::Error::from_raw_os_error(r).into()
    }
}

impl QueuePair for RdmaQp {
    fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    fn peer_addr(&self) -> SocketAddr {
        self.shared.peer
    }

    fn register(&self, len: usize, access: Access) -> Result<Arc<MemoryRegion>, VerbsError> {
        let mem = RegionMemory::zeroed(len);
        let flags = access_flags(access);
        // SAFETY: `mem` is one heap allocation that never moves; MemoryRegion drops the
        // registration (which holds the MR) before it frees `mem`.
        let mr = unsafe {
            self.shared
                .conn
                .dev
                .pd
                .reg_mr(mem.as_ptr() as usize, len.max(1), flags)
        }
        .map_err(|e| backend("ibv_reg_mr", e))?;
        let (lkey, rkey) = (mr.lkey(), mr.rkey());
        Ok(Arc::new(MemoryRegion::from_parts(
            mem,
            lkey,
            rkey,
            access,
            Box::new(mr),
        )))
    }

    fn post_recv(&self, wr_id: u64, buf: LocalSlice) -> Result<(), VerbsError> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        if st.down {
            return Err(VerbsError::Disconnected);
        }
        if st.recvs >= sh.config.max_recv_wr {
            return Err(VerbsError::QueueFull("receive"));
        }
        let id = st.next;
        st.next = st.next.wrapping_add(1);
        let mut sge = sys::ibv_sge {
            addr: buf.addr(),
            length: buf.len(),
            lkey: buf.lkey(),
        };
        let mut wr = sys::ibv_recv_wr {
            wr_id: id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: wr and sge are valid for the call and copied by the provider; `buf` keeps the
        // memory alive until the completion.
        let r = unsafe { sys::ibv_post_recv(sh.conn.qp_raw.as_ptr(), &mut wr, &mut bad) };
        if r != 0 {
            return Err(post_error(r, "receive"));
        }
        st.recvs += 1;
        st.posted.insert(
            id,
            Posted {
                wr_id,
                opcode: WcOpcode::Recv,
                _slice: buf,
            },
        );
        Ok(())
    }

    fn post_send(
        &self,
        wr_id: u64,
        buf: LocalSlice,
        invalidate: Option<u32>,
    ) -> Result<(), VerbsError> {
        self.post(wr_id, buf, Kind::Send(invalidate))
    }

    fn post_rdma_write(
        &self,
        wr_id: u64,
        local: LocalSlice,
        remote: RemoteAddr,
    ) -> Result<(), VerbsError> {
        self.post(wr_id, local, Kind::Write(remote))
    }

    fn post_rdma_read(
        &self,
        wr_id: u64,
        local: LocalSlice,
        remote: RemoteAddr,
    ) -> Result<(), VerbsError> {
        self.post(wr_id, local, Kind::Read(remote))
    }

    async fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsError> {
        let max = max.max(1);
        loop {
            let n = self.take(out, max)?;
            if n > 0 {
                return Ok(n);
            }
            if self.finished() {
                return Err(VerbsError::Disconnected);
            }
            self.shared.conn.arm()?;
            // A completion may have landed between the poll and the arm.
            let n = self.take(out, max)?;
            if n > 0 {
                return Ok(n);
            }
            self.wait().await?;
        }
    }

    fn disconnect(&self) {
        self.shared.shut(false);
    }

    fn is_connected(&self) -> bool {
        !lock(&self.shared.state).down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_write_access_implies_local_write() {
        let f = access_flags(Access::REMOTE_WRITE);
        assert!(f.contains(AccessFlags::LocalWrite));
        assert!(f.contains(AccessFlags::RemoteWrite));
        assert!(!f.contains(AccessFlags::RemoteRead));
        let f = access_flags(Access::REMOTE_READ);
        assert!(f.contains(AccessFlags::RemoteRead));
        assert!(!f.contains(AccessFlags::LocalWrite));
    }

    #[test]
    fn work_completion_statuses_map_to_the_contract() {
        use sys::ibv_wc_status as w;
        assert_eq!(wc_status(w::IBV_WC_SUCCESS), WcStatus::Success);
        assert_eq!(wc_status(w::IBV_WC_WR_FLUSH_ERR), WcStatus::WrFlushErr);
        assert_eq!(
            wc_status(w::IBV_WC_REM_ACCESS_ERR),
            WcStatus::RemoteAccessErr
        );
        assert_eq!(
            wc_status(w::IBV_WC_REM_INV_REQ_ERR),
            WcStatus::RemoteInvalidRequestErr
        );
        assert_eq!(
            wc_status(w::IBV_WC_RNR_RETRY_EXC_ERR),
            WcStatus::RnrRetryExceeded
        );
        assert_eq!(wc_status(w::IBV_WC_RETRY_EXC_ERR), WcStatus::RetryExceeded);
        assert_eq!(wc_status(w::IBV_WC_LOC_LEN_ERR), WcStatus::LocalLengthErr);
        assert_eq!(wc_status(999), WcStatus::Other(999));
    }
}
