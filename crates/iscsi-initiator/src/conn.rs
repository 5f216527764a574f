//! The connection driver: opens a TCP or iSER connection to a portal and
//! runs the sans-IO [`InitiatorLogin`] over it, following login
//! redirections, then applies the negotiated digests and limits to the
//! transport halves and switches the data mover on ([`Link`] picks the
//! transport; everything above this file is written once for both).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use idm::tcp::{TcpRx, TcpTransport, TcpTx};
use idm::transport::{PduRx, PduTx, Role, Transport, TransportError};
use iscsi_proto::negotiation::NegotiatedParams;
use iscsi_proto::pdu::{Header, Pdu, RawPdu};
use iser::{IserConfig, IserConnector, IserRx, IserTx};
use tokio::net::TcpStream;

use crate::error::Error;
use crate::login::{InitiatorLogin, LoginConfig, LoginEvent, LoginResult};
use crate::portal::Portal;

/// Most redirections followed before giving up (loops are a target bug).
const MAX_REDIRECTS: usize = 4;

/// Which transport connections of a session use.
#[derive(Clone, Default)]
pub enum Link {
    /// iSCSI over TCP.
    #[default]
    Tcp,
    /// iSER (RFC 7145) over the given verbs backend.
    Iser(Arc<dyn IserConnector>),
}

impl Link {
    /// iSER over rdma-core (the `iser` crate's real verbs backend).
    #[cfg(feature = "rdma")]
    pub fn rdma() -> Link {
        Link::Iser(Arc::new(iser::rdma::RdmaVerbs::new()))
    }

    /// This build has no RDMA backend: every iSER connection fails, saying so.
    #[cfg(not(feature = "rdma"))]
    pub fn rdma() -> Link {
        Link::Iser(Arc::new(NoRdmaBackend))
    }
}

/// The iSER connector of a build without the `rdma` feature.
#[cfg(not(feature = "rdma"))]
struct NoRdmaBackend;

#[cfg(not(feature = "rdma"))]
impl IserConnector for NoRdmaBackend {
    fn connect(&self, _addr: SocketAddr, _cfg: IserConfig) -> iser::connector::ConnectFuture<'_> {
        Box::pin(async {
            Err(iser::verbs::VerbsError::Backend(
                "this build has no RDMA backend (build with --features rdma)".into(),
            ))
        })
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Tcp => "tcp",
            Link::Iser(_) => "iser",
        })
    }
}

/// The receive half of either transport.
pub enum ConnRx {
    Tcp(TcpRx),
    Iser(IserRx),
}

/// The send half of either transport.
pub enum ConnTx {
    Tcp(TcpTx),
    Iser(IserTx),
}

impl PduRx for ConnRx {
    async fn recv(&mut self) -> Result<Option<RawPdu>, TransportError> {
        match self {
            ConnRx::Tcp(t) => t.recv().await,
            ConnRx::Iser(t) => t.recv().await,
        }
    }
    fn set_digests(&mut self, header: bool, data: bool) {
        match self {
            ConnRx::Tcp(t) => t.set_digests(header, data),
            ConnRx::Iser(t) => t.set_digests(header, data),
        }
    }
    fn set_max_recv_data_segment_length(&mut self, len: u32) {
        match self {
            ConnRx::Tcp(t) => t.set_max_recv_data_segment_length(len),
            ConnRx::Iser(t) => t.set_max_recv_data_segment_length(len),
        }
    }
}

impl PduTx for ConnTx {
    async fn send(&mut self, pdus: &[Pdu]) -> Result<(), TransportError> {
        match self {
            ConnTx::Tcp(t) => t.send(pdus).await,
            ConnTx::Iser(t) => t.send(pdus).await,
        }
    }
    fn set_digests(&mut self, header: bool, data: bool) {
        match self {
            ConnTx::Tcp(t) => t.set_digests(header, data),
            ConnTx::Iser(t) => t.set_digests(header, data),
        }
    }
    fn enable_datamover(&mut self, params: &NegotiatedParams) {
        match self {
            ConnTx::Tcp(t) => t.enable_datamover(params),
            ConnTx::Iser(t) => t.enable_datamover(params),
        }
    }
    async fn shutdown(&mut self) {
        match self {
            ConnTx::Tcp(t) => t.shutdown().await,
            ConnTx::Iser(t) => t.shutdown().await,
        }
    }
}

/// A logged-in connection: its two transport halves and what login settled.
pub struct LoggedIn {
    pub rx: ConnRx,
    pub tx: ConnTx,
    pub result: LoginResult,
    /// Where we ended up (differs from the portal asked for after a redirection).
    pub portal: Portal,
}

impl std::fmt::Debug for LoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedIn")
            .field("portal", &self.portal)
            .field("result", &self.result)
            .finish_non_exhaustive()
    }
}

/// Opens a TCP connection within `timeout`.
pub async fn connect(portal: &Portal, timeout: Duration) -> Result<TcpTransport, Error> {
    let conn = TcpStream::connect((portal.host.as_str(), portal.port));
    let stream = tokio::time::timeout(timeout, conn)
        .await
        .map_err(|_| Error::timeout("the TCP connection", timeout))?
        .map_err(|reason| Error::Connect {
            portal: portal.to_string(),
            reason,
        })?;
    TcpTransport::new(stream).map_err(|reason| Error::Connect {
        portal: portal.to_string(),
        reason,
    })
}

/// Opens an iSER connection within `timeout`.
async fn connect_iser(
    portal: &Portal,
    connector: &dyn IserConnector,
    timeout: Duration,
) -> Result<(ConnRx, ConnTx), Error> {
    let failed = |reason: std::io::Error| Error::Connect {
        portal: portal.to_string(),
        reason,
    };
    let open = async {
        let addr: SocketAddr = tokio::net::lookup_host((portal.host.as_str(), portal.port))
            .await
            .map_err(failed)?
            .next()
            .ok_or_else(|| failed(std::io::ErrorKind::AddrNotAvailable.into()))?;
        connector
            .connect(addr, IserConfig::default())
            .await
            .map_err(|e| failed(std::io::Error::other(e.to_string())))
    };
    let transport = tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| Error::timeout("the iSER connection", timeout))??;
    let (rx, tx) = transport.into_split();
    Ok((ConnRx::Iser(rx), ConnTx::Iser(tx)))
}

/// Connects over TCP and logs in, following up to four redirections; the
/// whole exchange on each portal must finish within `timeout`.
pub async fn login(
    portal: &Portal,
    cfg: &LoginConfig,
    timeout: Duration,
) -> Result<LoggedIn, Error> {
    login_over(&Link::Tcp, portal, cfg, timeout).await
}

/// [`login`] over the transport `link` names. Over iSER the login offers
/// RDMAExtensions=Yes (and so no digests).
pub async fn login_over(
    link: &Link,
    portal: &Portal,
    cfg: &LoginConfig,
    timeout: Duration,
) -> Result<LoggedIn, Error> {
    let mut portal = portal.clone();
    let mut cfg = cfg.clone();
    if matches!(link, Link::Iser(_)) {
        cfg.policy.rdma_extensions = true;
        // RFC 7145 MaxOutstandingUnexpectedPDUs: what we can take unasked — the receives our
        // connections keep posted. The result is the minimum of both declarations and the
        // session keeps its own commands within it (see `session::command_credit`).
        cfg.policy.max_outstanding_unexpected_pdus = IserConfig::default().recv_depth;
    }
    for _ in 0..=MAX_REDIRECTS {
        let (mut rx, mut tx) = match link {
            Link::Tcp => {
                let (rx, tx) = connect(&portal, timeout).await?.into_split();
                (ConnRx::Tcp(rx), ConnTx::Tcp(tx))
            }
            Link::Iser(c) => connect_iser(&portal, c.as_ref(), timeout).await?,
        };
        let exchange = exchange(&mut rx, &mut tx, cfg.clone());
        let event = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::timeout("the login", timeout))??;
        match event {
            Outcome::Done(mut result) => {
                idm::transport::full_feature_limits(&mut result.params, Role::Initiator);
                let p = &result.params;
                rx.set_digests(p.header_digest, p.data_digest);
                rx.set_max_recv_data_segment_length(p.max_recv_data_segment_length);
                tx.set_digests(p.header_digest, p.data_digest);
                tx.enable_datamover(p);
                tracing::debug!(%portal, tsih = result.tsih, "logged in");
                return Ok(LoggedIn {
                    rx,
                    tx,
                    result: *result,
                    portal,
                });
            }
            Outcome::Redirect(addr) => {
                tx.shutdown().await;
                let (next, _) = Portal::parse_target_address(&addr)?;
                tracing::info!(from = %portal, to = %next, "login redirected");
                portal = next;
            }
        }
    }
    Err(Error::TooManyRedirects(portal.to_string()))
}

enum Outcome {
    Done(Box<LoginResult>),
    Redirect(String),
}

async fn exchange(rx: &mut ConnRx, tx: &mut ConnTx, cfg: LoginConfig) -> Result<Outcome, Error> {
    let mut machine = InitiatorLogin::new(cfg);
    let mut next = machine.start();
    loop {
        tx.send(std::slice::from_ref(&next)).await?;
        let raw = rx.recv().await?.ok_or_else(|| {
            Error::SessionClosed("target closed the connection during login".into())
        })?;
        let pdu = raw
            .parse()
            .map_err(|e| Error::Protocol(format!("during login: {e}")))?;
        let Header::LoginResponse(h) = &pdu.header else {
            return Err(Error::Protocol(format!(
                "{:?} during login",
                pdu.header.opcode()
            )));
        };
        match machine.handle(h, &pdu.data)? {
            LoginEvent::Send(p) => next = p,
            LoginEvent::Complete(r) => return Ok(Outcome::Done(r)),
            LoginEvent::Redirect(r) => return Ok(Outcome::Redirect(r.target_address)),
        }
    }
}
