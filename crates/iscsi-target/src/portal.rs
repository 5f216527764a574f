//! Portals: a listener per configured address, each connection served by
//! its own task (IPv4 and IPv6). A portal of an iSER portal group also (or
//! only) listens for iSER on the same address through the rdma-core backend
//! (feature `rdma`); both kinds of connection reach the same `conn::serve`.

use std::net::SocketAddr;
use std::sync::Arc;

use idm::tcp::TcpTransport;
use tokio::net::TcpListener;

use crate::conn;
use crate::registry::Registry;

/// A bound portal, ready to accept.
pub struct Portal {
    pub addr: SocketAddr,
    pub portal_group_tag: u16,
    /// None for an iSER-only portal.
    listener: Option<TcpListener>,
    #[cfg(feature = "rdma")]
    iser: Option<crate::iser_portal::IserPortal<iser::rdma::RdmaVerbs>>,
}

impl Portal {
    pub async fn bind(addr: SocketAddr, portal_group_tag: u16) -> std::io::Result<Portal> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        Ok(Portal {
            addr,
            portal_group_tag,
            listener: Some(listener),
            #[cfg(feature = "rdma")]
            iser: None,
        })
    }

    /// A portal listening for TCP, iSER or both (`tcp` and `iser`; an
    /// iSER-only portal listens on `addr` as given, port 0 is not picked).
    pub async fn bind_kinds(
        addr: SocketAddr,
        portal_group_tag: u16,
        tcp: bool,
        iser: bool,
    ) -> std::io::Result<Portal> {
        if tcp {
            return Portal::bind_with(addr, portal_group_tag, iser).await;
        }
        if !iser {
            return Err(std::io::Error::other(
                "a portal must listen for TCP or iSER",
            ));
        }
        #[allow(unused_mut)]
        let mut p = Portal {
            addr,
            portal_group_tag,
            listener: None,
            #[cfg(feature = "rdma")]
            iser: None,
        };
        p.add_iser().await?;
        Ok(p)
    }

    /// Adds the iSER listener on this portal's address.
    async fn add_iser(&mut self) -> std::io::Result<()> {
        #[cfg(feature = "rdma")]
        {
            let verbs = iser::rdma::RdmaVerbs::new();
            let tag = self.portal_group_tag;
            let l = crate::iser_portal::IserPortal::bind(&verbs, self.addr, tag)
                .await
                .map_err(|e| std::io::Error::other(format!("iSER: {e}")))?;
            self.iser = Some(l);
            Ok(())
        }
        #[cfg(not(feature = "rdma"))]
        Err(std::io::Error::other(
            "iSER: this build has no RDMA backend (feature `rdma`)",
        ))
    }

    /// [`Portal::bind`], plus an iSER listener on the same address when
    /// `iser` is set (an error when this build has no RDMA backend or the
    /// address has no RDMA device).
    pub async fn bind_with(
        addr: SocketAddr,
        portal_group_tag: u16,
        iser: bool,
    ) -> std::io::Result<Portal> {
        let mut p = Portal::bind(addr, portal_group_tag).await?;
        if iser {
            p.add_iser().await?;
        }
        Ok(p)
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self, registry: Arc<Registry>) {
        #[cfg(feature = "rdma")]
        let _iser = self
            .iser
            .map(|l| AbortOnDrop(tokio::spawn(l.run(registry.clone()))));
        let Some(listener) = self.listener else {
            // iSER only: the listener task above does the work.
            return std::future::pending().await;
        };
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => {
                    let Ok(transport) = TcpTransport::new(stream) else {
                        continue;
                    };
                    let registry = registry.clone();
                    let tag = self.portal_group_tag;
                    tokio::spawn(conn::serve(transport, registry, tag));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, addr = %self.addr, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The iSER listener lives exactly as long as its portal's task.
#[cfg(feature = "rdma")]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

#[cfg(feature = "rdma")]
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds every portal of every portal group.
pub async fn bind_all(registry: &Registry) -> std::io::Result<Vec<Portal>> {
    let mut out = Vec::new();
    for pg in &registry.snapshot().portal_groups {
        for addr in &pg.portals {
            out.push(
                Portal::bind_kinds(*addr, pg.tag, pg.tcp, pg.iser)
                    .await
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                    })?,
            );
        }
    }
    Ok(out)
}
