//! # scsi-target — the SCSI target core (STMF + sbd's role)
//!
//! Sits under the port providers (`iscsi-target`) on the map in `ARCHITECTURE.md`
//! and knows nothing of iSCSI: it sees an I_T nexus, a LUN, a CDB and the data.
