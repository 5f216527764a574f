//! `scsi_cdb`: sequences of CDBs (6..=32 bytes) with any data-out from up to
//! four I_T nexuses, through `LunMap::execute` on a fresh 1 MiB memory LU,
//! so mode pages, reservations and unit attentions carry over between
//! commands.

use std::sync::Arc;

use scsi_target::{
    status, LogicalUnit, LuConfig, LunMap, MemoryBackend, Nexus, ScsiTask, TaskAttr,
};

use crate::format::{
    read_scsi_record, Reader, SCSI_MODE_4K, SCSI_MODE_READ_ONLY, SCSI_MODE_THICK, SCSI_MODE_WCE_OFF,
};

/// Small enough to be cheap per input, big enough for many LBAs.
const LU_SIZE: u64 = 1 << 20;
/// No command on a 1 MiB LU has a reason to return more than this.
const MAX_DATA_IN: usize = 4 << 20;

fn nexus(id: u8) -> Nexus {
    Nexus {
        id: u64::from(id),
        initiator_port_name: format!("iqn.2026-11.dev.ironstar:init{id},i,0x80123456789{id:x}")
            .into(),
        target_port_name: "iqn.2026-11.dev.ironstar:target0,t,0x0001".into(),
        relative_target_port_id: 1,
        target_port_group_id: 1,
    }
}

fn logical_unit(mode: u8) -> Option<Arc<LogicalUnit>> {
    let config = LuConfig {
        block_size: if mode & SCSI_MODE_4K != 0 { 4096 } else { 512 },
        read_only: mode & SCSI_MODE_READ_ONLY != 0,
        thin_provisioning: mode & SCSI_MODE_THICK == 0,
        write_cache: mode & SCSI_MODE_WCE_OFF == 0,
        ..LuConfig::default()
    };
    LogicalUnit::new(
        config,
        Box::new(MemoryBackend::with_chunk_shift(LU_SIZE, 12)),
    )
    .ok()
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mode = r.u8();
    let Some(lu) = logical_unit(mode) else {
        panic!("a 1 MiB memory LU could not be made (mode {mode:#x})");
    };
    let mut map = LunMap::new();
    map.insert(0, lu.clone());
    let nexuses: Vec<Nexus> = (0..4).map(nexus).collect();
    for n in &nexuses {
        map.nexus_established(n);
    }
    let mut count = 0;
    while count < 128 {
        let Some(rec) = read_scsi_record(&mut r) else {
            break;
        };
        count += 1;
        let n = &nexuses[usize::from(rec.nexus & 3)];
        if rec.action == 2 {
            lu.reset(Some(n.id));
        }
        let _ = map.expected_data_out_len(rec.lun, rec.cdb);
        let _ = map.may_block(rec.lun);
        let resp = map.execute(&ScsiTask {
            nexus: n,
            lun: rec.lun,
            cdb: rec.cdb,
            data_out: rec.data,
            data_out_buffer: None,
            expected_in_len: rec.expected_in_len,
            attr: if rec.ordered {
                TaskAttr::Ordered
            } else {
                TaskAttr::Simple
            },
            tag: count,
        });
        match resp.status {
            status::CHECK_CONDITION => {
                let sense = resp.sense.as_ref().unwrap_or_else(|| {
                    panic!("CHECK CONDITION without sense for CDB {:02x?}", rec.cdb)
                });
                assert!(
                    sense.len() >= 18
                        && matches!(sense.first().map(|b| b & 0x7f), Some(0x70..=0x73)),
                    "malformed sense {sense:02x?} for CDB {:02x?}",
                    rec.cdb
                );
            }
            status::GOOD | status::CONDITION_MET => assert!(
                resp.sense.is_none(),
                "sense with status {:#x} for CDB {:02x?}",
                resp.status,
                rec.cdb
            ),
            status::RESERVATION_CONFLICT
            | status::BUSY
            | status::TASK_SET_FULL
            | status::TASK_ABORTED
            | status::ACA_ACTIVE => {}
            other => panic!("unknown status {other:#x} for CDB {:02x?}", rec.cdb),
        }
        assert!(
            resp.data_in_len() <= MAX_DATA_IN,
            "{} bytes of data-in for CDB {:02x?}",
            resp.data_in_len(),
            rec.cdb
        );
        if rec.action == 3 {
            map.nexus_lost(n.id);
        }
    }
    let _ = lu.stats();
    map.reset_all(None);
}
