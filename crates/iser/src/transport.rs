//! The iSER transport: `idm`'s [`Transport`] over any [`QueuePair`].
//!
//! Control PDUs travel in SENDs, each behind an iSER header; data moves by
//! RDMA as `idm::transport`'s table says (Data-In → RDMA WRITE + SCSI
//! Response, R2T → RDMA READ whose completion comes up as a Data-Out, the
//! initiator's command buffers advertised with STags). Digests are never
//! used (RFC 7145 §6.4).
//!
//! One task per connection polls the completion queue (the "driver"); the
//! two halves post work requests directly. The halves are not generic: the
//! queue pair is reached through an object-safe view of its synchronous
//! posting calls, and only the driver is monomorphised — so the target and
//! the initiator name one `IserRx` / `IserTx` type whatever the backend.
//!
//! Receive credit: each side keeps `recv_depth` receives posted and reposts
//! one as soon as its completion is read, before the PDU is handed up; the
//! depth is above the command window plus the unexpected PDUs either side
//! may send, so a well-behaved peer never meets an empty receive queue.
//!
//! Registered memory comes from per-connection pools and is reused only
//! when the pool holds the last reference, so nothing the device or IDM may
//! still touch is ever handed out twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use idm::transport::{PduRx, PduTx, Role, Transport, TransportError, TransportInfo};
use iscsi_proto::codec::DecodeError;
use iscsi_proto::negotiation::NegotiatedParams;
use iscsi_proto::pdu::{self, DataIn, DataOut, Header, Pdu, RawPdu, ScsiResponse, BHS_LEN};
use tokio::sync::{mpsc, Semaphore};

use crate::header::{CmHeader, IserHeader, Tagged, ISER_HEADER_LEN};
use crate::verbs::{
    Access, Completion, ConnectRequest, LocalSlice, MemoryRegion, QpConfig, QueuePair, RemoteAddr,
    Verbs, VerbsError, WcOpcode, WcStatus,
};

/// Room for AHS in a control PDU (extended CDBs, bidirectional length).
const AHS_ROOM: usize = 1024;
/// Registered regions a pool keeps for reuse.
const POOL_KEEP: usize = 256;
/// Tasks with advertised buffers one connection may have: far above any
/// CmdSN window, so only a peer that floods us with commands meets it.
const MAX_ADVERTISED: usize = 16_384;
/// Receive WR ids carry this bit; the low bits index the receive ring.
const RECV_BIT: u64 = 1 << 63;

/// Sizes of one iSER connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IserConfig {
    /// Receives kept posted.
    pub recv_depth: u32,
    /// Work requests in flight on the send queue.
    pub send_depth: u32,
    /// Largest data segment in a control PDU either way (login's 8 KiB or the
    /// iSER RecvDataSegmentLength keys, whichever is larger).
    pub max_data_segment: u32,
}

impl Default for IserConfig {
    fn default() -> Self {
        IserConfig {
            recv_depth: 512,
            send_depth: 1024,
            max_data_segment: 8192,
        }
    }
}

impl IserConfig {
    fn buf_len(&self) -> usize {
        ISER_HEADER_LEN + BHS_LEN + AHS_ROOM + self.max_data_segment as usize + 4
    }
    fn qp_config(&self) -> QpConfig {
        QpConfig {
            max_send_wr: self.send_depth,
            max_recv_wr: self.recv_depth,
            ..QpConfig::default()
        }
    }
}

/// The posting side of a queue pair, object-safe.
trait PostQp: Send + Sync {
    fn register(&self, len: usize, access: Access) -> Result<Arc<MemoryRegion>, VerbsError>;
    fn post_recv(&self, wr_id: u64, buf: LocalSlice) -> Result<(), VerbsError>;
    fn post_send(&self, wr_id: u64, buf: LocalSlice, inv: Option<u32>) -> Result<(), VerbsError>;
    fn post_rdma_write(&self, wr_id: u64, l: LocalSlice, r: RemoteAddr) -> Result<(), VerbsError>;
    fn post_rdma_read(&self, wr_id: u64, l: LocalSlice, r: RemoteAddr) -> Result<(), VerbsError>;
    fn disconnect(&self);
}

impl<Q: QueuePair> PostQp for Q {
    fn register(&self, len: usize, access: Access) -> Result<Arc<MemoryRegion>, VerbsError> {
        QueuePair::register(self, len, access)
    }
    fn post_recv(&self, wr_id: u64, buf: LocalSlice) -> Result<(), VerbsError> {
        QueuePair::post_recv(self, wr_id, buf)
    }
    fn post_send(&self, wr_id: u64, buf: LocalSlice, inv: Option<u32>) -> Result<(), VerbsError> {
        QueuePair::post_send(self, wr_id, buf, inv)
    }
    fn post_rdma_write(&self, wr_id: u64, l: LocalSlice, r: RemoteAddr) -> Result<(), VerbsError> {
        QueuePair::post_rdma_write(self, wr_id, l, r)
    }
    fn post_rdma_read(&self, wr_id: u64, l: LocalSlice, r: RemoteAddr) -> Result<(), VerbsError> {
        QueuePair::post_rdma_read(self, wr_id, l, r)
    }
    fn disconnect(&self) {
        QueuePair::disconnect(self)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registered regions of one connection, reused when nobody else holds them.
#[derive(Default)]
struct Pool {
    regions: Mutex<Vec<Arc<MemoryRegion>>>,
}

impl Pool {
    fn get(
        &self,
        qp: &dyn PostQp,
        len: usize,
        access: Access,
    ) -> Result<Arc<MemoryRegion>, VerbsError> {
        let mut regions = lock(&self.regions);
        if let Some(r) = regions.iter().find(|r| {
            Arc::strong_count(r) == 1
                && r.access() == access
                && r.len() >= len
                && r.len() / 4 <= len
        }) {
            return Ok(Arc::clone(r));
        }
        let size = len.max(4096).next_power_of_two();
        let r = qp.register(size, access)?;
        if regions.len() >= POOL_KEEP {
            // Forget one that is idle, so the pool follows the workload.
            if let Some(i) = regions.iter().position(|r| Arc::strong_count(r) == 1) {
                regions.swap_remove(i);
            }
        }
        if regions.len() < POOL_KEEP {
            regions.push(Arc::clone(&r));
        }
        Ok(r)
    }

    /// Never hands `region` out again: it is deregistered when the last
    /// holder lets go, so a late RDMA access through its rkey fails with a
    /// remote access error instead of landing in another task's data.
    fn retire(&self, region: &Arc<MemoryRegion>) {
        lock(&self.regions).retain(|r| !Arc::ptr_eq(r, region));
    }

    fn live(&self) -> usize {
        lock(&self.regions)
            .iter()
            .filter(|r| Arc::strong_count(r) > 1)
            .count()
    }
}

/// What one side remembers per task (by ITT) between the command and its
/// response.
#[derive(Default)]
struct Tasks {
    /// Target: the buffers the initiator advertised (write, read), and the
    /// buffer offset the write VA stands for (see [`Advertised`]).
    advertised: HashMap<u32, Advertised>,
    /// Initiator: where the target RDMA-writes read data, and its length.
    read_bufs: HashMap<u32, (Arc<MemoryRegion>, u32)>,
    /// Initiator: staged write data (kept until the response) and where its
    /// unsolicited part ends.
    write_bufs: HashMap<u32, (Arc<MemoryRegion>, u32)>,
    /// Target: RDMA READs in flight, by wr_id.
    reads: HashMap<u64, PendingRead>,
}

/// What a SCSI Command's iSER header advertised.
///
/// The read VA is buffer offset 0. The write VA is the first byte the
/// target must fetch, i.e. buffer offset "unsolicited data length" (Linux's
/// ib_iser advertises `addr + unsol_sz` and LIO's isert reads from it at
/// `write_data_done`), so the offset it stands for is learnt from the first
/// R2T of the task, which IDM issues from the end of the unsolicited data.
#[derive(Debug, Clone, Copy)]
struct Advertised {
    write: Option<Tagged>,
    read: Option<Tagged>,
    write_base: Option<u32>,
}

struct PendingRead {
    lun: u64,
    itt: u32,
    ttt: u32,
    offset: u32,
    buf: Arc<MemoryRegion>,
    len: u32,
}

struct Shared {
    qp: Arc<dyn PostQp>,
    role: Role,
    cfg: IserConfig,
    send_pool: Pool,
    data_pool: Pool,
    tasks: Mutex<Tasks>,
    send_credits: Semaphore,
    next_wr: AtomicU64,
    max_recv: std::sync::atomic::AtomicU32,
    /// Full feature phase: data PDUs are realised by RDMA (before it, during
    /// login, everything is a plain SEND).
    datamover: std::sync::atomic::AtomicBool,
    info: TransportInfo,
    cm: CmHeader,
    /// Target: SCSI Responses sent as SEND with Invalidate (for the log).
    invalidating_sends: AtomicU64,
}

impl Shared {
    fn wr_id(&self) -> u64 {
        self.next_wr.fetch_add(1, Ordering::Relaxed) & !RECV_BIT
    }
}

/// One iSER connection, before it is split.
pub struct IserTransport {
    rx: IserRx,
    tx: IserTx,
}

impl std::fmt::Debug for IserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IserTransport")
            .field("info", &self.tx.shared.info)
            .finish_non_exhaustive()
    }
}

/// Prepares a fresh QP: registers the receive ring and posts all of it.
fn post_ring<Q: QueuePair>(qp: &Q, cfg: &IserConfig) -> Result<Arc<MemoryRegion>, VerbsError> {
    let len = cfg.buf_len();
    let total = len
        .checked_mul(cfg.recv_depth as usize)
        .ok_or(VerbsError::Invalid("receive ring too large"))?;
    let ring = qp.register(total, Access::LOCAL_WRITE)?;
    for i in 0..cfg.recv_depth as usize {
        let slice = LocalSlice::new(Arc::clone(&ring), i * len, len as u32)
            .ok_or(VerbsError::Invalid("receive ring slice"))?;
        qp.post_recv(RECV_BIT | i as u64, slice)?;
    }
    Ok(ring)
}

impl IserTransport {
    /// Initiator: connects to an iSER portal with our CM private data.
    pub async fn connect<V: Verbs>(
        verbs: &V,
        addr: SocketAddr,
        cfg: IserConfig,
    ) -> Result<IserTransport, VerbsError> {
        let mut ring = None;
        let (qp, rep) = verbs
            .connect(addr, cfg.qp_config(), &CmHeader::INITIATOR.encode(), |qp| {
                ring = Some(post_ring(qp, &cfg)?);
                Ok(())
            })
            .await?;
        let ring = ring.ok_or(VerbsError::Invalid("no receive ring"))?;
        let cm = CmHeader::INITIATOR.agree(CmHeader::decode(&rep));
        Ok(Self::start(qp, ring, cfg, Role::Initiator, cm))
    }

    /// Target: accepts a connect request with our CM private data.
    pub async fn accept<R: ConnectRequest>(
        req: R,
        cfg: IserConfig,
    ) -> Result<IserTransport, VerbsError> {
        let cm = CmHeader::target_agreement(req.private_data());
        tracing::info!(
            peer = %req.peer_addr(),
            send_with_invalidate = cm.send_with_invalidate,
            "iSER connect request: Send with Invalidate {}",
            if cm.send_with_invalidate { "in use" } else { "not in use" }
        );
        let mut ring = None;
        // The REP carries what we use, so the initiator knows whether to
        // expect remote invalidations.
        let qp = req
            .accept(cfg.qp_config(), &cm.encode(), |qp| {
                ring = Some(post_ring(qp, &cfg)?);
                Ok(())
            })
            .await?;
        let ring = ring.ok_or(VerbsError::Invalid("no receive ring"))?;
        Ok(Self::start(qp, ring, cfg, Role::Target, cm))
    }

    fn start<Q: QueuePair>(
        qp: Q,
        ring: Arc<MemoryRegion>,
        cfg: IserConfig,
        role: Role,
        cm: CmHeader,
    ) -> IserTransport {
        let info = TransportInfo {
            kind: "iser",
            local_addr: qp.local_addr().to_string(),
            peer_addr: qp.peer_addr().to_string(),
        };
        let qp = Arc::new(qp);
        let shared = Arc::new(Shared {
            qp: Arc::clone(&qp) as Arc<dyn PostQp>,
            role,
            cfg,
            send_pool: Pool::default(),
            data_pool: Pool::default(),
            tasks: Mutex::new(Tasks::default()),
            send_credits: Semaphore::new(cfg.send_depth as usize),
            next_wr: AtomicU64::new(1),
            max_recv: std::sync::atomic::AtomicU32::new(cfg.max_data_segment),
            datamover: std::sync::atomic::AtomicBool::new(false),
            info,
            cm,
            invalidating_sends: AtomicU64::new(0),
        });
        let (up, down) = mpsc::unbounded_channel();
        tokio::spawn(drive(qp, Arc::clone(&shared), ring, up));
        IserTransport {
            rx: IserRx {
                down,
                shared: Arc::clone(&shared),
            },
            tx: IserTx { shared },
        }
    }

    /// What the two sides agreed in the CM private data.
    pub fn cm(&self) -> CmHeader {
        self.tx.shared.cm
    }
}

impl Transport for IserTransport {
    type Rx = IserRx;
    type Tx = IserTx;

    fn info(&self) -> TransportInfo {
        self.tx.shared.info.clone()
    }

    fn into_split(self) -> (IserRx, IserTx) {
        (self.rx, self.tx)
    }
}

/// The completion-queue task of one connection: hands received PDUs (and
/// RDMA READ results as Data-Out) up, reposts receives, returns send credits.
/// Ends when the QP reports it is disconnected and flushed; dropping `up`
/// then tells the receive half.
async fn drive<Q: QueuePair>(
    qp: Arc<Q>,
    shared: Arc<Shared>,
    ring: Arc<MemoryRegion>,
    up: mpsc::UnboundedSender<Result<RawPdu, TransportError>>,
) {
    let mut wcs: Vec<Completion> = Vec::with_capacity(64);
    let mut failed = false;
    loop {
        wcs.clear();
        if qp.poll(&mut wcs, 64).await.is_err() {
            break;
        }
        for wc in wcs.drain(..) {
            if wc.opcode != WcOpcode::Recv {
                shared.send_credits.add_permits(1);
            }
            if wc.status != WcStatus::Success {
                if wc.status != WcStatus::WrFlushErr && !failed {
                    tracing::info!(status = ?wc.status, opcode = ?wc.opcode, "iSER work request failed: disconnecting");
                    failed = true;
                }
                if wc.opcode == WcOpcode::RdmaRead {
                    lock(&shared.tasks).reads.remove(&wc.wr_id);
                }
                qp.disconnect();
                continue;
            }
            match wc.opcode {
                WcOpcode::Recv => match received(&shared, &ring, &wc) {
                    Ok(pdus) => {
                        for p in pdus {
                            let _ = up.send(Ok(p));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(len = wc.byte_len, error = %e, "unusable iSER receive");
                        let _ = up.send(Err(e));
                    }
                },
                WcOpcode::RdmaRead => {
                    if let Some(pdu) = read_done(&shared, wc.wr_id) {
                        let _ = up.send(Ok(pdu));
                    }
                }
                WcOpcode::Send | WcOpcode::RdmaWrite => {}
            }
        }
    }
    if shared.cm.send_with_invalidate {
        tracing::debug!(
            peer = %shared.info.peer_addr,
            sends = shared.invalidating_sends.load(Ordering::Relaxed),
            "iSER connection closed: SCSI Responses sent with invalidate"
        );
    }
    // Whatever was still tracked is released with the connection.
    *lock(&shared.tasks) = Tasks::default();
    shared.send_credits.close();
    drop(ring);
}

/// One SEND from the peer: copies it out of the ring, reposts the receive,
/// and turns it into the PDUs to hand up.
fn received(
    shared: &Shared,
    ring: &Arc<MemoryRegion>,
    wc: &Completion,
) -> Result<Vec<RawPdu>, TransportError> {
    let slot = usize::try_from(wc.wr_id & !RECV_BIT).unwrap_or(usize::MAX);
    let len = shared.cfg.buf_len();
    let offset = slot.checked_mul(len).ok_or(TransportError::TruncatedPdu)?;
    let n = (wc.byte_len as usize).min(len);
    let mut msg = vec![0u8; n];
    ring.read_at(offset, &mut msg)
        .ok_or(TransportError::TruncatedPdu)?;
    if let Some(slice) = LocalSlice::new(Arc::clone(ring), offset, len as u32) {
        if let Err(e) = shared.qp.post_recv(wc.wr_id, slice) {
            tracing::debug!(error = %e, "could not repost a receive");
        }
    }
    let iser = IserHeader::decode(&msg).map_err(|_| TransportError::TruncatedPdu)?;
    let IserHeader::Control { write, read } = iser else {
        // Hello exchanges are for iWARP; an InfiniBand/RoCE peer never sends them.
        return Ok(Vec::new());
    };
    let msg = Bytes::from(msg);
    let bhs: [u8; BHS_LEN] = msg
        .get(ISER_HEADER_LEN..ISER_HEADER_LEN + BHS_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(TransportError::TruncatedPdu)?;
    if let Some(rkey) = wc.invalidated_rkey {
        remotely_invalidated(shared, rkey, pdu::itt(&bhs))?;
    }
    let ahs_len = pdu::total_ahs_length(&bhs);
    let data_len = pdu::data_segment_length(&bhs);
    let max = shared.max_recv.load(Ordering::Relaxed);
    if data_len > max {
        return Err(TransportError::Decode(DecodeError::DataSegmentTooLong {
            len: data_len,
            max,
            bhs: Box::new(bhs),
        }));
    }
    let ahs_at = ISER_HEADER_LEN + BHS_LEN;
    let data_at = ahs_at + ahs_len;
    let end = data_at + data_len as usize;
    if end > msg.len() {
        return Err(TransportError::TruncatedPdu);
    }
    let raw = RawPdu {
        bhs,
        ahs: msg.slice(ahs_at..data_at),
        data: msg.slice(data_at..end),
    };
    let opcode = raw.opcode_byte();
    let mut out = Vec::with_capacity(2);
    match shared.role {
        Role::Target if opcode == 0x01 && (write.is_some() || read.is_some()) => {
            let mut tasks = lock(&shared.tasks);
            if tasks.advertised.len() >= MAX_ADVERTISED
                && !tasks.advertised.contains_key(&raw.itt())
            {
                tracing::info!("too many tasks with advertised buffers: closing");
                return Err(TransportError::TruncatedPdu);
            }
            tasks.advertised.insert(
                raw.itt(),
                Advertised {
                    write,
                    read,
                    write_base: None,
                },
            );
        }
        Role::Initiator if opcode == 0x21 => {
            if let Some(data_in) = landed_data(shared, &raw) {
                out.push(data_in);
            }
        }
        _ => {}
    }
    out.push(raw);
    Ok(out)
}

/// A SEND with Invalidate came in. Only a target may send one, only when
/// the initiator's CM REQ allowed it, and only for a key of that task's
/// buffers; anything else breaks the agreement and ends the connection (as
/// Linux's ib_iser does: "unexpected remote invalidation"). Our initiator
/// never allows it, so in practice this always refuses; were it allowed, the
/// revoked buffer is retired from the pool, since its key no longer works.
fn remotely_invalidated(shared: &Shared, rkey: u32, itt: u32) -> Result<(), TransportError> {
    let refuse = |why: &'static str| {
        tracing::info!(
            rkey,
            itt,
            why,
            "unexpected remote invalidation: disconnecting"
        );
        shared.qp.disconnect();
        Err(TransportError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected remote invalidation of rkey {rkey:#x}: {why}"),
        )))
    };
    if shared.role != Role::Initiator || !shared.cm.send_with_invalidate {
        return refuse("Send with Invalidate was not agreed");
    }
    let tasks = lock(&shared.tasks);
    let region = [tasks.read_bufs.get(&itt), tasks.write_bufs.get(&itt)]
        .into_iter()
        .flatten()
        .map(|(r, _)| r)
        .find(|r| r.rkey() == rkey)
        .cloned();
    drop(tasks);
    match region {
        Some(r) => {
            shared.data_pool.retire(&r);
            Ok(())
        }
        None => refuse("not a key of that task's buffers"),
    }
}

/// Initiator: the read data the target RDMA-wrote, as the one Data-In PDU
/// IDM expects before the SCSI Response.
fn landed_data(shared: &Shared, response: &RawPdu) -> Option<RawPdu> {
    let itt = response.itt();
    let (buf, len) = {
        let mut tasks = lock(&shared.tasks);
        tasks.write_bufs.remove(&itt);
        tasks.read_bufs.remove(&itt)?
    };
    let Ok(Header::ScsiResponse(h)) = Header::parse(&response.bhs, &response.ahs) else {
        return None;
    };
    let moved = if h.underflow {
        len.saturating_sub(h.residual_count)
    } else {
        len
    };
    if moved == 0 {
        return None;
    }
    let data = buf.bytes(0, moved as usize)?;
    let header = Header::DataIn(DataIn {
        final_: true,
        itt,
        ttt: pdu::RESERVED_TAG,
        ..Default::default()
    });
    Some(raw_of(header, data))
}

/// Target: an RDMA READ finished; its data comes up as the Data-Out that
/// answers the R2T it stood for.
fn read_done(shared: &Shared, wr_id: u64) -> Option<RawPdu> {
    let r = lock(&shared.tasks).reads.remove(&wr_id)?;
    let data = r.buf.bytes(0, r.len as usize)?;
    let header = Header::DataOut(DataOut {
        final_: true,
        lun: r.lun,
        itt: r.itt,
        ttt: r.ttt,
        exp_stat_sn: 0,
        data_sn: 0,
        buffer_offset: r.offset,
    });
    Some(raw_of(header, data))
}

fn raw_of(header: Header, data: Bytes) -> RawPdu {
    let mut bhs = [0u8; BHS_LEN];
    header.write_bhs(&mut bhs);
    let dlen = u32::try_from(data.len()).unwrap_or(0);
    if let Some(dst) = bhs.get_mut(5..8) {
        dst.copy_from_slice(&dlen.to_be_bytes()[1..4]);
    }
    RawPdu {
        bhs,
        ahs: Bytes::new(),
        data,
    }
}

/// The receive half.
pub struct IserRx {
    down: mpsc::UnboundedReceiver<Result<RawPdu, TransportError>>,
    shared: Arc<Shared>,
}

impl PduRx for IserRx {
    async fn recv(&mut self) -> Result<Option<RawPdu>, TransportError> {
        match self.down.recv().await {
            Some(r) => r.map(Some),
            None => Ok(None),
        }
    }

    fn set_digests(&mut self, header: bool, data: bool) {
        if header || data {
            tracing::warn!("digests asked for on iSER: ignored (RFC 7145 §6.4)");
        }
    }

    fn set_max_recv_data_segment_length(&mut self, len: u32) {
        let cap = self.shared.cfg.max_data_segment;
        self.shared.max_recv.store(len.min(cap), Ordering::Relaxed);
    }
}

/// The send half.
pub struct IserTx {
    shared: Arc<Shared>,
}

fn io_err(e: VerbsError) -> TransportError {
    TransportError::Io(std::io::Error::other(e.to_string()))
}

impl IserTx {
    /// Registered regions in use (by the device or by IDM), for inspection
    /// and leak checks.
    pub fn regions_in_use(&self) -> usize {
        self.shared.send_pool.live() + self.shared.data_pool.live()
    }

    /// An ITT reused while its old buffer was still advertised (the task
    /// timed out or was aborted without a response): the target may yet
    /// RDMA into the old buffer, so it must never serve another task.
    fn retire_stale(&self, stale: Option<(Arc<MemoryRegion>, u32)>) {
        if let Some((old, _)) = stale {
            tracing::debug!(
                rkey = old.rkey(),
                "retiring a buffer of a task that got no response"
            );
            self.shared.data_pool.retire(&old);
        }
    }

    async fn credit(&self) -> Result<(), TransportError> {
        self.shared
            .send_credits
            .acquire()
            .await
            .map_err(|_| TransportError::Io(std::io::ErrorKind::NotConnected.into()))?
            .forget();
        Ok(())
    }

    /// SENDs one control PDU behind `iser`.
    async fn send_control(&self, iser: IserHeader, pdu: &Pdu) -> Result<(), TransportError> {
        self.send_control_inv(iser, pdu, None).await
    }

    /// Target: the SCSI Response of task `itt` (sent next), which ends what
    /// its command advertised. With Send with Invalidate agreed, the SEND
    /// invalidates the initiator's STag: the read one if given, else the
    /// write one — one key, as Linux isert does (a bidirectional task's
    /// write buffer is the initiator's to invalidate).
    ///
    /// A response that overtakes an RDMA READ of its own task (the task
    /// ended early) goes plain: the read must not meet a revoked key.
    fn response_ends_task(&self, itt: u32) -> Option<u32> {
        let mut tasks = lock(&self.shared.tasks);
        let adv = tasks.advertised.remove(&itt)?;
        if !self.shared.cm.send_with_invalidate {
            return None;
        }
        if tasks.reads.values().any(|r| r.itt == itt) {
            tracing::debug!(
                itt,
                "response while an RDMA READ is in flight: no invalidate"
            );
            return None;
        }
        adv.read.or(adv.write).map(|t| t.stag)
    }

    /// SENDs one control PDU behind `iser`, as a SEND with Invalidate of
    /// the peer's `invalidate` key if given.
    async fn send_control_inv(
        &self,
        iser: IserHeader,
        pdu: &Pdu,
        invalidate: Option<u32>,
    ) -> Result<(), TransportError> {
        let s = &self.shared;
        let mut msg = BytesMut::with_capacity(ISER_HEADER_LEN + BHS_LEN + pdu.data.len() + 4);
        msg.put_slice(&iser.encode());
        pdu.encode_header(false, &mut msg);
        if !pdu.data.is_empty() {
            msg.put_slice(&pdu.data);
            let (trailer, n) = pdu.encode_trailer(false);
            msg.put_slice(trailer.get(..n).unwrap_or(&[]));
        }
        let buf = s
            .send_pool
            .get(s.qp.as_ref(), msg.len(), Access::LOCAL_WRITE)
            .map_err(io_err)?;
        buf.write_at(0, &msg).ok_or(TransportError::TruncatedPdu)?;
        let slice =
            LocalSlice::new(buf, 0, msg.len() as u32).ok_or(TransportError::TruncatedPdu)?;
        self.credit().await?;
        s.qp.post_send(s.wr_id(), slice, invalidate)
            .map_err(io_err)?;
        if invalidate.is_some() {
            s.invalidating_sends.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Target "put data": a run of Data-In PDUs of one task becomes one RDMA
    /// WRITE, and status (if the last carries it) a SCSI Response SEND.
    async fn put_data(&self, run: &[Pdu]) -> Result<(), TransportError> {
        let s = &self.shared;
        let Some((Header::DataIn(first), Some(Header::DataIn(last)))) = run
            .first()
            .map(|p| (&p.header, run.last().map(|l| &l.header)))
        else {
            return Ok(());
        };
        let total: usize = run.iter().map(|p| p.data.len()).sum();
        if total > 0 {
            let read = lock(&s.tasks)
                .advertised
                .get(&first.itt)
                .and_then(|a| a.read);
            let Some(tag) = read else {
                tracing::info!(itt = first.itt, "Data-In for a task without a read STag");
                return Err(TransportError::Io(std::io::ErrorKind::InvalidData.into()));
            };
            let buf = s
                .data_pool
                .get(s.qp.as_ref(), total, Access::LOCAL_WRITE)
                .map_err(io_err)?;
            let mut at = 0;
            for p in run {
                buf.write_at(at, &p.data)
                    .ok_or(TransportError::TruncatedPdu)?;
                at += p.data.len();
            }
            let slice =
                LocalSlice::new(buf, 0, total as u32).ok_or(TransportError::TruncatedPdu)?;
            let remote = RemoteAddr {
                addr: tag.va.wrapping_add(u64::from(first.buffer_offset)),
                rkey: tag.stag,
            };
            self.credit().await?;
            s.qp.post_rdma_write(s.wr_id(), slice, remote)
                .map_err(io_err)?;
        }
        if last.status_present {
            let resp = Pdu::new(
                Header::ScsiResponse(ScsiResponse {
                    overflow: last.overflow,
                    underflow: last.underflow,
                    response: pdu::scsi_response::COMMAND_COMPLETED,
                    status: last.status,
                    itt: last.itt,
                    stat_sn: last.stat_sn,
                    exp_cmd_sn: last.exp_cmd_sn,
                    max_cmd_sn: last.max_cmd_sn,
                    residual_count: last.residual_count,
                    ..Default::default()
                }),
                Bytes::new(),
            );
            let invalidate = self.response_ends_task(last.itt);
            self.send_control_inv(IserHeader::PLAIN, &resp, invalidate)
                .await?;
        }
        Ok(())
    }

    /// Target "get data": an R2T becomes an RDMA READ of that burst.
    async fn get_data(&self, r2t: &pdu::R2t) -> Result<(), TransportError> {
        let s = &self.shared;
        let write = lock(&s.tasks).advertised.get_mut(&r2t.itt).and_then(|a| {
            let base = *a.write_base.get_or_insert(r2t.buffer_offset);
            Some((a.write?, base))
        });
        let Some((tag, base)) = write else {
            tracing::info!(itt = r2t.itt, "data wanted for a task without a write STag");
            return Err(TransportError::Io(std::io::ErrorKind::InvalidData.into()));
        };
        let len = r2t.desired_data_transfer_length;
        let buf = s
            .data_pool
            .get(s.qp.as_ref(), len as usize, Access::LOCAL_WRITE)
            .map_err(io_err)?;
        let slice =
            LocalSlice::new(Arc::clone(&buf), 0, len).ok_or(TransportError::TruncatedPdu)?;
        let wr = s.wr_id();
        lock(&s.tasks).reads.insert(
            wr,
            PendingRead {
                lun: r2t.lun,
                itt: r2t.itt,
                ttt: r2t.ttt,
                offset: r2t.buffer_offset,
                buf,
                len,
            },
        );
        let Some(from_base) = r2t.buffer_offset.checked_sub(base) else {
            tracing::info!(
                itt = r2t.itt,
                "data wanted before the advertised write buffer"
            );
            return Err(TransportError::Io(std::io::ErrorKind::InvalidData.into()));
        };
        let remote = RemoteAddr {
            addr: tag.va.wrapping_add(u64::from(from_base)),
            rkey: tag.stag,
        };
        self.credit().await?;
        if let Err(e) = s.qp.post_rdma_read(wr, slice, remote) {
            lock(&s.tasks).reads.remove(&wr);
            return Err(io_err(e));
        }
        Ok(())
    }

    /// Initiator: registers a command's buffers, stages its write data from
    /// the Data-Out PDUs behind it in this batch, and SENDs it with STags.
    async fn command(
        &self,
        cmd: &pdu::ScsiCommand,
        pdu: &Pdu,
        rest: &[Pdu],
    ) -> Result<(), TransportError> {
        let s = &self.shared;
        let itt = cmd.itt;
        let edtl = cmd.expected_data_transfer_length;
        let read_len = match (cmd.read, cmd.write) {
            (true, false) => edtl,
            (true, true) => cmd.bidi_read_length.unwrap_or(0),
            _ => 0,
        };
        let mut read = None;
        let mut write = None;
        if read_len > 0 {
            let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
            let buf = s
                .data_pool
                .get(s.qp.as_ref(), read_len as usize, access)
                .map_err(io_err)?;
            read = Some(Tagged {
                stag: buf.rkey(),
                va: buf.addr(),
            });
            let stale = lock(&s.tasks).read_bufs.insert(itt, (buf, read_len));
            self.retire_stale(stale);
        }
        if cmd.write && edtl as usize > pdu.data.len() {
            let buf = s
                .data_pool
                .get(s.qp.as_ref(), edtl as usize, Access::REMOTE_READ)
                .map_err(io_err)?;
            buf.write_at(0, &pdu.data)
                .ok_or(TransportError::TruncatedPdu)?;
            for p in rest {
                if let Header::DataOut(d) = &p.header {
                    if d.itt == itt {
                        buf.write_at(d.buffer_offset as usize, &p.data)
                            .ok_or(TransportError::TruncatedPdu)?;
                    }
                }
            }
            // The unsolicited Data-Out sequence is the one IDM closed with F
            // (or none, when the command itself has F); what follows in the
            // batch is staged only. Per-connection params cannot tell: over
            // MC/S only the leading login negotiates InitialR2T.
            let mut unsolicited_end = pdu.data.len() as u32;
            if !cmd.final_ {
                for p in rest {
                    if let Header::DataOut(d) = &p.header {
                        if d.itt == itt {
                            unsolicited_end = d.buffer_offset.saturating_add(p.data.len() as u32);
                            if d.final_ {
                                break;
                            }
                        }
                    }
                }
            }
            // The write VA names the first byte the target fetches (as
            // Linux's ib_iser does): buffer offset `unsolicited_end`.
            write = Some(Tagged {
                stag: buf.rkey(),
                va: buf.addr().wrapping_add(u64::from(unsolicited_end)),
            });
            let stale = lock(&s.tasks)
                .write_bufs
                .insert(itt, (buf, unsolicited_end));
            self.retire_stale(stale);
        }
        self.send_control(IserHeader::Control { write, read }, pdu)
            .await
    }
}

impl Drop for IserTx {
    /// The send half going away ends the connection, so the completion task
    /// (which holds the queue pair) sees the flushes and stops.
    fn drop(&mut self) {
        self.shared.qp.disconnect();
    }
}

impl PduTx for IserTx {
    async fn send(&mut self, pdus: &[Pdu]) -> Result<(), TransportError> {
        if !self.shared.datamover.load(Ordering::Acquire) {
            for p in pdus {
                self.send_control(IserHeader::PLAIN, p).await?;
            }
            return Ok(());
        }
        let mut i = 0;
        while let Some(p) = pdus.get(i) {
            let rest = pdus.get(i + 1..).unwrap_or(&[]);
            match (&p.header, self.shared.role) {
                (Header::DataIn(d), Role::Target) => {
                    let mut end = i + 1;
                    let mut next_offset = d.buffer_offset.wrapping_add(p.data.len() as u32);
                    let mut status = d.status_present;
                    while let Some(Pdu {
                        header: Header::DataIn(n),
                        data,
                    }) = pdus.get(end)
                    {
                        if status || n.itt != d.itt || n.buffer_offset != next_offset {
                            break;
                        }
                        next_offset = next_offset.wrapping_add(data.len() as u32);
                        status = n.status_present;
                        end += 1;
                    }
                    self.put_data(pdus.get(i..end).unwrap_or(&[])).await?;
                    i = end;
                    continue;
                }
                (Header::R2t(r), Role::Target) => self.get_data(r).await?,
                (Header::ScsiResponse(r), Role::Target) => {
                    let invalidate = self.response_ends_task(r.itt);
                    self.send_control_inv(IserHeader::PLAIN, p, invalidate)
                        .await?;
                }
                (Header::Reject(_), Role::Target) => {
                    // A refused command gets no response: forget its buffers.
                    if let Some(bhs) = p.data.get(..BHS_LEN).and_then(|b| b.try_into().ok()) {
                        lock(&self.shared.tasks).advertised.remove(&pdu::itt(bhs));
                    }
                    self.send_control(IserHeader::PLAIN, p).await?;
                }
                (Header::ScsiCommand(c), Role::Initiator) => self.command(c, p, rest).await?,
                (Header::DataOut(d), Role::Initiator) => {
                    let unsolicited_end = lock(&self.shared.tasks)
                        .write_bufs
                        .get(&d.itt)
                        .map(|(_, end)| *end);
                    // Only the unsolicited part of a task still open goes as
                    // SENDs; beyond it, data waits for RDMA READ. A task we no
                    // longer track has had its response: the completion task
                    // drops its buffers then, and it can do so while this batch
                    // is still going out (the target RDMA-READ the staged data
                    // and answered right after the command's SEND). Its Data-Out
                    // is moot, and sending the staged remainder would be one
                    // SEND far beyond the peer's receive buffers, which breaks
                    // its queue pair (LIO: recv failure, local QP operation error).
                    match unsolicited_end {
                        Some(end) if d.buffer_offset < end => {
                            self.send_control(IserHeader::PLAIN, p).await?;
                        }
                        Some(_) => {}
                        None => tracing::debug!(
                            itt = d.itt,
                            offset = d.buffer_offset,
                            "Data-Out for a task already answered: not sent"
                        ),
                    }
                }
                _ => self.send_control(IserHeader::PLAIN, p).await?,
            }
            i += 1;
        }
        Ok(())
    }

    fn set_digests(&mut self, header: bool, data: bool) {
        if header || data {
            tracing::warn!("digests asked for on iSER: ignored (RFC 7145 §6.4)");
        }
    }

    fn enable_datamover(&mut self, params: &NegotiatedParams) {
        self.shared.datamover.store(true, Ordering::Release);
        tracing::debug!(
            role = ?self.shared.role,
            rdma = params.rdma_extensions,
            "iSER datamover enabled"
        );
    }

    async fn shutdown(&mut self) {
        self.shared.qp.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulation::Emulation;
    use crate::verbs::Listener;
    use iscsi_proto::pdu::{NopOut, R2t, ScsiCommand};

    async fn pair() -> (Emulation, IserTransport, IserTransport) {
        let fab = Emulation::new();
        let mut l = fab.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        let f2 = fab.clone();
        let ini = tokio::spawn(async move {
            IserTransport::connect(&f2, addr, IserConfig::default())
                .await
                .unwrap()
        });
        let req = l.next_request().await.unwrap();
        assert_eq!(req.private_data(), &CmHeader::INITIATOR.encode());
        let tgt = IserTransport::accept(req, IserConfig::default())
            .await
            .unwrap();
        (fab, ini.await.unwrap(), tgt)
    }

    fn params() -> NegotiatedParams {
        NegotiatedParams {
            rdma_extensions: true,
            immediate_data: true,
            initial_r2t: true,
            first_burst_length: 65536,
            max_burst_length: 262_144,
            ..Default::default()
        }
    }

    fn read_cmd(itt: u32, len: u32) -> Pdu {
        Pdu::new(
            Header::ScsiCommand(ScsiCommand {
                final_: true,
                read: true,
                itt,
                expected_data_transfer_length: len,
                ..Default::default()
            }),
            Bytes::new(),
        )
    }

    fn write_cmd(itt: u32, len: u32, final_: bool, immediate: Bytes) -> Pdu {
        Pdu::new(
            Header::ScsiCommand(ScsiCommand {
                final_,
                write: true,
                itt,
                expected_data_transfer_length: len,
                ..Default::default()
            }),
            immediate,
        )
    }

    fn r2t(itt: u32, ttt: u32, buffer_offset: u32, len: u32) -> Pdu {
        Pdu::new(
            Header::R2t(R2t {
                itt,
                ttt,
                buffer_offset,
                desired_data_transfer_length: len,
                ..Default::default()
            }),
            Bytes::new(),
        )
    }

    #[tokio::test]
    async fn control_pdus_cross_in_sends() {
        let (_f, ini, tgt) = pair().await;
        let (_irx, mut itx) = ini.into_split();
        let (mut trx, _ttx) = tgt.into_split();
        let nop = Pdu::new(
            Header::NopOut(NopOut {
                itt: 7,
                ..Default::default()
            }),
            Bytes::from_static(b"ping"),
        );
        itx.send(std::slice::from_ref(&nop)).await.unwrap();
        let got = trx.recv().await.unwrap().unwrap().parse().unwrap();
        assert_eq!(got, nop);
    }

    #[tokio::test]
    async fn data_in_becomes_rdma_write_then_response() {
        let (_f, ini, tgt) = pair().await;
        let (mut irx, mut itx) = ini.into_split();
        let (mut trx, mut ttx) = tgt.into_split();
        itx.enable_datamover(&params());
        ttx.enable_datamover(&params());
        let len = 3 * 8192 + 100;
        itx.send(&[read_cmd(1, len)]).await.unwrap();
        let cmd = trx.recv().await.unwrap().unwrap();
        assert_eq!(cmd.itt(), 1);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let data = Bytes::from(data);
        let mut pdus = Vec::new();
        let mut off = 0u32;
        while off < len {
            let n = (len - off).min(8192);
            let last = off + n == len;
            pdus.push(Pdu::new(
                Header::DataIn(DataIn {
                    final_: last,
                    status_present: last,
                    itt: 1,
                    data_sn: off / 8192,
                    buffer_offset: off,
                    stat_sn: 5,
                    ..Default::default()
                }),
                data.slice(off as usize..(off + n) as usize),
            ));
            off += n;
        }
        ttx.send(&pdus).await.unwrap();
        let din = irx.recv().await.unwrap().unwrap().parse().unwrap();
        let Header::DataIn(h) = &din.header else {
            panic!("{din:?}")
        };
        assert_eq!((h.itt, h.buffer_offset, h.data_sn), (1, 0, 0));
        assert_eq!(din.data, data);
        let resp = irx.recv().await.unwrap().unwrap().parse().unwrap();
        let Header::ScsiResponse(r) = resp.header else {
            panic!()
        };
        assert_eq!((r.itt, r.stat_sn, r.status), (1, 5, 0));
    }

    #[tokio::test]
    async fn r2t_becomes_rdma_read_and_comes_back_as_data_out() {
        let (_f, ini, tgt) = pair().await;
        let (_irx, mut itx) = ini.into_split();
        let (mut trx, mut ttx) = tgt.into_split();
        itx.enable_datamover(&params());
        ttx.enable_datamover(&params());
        let len = 1u32 << 20;
        let data = Bytes::from((0..len).map(|i| (i % 253) as u8).collect::<Vec<_>>());
        let imm = 8192u32;
        let cmd = write_cmd(9, len, true, data.slice(..imm as usize));
        let mut batch = vec![cmd];
        batch.extend(idm::initiator_data::data_out_pdus(
            0,
            9,
            pdu::RESERVED_TAG,
            &data,
            imm,
            len,
            len,
            0,
        ));
        itx.send(&batch).await.unwrap();
        let got = trx.recv().await.unwrap().unwrap().parse().unwrap();
        assert_eq!(got.data, data.slice(..imm as usize));
        // Nothing but the command crossed: the rest waits for RDMA READ.
        ttx.send(&[r2t(9, 0x42, imm, len - imm)]).await.unwrap();
        let dout = trx.recv().await.unwrap().unwrap().parse().unwrap();
        let Header::DataOut(h) = &dout.header else {
            panic!("{dout:?}")
        };
        assert_eq!(
            (h.itt, h.ttt, h.buffer_offset, h.final_),
            (9, 0x42, imm, true)
        );
        assert_eq!(dout.data, data.slice(imm as usize..));
    }

    #[tokio::test]
    async fn unsolicited_data_out_goes_in_sends_and_the_rest_waits_for_rdma_read() {
        let (_f, ini, tgt) = pair().await;
        let (_irx, mut itx) = ini.into_split();
        let (mut trx, mut ttx) = tgt.into_split();
        itx.enable_datamover(&params());
        ttx.enable_datamover(&params());
        let len = 100_000u32;
        let data = Bytes::from((0..len).map(|i| (i % 241) as u8).collect::<Vec<_>>());
        let (imm, first_burst) = (8192u32, 32768u32);
        // As IDM builds it with InitialR2T=No: F clear on the command, the
        // unsolicited sequence closed with F, then the staged remainder.
        let mut batch = vec![write_cmd(4, len, false, data.slice(..imm as usize))];
        batch.extend(idm::initiator_data::data_out_pdus(
            0,
            4,
            pdu::RESERVED_TAG,
            &data,
            imm,
            first_burst,
            8192,
            0,
        ));
        batch.extend(idm::initiator_data::data_out_pdus(
            0,
            4,
            pdu::RESERVED_TAG,
            &data,
            first_burst,
            len,
            len,
            0,
        ));
        itx.send(&batch).await.unwrap();
        let _cmd = trx.recv().await.unwrap().unwrap();
        let mut offset = imm;
        while offset < first_burst {
            let p = trx.recv().await.unwrap().unwrap().parse().unwrap();
            let Header::DataOut(h) = &p.header else {
                panic!("{p:?}")
            };
            assert_eq!((h.buffer_offset, h.ttt), (offset, pdu::RESERVED_TAG));
            offset += p.data.len() as u32;
        }
        // The staged part never crossed as a SEND: the next thing up is the
        // RDMA READ's Data-Out.
        ttx.send(&[r2t(4, 7, first_burst, len - first_burst)])
            .await
            .unwrap();
        let p = trx.recv().await.unwrap().unwrap().parse().unwrap();
        let Header::DataOut(h) = &p.header else {
            panic!("{p:?}")
        };
        assert_eq!((h.ttt, h.buffer_offset), (7, first_burst));
        assert_eq!(p.data, data.slice(first_burst as usize..));
    }

    /// The race behind LIO's "recv failure: local QP operation error": the
    /// target RDMA-READs a write's staged data and answers before the send
    /// half has walked past the command's Data-Out PDUs in its batch. The
    /// response is in (the task's buffers are gone) when they come up: the
    /// 120 KiB remainder must not go out as one SEND, which no receive
    /// buffer of the peer can hold.
    #[tokio::test]
    async fn data_out_of_a_task_already_answered_is_never_sent() {
        let (_f, ini, tgt) = pair().await;
        let (mut irx, mut itx) = ini.into_split();
        let (mut trx, mut ttx) = tgt.into_split();
        itx.enable_datamover(&params());
        ttx.enable_datamover(&params());
        let (len, imm) = (131_072u32, 8192u32);
        let data = Bytes::from(vec![0x3cu8; len as usize]);
        itx.send(&[write_cmd(5, len, true, data.slice(..imm as usize))])
            .await
            .unwrap();
        let cmd = trx.recv().await.unwrap().unwrap();
        assert_eq!(cmd.itt(), 5);
        let resp = Pdu::new(
            Header::ScsiResponse(ScsiResponse {
                itt: 5,
                stat_sn: 1,
                ..Default::default()
            }),
            Bytes::new(),
        );
        ttx.send(&[resp]).await.unwrap();
        let got = irx.recv().await.unwrap().unwrap().parse().unwrap();
        assert!(matches!(got.header, Header::ScsiResponse(_)));
        // Now the rest of the batch: the staged remainder, then a NOP-Out.
        let mut late =
            idm::initiator_data::data_out_pdus(0, 5, pdu::RESERVED_TAG, &data, imm, len, len, 0);
        late.push(Pdu::new(
            Header::NopOut(NopOut {
                itt: 6,
                ..Default::default()
            }),
            Bytes::new(),
        ));
        itx.send(&late).await.unwrap();
        let next = trx.recv().await.unwrap().unwrap().parse().unwrap();
        assert!(
            matches!(next.header, Header::NopOut(ref n) if n.itt == 6),
            "{next:?}"
        );
    }

    #[tokio::test]
    async fn pool_never_hands_out_a_region_someone_still_holds() {
        let (_f, a, _b) = {
            let fab = Emulation::new();
            let mut l = fab.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = l.local_addr();
            let f2 = fab.clone();
            let c = tokio::spawn(async move {
                f2.connect(addr, QpConfig::default(), &[], |_| Ok(()))
                    .await
                    .unwrap()
                    .0
            });
            let req = l.next_request().await.unwrap();
            let s = req
                .accept(QpConfig::default(), &[], |_| Ok(()))
                .await
                .unwrap();
            (fab, c.await.unwrap(), s)
        };
        let pool = Pool::default();
        // Keys are unique per registration, so they tell regions apart.
        let r1 = pool.get(&a, 5000, Access::LOCAL_WRITE).unwrap();
        let k1 = r1.rkey();
        let view = r1.bytes(0, 10).unwrap();
        drop(r1);
        // Still viewed: a second get must not return it.
        let r2 = pool.get(&a, 5000, Access::LOCAL_WRITE).unwrap();
        assert_ne!(r2.rkey(), k1);
        let k2 = r2.rkey();
        drop(r2);
        // Free again: reused, not registered anew.
        let r3 = pool.get(&a, 5000, Access::LOCAL_WRITE).unwrap();
        assert_eq!(r3.rkey(), k2);
        // Another access right never shares a region.
        let r4 = pool.get(&a, 5000, Access::REMOTE_READ).unwrap();
        assert_ne!(r4.rkey(), r3.rkey());
        // A retired region is not handed out again even once free...
        pool.retire(&r3);
        drop(r3);
        drop(view);
        let r5 = pool.get(&a, 5000, Access::LOCAL_WRITE).unwrap();
        assert_ne!(r5.rkey(), k2);
        // ... while the other free one is.
        assert_eq!(r5.rkey(), k1);
    }

    /// A raw verbs peer (initiator side) facing our target transport.
    async fn raw_peer() -> (Emulation, crate::emulation::EmuQp, IserTransport) {
        let (fab, qp, _rep, tgt) = raw_initiator(&CmHeader::INITIATOR.encode(), 0).await;
        (fab, qp, tgt)
    }

    /// A raw verbs initiator that sends `req_private` in its CM REQ and keeps
    /// `recvs` receives posted (wr_id = slot) into one ring of 8 KiB slots.
    /// Returns the REP's private data too.
    async fn raw_initiator(
        req_private: &[u8],
        recvs: u32,
    ) -> (Emulation, crate::emulation::EmuQp, Vec<u8>, IserTransport) {
        use crate::verbs::{Access, LocalSlice, QueuePair};
        let fab = Emulation::new();
        let mut l = fab.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        let f2 = fab.clone();
        let req_private = req_private.to_vec();
        let ini = tokio::spawn(async move {
            f2.connect(addr, QpConfig::default(), &req_private, |qp| {
                if recvs > 0 {
                    let ring = QueuePair::register(qp, 8192 * recvs as usize, Access::LOCAL_WRITE)?;
                    for i in 0..recvs {
                        let slice =
                            LocalSlice::new(Arc::clone(&ring), i as usize * 8192, 8192).unwrap();
                        QueuePair::post_recv(qp, u64::from(i), slice)?;
                    }
                }
                Ok(())
            })
            .await
            .unwrap()
        });
        let req = l.next_request().await.unwrap();
        let tgt = IserTransport::accept(req, IserConfig::default())
            .await
            .unwrap();
        let (qp, rep) = ini.await.unwrap();
        (fab, qp, rep, tgt)
    }

    /// The next receive completion of a raw peer (sends' completions skipped).
    async fn next_recv(qp: &crate::emulation::EmuQp) -> Completion {
        use crate::verbs::QueuePair;
        let t = std::time::Duration::from_secs(5);
        loop {
            let mut wcs = Vec::new();
            tokio::time::timeout(t, QueuePair::poll(qp, &mut wcs, 16))
                .await
                .expect("a completion")
                .unwrap();
            if let Some(wc) = wcs.into_iter().find(|w| w.opcode == WcOpcode::Recv) {
                assert_eq!(wc.status, WcStatus::Success, "{wc:?}");
                return wc;
            }
        }
    }

    /// A raw initiator's command behind an iSER header with these STags.
    fn raw_command(qp: &crate::emulation::EmuQp, cmd: &Pdu, iser: IserHeader) {
        let mut msg = BytesMut::new();
        msg.put_slice(&iser.encode());
        cmd.encode(false, false, &mut msg);
        raw_send(qp, &msg);
    }

    fn response(itt: u32, stat_sn: u32) -> Pdu {
        Pdu::new(
            Header::ScsiResponse(ScsiResponse {
                itt,
                stat_sn,
                ..Default::default()
            }),
            Bytes::new(),
        )
    }

    /// Linux's ib_iser (fast registration) leaves "Send with Invalidate not
    /// supported" clear: the REP says we use it, a READ's Data-In goes by
    /// RDMA WRITE and its SCSI Response invalidates the read STag.
    #[tokio::test]
    async fn read_response_invalidates_the_read_stag_when_the_initiator_allows_it() {
        use crate::verbs::{Access, QueuePair};
        let (_fab, qp, rep, tgt) = raw_initiator(&[0x80, 0, 0, 0], 4).await;
        assert_eq!(rep, vec![0x80, 0, 0, 0]);
        assert!(tgt.cm().send_with_invalidate);
        let (mut trx, mut ttx) = tgt.into_split();
        ttx.enable_datamover(&params());
        let len = 12_000u32;
        let buf = QueuePair::register(
            &qp,
            len as usize,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )
        .unwrap();
        let stag = buf.rkey();
        let read = Tagged {
            stag,
            va: buf.addr(),
        };
        raw_command(
            &qp,
            &read_cmd(21, len),
            IserHeader::Control {
                write: None,
                read: Some(read),
            },
        );
        assert_eq!(trx.recv().await.unwrap().unwrap().itt(), 21);
        let data = Bytes::from((0..len).map(|i| (i % 233) as u8).collect::<Vec<_>>());
        ttx.send(&[Pdu::new(
            Header::DataIn(DataIn {
                final_: true,
                status_present: true,
                itt: 21,
                stat_sn: 3,
                ..Default::default()
            }),
            data.clone(),
        )])
        .await
        .unwrap();
        let wc = next_recv(&qp).await;
        assert_eq!(wc.invalidated_rkey, Some(stag));
        // The data landed before the response that revoked the key.
        assert_eq!(buf.bytes(0, len as usize).unwrap(), data);
    }

    /// A WRITE's data comes by RDMA READ of the write STag; the SCSI
    /// Response (IDM's own PDU, not a Data-In) invalidates that STag.
    #[tokio::test]
    async fn write_response_invalidates_the_write_stag_when_the_initiator_allows_it() {
        use crate::verbs::{Access, QueuePair};
        let (_fab, qp, _rep, tgt) = raw_initiator(&[0x80, 0, 0, 0], 4).await;
        let (mut trx, mut ttx) = tgt.into_split();
        ttx.enable_datamover(&params());
        let len = 16_384u32;
        let buf = QueuePair::register(&qp, len as usize, Access::REMOTE_READ).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 229) as u8).collect();
        buf.write_at(0, &data).unwrap();
        let stag = buf.rkey();
        raw_command(
            &qp,
            &write_cmd(22, len, true, Bytes::new()),
            IserHeader::Control {
                write: Some(Tagged {
                    stag,
                    va: buf.addr(),
                }),
                read: None,
            },
        );
        let _cmd = trx.recv().await.unwrap().unwrap();
        ttx.send(&[r2t(22, 1, 0, len)]).await.unwrap();
        let dout = trx.recv().await.unwrap().unwrap().parse().unwrap();
        assert_eq!(&dout.data[..], &data[..]);
        ttx.send(&[response(22, 4)]).await.unwrap();
        assert_eq!(next_recv(&qp).await.invalidated_rkey, Some(stag));
    }

    /// Both STags given: one key is invalidated, the read one, as isert does.
    #[tokio::test]
    async fn bidirectional_response_invalidates_the_read_stag_only() {
        use crate::verbs::{Access, QueuePair};
        let (_fab, qp, _rep, tgt) = raw_initiator(&[0x80, 0, 0, 0], 4).await;
        let (mut trx, mut ttx) = tgt.into_split();
        ttx.enable_datamover(&params());
        let rbuf = QueuePair::register(&qp, 4096, Access::REMOTE_WRITE).unwrap();
        let wbuf = QueuePair::register(&qp, 4096, Access::REMOTE_READ).unwrap();
        let cmd = Pdu::new(
            Header::ScsiCommand(ScsiCommand {
                final_: true,
                read: true,
                write: true,
                itt: 23,
                expected_data_transfer_length: 4096,
                bidi_read_length: Some(4096),
                ..Default::default()
            }),
            Bytes::new(),
        );
        let tag = |b: &Arc<MemoryRegion>| Tagged {
            stag: b.rkey(),
            va: b.addr(),
        };
        raw_command(
            &qp,
            &cmd,
            IserHeader::Control {
                write: Some(tag(&wbuf)),
                read: Some(tag(&rbuf)),
            },
        );
        let _cmd = trx.recv().await.unwrap().unwrap();
        ttx.send(&[response(23, 5)]).await.unwrap();
        assert_eq!(next_recv(&qp).await.invalidated_rkey, Some(rbuf.rkey()));
    }

    /// Responses of tasks that advertised nothing, and every other PDU, go
    /// as plain SENDs even with Send with Invalidate agreed.
    #[tokio::test]
    async fn no_invalidate_without_a_stag_or_for_other_pdus() {
        let (_fab, qp, _rep, tgt) = raw_initiator(&[0x80, 0, 0, 0], 4).await;
        let (mut trx, mut ttx) = tgt.into_split();
        ttx.enable_datamover(&params());
        // TEST UNIT READY: no data, no STag.
        raw_command(
            &qp,
            &Pdu::new(
                Header::ScsiCommand(ScsiCommand {
                    final_: true,
                    itt: 24,
                    ..Default::default()
                }),
                Bytes::new(),
            ),
            IserHeader::PLAIN,
        );
        let _cmd = trx.recv().await.unwrap().unwrap();
        ttx.send(&[response(24, 6)]).await.unwrap();
        assert_eq!(next_recv(&qp).await.invalidated_rkey, None);
        let nop = Pdu::new(
            Header::NopIn(pdu::NopIn {
                itt: 0xffff_ffff,
                ttt: 9,
                ..Default::default()
            }),
            Bytes::new(),
        );
        ttx.send(&[nop]).await.unwrap();
        assert_eq!(next_recv(&qp).await.invalidated_rkey, None);
    }

    /// An initiator that sets "Send with Invalidate not supported" gets a
    /// REP that says we do without, and plain SENDs for READ and WRITE.
    #[tokio::test]
    async fn plain_sends_when_the_initiator_disallows_send_with_invalidate() {
        use crate::verbs::{Access, QueuePair};
        let (_fab, qp, rep, tgt) = raw_initiator(&[0xc0, 0, 0, 0], 4).await;
        assert_eq!(rep, vec![0xc0, 0, 0, 0]);
        assert!(!tgt.cm().send_with_invalidate);
        let (mut trx, mut ttx) = tgt.into_split();
        ttx.enable_datamover(&params());
        let rbuf = QueuePair::register(&qp, 4096, Access::REMOTE_WRITE).unwrap();
        raw_command(
            &qp,
            &read_cmd(31, 4096),
            IserHeader::Control {
                write: None,
                read: Some(Tagged {
                    stag: rbuf.rkey(),
                    va: rbuf.addr(),
                }),
            },
        );
        let _cmd = trx.recv().await.unwrap().unwrap();
        ttx.send(&[Pdu::new(
            Header::DataIn(DataIn {
                final_: true,
                status_present: true,
                itt: 31,
                ..Default::default()
            }),
            Bytes::from(vec![7u8; 4096]),
        )])
        .await
        .unwrap();
        assert_eq!(next_recv(&qp).await.invalidated_rkey, None);
        let wbuf = QueuePair::register(&qp, 4096, Access::REMOTE_READ).unwrap();
        raw_command(
            &qp,
            &write_cmd(32, 4096, true, Bytes::new()),
            IserHeader::Control {
                write: Some(Tagged {
                    stag: wbuf.rkey(),
                    va: wbuf.addr(),
                }),
                read: None,
            },
        );
        let _cmd = trx.recv().await.unwrap().unwrap();
        ttx.send(&[r2t(32, 1, 0, 4096)]).await.unwrap();
        let _dout = trx.recv().await.unwrap().unwrap();
        ttx.send(&[response(32, 2)]).await.unwrap();
        assert_eq!(next_recv(&qp).await.invalidated_rkey, None);
    }

    /// Our own initiator declines Send with Invalidate, so our target never
    /// uses it against it.
    #[tokio::test]
    async fn our_target_never_invalidates_towards_our_initiator() {
        let (_f, ini, tgt) = pair().await;
        assert!(!ini.cm().send_with_invalidate);
        assert!(!tgt.cm().send_with_invalidate);
    }

    /// A target that claims Send with Invalidate in its REP and invalidates
    /// our read buffer's key anyway: our initiator never agreed, so it ends
    /// the connection instead of reusing a revoked buffer.
    #[tokio::test]
    async fn initiator_refuses_a_remote_invalidation_it_never_agreed_to() {
        use crate::verbs::{Access, LocalSlice, QueuePair};
        let fab = Emulation::new();
        let mut l = fab.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        let f2 = fab.clone();
        let ini =
            tokio::spawn(
                async move { IserTransport::connect(&f2, addr, IserConfig::default()).await },
            );
        let req = l.next_request().await.unwrap();
        assert_eq!(req.private_data(), &[0xc0, 0, 0, 0]);
        let ring = std::sync::Mutex::new(None);
        let tqp = req
            .accept(QpConfig::default(), &[0x80, 0, 0, 0], |qp| {
                let r = QueuePair::register(qp, 16_384, Access::LOCAL_WRITE)?;
                QueuePair::post_recv(qp, 0, LocalSlice::new(Arc::clone(&r), 0, 16_384).unwrap())?;
                *ring.lock().unwrap() = Some(r);
                Ok(())
            })
            .await
            .unwrap();
        let ring = ring.into_inner().unwrap().unwrap();
        let ini = ini.await.unwrap().unwrap();
        assert!(!ini.cm().send_with_invalidate);
        let (mut irx, mut itx) = ini.into_split();
        itx.enable_datamover(&params());
        itx.send(&[read_cmd(41, 4096)]).await.unwrap();
        let wc = next_recv(&tqp).await;
        let mut msg = vec![0u8; wc.byte_len as usize];
        ring.read_at(0, &mut msg).unwrap();
        let IserHeader::Control {
            read: Some(read), ..
        } = IserHeader::decode(&msg).unwrap()
        else {
            panic!("no read STag")
        };
        let mut resp = BytesMut::new();
        resp.put_slice(&IserHeader::PLAIN.encode());
        response(41, 1).encode(false, false, &mut resp);
        let tx = QueuePair::register(&tqp, resp.len(), Access::LOCAL_WRITE).unwrap();
        tx.write_at(0, &resp).unwrap();
        QueuePair::post_send(
            &tqp,
            1,
            LocalSlice::new(tx, 0, resp.len() as u32).unwrap(),
            Some(read.stag),
        )
        .unwrap();
        let t = std::time::Duration::from_secs(5);
        assert!(tokio::time::timeout(t, irx.recv()).await.unwrap().is_err());
        // The connection is torn down, not carried on.
        let ended =
            tokio::time::timeout(t, async { while let Ok(Some(_)) = irx.recv().await {} }).await;
        assert!(ended.is_ok());
    }

    fn raw_send(qp: &crate::emulation::EmuQp, msg: &[u8]) {
        use crate::verbs::{Access, LocalSlice, QueuePair};
        let tx = QueuePair::register(qp, msg.len(), Access::LOCAL_WRITE).unwrap();
        tx.write_at(0, msg).unwrap();
        QueuePair::post_send(
            qp,
            1,
            LocalSlice::new(tx, 0, msg.len() as u32).unwrap(),
            None,
        )
        .unwrap();
    }

    #[tokio::test]
    async fn hostile_sends_end_in_errors_not_panics() {
        let (_f, qp, tgt) = raw_peer().await;
        let (mut trx, _ttx) = tgt.into_split();
        // Shorter than an iSER header.
        raw_send(&qp, &[0x10; 10]);
        assert!(trx.recv().await.is_err());
        // A data segment longer than we accept: the BHS comes back with it.
        let (_f, qp, tgt) = raw_peer().await;
        let (mut trx, _ttx) = tgt.into_split();
        let mut msg = IserHeader::PLAIN.encode().to_vec();
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x00; // NOP-Out
        bhs[5..8].copy_from_slice(&[0x01, 0x00, 0x00]); // 64 KiB
        msg.extend_from_slice(&bhs);
        raw_send(&qp, &msg);
        assert!(matches!(
            trx.recv().await,
            Err(TransportError::Decode(
                DecodeError::DataSegmentTooLong { .. }
            ))
        ));
        // A data segment length beyond what actually arrived.
        let (_f, qp, tgt) = raw_peer().await;
        let (mut trx, _ttx) = tgt.into_split();
        let mut msg = IserHeader::PLAIN.encode().to_vec();
        bhs[5..8].copy_from_slice(&[0x00, 0x01, 0x00]); // 256 bytes, none sent
        msg.extend_from_slice(&bhs);
        raw_send(&qp, &msg);
        assert!(trx.recv().await.is_err());
    }

    /// A peer that speaks iSER the way Linux's ib_iser does, written
    /// straight on the verbs: its write VA points at the first byte after
    /// the immediate data.
    #[tokio::test]
    async fn target_reads_from_a_linux_style_write_va() {
        use crate::verbs::{Access, QueuePair};
        let (_fab, qp, tgt) = raw_peer().await;
        let (mut trx, mut ttx) = tgt.into_split();
        ttx.enable_datamover(&params());
        let (len, imm) = (20_000u32, 4096u32);
        let data: Vec<u8> = (0..len).map(|i| (i % 239) as u8).collect();
        let buf = QueuePair::register(&qp, len as usize, Access::REMOTE_READ).unwrap();
        buf.write_at(0, &data).unwrap();
        let cmd = write_cmd(11, len, true, Bytes::copy_from_slice(&data[..imm as usize]));
        let iser = IserHeader::Control {
            write: Some(Tagged {
                stag: buf.rkey(),
                va: buf.addr() + u64::from(imm),
            }),
            read: None,
        };
        let mut msg = BytesMut::new();
        msg.put_slice(&iser.encode());
        cmd.encode(false, false, &mut msg);
        raw_send(&qp, &msg);
        let _cmd = trx.recv().await.unwrap().unwrap();
        // Two bursts, as IDM would ask with a small MaxBurstLength.
        for (ttt, off, n) in [(1u32, imm, 8192u32), (2, imm + 8192, len - imm - 8192)] {
            ttx.send(&[r2t(11, ttt, off, n)]).await.unwrap();
            let p = trx.recv().await.unwrap().unwrap().parse().unwrap();
            assert_eq!(&p.data[..], &data[off as usize..(off + n) as usize]);
        }
    }

    #[tokio::test]
    async fn disconnect_ends_both_receive_halves() {
        let (fab, ini, tgt) = pair().await;
        let (mut irx, _itx) = ini.into_split();
        let (mut trx, _ttx) = tgt.into_split();
        fab.set_link(false);
        assert!(irx.recv().await.unwrap().is_none());
        assert!(trx.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn data_in_without_advertised_buffer_is_refused() {
        let (_f, _ini, tgt) = pair().await;
        let (_trx, mut ttx) = tgt.into_split();
        ttx.enable_datamover(&params());
        let r = ttx
            .send(&[Pdu::new(
                Header::DataIn(DataIn {
                    itt: 3,
                    ..Default::default()
                }),
                Bytes::from_static(b"x"),
            )])
            .await;
        assert!(r.is_err());
    }

    /// Waits (bounded) until the fabric holds no queue pair and no region.
    async fn all_released(fab: &Emulation) -> (usize, usize) {
        for _ in 0..200 {
            if fab.live_qps() == 0 && fab.live_regions() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        (fab.live_qps(), fab.live_regions())
    }

    #[tokio::test]
    async fn device_removal_mid_write_ends_both_sides_and_releases_every_qp_and_region() {
        let (fab, ini, tgt) = pair().await;
        let (mut irx, mut itx) = ini.into_split();
        let (mut trx, mut ttx) = tgt.into_split();
        itx.enable_datamover(&params());
        ttx.enable_datamover(&params());
        // A write whose data the initiator has staged and advertised, an R2T
        // answered by an RDMA READ, then a second command still unanswered.
        let len = 65536u32;
        let data = Bytes::from(vec![0x5au8; len as usize]);
        let mut batch = vec![write_cmd(0x21, len, true, Bytes::new())];
        batch.extend(idm::initiator_data::data_out_pdus(
            0,
            0x21,
            pdu::RESERVED_TAG,
            &data,
            0,
            len,
            len,
            0,
        ));
        itx.send(&batch).await.unwrap();
        let cmd = trx.recv().await.unwrap().unwrap();
        assert!(matches!(
            cmd.parse().unwrap().header,
            Header::ScsiCommand(_)
        ));
        ttx.send(&[r2t(0x21, 7, 0, len)]).await.unwrap();
        // The Data-Out's bytes are a view of a registered region: the target
        // layer holds it until the data is written, then lets it go.
        let data_out = trx.recv().await.unwrap().unwrap().parse().unwrap();
        assert_eq!(data_out.data.len(), len as usize);
        drop(data_out);
        itx.send(&[read_cmd(0x22, 131_072)]).await.unwrap();
        assert!(fab.live_regions() > 2);

        fab.remove_device();
        // Both receive halves end (the connection is gone), sends fail.
        let t = std::time::Duration::from_secs(5);
        assert!(
            tokio::time::timeout(t, async { while let Ok(Some(_)) = irx.recv().await {} })
                .await
                .is_ok()
        );
        assert!(
            tokio::time::timeout(t, async { while let Ok(Some(_)) = trx.recv().await {} })
                .await
                .is_ok()
        );
        assert!(ttx.send(&[r2t(0x22, 8, 0, 512)]).await.is_err());
        // A new connection is refused while the device is away.
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(IserTransport::connect(&fab, addr, IserConfig::default())
            .await
            .is_err());
        // Once the layers above drop their halves, nothing of the device is held.
        drop((irx, itx, trx, ttx));
        assert_eq!(all_released(&fab).await, (0, 0));
    }

    #[tokio::test]
    async fn after_the_device_comes_back_a_new_connection_works() {
        let fab = Emulation::new();
        let mut l = fab.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        fab.remove_device();
        assert!(IserTransport::connect(&fab, addr, IserConfig::default())
            .await
            .is_err());
        assert_eq!(all_released(&fab).await, (0, 0));
        fab.add_device();
        let f2 = fab.clone();
        let ini =
            tokio::spawn(
                async move { IserTransport::connect(&f2, addr, IserConfig::default()).await },
            );
        let tgt = IserTransport::accept(l.next_request().await.unwrap(), IserConfig::default())
            .await
            .unwrap();
        let (mut irx, _itx) = ini.await.unwrap().unwrap().into_split();
        let (_trx, mut ttx) = tgt.into_split();
        let nop = Pdu::new(
            Header::NopIn(pdu::NopIn {
                itt: 0xffff_ffff,
                ttt: 5,
                ..Default::default()
            }),
            Bytes::new(),
        );
        ttx.send(&[nop]).await.unwrap();
        let got = irx.recv().await.unwrap().unwrap().parse().unwrap();
        assert!(matches!(got.header, Header::NopIn(_)));
    }
}
