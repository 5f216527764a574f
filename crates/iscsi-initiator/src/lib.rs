//! # iscsi-initiator — the Ironstar iSCSI initiator
//!
//! Beside `iscsi-target` on the map (`ARCHITECTURE.md`), on top of the same
//! `idm` and `iscsi-proto`: discovery (SendTargets), login (None, CHAP
//! one-way and mutual, redirection), sessions with a CmdSN window and many
//! commands in flight, and an async SCSI API ([`Session`], [`Lun`]). The
//! `iscsi` binary is a thin CLI over it.
//!
//! Protocol logic is sans-IO ([`login::InitiatorLogin`],
//! [`discovery::SendTargets`], [`scsi`]); tokio only appears in [`conn`],
//! [`discovery::discover`] and [`session`]. Nothing here panics on data from
//! the wire: every length and offset a target sends is checked before use.

pub mod conn;
pub mod discovery;
pub mod error;
pub mod login;
pub mod nbd;
pub mod portal;
pub mod scsi;
pub mod session;
pub mod url;
pub mod vpd;

pub use error::Error;
pub use session::{Lun, Session, SessionOptions};
