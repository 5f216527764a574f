//! The LUN table of one target (or one view): routes each command to its
//! logical unit and answers for LUNs that have none.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cdb::{op, Cdb};
use crate::lu::LogicalUnit;
use crate::sense::{self, Sense};
use crate::{spc, vpd, Nexus, NexusId, ScsiResponse, ScsiTask};

/// An ordered LUN -> logical unit table.
#[derive(Clone, Default)]
pub struct LunMap {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

impl std::fmt::Debug for LunMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.luns.iter()).finish()
    }
}

impl LunMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, lun: u64, lu: Arc<LogicalUnit>) {
        self.luns.insert(lun, lu);
    }

    pub fn remove(&mut self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.luns.remove(&lun)
    }

    pub fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    pub fn luns(&self) -> impl Iterator<Item = u64> + '_ {
        self.luns.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.luns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.luns.is_empty()
    }

    /// True if any LU of the map may block (the port then uses a blocking thread).
    pub fn may_block(&self, lun: u64) -> bool {
        self.get(lun).is_some_and(|lu| lu.may_block())
    }

    /// Tells every LU of the map about a new nexus (see [`LogicalUnit::nexus_established`]).
    pub fn nexus_established(&self, nexus: &Nexus) {
        for lu in self.luns.values() {
            lu.nexus_established(nexus);
        }
    }

    /// Tells every LU of the map that a nexus is gone.
    pub fn nexus_lost(&self, nexus: NexusId) {
        for lu in self.luns.values() {
            lu.nexus_lost(nexus);
        }
    }

    /// The LU inventory one I_T nexus sees went from `old` to this map (a
    /// view, host group or target group changed). LUs it still sees queue
    /// 3F/0E REPORTED LUNS DATA HAS CHANGED for that nexus (SPC-4 §6.33);
    /// LUs it no longer sees forget the nexus (its unit attentions and
    /// RESERVE(6) reservation go, as when the nexus is lost); LUs new to it
    /// report 29/00 on its first command as for any new nexus. Returns
    /// whether anything changed.
    pub fn inventory_changed(&self, old: &LunMap, nexus: &Nexus) -> bool {
        let same = self.luns.len() == old.luns.len()
            && self
                .luns
                .iter()
                .zip(old.luns.iter())
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
        if same {
            return false;
        }
        for lu in old.luns.values() {
            if !self.luns.values().any(|n| Arc::ptr_eq(n, lu)) {
                lu.nexus_lost(nexus.id);
            }
        }
        for lu in self.luns.values() {
            if old.luns.values().any(|o| Arc::ptr_eq(o, lu)) {
                lu.queue_ua_where(None, sense::REPORTED_LUNS_DATA_HAS_CHANGED, |i, t| {
                    i == &*nexus.initiator_port_name && t == &*nexus.target_port_name
                });
            }
        }
        true
    }

    /// TARGET WARM/COLD RESET: every LU is reset.
    pub fn reset_all(&self, by: Option<NexusId>) {
        for lu in self.luns.values() {
            lu.reset(by);
        }
    }

    /// See [`LogicalUnit::expected_data_out_len`].
    pub fn expected_data_out_len(&self, lun: u64, cdb: &[u8]) -> Option<u64> {
        self.get(lun)?.expected_data_out_len(cdb)
    }

    /// Executes one command: REPORT LUNS here for any LUN, everything else
    /// on the addressed LU, or the SPC-4 answers for an absent LUN.
    pub fn execute(&self, task: &ScsiTask<'_>) -> ScsiResponse {
        let cdb = match Cdb::new(task.cdb) {
            Ok(c) => c,
            Err(s) => return ScsiResponse::check_condition(&s),
        };
        if cdb.opcode() == op::REPORT_LUNS {
            // Unit attentions do not stop REPORT LUNS, so answering here
            // (without the LU) loses nothing. It does clear 3F/0E for the
            // nexus on every LU it sees (SAM-5 §5.14): the initiator now
            // has the inventory the attention was about.
            for lu in self.luns.values() {
                lu.clear_ua(task.nexus.id, sense::REPORTED_LUNS_DATA_HAS_CHANGED);
            }
            return match spc::report_luns(self.luns(), cdb) {
                Ok(r) => r,
                Err(f) => f.into_response(),
            };
        }
        if let Some(lu) = self.get(task.lun) {
            return lu.execute(task);
        }
        let r = match cdb.opcode() {
            op::INQUIRY => vpd::absent_lun_inquiry(cdb),
            op::REQUEST_SENSE => spc::request_sense_absent_lun(cdb),
            _ => Err(Sense::new(sense::LOGICAL_UNIT_NOT_SUPPORTED).into()),
        };
        r.unwrap_or_else(|f| f.into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::TaskAttr;

    fn run(map: &LunMap, n: &Nexus, lun: u64, cdb: &[u8]) -> ScsiResponse {
        map.execute(&ScsiTask {
            nexus: n,
            lun,
            cdb,
            data_out: &[],
            data_out_buffer: None,
            expected_in_len: 4096,
            attr: TaskAttr::Simple,
            tag: 7,
        })
    }

    fn map_with(luns: &[u64]) -> LunMap {
        let mut m = LunMap::new();
        for &l in luns {
            m.insert(l, mem_lu());
        }
        m
    }

    #[test]
    fn report_luns_lists_every_lun_in_order_even_without_lun0() {
        let m = map_with(&[300, 2]);
        let n = nexus(1);
        let r = run(&m, &n, 0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_good(&r);
        assert_eq!(&r.data_in[..4], &[0, 0, 0, 16]);
        assert_eq!(&r.data_in[8..10], &[0, 2]);
        assert_eq!(&r.data_in[16..18], &[0x41, 0x2C]);
    }

    #[test]
    fn absent_lun_inquiry_has_qualifier_011b_type_1fh() {
        let m = map_with(&[1]);
        let n = nexus(1);
        let r = run(&m, &n, 0, &[0x12, 0, 0, 0, 96, 0]);
        assert_good(&r);
        assert_eq!(r.data_in[0], 0x7F);
    }

    #[test]
    fn absent_lun_request_sense_reports_lu_not_supported() {
        let m = map_with(&[1]);
        let n = nexus(1);
        let r = run(&m, &n, 5, &[0x03, 0, 0, 0, 18, 0]);
        assert_good(&r);
        assert_eq!(
            (r.data_in[2], r.data_in[12], r.data_in[13]),
            (0x05, 0x25, 0x00)
        );
    }

    #[test]
    fn absent_lun_other_commands_fail_with_lu_not_supported() {
        let m = map_with(&[1]);
        let n = nexus(1);
        let r = run(&m, &n, 5, &TUR);
        assert_check(&r, sense::LOGICAL_UNIT_NOT_SUPPORTED);
    }

    #[test]
    fn present_lun_executes_on_its_lu() {
        let m = map_with(&[1]);
        let n = nexus(1);
        m.nexus_established(&n);
        assert_check(&run(&m, &n, 1, &TUR), sense::POWER_ON_RESET_OCCURRED);
        assert_good(&run(&m, &n, 1, &TUR));
        assert_eq!(m.expected_data_out_len(1, &cdb10(0x2A, 0, 1)), Some(512));
    }
}
