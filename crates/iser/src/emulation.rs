//! An in-process **test double** of the verbs contract ([`crate::verbs`]):
//! a fake fabric where queue pairs live in one process and "DMA" is a memory
//! copy. It exists so the iSER protocol code runs in every `cargo test`
//! without RDMA hardware. It is not RDMA support and moves no byte off the
//! machine.
//!
//! It keeps the rules a real RC queue pair enforces, because those are what
//! the protocol code must get right:
//! - work requests run in posting order and each gives exactly one
//!   completion (everything is signaled);
//! - a SEND consumes the peer's oldest posted receive; with none posted it
//!   fails with [`WcStatus::RnrRetryExceeded`]; one that does not fit fails
//!   with [`WcStatus::LocalLengthErr`] at the receiver and
//!   [`WcStatus::RemoteInvalidRequestErr`] at the sender;
//! - every RDMA access checks the peer's rkey, the range and the access
//!   rights ([`WcStatus::RemoteAccessErr`] on the requester otherwise); local
//!   slices must belong to this QP's registrations with the right access
//!   ([`WcStatus::LocalProtErr`]);
//! - any error completion puts the connection in error: both QPs flush
//!   ([`WcStatus::WrFlushErr`]) every receive still posted, and any later
//!   post completes with a flush error;
//! - [`Emulation::set_link`] pulls the "cable": live connections break and
//!   connects fail until it is put back;
//! - [`Emulation::remove_device`] takes the device away, as
//!   `RDMA_CM_EVENT_DEVICE_REMOVAL` / `IBV_EVENT_DEVICE_FATAL` do in the real
//!   backend: every connection flushes at once, connects, accepts and
//!   registrations fail until [`Emulation::add_device`]; listeners stay (the
//!   real backend listens again by itself). [`Emulation::live_qps`] and
//!   [`Emulation::live_regions`] say whether the layers above let go of every
//!   queue pair and region, as a real removal waits for.
//!
//! Work requests execute synchronously inside `post_*` (there is no wire
//! latency); completions are queued and handed out by [`QueuePair::poll`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::verbs::{
    Access, Completion, ConnectRequest, Listener, LocalSlice, MemoryRegion, QpConfig, QueuePair,
    RegionMemory, RemoteAddr, Verbs, VerbsError, WcOpcode, WcStatus,
};

/// The fake fabric: listeners by address, and every QP (to pull the link).
#[derive(Clone, Default)]
pub struct Emulation {
    shared: Arc<Fabric>,
}

#[derive(Default)]
struct Fabric {
    listeners: Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<PendingConnect>>>,
    qps: Mutex<Vec<Weak<QpShared>>>,
    next_key: AtomicU32,
    next_port: AtomicU32,
    link_down: AtomicBool,
    device_gone: AtomicBool,
    /// Every region registered on this fabric, to count the live ones.
    regions: Mutex<Vec<Weak<MemoryRegion>>>,
}

impl Fabric {
    fn key(&self) -> u32 {
        // Keys start away from 0 so a zeroed STag is never valid.
        0x1000 + self.next_key.fetch_add(1, Ordering::Relaxed)
    }
}

impl Emulation {
    pub fn new() -> Emulation {
        Emulation::default()
    }

    /// Pulls (`false`) or restores (`true`) the link: when pulled, every
    /// connection breaks (flushes on both sides) and new connects fail as
    /// unreachable until it is restored.
    pub fn set_link(&self, up: bool) {
        self.shared.link_down.store(!up, Ordering::SeqCst);
        if !up {
            self.break_every_qp();
        }
    }

    /// Every live queue pair to the error state (each flushes what it has posted).
    fn break_every_qp(&self) {
        let qps: Vec<Arc<QpShared>> = lock(&self.shared.qps)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for qp in qps {
            qp.to_error();
        }
    }

    /// Removes the device: every connection on it breaks at once (both sides
    /// flush everything posted), and connects, accepts and registrations fail
    /// until [`Emulation::add_device`].
    pub fn remove_device(&self) {
        self.shared.device_gone.store(true, Ordering::SeqCst);
        self.break_every_qp();
    }

    /// Brings the device (back): new connections work again.
    pub fn add_device(&self) {
        self.shared.device_gone.store(false, Ordering::SeqCst);
    }

    fn device_ok(&self, peer: SocketAddr) -> Result<(), VerbsError> {
        if self.shared.device_gone.load(Ordering::SeqCst)
            || self.shared.link_down.load(Ordering::SeqCst)
        {
            return Err(VerbsError::Unreachable(peer));
        }
        Ok(())
    }

    /// Queue pairs not yet destroyed (dropped), connected or not.
    pub fn live_qps(&self) -> usize {
        let mut qps = lock(&self.shared.qps);
        qps.retain(|w| w.strong_count() > 0);
        qps.len()
    }

    /// Registered regions not yet deregistered (dropped).
    pub fn live_regions(&self) -> usize {
        let mut regions = lock(&self.shared.regions);
        regions.retain(|w| w.strong_count() > 0);
        regions.len()
    }

    /// Breaks one live connection (the oldest), as a single cable or port
    /// failing would; returns whether there was one.
    pub fn break_one(&self) -> bool {
        let qp = lock(&self.shared.qps)
            .iter()
            .filter_map(Weak::upgrade)
            .find(|q| lock(&q.state).connected);
        match qp {
            Some(qp) => {
                qp.to_error();
                true
            }
            None => false,
        }
    }

    /// Live (connected) queue pairs on the fabric, for leak checks in tests.
    pub fn connected_qps(&self) -> usize {
        let mut qps = lock(&self.shared.qps);
        qps.retain(|w| w.strong_count() > 0);
        qps.iter()
            .filter_map(Weak::upgrade)
            .filter(|q| lock(&q.state).connected)
            .count()
    }

    fn new_qp(&self, local: SocketAddr, peer: SocketAddr, config: QpConfig) -> EmuQp {
        let shared = Arc::new(QpShared {
            state: Mutex::new(QpState {
                connected: false,
                was_connected: false,
                peer: Weak::new(),
                recvs: VecDeque::new(),
                cq: VecDeque::new(),
                regions: HashMap::new(),
                config,
            }),
            notify: Notify::new(),
            local,
            peer_addr: peer,
        });
        lock(&self.shared.qps).push(Arc::downgrade(&shared));
        EmuQp {
            shared,
            fabric: Arc::clone(&self.shared),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct PendingConnect {
    from: SocketAddr,
    private_data: Vec<u8>,
    client: Arc<QpShared>,
    reply: oneshot::Sender<Result<Vec<u8>, Vec<u8>>>,
}

impl Verbs for Emulation {
    type Qp = EmuQp;
    type Listener = EmuListener;

    async fn listen(&self, addr: SocketAddr) -> Result<EmuListener, VerbsError> {
        let addr = if addr.port() == 0 {
            let port = 40_000 + (self.shared.next_port.fetch_add(1, Ordering::Relaxed) % 20_000);
            SocketAddr::new(addr.ip(), port as u16)
        } else {
            addr
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut listeners = lock(&self.shared.listeners);
        if listeners.get(&addr).is_some_and(|l| !l.is_closed()) {
            return Err(std::io::Error::from(std::io::ErrorKind::AddrInUse).into());
        }
        listeners.insert(addr, tx);
        Ok(EmuListener {
            addr,
            requests: rx,
            fabric: self.clone(),
        })
    }

    async fn connect<F>(
        &self,
        addr: SocketAddr,
        config: QpConfig,
        private_data: &[u8],
        prepare: F,
    ) -> Result<(EmuQp, Vec<u8>), VerbsError>
    where
        F: FnOnce(&EmuQp) -> Result<(), VerbsError> + Send,
    {
        self.device_ok(addr)?;
        let listener = lock(&self.shared.listeners).get(&addr).cloned();
        let Some(listener) = listener else {
            return Err(VerbsError::Unreachable(addr));
        };
        let port = 50_000 + (self.shared.next_port.fetch_add(1, Ordering::Relaxed) % 15_000);
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port as u16);
        let qp = self.new_qp(local, addr, config);
        prepare(&qp)?;
        let (reply, answer) = oneshot::channel();
        listener
            .send(PendingConnect {
                from: local,
                private_data: private_data.to_vec(),
                client: Arc::clone(&qp.shared),
                reply,
            })
            .map_err(|_| VerbsError::Unreachable(addr))?;
        match answer.await {
            Ok(Ok(rep)) => Ok((qp, rep)),
            Ok(Err(rej)) => Err(VerbsError::Rejected { private_data: rej }),
            Err(_) => Err(VerbsError::Unreachable(addr)),
        }
    }
}

/// A listening address on the fake fabric.
pub struct EmuListener {
    addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<PendingConnect>,
    fabric: Emulation,
}

impl Drop for EmuListener {
    fn drop(&mut self) {
        lock(&self.fabric.shared.listeners).remove(&self.addr);
    }
}

impl Listener for EmuListener {
    type Qp = EmuQp;
    type Request = EmuRequest;

    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn next_request(&mut self) -> Result<EmuRequest, VerbsError> {
        let p = self
            .requests
            .recv()
            .await
            .ok_or(VerbsError::Invalid("listener closed"))?;
        Ok(EmuRequest {
            pending: p,
            local: self.addr,
            fabric: self.fabric.clone(),
        })
    }
}

/// A connect request waiting for accept or reject.
pub struct EmuRequest {
    pending: PendingConnect,
    local: SocketAddr,
    fabric: Emulation,
}

impl ConnectRequest for EmuRequest {
    type Qp = EmuQp;

    fn peer_addr(&self) -> SocketAddr {
        self.pending.from
    }

    fn private_data(&self) -> &[u8] {
        &self.pending.private_data
    }

    async fn accept<F>(
        self,
        config: QpConfig,
        private_data: &[u8],
        prepare: F,
    ) -> Result<EmuQp, VerbsError>
    where
        F: FnOnce(&EmuQp) -> Result<(), VerbsError> + Send,
    {
        self.fabric.device_ok(self.pending.from)?;
        let qp = self.fabric.new_qp(self.local, self.pending.from, config);
        prepare(&qp)?;
        self.fabric.device_ok(self.pending.from)?;
        {
            let mut me = lock(&qp.shared.state);
            me.peer = Arc::downgrade(&self.pending.client);
            me.connected = true;
            me.was_connected = true;
        }
        {
            let mut them = lock(&self.pending.client.state);
            them.peer = Arc::downgrade(&qp.shared);
            them.connected = true;
            them.was_connected = true;
        }
        self.pending
            .reply
            .send(Ok(private_data.to_vec()))
            .map_err(|_| VerbsError::Disconnected)?;
        Ok(qp)
    }

    async fn reject(self, private_data: &[u8]) {
        let _ = self.pending.reply.send(Err(private_data.to_vec()));
    }
}

struct QpState {
    connected: bool,
    /// Set once established: from then on, not connected means in error.
    was_connected: bool,
    peer: Weak<QpShared>,
    recvs: VecDeque<(u64, LocalSlice)>,
    cq: VecDeque<Completion>,
    /// This QP's registrations ("its protection domain"), by key.
    regions: HashMap<u32, Weak<MemoryRegion>>,
    config: QpConfig,
}

struct QpShared {
    state: Mutex<QpState>,
    notify: Notify,
    local: SocketAddr,
    peer_addr: SocketAddr,
}

impl QpShared {
    fn complete(&self, c: Completion) {
        lock(&self.state).cq.push_back(c);
        self.notify.notify_one();
    }

    /// Moves this QP and its peer to error, flushing posted receives.
    fn to_error(&self) {
        let peer = {
            let mut st = lock(&self.state);
            let peer = st.peer.upgrade();
            Self::flush(&mut st);
            peer
        };
        self.notify.notify_one();
        if let Some(peer) = peer {
            Self::flush(&mut lock(&peer.state));
            peer.notify.notify_one();
        }
    }

    fn flush(st: &mut QpState) {
        st.connected = false;
        while let Some((wr_id, _slice)) = st.recvs.pop_front() {
            st.cq.push_back(Completion {
                wr_id,
                status: WcStatus::WrFlushErr,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                invalidated_rkey: None,
            });
        }
    }

    /// The peer's live region behind `rkey`, if it allows `need` over the range.
    fn remote_region(
        peer: &QpShared,
        remote: RemoteAddr,
        len: u32,
        need: Access,
    ) -> Option<(Arc<MemoryRegion>, usize)> {
        let region = lock(&peer.state).regions.get(&remote.rkey)?.upgrade()?;
        if region.rkey() != remote.rkey || !region.access().contains(need) {
            return None;
        }
        let offset = remote.addr.checked_sub(region.addr())?;
        let end = offset.checked_add(u64::from(len))?;
        if end > region.len() as u64 {
            return None;
        }
        Some((region, usize::try_from(offset).ok()?))
    }
}

/// One end of an emulated RC connection.
pub struct EmuQp {
    shared: Arc<QpShared>,
    fabric: Arc<Fabric>,
}

impl Drop for EmuQp {
    fn drop(&mut self) {
        // Destroying a QP breaks the connection (the peer sees flushes).
        self.shared.to_error();
    }
}

impl EmuQp {
    fn connected_peer(&self) -> Option<Arc<QpShared>> {
        let st = lock(&self.shared.state);
        if !st.connected {
            return None;
        }
        st.peer.upgrade()
    }

    fn owns(&self, slice: &LocalSlice, need: Access) -> bool {
        let region = slice.region();
        let st = lock(&self.shared.state);
        st.regions
            .get(&region.lkey())
            .and_then(Weak::upgrade)
            .is_some_and(|r| Arc::ptr_eq(&r, region) && r.access().contains(need))
    }

    fn finish(&self, wr_id: u64, opcode: WcOpcode, status: WcStatus, byte_len: u32) {
        self.shared.complete(Completion {
            wr_id,
            status,
            opcode,
            byte_len,
            invalidated_rkey: None,
        });
        if status != WcStatus::Success {
            self.shared.to_error();
        }
    }

    fn flush_one(&self, wr_id: u64, opcode: WcOpcode) {
        self.shared.complete(Completion {
            wr_id,
            status: WcStatus::WrFlushErr,
            opcode,
            byte_len: 0,
            invalidated_rkey: None,
        });
    }

    fn do_send(&self, wr_id: u64, buf: &LocalSlice, invalidate: Option<u32>) {
        let Some(peer) = self.connected_peer() else {
            return self.flush_one(wr_id, WcOpcode::Send);
        };
        if !self.owns(buf, Access::empty()) {
            return self.finish(wr_id, WcOpcode::Send, WcStatus::LocalProtErr, 0);
        }
        let mut payload = vec![0u8; buf.len() as usize];
        if buf.region().read_at(buf.offset(), &mut payload).is_none() {
            return self.finish(wr_id, WcOpcode::Send, WcStatus::LocalLengthErr, 0);
        }
        let mut theirs = lock(&peer.state);
        let Some((rwr, rbuf)) = theirs.recvs.pop_front() else {
            drop(theirs);
            return self.finish(wr_id, WcOpcode::Send, WcStatus::RnrRetryExceeded, 0);
        };
        if payload.len() > rbuf.len() as usize {
            theirs.cq.push_back(Completion {
                wr_id: rwr,
                status: WcStatus::LocalLengthErr,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                invalidated_rkey: None,
            });
            drop(theirs);
            peer.notify.notify_one();
            return self.finish(wr_id, WcOpcode::Send, WcStatus::RemoteInvalidRequestErr, 0);
        }
        let _ = rbuf.region().write_at(rbuf.offset(), &payload);
        let invalidated = invalidate.filter(|k| theirs.regions.remove(k).is_some());
        theirs.cq.push_back(Completion {
            wr_id: rwr,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: buf.len(),
            invalidated_rkey: invalidated,
        });
        drop(theirs);
        peer.notify.notify_one();
        self.finish(wr_id, WcOpcode::Send, WcStatus::Success, 0);
    }

    fn do_rdma(&self, wr_id: u64, local: &LocalSlice, remote: RemoteAddr, write: bool) {
        let opcode = if write {
            WcOpcode::RdmaWrite
        } else {
            WcOpcode::RdmaRead
        };
        let Some(peer) = self.connected_peer() else {
            return self.flush_one(wr_id, opcode);
        };
        let local_need = if write {
            Access::empty()
        } else {
            Access::LOCAL_WRITE
        };
        if !self.owns(local, local_need) {
            return self.finish(wr_id, opcode, WcStatus::LocalProtErr, 0);
        }
        let remote_need = if write {
            Access::REMOTE_WRITE
        } else {
            Access::REMOTE_READ
        };
        let Some((region, offset)) =
            QpShared::remote_region(&peer, remote, local.len(), remote_need)
        else {
            return self.finish(wr_id, opcode, WcStatus::RemoteAccessErr, 0);
        };
        let mut tmp = vec![0u8; local.len() as usize];
        let ok = if write {
            local.region().read_at(local.offset(), &mut tmp).is_some()
                && region.write_at(offset, &tmp).is_some()
        } else {
            region.read_at(offset, &mut tmp).is_some()
                && local.region().write_at(local.offset(), &tmp).is_some()
        };
        if !ok {
            return self.finish(wr_id, opcode, WcStatus::LocalLengthErr, 0);
        }
        let byte_len = if write { 0 } else { local.len() };
        self.finish(wr_id, opcode, WcStatus::Success, byte_len);
    }
}

impl QueuePair for EmuQp {
    fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    fn peer_addr(&self) -> SocketAddr {
        self.shared.peer_addr
    }

    fn register(&self, len: usize, access: Access) -> Result<Arc<MemoryRegion>, VerbsError> {
        if u32::try_from(len).is_err() {
            return Err(VerbsError::Invalid("region larger than 4 GiB"));
        }
        if self.fabric.device_gone.load(Ordering::SeqCst) {
            return Err(VerbsError::Backend("the device was removed".into()));
        }
        let key = self.fabric.key();
        let region = Arc::new(MemoryRegion::from_parts(
            RegionMemory::zeroed(len),
            key,
            key,
            access,
            Box::new(()),
        ));
        lock(&self.shared.state)
            .regions
            .insert(key, Arc::downgrade(&region));
        let mut all = lock(&self.fabric.regions);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&region));
        Ok(region)
    }

    fn post_recv(&self, wr_id: u64, buf: LocalSlice) -> Result<(), VerbsError> {
        if !self.owns(&buf, Access::LOCAL_WRITE) {
            return Err(VerbsError::Invalid("receive buffer not locally writable"));
        }
        let mut st = lock(&self.shared.state);
        if !st.connected && st.was_connected {
            drop(st);
            self.flush_one(wr_id, WcOpcode::Recv);
            return Ok(());
        }
        if st.recvs.len() >= st.config.max_recv_wr as usize {
            return Err(VerbsError::QueueFull("receive"));
        }
        st.recvs.push_back((wr_id, buf));
        Ok(())
    }

    fn post_send(
        &self,
        wr_id: u64,
        buf: LocalSlice,
        invalidate: Option<u32>,
    ) -> Result<(), VerbsError> {
        self.do_send(wr_id, &buf, invalidate);
        Ok(())
    }

    fn post_rdma_write(
        &self,
        wr_id: u64,
        local: LocalSlice,
        remote: RemoteAddr,
    ) -> Result<(), VerbsError> {
        self.do_rdma(wr_id, &local, remote, true);
        Ok(())
    }

    fn post_rdma_read(
        &self,
        wr_id: u64,
        local: LocalSlice,
        remote: RemoteAddr,
    ) -> Result<(), VerbsError> {
        self.do_rdma(wr_id, &local, remote, false);
        Ok(())
    }

    async fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsError> {
        loop {
            {
                let mut st = lock(&self.shared.state);
                let n = st.cq.len().min(max.max(1));
                if n > 0 {
                    out.extend(st.cq.drain(..n));
                    return Ok(n);
                }
                if !st.connected && st.was_connected && st.recvs.is_empty() {
                    return Err(VerbsError::Disconnected);
                }
            }
            self.shared.notify.notified().await;
        }
    }

    fn disconnect(&self) {
        self.shared.to_error();
    }

    fn is_connected(&self) -> bool {
        lock(&self.shared.state).connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Access = Access::LOCAL_WRITE
        .union(Access::REMOTE_WRITE)
        .union(Access::REMOTE_READ);

    async fn pair() -> (Emulation, EmuQp, EmuQp) {
        let fab = Emulation::new();
        let mut l = fab.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr();
        let f2 = fab.clone();
        let client = tokio::spawn(async move {
            f2.connect(addr, QpConfig::default(), b"hi", |_| Ok(()))
                .await
                .unwrap()
        });
        let req = l.next_request().await.unwrap();
        assert_eq!(req.private_data(), b"hi");
        let server = req
            .accept(QpConfig::default(), b"yo", |_| Ok(()))
            .await
            .unwrap();
        let (client, rep) = client.await.unwrap();
        assert_eq!(rep, b"yo");
        (fab, client, server)
    }

    async fn one(qp: &EmuQp) -> Completion {
        let mut v = Vec::new();
        qp.poll(&mut v, 1).await.unwrap();
        v.remove(0)
    }

    fn slice(r: &Arc<MemoryRegion>, off: usize, len: u32) -> LocalSlice {
        LocalSlice::new(r.clone(), off, len).unwrap()
    }

    /// `off` bytes into `r`, as a peer would name it.
    fn remote_at(r: &Arc<MemoryRegion>, off: u64) -> RemoteAddr {
        RemoteAddr {
            addr: r.addr() + off,
            rkey: r.rkey(),
        }
    }

    #[tokio::test]
    async fn sends_arrive_in_order_in_posted_receives() {
        let (_f, a, b) = pair().await;
        let rx = b.register(64, ALL).unwrap();
        b.post_recv(1, slice(&rx, 0, 32)).unwrap();
        b.post_recv(2, slice(&rx, 32, 32)).unwrap();
        let tx = a.register(64, Access::empty()).unwrap();
        tx.write_at(0, b"first").unwrap();
        tx.write_at(8, b"second").unwrap();
        a.post_send(10, slice(&tx, 0, 5), None).unwrap();
        a.post_send(11, slice(&tx, 8, 6), None).unwrap();
        assert_eq!(one(&a).await.wr_id, 10);
        assert_eq!(one(&a).await.wr_id, 11);
        let c1 = one(&b).await;
        let c2 = one(&b).await;
        assert_eq!((c1.wr_id, c1.byte_len, c1.opcode), (1, 5, WcOpcode::Recv));
        assert_eq!((c2.wr_id, c2.byte_len), (2, 6));
        assert_eq!(&rx.bytes(0, 5).unwrap()[..], b"first");
        assert_eq!(&rx.bytes(32, 6).unwrap()[..], b"second");
    }

    #[tokio::test]
    async fn send_without_posted_receive_is_rnr_and_breaks_the_connection() {
        let (_f, a, b) = pair().await;
        let rx = b.register(64, ALL).unwrap();
        let tx = a.register(8, Access::empty()).unwrap();
        a.post_send(1, slice(&tx, 0, 8), None).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::RnrRetryExceeded);
        assert!(!a.is_connected() && !b.is_connected());
        // Anything posted afterwards flushes.
        b.post_recv(5, slice(&rx, 0, 8)).unwrap();
        assert_eq!(one(&b).await.status, WcStatus::WrFlushErr);
    }

    #[tokio::test]
    async fn send_larger_than_the_receive_fails_on_both_sides() {
        let (_f, a, b) = pair().await;
        let rx = b.register(4, ALL).unwrap();
        b.post_recv(1, slice(&rx, 0, 4)).unwrap();
        let tx = a.register(8, Access::empty()).unwrap();
        a.post_send(2, slice(&tx, 0, 8), None).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::RemoteInvalidRequestErr);
        assert_eq!(one(&b).await.status, WcStatus::LocalLengthErr);
    }

    #[tokio::test]
    async fn rdma_write_and_read_move_bytes_with_valid_keys() {
        let (_f, a, b) = pair().await;
        let remote = b.register(4096, ALL).unwrap();
        let local = a.register(4096, Access::LOCAL_WRITE).unwrap();
        local.write_at(0, &[7u8; 100]).unwrap();
        let at = remote_at(&remote, 1000);
        a.post_rdma_write(1, slice(&local, 0, 100), at).unwrap();
        assert!(one(&a).await.is_ok());
        assert_eq!(&remote.bytes(1000, 100).unwrap()[..], &[7u8; 100][..]);
        remote.write_at(0, b"abcd").unwrap();
        let at0 = remote_at(&remote, 0);
        a.post_rdma_read(2, slice(&local, 200, 4), at0).unwrap();
        let c = one(&a).await;
        assert_eq!(
            (c.status, c.opcode, c.byte_len),
            (WcStatus::Success, WcOpcode::RdmaRead, 4)
        );
        assert_eq!(&local.bytes(200, 4).unwrap()[..], b"abcd");
    }

    #[tokio::test]
    async fn wrong_rkey_is_a_remote_access_error_and_the_qp_goes_to_error() {
        let (_f, a, b) = pair().await;
        let remote = b.register(64, ALL).unwrap();
        let rx = b.register(64, ALL).unwrap();
        b.post_recv(9, slice(&rx, 0, 64)).unwrap();
        let local = a.register(64, Access::LOCAL_WRITE).unwrap();
        let bad = RemoteAddr {
            rkey: remote.rkey() ^ 0xff,
            ..remote_at(&remote, 0)
        };
        a.post_rdma_write(1, slice(&local, 0, 8), bad).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::RemoteAccessErr);
        assert!(!a.is_connected());
        assert_eq!(one(&b).await.status, WcStatus::WrFlushErr);
        a.post_rdma_write(2, slice(&local, 0, 8), bad).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::WrFlushErr);
    }

    #[tokio::test]
    async fn out_of_range_rdma_is_a_remote_access_error() {
        let (_f, a, b) = pair().await;
        let remote = b.register(64, ALL).unwrap();
        let local = a.register(64, Access::LOCAL_WRITE).unwrap();
        let past = remote_at(&remote, 60);
        a.post_rdma_read(1, slice(&local, 0, 8), past).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::RemoteAccessErr);
    }

    #[tokio::test]
    async fn missing_access_right_is_a_remote_access_error() {
        let (_f, a, b) = pair().await;
        let read_only = b.register(64, Access::REMOTE_READ).unwrap();
        let local = a.register(64, Access::LOCAL_WRITE).unwrap();
        let at = remote_at(&read_only, 0);
        a.post_rdma_write(1, slice(&local, 0, 8), at).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::RemoteAccessErr);
    }

    #[tokio::test]
    async fn a_deregistered_region_is_no_longer_reachable() {
        let (_f, a, b) = pair().await;
        let remote = b.register(64, ALL).unwrap();
        let at = remote_at(&remote, 0);
        drop(remote);
        let local = a.register(64, Access::LOCAL_WRITE).unwrap();
        a.post_rdma_read(1, slice(&local, 0, 8), at).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::RemoteAccessErr);
    }

    #[tokio::test]
    async fn local_slice_of_another_qp_is_a_local_protection_error() {
        let (_f, a, b) = pair().await;
        let foreign = b.register(64, ALL).unwrap();
        a.post_send(1, slice(&foreign, 0, 8), None).unwrap();
        assert_eq!(one(&a).await.status, WcStatus::LocalProtErr);
    }

    #[tokio::test]
    async fn disconnect_flushes_every_posted_receive_on_both_sides_then_reports_disconnected() {
        let (_f, a, b) = pair().await;
        let ra = a.register(64, ALL).unwrap();
        let rb = b.register(64, ALL).unwrap();
        for i in 0..3 {
            a.post_recv(i, slice(&ra, 0, 64)).unwrap();
            b.post_recv(10 + i, slice(&rb, 0, 64)).unwrap();
        }
        a.disconnect();
        for qp in [&a, &b] {
            let mut v = Vec::new();
            while v.len() < 3 {
                qp.poll(&mut v, 16).await.unwrap();
            }
            assert!(v.iter().all(|c| c.status == WcStatus::WrFlushErr));
            assert!(matches!(
                qp.poll(&mut v, 16).await,
                Err(VerbsError::Disconnected)
            ));
        }
    }

    #[tokio::test]
    async fn send_with_invalidate_revokes_the_receivers_rkey() {
        let (_f, a, b) = pair().await;
        let exposed = b.register(64, ALL).unwrap();
        let rx = b.register(64, ALL).unwrap();
        b.post_recv(1, slice(&rx, 0, 64)).unwrap();
        let tx = a.register(8, Access::LOCAL_WRITE).unwrap();
        a.post_send(2, slice(&tx, 0, 8), Some(exposed.rkey()))
            .unwrap();
        assert_eq!(one(&b).await.invalidated_rkey, Some(exposed.rkey()));
        let at = remote_at(&exposed, 0);
        a.post_rdma_read(3, slice(&tx, 0, 8), at).unwrap();
        let mut v = Vec::new();
        while !v.iter().any(|c: &Completion| c.wr_id == 3) {
            a.poll(&mut v, 8).await.unwrap();
        }
        assert!(v
            .iter()
            .any(|c| c.wr_id == 3 && c.status == WcStatus::RemoteAccessErr));
    }

    #[tokio::test]
    async fn pulled_link_breaks_connections_and_refuses_connects_until_restored() {
        let (fab, a, _b) = pair().await;
        let mut l = fab.listen("127.0.0.1:3260".parse().unwrap()).await.unwrap();
        fab.set_link(false);
        assert!(!a.is_connected());
        let addr = l.local_addr();
        assert!(matches!(
            fab.connect(addr, QpConfig::default(), &[], |_| Ok(()))
                .await,
            Err(VerbsError::Unreachable(_))
        ));
        fab.set_link(true);
        let f2 = fab.clone();
        let c =
            tokio::spawn(
                async move { f2.connect(addr, QpConfig::default(), &[], |_| Ok(())).await },
            );
        let req = l.next_request().await.unwrap();
        let _s = req
            .accept(QpConfig::default(), &[], |_| Ok(()))
            .await
            .unwrap();
        assert!(c.await.unwrap().unwrap().0.is_connected());
    }

    #[tokio::test]
    async fn removed_device_flushes_everything_and_refuses_new_work_until_added() {
        let (fab, a, b) = pair().await;
        let ra = a.register(64, ALL).unwrap();
        a.post_recv(7, slice(&ra, 0, 64)).unwrap();
        let mut l = fab.listen("127.0.0.1:3261".parse().unwrap()).await.unwrap();
        fab.remove_device();
        assert!(!a.is_connected() && !b.is_connected());
        let c = one(&a).await;
        assert_eq!((c.wr_id, c.status), (7, WcStatus::WrFlushErr));
        assert!(a.register(64, ALL).is_err());
        let addr = l.local_addr();
        assert!(matches!(
            fab.connect(addr, QpConfig::default(), &[], |_| Ok(()))
                .await,
            Err(VerbsError::Unreachable(_))
        ));
        assert_eq!(fab.live_regions(), 1);
        drop((a, b, ra));
        assert_eq!((fab.live_qps(), fab.live_regions()), (0, 0));
        fab.add_device();
        let f2 = fab.clone();
        let c =
            tokio::spawn(
                async move { f2.connect(addr, QpConfig::default(), &[], |_| Ok(())).await },
            );
        let req = l.next_request().await.unwrap();
        let _s = req
            .accept(QpConfig::default(), &[], |_| Ok(()))
            .await
            .unwrap();
        assert!(c.await.unwrap().unwrap().0.is_connected());
    }
}
