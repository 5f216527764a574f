//! Helpers for the unit tests: a memory LU, nexuses, and CDB execution.

use std::sync::Arc;

use crate::sense::SenseCode;
use crate::{LogicalUnit, LuConfig, MemoryBackend, Nexus, ScsiResponse, ScsiTask, TaskAttr};

pub const TUR: [u8; 6] = [0; 6];
pub const MIB: u64 = 1 << 20;

pub fn lu_with(cfg: LuConfig, size: u64) -> Arc<LogicalUnit> {
    LogicalUnit::new(cfg, Box::new(MemoryBackend::with_chunk_shift(size, 12))).unwrap()
}

pub fn mem_lu() -> Arc<LogicalUnit> {
    lu_with(LuConfig::default(), MIB)
}

pub fn nexus(id: u64) -> Nexus {
    Nexus {
        id,
        initiator_port_name: format!("iqn.2024-01.test:init{id},i,0x23d000000{id:03x}").into(),
        target_port_name: "iqn.2024-01.test:tgt,t,0x0001".into(),
        relative_target_port_id: 1,
        target_port_group_id: 1,
    }
}

/// A nexus whose power-on unit attention has been consumed.
pub fn ready_nexus(lu: &LogicalUnit, id: u64) -> Nexus {
    let n = nexus(id);
    let _ = exec(lu, &n, &TUR, &[]);
    n
}

/// Runs one command; read data that came in pieces is handed back whole.
pub fn exec(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
    let mut r = lu.execute(&ScsiTask {
        nexus: n,
        lun: 0,
        cdb,
        data_out,
        data_out_buffer: None,
        expected_in_len: 1 << 20,
        attr: TaskAttr::Simple,
        tag: 1,
    });
    r.data_in = r.data_in_whole();
    r.data_in_more.clear();
    r
}

#[track_caller]
pub fn assert_check(r: &ScsiResponse, code: SenseCode) {
    assert_eq!(r.status, crate::status::CHECK_CONDITION, "status of {r:?}");
    assert_eq!(r.sense_code(), Some(code));
}

#[track_caller]
pub fn assert_good(r: &ScsiResponse) {
    assert_eq!(r.status, crate::status::GOOD, "{:?}", r.sense_code());
}

/// The sense-key specific field pointer (byte, C/D) of a response.
pub fn field_pointer(r: &ScsiResponse) -> Option<(u16, bool)> {
    let s = r.sense.as_ref()?;
    if s.get(15)? & 0x80 == 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([*s.get(16)?, *s.get(17)?]),
        s.get(15)? & 0x40 != 0,
    ))
}

/// The INFORMATION field of a response's sense data, when VALID.
pub fn information(r: &ScsiResponse) -> Option<u32> {
    let s = r.sense.as_ref()?;
    if s.first()? & 0x80 == 0 {
        return None;
    }
    Some(u32::from_be_bytes([
        *s.get(3)?,
        *s.get(4)?,
        *s.get(5)?,
        *s.get(6)?,
    ]))
}

pub fn cdb10(op: u8, lba: u32, n: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

pub fn cdb12(op: u8, lba: u32, n: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&n.to_be_bytes());
    c
}

pub fn cdb16(op: u8, lba: u64, n: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}
