//! # iser — the iSER transport (RFC 7145) beneath IDM
//!
//! On the map (`ARCHITECTURE.md`) this crate sits under `idm`, beside its
//! TCP transport: it carries iSCSI control PDUs in RDMA SENDs and moves data
//! with RDMA WRITE (Data-In) and RDMA READ (Data-Out), so the target and the
//! initiator above the Transport seam are written once for both transports.
//!
//! - [`verbs`]: the verbs contract (CM, queue pairs, memory registration,
//!   completions) that every RDMA backend implements; the real one over
//!   rdma-core lives in `rdma` behind a cargo feature.
//! - [`header`]: the iSER header and the CM private data (RFC 7145 §9);
//! - [`transport`]: `idm`'s Transport over any [`verbs::QueuePair`] — SENDs
//!   for control PDUs, RDMA WRITE / READ for data;
//! - [`connector`]: an object-safe connector for code that picks the
//!   transport at run time;
//! - [`emulation`]: an in-process **test double** of that contract, so the
//!   protocol is tested on every CI run without RDMA hardware. It is not
//!   RDMA support.

pub mod connector;
pub mod emulation;
pub mod header;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod transport;
pub mod verbs;

pub use connector::IserConnector;
pub use transport::{IserConfig, IserRx, IserTransport, IserTx};
pub use verbs::{registered_memory, RegisteredMemory};
