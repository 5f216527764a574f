//! # iscsi-proto — the sans-IO wire layer of Ironstar
//!
//! Bottom of the map (`ARCHITECTURE.md`): every PDU of RFC 7143 §11 as a typed
//! header plus AHS and data segment, the framing codec with CRC32C digests, the
//! text key table of RFC 7143 §13 / RFC 7145 §6 and the negotiation engine, CHAP,
//! and SendTargets. No sockets, no async, no clocks: bytes in, values out.
//!
//! No function here panics on peer input: every length is checked once at the
//! door (`Bhs` decode, `PduDecoder`), and errors are typed so the caller can map
//! them onto a Reject reason or a login status.

pub mod chap;
pub mod codec;
pub mod digest;
pub mod keys;
pub mod negotiation;
pub mod pdu;
pub mod text;
