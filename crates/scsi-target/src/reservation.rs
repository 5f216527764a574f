//! Reservations: RESERVE(6)/RELEASE(6) (SPC-2) and persistent reservations
//! (SPC-4 §5.9, PERSISTENT RESERVE IN/OUT), with the conflict table that
//! decides which commands a non-holder may still run.

use std::sync::atomic::Ordering;

use crate::cdb::{op, Cdb};
use crate::lu::LogicalUnit;
use crate::sense;
use crate::{status, CmdResult, Fail, Nexus, NexusId, ScsiResponse, ScsiTask};

/// Reservation state of one LU (behind `LogicalUnit::res`).
#[derive(Debug, Default)]
pub(crate) struct ResState {
    /// Holder of the RESERVE(6) reservation.
    pub reserve6: Option<NexusId>,
}

impl ResState {
    fn active(&self) -> bool {
        self.reserve6.is_some()
    }
}

fn lock(lu: &LogicalUnit) -> std::sync::MutexGuard<'_, ResState> {
    lu.res.lock().unwrap_or_else(|e| e.into_inner())
}

fn publish(lu: &LogicalUnit, st: &ResState) {
    lu.res_active.store(st.active(), Ordering::Release);
}

fn conflict() -> Fail {
    Fail::Status(status::RESERVATION_CONFLICT)
}

/// Commands a nexus may run while another nexus holds RESERVE(6)
/// (SPC-2 §5.5.1 and what initiators rely on: discovery and sense).
fn allowed_under_reserve6(cdb: &Cdb<'_>) -> bool {
    match cdb.opcode() {
        op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE | op::RELEASE_6 => true,
        op::MAINTENANCE_IN => true,
        op::PREVENT_ALLOW => cdb.byte(4) & 0x03 == 0,
        _ => false,
    }
}

/// RESERVATION CONFLICT if a reservation held by someone else forbids this command.
pub(crate) fn check_conflict(lu: &LogicalUnit, nexus: &Nexus, cdb: &Cdb<'_>) -> Result<(), Fail> {
    let st = lock(lu);
    if let Some(holder) = st.reserve6 {
        if holder != nexus.id && !allowed_under_reserve6(cdb) {
            return Err(conflict());
        }
    }
    Ok(())
}

pub(crate) fn reserve6(lu: &LogicalUnit, nexus: &Nexus, cdb: Cdb<'_>) -> CmdResult {
    // Third-party and extent reservations are obsolete.
    if cdb.byte(1) & 0x03 != 0 {
        return Err(sense::Sense::invalid_cdb(1, Some(1)).into());
    }
    let mut st = lock(lu);
    match st.reserve6 {
        Some(h) if h != nexus.id => return Err(conflict()),
        _ => st.reserve6 = Some(nexus.id),
    }
    publish(lu, &st);
    Ok(ScsiResponse::good_empty())
}

pub(crate) fn release6(lu: &LogicalUnit, nexus: &Nexus, _cdb: Cdb<'_>) -> CmdResult {
    let mut st = lock(lu);
    // Releasing a reservation one does not hold is a no-op (SPC-2 §7.17).
    if st.reserve6 == Some(nexus.id) {
        st.reserve6 = None;
    }
    publish(lu, &st);
    Ok(ScsiResponse::good_empty())
}

pub(crate) fn nexus_lost(lu: &LogicalUnit, nexus: NexusId) {
    let mut st = lock(lu);
    if st.reserve6 == Some(nexus) {
        st.reserve6 = None;
    }
    publish(lu, &st);
}

/// LU reset releases RESERVE(6); persistent reservations are kept.
pub(crate) fn reset(lu: &LogicalUnit) {
    let mut st = lock(lu);
    st.reserve6 = None;
    publish(lu, &st);
}

pub(crate) fn pr_in(_lu: &LogicalUnit, _t: &ScsiTask<'_>, _cdb: Cdb<'_>) -> CmdResult {
    Err(sense::INVALID_COMMAND_OPERATION_CODE.into())
}

pub(crate) fn pr_out(_lu: &LogicalUnit, _t: &ScsiTask<'_>, _cdb: Cdb<'_>) -> CmdResult {
    Err(sense::INVALID_COMMAND_OPERATION_CODE.into())
}

#[cfg(test)]
mod tests {
    use crate::status;
    use crate::testutil::*;

    const RESERVE: [u8; 6] = [0x16, 0, 0, 0, 0, 0];
    const RELEASE: [u8; 6] = [0x17, 0, 0, 0, 0, 0];
    const MODE_SENSE: [u8; 6] = [0x1A, 0, 0x3F, 0, 255, 0];

    #[test]
    fn reserve6_blocks_other_nexus_until_released() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_good(&exec(&lu, &a, &RESERVE, &[]));
        assert_good(&exec(&lu, &a, &RESERVE, &[]));
        assert_eq!(
            exec(&lu, &b, &RESERVE, &[]).status,
            status::RESERVATION_CONFLICT
        );
        assert_good(&exec(&lu, &b, &RELEASE, &[]));
        assert_good(&exec(&lu, &a, &MODE_SENSE, &[]));
        assert_eq!(
            exec(&lu, &b, &MODE_SENSE, &[]).status,
            status::RESERVATION_CONFLICT
        );
        assert_good(&exec(&lu, &b, &[0x12, 0, 0, 0, 96, 0], &[]));
        assert_good(&exec(&lu, &a, &RELEASE, &[]));
        assert_good(&exec(&lu, &b, &RESERVE, &[]));
        assert_good(&exec(&lu, &b, &RELEASE, &[]));
    }

    #[test]
    fn reserve6_is_released_on_nexus_loss_and_reset() {
        let lu = mem_lu();
        let a = ready_nexus(&lu, 1);
        let b = ready_nexus(&lu, 2);
        assert_good(&exec(&lu, &a, &RESERVE, &[]));
        lu.nexus_lost(a.id);
        assert_good(&exec(&lu, &b, &RESERVE, &[]));
        lu.reset(None);
        let _ = exec(&lu, &a, &TUR, &[]);
        assert_good(&exec(&lu, &a, &RESERVE, &[]));
    }
}
