//! The verbs contract: the few RDMA verbs and connection-manager calls iSER
//! (RFC 7145) needs, in the shape rdma-core offers them, so that a real
//! backend (`rdma`, over rdma-core) maps each call 1:1 and the in-process
//! test double ([`crate::emulation`]) implements exactly the same thing.
//!
//! | here | rdma-core |
//! |---|---|
//! | [`Verbs::listen`], [`Listener::next_request`] | `rdma_create_id` + `rdma_bind_addr` + `rdma_listen`, `RDMA_CM_EVENT_CONNECT_REQUEST` |
//! | [`ConnectRequest::accept`] / [`ConnectRequest::reject`] | `rdma_create_qp` + `rdma_accept` (with private data) / `rdma_reject` |
//! | [`Verbs::connect`] | `rdma_resolve_addr` + `rdma_resolve_route` + `rdma_create_qp` + `rdma_connect`, `RDMA_CM_EVENT_ESTABLISHED` |
//! | [`QueuePair::register`] | `ibv_reg_mr` over a buffer that does not move until `ibv_dereg_mr` |
//! | [`QueuePair::post_recv`] | `ibv_post_recv`, one SGE |
//! | [`QueuePair::post_send`] | `ibv_post_send` `IBV_WR_SEND` / `IBV_WR_SEND_WITH_INV` |
//! | [`QueuePair::post_rdma_write`] | `ibv_post_send` `IBV_WR_RDMA_WRITE` |
//! | [`QueuePair::post_rdma_read`] | `ibv_post_send` `IBV_WR_RDMA_READ` |
//! | [`QueuePair::poll`] | `ibv_get_cq_event` on the completion channel's fd, `ibv_poll_cq`, `ibv_req_notify_cq` |
//! | [`QueuePair::disconnect`] | `rdma_disconnect` (the QP goes to error, outstanding WRs flush) |
//!
//! # Ownership: who keeps a buffer alive while it is posted
//!
//! Memory handed to the device must neither move nor be freed until the
//! device is done with it. Here that is carried by types, not by comments
//! on every call site:
//!
//! - A [`MemoryRegion`] owns its bytes: they are allocated once, never
//!   move, and are freed only after the registration (the backend's
//!   `ibv_mr`, held in the region) has been dropped. Regions are shared as
//!   `Arc<MemoryRegion>`.
//! - Every work request takes a [`LocalSlice`], which holds a clone of that
//!   `Arc`. The backend keeps the `LocalSlice` (so the region) until it
//!   hands out the work request's [`Completion`] — success, error or flush —
//!   and drops it only then. Dropping the caller's own handles while a WR is
//!   outstanding is therefore safe: the memory lives until the completion.
//! - A backend must produce exactly one completion per posted WR (it posts
//!   everything signaled), including a [`WcStatus::WrFlushErr`] completion
//!   for each WR still outstanding when the QP goes to error or is
//!   disconnected. That is what lets the layer above end every task.
//! - While a WR that may *write* a range (a receive, an RDMA READ's local
//!   side) is outstanding, the caller must not read that range; it learns
//!   the range is stable from the completion. A buffer pool achieves this
//!   by reusing a region only when it holds the last `Arc` to it.
//!
//! # Async model
//!
//! All calls take `&self`: a [`QueuePair`] is `Send + Sync` and is shared
//! (`Arc`) between a task that posts and the task that polls completions.
//! The traits use `impl Future + Send` (like `idm::transport`), so they are
//! generic, not object-safe: iSER code is written once over `V: Verbs` and
//! monomorphised for the emulation in tests and the real backend in
//! production.

use std::future::Future;
use std::net::SocketAddr;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

/// Errors of the verbs and CM calls themselves (not of a work request: those
/// come back as a [`Completion`] with a [`WcStatus`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VerbsError {
    #[error("verbs I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer answered our connect request with a reject
    /// (`RDMA_CM_EVENT_REJECTED`), with its private data if any.
    #[error("connection rejected by the peer")]
    Rejected { private_data: Vec<u8> },
    /// Address or route resolution failed, or nobody listens there.
    #[error("{0} is unreachable")]
    Unreachable(SocketAddr),
    /// The QP is disconnected or in the error state: nothing can be posted;
    /// from [`QueuePair::poll`]: every flushed completion was already given.
    #[error("the queue pair is disconnected")]
    Disconnected,
    /// More work requests than the queue was created for.
    #[error("the {0} queue is full")]
    QueueFull(&'static str),
    /// A [`LocalSlice`] or registration that does not fit its region or the
    /// device's limits.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Anything else the backend reports (errno text, device missing).
    #[error("verbs backend: {0}")]
    Backend(String),
}

/// `ibv_access_flags` that matter to iSER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access(u32);

impl Access {
    /// The local device may write the region (receives, RDMA READ results).
    pub const LOCAL_WRITE: Access = Access(1);
    /// The peer may RDMA WRITE into the region (initiator read buffers).
    pub const REMOTE_WRITE: Access = Access(1 << 1);
    /// The peer may RDMA READ from the region (initiator write buffers).
    pub const REMOTE_READ: Access = Access(1 << 2);

    pub const fn empty() -> Access {
        Access(0)
    }
    pub const fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        self.union(rhs)
    }
}

/// Sizes of a queue pair (`ibv_qp_init_attr.cap`) and of the RDMA READ
/// depth (`rdma_conn_param.initiator_depth` / `responder_resources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpConfig {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    /// RDMA READs this side may have outstanding (initiator_depth).
    pub max_rd_atomic: u32,
    /// RDMA READs this side serves at once for the peer (responder_resources).
    pub max_dest_rd_atomic: u32,
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            max_send_wr: 512,
            max_recv_wr: 256,
            max_rd_atomic: 16,
            max_dest_rd_atomic: 16,
        }
    }
}

/// The bytes behind a [`MemoryRegion`]: one heap allocation that never moves
/// and is never resized. Backends register `as_ptr()..as_ptr()+len()`.
pub struct RegionMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: RegionMemory is a uniquely owned heap allocation (like Box<[u8]>);
// shared access goes through MemoryRegion's copy methods, which are sound
// for concurrent use as documented there.
unsafe impl Send for RegionMemory {}
unsafe impl Sync for RegionMemory {}

impl RegionMemory {
    /// A zeroed allocation of `len` bytes (at least one byte is allocated so
    /// the address is always a real one).
    pub fn zeroed(len: usize) -> RegionMemory {
        let boxed: Box<[u8]> = vec![0u8; len.max(1)].into_boxed_slice();
        let raw = Box::into_raw(boxed) as *mut u8;
        // A Box pointer is never null.
        let ptr = NonNull::new(raw).unwrap_or(NonNull::dangling());
        RegionMemory { ptr, len }
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RegionMemory {
    fn drop(&mut self) {
        let alloc = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len.max(1));
        // SAFETY: ptr/len came from Box::into_raw of a boxed slice of this length.
        drop(unsafe { Box::from_raw(alloc) });
    }
}

/// A registered memory region (`ibv_mr`): its memory, its keys and the
/// backend's registration handle. Dropping it deregisters first, then frees
/// the memory (field order).
pub struct MemoryRegion {
    /// The backend's registration (e.g. sideway's MR); dropped before `mem`.
    _registration: Box<dyn Send + Sync>,
    mem: RegionMemory,
    lkey: u32,
    rkey: u32,
    access: Access,
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.mem.len)
            .field("lkey", &self.lkey)
            .field("rkey", &self.rkey)
            .field("access", &self.access)
            .finish()
    }
}

impl MemoryRegion {
    /// For backends: wraps memory the backend has just registered.
    /// `registration` is whatever must be dropped to deregister it.
    pub fn from_parts(
        mem: RegionMemory,
        lkey: u32,
        rkey: u32,
        access: Access,
        registration: Box<dyn Send + Sync>,
    ) -> MemoryRegion {
        REGIONS_LIVE.fetch_add(1, Ordering::Relaxed);
        REGISTERED_BYTES_LIVE.fetch_add(mem.len as u64, Ordering::Relaxed);
        MemoryRegion {
            _registration: registration,
            mem,
            lkey,
            rkey,
            access,
        }
    }

    /// The virtual address of byte 0 (what the peer puts in RDMA WRITE/READ:
    /// iSER here does not use zero-based virtual addresses).
    pub fn addr(&self) -> u64 {
        self.mem.as_ptr() as u64
    }
    pub fn len(&self) -> usize {
        self.mem.len
    }
    pub fn is_empty(&self) -> bool {
        self.mem.len == 0
    }
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
    pub fn access(&self) -> Access {
        self.access
    }
    /// The registered memory, for a backend (or the emulation's "DMA").
    pub fn memory(&self) -> &RegionMemory {
        &self.mem
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    /// `None` when the range does not fit. Only meaningful when no WR that
    /// writes this range is outstanding (see the module's ownership rules).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Option<()> {
        let end = offset.checked_add(dst.len())?;
        if end > self.mem.len {
            return None;
        }
        // SAFETY: the range is inside the allocation; copies are bytewise and
        // the allocation lives as long as &self.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.mem.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Some(())
    }

    /// Copies `src` into the region at `offset`. `None` when it does not fit.
    /// Only meaningful when no WR that reads or writes this range is outstanding.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Option<()> {
        let end = offset.checked_add(src.len())?;
        if end > self.mem.len {
            return None;
        }
        // SAFETY: as in read_at.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.mem.as_ptr().add(offset), src.len())
        };
        Some(())
    }

    /// A zero-copy view of `offset..offset+len` as [`Bytes`]; the view holds
    /// the region, so a pool cannot repost it while the view lives.
    pub fn bytes(self: &Arc<Self>, offset: usize, len: usize) -> Option<Bytes> {
        let end = offset.checked_add(len)?;
        if end > self.mem.len {
            return None;
        }
        Some(Bytes::from_owner(RegionView {
            region: Arc::clone(self),
            offset,
            len,
        }))
    }
}

// The gauge is kept by the region itself (made in `from_parts`, the only
// constructor; unmade in Drop) so no caller can forget to count, and a
// leak anywhere above shows up as a gauge that does not come back down.
static REGIONS_LIVE: AtomicU64 = AtomicU64::new(0);
static REGISTERED_BYTES_LIVE: AtomicU64 = AtomicU64::new(0);

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        REGIONS_LIVE.fetch_sub(1, Ordering::Relaxed);
        REGISTERED_BYTES_LIVE.fetch_sub(self.mem.len as u64, Ordering::Relaxed);
    }
}

/// Registered memory alive in this process, over every backend and
/// connection: what [`registered_memory`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegisteredMemory {
    /// Live [`MemoryRegion`]s.
    pub regions: u64,
    /// Their total length in bytes.
    pub bytes: u64,
}

/// The process-wide gauge of live [`MemoryRegion`]s: once every connection
/// is gone and every posted WR has completed, it is back at its idle value.
pub fn registered_memory() -> RegisteredMemory {
    RegisteredMemory {
        regions: REGIONS_LIVE.load(Ordering::Relaxed),
        bytes: REGISTERED_BYTES_LIVE.load(Ordering::Relaxed),
    }
}

struct RegionView {
    region: Arc<MemoryRegion>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for RegionView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range was checked against the allocation when the view
        // was made; the view holds the region alive; by the ownership rules no
        // WR writes into a region while anyone but the pool holds it.
        unsafe { std::slice::from_raw_parts(self.region.mem.as_ptr().add(self.offset), self.len) }
    }
}

/// A local scatter/gather element (`ibv_sge`) that also keeps its region
/// alive: the backend holds it until the WR's completion.
#[derive(Debug, Clone)]
pub struct LocalSlice {
    region: Arc<MemoryRegion>,
    offset: usize,
    len: u32,
}

impl LocalSlice {
    /// `None` when `offset..offset+len` does not fit in the region.
    pub fn new(region: Arc<MemoryRegion>, offset: usize, len: u32) -> Option<LocalSlice> {
        let end = offset.checked_add(len as usize)?;
        (end <= region.len()).then_some(LocalSlice {
            region,
            offset,
            len,
        })
    }
    /// The whole region.
    pub fn whole(region: Arc<MemoryRegion>) -> Option<LocalSlice> {
        let len = u32::try_from(region.len()).ok()?;
        Some(LocalSlice {
            region,
            offset: 0,
            len,
        })
    }
    pub fn region(&self) -> &Arc<MemoryRegion> {
        &self.region
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// `ibv_sge.addr`.
    pub fn addr(&self) -> u64 {
        self.region.addr().wrapping_add(self.offset as u64)
    }
    /// `ibv_sge.lkey`.
    pub fn lkey(&self) -> u32 {
        self.region.lkey()
    }
}

/// The peer's memory named by an RDMA operation: (remote va, rkey). The
/// length is the local slice's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr {
    pub addr: u64,
    pub rkey: u32,
}

/// `enum ibv_wc_status`, the values iSER acts on; the rest are `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WcStatus {
    Success,
    /// A receive buffer too small for the SEND, or a local length error.
    LocalLengthErr,
    /// Local protection: an lkey or access right that does not fit.
    LocalProtErr,
    /// The QP went to error (disconnect or an earlier error) before this
    /// WR ran: the WR did nothing.
    WrFlushErr,
    /// The peer refused an RDMA access: bad rkey, out of range, or
    /// missing access right (`IBV_WC_REM_ACCESS_ERR`).
    RemoteAccessErr,
    /// The peer's QP rejected the request (`IBV_WC_REM_INV_REQ_ERR`).
    RemoteInvalidRequestErr,
    /// A SEND found no posted receive at the peer, after retries
    /// (`IBV_WC_RNR_RETRY_EXC_ERR`).
    RnrRetryExceeded,
    /// Transport retries exhausted: the peer is gone (`IBV_WC_RETRY_EXC_ERR`).
    RetryExceeded,
    /// Any other `ibv_wc_status` value.
    Other(u32),
}

/// What a completed WR was (`enum ibv_wc_opcode`). On error completions the
/// hardware's opcode is undefined, so backends report the opcode the WR was
/// posted with (they know it from the wr_id they kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
}

/// One work completion (`struct ibv_wc`, the fields iSER uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred (RDMA READ); 0 otherwise.
    pub byte_len: u32,
    /// A receive of SEND-with-Invalidate: the local rkey the peer invalidated
    /// (`IBV_WC_WITH_INV`, `wc.invalidated_rkey`).
    pub invalidated_rkey: Option<u32>,
}

impl Completion {
    pub fn is_ok(&self) -> bool {
        self.status == WcStatus::Success
    }
}

/// The device/protection-domain side plus the active half of the
/// connection manager.
pub trait Verbs: Send + Sync + 'static {
    type Qp: QueuePair;
    type Listener: Listener<Qp = Self::Qp>;

    /// Binds and listens (`rdma_bind_addr` + `rdma_listen`). Port 0 picks one.
    fn listen(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<Self::Listener, VerbsError>> + Send;

    /// Resolves the address and route, creates the QP, runs `prepare` on it
    /// (register memory, post the first receives) and connects, sending
    /// `private_data` in the CM REQ (iSER: the 4-byte `iser_cm_hdr`).
    /// Returns the established QP and the private data of the peer's accept.
    fn connect<F>(
        &self,
        addr: SocketAddr,
        config: QpConfig,
        private_data: &[u8],
        prepare: F,
    ) -> impl Future<Output = Result<(Self::Qp, Vec<u8>), VerbsError>> + Send
    where
        F: FnOnce(&Self::Qp) -> Result<(), VerbsError> + Send;
}

/// A listening CM id.
pub trait Listener: Send + 'static {
    type Qp: QueuePair;
    type Request: ConnectRequest<Qp = Self::Qp>;

    fn local_addr(&self) -> SocketAddr;
    /// The next incoming connect request (`RDMA_CM_EVENT_CONNECT_REQUEST`).
    fn next_request(&mut self) -> impl Future<Output = Result<Self::Request, VerbsError>> + Send;
}

/// An incoming connect request, not yet accepted.
pub trait ConnectRequest: Send + 'static {
    type Qp: QueuePair;

    fn peer_addr(&self) -> SocketAddr;
    /// The private data of the CM REQ (iSER: `iser_cm_hdr`, may be absent or
    /// longer: read it with a length check).
    fn private_data(&self) -> &[u8];
    /// Creates the QP (`rdma_create_qp`), runs `prepare` on it — register
    /// memory and post the first receives, so the peer's first SEND finds one
    /// — then accepts (`rdma_accept`) with `private_data` in the REP.
    fn accept<F>(
        self,
        config: QpConfig,
        private_data: &[u8],
        prepare: F,
    ) -> impl Future<Output = Result<Self::Qp, VerbsError>> + Send
    where
        F: FnOnce(&Self::Qp) -> Result<(), VerbsError> + Send;
    /// Refuses (`rdma_reject`) with `private_data`.
    fn reject(self, private_data: &[u8]) -> impl Future<Output = ()> + Send;
}

/// A connected RC queue pair with its completion queue (one CQ for sends and
/// receives) and its protection domain's registration.
pub trait QueuePair: Send + Sync + 'static {
    fn local_addr(&self) -> SocketAddr;
    fn peer_addr(&self) -> SocketAddr;

    /// Allocates `len` bytes and registers them (`ibv_reg_mr`) with `access`
    /// (LOCAL_WRITE is implied for receives and RDMA READ targets only if
    /// asked for: pass it). Registration is slow on real hardware: callers
    /// pool regions per connection.
    fn register(&self, len: usize, access: Access) -> Result<Arc<MemoryRegion>, VerbsError>;

    /// Posts a receive into `buf` (needs LOCAL_WRITE). A SEND from the peer
    /// consumes one posted receive, in posting order.
    fn post_recv(&self, wr_id: u64, buf: LocalSlice) -> Result<(), VerbsError>;

    /// Posts a SEND of `buf`'s bytes. With `invalidate = Some(rkey)` it is a
    /// SEND with Invalidate of the peer's `rkey` (only when both sides said
    /// they support it in the CM private data).
    fn post_send(
        &self,
        wr_id: u64,
        buf: LocalSlice,
        invalidate: Option<u32>,
    ) -> Result<(), VerbsError>;

    /// Posts an RDMA WRITE of `local` to the peer's `remote` (which needs
    /// REMOTE_WRITE there). Ordered with later SENDs on this QP, so a SCSI
    /// Response sent after it arrives after the data.
    fn post_rdma_write(
        &self,
        wr_id: u64,
        local: LocalSlice,
        remote: RemoteAddr,
    ) -> Result<(), VerbsError>;

    /// Posts an RDMA READ of `local.len()` bytes from the peer's `remote`
    /// (REMOTE_READ there) into `local` (LOCAL_WRITE here).
    fn post_rdma_read(
        &self,
        wr_id: u64,
        local: LocalSlice,
        remote: RemoteAddr,
    ) -> Result<(), VerbsError>;

    /// Waits for at least one completion and appends up to `max` of them to
    /// `out`, returning how many. After a disconnect it keeps returning the
    /// flushed completions, then `Err(VerbsError::Disconnected)` once none
    /// is outstanding.
    fn poll(
        &self,
        out: &mut Vec<Completion>,
        max: usize,
    ) -> impl Future<Output = Result<usize, VerbsError>> + Send;

    /// Disconnects (`rdma_disconnect`): both QPs go to error and every
    /// outstanding WR on both sides completes with [`WcStatus::WrFlushErr`].
    /// Idempotent.
    fn disconnect(&self);

    /// Whether the QP is still connected (not in error, not disconnected).
    fn is_connected(&self) -> bool;
}
