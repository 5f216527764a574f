//! iSER portals: a listening CM id on some verbs backend, each accepted
//! connection served by the same [`conn::serve`] as TCP's — login, full
//! feature phase and everything above the Transport seam are shared; only
//! the transport differs (LIO's np `iser` attribute, `itadm create-tpg --iser`).

use std::net::SocketAddr;
use std::sync::Arc;

use iser::verbs::{ConnectRequest, Listener, Verbs, VerbsError};
use iser::{IserConfig, IserTransport};

use crate::conn;
use crate::registry::Registry;

/// Receives to keep posted per connection: a whole CmdSN window of commands
/// (each one SEND: InitialR2T=Yes over iSER, see `conn`) plus room for the
/// unexpected PDUs (NOP-Out, task management, text, logout) beside them.
fn iser_config(queue_depth: u32) -> IserConfig {
    IserConfig {
        recv_depth: recv_depth(queue_depth),
        ..IserConfig::default()
    }
}

/// The receives an iSER connection keeps posted, which the login also
/// declares as MaxOutstandingUnexpectedPDUs (RFC 7145 §6.4).
pub(crate) fn recv_depth(queue_depth: u32) -> u32 {
    queue_depth.saturating_add(64).max(128)
}

/// A listening iSER portal over the verbs backend `V`.
pub struct IserPortal<V: Verbs> {
    pub addr: SocketAddr,
    pub portal_group_tag: u16,
    listener: V::Listener,
}

impl<V: Verbs> IserPortal<V> {
    pub async fn bind(
        verbs: &V,
        addr: SocketAddr,
        portal_group_tag: u16,
    ) -> Result<IserPortal<V>, VerbsError> {
        let listener = verbs.listen(addr).await?;
        Ok(IserPortal {
            addr: listener.local_addr(),
            portal_group_tag,
            listener,
        })
    }

    /// Accepts connections until the listener fails or the task is dropped.
    pub async fn run(mut self, registry: Arc<Registry>) {
        loop {
            let req = match self.listener.next_request().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, addr = %self.addr, "iSER listener stopped");
                    return;
                }
            };
            let cfg = iser_config(registry.defaults().queue_depth);
            let registry = registry.clone();
            let tag = self.portal_group_tag;
            tokio::spawn(async move {
                let peer = req.peer_addr();
                match IserTransport::accept(req, cfg).await {
                    Ok(t) => conn::serve(t, registry, tag).await,
                    Err(e) => tracing::info!(%peer, error = %e, "iSER accept failed"),
                }
            });
        }
    }
}
