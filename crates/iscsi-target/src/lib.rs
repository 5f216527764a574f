//! # iscsi-target — the iSCSI port of the target (iscsit's role)
//!
//! On the map (`ARCHITECTURE.md`) it sits between the daemon and the SCSI
//! core: portals and portal groups ([`portal`] for TCP, [`iser_portal`]
//! for iSER), targets and their LUN maps
//! ([`registry`]), login policy and CHAP secrets (the `LoginAuthority` in
//! [`conn`]), SendTargets ([`discovery`]), iSNS registration messages
//! ([`isns`]), and sessions bound to the SCSI core ([`session`]), with
//! their counters ([`metrics`]) and what live inspection reads of them
//! ([`inspect`]). The protocol machinery it drives lives in `idm`.

pub mod budget;
pub mod config;
pub mod conn;
pub mod discovery;
pub mod inspect;
pub mod iser_portal;
pub mod isns;
pub mod metrics;
pub mod portal;
pub mod registry;
pub mod session;

pub use config::Config;
pub use registry::Registry;
