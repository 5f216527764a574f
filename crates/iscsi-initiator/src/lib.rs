//! # iscsi-initiator — the Ironstar iSCSI initiator
//!
//! Beside `iscsi-target` on the map (`ARCHITECTURE.md`), on top of the same
//! `idm` and `iscsi-proto`: discovery (SendTargets), login (None, CHAP
//! one-way and mutual, redirection), sessions with a CmdSN window, many
//! commands in flight and several connections (MC/S), recovery by connection
//! or session reinstatement, and an async SCSI API ([`Session`], [`Lun`]).
//! [`nbd`] exports a LUN to NBD clients; [`vpd`] decodes VPD pages. The
//! `iscsi` binary is a thin CLI over it.
//!
//! Protocol logic is sans-IO and shared with the target through `idm`
//! (`idm::initiator_login`, `idm::initiator_data`, `idm::send_targets`);
//! tokio only appears in [`conn`], [`discovery::discover`], [`session`] and
//! [`nbd`]. Nothing here panics on data from the wire: every length and
//! offset a target (or an NBD client) sends is checked before use.

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
