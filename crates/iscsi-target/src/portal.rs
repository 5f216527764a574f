//! Portals: a listener per configured address, each connection served by
//! its own task (IPv4 and IPv6).

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
    listener: TcpListener,
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
            listener,
        })
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self, registry: Arc<Registry>) {
        loop {
            match self.listener.accept().await {
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

/// Binds every portal of every portal group.
pub async fn bind_all(registry: &Registry) -> std::io::Result<Vec<Portal>> {
    let mut out = Vec::new();
    for pg in &registry.snapshot().portal_groups {
        for addr in &pg.portals {
            out.push(Portal::bind(*addr, pg.tag).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?);
        }
    }
    Ok(out)
}
