//! The initiator's error type: what went wrong, and whose fault it was
//! (the network, the target's protocol, the SCSI device, or a timeout).

use idm::transport::TransportError;
use thiserror::Error;

use crate::login::LoginError;
use crate::portal::PortalError;
use crate::scsi::ScsiError;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot connect to {portal}: {reason}")]
    Connect {
        portal: String,
        reason: std::io::Error,
    },
    // The inner errors are shown in the message and not chained as sources,
    // so an anyhow report does not print them twice.
    #[error("transport: {0}")]
    Transport(TransportError),
    #[error("login: {0}")]
    Login(LoginError),
    #[error(transparent)]
    Portal(#[from] PortalError),
    #[error("too many login redirections (last to {0})")]
    TooManyRedirects(String),
    /// The target broke a rule of RFC 7143; the connection is dropped.
    #[error("target protocol error: {0}")]
    Protocol(String),
    #[error("the target rejected our PDU (reason {0:#04x})")]
    Rejected(u8),
    #[error("SCSI: {0}")]
    Scsi(ScsiError),
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout { what: &'static str, secs: f64 },
    /// The connection is gone; `reason` says why.
    #[error("session closed: {0}")]
    SessionClosed(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("task management function failed (response {0})")]
    TaskManagement(u8),
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        Error::Transport(e)
    }
}

impl From<LoginError> for Error {
    fn from(e: LoginError) -> Self {
        Error::Login(e)
    }
}

impl From<ScsiError> for Error {
    fn from(e: ScsiError) -> Self {
        Error::Scsi(e)
    }
}

impl Error {
    pub(crate) fn timeout(what: &'static str, d: std::time::Duration) -> Error {
        Error::Timeout {
            what,
            secs: d.as_secs_f64(),
        }
    }
}
