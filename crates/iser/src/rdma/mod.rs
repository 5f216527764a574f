//! The real verbs backend: [`crate::verbs`] over rdma-core, for Soft-RoCE (`rdma_rxe`) and RDMA
//! hardware alike.
//!
//! - Binding: [`sideway`] 0.4.3 for the verbs (device list, context, protection domain,
//!   completion channel and CQ, RC queue pair, memory registration) and its `rdma-mummy-sys` for
//!   the calls sideway does not wrap: librdmacm with private data (`cm`), `ibv_post_send` with
//!   SEND-with-Invalidate, `ibv_req_notify_cq` / `ibv_get_cq_event`. Both load libibverbs and
//!   librdmacm at run time, so a binary with this backend starts on a host without rdma-core
//!   and fails only when iSER is asked for (a [`VerbsError::Backend`]).
//! - Connections: every accepted or outgoing CM id gets its own event channel
//!   (`rdma_migrate_id`), watched by a small task that turns DISCONNECTED and DEVICE_REMOVAL into
//!   the QP's error state, so every outstanding work request completes with a flush.
//! - Completions: one CQ per QP with a completion channel whose fd is read through tokio's
//!   `AsyncFd`; `poll` drains the CQ, re-arms it, drains again, and only then sleeps.
//! - Device removal (`RDMA_CM_EVENT_DEVICE_REMOVAL` on any of our CM ids, or
//!   `IBV_EVENT_DEVICE_FATAL` on a context): every connection on the device flushes at once, the
//!   listener destroys its id and binds again every second, and the device's context is never
//!   reused, so once the layers above drop their halves nothing of it is left and the kernel can
//!   finish the removal (rdma_rxe has no disassociate: it waits for every open context).
//!   librdmacm holds a context of its own per device and closes a removed one only when it
//!   re-reads its device list, which we make it do (`release_rdmacm_contexts`); up to rdma-core
//!   44 at least it skips that while no device at all is left, so on a host whose only RDMA device
//!   is removed the removal still waits for the process to exit.
//! - We hold one librdmacm reference on every live device (`cm::pin_devices`) and give back the
//!   one on a device being removed: rdma-core 44's librdmacm deadlocks on its own lock if its
//!   device list ever becomes empty while devices exist, and a re-read during a removal could
//!   empty it (see `cm::PINNED`).
//! - The QP is ours (not `rdma_create_qp`'s): it moves INIT → RTR → RTS with the attributes
//!   `rdma_init_qp_attr` gives, the RDMA READ depths set from the CM exchange.

mod cm;
mod qp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sideway::ibverbs::queue_pair::QueuePairState;

use crate::verbs::{ConnectRequest, Listener, QpConfig, Verbs, VerbsError};
use cm::{CmId, ConnParam, EventChannel, EventKind};
pub use qp::{device_names, RdmaQp};
use qp::{device_removed, release_rdmacm_contexts, Conn, Shared};

/// How long address/route resolution and each step of a connection may take.
const CM_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_MS: i32 = 5000;

/// The rdma-core verbs backend. Cheap to create; devices are opened when a connection first
/// needs one and closed when the last connection on them is gone.
#[derive(Debug, Clone, Default)]
pub struct RdmaVerbs {}

impl RdmaVerbs {
    pub fn new() -> RdmaVerbs {
        RdmaVerbs {}
    }
}

fn depth(v: u32, device_max: u8) -> u8 {
    u8::try_from(v)
        .unwrap_or(u8::MAX)
        .clamp(1, device_max.max(1))
}

/// The next event of a connection being set up, within [`CM_TIMEOUT`] (every step of a connect
/// or accept is bounded: address, route, the REP or the RTU). A DEVICE_REMOVAL here kills the
/// device at once, like one on an established connection.
async fn next_event(
    channel: &Arc<EventChannel>,
    id: &CmId,
    peer: SocketAddr,
    step: &str,
) -> Result<cm::Event, VerbsError> {
    match tokio::time::timeout(CM_TIMEOUT, channel.next_event()).await {
        Ok(ev) => {
            let ev = ev?;
            if ev.kind == EventKind::DeviceRemoval {
                device_removed(id.device_name());
            }
            Ok(ev)
        }
        Err(_) => {
            tracing::debug!("iser rdma: {step} {peer}: no answer within {CM_TIMEOUT:?}");
            Err(VerbsError::Unreachable(peer))
        }
    }
}

impl Verbs for RdmaVerbs {
    type Qp = RdmaQp;
    type Listener = RdmaListener;

    async fn listen(&self, addr: SocketAddr) -> Result<RdmaListener, VerbsError> {
        let id = listen_id(addr)?;
        let local = id.local_addr().unwrap_or(addr);
        tracing::info!("iser rdma: listening on {local}");
        Ok(RdmaListener {
            id: Some(id),
            local,
        })
    }

    async fn connect<F>(
        &self,
        addr: SocketAddr,
        config: QpConfig,
        private_data: &[u8],
        prepare: F,
    ) -> Result<(RdmaQp, Vec<u8>), VerbsError>
    where
        F: FnOnce(&RdmaQp) -> Result<(), VerbsError> + Send,
    {
        cm::pin_devices_once();
        let channel = EventChannel::new()?;
        let id = channel.create_id()?;
        // No device for the address (ENODEV): librdmacm may still hold a context of one that was
        // removed while we had no CM id on it to hear of it; have it let go (see
        // release_rdmacm_contexts), or the removal waits on this process.
        if let Err(e) = id.resolve_addr(addr, RESOLVE_MS) {
            release_rdmacm_contexts();
            return Err(e.into());
        }
        let ev = next_event(&channel, &id, addr, "resolving").await?;
        if ev.kind != EventKind::AddrResolved {
            tracing::debug!("iser rdma: resolving {addr}: {:?} ({})", ev.kind, ev.status);
            release_rdmacm_contexts();
            return Err(VerbsError::Unreachable(addr));
        }
        id.resolve_route(RESOLVE_MS)?;
        let ev = next_event(&channel, &id, addr, "route to").await?;
        if ev.kind != EventKind::RouteResolved {
            tracing::debug!("iser rdma: route to {addr}: {:?} ({})", ev.kind, ev.status);
            return Err(VerbsError::Unreachable(addr));
        }
        let conn = Conn::new(&id, &config)?;
        let rd_atomic = depth(config.max_rd_atomic, conn.dev.max_init_rd_atom);
        let dest_rd_atomic = depth(config.max_dest_rd_atomic, conn.dev.max_rd_atom);
        conn.modify_from_cm(&id, QueuePairState::Init, rd_atomic, dest_rd_atomic)?;
        let qp_num = conn.qp_num();
        let qp = RdmaQp {
            shared: Shared::new(id, conn, config),
        };
        prepare(&qp)?;
        let sh = &qp.shared;
        sh.id.connect(&ConnParam {
            private_data,
            responder_resources: dest_rd_atomic,
            initiator_depth: rd_atomic,
            qp_num,
        })?;
        let ev = next_event(&channel, &sh.id, addr, "connecting to").await?;
        match ev.kind {
            EventKind::ConnectResponse | EventKind::Established => {}
            EventKind::Rejected => {
                return Err(VerbsError::Rejected {
                    private_data: ev.private_data,
                })
            }
            other => {
                tracing::debug!("iser rdma: connecting to {addr}: {other:?} ({})", ev.status);
                return Err(VerbsError::Unreachable(addr));
            }
        }
        // The peer's REP says how many READs it serves for us and how many it issues.
        let rd = rd_atomic.min(ev.responder_resources.max(1));
        let dest = dest_rd_atomic.min(ev.initiator_depth.max(1));
        sh.conn()
            .modify_from_cm(&sh.id, QueuePairState::ReadyToReceive, rd, dest)?;
        sh.conn()
            .modify_from_cm(&sh.id, QueuePairState::ReadyToSend, rd, dest)?;
        if ev.kind == EventKind::ConnectResponse {
            sh.id.establish()?;
        }
        qp.shared.spawn_watcher();
        tracing::debug!("iser rdma: connected to {addr}");
        Ok((qp, ev.private_data))
    }
}

/// A listening CM id on its own event channel. When its device goes away (DEVICE_REMOVAL)
/// the id is destroyed — the removal waits for that — and the listener binds again, once a
/// second, until the address has an RDMA device again.
pub struct RdmaListener {
    id: Option<CmId>,
    local: SocketAddr,
}

fn listen_id(addr: SocketAddr) -> Result<CmId, VerbsError> {
    // The thread id lets a stuck call be matched with /proc/PID/task/TID.
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    cm::pin_devices_once();
    tracing::debug!(
        tid,
        "iser rdma: listen on {addr}: creating the event channel and id"
    );
    let channel = EventChannel::new()?;
    let id = channel.create_id()?;
    tracing::debug!(tid, "iser rdma: listen on {addr}: binding");
    id.bind(addr)?;
    tracing::debug!(tid, "iser rdma: listen on {addr}: listening");
    id.listen(128)?;
    Ok(id)
}

impl Listener for RdmaListener {
    type Qp = RdmaQp;
    type Request = RdmaRequest;

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn next_request(&mut self) -> Result<RdmaRequest, VerbsError> {
        loop {
            let Some(id) = &self.id else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                // On a blocking thread, bounded: librdmacm's calls take its global lock, which
                // its device-list re-read after a removal holds, and a stuck bind must neither
                // stall a runtime worker nor end the retries.
                let local = self.local;
                let attempt = tokio::task::spawn_blocking(move || listen_id(local));
                match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                    Ok(Ok(Ok(id))) => {
                        tracing::info!("iser rdma: listening again on {}", self.local);
                        self.id = Some(id);
                        // Hold a reference on the device that came back too.
                        tokio::task::spawn_blocking(cm::pin_devices);
                    }
                    Ok(Ok(Err(e))) => {
                        tracing::debug!("iser rdma: listening again on {}: {e}", self.local)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("iser rdma: listening again on {}: {e}", self.local)
                    }
                    Err(_) => tracing::warn!(
                        "iser rdma: listening again on {}: the bind did not return within 5 s",
                        self.local
                    ),
                }
                continue;
            };
            let ev = id.channel().next_event().await?;
            match (ev.kind, ev.request) {
                (EventKind::ConnectRequest, Some(id)) => {
                    let peer = id
                        .peer_addr()
                        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                    return Ok(RdmaRequest {
                        id,
                        peer,
                        private_data: ev.private_data,
                        responder_resources: ev.responder_resources,
                        initiator_depth: ev.initiator_depth,
                    });
                }
                (EventKind::DeviceRemoval, _) => {
                    tracing::warn!(
                        "iser rdma: device removed under the listener on {}: listening again once it is back",
                        self.local
                    );
                    let name = id.device_name();
                    // Destroy the id now: the removal cannot finish while it lives.
                    self.id = None;
                    // librdmacm and verbs calls that may wait: off the runtime's workers.
                    tokio::task::spawn_blocking(move || device_removed(name));
                }
                (kind, _) => tracing::debug!("iser rdma: listener event {kind:?}"),
            }
        }
    }
}

/// A CONNECT_REQUEST not yet answered; dropping it refuses the connection.
pub struct RdmaRequest {
    id: CmId,
    peer: SocketAddr,
    private_data: Vec<u8>,
    responder_resources: u8,
    initiator_depth: u8,
}

impl ConnectRequest for RdmaRequest {
    type Qp = RdmaQp;

    fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    fn private_data(&self) -> &[u8] {
        &self.private_data
    }

    async fn accept<F>(
        self,
        config: QpConfig,
        private_data: &[u8],
        prepare: F,
    ) -> Result<RdmaQp, VerbsError>
    where
        F: FnOnce(&RdmaQp) -> Result<(), VerbsError> + Send,
    {
        let RdmaRequest {
            mut id,
            peer,
            responder_resources,
            initiator_depth,
            ..
        } = self;
        // The connection's own channel: its events (ESTABLISHED, DISCONNECTED) go to its watcher.
        let channel = EventChannel::new()?;
        id.migrate(Arc::clone(&channel))?;
        let conn = Conn::new(&id, &config)?;
        // We issue at most as many READs as the peer serves, and serve as many as it issues.
        let rd_atomic =
            depth(config.max_rd_atomic, conn.dev.max_init_rd_atom).min(responder_resources.max(1));
        let dest_rd_atomic =
            depth(config.max_dest_rd_atomic, conn.dev.max_rd_atom).min(initiator_depth.max(1));
        conn.modify_from_cm(&id, QueuePairState::Init, rd_atomic, dest_rd_atomic)?;
        let qp_num = conn.qp_num();
        let qp = RdmaQp {
            shared: Shared::new(id, conn, config),
        };
        prepare(&qp)?;
        let sh = &qp.shared;
        sh.conn().modify_from_cm(
            &sh.id,
            QueuePairState::ReadyToReceive,
            rd_atomic,
            dest_rd_atomic,
        )?;
        sh.conn().modify_from_cm(
            &sh.id,
            QueuePairState::ReadyToSend,
            rd_atomic,
            dest_rd_atomic,
        )?;
        sh.id.accept(&ConnParam {
            private_data,
            responder_resources: dest_rd_atomic,
            initiator_depth: rd_atomic,
            qp_num,
        })?;
        let ev = next_event(&channel, &sh.id, peer, "accepting").await?;
        if ev.kind != EventKind::Established {
            tracing::debug!("iser rdma: accepting {peer}: {:?} ({})", ev.kind, ev.status);
            return Err(VerbsError::Unreachable(peer));
        }
        qp.shared.spawn_watcher();
        tracing::debug!("iser rdma: accepted {peer}");
        Ok(qp)
    }

    async fn reject(self, private_data: &[u8]) {
        if let Err(e) = self.id.reject(private_data) {
            tracing::debug!("iser rdma: rejecting {}: {e}", self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_depths_stay_within_the_device_and_at_least_one() {
        assert_eq!(depth(16, 128), 16);
        assert_eq!(depth(16, 4), 4);
        assert_eq!(depth(0, 4), 1);
        assert_eq!(depth(100_000, 0), 1);
        assert_eq!(depth(300, 255), 255);
    }

    #[tokio::test]
    async fn connecting_without_a_reachable_rdma_peer_is_an_error_not_a_panic() {
        // No device, no rdma_cm, or nobody listening: all must come back as errors.
        let r = RdmaVerbs::new()
            .connect(
                SocketAddr::from(([127, 0, 0, 1], 1)),
                QpConfig::default(),
                &[0x80, 0, 0, 0],
                |_| Ok(()),
            )
            .await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn device_list_is_readable_without_rdma_core_or_devices() {
        let names = device_names();
        if names.is_empty() {
            eprintln!("skipped the device part: no verbs device on this host");
        }
    }
}
