//! # idm — the iSCSI Data Mover, shared by target and initiator
