//! # idm — the iSCSI Data Mover, shared by target and initiator
//!
//! The middle of the map (`ARCHITECTURE.md`): above the transports (TCP
//! here, iSER in `crates/iser`), below the iSCSI target and initiator. It
//! owns what both sides of iSCSI share:
//!
//! - [`state`]: the RFC 7143 §8 connection and session state machines;
//! - [`login`]: the login phases and their negotiation (target side), and
//!   [`initiator_login`], the same phases from the initiator's side;
//! - [`sn`]: CmdSN / StatSN serial arithmetic and the command window;
//! - [`initiator_data`]: the same data services from the initiator side;
//! - [`datain`] and [`r2t`]: the data services (Data-In with DataSN,
//!   residuals and status collapsing; R2T / Data-Out with burst limits);
//! - [`send_targets`]: the initiator's SendTargets exchange;
//! - [`transport`]: the Transport seam, and [`tcp`], its TCP implementation.
//!
//! Everything but `tcp` is sans-IO: PDUs and events in, PDUs and decisions
//! out, so each RFC corner case is a unit test without a socket.

pub mod datain;
pub mod initiator_data;
pub mod initiator_login;
pub mod login;
pub mod r2t;
pub mod send_targets;
pub mod sn;
pub mod state;
pub mod tcp;
pub mod transport;
