//! An object-safe way to open iSER connections, so code that chooses its
//! transport at run time (the initiator: `iscsi://` or `iser://`) can hold
//! "some verbs backend" without being generic over it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use crate::transport::{IserConfig, IserTransport};
use crate::verbs::{Verbs, VerbsError};

/// The future [`IserConnector::connect`] returns.
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<IserTransport, VerbsError>> + Send + 'a>>;

/// Opens initiator-side iSER connections over some verbs backend.
pub trait IserConnector: Send + Sync {
    fn connect(&self, addr: SocketAddr, cfg: IserConfig) -> ConnectFuture<'_>;
}

impl<V: Verbs> IserConnector for V {
    fn connect(&self, addr: SocketAddr, cfg: IserConfig) -> ConnectFuture<'_> {
        Box::pin(IserTransport::connect(self, addr, cfg))
    }
}
