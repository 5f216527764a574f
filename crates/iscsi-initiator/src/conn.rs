//! The connection driver: opens a TCP connection to a portal and runs the
//! sans-IO [`InitiatorLogin`] over `idm`'s TCP transport, following login
//! redirections, then applies the negotiated digests and limits to the
//! transport halves.

use std::time::Duration;

use idm::tcp::{TcpRx, TcpTransport, TcpTx};
use idm::transport::{PduRx, PduTx, Transport};
use iscsi_proto::pdu::Header;
use tokio::net::TcpStream;

use crate::error::Error;
use crate::login::{InitiatorLogin, LoginConfig, LoginEvent, LoginResult};
use crate::portal::Portal;

/// Most redirections followed before giving up (loops are a target bug).
const MAX_REDIRECTS: usize = 4;

/// A logged-in connection: its two transport halves and what login settled.
pub struct LoggedIn {
    pub rx: TcpRx,
    pub tx: TcpTx,
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

/// Connects and logs in, following up to four redirections; the whole
/// exchange on each portal must finish within `timeout`.
pub async fn login(
    portal: &Portal,
    cfg: &LoginConfig,
    timeout: Duration,
) -> Result<LoggedIn, Error> {
    let mut portal = portal.clone();
    for _ in 0..=MAX_REDIRECTS {
        let transport = connect(&portal, timeout).await?;
        let (mut rx, mut tx) = transport.into_split();
        let exchange = exchange(&mut rx, &mut tx, cfg.clone());
        let event = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::timeout("the login", timeout))??;
        match event {
            Outcome::Done(result) => {
                let p = &result.params;
                rx.set_digests(p.header_digest, p.data_digest);
                rx.set_max_recv_data_segment_length(p.max_recv_data_segment_length);
                tx.set_digests(p.header_digest, p.data_digest);
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

async fn exchange(rx: &mut TcpRx, tx: &mut TcpTx, cfg: LoginConfig) -> Result<Outcome, Error> {
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
